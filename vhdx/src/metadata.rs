//! The metadata region (MS-VHDX §2.6): the metadata table and the known items (file
//! parameters, virtual disk size, page 83 data, logical and physical sector size, parent
//! locator). Item offsets and lengths are bounded by the region before use.

use std::io::Cursor;
use std::path::Path;

use binrw::{binrw, BinRead, BinWrite};
use uuid::Uuid;

use crate::error::{MetadataItem, Result, Structure, VhdxError};
use crate::guid;
use crate::parent::ParentLocator;

/// Size of the metadata table at the start of the region.
pub(crate) const TABLE_SIZE: usize = 64 * 1024;
const MAX_ENTRIES: u16 = 2047;
const MIB: u64 = 1024 * 1024;
/// Largest virtual disk the spec allows (64 TiB).
pub const MAX_VIRTUAL_SIZE: u64 = 64 * 1024 * 1024 * MIB;

const FILE_PARAMETERS: Uuid = guid::constant((
    0xCAA1_6737,
    0xFA36,
    0x4D43,
    [0xB3, 0xB6, 0x33, 0xF0, 0xAA, 0x44, 0xE7, 0x6B],
));
const VIRTUAL_DISK_SIZE: Uuid = guid::constant((
    0x2FA5_4224,
    0xCD1B,
    0x4876,
    [0xB2, 0x11, 0x5D, 0xBE, 0xD8, 0x3B, 0xF4, 0xB8],
));
const PAGE_83_DATA: Uuid = guid::constant((
    0xBECA_12AB,
    0xB2E6,
    0x4523,
    [0x93, 0xEF, 0xC3, 0x09, 0xE0, 0x00, 0xC7, 0x46],
));
const LOGICAL_SECTOR_SIZE: Uuid = guid::constant((
    0x8141_BF1D,
    0xA96F,
    0x4709,
    [0xBA, 0x47, 0xF2, 0x33, 0xA8, 0xFA, 0xAB, 0x5F],
));
const PHYSICAL_SECTOR_SIZE: Uuid = guid::constant((
    0xCDA3_48C7,
    0x445D,
    0x4471,
    [0x9C, 0xC9, 0xE9, 0x88, 0x52, 0x51, 0xC5, 0x56],
));
/// MS-VHDX §2.6.2.6: {A8D35F2D-B30B-454D-ABF7-D3D84834AB0C}.
const PARENT_LOCATOR: Uuid = guid::constant((
    0xA8D3_5F2D,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
));
/// The mistyped item ID ({A8D35F2B-...}) that strata wrote for the parent locator before it
/// was corrected; read as the parent locator so layers made then still open, never written.
const PARENT_LOCATOR_LEGACY: Uuid = guid::constant((
    0xA8D3_5F2B,
    0xB30B,
    0x454D,
    [0xAB, 0xF7, 0xD3, 0xD8, 0x48, 0x34, 0xAB, 0x0C],
));

/// MS-VHDX §2.6.1.1: metadata table header.
#[binrw]
#[brw(little, magic = b"metadata")]
struct TableHeaderRaw {
    reserved: u16,
    entry_count: u16,
    reserved2: [u32; 5],
}

/// MS-VHDX §2.6.1.2: metadata table entry.
#[binrw]
#[brw(little)]
struct EntryRaw {
    item_id: [u8; 16],
    offset: u32,
    length: u32,
    /// Bit 0 IsUser, bit 1 IsVirtualDisk, bit 2 IsRequired.
    flags: u32,
    reserved: u32,
}

/// MS-VHDX §2.6.2.1: file parameters.
#[binrw]
#[brw(little)]
struct FileParametersRaw {
    block_size: u32,
    /// Bit 0 LeaveBlocksAllocated, bit 1 HasParent.
    flags: u32,
}

/// The validated metadata of a file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Metadata {
    /// Payload block size: a power of two from 1 MiB to 256 MiB.
    pub block_size: u32,
    /// Blocks must stay allocated (a fixed disk).
    pub leave_blocks_allocated: bool,
    /// A differencing disk.
    pub has_parent: bool,
    /// Virtual disk size in bytes, a multiple of the logical sector size.
    pub virtual_size: u64,
    /// 512 or 4096.
    pub logical_sector_size: u32,
    /// 512 or 4096.
    pub physical_sector_size: u32,
    /// The SCSI page 83 identifier.
    pub page83: Uuid,
    /// The parent locator of a differencing disk.
    pub parent: Option<ParentLocator>,
}

impl Metadata {
    /// MS-VHDX §2.5: chunk ratio = 2^23 * logical sector size / block size.
    pub fn chunk_ratio(&self) -> u64 {
        (1u64 << 23) * u64::from(self.logical_sector_size) / u64::from(self.block_size)
    }

