//! The SCSI commands a LUN answers: SPC-4 (INQUIRY with VPD pages 0x00 0x80 0x83 0xB0
//! 0xB1 0xB2, TEST UNIT READY, REPORT LUNS, MODE SENSE 6/10, REQUEST SENSE) and SBC-3
//! (READ CAPACITY 10/16, READ/WRITE 6/10/12/16, VERIFY 10/16, SYNCHRONIZE CACHE 10/16).
//! Anything else, and any request outside the medium, ends in CHECK CONDITION with fixed
//! format sense data (SPC-4 §4.5.3).
//!
//! [`Command::parse`] decodes and validates a CDB against the device's geometry; the
//! session then knows how much Data-Out a write needs before [`execute`] runs it.

use super::lun::{BlockDevice, LunError};

/// SCSI status GOOD.
pub const GOOD: u8 = 0x00;
/// SCSI status CHECK CONDITION.
pub const CHECK_CONDITION: u8 = 0x02;

/// Sense keys (SPC-4 §4.5.6).
pub mod key {
    #![allow(missing_docs)]
    pub const NO_SENSE: u8 = 0x0;
    pub const NOT_READY: u8 = 0x2;
    pub const MEDIUM_ERROR: u8 = 0x3;
    pub const HARDWARE_ERROR: u8 = 0x4;
    pub const ILLEGAL_REQUEST: u8 = 0x5;
    pub const UNIT_ATTENTION: u8 = 0x6;
    pub const DATA_PROTECT: u8 = 0x7;
    pub const ABORTED_COMMAND: u8 = 0xb;
    pub const MISCOMPARE: u8 = 0xe;
}

/// Sense data: key, additional sense code and qualifier, and for field errors the byte
/// (and bit) of the CDB at fault (SPC-4 §4.5.2.4.2).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Sense {
    /// Sense key.
    pub key: u8,
    /// Additional sense code.
    pub asc: u8,
    /// Additional sense code qualifier.
    pub ascq: u8,
    /// Field pointer into the CDB: (byte, bit).
    pub field: Option<(u16, Option<u8>)>,
}

impl Sense {
    const fn new(key: u8, asc: u8, ascq: u8) -> Sense {
        Sense {
            key,
            asc,
            ascq,
            field: None,
        }
    }
    /// INVALID COMMAND OPERATION CODE.
    pub const INVALID_OPCODE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x20, 0x00);
    /// LOGICAL BLOCK ADDRESS OUT OF RANGE.
    pub const LBA_OUT_OF_RANGE: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x21, 0x00);
    /// LOGICAL UNIT NOT SUPPORTED.
    pub const LUN_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x25, 0x00);
    /// WRITE PROTECTED.
    pub const WRITE_PROTECTED: Sense = Sense::new(key::DATA_PROTECT, 0x27, 0x00);
    /// UNRECOVERED READ ERROR.
    pub const READ_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x11, 0x00);
    /// WRITE ERROR.
    pub const WRITE_ERROR: Sense = Sense::new(key::MEDIUM_ERROR, 0x0c, 0x00);
    /// SAVING PARAMETERS NOT SUPPORTED.
    pub const SAVING_NOT_SUPPORTED: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x39, 0x00);
    /// PARAMETER LIST LENGTH ERROR.
    pub const PARAMETER_LIST_LENGTH: Sense = Sense::new(key::ILLEGAL_REQUEST, 0x1a, 0x00);
    /// MISCOMPARE DURING VERIFY OPERATION.
    pub const MISCOMPARE: Sense = Sense::new(key::MISCOMPARE, 0x1d, 0x00);
    /// NO ADDITIONAL SENSE INFORMATION.
    pub const NONE: Sense = Sense::new(key::NO_SENSE, 0, 0);
    /// INTERNAL TARGET FAILURE.
    pub const INTERNAL: Sense = Sense::new(key::HARDWARE_ERROR, 0x44, 0x00);

    /// INVALID FIELD IN CDB, pointing at `byte` (and `bit`).
    pub const fn invalid_field(byte: u16, bit: Option<u8>) -> Sense {
        Sense {
            key: key::ILLEGAL_REQUEST,
            asc: 0x24,
            ascq: 0,
            field: Some((byte, bit)),
        }
    }

    /// Fixed format sense data, 18 bytes (SPC-4 §4.5.3).
    pub fn to_fixed(&self) -> Vec<u8> {
        let mut s = [0u8; 18];
        s[0] = 0x70;
        s[2] = self.key & 0x0f;
        s[7] = 10;
        s[12] = self.asc;
        s[13] = self.ascq;
        if let Some((byte, bit)) = self.field {
            // SKSV=1, C/D=1 (the error is in the CDB), BPV and bit pointer when known.
            s[15] = 0x80 | 0x40 | bit.map_or(0, |b| 0x08 | (b & 7));
            s[16..18].copy_from_slice(&byte.to_be_bytes());
        }
        s.to_vec()
    }
}

