//! iSCSI PDUs (RFC 7143 §11): the 48-byte Basic Header Segment, additional header
//! segments, the data segment with its padding, and the optional CRC32C header and data
//! digests (RFC 7143 §11.1, Appendix A "CRC32C").
//!
//! [`Bhs::parse`] turns 48 bytes into a typed [`Bhs`]; [`Bhs::to_bytes`] writes it back.
//! Reserved fields are ignored on input and written as zero, so a parse → serialise →
//! parse round trip is the identity on typed values. [`Framing`] computes the length of
//! what follows a BHS on the wire, bounded by the negotiated limits before any buffer is
//! allocated.

use thiserror::Error;

/// Length of the Basic Header Segment.
pub const BHS_LEN: usize = 48;
/// The largest data segment any side may declare (RFC 7143 §13.12: 2^24 - 1).
pub const MAX_DATA_SEGMENT_LEN: u32 = (1 << 24) - 1;

/// Errors decoding a PDU.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum PduError {
    /// Fewer bytes than a BHS.
    #[error("truncated PDU: {have} bytes, need {need}")]
    Truncated {
        /// Bytes present.
        have: usize,
        /// Bytes needed.
        need: usize,
    },
    /// An opcode this target does not know.
    #[error("unknown opcode {0:#04x}")]
    UnknownOpcode(u8),
    /// The data segment is longer than the receiver declared it accepts.
    #[error("data segment of {len} bytes exceeds the limit of {max}")]
    DataSegmentTooLong {
        /// Declared length.
        len: u32,
        /// The receiver's MaxRecvDataSegmentLength.
        max: u32,
    },
    /// A header or data digest did not match.
    #[error("{what} digest mismatch: got {got:#010x}, computed {computed:#010x}")]
    DigestMismatch {
        /// "header" or "data".
        what: &'static str,
        /// The digest on the wire.
        got: u32,
        /// The digest computed over the bytes received.
        computed: u32,
    },
    /// A field holds a value the RFC does not allow for this opcode.
    #[error("invalid {field}: {value:#x}")]
    InvalidField {
        /// Field name.
        field: &'static str,
        /// Value found.
        value: u32,
    },
}

/// An 8-byte logical unit number field, kept as on the wire (SAM-5 §4.7).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Hash)]
pub struct Lun(pub [u8; 8]);

impl Lun {
    /// The flat/peripheral LUN number encoded in the first two bytes (SAM-5 §4.7.3),
    /// `None` for other addressing methods or a non-zero second level.
    pub fn number(self) -> Option<u16> {
        let [b0, b1, rest @ ..] = self.0;
        if rest != [0; 6] {
            return None;
        }
        match b0 >> 6 {
            0 | 1 => Some(u16::from_be_bytes([b0 & 0x3f, b1])),
            _ => None,
        }
    }

    /// The single-level peripheral-device address of LUN `n` (< 256) or flat space above.
    pub fn from_number(n: u16) -> Lun {
        let mut b = [0u8; 8];
        let [hi, lo] = n.to_be_bytes();
        b[0] = if n < 256 { 0 } else { 0x40 | (hi & 0x3f) };
        b[1] = lo;
        Lun(b)
    }
}

/// Login stages (RFC 7143 §11.12.3).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Stage {
    /// SecurityNegotiation (0).
    Security,
    /// LoginOperationalNegotiation (1).
    Operational,
    /// FullFeaturePhase (3).
    FullFeature,
}

impl Stage {
    fn from_bits(v: u8, field: &'static str) -> Result<Stage, PduError> {
        match v & 3 {
            0 => Ok(Stage::Security),
            1 => Ok(Stage::Operational),
            3 => Ok(Stage::FullFeature),
            v => Err(PduError::InvalidField {
                field,
                value: u32::from(v),
            }),
        }
    }
    fn bits(self) -> u8 {
        match self {
            Stage::Security => 0,
            Stage::Operational => 1,
            Stage::FullFeature => 3,
        }
    }
}

/// NOP-Out (RFC 7143 §11.18).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopOut {
    pub immediate: bool,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SCSI Command (RFC 7143 §11.3).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiCommand {
    pub immediate: bool,
    pub final_: bool,
    pub read: bool,
    pub write: bool,
    /// Task attribute (0 untagged/simple .. 4 ACA).
    pub attr: u8,
    pub lun: Lun,
    pub itt: u32,
    pub expected_len: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub cdb: [u8; 16],
}

/// Task Management Function Request (RFC 7143 §11.5).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtRequest {
    pub immediate: bool,
    /// Function code (1 ABORT TASK .. 8 TASK REASSIGN).
    pub function: u8,
    pub lun: Lun,
    pub itt: u32,
    pub referenced_tag: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
    pub ref_cmd_sn: u32,
    pub exp_data_sn: u32,
}

/// Login Request (RFC 7143 §11.12).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginRequest {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_min: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// Text Request (RFC 7143 §11.10).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextRequest {
    pub immediate: bool,
    pub final_: bool,
    pub continue_: bool,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SCSI Data-Out (RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataOut {
    pub final_: bool,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
}

/// Logout Request (RFC 7143 §11.14).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutRequest {
    pub immediate: bool,
    /// 0 close session, 1 close connection, 2 remove connection for recovery.
    pub reason: u8,
    pub itt: u32,
    pub cid: u16,
    pub cmd_sn: u32,
    pub exp_stat_sn: u32,
}

/// SNACK Request (RFC 7143 §11.16).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snack {
    pub kind: u8,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub exp_stat_sn: u32,
    pub beg_run: u32,
    pub run_length: u32,
}

/// NOP-In (RFC 7143 §11.19).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NopIn {
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Response (RFC 7143 §11.4).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ScsiResponse {
    pub bidi_overflow: bool,
    pub bidi_underflow: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// iSCSI response (0 command completed at target).
    pub response: u8,
    /// SCSI status (SAM-5 §5.3).
    pub status: u8,
    pub itt: u32,
    pub snack_tag: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub exp_data_sn: u32,
    pub bidi_residual: u32,
    pub residual: u32,
}

/// Task Management Function Response (RFC 7143 §11.6).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TaskMgmtResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// Login Response (RFC 7143 §11.13).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LoginResponse {
    pub transit: bool,
    pub continue_: bool,
    pub csg: Stage,
    pub nsg: Stage,
    pub version_max: u8,
    pub version_active: u8,
    pub isid: [u8; 6],
    pub tsih: u16,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub status_class: u8,
    pub status_detail: u8,
}

