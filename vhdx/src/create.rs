//! Creating VHDX files: empty fixed or dynamic disks, empty differencing disks on a chain,
//! and conversion of raw images (`from_raw`), plain or as a differencing disk holding only
//! the sectors that differ from the parent chain. Output is written to a temporary file
//! in the destination directory, flushed, and renamed into place, so a half-written file
//! is never visible under the destination name. With the GUIDs given in
//! [`CreateOptions`], output is byte-for-byte reproducible.

use std::collections::BTreeMap;
use std::fs::File;
use std::io::Read;
use std::path::{Path, PathBuf};

use uuid::Uuid;

use crate::bat;
use crate::chain::Chain;
use crate::error::{Result, VhdxError};
use crate::file::{sectors_per_bitmap, DiskType, Vhdx};
use crate::header::{self, Header, HEADER_OFFSETS};
use crate::io;
use crate::metadata::{self, Metadata, MAX_VIRTUAL_SIZE};
use crate::parent::{self, ParentLocator};
use crate::region::{self, Region, Regions, REGION_TABLE_OFFSETS};

const MIB: u64 = 1024 * 1024;
const LOG_OFFSET: u64 = MIB;
const LOG_LENGTH: u64 = MIB;
const METADATA_LENGTH: u64 = MIB;
/// Payload bytes are written in runs of this many; all-zero runs are left as holes.
const PAGE: usize = 4096;
static ZERO_PAGE: [u8; PAGE] = [0; PAGE];

/// True if `p` (at most a page) is all zeros (a memcmp against a zero page: vectorised).
fn is_zero(p: &[u8]) -> bool {
    ZERO_PAGE.get(..p.len()).is_some_and(|z| z == p)
}

/// Options for new files. `Default` gives a dynamic disk with 32 MiB blocks, 512-byte
/// logical and 4096-byte physical sectors and random GUIDs.
#[derive(Debug, Clone)]
pub struct CreateOptions {
    /// Fixed or dynamic (ignored for differencing output, which is always dynamic).
    pub disk_type: DiskType,
    /// Payload block size: a power of two from 1 MiB to 256 MiB.
    pub block_size: u32,
    /// 512 or 4096 (differencing output takes the parent's).
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// FileWriteGuid of the header; random when `None`.
    pub file_write_guid: Option<Uuid>,
    /// DataWriteGuid of the header (what children link to); random when `None`.
    pub data_write_guid: Option<Uuid>,
    /// Page 83 identifier; random when `None`.
    pub page83: Option<Uuid>,
    /// The `relative_path` written into a differencing disk's parent locator; by default
    /// the path from the output's directory to the parent file (Windows separators).
    pub parent_relative_path: Option<String>,
    /// Also record the parent's absolute path (`absolute_win32_path`, `\\` separators).
    /// Off by default: it makes the output depend on where the parent lives. libvhdi
    /// (20210425 and later) needs it: it never matches the `relative_path` key.
    pub record_absolute_parent_path: bool,
    /// The creator string of the file type identifier.
    pub creator: String,
    /// Reserve a 1 MiB log region (the default). Without one the file is 1 MiB smaller:
    /// the header's LogLength is 0 (MS-VHDX §2.2.2 allows it; qemu-img and libvhdi read
    /// such files). This crate orders its writes instead of logging them, so it can still
    /// write the file; writers that log metadata updates (qemu, Hyper-V) cannot. Meant
    /// for immutable layers.
    pub log: bool,
    /// Differencing output only: store every block holding a changed sector as a fully
    /// present block (the parent's sectors copied into the rest of it) instead of a
    /// partially present block plus a 1 MiB sector bitmap block per chunk. Payload blocks
    /// cost their whole size in the file either way, so this makes the file smaller by the
    /// bitmap blocks; holes keep the unchanged all-zero pages from using disk space.
    pub whole_blocks: bool,
    /// Flush the new file and its directory before returning (the default). A caller that
    /// publishes the file itself, flushing it then (a batch of layers, say), turns it off.
    pub sync: bool,
}