/// A decoded, validated command.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Command {
    /// TEST UNIT READY.
    TestUnitReady,
    /// INQUIRY.
    Inquiry {
        /// VPD page wanted, `None` for standard data.
        page: Option<u8>,
        /// Allocation length.
        alloc: u32,
    },
    /// REQUEST SENSE.
    RequestSense {
        /// Descriptor format asked.
        desc: bool,
        /// Allocation length.
        alloc: u32,
    },
    /// REPORT LUNS.
    ReportLuns {
        /// Allocation length.
        alloc: u32,
    },
    /// READ CAPACITY (10).
    ReadCapacity10,
    /// READ CAPACITY (16).
    ReadCapacity16 {
        /// Allocation length.
        alloc: u32,
    },
    /// MODE SENSE (6) or (10).
    ModeSense {
        /// The 10-byte form.
        ten: bool,
        /// Disable block descriptors.
        dbd: bool,
        /// Page control (0 current, 1 changeable, 2 default).
        pc: u8,
        /// Page code (0x3f: all).
        page: u8,
        /// Subpage code.
        subpage: u8,
        /// Allocation length.
        alloc: u32,
    },
    /// READ (6/10/12/16).
    Read {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
    },
    /// WRITE (6/10/12/16).
    Write {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Force unit access: durable before status.
        fua: bool,
    },
    /// VERIFY (10/16).
    Verify {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
        /// Compare against Data-Out (BYTCHK=1).
        bytchk: bool,
    },
    /// SYNCHRONIZE CACHE (10/16).
    SyncCache,
    /// WRITE SAME (10/16): one block of Data-Out written `blocks` times.
    WriteSame {
        /// First block.
        lba: u64,
        /// Number of blocks.
        blocks: u32,
    },
    /// GET LBA STATUS: every block is mapped (no thin provisioning exposed).
    GetLbaStatus {
        /// Starting LBA.
        lba: u64,
        /// Allocation length.
        alloc: u32,
    },
    /// PRE-FETCH (10/16): a range check, nothing to load.
    Prefetch,
    /// START STOP UNIT, PREVENT ALLOW MEDIUM REMOVAL: accepted, nothing to do.
    NoOp,
}

fn be(b: &[u8]) -> u64 {
    b.iter().fold(0u64, |acc, &x| (acc << 8) | u64::from(x))
}

/// The CDB length implied by the opcode's group (SPC-4 §4.2.5.1), `None` for groups
/// without a fixed length.
pub fn cdb_len(opcode: u8) -> Option<usize> {
    match opcode >> 5 {
        0 => Some(6),
        1 | 2 => Some(10),
        4 => Some(16),
        5 => Some(12),
        _ => None,
    }
}