/// Text Response (RFC 7143 §11.11).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TextResponse {
    pub final_: bool,
    pub continue_: bool,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
}

/// SCSI Data-In (RFC 7143 §11.7).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct DataIn {
    pub final_: bool,
    pub ack: bool,
    pub overflow: bool,
    pub underflow: bool,
    /// The S bit: this PDU carries the command's status.
    pub has_status: bool,
    pub status: u8,
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
    pub buffer_offset: u32,
    pub residual: u32,
}

/// Logout Response (RFC 7143 §11.15).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LogoutResponse {
    pub response: u8,
    pub itt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub time2wait: u16,
    pub time2retain: u16,
}

/// Ready To Transfer (RFC 7143 §11.8).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct R2t {
    pub lun: Lun,
    pub itt: u32,
    pub ttt: u32,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub r2t_sn: u32,
    pub buffer_offset: u32,
    pub desired_len: u32,
}

/// Asynchronous Message (RFC 7143 §11.9).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct AsyncMessage {
    pub lun: Lun,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub event: u8,
    pub vcode: u8,
    pub param1: u16,
    pub param2: u16,
    pub param3: u16,
}

/// Reject (RFC 7143 §11.17). The data segment carries the rejected BHS.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reject {
    pub reason: u8,
    pub stat_sn: u32,
    pub exp_cmd_sn: u32,
    pub max_cmd_sn: u32,
    pub data_sn: u32,
}

/// Reject reasons (RFC 7143 §11.17.1).
pub mod reject_reason {
    /// Data (payload) digest error.
    pub const DATA_DIGEST: u8 = 0x02;
    /// SNACK reject.
    pub const SNACK_REJECT: u8 = 0x03;
    /// Protocol error.
    pub const PROTOCOL_ERROR: u8 = 0x04;
    /// Command not supported.
    pub const COMMAND_NOT_SUPPORTED: u8 = 0x05;
    /// Invalid PDU field.
    pub const INVALID_PDU_FIELD: u8 = 0x09;
}

/// A typed Basic Header Segment, one variant per opcode (RFC 7143 §11.2.1.2).
#[allow(missing_docs)]
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Bhs {
    NopOut(NopOut),
    ScsiCommand(ScsiCommand),
    TaskMgmtRequest(TaskMgmtRequest),
    LoginRequest(LoginRequest),
    TextRequest(TextRequest),
    DataOut(DataOut),
    LogoutRequest(LogoutRequest),
    Snack(Snack),
    NopIn(NopIn),
    ScsiResponse(ScsiResponse),
    TaskMgmtResponse(TaskMgmtResponse),
    LoginResponse(LoginResponse),
    TextResponse(TextResponse),
    DataIn(DataIn),
    LogoutResponse(LogoutResponse),
    R2t(R2t),
    AsyncMessage(AsyncMessage),
    Reject(Reject),
}

/// Opcodes (RFC 7143 §11.2.1.2).
pub mod opcode {
    #![allow(missing_docs)]
    pub const NOP_OUT: u8 = 0x00;
    pub const SCSI_COMMAND: u8 = 0x01;
    pub const TASK_MGMT_REQUEST: u8 = 0x02;
    pub const LOGIN_REQUEST: u8 = 0x03;
    pub const TEXT_REQUEST: u8 = 0x04;
    pub const DATA_OUT: u8 = 0x05;
    pub const LOGOUT_REQUEST: u8 = 0x06;
    pub const SNACK: u8 = 0x10;
    pub const NOP_IN: u8 = 0x20;
    pub const SCSI_RESPONSE: u8 = 0x21;
    pub const TASK_MGMT_RESPONSE: u8 = 0x22;
    pub const LOGIN_RESPONSE: u8 = 0x23;
    pub const TEXT_RESPONSE: u8 = 0x24;
    pub const DATA_IN: u8 = 0x25;
    pub const LOGOUT_RESPONSE: u8 = 0x26;
    pub const R2T: u8 = 0x31;
    pub const ASYNC_MESSAGE: u8 = 0x32;
    pub const REJECT: u8 = 0x3f;
}

/// A 48-byte header being read field by field.
struct R<'a>(&'a [u8; BHS_LEN]);

impl R<'_> {
    fn u8(&self, at: usize) -> u8 {
        self.0.get(at).copied().unwrap_or(0)
    }
    fn u16(&self, at: usize) -> u16 {
        u16::from_be_bytes([self.u8(at), self.u8(at + 1)])
    }
    fn u32(&self, at: usize) -> u32 {
        u32::from_be_bytes([
            self.u8(at),
            self.u8(at + 1),
            self.u8(at + 2),
            self.u8(at + 3),
        ])
    }
    fn bit(&self, at: usize, mask: u8) -> bool {
        self.u8(at) & mask != 0
    }
    fn lun(&self) -> Lun {
        let mut l = [0u8; 8];
        if let Some(s) = self.0.get(8..16) {
            l.copy_from_slice(s);
        }
        Lun(l)
    }
}

/// A 48-byte header being written.
struct W([u8; BHS_LEN]);

impl W {
    fn u8(&mut self, at: usize, v: u8) {
        if let Some(b) = self.0.get_mut(at) {
            *b = v;
        }
    }
    fn or(&mut self, at: usize, mask: u8, on: bool) {
        if on {
            if let Some(b) = self.0.get_mut(at) {
                *b |= mask;
            }
        }
    }
    fn u16(&mut self, at: usize, v: u16) {
        if let Some(s) = self.0.get_mut(at..at + 2) {
            s.copy_from_slice(&v.to_be_bytes());
        }
    }
    fn u32(&mut self, at: usize, v: u32) {
        if let Some(s) = self.0.get_mut(at..at + 4) {
            s.copy_from_slice(&v.to_be_bytes());
        }
    }
    fn lun(&mut self, l: Lun) {
        if let Some(s) = self.0.get_mut(8..16) {
            s.copy_from_slice(&l.0);
        }
    }
}

