//! Region tables (MS-VHDX §2.2.3): two 64 KiB copies at 192 KiB and 256 KiB naming the BAT
//! and metadata regions. Entries are bounded, 1 MiB aligned, must not overlap each other or
//! the fixed structures, and an unknown region marked required makes the file unsupported.

use std::io::Cursor;
use std::path::Path;

use binrw::{binrw, BinRead, BinWrite};
use uuid::Uuid;

use crate::crc;
use crate::error::{Result, Structure, VhdxError};
use crate::guid;

/// Offsets of region table 1 and 2.
pub(crate) const REGION_TABLE_OFFSETS: [u64; 2] = [192 * 1024, 256 * 1024];
/// Size of a region table (checksummed).
pub(crate) const REGION_TABLE_SIZE: usize = 64 * 1024;
/// MS-VHDX §2.2.3.2: BAT region GUID.
pub(crate) const BAT_GUID: Uuid = guid::constant((
    0x2DC2_7766,
    0xF623,
    0x4200,
    [0x9D, 0x64, 0x11, 0x5E, 0x9B, 0xFD, 0x4A, 0x08],
));
/// MS-VHDX §2.2.3.2: metadata region GUID.
pub(crate) const METADATA_GUID: Uuid = guid::constant((
    0x8B7C_A206,
    0x4790,
    0x4B9A,
    [0xB8, 0xFE, 0x57, 0x5F, 0x05, 0x0F, 0x88, 0x6E],
));
const MIB: u64 = 1024 * 1024;
const MAX_ENTRIES: u32 = 2047;

/// MS-VHDX §2.2.3.1: region table header.
#[binrw]
#[brw(little, magic = b"regi")]
struct RegionTableHeaderRaw {
    checksum: u32,
    entry_count: u32,
    reserved: u32,
}

/// MS-VHDX §2.2.3.2: region table entry.
#[binrw]
#[brw(little)]
struct RegionEntryRaw {
    guid: [u8; 16],
    file_offset: u64,
    length: u32,
    required: u32,
}

/// A region: a 1 MiB aligned byte range of the file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Region {
    /// File offset.
    pub offset: u64,
    /// Length in bytes.
    pub length: u64,
}

/// The validated region table: where the BAT and the metadata live.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct Regions {
    pub bat: Region,
    pub metadata: Region,
}

/// Parses and validates one region table block.
pub(crate) fn parse(file: &Path, slot: u8, offset: u64, block: &[u8]) -> Result<Regions> {
    let structure = Structure::RegionTable(slot);
    let invalid = |reason: String| VhdxError::InvalidField {
        file: file.to_path_buf(),
        structure,
        reason,
    };
    if block.get(0..4) != Some(b"regi") {
        return Err(VhdxError::BadSignature {
            file: file.to_path_buf(),
            structure,
            offset,
        });
    }
    let (stored, computed) = (crc::stored(block, 4), crc::checksum(block, 4));
    if stored != computed {
        return Err(VhdxError::BadChecksum {
            file: file.to_path_buf(),
            structure,
            offset,
            stored,
            computed,
        });
    }
    let mut cur = Cursor::new(block);
    let head = RegionTableHeaderRaw::read(&mut cur).map_err(|e| invalid(e.to_string()))?;
    if head.entry_count > MAX_ENTRIES {
        return Err(invalid(format!(
            "{} entries (at most {MAX_ENTRIES})",
            head.entry_count
        )));
    }
    let mut bat = None;
    let mut metadata = None;
    let mut seen: Vec<Region> = Vec::new();
    for i in 0..head.entry_count {
        let raw = RegionEntryRaw::read(&mut cur).map_err(|e| invalid(e.to_string()))?;
        let id = guid::from_disk(raw.guid);
        let region = Region {
            offset: raw.file_offset,
            length: u64::from(raw.length),
        };
        if !region.offset.is_multiple_of(MIB)
            || region.offset < MIB
            || !region.length.is_multiple_of(MIB)
            || region.length == 0
        {
            return Err(invalid(format!(
                "entry {i} ({id}): offset {} length {} not 1 MiB aligned past the first MiB",
                region.offset, region.length
            )));
        }
        if region.offset.checked_add(region.length).is_none() {
            return Err(invalid(format!("entry {i}: region end overflows")));
        }
        for other in &seen {
            if overlaps(*other, region) {
                return Err(VhdxError::RegionOverlap {
                    file: file.to_path_buf(),
                    a_offset: other.offset,
                    a_len: other.length,
                    b_offset: region.offset,
                    b_len: region.length,
                });
            }
        }
        seen.push(region);
        let slot_ref = if id == BAT_GUID {
            &mut bat
        } else if id == METADATA_GUID {
            &mut metadata
        } else if raw.required & 1 != 0 {
            return Err(VhdxError::Unsupported {
                file: file.to_path_buf(),
                what: format!("required region {id}"),
            });
        } else {
            continue;
        };
        if slot_ref.replace(region).is_some() {
            return Err(invalid(format!("region {id} listed twice")));
        }
    }
    let bat = bat.ok_or(VhdxError::MissingRegion {
        file: file.to_path_buf(),
        region: "BAT",
    })?;
    let metadata = metadata.ok_or(VhdxError::MissingRegion {
        file: file.to_path_buf(),
        region: "metadata",
    })?;
    Ok(Regions { bat, metadata })
}

/// Whether two byte ranges overlap.
pub(crate) fn overlaps(a: Region, b: Region) -> bool {
    a.offset < b.offset.saturating_add(b.length) && b.offset < a.offset.saturating_add(a.length)
}

/// The 64 KiB region table block for `regions`, checksum set.
pub(crate) fn to_block(regions: &Regions) -> Vec<u8> {
    let mut block = vec![0u8; REGION_TABLE_SIZE];
    let mut cur = Cursor::new(&mut block[..]);
    let head = RegionTableHeaderRaw {
        checksum: 0,
        entry_count: 2,
        reserved: 0,
    };
    // Writes into a 64 KiB buffer of 16 + 2 * 32 bytes cannot fail.
    let _ = head.write(&mut cur);
    for (id, r) in [(BAT_GUID, regions.bat), (METADATA_GUID, regions.metadata)] {
        let e = RegionEntryRaw {
            guid: guid::to_disk(id),
            file_offset: r.offset,
            length: u32::try_from(r.length).unwrap_or(u32::MAX),
            required: 1,
        };
        let _ = e.write(&mut cur);
    }
    crc::seal(&mut block, 4);
    block
}

#[cfg(test)]
mod tests {
    use super::*;

    fn regions() -> Regions {
        Regions {
            bat: Region {
                offset: 3 * MIB,
                length: MIB,
            },
            metadata: Region {
                offset: 2 * MIB,
                length: MIB,
            },
        }
    }

    #[test]
    fn round_trips() {
        let block = to_block(&regions());
        assert_eq!(
            parse(Path::new("x"), 1, 0, &block).map_err(|e| e.to_string()),
            Ok(regions())
        );
    }

    #[test]
    fn overlap_is_rejected() {
        let mut r = regions();
        r.bat.offset = 2 * MIB;
        let block = to_block(&r);
        assert!(matches!(
            parse(Path::new("x"), 1, 0, &block),
            Err(VhdxError::RegionOverlap { .. })
        ));
    }
}