impl Command {
    /// Decodes `cdb` for a device of `blocks` logical blocks. Out-of-range LBAs, unknown
    /// opcodes and reserved bits set where the standard forbids them give the matching
    /// sense data.
    pub fn parse(cdb: &[u8; 16], blocks: u64) -> Result<Command, Sense> {
        let b = |i: usize| cdb.get(i).copied().unwrap_or(0);
        let f = |r: std::ops::Range<usize>| be(cdb.get(r).unwrap_or_default());
        let range = |lba: u64, n: u32| -> Result<(), Sense> {
            // One command moves at most MAX_TRANSFER_BLOCKS (VPD 0xB0 says so): the
            // buffers it needs stay bounded whatever the CDB asks.
            if n > MAX_TRANSFER_BLOCKS {
                return Err(Sense::invalid_field(
                    if cdb_len(b(0)) == Some(16) { 10 } else { 7 },
                    None,
                ));
            }
            match lba.checked_add(u64::from(n)) {
                Some(end) if end <= blocks => Ok(()),
                _ => Err(Sense::LBA_OUT_OF_RANGE),
            }
        };
        // Control byte bit 2 (NACA) is unsupported (SAM-5 §5.11).
        let control = cdb_len(b(0)).map_or(0, |n| b(n - 1));
        if control & 0x04 != 0 {
            let n = cdb_len(b(0)).unwrap_or(6) as u16;
            return Err(Sense::invalid_field(n - 1, Some(2)));
        }
        let cmd = match b(0) {
            0x00 => Command::TestUnitReady,
            0x12 => {
                let evpd = b(1) & 1 != 0;
                if b(1) & 0xfe != 0 {
                    return Err(Sense::invalid_field(1, None));
                }
                if !evpd && b(2) != 0 {
                    return Err(Sense::invalid_field(2, None));
                }
                Command::Inquiry {
                    page: evpd.then_some(b(2)),
                    alloc: f(3..5) as u32,
                }
            }
            0x03 => Command::RequestSense {
                desc: b(1) & 1 != 0,
                alloc: u32::from(b(4)),
            },
            0xa0 => {
                if b(2) > 2 && !(0x10..=0x12).contains(&b(2)) {
                    return Err(Sense::invalid_field(2, None));
                }
                let alloc = f(6..10) as u32;
                if alloc < 16 && alloc != 0 {
                    return Err(Sense::invalid_field(6, None));
                }
                Command::ReportLuns { alloc }
            }
            0x25 => {
                if f(2..6) != 0 || b(8) & 1 != 0 {
                    return Err(Sense::invalid_field(if f(2..6) != 0 { 2 } else { 8 }, None));
                }
                Command::ReadCapacity10
            }
            0x9e if b(1) & 0x1f == 0x10 => Command::ReadCapacity16 {
                alloc: f(10..14) as u32,
            },
            0x1a | 0x5a => {
                let ten = b(0) == 0x5a;
                let pc = b(2) >> 6;
                if pc == 3 {
                    return Err(Sense::SAVING_NOT_SUPPORTED);
                }
                Command::ModeSense {
                    ten,
                    dbd: b(1) & 0x08 != 0,
                    pc,
                    page: b(2) & 0x3f,
                    subpage: b(3),
                    alloc: if ten { f(7..9) as u32 } else { u32::from(b(4)) },
                }
            }
            0x08 | 0x0a => {
                let lba = f(1..4) & 0x1f_ffff;
                // READ(6)/WRITE(6): a transfer length of 0 means 256 blocks (SBC-3 §5.8).
                let n = if b(4) == 0 { 256 } else { u32::from(b(4)) };
                range(lba, n)?;
                if b(0) == 0x08 {
                    Command::Read { lba, blocks: n }
                } else {
                    Command::Write {
                        lba,
                        blocks: n,
                        fua: false,
                    }
                }
            }
            op @ (0x28 | 0x2a | 0xa8 | 0xaa | 0x88 | 0x8a) => {
                let (lba, n) = match op {
                    0x28 | 0x2a => (f(2..6), f(7..9) as u32),
                    0xa8 | 0xaa => (f(2..6), f(6..10) as u32),
                    _ => (f(2..10), f(10..14) as u32),
                };
                // RDPROTECT/WRPROTECT: no protection information on this device.
                if b(1) & 0xe0 != 0 {
                    return Err(Sense::invalid_field(1, Some(5)));
                }
                range(lba, n)?;
                if op & 0x02 == 0 {
                    Command::Read { lba, blocks: n }
                } else {
                    Command::Write {
                        lba,
                        blocks: n,
                        fua: b(1) & 0x08 != 0,
                    }
                }
            }
            op @ (0x2e | 0xae | 0x8e) => {
                // WRITE AND VERIFY: written durably, then it reads back as written.
                let (lba, n) = match op {
                    0x2e => (f(2..6), f(7..9) as u32),
                    0xae => (f(2..6), f(6..10) as u32),
                    _ => (f(2..10), f(10..14) as u32),
                };
                if b(1) & 0xe0 != 0 {
                    return Err(Sense::invalid_field(1, Some(5)));
                }
                range(lba, n)?;
                Command::Write {
                    lba,
                    blocks: n,
                    fua: true,
                }
            }
            op @ (0x34 | 0x90) => {
                let (lba, n) = if op == 0x34 {
                    (f(2..6), f(7..9) as u32)
                } else {
                    (f(2..10), f(10..14) as u32)
                };
                range(lba, n)?;
                Command::Prefetch
            }
            op @ (0x41 | 0x93) => {
                let (lba, n) = if op == 0x41 {
                    (f(2..6), f(7..9) as u32)
                } else {
                    (f(2..10), f(10..14) as u32)
                };
                // No UNMAP/ANCHOR (no logical block provisioning), no protection info.
                if b(1) & 0xe0 != 0 {
                    return Err(Sense::invalid_field(1, Some(5)));
                }
                if b(1) & 0x18 != 0 {
                    return Err(Sense::invalid_field(1, Some(3)));
                }
                // WSNZ=1 (VPD 0xB0): a count of zero is refused.
                if n == 0 || n > MAX_TRANSFER_BLOCKS {
                    return Err(Sense::invalid_field(if op == 0x41 { 7 } else { 10 }, None));
                }
                range(lba, n)?;
                Command::WriteSame { lba, blocks: n }
            }
            0x9e if b(1) & 0x1f == 0x12 => {
                let lba = f(2..10);
                if lba >= blocks {
                    return Err(Sense::LBA_OUT_OF_RANGE);
                }
                Command::GetLbaStatus {
                    lba,
                    alloc: f(10..14) as u32,
                }
            }
            op @ (0x2f | 0xaf | 0x8f) => {
                let (lba, n) = match op {
                    0x2f => (f(2..6), f(7..9) as u32),
                    0xaf => (f(2..6), f(6..10) as u32),
                    _ => (f(2..10), f(10..14) as u32),
                };
                if b(1) & 0xe0 != 0 {
                    return Err(Sense::invalid_field(1, Some(5)));
                }
                let bytchk = (b(1) >> 1) & 3;
                if bytchk > 1 {
                    return Err(Sense::invalid_field(1, Some(2)));
                }
                range(lba, n)?;
                Command::Verify {
                    lba,
                    blocks: n,
                    bytchk: bytchk == 1,
                }
            }
            op @ (0x35 | 0x91) => {
                let (lba, n) = if op == 0x35 {
                    (f(2..6), f(7..9))
                } else {
                    (f(2..10), f(10..14))
                };
                // A count of 0 means "to the end of the medium".
                if lba > blocks || (n != 0 && lba.saturating_add(n) > blocks) {
                    return Err(Sense::LBA_OUT_OF_RANGE);
                }
                Command::SyncCache
            }
            0x1b | 0x1e => Command::NoOp,
            _ => return Err(Sense::INVALID_OPCODE),
        };
        Ok(cmd)
    }