impl Bhs {
    /// Parses the BHS at the start of `bytes`. Lengths (bytes 4..8) are not part of the
    /// typed value: read them with [`Framing::of`].
    pub fn parse(bytes: &[u8]) -> Result<Bhs, PduError> {
        let Some(b) = bytes
            .get(..BHS_LEN)
            .and_then(|s| <&[u8; BHS_LEN]>::try_from(s).ok())
        else {
            return Err(PduError::Truncated {
                have: bytes.len(),
                need: BHS_LEN,
            });
        };
        let r = R(b);
        let immediate = r.bit(0, 0x40);
        let f = r.bit(1, 0x80);
        Ok(match r.u8(0) & 0x3f {
            opcode::NOP_OUT => Bhs::NopOut(NopOut {
                immediate,
                lun: r.lun(),
                itt: r.u32(16),
                ttt: r.u32(20),
                cmd_sn: r.u32(24),
                exp_stat_sn: r.u32(28),
            }),
            opcode::SCSI_COMMAND => {
                let mut cdb = [0u8; 16];
                cdb.copy_from_slice(b.get(32..48).unwrap_or(&[0; 16]));
                Bhs::ScsiCommand(ScsiCommand {
                    immediate,
                    final_: f,
                    read: r.bit(1, 0x40),
                    write: r.bit(1, 0x20),
                    attr: r.u8(1) & 7,
                    lun: r.lun(),
                    itt: r.u32(16),
                    expected_len: r.u32(20),
                    cmd_sn: r.u32(24),
                    exp_stat_sn: r.u32(28),
                    cdb,
                })
            }
            opcode::TASK_MGMT_REQUEST => Bhs::TaskMgmtRequest(TaskMgmtRequest {
                immediate,
                function: r.u8(1) & 0x7f,
                lun: r.lun(),
                itt: r.u32(16),
                referenced_tag: r.u32(20),
                cmd_sn: r.u32(24),
                exp_stat_sn: r.u32(28),
                ref_cmd_sn: r.u32(32),
                exp_data_sn: r.u32(36),
            }),
            opcode::LOGIN_REQUEST => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(b.get(8..14).unwrap_or(&[0; 6]));
                Bhs::LoginRequest(LoginRequest {
                    transit: f,
                    continue_: r.bit(1, 0x40),
                    csg: Stage::from_bits(r.u8(1) >> 2, "CSG")?,
                    nsg: Stage::from_bits(r.u8(1), "NSG")?,
                    version_max: r.u8(2),
                    version_min: r.u8(3),
                    isid,
                    tsih: r.u16(14),
                    itt: r.u32(16),
                    cid: r.u16(20),
                    cmd_sn: r.u32(24),
                    exp_stat_sn: r.u32(28),
                })
            }
            opcode::TEXT_REQUEST => Bhs::TextRequest(TextRequest {
                immediate,
                final_: f,
                continue_: r.bit(1, 0x40),
                lun: r.lun(),
                itt: r.u32(16),
                ttt: r.u32(20),
                cmd_sn: r.u32(24),
                exp_stat_sn: r.u32(28),
            }),
            opcode::DATA_OUT => Bhs::DataOut(DataOut {
                final_: f,
                lun: r.lun(),
                itt: r.u32(16),
                ttt: r.u32(20),
                exp_stat_sn: r.u32(28),
                data_sn: r.u32(36),
                buffer_offset: r.u32(40),
            }),
            opcode::LOGOUT_REQUEST => Bhs::LogoutRequest(LogoutRequest {
                immediate,
                reason: r.u8(1) & 0x7f,
                itt: r.u32(16),
                cid: r.u16(20),
                cmd_sn: r.u32(24),
                exp_stat_sn: r.u32(28),
            }),
            opcode::SNACK => Bhs::Snack(Snack {
                kind: r.u8(1) & 0x0f,
                lun: r.lun(),
                itt: r.u32(16),
                ttt: r.u32(20),
                exp_stat_sn: r.u32(28),
                beg_run: r.u32(40),
                run_length: r.u32(44),
            }),
            opcode::NOP_IN => Bhs::NopIn(NopIn {
                lun: r.lun(),
                itt: r.u32(16),
                ttt: r.u32(20),
                stat_sn: r.u32(24),
                exp_cmd_sn: r.u32(28),
                max_cmd_sn: r.u32(32),
            }),
            opcode::SCSI_RESPONSE => Bhs::ScsiResponse(ScsiResponse {
                bidi_overflow: r.bit(1, 0x10),
                bidi_underflow: r.bit(1, 0x08),
                overflow: r.bit(1, 0x04),
                underflow: r.bit(1, 0x02),
                response: r.u8(2),
                status: r.u8(3),
                itt: r.u32(16),
                snack_tag: r.u32(20),
                stat_sn: r.u32(24),
                exp_cmd_sn: r.u32(28),
                max_cmd_sn: r.u32(32),
                exp_data_sn: r.u32(36),
                bidi_residual: r.u32(40),
                residual: r.u32(44),
            }),
            opcode::TASK_MGMT_RESPONSE => Bhs::TaskMgmtResponse(TaskMgmtResponse {
                response: r.u8(2),
                itt: r.u32(16),
                stat_sn: r.u32(24),
                exp_cmd_sn: r.u32(28),
                max_cmd_sn: r.u32(32),
            }),
            opcode::LOGIN_RESPONSE => {
                let mut isid = [0u8; 6];
                isid.copy_from_slice(b.get(8..14).unwrap_or(&[0; 6]));
                Bhs::LoginResponse(LoginResponse {
                    transit: f,
                    continue_: r.bit(1, 0x40),
                    csg: Stage::from_bits(r.u8(1) >> 2, "CSG")?,
                    nsg: Stage::from_bits(r.u8(1), "NSG")?,
                    version_max: r.u8(2),
                    version_active: r.u8(3),
                    isid,
                    tsih: r.u16(14),
                    itt: r.u32(16),
                    stat_sn: r.u32(24),
                    exp_cmd_sn: r.u32(28),
                    max_cmd_sn: r.u32(32),
                    status_class: r.u8(36),
                    status_detail: r.u8(37),
                })
            }
            opcode::TEXT_RESPONSE => Bhs::TextResponse(TextResponse {
                final_: f,
                continue_: r.bit(1, 0x40),
                lun: r.lun(),
                itt: r.u32(16),
                ttt: r.u32(20),
                stat_sn: r.u32(24),
                exp_cmd_sn: r.u32(28),
                max_cmd_sn: r.u32(32),
            }),
            opcode::DATA_IN => Bhs::DataIn(DataIn {
                final_: f,
                ack: r.bit(1, 0x40),
                overflow: r.bit(1, 0x04),
                underflow: r.bit(1, 0x02),
                has_status: r.bit(1, 0x01),
                status: r.u8(3),
                lun: r.lun(),
                itt: r.u32(16),
                ttt: r.u32(20),
                stat_sn: r.u32(24),
                exp_cmd_sn: r.u32(28),
                max_cmd_sn: r.u32(32),
                data_sn: r.u32(36),
                buffer_offset: r.u32(40),
                residual: r.u32(44),
            }),
            opcode::LOGOUT_RESPONSE => Bhs::LogoutResponse(LogoutResponse {
                response: r.u8(2),
                itt: r.u32(16),
                stat_sn: r.u32(24),
                exp_cmd_sn: r.u32(28),
                max_cmd_sn: r.u32(32),
                time2wait: r.u16(40),
                time2retain: r.u16(42),
            }),
            opcode::R2T => Bhs::R2t(R2t {
                lun: r.lun(),
                itt: r.u32(16),
                ttt: r.u32(20),
                stat_sn: r.u32(24),
                exp_cmd_sn: r.u32(28),
                max_cmd_sn: r.u32(32),
                r2t_sn: r.u32(36),
                buffer_offset: r.u32(40),
                desired_len: r.u32(44),
            }),
            opcode::ASYNC_MESSAGE => Bhs::AsyncMessage(AsyncMessage {
                lun: r.lun(),
                stat_sn: r.u32(24),
                exp_cmd_sn: r.u32(28),
                max_cmd_sn: r.u32(32),
                event: r.u8(36),
                vcode: r.u8(37),
                param1: r.u16(38),
                param2: r.u16(40),
                param3: r.u16(42),
            }),
            opcode::REJECT => Bhs::Reject(Reject {
                reason: r.u8(2),
                stat_sn: r.u32(24),
                exp_cmd_sn: r.u32(28),
                max_cmd_sn: r.u32(32),
                data_sn: r.u32(36),
            }),
            other => return Err(PduError::UnknownOpcode(other)),
        })
    }

    /// The opcode.
    pub fn opcode(&self) -> u8 {
        match self {
            Bhs::NopOut(_) => opcode::NOP_OUT,
            Bhs::ScsiCommand(_) => opcode::SCSI_COMMAND,
            Bhs::TaskMgmtRequest(_) => opcode::TASK_MGMT_REQUEST,
            Bhs::LoginRequest(_) => opcode::LOGIN_REQUEST,
            Bhs::TextRequest(_) => opcode::TEXT_REQUEST,
            Bhs::DataOut(_) => opcode::DATA_OUT,
            Bhs::LogoutRequest(_) => opcode::LOGOUT_REQUEST,
            Bhs::Snack(_) => opcode::SNACK,
            Bhs::NopIn(_) => opcode::NOP_IN,
            Bhs::ScsiResponse(_) => opcode::SCSI_RESPONSE,
            Bhs::TaskMgmtResponse(_) => opcode::TASK_MGMT_RESPONSE,
            Bhs::LoginResponse(_) => opcode::LOGIN_RESPONSE,
            Bhs::TextResponse(_) => opcode::TEXT_RESPONSE,
            Bhs::DataIn(_) => opcode::DATA_IN,
            Bhs::LogoutResponse(_) => opcode::LOGOUT_RESPONSE,
            Bhs::R2t(_) => opcode::R2T,
            Bhs::AsyncMessage(_) => opcode::ASYNC_MESSAGE,
            Bhs::Reject(_) => opcode::REJECT,
        }
    }

    /// Serialises the BHS with `ahs_words` (TotalAHSLength, in 4-byte words) and
    /// `data_len` (DataSegmentLength, only the low 24 bits are representable).
    pub fn to_bytes(&self, ahs_words: u8, data_len: u32) -> [u8; BHS_LEN] {
        let mut w = W([0u8; BHS_LEN]);
        w.u8(0, self.opcode());
        w.u8(4, ahs_words);
        let [_, l1, l2, l3] = data_len.min(MAX_DATA_SEGMENT_LEN).to_be_bytes();
        w.u8(5, l1);
        w.u8(6, l2);
        w.u8(7, l3);
        match self {
            Bhs::NopOut(p) => {
                w.or(0, 0x40, p.immediate);
                w.u8(1, 0x80);
                w.lun(p.lun);
                w.u32(16, p.itt);
                w.u32(20, p.ttt);
                w.u32(24, p.cmd_sn);
                w.u32(28, p.exp_stat_sn);
            }
            Bhs::ScsiCommand(p) => {
                w.or(0, 0x40, p.immediate);
                w.u8(1, p.attr & 7);
                w.or(1, 0x80, p.final_);
                w.or(1, 0x40, p.read);
                w.or(1, 0x20, p.write);
                w.lun(p.lun);
                w.u32(16, p.itt);
                w.u32(20, p.expected_len);
                w.u32(24, p.cmd_sn);
                w.u32(28, p.exp_stat_sn);
                w.0[32..48].copy_from_slice(&p.cdb);
            }
            Bhs::TaskMgmtRequest(p) => {
                w.or(0, 0x40, p.immediate);
                w.u8(1, 0x80 | (p.function & 0x7f));
                w.lun(p.lun);
                w.u32(16, p.itt);
                w.u32(20, p.referenced_tag);
                w.u32(24, p.cmd_sn);
                w.u32(28, p.exp_stat_sn);
                w.u32(32, p.ref_cmd_sn);
                w.u32(36, p.exp_data_sn);
            }
            Bhs::LoginRequest(p) => {
                w.or(0, 0x40, true);
                w.u8(1, (p.csg.bits() << 2) | p.nsg.bits());
                w.or(1, 0x80, p.transit);
                w.or(1, 0x40, p.continue_);
                w.u8(2, p.version_max);
                w.u8(3, p.version_min);
                w.0[8..14].copy_from_slice(&p.isid);
                w.u16(14, p.tsih);
                w.u32(16, p.itt);
                w.u16(20, p.cid);
                w.u32(24, p.cmd_sn);
                w.u32(28, p.exp_stat_sn);
            }
            Bhs::TextRequest(p) => {
                w.or(0, 0x40, p.immediate);
                w.or(1, 0x80, p.final_);
                w.or(1, 0x40, p.continue_);
                w.lun(p.lun);
                w.u32(16, p.itt);
                w.u32(20, p.ttt);
                w.u32(24, p.cmd_sn);
                w.u32(28, p.exp_stat_sn);
            }
            Bhs::DataOut(p) => {
                w.or(1, 0x80, p.final_);
                w.lun(p.lun);
                w.u32(16, p.itt);
                w.u32(20, p.ttt);
                w.u32(28, p.exp_stat_sn);
                w.u32(36, p.data_sn);
                w.u32(40, p.buffer_offset);
            }
            Bhs::LogoutRequest(p) => {
                w.or(0, 0x40, p.immediate);
                w.u8(1, 0x80 | (p.reason & 0x7f));
                w.u32(16, p.itt);
                w.u16(20, p.cid);
                w.u32(24, p.cmd_sn);
                w.u32(28, p.exp_stat_sn);
            }
            Bhs::Snack(p) => {
                w.u8(1, 0x80 | (p.kind & 0x0f));
                w.lun(p.lun);
                w.u32(16, p.itt);
                w.u32(20, p.ttt);
                w.u32(28, p.exp_stat_sn);
                w.u32(40, p.beg_run);
                w.u32(44, p.run_length);
            }
            Bhs::NopIn(p) => {
                w.u8(1, 0x80);
                w.lun(p.lun);
                w.u32(16, p.itt);
                w.u32(20, p.ttt);
                w.u32(24, p.stat_sn);
                w.u32(28, p.exp_cmd_sn);
                w.u32(32, p.max_cmd_sn);
            }
            Bhs::ScsiResponse(p) => {
                w.u8(1, 0x80);
                w.or(1, 0x10, p.bidi_overflow);
                w.or(1, 0x08, p.bidi_underflow);
                w.or(1, 0x04, p.overflow);
                w.or(1, 0x02, p.underflow);
                w.u8(2, p.response);
                w.u8(3, p.status);
                w.u32(16, p.itt);
                w.u32(20, p.snack_tag);
                w.u32(24, p.stat_sn);
                w.u32(28, p.exp_cmd_sn);
                w.u32(32, p.max_cmd_sn);
                w.u32(36, p.exp_data_sn);
                w.u32(40, p.bidi_residual);
                w.u32(44, p.residual);
            }
            Bhs::TaskMgmtResponse(p) => {
                w.u8(1, 0x80);
                w.u8(2, p.response);
                w.u32(16, p.itt);
                w.u32(24, p.stat_sn);
                w.u32(28, p.exp_cmd_sn);
                w.u32(32, p.max_cmd_sn);
            }
            Bhs::LoginResponse(p) => {
                w.u8(1, (p.csg.bits() << 2) | p.nsg.bits());
                w.or(1, 0x80, p.transit);
                w.or(1, 0x40, p.continue_);
                w.u8(2, p.version_max);
                w.u8(3, p.version_active);
                w.0[8..14].copy_from_slice(&p.isid);
                w.u16(14, p.tsih);
                w.u32(16, p.itt);
                w.u32(24, p.stat_sn);
                w.u32(28, p.exp_cmd_sn);
                w.u32(32, p.max_cmd_sn);
                w.u8(36, p.status_class);
                w.u8(37, p.status_detail);
            }
            Bhs::TextResponse(p) => {
                w.or(1, 0x80, p.final_);
                w.or(1, 0x40, p.continue_);
                w.lun(p.lun);
                w.u32(16, p.itt);
                w.u32(20, p.ttt);
                w.u32(24, p.stat_sn);
                w.u32(28, p.exp_cmd_sn);
                w.u32(32, p.max_cmd_sn);
            }
            Bhs::DataIn(p) => {
                w.or(1, 0x80, p.final_);
                w.or(1, 0x40, p.ack);
                w.or(1, 0x04, p.overflow);
                w.or(1, 0x02, p.underflow);
                w.or(1, 0x01, p.has_status);
                w.u8(3, p.status);
                w.lun(p.lun);
                w.u32(16, p.itt);
                w.u32(20, p.ttt);
                w.u32(24, p.stat_sn);
                w.u32(28, p.exp_cmd_sn);
                w.u32(32, p.max_cmd_sn);
                w.u32(36, p.data_sn);
                w.u32(40, p.buffer_offset);
                w.u32(44, p.residual);
            }
            Bhs::LogoutResponse(p) => {
                w.u8(1, 0x80);
                w.u8(2, p.response);
                w.u32(16, p.itt);
                w.u32(24, p.stat_sn);
                w.u32(28, p.exp_cmd_sn);
                w.u32(32, p.max_cmd_sn);
                w.u16(40, p.time2wait);
                w.u16(42, p.time2retain);
            }
            Bhs::R2t(p) => {
                w.u8(1, 0x80);
                w.lun(p.lun);
                w.u32(16, p.itt);
                w.u32(20, p.ttt);
                w.u32(24, p.stat_sn);
                w.u32(28, p.exp_cmd_sn);
                w.u32(32, p.max_cmd_sn);
                w.u32(36, p.r2t_sn);
                w.u32(40, p.buffer_offset);
                w.u32(44, p.desired_len);
            }
            Bhs::AsyncMessage(p) => {
                w.u8(1, 0x80);
                w.lun(p.lun);
                w.u32(16, 0xffff_ffff);
                w.u32(24, p.stat_sn);
                w.u32(28, p.exp_cmd_sn);
                w.u32(32, p.max_cmd_sn);
                w.u8(36, p.event);
                w.u8(37, p.vcode);
                w.u16(38, p.param1);
                w.u16(40, p.param2);
                w.u16(42, p.param3);
            }
            Bhs::Reject(p) => {
                w.u8(1, 0x80);
                w.u8(2, p.reason);
                w.u32(16, 0xffff_ffff);
                w.u32(24, p.stat_sn);
                w.u32(28, p.exp_cmd_sn);
                w.u32(32, p.max_cmd_sn);
                w.u32(36, p.data_sn);
            }
        }
        w.0
    }
}

