//! One VHDX file: opening and validating every structure, resolving virtual ranges to
//! file ranges, and crash-safe writes (see docs/vhdx.md for the write ordering).

use std::fs::{File, OpenOptions};
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::bat::{self, BlockState};
use crate::error::{Result, Structure, VhdxError};
use crate::header::{self, Header, FILE_ID_OFFSET, HEADER_OFFSETS, HEADER_SIZE};
use crate::io;
use crate::log;
use crate::metadata::{self, Metadata};
use crate::parent::ParentLocator;
use crate::region::{self, Region, Regions, REGION_TABLE_OFFSETS, REGION_TABLE_SIZE};

const MIB: u64 = 1024 * 1024;
/// The most of the metadata region read into memory.
const MAX_METADATA_READ: u64 = 32 * MIB;
/// Sectors described by one sector bitmap block (MS-VHDX §2.4.2).
const SECTORS_PER_BITMAP: u64 = 1 << 23;

/// The kind of disk (MS-VHDX §2.6.2.1 flags).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskType {
    /// All blocks allocated (LeaveBlocksAllocated).
    Fixed,
    /// Blocks allocated on write.
    Dynamic,
    /// A dynamic disk with a parent (HasParent).
    Differencing,
}

impl DiskType {
    /// `"fixed"`, `"dynamic"` or `"differencing"`.
    pub fn as_str(self) -> &'static str {
        match self {
            Self::Fixed => "fixed",
            Self::Dynamic => "dynamic",
            Self::Differencing => "differencing",
        }
    }
}

/// Where a run of a file's virtual range comes from, before parents are consulted.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Piece {
    /// In this file at this offset.
    Here(u64),
    /// Zeros.
    Zero,
    /// Not in this file: the parent's (or zeros for a base).
    Parent,
}

/// An open VHDX file.
pub struct Vhdx {
    path: PathBuf,
    file: File,
    writable: bool,
    creator: String,
    header: Header,
    header_slot: usize,
    regions: Regions,
    meta: Metadata,
    bat: Vec<u64>,
    /// Header GUIDs were updated for this write session (MS-VHDX §2.2.2.1).
    session_started: bool,
    /// Next free 1 MiB aligned file offset for new blocks.
    alloc_end: u64,
    /// New FileWriteGuid/DataWriteGuid to use for the write session (deterministic output).
    session_guids: Option<(Uuid, Uuid)>,
    /// A damaged redundant header or region table found at open (reported by `check`).
    damaged: Option<VhdxError>,
}

impl std::fmt::Debug for Vhdx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Vhdx")
            .field("path", &self.path)
            .field("writable", &self.writable)
            .field("header", &self.header)
            .field("regions", &self.regions)
            .field("meta", &self.meta)
            .field("bat_entries", &self.bat.len())
            .finish_non_exhaustive()
    }
}

fn truncated(path: &Path, structure: Structure, offset: u64, file_size: u64) -> VhdxError {
    VhdxError::Truncated {
        file: path.to_path_buf(),
        structure,
        offset,
        file_size,
    }
}

/// Reads `len` bytes at `offset`, or `Truncated` if the file is shorter.
fn read_struct(
    file: &File,
    path: &Path,
    size: u64,
    structure: Structure,
    offset: u64,
    len: u64,
) -> Result<Vec<u8>> {
    if offset.checked_add(len).is_none_or(|end| end > size) {
        return Err(truncated(path, structure, offset, size));
    }
    let mut buf =
        vec![0u8; usize::try_from(len).map_err(|_| truncated(path, structure, offset, size))?];
    io::read_exact_at(file, path, &mut buf, offset)?;
    Ok(buf)
}

impl Vhdx {
    /// Opens a file read-only. A file whose log holds entries to replay is refused with
    /// [`VhdxError::DirtyLog`] (replaying needs a write; see [`Vhdx::open_writable`]).
    pub fn open(path: impl AsRef<Path>) -> Result<Vhdx> {
        Self::open_with(path.as_ref(), false)
    }