    /// Bytes of Data-Out the command consumes, for a device of `block_size`.
    pub fn data_out_len(&self, block_size: u32) -> u64 {
        match *self {
            Command::Write { blocks, .. }
            | Command::Verify {
                blocks,
                bytchk: true,
                ..
            } => u64::from(blocks) * u64::from(block_size),
            Command::WriteSame { .. } => u64::from(block_size),
            _ => 0,
        }
    }

    /// Whether the command writes the medium.
    pub fn is_write(&self) -> bool {
        matches!(self, Command::Write { .. } | Command::WriteSame { .. })
    }
}

/// What a command produced.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Outcome {
    /// SCSI status.
    pub status: u8,
    /// Sense data for CHECK CONDITION.
    pub sense: Option<Sense>,
    /// Data-In (already cut to the allocation length).
    pub data: Vec<u8>,
}

impl Outcome {
    /// GOOD with `data`.
    pub fn good(data: Vec<u8>) -> Outcome {
        Outcome {
            status: GOOD,
            sense: None,
            data,
        }
    }
    /// CHECK CONDITION with `sense`.
    pub fn check(sense: Sense) -> Outcome {
        Outcome {
            status: CHECK_CONDITION,
            sense: Some(sense),
            data: Vec::new(),
        }
    }
}

/// Identity strings of standard INQUIRY data.
pub const VENDOR: &[u8; 8] = b"STRATA  ";
/// Product identification.
pub const PRODUCT: &[u8; 16] = b"VIRTUAL-DISK    ";
/// Product revision.
pub const REVISION: &[u8; 4] = b"0001";
/// Largest transfer a single command may ask for, in blocks (VPD 0xB0).
pub const MAX_TRANSFER_BLOCKS: u32 = 16384;

