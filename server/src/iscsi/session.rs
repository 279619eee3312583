//! One iSCSI connection as a sans-IO state machine (RFC 7143): login, then the full
//! feature phase: SCSI commands with Data-In, writes with immediate data, unsolicited
//! Data-Out and R2T (§11.8), NOP-Out/In, Text (SendTargets, §13.3 + Appendix C), task
//! management (abort task, abort/clear task set, LUN reset), logout. Error recovery
//! level 0: anything the protocol cannot recover from closes the connection.
//!
//! [`Connection::on_pdu`] takes one received PDU and returns [`Action`]s for the I/O
//! side, which owns the socket. LUN reads and writes happen inside `on_pdu`, so the I/O
//! side calls it off the async runtime's worker threads.

use std::collections::HashMap;
use std::sync::Arc;

use super::login::{
    Established, Login, Params, SessionType, Step, LOGIN_MAX_RECV, TARGET_MAX_RECV,
};
use super::lun::{BlockDevice, LunProvider};
use super::pdu::{
    reject_reason, Bhs, DataIn, DataOut, Digests, LogoutResponse, Lun, NopIn, Pdu, PduError, R2t,
    Reject, ScsiCommand, ScsiResponse, TaskMgmtResponse, TextRequest, TextResponse, BHS_LEN,
};
use super::scsi::{self, Command, Outcome, Sense};
use super::text::TextPairs;

/// How many commands past ExpCmdSN an initiator may queue (MaxCmdSN - ExpCmdSN + 1).
pub const CMD_WINDOW: u32 = 128;
/// Most writes waiting for data at once, per connection.
pub const MAX_PENDING_WRITES: usize = 128;
/// Most bytes buffered for writes waiting for data, per connection.
pub const MAX_PENDING_BYTES: usize = 64 << 20;

/// What the I/O side must do, in order.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send this PDU (with the digests in force at the time).
    Send(Pdu),
    /// From now on use these digests and accept data segments up to `max_recv`.
    Negotiated {
        /// Digests.
        digests: Digests,
        /// Our MaxRecvDataSegmentLength.
        max_recv: u32,
    },
    /// Close the connection after sending what came before.
    Close,
}

/// A write waiting for its data.
#[derive(Debug)]
struct PendingWrite {
    lun: Lun,
    cmd: Command,
    lun_exists: bool,
    /// Expected Data Transfer Length: what the initiator sends.
    edtl: u32,
    /// Bytes the CDB asked for (for the residual).
    need: u32,
    /// DataSN expected next in the current sequence (unsolicited, then per R2T).
    data_sn: u32,
    buf: Vec<u8>,
    received: u32,
    /// Next offset of unsolicited Data-Out (TTT 0xffffffff), and where it must stop.
    unsol_next: u32,
    unsol_end: u32,
    /// The R2T outstanding: (TTT, next offset expected, end).
    r2t: Option<(u32, u32, u32)>,
    /// Where the next R2T starts.
    r2t_next: u32,
    r2t_sn: u32,
}

struct FullFeature {
    est: Established,
    dev: Option<Arc<dyn BlockDevice>>,
    pending: HashMap<u32, PendingWrite>,
    /// Sum of the pending writes' buffers.
    pending_bytes: usize,
    /// A Text response cut in pieces: (ITT, TTT, remaining bytes).
    text_cont: Option<(u32, u32, Vec<u8>)>,
    next_ttt: u32,
}

impl FullFeature {
    fn take_pending(&mut self, itt: u32) -> Option<PendingWrite> {
        let w = self.pending.remove(&itt)?;
        self.pending_bytes = self.pending_bytes.saturating_sub(w.buf.len());
        Some(w)
    }
    fn clear_pending(&mut self) {
        self.pending.clear();
        self.pending_bytes = 0;
    }
}

/// Copies `data` into `buf` at `at`, dropping whatever falls past its end.
fn copy_into(buf: &mut [u8], at: usize, data: &[u8]) {
    if let Some(dst) = buf.get_mut(at..) {
        let n = dst.len().min(data.len());
        if let (Some(d), Some(s)) = (dst.get_mut(..n), data.get(..n)) {
            d.copy_from_slice(s);
        }
    }
}

enum State {
    Login(Login),
    Full(Box<FullFeature>),
    Closed,
}

/// One connection.
pub struct Connection {
    provider: Arc<dyn LunProvider>,
    /// `ip:port,tpgt` for SendTargets answers.
    portal: String,
    state: State,
    stat_sn: u32,
    exp_cmd_sn: u32,
}

impl std::fmt::Debug for Connection {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Connection")
            .field("portal", &self.portal)
            .finish_non_exhaustive()
    }
}