    /// Number of payload blocks.
    pub fn data_blocks(&self) -> u64 {
        self.virtual_size.div_ceil(u64::from(self.block_size))
    }

    /// Number of sector bitmap blocks.
    pub fn bitmap_blocks(&self) -> u64 {
        self.data_blocks().div_ceil(self.chunk_ratio())
    }

    /// MS-VHDX §2.5: BAT entries the file needs.
    pub fn bat_entries(&self) -> u64 {
        let db = self.data_blocks();
        if self.has_parent {
            self.bitmap_blocks() * (self.chunk_ratio() + 1)
        } else if db == 0 {
            0
        } else {
            db + (db - 1) / self.chunk_ratio()
        }
    }

    /// Checks the values the spec constrains (MS-VHDX §2.6.2).
    pub(crate) fn validate(&self, file: &Path) -> Result<()> {
        let bad = |item, reason: String| VhdxError::InvalidField {
            file: file.to_path_buf(),
            structure: Structure::MetadataItem(item),
            reason,
        };
        if !self.block_size.is_power_of_two()
            || !(MIB..=256 * MIB).contains(&u64::from(self.block_size))
        {
            return Err(bad(
                MetadataItem::FileParameters,
                format!(
                    "block size {} not a power of two in 1..256 MiB",
                    self.block_size
                ),
            ));
        }
        for (item, v) in [
            (MetadataItem::LogicalSectorSize, self.logical_sector_size),
            (MetadataItem::PhysicalSectorSize, self.physical_sector_size),
        ] {
            if v != 512 && v != 4096 {
                return Err(bad(item, format!("{v} (want 512 or 4096)")));
            }
        }
        if self.virtual_size == 0
            || self.virtual_size > MAX_VIRTUAL_SIZE
            || !self
                .virtual_size
                .is_multiple_of(u64::from(self.logical_sector_size))
        {
            return Err(bad(
                MetadataItem::VirtualDiskSize,
                format!(
                    "{} not a multiple of the logical sector size in (0, 64 TiB]",
                    self.virtual_size
                ),
            ));
        }
        if self.has_parent && self.parent.is_none() {
            return Err(VhdxError::MissingMetadata {
                file: file.to_path_buf(),
                item: MetadataItem::ParentLocator,
            });
        }
        Ok(())
    }
}

/// Parses the metadata region (`region` holds all its bytes).
pub(crate) fn parse(file: &Path, region_offset: u64, region: &[u8]) -> Result<Metadata> {
    let table = Structure::MetadataTable;
    let invalid = |structure, reason: String| VhdxError::InvalidField {
        file: file.to_path_buf(),
        structure,
        reason,
    };
    if region.get(0..8) != Some(b"metadata") {
        return Err(VhdxError::BadSignature {
            file: file.to_path_buf(),
            structure: table,
            offset: region_offset,
        });
    }
    let mut cur = Cursor::new(region);
    let head = TableHeaderRaw::read(&mut cur).map_err(|e| invalid(table, e.to_string()))?;
    if head.entry_count > MAX_ENTRIES {
        return Err(invalid(
            table,
            format!("{} entries (at most {MAX_ENTRIES})", head.entry_count),
        ));
    }
    let mut items: [Option<&[u8]>; 6] = [None; 6];
    let mut spans: Vec<(u64, u64)> = Vec::new();
    for i in 0..head.entry_count {
        let e = EntryRaw::read(&mut cur).map_err(|e| invalid(table, e.to_string()))?;
        let id = guid::from_disk(e.item_id);
        let is_user = e.flags & 1 != 0;
        let required = e.flags & 4 != 0;
        let (start, len) = (u64::from(e.offset), u64::from(e.length));
        let end = start + len;
        if len != 0 && (start < TABLE_SIZE as u64 || end > region.len() as u64) {
            return Err(invalid(
                table,
                format!("entry {i} ({id}): item [{start}, +{len}) outside the region's data area"),
            ));
        }
        if len != 0 {
            if spans.iter().any(|&(s, l)| start < s + l && s < end) {
                return Err(invalid(
                    table,
                    format!("entry {i} ({id}): item overlaps another item"),
                ));
            }
            spans.push((start, len));
        }
        let index = if is_user {
            None
        } else {
            let id = if id == PARENT_LOCATOR_LEGACY {
                PARENT_LOCATOR
            } else {
                id
            };
            [
                FILE_PARAMETERS,
                VIRTUAL_DISK_SIZE,
                PAGE_83_DATA,
                LOGICAL_SECTOR_SIZE,
                PHYSICAL_SECTOR_SIZE,
                PARENT_LOCATOR,
            ]
            .iter()
            .position(|&g| g == id)
        };
        match index {
            Some(k) => {
                let bytes = region.get(start as usize..end as usize).unwrap_or(&[]);
                let slot = items
                    .get_mut(k)
                    .ok_or_else(|| invalid(table, "item index".into()))?;
                if slot.replace(bytes).is_some() {
                    return Err(invalid(table, format!("item {id} listed twice")));
                }
            }
            None if required => {
                return Err(VhdxError::Unsupported {
                    file: file.to_path_buf(),
                    what: format!("required metadata item {id}"),
                });
            }
            None => {}
        }
    }
    let [fp, vds, p83, lss, pss, parent] = items;
    let need = |bytes: Option<&[u8]>, item: MetadataItem, len: usize| -> Result<Vec<u8>> {
        let b = bytes.ok_or(VhdxError::MissingMetadata {
            file: file.to_path_buf(),
            item,
        })?;
        match b.get(..len) {
            Some(b) => Ok(b.to_vec()),
            None => Err(invalid(
                Structure::MetadataItem(item),
                format!("{} bytes (want {len})", b.len()),
            )),
        }
    };
    let fp_bytes = need(fp, MetadataItem::FileParameters, 8)?;
    let fpr = FileParametersRaw::read(&mut Cursor::new(&fp_bytes)).map_err(|e| {
        invalid(
            Structure::MetadataItem(MetadataItem::FileParameters),
            e.to_string(),
        )
    })?;
    let le_u64 = |b: Vec<u8>| b.iter().rev().fold(0u64, |acc, &x| acc << 8 | u64::from(x));
    let virtual_size = le_u64(need(vds, MetadataItem::VirtualDiskSize, 8)?);
    let page83_bytes = need(p83, MetadataItem::Page83Data, 16)?;
    let mut p83a = [0u8; 16];
    p83a.copy_from_slice(&page83_bytes);
    let logical = le_u64(need(lss, MetadataItem::LogicalSectorSize, 4)?) as u32;
    let physical = le_u64(need(pss, MetadataItem::PhysicalSectorSize, 4)?) as u32;
    let has_parent = fpr.flags & 2 != 0;
    let parent = match (has_parent, parent) {
        (true, Some(bytes)) => Some(crate::parent::parse(file, bytes)?),
        _ => None,
    };
    let meta = Metadata {
        block_size: fpr.block_size,
        leave_blocks_allocated: fpr.flags & 1 != 0,
        has_parent,
        virtual_size,
        logical_sector_size: logical,
        physical_sector_size: physical,
        page83: guid::from_disk(p83a),
        parent,
    };
    meta.validate(file)?;
    Ok(meta)
}