impl Default for CreateOptions {
    fn default() -> Self {
        Self {
            disk_type: DiskType::Dynamic,
            block_size: 32 * MIB as u32,
            logical_sector_size: 512,
            physical_sector_size: 4096,
            file_write_guid: None,
            data_write_guid: None,
            page83: None,
            parent_relative_path: None,
            record_absolute_parent_path: false,
            creator: "strata vhdx".to_string(),
            log: true,
            whole_blocks: false,
            sync: true,
        }
    }
}

impl CreateOptions {
    /// Options with every GUID fixed, for reproducible output.
    pub fn deterministic(file_write_guid: Uuid, data_write_guid: Uuid, page83: Uuid) -> Self {
        Self {
            file_write_guid: Some(file_write_guid),
            data_write_guid: Some(data_write_guid),
            page83: Some(page83),
            ..Self::default()
        }
    }
}

/// What a conversion wrote.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct ConvertStats {
    /// Payload blocks allocated.
    pub blocks: u64,
    /// Of which partially present (differencing).
    pub partial_blocks: u64,
    /// Logical sectors stored in the file.
    pub sectors: u64,
    /// Size of the output file.
    pub file_size: u64,
}

/// A file being built in one pass: layout fixed up front, BAT and bitmaps kept in memory
/// and written at the end.
struct Builder {
    path: PathBuf,
    file: File,
    meta: Metadata,
    header: Header,
    creator: String,
    bat: Vec<u64>,
    bitmaps: BTreeMap<u64, Vec<u8>>,
    metadata_offset: u64,
    bat_offset: u64,
    sync: bool,
    end: u64,
    stats: ConvertStats,
}

impl Builder {
    fn new(path: &Path, file: File, meta: Metadata, opts: &CreateOptions) -> Result<Builder> {
        meta.validate(path)?;
        let entries = meta.bitmap_blocks() * (meta.chunk_ratio() + 1);
        let bat_len = (entries * 8).div_ceil(MIB).max(1) * MIB;
        // Layout: headers in the first MiB, then the log (if any), the metadata region and
        // the BAT, each a whole number of MiB (MS-VHDX §2.2, §2.3), then payload.
        let log_length = if opts.log { LOG_LENGTH } else { 0 };
        let metadata_offset = LOG_OFFSET + log_length;
        let bat_offset = metadata_offset + METADATA_LENGTH;
        let header = Header {
            sequence_number: 1,
            file_write_guid: opts.file_write_guid.unwrap_or_else(Uuid::new_v4),
            data_write_guid: opts.data_write_guid.unwrap_or_else(Uuid::new_v4),
            log_guid: Uuid::nil(),
            // With no log, LogOffset still names a 1 MiB multiple of at least 1 MiB.
            log_offset: LOG_OFFSET,
            log_length: log_length as u32,
        };
        Ok(Builder {
            path: path.to_path_buf(),
            file,
            meta,
            header,
            creator: opts.creator.clone(),
            bat: vec![0; entries as usize],
            bitmaps: BTreeMap::new(),
            metadata_offset,
            bat_offset,
            sync: opts.sync,
            end: bat_offset + bat_len,
            stats: ConvertStats::default(),
        })
    }

    fn block_len(&self, block: u64) -> u64 {
        let bs = u64::from(self.meta.block_size);
        bs.min(self.meta.virtual_size - block * bs)
    }

    /// Stores a whole block (`data` is the block's bytes within the virtual disk).
    fn put_full(&mut self, block: u64, data: &[u8]) -> Result<()> {
        let at = self.end;
        self.write_sparse(data, at)?;
        self.end += u64::from(self.meta.block_size);
        let idx = bat::payload_index(block, self.meta.chunk_ratio()) as usize;
        if let Some(e) = self.bat.get_mut(idx) {
            *e = bat::entry(bat::FULLY_PRESENT, at);
        }
        self.stats.blocks += 1;
        self.stats.sectors += data.len() as u64 / u64::from(self.meta.logical_sector_size);
        Ok(())
    }