/// RFC 1982 serial number comparison: a < b.
fn sn_lt(a: u32, b: u32) -> bool {
    a != b && b.wrapping_sub(a) < (1 << 31)
}

impl Connection {
    /// A new connection; `portal` is the address initiators should use (`ip:port`),
    /// `tsih` the session handle it gets on login.
    pub fn new(provider: Arc<dyn LunProvider>, portal: String, tsih: u16) -> Connection {
        Connection {
            state: State::Login(Login::new(provider.clone(), tsih)),
            provider,
            portal,
            stat_sn: 0,
            exp_cmd_sn: 0,
        }
    }

    /// The largest data segment we accept right now.
    pub fn max_recv(&self) -> u32 {
        match self.state {
            State::Full(_) => TARGET_MAX_RECV,
            _ => LOGIN_MAX_RECV,
        }
    }

    /// The target this connection logged in to, once in full feature phase.
    pub fn target(&self) -> Option<&str> {
        match &self.state {
            State::Full(f) => f.est.target.as_deref(),
            _ => None,
        }
    }

    /// The initiator's name, once in full feature phase.
    pub fn initiator(&self) -> Option<&str> {
        match &self.state {
            State::Full(f) => Some(f.est.initiator.as_str()),
            _ => None,
        }
    }

    fn max_cmd_sn(&self) -> u32 {
        self.exp_cmd_sn.wrapping_add(CMD_WINDOW - 1)
    }

    /// The next StatSN, advancing it.
    fn take_stat_sn(&mut self) -> u32 {
        let s = self.stat_sn;
        self.stat_sn = self.stat_sn.wrapping_add(1);
        s
    }

    fn reject(&mut self, reason: u8, raw_bhs: &[u8]) -> Action {
        let r = Reject {
            reason,
            stat_sn: self.take_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            data_sn: 0,
        };
        Action::Send(Pdu::new(
            Bhs::Reject(r),
            raw_bhs.get(..BHS_LEN).unwrap_or(raw_bhs).to_vec(),
        ))
    }

    /// The I/O side could not decode a PDU. `raw` is its BHS when one was read.
    pub fn on_decode_error(&mut self, err: &PduError, raw: &[u8; BHS_LEN]) -> Vec<Action> {
        tracing::warn!(error = %err, "bad PDU");
        match err {
            // The framing is intact: refuse this PDU and go on (RFC 7143 §11.17).
            PduError::UnknownOpcode(_) if matches!(self.state, State::Full(_)) => {
                vec![self.reject(reject_reason::COMMAND_NOT_SUPPORTED, raw)]
            }
            PduError::DigestMismatch { what: "data", .. }
                if matches!(self.state, State::Full(_)) =>
            {
                // ERL 0: a lost data segment cannot be recovered; the connection ends.
                vec![self.reject(reject_reason::DATA_DIGEST, raw), Action::Close]
            }
            PduError::DataSegmentTooLong { .. }
            | PduError::InvalidField { .. }
            | PduError::UnknownOpcode(_)
                if matches!(self.state, State::Full(_)) =>
            {
                vec![
                    self.reject(reject_reason::PROTOCOL_ERROR, raw),
                    Action::Close,
                ]
            }
            _ => vec![Action::Close],
        }
    }

    /// The connection ended (logout or the peer went away): drops pending writes, which
    /// were never applied, so a write cut off mid-transfer leaves the LUN untouched.
    pub fn on_close(&mut self) {
        if let State::Full(f) = &self.state {
            if !f.pending.is_empty() {
                tracing::warn!(
                    writes = f.pending.len(),
                    "connection closed with writes in flight; discarded"
                );
            }
        }
        self.state = State::Closed;
    }

    /// Handles one PDU.
    pub fn on_pdu(&mut self, pdu: Pdu) -> Vec<Action> {
        let mut out = Vec::new();
        match std::mem::replace(&mut self.state, State::Closed) {
            State::Login(mut login) => {
                let Bhs::LoginRequest(req) = &pdu.bhs else {
                    tracing::warn!(opcode = pdu.bhs.opcode(), "non-login PDU during login");
                    return vec![Action::Close];
                };
                match login.on_request(req, &pdu.data) {
                    Step::Continue(p) => {
                        out.push(Action::Send(p));
                        self.state = State::Login(login);
                    }
                    Step::Fail(p) => {
                        out.push(Action::Send(p));
                        out.push(Action::Close);
                    }
                    Step::Done(p, est) => {
                        out.push(Action::Send(p));
                        let dev = match (est.session_type, est.target.as_deref()) {
                            (SessionType::Normal, Some(t)) => match self.provider.attach(t) {
                                Ok(d) => Some(d),
                                Err(e) => {
                                    tracing::error!(target = t, error = %e, "cannot open the LUN");
                                    return vec![Action::Close];
                                }
                            },
                            _ => None,
                        };
                        self.stat_sn = est.stat_sn;
                        self.exp_cmd_sn = est.exp_cmd_sn;
                        out.push(Action::Negotiated {
                            digests: Digests {
                                header: est.params.header_digest,
                                data: est.params.data_digest,
                            },
                            max_recv: TARGET_MAX_RECV,
                        });
                        self.state = State::Full(Box::new(FullFeature {
                            est: *est,
                            dev,
                            pending: HashMap::new(),
                            pending_bytes: 0,
                            text_cont: None,
                            next_ttt: 1,
                        }));
                    }
                }
            }
            State::Full(mut ff) => {
                self.full_feature(&mut ff, pdu, &mut out);
                if !out.contains(&Action::Close) {
                    self.state = State::Full(ff);
                }
            }
            State::Closed => out.push(Action::Close),
        }
        out
    }