    /// Opens a file read-write, replaying a non-empty log first (MS-VHDX §2.3.3).
    pub fn open_writable(path: impl AsRef<Path>) -> Result<Vhdx> {
        Self::open_with(path.as_ref(), true)
    }

    fn open_with(path: &Path, writable: bool) -> Result<Vhdx> {
        let file = OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(|source| VhdxError::Open {
                file: path.to_path_buf(),
                source,
            })?;
        let mut vhdx = Self::parse(path, file, writable)?;
        if vhdx.header.log_guid != Uuid::nil() && vhdx.replay_log()? {
            // The log rewrote metadata: parse again from the replayed bytes.
            let file = vhdx.file;
            vhdx = Self::parse(path, file, writable)?;
        }
        vhdx.validate_bat()?;
        Ok(vhdx)
    }

    /// Parses headers, region table, metadata and BAT (the BAT not yet validated).
    fn parse(path: &Path, file: File, writable: bool) -> Result<Vhdx> {
        let size = io::file_len(&file, path)?;
        let id = read_struct(
            &file,
            path,
            size,
            Structure::FileIdentifier,
            FILE_ID_OFFSET,
            64 * 1024,
        )
        .map_err(|e| match e {
            VhdxError::Truncated { .. } if size >= 8 => e,
            VhdxError::Truncated { .. } => VhdxError::NotVhdx {
                file: path.to_path_buf(),
            },
            e => e,
        })?;
        if id.get(0..8) != Some(header::FILE_SIGNATURE) {
            return Err(VhdxError::NotVhdx {
                file: path.to_path_buf(),
            });
        }
        let creator = header::creator(&id);
        let mut parsed = [0, 1]
            .map(|i| {
                let offset = HEADER_OFFSETS.get(i).copied().unwrap_or(0);
                read_struct(
                    &file,
                    path,
                    size,
                    Structure::Header(i as u8 + 1),
                    offset,
                    HEADER_SIZE as u64,
                )
                .and_then(|b| header::parse_header(path, i as u8 + 1, offset, &b))
            })
            .into_iter();
        let (h1, h2) = match (parsed.next(), parsed.next()) {
            (Some(a), Some(b)) => (a, b),
            _ => {
                return Err(VhdxError::NotVhdx {
                    file: path.to_path_buf(),
                })
            }
        };
        // A damaged redundant copy does not stop the open; `check` reports it.
        let mut damaged: Option<VhdxError> = None;
        let note = |r: &Result<Header>| r.as_ref().err().map(|e| e.to_string());
        let header_faults = (note(&h1), note(&h2));
        let (header, header_slot) = header::choose(path, h1, h2)?;
        if let Some(reason) = header_faults.0.or(header_faults.1) {
            damaged = Some(VhdxError::DamagedCopy {
                file: path.to_path_buf(),
                reason,
            });
        }
        let mut tables = [0, 1]
            .map(|i| {
                let offset = REGION_TABLE_OFFSETS.get(i).copied().unwrap_or(0);
                read_struct(
                    &file,
                    path,
                    size,
                    Structure::RegionTable(i as u8 + 1),
                    offset,
                    REGION_TABLE_SIZE as u64,
                )
                .and_then(|b| region::parse(path, i as u8 + 1, offset, &b))
            })
            .into_iter();
        let regions = match (tables.next(), tables.next()) {
            (Some(Ok(r)), Some(second)) => {
                match second {
                    Ok(r2) if r2 == r => {}
                    Ok(_) => {
                        damaged.get_or_insert(VhdxError::DamagedCopy {
                            file: path.to_path_buf(),
                            reason: "region table 2 differs from region table 1".into(),
                        });
                    }
                    Err(e) => {
                        damaged.get_or_insert(VhdxError::DamagedCopy {
                            file: path.to_path_buf(),
                            reason: e.to_string(),
                        });
                    }
                }
                r
            }
            (Some(Err(a)), Some(Ok(r))) => {
                // An unsupported required region is a property of the file, not damage.
                if matches!(a, VhdxError::Unsupported { .. }) {
                    return Err(a);
                }
                damaged.get_or_insert(VhdxError::DamagedCopy {
                    file: path.to_path_buf(),
                    reason: a.to_string(),
                });
                r
            }
            (Some(Err(a)), Some(Err(_))) if matches!(a, VhdxError::Unsupported { .. }) => {
                return Err(a)
            }
            (Some(Err(a)), Some(Err(b))) => {
                return Err(VhdxError::NoValidRegionTable {
                    file: path.to_path_buf(),
                    first: Box::new(a),
                    second: Box::new(b),
                })
            }
            _ => {
                return Err(VhdxError::NotVhdx {
                    file: path.to_path_buf(),
                })
            }
        };
        if header.log_length > 0 {
            let end = header
                .log_offset
                .saturating_add(u64::from(header.log_length));
            if end > size {
                return Err(truncated(
                    path,
                    Structure::LogEntry,
                    header.log_offset,
                    size,
                ));
            }
        }
        let log_region = Region {
            offset: header.log_offset,
            length: u64::from(header.log_length),
        };
        for r in [regions.bat, regions.metadata] {
            if header.log_length > 0 && region::overlaps(r, log_region) {
                return Err(VhdxError::RegionOverlap {
                    file: path.to_path_buf(),
                    a_offset: r.offset,
                    a_len: r.length,
                    b_offset: log_region.offset,
                    b_len: log_region.length,
                });
            }
        }
        // The metadata region is normally 1 MiB; items past the first 32 MiB are rejected as
        // outside the region rather than read into memory.
        let md_len = regions.metadata.length.min(MAX_METADATA_READ);
        let md = read_struct(
            &file,
            path,
            size,
            Structure::MetadataTable,
            regions.metadata.offset,
            md_len,
        )?;
        let meta = metadata::parse(path, regions.metadata.offset, &md)?;
        let needed = meta.bat_entries();
        let with_bitmaps = meta.bitmap_blocks().saturating_mul(meta.chunk_ratio() + 1);
        let have = regions.bat.length / 8;
        if have < needed {
            return Err(VhdxError::InvalidField {
                file: path.to_path_buf(),
                structure: Structure::Bat,
                reason: format!("region holds {have} entries, the disk needs {needed}"),
            });
        }
        let count = with_bitmaps.min(have);
        // Read the whole BAT at once.
        let raw = read_struct(
            &file,
            path,
            size,
            Structure::Bat,
            regions.bat.offset,
            count * 8,
        )?;
        let bat: Vec<u64> = raw
            .chunks_exact(8)
            .map(|c| c.iter().rev().fold(0u64, |acc, &b| acc << 8 | u64::from(b)))
            .collect();
        Ok(Vhdx {
            path: path.to_path_buf(),
            file,
            writable,
            creator,
            header,
            header_slot,
            regions,
            meta,
            bat,
            session_started: false,
            alloc_end: size.div_ceil(MIB) * MIB,
            session_guids: None,
            damaged,
        })
    }