    /// Writes `data` at `at`, leaving its all-zero pages out: the file is new, so pages not
    /// written read as zeros and stay holes.
    fn write_sparse(&self, data: &[u8], at: u64) -> Result<()> {
        let mut page = 0;
        while page < data.len() {
            let run_start = page;
            while page < data.len()
                && data
                    .get(page..(page + PAGE).min(data.len()))
                    .is_some_and(|p| !is_zero(p))
            {
                page += PAGE;
            }
            if page > run_start {
                let run = data
                    .get(run_start..page.min(data.len()))
                    .unwrap_or_default();
                io::write_all_at(&self.file, &self.path, run, at + run_start as u64)?;
            } else {
                page += PAGE;
            }
        }
        Ok(())
    }

    /// Stores the sectors of `data` flagged in `present` as a partially present block.
    fn put_partial(&mut self, block: u64, data: &[u8], present: &[bool]) -> Result<()> {
        let lss = u64::from(self.meta.logical_sector_size);
        let at = self.end;
        let mut s = 0;
        while s < present.len() {
            if !present.get(s).copied().unwrap_or(false) {
                s += 1;
                continue;
            }
            let mut t = s;
            while present.get(t).copied().unwrap_or(false) {
                t += 1;
            }
            let (a, b) = (s * lss as usize, t * lss as usize);
            io::write_all_at(
                &self.file,
                &self.path,
                data.get(a..b).unwrap_or_default(),
                at + a as u64,
            )?;
            s = t;
        }
        self.end += u64::from(self.meta.block_size);
        let cr = self.meta.chunk_ratio();
        let idx = bat::payload_index(block, cr) as usize;
        if let Some(e) = self.bat.get_mut(idx) {
            *e = bat::entry(bat::PARTIALLY_PRESENT, at);
        }
        let bitmap = self
            .bitmaps
            .entry(block / cr)
            .or_insert_with(|| vec![0u8; MIB as usize]);
        let first = (block % cr) * u64::from(self.meta.block_size) / lss;
        for (i, &p) in present.iter().enumerate() {
            if p {
                let bit = first + i as u64;
                if let Some(b) = bitmap.get_mut((bit / 8) as usize) {
                    *b |= 1 << (bit % 8);
                }
            }
        }
        self.stats.blocks += 1;
        self.stats.partial_blocks += 1;
        self.stats.sectors += present.iter().filter(|&&p| p).count() as u64;
        Ok(())
    }

    /// Stores the sectors of `data` (block `block` of the new disk) that differ from
    /// `parent`: nothing if none differ, a fully present block if all differ or if
    /// `whole`, else a partially present block. `scratch` is a buffer for the parent's
    /// bytes.
    fn put_diff(
        &mut self,
        parent: &Chain,
        block: u64,
        data: &[u8],
        scratch: &mut Vec<u8>,
        whole: bool,
    ) -> Result<()> {
        let lss = self.meta.logical_sector_size as usize;
        scratch.resize(data.len(), 0);
        let pb = scratch.get_mut(..data.len()).unwrap_or_default();
        parent.read_at(pb, block * u64::from(self.meta.block_size))?;
        let present: Vec<bool> = data
            .chunks(lss)
            .zip(pb.chunks(lss))
            .map(|(a, c)| a != c)
            .collect();
        let count = present.iter().filter(|&&x| x).count();
        if count == present.len() || (count > 0 && whole) {
            self.put_full(block, data)?;
        } else if count > 0 {
            self.put_partial(block, data, &present)?;
        }
        Ok(())
    }