/// Digests in use on a connection (RFC 7143 §13.1).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Digests {
    /// CRC32C over BHS + AHS.
    pub header: bool,
    /// CRC32C over the padded data segment.
    pub data: bool,
}

/// CRC32C as iSCSI puts it on the wire (RFC 7143 §13.1, Appendix B.4: the 32-bit result
/// in little-endian byte order, the order Linux, libiscsi and tgt use).
pub fn crc32c(parts: &[&[u8]]) -> u32 {
    parts.iter().fold(0, |crc, p| crc32c::crc32c_append(crc, p))
}

/// What follows a BHS on the wire, from its length fields.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Framing {
    /// Additional header segments, in bytes.
    pub ahs_len: usize,
    /// Data segment length without padding.
    pub data_len: usize,
}

impl Framing {
    /// Reads TotalAHSLength and DataSegmentLength from a raw BHS and bounds the data
    /// segment by `max_data` (the receiver's MaxRecvDataSegmentLength).
    pub fn of(bhs: &[u8; BHS_LEN], max_data: u32) -> Result<Framing, PduError> {
        let r = R(bhs);
        let data_len = u32::from_be_bytes([0, r.u8(5), r.u8(6), r.u8(7)]);
        if data_len > max_data {
            return Err(PduError::DataSegmentTooLong {
                len: data_len,
                max: max_data,
            });
        }
        Ok(Framing {
            ahs_len: usize::from(r.u8(4)) * 4,
            data_len: data_len as usize,
        })
    }