    /// Scans the log; replays it when writable, refuses when read-only. Returns whether
    /// anything was replayed.
    fn replay_log(&mut self) -> Result<bool> {
        let size = io::file_len(&self.file, &self.path)?;
        let log_bytes = read_struct(
            &self.file,
            &self.path,
            size,
            Structure::LogEntry,
            self.header.log_offset,
            u64::from(self.header.log_length),
        )?;
        let replay = log::scan(&self.path, &log_bytes, self.header.log_guid)?;
        let Some(replay) = replay else {
            // LogGuid set but no valid entry: nothing to replay (MS-VHDX §2.3.3).
            if self.writable {
                self.write_header(Uuid::nil(), None)?;
            }
            return Ok(false);
        };
        if !self.writable {
            return Err(VhdxError::DirtyLog {
                file: self.path.clone(),
            });
        }
        if size < replay.flushed_file_offset {
            return Err(VhdxError::BadLog {
                file: self.path.clone(),
                reason: format!(
                    "file is {size} bytes, the log says {} were flushed",
                    replay.flushed_file_offset
                ),
            });
        }
        let log_region = Region {
            offset: self.header.log_offset,
            length: u64::from(self.header.log_length),
        };
        for op in &replay.ops {
            let (offset, len) = match op {
                log::LogOp::Data { offset, bytes } => (*offset, bytes.len() as u64),
                log::LogOp::Zero { offset, len } => (*offset, *len),
            };
            if offset < MIB
                || region::overlaps(
                    Region {
                        offset,
                        length: len,
                    },
                    log_region,
                )
            {
                return Err(VhdxError::BadLog {
                    file: self.path.clone(),
                    reason: format!("entry writes [{offset}, +{len}) over the headers or the log"),
                });
            }
        }
        for op in &replay.ops {
            match op {
                log::LogOp::Data { offset, bytes } => {
                    io::write_all_at(&self.file, &self.path, bytes, *offset)?
                }
                log::LogOp::Zero { offset, len } => {
                    let zeros = vec![0u8; MIB as usize];
                    let mut done = 0;
                    while done < *len {
                        let n = (*len - done).min(MIB);
                        io::write_all_at(
                            &self.file,
                            &self.path,
                            zeros.get(..n as usize).unwrap_or_default(),
                            offset + done,
                        )?;
                        done += n;
                    }
                }
            }
        }
        let now = io::file_len(&self.file, &self.path)?;
        if now < replay.last_file_offset {
            io::set_len(&self.file, &self.path, replay.last_file_offset)?;
        }
        io::sync_data(&self.file, &self.path)?;
        // The log is applied: clear LogGuid so nobody replays it again.
        self.write_header(Uuid::nil(), None)?;
        Ok(true)
    }