/// The metadata region bytes (table and items) for `meta`; `region_len` bytes long.
pub(crate) fn to_region(meta: &Metadata, region_len: usize) -> Vec<u8> {
    let mut region = vec![0u8; region_len];
    let parent = meta.parent.as_ref().map(ParentLocator::to_bytes);
    let mut items: Vec<(Uuid, Vec<u8>, u32)> = vec![
        (
            FILE_PARAMETERS,
            [
                meta.block_size.to_le_bytes(),
                (u32::from(meta.leave_blocks_allocated) | u32::from(meta.has_parent) << 1)
                    .to_le_bytes(),
            ]
            .concat(),
            4,
        ),
        (
            VIRTUAL_DISK_SIZE,
            meta.virtual_size.to_le_bytes().to_vec(),
            6,
        ),
        (PAGE_83_DATA, guid::to_disk(meta.page83).to_vec(), 6),
        (
            LOGICAL_SECTOR_SIZE,
            meta.logical_sector_size.to_le_bytes().to_vec(),
            6,
        ),
        (
            PHYSICAL_SECTOR_SIZE,
            meta.physical_sector_size.to_le_bytes().to_vec(),
            6,
        ),
    ];
    if let Some(p) = parent {
        items.push((PARENT_LOCATOR, p, 4));
    }
    let head = TableHeaderRaw {
        reserved: 0,
        entry_count: items.len() as u16,
        reserved2: [0; 5],
    };
    let mut cur = Cursor::new(&mut region[..]);
    // The table holds at most 6 entries of 32 bytes: writes into 64 KiB cannot fail.
    let _ = head.write(&mut cur);
    let mut data_at = TABLE_SIZE;
    let mut placed = Vec::new();
    for (id, bytes, flags) in items {
        let e = EntryRaw {
            item_id: guid::to_disk(id),
            offset: data_at as u32,
            length: bytes.len() as u32,
            flags,
            reserved: 0,
        };
        let _ = e.write(&mut cur);
        placed.push((data_at, bytes));
        data_at += 8 * (placed.last().map_or(0, |(_, b)| b.len()).div_ceil(8));
    }
    for (at, bytes) in placed {
        if let Some(dst) = region.get_mut(at..at + bytes.len()) {
            dst.copy_from_slice(&bytes);
        }
    }
    region
}