    /// Checks CmdSN of a non-immediate request; false if it is outside the window and
    /// must be ignored (RFC 7143 §4.2.2.1).
    fn accept_cmd_sn(&mut self, immediate: bool, cmd_sn: u32) -> bool {
        if immediate {
            return true;
        }
        if sn_lt(cmd_sn, self.exp_cmd_sn) || sn_lt(self.max_cmd_sn(), cmd_sn) {
            tracing::warn!(
                cmd_sn,
                exp = self.exp_cmd_sn,
                "CmdSN outside the window; ignored"
            );
            return false;
        }
        if cmd_sn == self.exp_cmd_sn || sn_lt(self.exp_cmd_sn, cmd_sn) {
            self.exp_cmd_sn = cmd_sn.wrapping_add(1);
        }
        true
    }

    fn full_feature(&mut self, ff: &mut FullFeature, pdu: Pdu, out: &mut Vec<Action>) {
        let raw = pdu.bhs.to_bytes(0, pdu.data.len() as u32);
        let discovery = ff.est.session_type == SessionType::Discovery;
        match pdu.bhs {
            Bhs::NopOut(n) => {
                if !self.accept_cmd_sn(n.immediate, n.cmd_sn) {
                    return;
                }
                if n.itt != 0xffff_ffff {
                    let reply = NopIn {
                        lun: n.lun,
                        itt: n.itt,
                        ttt: 0xffff_ffff,
                        stat_sn: self.take_stat_sn(),
                        exp_cmd_sn: self.exp_cmd_sn,
                        max_cmd_sn: self.max_cmd_sn(),
                    };
                    let mut data = pdu.data;
                    data.truncate(ff.est.params.initiator_max_recv as usize);
                    out.push(Action::Send(Pdu::new(Bhs::NopIn(reply), data)));
                }
            }
            Bhs::ScsiCommand(c) if !discovery => {
                if !self.accept_cmd_sn(c.immediate, c.cmd_sn) {
                    return;
                }
                self.scsi_command(ff, c, pdu.data, &raw, out);
            }
            Bhs::DataOut(d) if !discovery => self.data_out(ff, d, pdu.data, &raw, out),
            Bhs::TextRequest(t) => {
                if !self.accept_cmd_sn(t.immediate, t.cmd_sn) {
                    return;
                }
                self.text(ff, t, &pdu.data, out);
            }
            Bhs::TaskMgmtRequest(t) if !discovery => {
                if !self.accept_cmd_sn(t.immediate, t.cmd_sn) {
                    return;
                }
                let lun_ok = t.lun.number() == Some(0);
                let response = match t.function {
                    // ABORT TASK: a write waiting for data is dropped and never answered
                    // (RFC 7143 §11.5.1); every other command was answered already.
                    1 if !lun_ok => 2,
                    1 => {
                        if ff.take_pending(t.referenced_tag).is_some() {
                            0
                        } else {
                            // Already answered (or never seen): "task does not exist".
                            1
                        }
                    }
                    // ABORT TASK SET, CLEAR TASK SET, LOGICAL UNIT RESET.
                    2 | 3 | 5 if !lun_ok => 2,
                    2 | 3 | 5 => {
                        ff.clear_pending();
                        0
                    }
                    // CLEAR ACA: no ACA support.
                    4 => 5,
                    // TARGET WARM RESET, TARGET COLD RESET.
                    6 | 7 => {
                        ff.clear_pending();
                        0
                    }
                    // TASK REASSIGN: needs ERL 2.
                    8 => 4,
                    _ => 255,
                };
                tracing::info!(function = t.function, response, "task management");
                let r = TaskMgmtResponse {
                    response,
                    itt: t.itt,
                    stat_sn: self.take_stat_sn(),
                    exp_cmd_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                };
                out.push(Action::Send(Pdu::new(Bhs::TaskMgmtResponse(r), Vec::new())));
                if t.function == 7 {
                    out.push(Action::Close);
                }
            }
            Bhs::LogoutRequest(l) => {
                if !self.accept_cmd_sn(l.immediate, l.cmd_sn) {
                    return;
                }
                // 0: close the session, 1: close this connection; 2 (recovery) needs ERL 2.
                let response = if l.reason <= 1 { 0 } else { 2 };
                let r = LogoutResponse {
                    response,
                    itt: l.itt,
                    stat_sn: self.take_stat_sn(),
                    exp_cmd_sn: self.exp_cmd_sn,
                    max_cmd_sn: self.max_cmd_sn(),
                    time2wait: 0,
                    time2retain: 0,
                };
                out.push(Action::Send(Pdu::new(Bhs::LogoutResponse(r), Vec::new())));
                if response == 0 {
                    tracing::info!(initiator = %ff.est.initiator, "logout");
                    out.push(Action::Close);
                }
            }
            Bhs::Snack(_) => out.push(self.reject(reject_reason::PROTOCOL_ERROR, &raw)),
            Bhs::LoginRequest(_) => {
                out.push(self.reject(reject_reason::PROTOCOL_ERROR, &raw));
                out.push(Action::Close);
            }
            Bhs::ScsiCommand(_) | Bhs::DataOut(_) | Bhs::TaskMgmtRequest(_) => {
                // Not in a discovery session (RFC 7143 §4.3).
                out.push(self.reject(reject_reason::PROTOCOL_ERROR, &raw));
            }
            // Target-to-initiator opcodes.
            _ => out.push(self.reject(reject_reason::PROTOCOL_ERROR, &raw)),
        }
    }