    /// Writes a new current header into the other slot with sequence + 1 and flushes.
    fn write_header(&mut self, log_guid: Uuid, guids: Option<(Uuid, Uuid)>) -> Result<()> {
        let mut h = self.header;
        h.sequence_number = h.sequence_number.wrapping_add(1);
        h.log_guid = log_guid;
        if let Some((fw, dw)) = guids {
            h.file_write_guid = fw;
            h.data_write_guid = dw;
        }
        let slot = 1 - self.header_slot;
        let offset = HEADER_OFFSETS
            .get(slot)
            .copied()
            .unwrap_or(HEADER_OFFSETS[0]);
        io::write_all_at(&self.file, &self.path, &h.to_block(), offset)?;
        io::sync_data(&self.file, &self.path)?;
        self.header = h;
        self.header_slot = slot;
        Ok(())
    }

    /// Checks every BAT entry (MS-VHDX §2.5.1): states, offsets inside the file and past
    /// the first MiB, no block overlapping another block or a region.
    fn validate_bat(&self) -> Result<()> {
        let size = io::file_len(&self.file, &self.path)?;
        let cr = self.meta.chunk_ratio();
        let bs = u64::from(self.meta.block_size);
        let bad = |index: u64, reason: String| VhdxError::BadBatEntry {
            file: self.path.clone(),
            index,
            reason,
        };
        let mut used: Vec<(u64, u64, u64)> = Vec::new();
        for (index, &e) in self.bat.iter().enumerate() {
            let index = index as u64;
            let state = bat::state(e);
            let off = bat::offset(e);
            let len = if bat::is_bitmap_index(index, cr) {
                match state {
                    bat::NOT_PRESENT => continue,
                    bat::SB_PRESENT => MIB,
                    s => return Err(bad(index, format!("sector bitmap state {s}"))),
                }
            } else {
                let block = index - index / (cr + 1);
                if block >= self.meta.data_blocks() {
                    continue;
                }
                match state {
                    bat::NOT_PRESENT | bat::UNDEFINED | bat::ZERO | bat::UNMAPPED => continue,
                    bat::FULLY_PRESENT => {}
                    bat::PARTIALLY_PRESENT if self.meta.has_parent => {
                        let sb = self
                            .bat
                            .get(bat::bitmap_index(block / cr, cr) as usize)
                            .copied()
                            .unwrap_or(0);
                        if bat::state(sb) != bat::SB_PRESENT {
                            return Err(bad(
                                index,
                                "partially present block without a sector bitmap block".into(),
                            ));
                        }
                    }
                    bat::PARTIALLY_PRESENT => {
                        return Err(bad(
                            index,
                            "partially present block in a disk without a parent".into(),
                        ))
                    }
                    s => return Err(bad(index, format!("reserved payload state {s}"))),
                }
                bs.min(self.meta.virtual_size - block * bs)
            };
            if off < MIB {
                return Err(bad(
                    index,
                    format!("block at offset {off}, inside the first MiB"),
                ));
            }
            if off.saturating_add(len) > size {
                return Err(VhdxError::BatPastEnd {
                    file: self.path.clone(),
                    index,
                    offset: off,
                    file_size: size,
                });
            }
            used.push((off, len, index));
        }
        used.push((self.regions.bat.offset, self.regions.bat.length, u64::MAX));
        used.push((
            self.regions.metadata.offset,
            self.regions.metadata.length,
            u64::MAX,
        ));
        if self.header.log_length > 0 {
            used.push((
                self.header.log_offset,
                u64::from(self.header.log_length),
                u64::MAX,
            ));
        }
        used.sort_unstable();
        for w in used.windows(2) {
            if let [(a_off, a_len, a_idx), (b_off, _, b_idx)] = w {
                if a_off + a_len > *b_off {
                    let index = if *b_idx == u64::MAX { *a_idx } else { *b_idx };
                    return Err(bad(
                        index,
                        format!("block at {b_off} overlaps another block or region at {a_off}"),
                    ));
                }
            }
        }
        Ok(())
    }