    /// Writes bitmaps, BAT, metadata, region tables, headers and the file identifier.
    fn finish(mut self) -> Result<(File, ConvertStats)> {
        let cr = self.meta.chunk_ratio();
        let bitmaps = std::mem::take(&mut self.bitmaps);
        debug_assert!(
            sectors_per_bitmap()
                == cr * u64::from(self.meta.block_size) / u64::from(self.meta.logical_sector_size)
        );
        for (chunk, bits) in bitmaps {
            let at = self.end;
            self.write_sparse(&bits, at)?;
            self.end += MIB;
            if let Some(e) = self.bat.get_mut(bat::bitmap_index(chunk, cr) as usize) {
                *e = bat::entry(bat::SB_PRESENT, at);
            }
        }
        io::set_len(&self.file, &self.path, self.end)?;
        let bat_bytes: Vec<u8> = self.bat.iter().flat_map(|e| e.to_le_bytes()).collect();
        let bat_len = (bat_bytes.len() as u64).div_ceil(MIB).max(1) * MIB;
        self.write_sparse(&bat_bytes, self.bat_offset)?;
        let md = metadata::to_region(&self.meta, METADATA_LENGTH as usize);
        self.write_sparse(&md, self.metadata_offset)?;
        let regions = Regions {
            bat: Region {
                offset: self.bat_offset,
                length: bat_len,
            },
            metadata: Region {
                offset: self.metadata_offset,
                length: METADATA_LENGTH,
            },
        };
        let rt = region::to_block(&regions);
        for off in REGION_TABLE_OFFSETS {
            self.write_sparse(&rt, off)?;
        }
        let h1 = self.header.to_block();
        let mut second = self.header;
        second.sequence_number += 1;
        let h2 = second.to_block();
        self.write_sparse(&h1, HEADER_OFFSETS[0])?;
        self.write_sparse(&h2, HEADER_OFFSETS[1])?;
        self.write_sparse(&header::file_identifier_block(&self.creator), 0)?;
        if self.sync {
            self.file.sync_all().map_err(|source| VhdxError::Write {
                file: self.path.clone(),
                offset: 0,
                source,
            })?;
        }
        self.stats.file_size = self.end;
        Ok((self.file, self.stats))
    }
}

/// Writes a file through a temporary in the destination's directory and renames it into
/// place once complete (and flushed, with the directory, if `sync`). The temporary is
/// removed on error.
pub(crate) fn atomic_write<T>(
    out: &Path,
    sync: bool,
    body: impl FnOnce(&Path, File) -> Result<T>,
) -> Result<T> {
    let dir = match out.parent() {
        Some(d) if !d.as_os_str().is_empty() => d.to_path_buf(),
        _ => PathBuf::from("."),
    };
    let name = out
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let tmp = tempfile::Builder::new()
        .prefix(&format!(".{name}."))
        .suffix(".tmp")
        .tempfile_in(&dir)
        .map_err(|source| VhdxError::Open {
            file: dir.join(&name),
            source,
        })?;
    let file = tmp
        .as_file()
        .try_clone()
        .map_err(|source| VhdxError::Open {
            file: tmp.path().to_path_buf(),
            source,
        })?;
    let value = body(out, file)?;
    tmp.persist(out).map_err(|e| VhdxError::Write {
        file: out.to_path_buf(),
        offset: 0,
        source: e.error,
    })?;
    if sync {
        if let Ok(d) = File::open(&dir) {
            let _ = d.sync_all();
        }
    }
    Ok(value)
}

fn new_metadata(
    path: &Path,
    virtual_size: u64,
    opts: &CreateOptions,
    parent: Option<ParentLocator>,
) -> Result<Metadata> {
    let lss = u64::from(opts.logical_sector_size);
    if virtual_size == 0
        || virtual_size > MAX_VIRTUAL_SIZE
        || lss == 0
        || !virtual_size.is_multiple_of(lss)
    {
        return Err(VhdxError::InvalidArgument {
            file: path.to_path_buf(),
            reason: format!(
                "virtual size {virtual_size} must be a non-zero multiple of {lss} up to 64 TiB"
            ),
        });
    }
    let meta = Metadata {
        block_size: opts.block_size,
        leave_blocks_allocated: parent.is_none() && opts.disk_type == DiskType::Fixed,
        has_parent: parent.is_some(),
        virtual_size,
        logical_sector_size: opts.logical_sector_size,
        physical_sector_size: opts.physical_sector_size,
        page83: opts.page83.unwrap_or_else(Uuid::new_v4),
        parent,
    };
    meta.validate(path)
        .map_err(|e| VhdxError::InvalidArgument {
            file: path.to_path_buf(),
            reason: e.to_string(),
        })?;
    Ok(meta)
}