    /// Bytes to read after the BHS: AHS, header digest, padded data, data digest.
    pub fn rest_len(&self, d: Digests) -> usize {
        let padded = self.data_len.next_multiple_of(4);
        self.ahs_len
            + if d.header { 4 } else { 0 }
            + padded
            + if d.data && self.data_len > 0 { 4 } else { 0 }
    }
}

/// A whole PDU: typed header, additional header segments (raw), data segment.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Pdu {
    /// The typed BHS.
    pub bhs: Bhs,
    /// Raw AHS bytes (a multiple of 4 bytes; at most 1020).
    pub ahs: Vec<u8>,
    /// The data segment without padding.
    pub data: Vec<u8>,
}

impl Pdu {
    /// A PDU without AHS.
    pub fn new(bhs: Bhs, data: Vec<u8>) -> Pdu {
        Pdu {
            bhs,
            ahs: Vec::new(),
            data,
        }
    }

    /// Decodes a PDU from its raw BHS and the `rest` bytes that [`Framing::rest_len`]
    /// said follow it, checking digests.
    pub fn decode(
        raw: &[u8; BHS_LEN],
        framing: Framing,
        rest: &[u8],
        d: Digests,
    ) -> Result<Pdu, PduError> {
        let need = framing.rest_len(d);
        if rest.len() < need {
            return Err(PduError::Truncated {
                have: BHS_LEN + rest.len(),
                need: BHS_LEN + need,
            });
        }
        let ahs = rest.get(..framing.ahs_len).unwrap_or_default();
        let mut at = framing.ahs_len;
        if d.header {
            let got = le32(rest.get(at..at + 4));
            let computed = crc32c(&[raw, ahs]);
            if got != computed {
                return Err(PduError::DigestMismatch {
                    what: "header",
                    got,
                    computed,
                });
            }
            at += 4;
        }
        let padded = framing.data_len.next_multiple_of(4);
        let data = rest.get(at..at + framing.data_len).unwrap_or_default();
        if d.data && framing.data_len > 0 {
            let got = le32(rest.get(at + padded..at + padded + 4));
            let computed = crc32c(&[rest.get(at..at + padded).unwrap_or_default()]);
            if got != computed {
                return Err(PduError::DigestMismatch {
                    what: "data",
                    got,
                    computed,
                });
            }
        }
        let bhs = Bhs::parse(raw)?;
        Ok(Pdu {
            bhs,
            ahs: ahs.to_vec(),
            data: data.to_vec(),
        })
    }