fn cut(mut v: Vec<u8>, alloc: u32) -> Vec<u8> {
    v.truncate(alloc as usize);
    v
}

/// Runs `cmd` on `dev`. `data_out` holds exactly [`Command::data_out_len`] bytes.
/// `lun_exists` is false when the initiator addressed a LUN other than 0: INQUIRY then
/// reports "no device", REPORT LUNS and REQUEST SENSE still work, the rest fail.
pub fn execute(cmd: &Command, dev: &dyn BlockDevice, lun_exists: bool, data_out: &[u8]) -> Outcome {
    let bs = dev.block_size();
    let blocks = dev.blocks();
    if !lun_exists
        && !matches!(
            cmd,
            Command::Inquiry { .. } | Command::ReportLuns { .. } | Command::RequestSense { .. }
        )
    {
        return Outcome::check(Sense::LUN_NOT_SUPPORTED);
    }
    match *cmd {
        Command::TestUnitReady | Command::NoOp => Outcome::good(Vec::new()),
        Command::Inquiry { page: None, alloc } => {
            let mut d = [0u8; 96];
            d[0] = if lun_exists { 0x00 } else { 0x7f };
            d[2] = 0x06; // SPC-4
            d[3] = 0x12; // HISUP, response data format 2
            d[4] = 91;
            d[7] = 0x02; // CMDQUE
            d[8..16].copy_from_slice(VENDOR);
            d[16..32].copy_from_slice(PRODUCT);
            d[32..36].copy_from_slice(REVISION);
            // Version descriptors (SPC-4 §6.4.2): SAM-5, iSCSI, SPC-4, SBC-3.
            for (dst, v) in d[58..66]
                .chunks_exact_mut(2)
                .zip([0x00a0u16, 0x0960, 0x0460, 0x04c0])
            {
                dst.copy_from_slice(&v.to_be_bytes());
            }
            Outcome::good(cut(d.to_vec(), alloc))
        }
        Command::Inquiry {
            page: Some(page),
            alloc,
        } => match vpd(page, dev) {
            Some(mut d) => {
                if let (false, Some(b)) = (lun_exists, d.first_mut()) {
                    *b = 0x7f;
                }
                Outcome::good(cut(d, alloc))
            }
            None => Outcome::check(Sense::invalid_field(2, None)),
        },
        Command::RequestSense { desc, alloc } => {
            let d = if desc {
                vec![0x72, 0, 0, 0, 0, 0, 0, 0]
            } else {
                Sense::NONE.to_fixed()
            };
            Outcome::good(cut(d, alloc))
        }
        Command::ReportLuns { alloc } => {
            let mut d = [0u8; 16];
            d[3] = 8;
            Outcome::good(cut(d.to_vec(), alloc))
        }
        Command::ReadCapacity10 => {
            let last = blocks.saturating_sub(1).min(0xffff_ffff) as u32;
            let mut d = last.to_be_bytes().to_vec();
            d.extend_from_slice(&bs.to_be_bytes());
            Outcome::good(d)
        }
        Command::ReadCapacity16 { alloc } => {
            let mut d = [0u8; 32];
            d[0..8].copy_from_slice(&blocks.saturating_sub(1).to_be_bytes());
            d[8..12].copy_from_slice(&bs.to_be_bytes());
            d[13] = dev.physical_exponent() & 0x0f;
            Outcome::good(cut(d.to_vec(), alloc))
        }
        Command::ModeSense {
            ten,
            dbd,
            pc,
            page,
            subpage,
            alloc,
        } => mode_sense(dev, ten, dbd, pc, page, subpage, alloc),
        Command::Read { lba, blocks: n } => {
            let mut buf = vec![0u8; n as usize * bs as usize];
            match dev.read_at(&mut buf, lba * u64::from(bs)) {
                Ok(()) => Outcome::good(buf),
                Err(e) => {
                    tracing::error!(error = %e, lba, blocks = n, "LUN read failed");
                    Outcome::check(Sense::READ_ERROR)
                }
            }
        }
        Command::Write {
            lba,
            blocks: n,
            fua,
        } => {
            if dev.read_only() {
                return Outcome::check(Sense::WRITE_PROTECTED);
            }
            let len = n as usize * bs as usize;
            let Some(data) = data_out.get(..len) else {
                return Outcome::check(Sense::INTERNAL);
            };
            let res = dev.write_at(data, lba * u64::from(bs)).and_then(|()| {
                if fua {
                    dev.flush()
                } else {
                    Ok(())
                }
            });
            match res {
                Ok(()) => Outcome::good(Vec::new()),
                Err(LunError::ReadOnly) => Outcome::check(Sense::WRITE_PROTECTED),
                Err(e) => {
                    tracing::error!(error = %e, lba, blocks = n, "LUN write failed");
                    Outcome::check(Sense::WRITE_ERROR)
                }
            }
        }
        Command::Verify {
            lba,
            blocks: n,
            bytchk,
        } => {
            if !bytchk {
                return Outcome::good(Vec::new());
            }
            let mut buf = vec![0u8; n as usize * bs as usize];
            match dev.read_at(&mut buf, lba * u64::from(bs)) {
                Ok(()) if buf == data_out => Outcome::good(Vec::new()),
                Ok(()) => Outcome::check(Sense::MISCOMPARE),
                Err(_) => Outcome::check(Sense::READ_ERROR),
            }
        }
        Command::Prefetch => Outcome::good(Vec::new()),
        Command::GetLbaStatus { lba, alloc } => {
            // One descriptor: from `lba` to the end, mapped (SBC-3 §5.4).
            let mut d = [0u8; 24];
            d[0..4].copy_from_slice(&20u32.to_be_bytes());
            d[8..16].copy_from_slice(&lba.to_be_bytes());
            let n = (blocks - lba).min(u64::from(u32::MAX)) as u32;
            d[16..20].copy_from_slice(&n.to_be_bytes());
            Outcome::good(cut(d.to_vec(), alloc))
        }
        Command::WriteSame { lba, blocks: n } => {
            if dev.read_only() {
                return Outcome::check(Sense::WRITE_PROTECTED);
            }
            let Some(block) = data_out.get(..bs as usize) else {
                return Outcome::check(Sense::invalid_field(0, None));
            };
            // Write in runs of up to 1 MiB.
            let per = (1 << 20) / bs.max(1) as usize;
            let run = block.repeat(per.min(n as usize).max(1));
            let mut done = 0u64;
            while done < u64::from(n) {
                let k = (u64::from(n) - done).min(per as u64) as usize;
                let buf = run.get(..k * bs as usize).unwrap_or_default();
                if let Err(e) = dev.write_at(buf, (lba + done) * u64::from(bs)) {
                    tracing::error!(error = %e, lba, blocks = n, "LUN write failed");
                    return Outcome::check(Sense::WRITE_ERROR);
                }
                done += k as u64;
            }
            Outcome::good(Vec::new())
        }
        Command::SyncCache => match dev.flush() {
            Ok(()) => Outcome::good(Vec::new()),
            Err(e) => {
                tracing::error!(error = %e, "LUN flush failed");
                Outcome::check(Sense::WRITE_ERROR)
            }
        },
    }
}