    fn scsi_response(&mut self, itt: u32, outcome: &Outcome, edtl: u32, produced: usize) -> Pdu {
        let (overflow, underflow, residual) = residual(edtl, produced);
        let r = ScsiResponse {
            bidi_overflow: false,
            bidi_underflow: false,
            overflow,
            underflow,
            response: 0,
            status: outcome.status,
            itt,
            snack_tag: 0,
            stat_sn: self.take_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            exp_data_sn: 0,
            bidi_residual: 0,
            residual,
        };
        let data = match &outcome.sense {
            Some(s) => {
                let sense = s.to_fixed();
                let mut d = (sense.len() as u16).to_be_bytes().to_vec();
                d.extend_from_slice(&sense);
                d
            }
            None => Vec::new(),
        };
        Pdu::new(Bhs::ScsiResponse(r), data)
    }

    fn check(&mut self, itt: u32, sense: Sense, edtl: u32, out: &mut Vec<Action>) {
        let p = self.scsi_response(itt, &Outcome::check(sense), edtl, 0);
        out.push(Action::Send(p));
    }

    fn scsi_command(
        &mut self,
        ff: &mut FullFeature,
        c: ScsiCommand,
        data: Vec<u8>,
        raw: &[u8],
        out: &mut Vec<Action>,
    ) {
        let Some(dev) = ff.dev.clone() else {
            out.push(self.reject(reject_reason::PROTOCOL_ERROR, raw));
            return;
        };
        if ff.pending.contains_key(&c.itt) {
            tracing::warn!(itt = c.itt, "ITT already in use");
            out.push(self.reject(reject_reason::PROTOCOL_ERROR, raw));
            return;
        }
        let params = &ff.est.params;
        if !data.is_empty()
            && (!params.immediate_data
                || !c.write
                || data.len() as u64 > u64::from(params.first_burst.min(c.expected_len)))
        {
            tracing::warn!(
                itt = c.itt,
                len = data.len(),
                "immediate data not allowed here"
            );
            out.push(self.reject(reject_reason::PROTOCOL_ERROR, raw));
            out.push(Action::Close);
            return;
        }
        let lun_exists = c.lun.number() == Some(0);
        let cmd = match Command::parse(&c.cdb, dev.blocks()) {
            Ok(cmd) => cmd,
            Err(sense) => return self.check(c.itt, sense, c.expected_len, out),
        };
        let need = cmd.data_out_len(dev.block_size());
        if need > 0 {
            if !lun_exists {
                return self.check(c.itt, Sense::LUN_NOT_SUPPORTED, c.expected_len, out);
            }
            let buffered = u64::from(c.expected_len).min(need) as usize;
            if ff.pending.len() >= MAX_PENDING_WRITES
                || ff.pending_bytes + buffered > MAX_PENDING_BYTES
            {
                // TASK SET FULL: the initiator retries later.
                let o = Outcome {
                    status: 0x28,
                    sense: None,
                    data: Vec::new(),
                };
                let p = self.scsi_response(c.itt, &o, c.expected_len, 0);
                out.push(Action::Send(p));
                return;
            }
            // The initiator sends EDTL bytes whatever the CDB says. When that is less
            // than the CDB asks, only the whole blocks sent are written and the
            // response carries an overflow residual; when more, the surplus is
            // dropped with an underflow residual (RFC 7143 §11.4.5.1; what libiscsi's
            // residual tests and Linux LIO expect).
            let edtl = c.expected_len;
            let bs = dev.block_size();
            let take = (u64::from(edtl).min(need) / u64::from(bs)) as u32;
            let cmd = match cmd {
                Command::Write { lba, fua, .. } => Command::Write {
                    lba,
                    blocks: take,
                    fua,
                },
                Command::Verify { lba, bytchk, .. } => Command::Verify {
                    lba,
                    blocks: take,
                    bytchk,
                },
                other => other,
            };
            let need = need.min(u64::from(u32::MAX)) as u32;
            let imm = data.len() as u32;
            let unsol_end = if params.initial_r2t {
                imm
            } else {
                params.first_burst.min(edtl).max(imm)
            };
            let mut w = PendingWrite {
                lun: c.lun,
                cmd,
                lun_exists,
                edtl,
                need,
                data_sn: 0,
                // Only what will be written is kept: at most `need`, itself bounded by
                // MAX_TRANSFER_BLOCKS; surplus Data-Out bytes are counted, not stored.
                buf: vec![0u8; buffered],
                received: imm,
                unsol_next: imm,
                unsol_end,
                r2t: None,
                r2t_next: unsol_end,
                r2t_sn: 0,
            };
            copy_into(&mut w.buf, 0, &data);
            if w.received >= edtl {
                return self.finish_write(c.itt, w, &dev, out);
            }
            self.maybe_r2t(ff, c.itt, &mut w, out);
            ff.pending_bytes += w.buf.len();
            ff.pending.insert(c.itt, w);
            return;
        }
        if c.write && c.expected_len > 0 && !data.is_empty() {
            // Data sent with a command that takes none: ignore it, report the residual.
        }
        let outcome = scsi::execute(&cmd, dev.as_ref(), lun_exists, &[]);
        self.send_outcome(ff, c.itt, c.lun, &outcome, c.expected_len, c.read, out);
    }