    /// Parses a whole PDU from `bytes` (BHS first), bounding the data segment by
    /// `max_data`. Returns the PDU and the bytes it used.
    pub fn parse(bytes: &[u8], d: Digests, max_data: u32) -> Result<(Pdu, usize), PduError> {
        let Some(raw) = bytes
            .get(..BHS_LEN)
            .and_then(|s| <&[u8; BHS_LEN]>::try_from(s).ok())
        else {
            return Err(PduError::Truncated {
                have: bytes.len(),
                need: BHS_LEN,
            });
        };
        let framing = Framing::of(raw, max_data)?;
        let rest = bytes.get(BHS_LEN..).unwrap_or_default();
        let pdu = Pdu::decode(raw, framing, rest, d)?;
        Ok((pdu, BHS_LEN + framing.rest_len(d)))
    }

    /// Appends the wire form to `out`. The AHS is padded to whole words and cut at 1020
    /// bytes; the data segment is cut at [`MAX_DATA_SEGMENT_LEN`].
    pub fn write_to(&self, out: &mut Vec<u8>, d: Digests) {
        let ahs = self.ahs.get(..self.ahs.len().min(1020)).unwrap_or_default();
        let ahs_words = ahs.len().div_ceil(4);
        let data = self
            .data
            .get(..self.data.len().min(MAX_DATA_SEGMENT_LEN as usize))
            .unwrap_or_default();
        let start = out.len();
        out.extend_from_slice(&self.bhs.to_bytes(ahs_words as u8, data.len() as u32));
        out.extend_from_slice(ahs);
        out.resize(start + BHS_LEN + ahs_words * 4, 0);
        if d.header {
            let crc = crc32c(&[out.get(start..).unwrap_or_default()]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
        let data_start = out.len();
        out.extend_from_slice(data);
        out.resize(data_start + data.len().next_multiple_of(4), 0);
        if d.data && !data.is_empty() {
            let crc = crc32c(&[out.get(data_start..).unwrap_or_default()]);
            out.extend_from_slice(&crc.to_le_bytes());
        }
    }

    /// The wire form.
    pub fn to_bytes(&self, d: Digests) -> Vec<u8> {
        let mut v = Vec::with_capacity(BHS_LEN + self.ahs.len() + self.data.len() + 12);
        self.write_to(&mut v, d);
        v
    }
}

fn le32(b: Option<&[u8]>) -> u32 {
    match b {
        Some(&[a, b, c, d]) => u32::from_le_bytes([a, b, c, d]),
        _ => 0,
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    fn lun() -> impl Strategy<Value = Lun> {
        any::<[u8; 8]>().prop_map(Lun)
    }
    fn stage() -> impl Strategy<Value = Stage> {
        prop_oneof![
            Just(Stage::Security),
            Just(Stage::Operational),
            Just(Stage::FullFeature)
        ]
    }

    pub(crate) fn any_bhs() -> impl Strategy<Value = Bhs> {
        let u = any::<u32>;
        prop_oneof![
            (any::<bool>(), lun(), u(), u(), u(), u()).prop_map(
                |(immediate, lun, itt, ttt, cmd_sn, exp_stat_sn)| {
                    Bhs::NopOut(NopOut {
                        immediate,
                        lun,
                        itt,
                        ttt,
                        cmd_sn,
                        exp_stat_sn,
                    })
                }
            ),
            (
                any::<[bool; 4]>(),
                0u8..8,
                lun(),
                u(),
                u(),
                u(),
                u(),
                any::<[u8; 16]>()
            )
                .prop_map(
                    |(
                        [immediate, final_, read, write],
                        attr,
                        lun,
                        itt,
                        expected_len,
                        cmd_sn,
                        exp_stat_sn,
                        cdb,
                    )| {
                        Bhs::ScsiCommand(ScsiCommand {
                            immediate,
                            final_,
                            read,
                            write,
                            attr,
                            lun,
                            itt,
                            expected_len,
                            cmd_sn,
                            exp_stat_sn,
                            cdb,
                        })
                    }
                ),
            (any::<bool>(), 0u8..128, lun(), u(), u(), u(), u(), u(), u()).prop_map(
                |(
                    immediate,
                    function,
                    lun,
                    itt,
                    referenced_tag,
                    cmd_sn,
                    exp_stat_sn,
                    ref_cmd_sn,
                    exp_data_sn,
                )| {
                    Bhs::TaskMgmtRequest(TaskMgmtRequest {
                        immediate,
                        function,
                        lun,
                        itt,
                        referenced_tag,
                        cmd_sn,
                        exp_stat_sn,
                        ref_cmd_sn,
                        exp_data_sn,
                    })
                }
            ),
            (
                any::<[bool; 2]>(),
                stage(),
                stage(),
                any::<[u8; 2]>(),
                any::<[u8; 6]>(),
                any::<u16>(),
                u(),
                any::<u16>(),
                u(),
                u()
            )
                .prop_map(
                    |(
                        [transit, continue_],
                        csg,
                        nsg,
                        [version_max, version_min],
                        isid,
                        tsih,
                        itt,
                        cid,
                        cmd_sn,
                        exp_stat_sn,
                    )| {
                        Bhs::LoginRequest(LoginRequest {
                            transit,
                            continue_,
                            csg,
                            nsg,
                            version_max,
                            version_min,
                            isid,
                            tsih,
                            itt,
                            cid,
                            cmd_sn,
                            exp_stat_sn,
                        })
                    }
                ),
            (any::<[bool; 3]>(), lun(), u(), u(), u(), u()).prop_map(
                |([immediate, final_, continue_], lun, itt, ttt, cmd_sn, exp_stat_sn)| {
                    Bhs::TextRequest(TextRequest {
                        immediate,
                        final_,
                        continue_,
                        lun,
                        itt,
                        ttt,
                        cmd_sn,
                        exp_stat_sn,
                    })
                }
            ),
            (any::<bool>(), lun(), u(), u(), u(), u(), u()).prop_map(
                |(final_, lun, itt, ttt, exp_stat_sn, data_sn, buffer_offset)| {
                    Bhs::DataOut(DataOut {
                        final_,
                        lun,
                        itt,
                        ttt,
                        exp_stat_sn,
                        data_sn,
                        buffer_offset,
                    })
                }
            ),
            (any::<bool>(), 0u8..128, u(), any::<u16>(), u(), u()).prop_map(
                |(immediate, reason, itt, cid, cmd_sn, exp_stat_sn)| {
                    Bhs::LogoutRequest(LogoutRequest {
                        immediate,
                        reason,
                        itt,
                        cid,
                        cmd_sn,
                        exp_stat_sn,
                    })
                }
            ),
            (0u8..16, lun(), u(), u(), u(), u(), u()).prop_map(
                |(kind, lun, itt, ttt, exp_stat_sn, beg_run, run_length)| {
                    Bhs::Snack(Snack {
                        kind,
                        lun,
                        itt,
                        ttt,
                        exp_stat_sn,
                        beg_run,
                        run_length,
                    })
                }
            ),
            (lun(), u(), u(), u(), u(), u()).prop_map(
                |(lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn)| {
                    Bhs::NopIn(NopIn {
                        lun,
                        itt,
                        ttt,
                        stat_sn,
                        exp_cmd_sn,
                        max_cmd_sn,
                    })
                }
            ),
            (
                any::<[bool; 4]>(),
                any::<[u8; 2]>(),
                (u(), u(), u(), u(), u(), u(), u(), u())
            )
                .prop_map(
                    |(
                        [bidi_overflow, bidi_underflow, overflow, underflow],
                        [response, status],
                        (
                            itt,
                            snack_tag,
                            stat_sn,
                            exp_cmd_sn,
                            max_cmd_sn,
                            exp_data_sn,
                            bidi_residual,
                            residual,
                        ),
                    )| {
                        Bhs::ScsiResponse(ScsiResponse {
                            bidi_overflow,
                            bidi_underflow,
                            overflow,
                            underflow,
                            response,
                            status,
                            itt,
                            snack_tag,
                            stat_sn,
                            exp_cmd_sn,
                            max_cmd_sn,
                            exp_data_sn,
                            bidi_residual,
                            residual,
                        })
                    }
                ),
            (any::<u8>(), u(), u(), u(), u()).prop_map(
                |(response, itt, stat_sn, exp_cmd_sn, max_cmd_sn)| {
                    Bhs::TaskMgmtResponse(TaskMgmtResponse {
                        response,
                        itt,
                        stat_sn,
                        exp_cmd_sn,
                        max_cmd_sn,
                    })
                }
            ),
            (
                any::<[bool; 2]>(),
                stage(),
                stage(),
                any::<[u8; 2]>(),
                any::<[u8; 6]>(),
                any::<u16>(),
                (u(), u(), u(), u()),
                any::<[u8; 2]>()
            )
                .prop_map(
                    |(
                        [transit, continue_],
                        csg,
                        nsg,
                        [version_max, version_active],
                        isid,
                        tsih,
                        (itt, stat_sn, exp_cmd_sn, max_cmd_sn),
                        [status_class, status_detail],
                    )| {
                        Bhs::LoginResponse(LoginResponse {
                            transit,
                            continue_,
                            csg,
                            nsg,
                            version_max,
                            version_active,
                            isid,
                            tsih,
                            itt,
                            stat_sn,
                            exp_cmd_sn,
                            max_cmd_sn,
                            status_class,
                            status_detail,
                        })
                    }
                ),
            (any::<[bool; 2]>(), lun(), u(), u(), u(), u(), u()).prop_map(
                |([final_, continue_], lun, itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn)| {
                    Bhs::TextResponse(TextResponse {
                        final_,
                        continue_,
                        lun,
                        itt,
                        ttt,
                        stat_sn,
                        exp_cmd_sn,
                        max_cmd_sn,
                    })
                }
            ),
            (
                any::<[bool; 5]>(),
                any::<u8>(),
                lun(),
                (u(), u(), u(), u(), u(), u(), u(), u())
            )
                .prop_map(
                    |(
                        [final_, ack, overflow, underflow, has_status],
                        status,
                        lun,
                        (
                            itt,
                            ttt,
                            stat_sn,
                            exp_cmd_sn,
                            max_cmd_sn,
                            data_sn,
                            buffer_offset,
                            residual,
                        ),
                    )| {
                        Bhs::DataIn(DataIn {
                            final_,
                            ack,
                            overflow,
                            underflow,
                            has_status,
                            status,
                            lun,
                            itt,
                            ttt,
                            stat_sn,
                            exp_cmd_sn,
                            max_cmd_sn,
                            data_sn,
                            buffer_offset,
                            residual,
                        })
                    }
                ),
            (any::<u8>(), u(), u(), u(), u(), any::<[u16; 2]>()).prop_map(
                |(response, itt, stat_sn, exp_cmd_sn, max_cmd_sn, [time2wait, time2retain])| {
                    Bhs::LogoutResponse(LogoutResponse {
                        response,
                        itt,
                        stat_sn,
                        exp_cmd_sn,
                        max_cmd_sn,
                        time2wait,
                        time2retain,
                    })
                }
            ),
            (lun(), (u(), u(), u(), u(), u(), u(), u(), u())).prop_map(
                |(
                    lun,
                    (itt, ttt, stat_sn, exp_cmd_sn, max_cmd_sn, r2t_sn, buffer_offset, desired_len),
                )| {
                    Bhs::R2t(R2t {
                        lun,
                        itt,
                        ttt,
                        stat_sn,
                        exp_cmd_sn,
                        max_cmd_sn,
                        r2t_sn,
                        buffer_offset,
                        desired_len,
                    })
                }
            ),
            (lun(), u(), u(), u(), any::<[u8; 2]>(), any::<[u16; 3]>()).prop_map(
                |(
                    lun,
                    stat_sn,
                    exp_cmd_sn,
                    max_cmd_sn,
                    [event, vcode],
                    [param1, param2, param3],
                )| {
                    Bhs::AsyncMessage(AsyncMessage {
                        lun,
                        stat_sn,
                        exp_cmd_sn,
                        max_cmd_sn,
                        event,
                        vcode,
                        param1,
                        param2,
                        param3,
                    })
                }
            ),
            (any::<u8>(), u(), u(), u(), u()).prop_map(
                |(reason, stat_sn, exp_cmd_sn, max_cmd_sn, data_sn)| {
                    Bhs::Reject(Reject {
                        reason,
                        stat_sn,
                        exp_cmd_sn,
                        max_cmd_sn,
                        data_sn,
                    })
                }
            ),
        ]
    }

    fn any_digests() -> impl Strategy<Value = Digests> {
        any::<[bool; 2]>().prop_map(|[header, data]| Digests { header, data })
    }

    proptest! {
        #[test]
        fn bhs_round_trips(bhs in any_bhs(), ahs in 0u8..=255, len in 0u32..=MAX_DATA_SEGMENT_LEN) {
            let raw = bhs.to_bytes(ahs, len);
            prop_assert_eq!(Bhs::parse(&raw)?, bhs);
            let f = Framing::of(&raw, MAX_DATA_SEGMENT_LEN)?;
            prop_assert_eq!(f, Framing { ahs_len: usize::from(ahs) * 4, data_len: len as usize });
        }

        #[test]
        fn pdu_round_trips(bhs in any_bhs(), ahs_words in 0usize..4, data in proptest::collection::vec(any::<u8>(), 0..300), d in any_digests()) {
            let pdu = Pdu { bhs, ahs: vec![0xa5; ahs_words * 4], data };
            let wire = pdu.to_bytes(d);
            prop_assert_eq!(wire.len() % 4, 0);
            let (back, used) = Pdu::parse(&wire, d, 1 << 20)?;
            prop_assert_eq!(used, wire.len());
            prop_assert_eq!(back, pdu);
        }

        #[test]
        fn flipped_bit_breaks_a_digest(bhs in any_bhs(), data in proptest::collection::vec(any::<u8>(), 1..100), bit in 0usize..(48 * 8)) {
            let d = Digests { header: true, data: true };
            let mut wire = Pdu::new(bhs, data).to_bytes(d);
            // Flip a bit of the BHS other than the length fields (those change the framing).
            let byte = bit / 8;
            prop_assume!(!(4..8).contains(&byte));
            wire[byte] ^= 1 << (bit % 8);
            let err = Pdu::parse(&wire, d, 1 << 20).unwrap_err();
            prop_assert!(matches!(err, PduError::DigestMismatch { what: "header", .. }), "{err:?}");
        }

        #[test]
        fn arbitrary_bytes_never_panic(bytes in proptest::collection::vec(any::<u8>(), 0..200), d in any_digests()) {
            let _ = Pdu::parse(&bytes, d, 8192);
        }
    }

    #[test]
    fn data_segment_limit_is_checked_before_reading() {
        let pdu = Pdu::new(
            Bhs::NopOut(NopOut {
                immediate: true,
                lun: Lun::default(),
                itt: 1,
                ttt: !0,
                cmd_sn: 0,
                exp_stat_sn: 0,
            }),
            vec![0; 9000],
        );
        let wire = pdu.to_bytes(Digests::default());
        assert_eq!(
            Pdu::parse(&wire, Digests::default(), 8192).unwrap_err(),
            PduError::DataSegmentTooLong {
                len: 9000,
                max: 8192
            }
        );
        assert!(matches!(
            Pdu::parse(&wire[..100], Digests::default(), 1 << 20),
            Err(PduError::Truncated { .. })
        ));
    }

    #[test]
    fn unknown_opcode_and_bad_stage_are_named() {
        let mut raw = [0u8; BHS_LEN];
        raw[0] = 0x1f;
        assert_eq!(Bhs::parse(&raw).unwrap_err(), PduError::UnknownOpcode(0x1f));
        raw[0] = 0x43;
        raw[1] = 0x80 | (2 << 2) | 3;
        assert_eq!(
            Bhs::parse(&raw).unwrap_err(),
            PduError::InvalidField {
                field: "CSG",
                value: 2
            }
        );
    }

    #[test]
    fn crc32c_matches_rfc_7143_test_vector() {
        // RFC 7143 Appendix B.4: 32 bytes of zeros give aa 36 91 8a on the wire.
        assert_eq!(
            crc32c(&[&[0u8; 32]]).to_le_bytes(),
            [0xaa, 0x36, 0x91, 0x8a]
        );
        // 32 bytes of 0xff give 43 ab a8 62.
        assert_eq!(
            crc32c(&[&[0xffu8; 32]]).to_le_bytes(),
            [0x43, 0xab, 0xa8, 0x62]
        );
    }

    #[test]
    fn lun_numbers() {
        assert_eq!(Lun::from_number(0).number(), Some(0));
        assert_eq!(Lun::from_number(5).0, [0, 5, 0, 0, 0, 0, 0, 0]);
        assert_eq!(Lun::from_number(300).number(), Some(300));
        assert_eq!(Lun([0, 0, 0, 1, 0, 0, 0, 0]).number(), None);
    }
}