/// VPD pages (SPC-4 §7.8, SBC-3 §6.6), without the allocation-length cut.
fn vpd(page: u8, dev: &dyn BlockDevice) -> Option<Vec<u8>> {
    let id = dev.id();
    let body: Vec<u8> = match page {
        0x00 => vec![0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2],
        0x80 => hex::encode(id).into_bytes(),
        0x83 => {
            let mut d = Vec::new();
            // NAA IEEE Registered Extended (type 3, NAA 6), binary, LU association.
            d.extend_from_slice(&[0x01, 0x03, 0x00, 0x10]);
            let mut naa = [0u8; 16];
            naa.copy_from_slice(&id);
            naa[0] = 0x60 | (naa[0] & 0x0f);
            d.extend_from_slice(&naa);
            // T10 vendor ID (type 1), ASCII: vendor + serial.
            let t10: Vec<u8> = VENDOR
                .iter()
                .copied()
                .chain(hex::encode(id).into_bytes())
                .collect();
            d.extend_from_slice(&[0x02, 0x01, 0x00, t10.len() as u8]);
            d.extend_from_slice(&t10);
            d
        }
        0xb0 => {
            let mut d = [0u8; 0x3c];
            d[0] = 0x01; // WSNZ: WRITE SAME with a count of zero is refused
            d[2..4].copy_from_slice(&8u16.to_be_bytes()); // optimal transfer length granularity
            d[4..8].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
            d[8..12].copy_from_slice(&2048u32.to_be_bytes()); // optimal transfer length
            d[32..40].copy_from_slice(&u64::from(MAX_TRANSFER_BLOCKS).to_be_bytes()); // max WRITE SAME length
            d.to_vec()
        }
        0xb1 => {
            let mut d = [0u8; 0x3c];
            d[1] = 0x01; // medium rotation rate: non-rotating
            d.to_vec()
        }
        0xb2 => {
            // Logical block provisioning: no UNMAP, no WRITE SAME unmap, not provisioned.
            vec![0u8; 4]
        }
        _ => return None,
    };
    let mut d = vec![0x00, page];
    d.extend_from_slice(&(body.len() as u16).to_be_bytes());
    d.extend_from_slice(&body);
    Some(d)
}