    fn send_outcome(
        &mut self,
        ff: &FullFeature,
        itt: u32,
        lun: Lun,
        o: &Outcome,
        edtl: u32,
        read: bool,
        out: &mut Vec<Action>,
    ) {
        let produced = o.data.len();
        let sendable = if read { produced.min(edtl as usize) } else { 0 };
        if o.status != scsi::GOOD || sendable == 0 {
            let p = self.scsi_response(itt, o, edtl, produced);
            out.push(Action::Send(p));
            return;
        }
        let seg = ff.est.params.initiator_max_recv.max(512) as usize;
        let (overflow, underflow, residual) = residual(edtl, produced);
        let data = o.data.get(..sendable).unwrap_or_default();
        let mut sn = 0u32;
        let mut off = 0usize;
        while off < data.len() {
            let end = (off + seg).min(data.len());
            let last = end == data.len();
            let d = DataIn {
                final_: last,
                ack: false,
                overflow: last && overflow,
                underflow: last && underflow,
                has_status: last,
                status: if last { o.status } else { 0 },
                lun,
                itt,
                ttt: 0xffff_ffff,
                stat_sn: if last { self.take_stat_sn() } else { 0 },
                exp_cmd_sn: self.exp_cmd_sn,
                max_cmd_sn: self.max_cmd_sn(),
                data_sn: sn,
                buffer_offset: off as u32,
                residual: if last { residual } else { 0 },
            };
            out.push(Action::Send(Pdu::new(
                Bhs::DataIn(d),
                data.get(off..end).unwrap_or_default().to_vec(),
            )));
            sn += 1;
            off = end;
        }
    }

    /// Sends the next R2T for `w` if none is outstanding and data remains.
    fn maybe_r2t(
        &mut self,
        ff: &mut FullFeature,
        itt: u32,
        w: &mut PendingWrite,
        out: &mut Vec<Action>,
    ) {
        if w.r2t.is_some() || w.r2t_next >= w.edtl {
            return;
        }
        let len = ff.est.params.max_burst.min(w.edtl - w.r2t_next);
        let ttt = ff.next_ttt;
        ff.next_ttt = ff.next_ttt.wrapping_add(1).max(1);
        if ff.next_ttt == 0xffff_ffff {
            ff.next_ttt = 1;
        }
        let r = R2t {
            lun: w.lun,
            itt,
            ttt,
            stat_sn: self.stat_sn,
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
            r2t_sn: w.r2t_sn,
            buffer_offset: w.r2t_next,
            desired_len: len,
        };
        w.r2t = Some((ttt, w.r2t_next, w.r2t_next + len));
        w.r2t_next += len;
        w.r2t_sn += 1;
        out.push(Action::Send(Pdu::new(Bhs::R2t(r), Vec::new())));
    }