/// The options (the parent's sector size) and metadata of a differencing disk at `out` on the
/// top of `parent`.
fn differencing_metadata(
    out: &Path,
    parent: &Chain,
    opts: &CreateOptions,
) -> Result<(CreateOptions, Metadata)> {
    let mut o = opts.clone();
    o.logical_sector_size = parent.logical_sector_size();
    let meta = new_metadata(
        out,
        parent.virtual_size(),
        &o,
        Some(locator_for(out, parent, opts)),
    )?;
    Ok((o, meta))
}

fn locator_for(out: &Path, parent: &Chain, opts: &CreateOptions) -> ParentLocator {
    let parent_path = parent.top().path();
    let abs_parent = std::path::absolute(parent_path).unwrap_or_else(|_| parent_path.to_path_buf());
    let abs_out = std::path::absolute(out).unwrap_or_else(|_| out.to_path_buf());
    let out_dir = abs_out.parent().unwrap_or(Path::new("/"));
    let relative = opts
        .parent_relative_path
        .clone()
        .or_else(|| parent::relative_win_path(out_dir, &abs_parent));
    let absolute = opts
        .record_absolute_parent_path
        .then(|| parent::host_to_win(&abs_parent));
    ParentLocator::new(parent.top().data_write_guid(), relative, absolute)
}

/// Creates an empty fixed or dynamic disk of `virtual_size` bytes and opens it writable.
pub fn create(out: &Path, virtual_size: u64, opts: &CreateOptions) -> Result<Vhdx> {
    let meta = new_metadata(out, virtual_size, opts, None)?;
    atomic_write(out, opts.sync, |path, file| {
        let mut b = Builder::new(path, file, meta, opts)?;
        if opts.disk_type == DiskType::Fixed {
            for block in 0..b.meta.data_blocks() {
                let at = b.end;
                b.end += u64::from(b.meta.block_size);
                let idx = bat::payload_index(block, b.meta.chunk_ratio()) as usize;
                if let Some(e) = b.bat.get_mut(idx) {
                    *e = bat::entry(bat::FULLY_PRESENT, at);
                }
            }
        }
        b.finish()
    })?;
    Vhdx::open_writable(out)
}

/// Creates an empty differencing disk whose parent is the top of `parent`, and opens it
/// writable.
pub fn create_differencing(out: &Path, parent: &Chain, opts: &CreateOptions) -> Result<Vhdx> {
    let (o, meta) = differencing_metadata(out, parent, opts)?;
    atomic_write(out, o.sync, |path, file| {
        Builder::new(path, file, meta, &o)?.finish()
    })?;
    Vhdx::open_writable(out)
}

/// Converts the raw image at `raw` into a VHDX at `out` (see [`from_raw_reader`]).
pub fn from_raw(
    raw: &Path,
    out: &Path,
    parent: Option<&Chain>,
    opts: &CreateOptions,
) -> Result<ConvertStats> {
    let f = File::open(raw).map_err(|source| VhdxError::Open {
        file: raw.to_path_buf(),
        source,
    })?;
    let len = io::file_len(&f, raw)?;
    from_raw_reader(f, len, out, parent, opts).map_err(|e| match e {
        VhdxError::Read {
            file,
            offset,
            len,
            source,
        } if file.as_os_str() == "<raw input>" => VhdxError::Read {
            file: raw.to_path_buf(),
            offset,
            len,
            source,
        },
        e => e,
    })
}