fn mode_sense(
    dev: &dyn BlockDevice,
    ten: bool,
    dbd: bool,
    pc: u8,
    page: u8,
    subpage: u8,
    alloc: u32,
) -> Outcome {
    let changeable = pc == 1;
    // Caching mode page (SBC-3 §6.5.5): WCE=1, writes are durable after SYNCHRONIZE CACHE.
    let caching = {
        let mut p = [0u8; 20];
        p[0] = 0x08;
        p[1] = 18;
        if !changeable {
            p[2] = 0x04;
        }
        p.to_vec()
    };
    // Control mode page (SPC-4 §7.5.8): D_SENSE=0 (fixed format), QERR=0.
    let control = {
        let mut p = [0u8; 12];
        p[0] = 0x0a;
        p[1] = 10;
        if !changeable {
            p[8..10].copy_from_slice(&0xffffu16.to_be_bytes()); // busy timeout period: unlimited
        }
        p.to_vec()
    };
    // Read-write error recovery (SBC-3 §6.5.9).
    let recovery = {
        let mut p = [0u8; 12];
        p[0] = 0x01;
        p[1] = 10;
        p.to_vec()
    };
    let pages = match (page, subpage) {
        (0x3f, 0x00 | 0xff) => [recovery, caching, control].concat(),
        (0x01, 0) => recovery,
        (0x08, 0) => caching,
        (0x0a, 0) => control,
        (0x00, 0) => Vec::new(),
        _ => return Outcome::check(Sense::invalid_field(2, None)),
    };
    let mut bd = Vec::new();
    if !dbd {
        let mut b = [0u8; 8];
        let n = dev.blocks().min(0xffff_ffff) as u32;
        b[0..4].copy_from_slice(&n.to_be_bytes());
        b[5..8].copy_from_slice(&dev.block_size().to_be_bytes()[1..4]);
        bd = b.to_vec();
    }
    let dsp = if dev.read_only() { 0x80 } else { 0x00 } | 0x10; // WP, DPOFUA
    let mut d = if ten {
        let mut h = [0u8; 8];
        let len = (6 + bd.len() + pages.len()) as u16;
        h[0..2].copy_from_slice(&len.to_be_bytes());
        h[3] = dsp;
        h[6..8].copy_from_slice(&(bd.len() as u16).to_be_bytes());
        h.to_vec()
    } else {
        vec![
            (3 + bd.len() + pages.len()).min(255) as u8,
            0,
            dsp,
            bd.len() as u8,
        ]
    };
    d.extend_from_slice(&bd);
    d.extend_from_slice(&pages);
    Outcome::good(cut(d, alloc))
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::iscsi::lun::MemDevice;

    fn cdb(b: &[u8]) -> [u8; 16] {
        let mut c = [0u8; 16];
        c[..b.len()].copy_from_slice(b);
        c
    }

    #[test]
    fn out_of_range_reads_and_writes() {
        let blocks = 100;
        assert_eq!(
            Command::parse(&cdb(&[0x28, 0, 0, 0, 0, 99, 0, 0, 1, 0]), blocks),
            Ok(Command::Read { lba: 99, blocks: 1 })
        );
        assert_eq!(
            Command::parse(&cdb(&[0x28, 0, 0, 0, 0, 99, 0, 0, 2, 0]), blocks),
            Err(Sense::LBA_OUT_OF_RANGE)
        );
        assert_eq!(
            Command::parse(
                &cdb(&[0x8a, 0, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0, 0, 0, 1, 0, 0]),
                blocks
            ),
            Err(Sense::LBA_OUT_OF_RANGE)
        );
        assert_eq!(
            Command::parse(&cdb(&[0x2a, 0x08, 0, 0, 0, 0, 0, 0, 4, 0]), blocks),
            Ok(Command::Write {
                lba: 0,
                blocks: 4,
                fua: true
            })
        );
        assert_eq!(
            Command::parse(&cdb(&[0xee]), blocks),
            Err(Sense::INVALID_OPCODE)
        );
    }

    #[test]
    fn transfers_are_bounded() {
        let mut c = cdb(&[0x88]);
        c[10..14].copy_from_slice(&(MAX_TRANSFER_BLOCKS + 1).to_be_bytes());
        assert_eq!(
            Command::parse(&c, u64::MAX),
            Err(Sense::invalid_field(10, None))
        );
        c[10..14].copy_from_slice(&MAX_TRANSFER_BLOCKS.to_be_bytes());
        assert!(Command::parse(&c, u64::MAX).is_ok());
    }

    #[test]
    fn sense_is_fixed_format() {
        let s = Sense::LBA_OUT_OF_RANGE.to_fixed();
        assert_eq!(
            (s[0], s[2], s[7], s[12], s[13]),
            (0x70, 0x05, 10, 0x21, 0x00)
        );
        let s = Sense::invalid_field(2, None).to_fixed();
        assert_eq!(&s[15..18], &[0xc0, 0, 2]);
    }

    #[test]
    fn read_write_capacity_inquiry() {
        let dev = MemDevice::new(64, 512, false);
        let w = Command::parse(&cdb(&[0x2a, 0, 0, 0, 0, 3, 0, 0, 1, 0]), 64).unwrap();
        assert_eq!(w.data_out_len(512), 512);
        assert_eq!(execute(&w, &dev, true, &[7u8; 512]).status, GOOD);
        let r = Command::parse(&cdb(&[0x28, 0, 0, 0, 0, 3, 0, 0, 1, 0]), 64).unwrap();
        assert_eq!(execute(&r, &dev, true, &[]).data, vec![7u8; 512]);
        let rc = execute(&Command::ReadCapacity10, &dev, true, &[]);
        assert_eq!(rc.data, vec![0, 0, 0, 63, 0, 0, 2, 0]);
        let inq = execute(
            &Command::Inquiry {
                page: None,
                alloc: 255,
            },
            &dev,
            true,
            &[],
        );
        assert_eq!(&inq.data[8..16], VENDOR);
        let p0 = execute(
            &Command::Inquiry {
                page: Some(0),
                alloc: 255,
            },
            &dev,
            true,
            &[],
        );
        assert_eq!(
            p0.data,
            vec![0, 0, 0, 6, 0x00, 0x80, 0x83, 0xb0, 0xb1, 0xb2]
        );
        let bad = execute(
            &Command::Inquiry {
                page: Some(0x99),
                alloc: 255,
            },
            &dev,
            true,
            &[],
        );
        assert_eq!(bad.status, CHECK_CONDITION);
        assert_eq!(
            execute(&r, &dev, false, &[]).sense,
            Some(Sense::LUN_NOT_SUPPORTED)
        );
    }

    #[test]
    fn read_only_device_refuses_writes() {
        let dev = MemDevice::new(8, 512, true);
        let w = Command::Write {
            lba: 0,
            blocks: 1,
            fua: false,
        };
        assert_eq!(
            execute(&w, &dev, true, &[0; 512]).sense,
            Some(Sense::WRITE_PROTECTED)
        );
    }

    #[test]
    fn mode_sense_pages() {
        let dev = MemDevice::new(8, 512, false);
        let all = execute(
            &Command::ModeSense {
                ten: false,
                dbd: false,
                pc: 0,
                page: 0x3f,
                subpage: 0,
                alloc: 255,
            },
            &dev,
            true,
            &[],
        );
        assert_eq!(all.data[0] as usize, all.data.len() - 1);
        assert_eq!(all.data[3], 8);
        let ten = execute(
            &Command::ModeSense {
                ten: true,
                dbd: true,
                pc: 0,
                page: 0x08,
                subpage: 0,
                alloc: 255,
            },
            &dev,
            true,
            &[],
        );
        assert_eq!(
            u16::from_be_bytes([ten.data[0], ten.data[1]]) as usize,
            ten.data.len() - 2
        );
        assert_eq!(ten.data[8], 0x08);
    }
}