    fn data_out(
        &mut self,
        ff: &mut FullFeature,
        d: DataOut,
        data: Vec<u8>,
        raw: &[u8],
        out: &mut Vec<Action>,
    ) {
        let Some(mut w) = ff.take_pending(d.itt) else {
            // Unsolicited data for a command already answered (for instance one refused
            // with CHECK CONDITION) is dropped silently; anything else is an error.
            if d.ttt != 0xffff_ffff {
                out.push(self.reject(reject_reason::PROTOCOL_ERROR, raw));
            }
            return;
        };
        let len = data.len() as u32;
        if d.data_sn != w.data_sn {
            tracing::warn!(
                itt = d.itt,
                got = d.data_sn,
                want = w.data_sn,
                "Data-Out with a wrong DataSN; write dropped"
            );
            out.push(self.reject(reject_reason::PROTOCOL_ERROR, raw));
            out.push(Action::Close);
            return;
        }
        w.data_sn += 1;
        let ok = if d.ttt == 0xffff_ffff {
            let ok = d.buffer_offset == w.unsol_next
                && d.buffer_offset
                    .checked_add(len)
                    .is_some_and(|e| e <= w.unsol_end);
            if ok {
                w.unsol_next += len;
                if d.final_ || w.unsol_next >= w.unsol_end {
                    // The unsolicited sequence is over; R2T sequences count from 0.
                    w.data_sn = 0;
                }
            }
            ok
        } else {
            match w.r2t {
                Some((ttt, next, end)) if ttt == d.ttt => {
                    let ok = d.buffer_offset == next
                        && d.buffer_offset.checked_add(len).is_some_and(|e| e <= end);
                    if ok {
                        let next = next + len;
                        w.r2t = if next >= end {
                            // The next R2T's sequence starts at DataSN 0 again.
                            w.data_sn = 0;
                            None
                        } else {
                            Some((ttt, next, end))
                        };
                    }
                    ok
                }
                _ => false,
            }
        };
        if !ok {
            tracing::warn!(
                itt = d.itt,
                offset = d.buffer_offset,
                len,
                "Data-Out outside what was asked; write dropped"
            );
            out.push(self.reject(reject_reason::PROTOCOL_ERROR, raw));
            out.push(Action::Close);
            return;
        }
        copy_into(&mut w.buf, d.buffer_offset as usize, &data);
        w.received += len;
        let Some(dev) = ff.dev.clone() else { return };
        if w.received >= w.edtl {
            return self.finish_write(d.itt, w, &dev, out);
        }
        self.maybe_r2t(ff, d.itt, &mut w, out);
        ff.pending_bytes += w.buf.len();
        ff.pending.insert(d.itt, w);
    }

    fn finish_write(
        &mut self,
        itt: u32,
        w: PendingWrite,
        dev: &Arc<dyn BlockDevice>,
        out: &mut Vec<Action>,
    ) {
        let take = w.cmd.data_out_len(dev.block_size()) as usize;
        let outcome = scsi::execute(
            &w.cmd,
            dev.as_ref(),
            w.lun_exists,
            w.buf.get(..take).unwrap_or_default(),
        );
        let p = self.scsi_response(itt, &outcome, w.edtl, w.need as usize);
        out.push(Action::Send(p));
    }