/// Converts `len` bytes of raw disk image from `reader` into a VHDX at `out`. Without a
/// parent: a dynamic (or fixed) disk; all-zero blocks of a dynamic disk are left
/// unallocated. With a parent: a differencing disk on the parent's top holding only the
/// sectors where the raw image differs from the parent chain; `len` rounded up to whole
/// sectors must equal the parent's virtual size. A trailing partial sector is padded
/// with zeros.
pub fn from_raw_reader(
    mut reader: impl Read,
    len: u64,
    out: &Path,
    parent: Option<&Chain>,
    opts: &CreateOptions,
) -> Result<ConvertStats> {
    let mut o = opts.clone();
    if let Some(p) = parent {
        o.logical_sector_size = p.logical_sector_size();
    }
    let lss = u64::from(o.logical_sector_size);
    let virtual_size = len.div_ceil(lss.max(1)) * lss;
    let locator = parent.map(|p| locator_for(out, p, opts));
    if let Some(p) = parent {
        if virtual_size != p.virtual_size() {
            return Err(VhdxError::InvalidArgument {
                file: out.to_path_buf(),
                reason: format!(
                    "raw image is {len} bytes, the parent's virtual disk {} bytes",
                    p.virtual_size()
                ),
            });
        }
    }
    let meta = new_metadata(out, virtual_size, &o, locator)?;
    atomic_write(out, o.sync, |path, file| {
        let mut b = Builder::new(path, file, meta, &o)?;
        let bs = u64::from(o.block_size);
        let mut data = vec![0u8; bs as usize];
        let mut base = Vec::new();
        let fixed = parent.is_none() && o.disk_type == DiskType::Fixed;
        for block in 0..b.meta.data_blocks() {
            let blen = b.block_len(block);
            let buf = data.get_mut(..blen as usize).unwrap_or_default();
            let want = (len - (block * bs).min(len)).min(blen);
            read_full(
                &mut reader,
                buf.get_mut(..want as usize).unwrap_or_default(),
                block * bs,
            )?;
            buf.get_mut(want as usize..).unwrap_or_default().fill(0);
            let buf = data.get(..blen as usize).unwrap_or_default();
            match parent {
                None if fixed => b.put_full(block, buf)?,
                None => {
                    if buf.iter().any(|&x| x != 0) {
                        b.put_full(block, buf)?;
                    }
                }
                Some(p) => b.put_diff(p, block, buf, &mut base, o.whole_blocks)?,
            }
        }
        let (_, stats) = b.finish()?;
        Ok(stats)
    })
}

fn read_full(reader: &mut impl Read, buf: &mut [u8], offset: u64) -> Result<()> {
    reader.read_exact(buf).map_err(|source| VhdxError::Read {
        file: PathBuf::from("<raw input>"),
        offset,
        len: buf.len() as u64,
        source,
    })
}

/// Writes a differencing disk at `out` on the top of `parent` from the blocks that changed:
/// each item is a block index (in units of `opts.block_size`) and the block's bytes as the
/// new virtual disk holds them (the whole block; only the disk's last block may be
/// shorter), in strictly increasing block order. Blocks not given come from the parent.
/// A given block is compared with the parent sector by sector and stored as
/// [`from_raw`] would store it, so for the same content and options both give the same
/// bytes; but only the given blocks are read, of the input and of the parent chain, which
/// makes small layers on large disks cheap.
pub fn differencing_from_blocks<B: AsRef<[u8]>>(
    out: &Path,
    parent: &Chain,
    opts: &CreateOptions,
    blocks: impl IntoIterator<Item = (u64, B)>,
) -> Result<ConvertStats> {
    let (o, meta) = differencing_metadata(out, parent, opts)?;
    let bad = |reason: String| VhdxError::InvalidArgument {
        file: out.to_path_buf(),
        reason,
    };
    atomic_write(out, o.sync, |path, file| {
        let mut b = Builder::new(path, file, meta, &o)?;
        let mut scratch = Vec::new();
        let mut next = 0u64;
        for (block, data) in blocks {
            let data = data.as_ref();
            if block < next {
                return Err(bad(format!(
                    "block {block} given out of order (blocks must increase)"
                )));
            }
            if block >= b.meta.data_blocks() {
                return Err(bad(format!(
                    "block {block} past the disk's {} blocks",
                    b.meta.data_blocks()
                )));
            }
            let blen = b.block_len(block);
            if data.len() as u64 != blen {
                return Err(bad(format!(
                    "block {block} given as {} bytes, the block is {blen}",
                    data.len()
                )));
            }
            b.put_diff(parent, block, data, &mut scratch, o.whole_blocks)?;
            next = block + 1;
        }
        let (_, stats) = b.finish()?;
        Ok(stats)
    })
}