    /// The file's path.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Fixed, dynamic or differencing.
    pub fn disk_type(&self) -> DiskType {
        if self.meta.has_parent {
            DiskType::Differencing
        } else if self.meta.leave_blocks_allocated {
            DiskType::Fixed
        } else {
            DiskType::Dynamic
        }
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.meta.virtual_size
    }

    /// Payload block size in bytes.
    pub fn block_size(&self) -> u32 {
        self.meta.block_size
    }

    /// Logical sector size (512 or 4096).
    pub fn logical_sector_size(&self) -> u32 {
        self.meta.logical_sector_size
    }

    /// Physical sector size (512 or 4096).
    pub fn physical_sector_size(&self) -> u32 {
        self.meta.physical_sector_size
    }

    /// The current header's DataWriteGuid (what children's parent_linkage names).
    pub fn data_write_guid(&self) -> Uuid {
        self.header.data_write_guid
    }

    /// The current header's FileWriteGuid.
    pub fn file_write_guid(&self) -> Uuid {
        self.header.file_write_guid
    }

    /// The page 83 identifier.
    pub fn page83(&self) -> Uuid {
        self.meta.page83
    }

    /// The creator string of the file type identifier.
    pub fn creator(&self) -> &str {
        &self.creator
    }

    /// The parent locator of a differencing disk.
    pub fn parent_locator(&self) -> Option<&ParentLocator> {
        self.meta.parent.as_ref()
    }

    /// The validated metadata.
    pub fn metadata(&self) -> &Metadata {
        &self.meta
    }

    /// Sequence number of the current header.
    pub fn header_sequence(&self) -> u64 {
        self.header.sequence_number
    }

    /// Whether the file was opened for writing.
    pub fn is_writable(&self) -> bool {
        self.writable
    }

    /// The state of payload block `block`.
    pub fn block_state(&self, block: u64) -> BlockState {
        let idx = bat::payload_index(block, self.meta.chunk_ratio());
        let e = self.bat.get(idx as usize).copied().unwrap_or(0);
        bat::decode_payload(e).unwrap_or(BlockState::NotPresent)
    }