    fn text(&mut self, ff: &mut FullFeature, t: TextRequest, data: &[u8], out: &mut Vec<Action>) {
        let seg = ff.est.params.initiator_max_recv.max(512) as usize;
        let body = match ff.text_cont.take() {
            // The initiator asks for the rest of a long answer (empty request, our TTT).
            Some((itt, ttt, rest)) if itt == t.itt && ttt == t.ttt => rest,
            _ => {
                let keys = match TextPairs::parse(data) {
                    Ok(k) => k,
                    Err(e) => {
                        tracing::warn!(error = %e, "bad text request");
                        out.push(self.reject(reject_reason::PROTOCOL_ERROR, &[]));
                        return;
                    }
                };
                let mut reply = TextPairs::default();
                for (k, v) in &keys.0 {
                    if k == "SendTargets" {
                        let names = match (ff.est.session_type, &ff.est.target) {
                            (SessionType::Discovery, _) if v == "All" => {
                                self.provider.targets_for(&ff.est.initiator)
                            }
                            (SessionType::Discovery, _) => self
                                .provider
                                .targets_for(&ff.est.initiator)
                                .into_iter()
                                .filter(|n| n == v)
                                .collect(),
                            (SessionType::Normal, Some(own)) => vec![own.clone()],
                            _ => Vec::new(),
                        };
                        for n in names {
                            reply.push("TargetName", n);
                            reply.push("TargetAddress", format!("{},1", self.portal));
                        }
                    } else {
                        reply.push(k.clone(), "NotUnderstood");
                    }
                }
                reply.to_bytes()
            }
        };
        let (now, rest) = body.split_at(body.len().min(seg));
        let more = !rest.is_empty();
        let ttt = if more {
            let ttt = ff.next_ttt;
            ff.next_ttt = ff.next_ttt.wrapping_add(1).max(1);
            ff.text_cont = Some((t.itt, ttt, rest.to_vec()));
            ttt
        } else {
            0xffff_ffff
        };
        let r = TextResponse {
            final_: !more,
            continue_: more,
            lun: t.lun,
            itt: t.itt,
            ttt,
            stat_sn: self.take_stat_sn(),
            exp_cmd_sn: self.exp_cmd_sn,
            max_cmd_sn: self.max_cmd_sn(),
        };
        out.push(Action::Send(Pdu::new(Bhs::TextResponse(r), now.to_vec())));
    }
}

/// Residual flags and count (RFC 7143 §11.4.5): O when the command had more data than
/// the initiator expected, U when less.
fn residual(edtl: u32, produced: usize) -> (bool, bool, u32) {
    let produced = produced.min(u32::MAX as usize) as u32;
    match produced.cmp(&edtl) {
        std::cmp::Ordering::Greater => (true, false, produced - edtl),
        std::cmp::Ordering::Less => (false, true, edtl - produced),
        std::cmp::Ordering::Equal => (false, false, 0),
    }
}