    /// Bytes of payload and sector bitmap blocks allocated in the file.
    pub fn allocated_bytes(&self) -> u64 {
        let cr = self.meta.chunk_ratio();
        let bs = u64::from(self.meta.block_size);
        self.bat
            .iter()
            .enumerate()
            .map(|(i, &e)| {
                let state = bat::state(e);
                if bat::is_bitmap_index(i as u64, cr) {
                    if state == bat::SB_PRESENT {
                        MIB
                    } else {
                        0
                    }
                } else if state == bat::FULLY_PRESENT || state == bat::PARTIALLY_PRESENT {
                    bs
                } else {
                    0
                }
            })
            .sum()
    }

    pub(crate) fn file(&self) -> &File {
        &self.file
    }

    /// Sets the GUIDs the next write session will put in the header (for reproducible
    /// output); by default they are random.
    pub fn set_session_guids(&mut self, file_write_guid: Uuid, data_write_guid: Uuid) {
        self.session_guids = Some((file_write_guid, data_write_guid));
    }

    /// Resolves `[offset, offset + len)` of the virtual disk within this file alone into
    /// runs, appended to `out` as `(virtual_offset, len, piece)`.
    pub(crate) fn pieces(
        &self,
        offset: u64,
        len: u64,
        out: &mut Vec<(u64, u64, Piece)>,
    ) -> Result<()> {
        let bs = u64::from(self.meta.block_size);
        let lss = u64::from(self.meta.logical_sector_size);
        let cr = self.meta.chunk_ratio();
        let diff = self.meta.has_parent;
        let mut pos = offset;
        let end = offset + len;
        while pos < end {
            let block = pos / bs;
            let in_block = pos % bs;
            let n = (bs - in_block).min(end - pos);
            match self.block_state(block) {
                BlockState::FullyPresent(fo) => push(out, pos, n, Piece::Here(fo + in_block)),
                BlockState::NotPresent | BlockState::Undefined => {
                    push(out, pos, n, if diff { Piece::Parent } else { Piece::Zero })
                }
                BlockState::Zero | BlockState::Unmapped => push(out, pos, n, Piece::Zero),
                BlockState::PartiallyPresent(fo) => {
                    let sb = self
                        .bat
                        .get(bat::bitmap_index(block / cr, cr) as usize)
                        .copied()
                        .unwrap_or(0);
                    let sb_off = bat::offset(sb);
                    // Sector numbers relative to the chunk's bitmap block.
                    let first = pos / lss;
                    let last = (pos + n).div_ceil(lss);
                    let chunk_first = (block / cr) * cr * bs / lss;
                    let (b0, b1) = (first - chunk_first, last - chunk_first);
                    let byte0 = b0 / 8;
                    let mut bits = vec![0u8; (b1.div_ceil(8) - byte0) as usize];
                    io::read_exact_at(&self.file, &self.path, &mut bits, sb_off + byte0)?;
                    let mut s = b0;
                    while s < b1 {
                        let present = bit(&bits, s - byte0 * 8);
                        let mut t = s + 1;
                        while t < b1 && bit(&bits, t - byte0 * 8) == present {
                            t += 1;
                        }
                        let v0 = ((chunk_first + s) * lss).max(pos);
                        let v1 = ((chunk_first + t) * lss).min(pos + n);
                        let piece = if present {
                            Piece::Here(fo + (v0 - block * bs))
                        } else {
                            Piece::Parent
                        };
                        push(out, v0, v1 - v0, piece);
                        s = t;
                    }
                }
            }
            pos += n;
        }
        Ok(())
    }

    fn check_writable(&self) -> Result<()> {
        if self.writable {
            Ok(())
        } else {
            Err(VhdxError::ReadOnly {
                file: self.path.clone(),
            })
        }
    }

    /// Starts a write session: new FileWriteGuid and DataWriteGuid in a new header
    /// (MS-VHDX §2.2.2.1), flushed before any other write.
    fn begin_write(&mut self) -> Result<()> {
        if self.session_started {
            return Ok(());
        }
        let guids = self
            .session_guids
            .unwrap_or_else(|| (Uuid::new_v4(), Uuid::new_v4()));
        self.write_header(Uuid::nil(), Some(guids))?;
        self.session_started = true;
        Ok(())
    }

    fn allocate(&mut self, len: u64) -> Result<u64> {
        let at = self.alloc_end;
        let end = at
            .checked_add(len)
            .ok_or_else(|| VhdxError::InvalidArgument {
                file: self.path.clone(),
                reason: "file offset overflow".into(),
            })?;
        io::set_len(&self.file, &self.path, end)?;
        self.alloc_end = end;
        Ok(at)
    }

    fn set_bat(&mut self, index: u64, entry: u64) -> Result<()> {
        let slot = self
            .bat
            .get_mut(index as usize)
            .ok_or_else(|| VhdxError::BadBatEntry {
                file: self.path.clone(),
                index,
                reason: "index past the BAT".into(),
            })?;
        *slot = entry;
        io::write_all_at(
            &self.file,
            &self.path,
            &entry.to_le_bytes(),
            self.regions.bat.offset + index * 8,
        )
    }