/// The parameters in force, for tests.
#[doc(hidden)]
pub fn params_of(c: &Connection) -> Option<Params> {
    match &c.state {
        State::Full(f) => Some(f.est.params.clone()),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::lun::{Backing, MemDevice, StaticLuns, TargetAccess};
    use crate::iscsi::pdu::{LoginRequest, NopOut, Stage};
    use proptest::prelude::*;

    fn connect(keys: &str, dev: Arc<MemDevice>) -> Connection {
        let mut p = StaticLuns::new();
        p.insert("iqn.t", TargetAccess::default(), Backing::Shared(dev));
        let mut c = Connection::new(Arc::new(p), "127.0.0.1:3260".into(), 1);
        let req = LoginRequest {
            transit: true,
            continue_: false,
            csg: Stage::Operational,
            nsg: Stage::FullFeature,
            version_max: 0,
            version_min: 0,
            isid: [0; 6],
            tsih: 0,
            itt: 0,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        };
        let body = format!("InitiatorName=iqn.i\0TargetName=iqn.t\0{keys}");
        let acts = c.on_pdu(Pdu::new(Bhs::LoginRequest(req), body.into_bytes()));
        assert!(
            acts.iter().any(|a| matches!(a, Action::Negotiated { .. })),
            "{acts:?}"
        );
        c
    }

    fn cmd(itt: u32, sn: u32, cdb: &[u8], edtl: u32, write: bool, data: Vec<u8>) -> Pdu {
        let mut c = [0u8; 16];
        c[..cdb.len()].copy_from_slice(cdb);
        Pdu::new(
            Bhs::ScsiCommand(ScsiCommand {
                immediate: false,
                final_: true,
                read: !write,
                write,
                attr: 1,
                lun: Lun::default(),
                itt,
                expected_len: edtl,
                cmd_sn: sn,
                exp_stat_sn: 0,
                cdb: c,
            }),
            data,
        )
    }

    fn sent(acts: &[Action]) -> Vec<&Pdu> {
        acts.iter()
            .filter_map(|a| {
                if let Action::Send(p) = a {
                    Some(p)
                } else {
                    None
                }
            })
            .collect()
    }

    fn write10(lba: u32, blocks: u16) -> Vec<u8> {
        let l = lba.to_be_bytes();
        let n = blocks.to_be_bytes();
        vec![0x2a, 0, l[0], l[1], l[2], l[3], 0, n[0], n[1], 0]
    }

    #[test]
    fn write_with_r2t_then_read_back() {
        let dev = Arc::new(MemDevice::new(64, 512, false));
        let mut c = connect(
            "InitialR2T=Yes\0ImmediateData=Yes\0FirstBurstLength=512\0MaxBurstLength=1024\0",
            dev.clone(),
        );
        let payload: Vec<u8> = (0..4096u32).map(|i| i as u8).collect();
        let acts = c.on_pdu(cmd(
            10,
            1,
            &write10(4, 8),
            4096,
            true,
            payload[..512].to_vec(),
        ));
        let p = sent(&acts);
        let Bhs::R2t(r) = &p[0].bhs else {
            panic!("{acts:?}")
        };
        assert_eq!((r.buffer_offset, r.desired_len), (512, 1024));
        let mut ttt = r.ttt;
        let mut off = 512;
        loop {
            let dout = DataOut {
                final_: true,
                lun: Lun::default(),
                itt: 10,
                ttt,
                exp_stat_sn: 0,
                data_sn: 0,
                buffer_offset: off,
            };
            let acts = c.on_pdu(Pdu::new(
                Bhs::DataOut(dout),
                payload[off as usize..off as usize + 1024.min(4096 - off as usize)].to_vec(),
            ));
            off += 1024.min(4096 - off);
            let p = sent(&acts);
            match &p[0].bhs {
                Bhs::R2t(r) => {
                    assert_eq!(r.buffer_offset, off);
                    ttt = r.ttt;
                }
                Bhs::ScsiResponse(s) => {
                    assert_eq!(s.status, 0);
                    break;
                }
                other => panic!("{other:?}"),
            }
        }
        let mut back = vec![0u8; 4096];
        dev.read_at(&mut back, 4 * 512).unwrap();
        assert_eq!(back, payload);
        let mut rd = write10(4, 8);
        rd[0] = 0x28;
        let acts = c.on_pdu(cmd(11, 2, &rd, 4096, false, vec![]));
        let data: Vec<u8> = sent(&acts).iter().flat_map(|p| p.data.clone()).collect();
        assert_eq!(data, payload);
    }

    #[test]
    fn dropped_connection_mid_write_leaves_the_lun_untouched() {
        let dev = Arc::new(MemDevice::new(64, 512, false));
        let mut c = connect("InitialR2T=No\0ImmediateData=Yes\0", dev.clone());
        let acts = c.on_pdu(cmd(1, 1, &write10(0, 4), 2048, true, vec![0xee; 512]));
        assert!(sent(&acts)
            .iter()
            .all(|p| !matches!(p.bhs, Bhs::ScsiResponse(_))));
        c.on_close();
        let mut back = vec![1u8; 2048];
        dev.read_at(&mut back, 0).unwrap();
        assert_eq!(back, vec![0u8; 2048]);
    }

    #[test]
    fn out_of_range_read_is_check_condition() {
        let dev = Arc::new(MemDevice::new(64, 512, false));
        let mut c = connect("", dev);
        let acts = c.on_pdu(cmd(
            1,
            1,
            &[0x28, 0, 0, 0, 0, 64, 0, 0, 1, 0],
            512,
            false,
            vec![],
        ));
        let p = sent(&acts);
        let Bhs::ScsiResponse(r) = &p[0].bhs else {
            panic!()
        };
        assert_eq!(r.status, scsi::CHECK_CONDITION);
        assert_eq!((p[0].data[2 + 2], p[0].data[2 + 12]), (0x05, 0x21));
    }

    #[test]
    fn nop_ping_and_logout() {
        let dev = Arc::new(MemDevice::new(8, 512, false));
        let mut c = connect("", dev);
        let acts = c.on_pdu(Pdu::new(
            Bhs::NopOut(NopOut {
                immediate: true,
                lun: Lun::default(),
                itt: 5,
                ttt: !0,
                cmd_sn: 1,
                exp_stat_sn: 0,
            }),
            b"ping".to_vec(),
        ));
        assert_eq!(sent(&acts)[0].data, b"ping");
        let lo = crate::iscsi::pdu::LogoutRequest {
            immediate: true,
            reason: 0,
            itt: 6,
            cid: 0,
            cmd_sn: 1,
            exp_stat_sn: 0,
        };
        let acts = c.on_pdu(Pdu::new(Bhs::LogoutRequest(lo), vec![]));
        assert_eq!(acts.last(), Some(&Action::Close));
    }

    proptest! {
        /// Whatever PDUs arrive after login, the connection never panics and never
        /// writes outside the device.
        #[test]
        fn arbitrary_pdus_never_panic(pdus in proptest::collection::vec((crate::iscsi::pdu::tests::any_bhs(), proptest::collection::vec(any::<u8>(), 0..600)), 1..20)) {
            let dev = Arc::new(MemDevice::new(16, 512, false));
            let mut c = connect("InitialR2T=No\0", dev);
            for (bhs, data) in pdus {
                let acts = c.on_pdu(Pdu::new(bhs, data));
                if acts.contains(&Action::Close) {
                    break;
                }
            }
        }
    }
}