    /// Writes whole logical sectors at a sector-aligned virtual offset into this file.
    /// New blocks are written and flushed before the BAT entry that makes them visible.
    pub(crate) fn write_sectors(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.check_writable()?;
        let lss = u64::from(self.meta.logical_sector_size);
        let len = buf.len() as u64;
        if !offset.is_multiple_of(lss) || !len.is_multiple_of(lss) {
            return Err(VhdxError::InvalidArgument {
                file: self.path.clone(),
                reason: "unaligned sector write".into(),
            });
        }
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.meta.virtual_size)
        {
            return Err(VhdxError::OutOfRange {
                file: self.path.clone(),
                offset,
                len,
                virtual_size: self.meta.virtual_size,
            });
        }
        if len == 0 {
            return Ok(());
        }
        self.begin_write()?;
        let bs = u64::from(self.meta.block_size);
        let cr = self.meta.chunk_ratio();
        let mut pos = offset;
        while pos < offset + len {
            let block = pos / bs;
            let in_block = pos % bs;
            let block_len = bs.min(self.meta.virtual_size - block * bs);
            let n = (block_len - in_block).min(offset + len - pos);
            let data = buf
                .get((pos - offset) as usize..(pos - offset + n) as usize)
                .unwrap_or_default();
            let pidx = bat::payload_index(block, cr);
            match self.block_state(block) {
                BlockState::FullyPresent(fo) => {
                    io::write_all_at(&self.file, &self.path, data, fo + in_block)?
                }
                BlockState::PartiallyPresent(fo) => {
                    io::write_all_at(&self.file, &self.path, data, fo + in_block)?;
                    io::sync_data(&self.file, &self.path)?;
                    self.set_bitmap_bits(block, in_block, n, None)?;
                }
                state => {
                    let whole = in_block == 0 && n == block_len;
                    // Differencing: a partial write into a block the parent supplies keeps
                    // the rest coming from the parent, through the sector bitmap.
                    let partial = self.meta.has_parent
                        && !whole
                        && matches!(state, BlockState::NotPresent | BlockState::Undefined);
                    let fo = self.allocate(bs)?;
                    io::write_all_at(&self.file, &self.path, data, fo + in_block)?;
                    if partial {
                        self.set_bitmap_bits(block, in_block, n, Some(block_len))?;
                        io::sync_data(&self.file, &self.path)?;
                        self.set_bat(pidx, bat::entry(bat::PARTIALLY_PRESENT, fo))?;
                    } else {
                        io::sync_data(&self.file, &self.path)?;
                        self.set_bat(pidx, bat::entry(bat::FULLY_PRESENT, fo))?;
                    }
                    io::sync_data(&self.file, &self.path)?;
                }
            }
            pos += n;
        }
        Ok(())
    }

    /// Sets the bitmap bits of `[in_block, +n)` of `block`. With `fresh = Some(block_len)`
    /// the block's whole bitmap range is rewritten (clearing stale bits of an earlier
    /// allocation) first. Allocates the chunk's bitmap block when needed; the bitmap data
    /// is flushed before the BAT entry that makes a new bitmap block visible.
    fn set_bitmap_bits(
        &mut self,
        block: u64,
        in_block: u64,
        n: u64,
        fresh: Option<u64>,
    ) -> Result<()> {
        let bs = u64::from(self.meta.block_size);
        let lss = u64::from(self.meta.logical_sector_size);
        let cr = self.meta.chunk_ratio();
        let sidx = bat::bitmap_index(block / cr, cr);
        let sb = self.bat.get(sidx as usize).copied().unwrap_or(0);
        let (sb_off, new_sb) = if bat::state(sb) == bat::SB_PRESENT {
            (bat::offset(sb), false)
        } else {
            (self.allocate(MIB)?, true)
        };
        let block_first = (block % cr) * bs / lss;
        let (r0, r1) = match fresh {
            Some(block_len) => (block_first, block_first + block_len.div_ceil(lss)),
            None => (
                block_first + in_block / lss,
                block_first + (in_block + n) / lss,
            ),
        };
        let byte0 = r0 / 8;
        let byte1 = r1.div_ceil(8);
        let mut bits = vec![0u8; (byte1 - byte0) as usize];
        io::read_exact_at(&self.file, &self.path, &mut bits, sb_off + byte0)?;
        if fresh.is_some() {
            for s in r0..r1 {
                set_bit(&mut bits, s - byte0 * 8, false);
            }
        }
        let (w0, w1) = (
            block_first + in_block / lss,
            block_first + (in_block + n) / lss,
        );
        for s in w0..w1 {
            set_bit(&mut bits, s - byte0 * 8, true);
        }
        io::write_all_at(&self.file, &self.path, &bits, sb_off + byte0)?;
        if new_sb {
            io::sync_data(&self.file, &self.path)?;
            self.set_bat(sidx, bat::entry(bat::SB_PRESENT, sb_off))?;
        }
        Ok(())
    }

    /// Flushes all writes to stable storage.
    pub fn flush(&self) -> Result<()> {
        io::sync_data(&self.file, &self.path)
    }

    /// Checks every structure; returns the first fault. Opening already validates the
    /// current header, a region table, the metadata and the whole BAT; this also reports a
    /// damaged redundant copy (the other header or region table), which does not stop
    /// reading but means the file has lost its protection against a torn update.
    pub fn check(&self) -> Result<()> {
        self.validate_bat()?;
        match &self.damaged {
            Some(VhdxError::DamagedCopy { file, reason }) => Err(VhdxError::DamagedCopy {
                file: file.clone(),
                reason: reason.clone(),
            }),
            _ => Ok(()),
        }
    }
}

fn push(out: &mut Vec<(u64, u64, Piece)>, voff: u64, len: u64, piece: Piece) {
    if len == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        let contiguous = match (last.2, piece) {
            (Piece::Here(a), Piece::Here(b)) => a + last.1 == b,
            (Piece::Zero, Piece::Zero) | (Piece::Parent, Piece::Parent) => true,
            _ => false,
        };
        if contiguous && last.0 + last.1 == voff {
            last.1 += len;
            return;
        }
    }
    out.push((voff, len, piece));
}

fn bit(bits: &[u8], i: u64) -> bool {
    bits.get((i / 8) as usize)
        .is_some_and(|b| b >> (i % 8) & 1 == 1)
}

fn set_bit(bits: &mut [u8], i: u64, on: bool) {
    if let Some(b) = bits.get_mut((i / 8) as usize) {
        if on {
            *b |= 1 << (i % 8);
        } else {
            *b &= !(1 << (i % 8));
        }
    }
}

/// Sectors per sector bitmap block (exposed for the builder).
pub(crate) const fn sectors_per_bitmap() -> u64 {
    SECTORS_PER_BITMAP
}
