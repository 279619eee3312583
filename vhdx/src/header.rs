//! The file type identifier (MS-VHDX §2.2.1) and the two headers (§2.2.2), with the choice
//! of the current header (§2.2.2.1): the valid header with the higher sequence number. A
//! torn or corrupt header falls back to the other one, which is why the spec keeps two.

use std::io::Cursor;
use std::path::Path;

use binrw::{binrw, BinRead, BinWrite};
use uuid::Uuid;

use crate::crc;
use crate::error::{Result, Structure, VhdxError};
use crate::guid;

/// Offset of the file type identifier.
pub(crate) const FILE_ID_OFFSET: u64 = 0;
/// Offsets of header 1 and 2.
pub(crate) const HEADER_OFFSETS: [u64; 2] = [64 * 1024, 128 * 1024];
/// Size of a header block (checksummed).
pub(crate) const HEADER_SIZE: usize = 4096;
/// Signature of the file type identifier.
pub(crate) const FILE_SIGNATURE: &[u8; 8] = b"vhdxfile";
const MIB: u64 = 1024 * 1024;

/// MS-VHDX §2.2.2: the fields of a header; the remaining 4016 bytes are reserved.
#[binrw]
#[brw(little, magic = b"head")]
struct HeaderRaw {
    checksum: u32,
    sequence_number: u64,
    file_write_guid: [u8; 16],
    data_write_guid: [u8; 16],
    log_guid: [u8; 16],
    log_version: u16,
    version: u16,
    log_length: u32,
    log_offset: u64,
}

/// A validated header.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Header {
    /// Sequence number: the valid header with the higher one is current.
    pub sequence_number: u64,
    /// Changed the first time the file is opened for writing in a session.
    pub file_write_guid: Uuid,
    /// Changed before the first change to the virtual disk's contents; children's
    /// parent_linkage points at it.
    pub data_write_guid: Uuid,
    /// Non-nil when the log may hold entries to replay.
    pub log_guid: Uuid,
    /// Log offset (1 MiB multiple, at least 1 MiB).
    pub log_offset: u64,
    /// Log length (1 MiB multiple).
    pub log_length: u32,
}

struct Invalid(String);

impl TryFrom<HeaderRaw> for Header {
    type Error = Invalid;

    /// MS-VHDX §2.2.2: Version 1, LogVersion 0, log placement on 1 MiB boundaries.
    fn try_from(raw: HeaderRaw) -> Result<Self, Invalid> {
        if raw.version != 1 {
            return Err(Invalid(format!("version {} (want 1)", raw.version)));
        }
        if raw.log_version != 0 {
            return Err(Invalid(format!("log version {} (want 0)", raw.log_version)));
        }
        if u64::from(raw.log_length) % MIB != 0 {
            return Err(Invalid(format!(
                "log length {} not a 1 MiB multiple",
                raw.log_length
            )));
        }
        if !raw.log_offset.is_multiple_of(MIB) || (raw.log_length != 0 && raw.log_offset < MIB) {
            return Err(Invalid(format!(
                "log offset {} not a 1 MiB multiple of at least 1 MiB",
                raw.log_offset
            )));
        }
        Ok(Header {
            sequence_number: raw.sequence_number,
            file_write_guid: guid::from_disk(raw.file_write_guid),
            data_write_guid: guid::from_disk(raw.data_write_guid),
            log_guid: guid::from_disk(raw.log_guid),
            log_offset: raw.log_offset,
            log_length: raw.log_length,
        })
    }
}

impl Header {
    /// The 4 KiB on-disk block, checksum set.
    pub(crate) fn to_block(self) -> Vec<u8> {
        let raw = HeaderRaw {
            checksum: 0,
            sequence_number: self.sequence_number,
            file_write_guid: guid::to_disk(self.file_write_guid),
            data_write_guid: guid::to_disk(self.data_write_guid),
            log_guid: guid::to_disk(self.log_guid),
            log_version: 0,
            version: 1,
            log_length: self.log_length,
            log_offset: self.log_offset,
        };
        let mut block = vec![0u8; HEADER_SIZE];
        // A Cursor over a Vec of 4096 bytes cannot fail for an 80-byte struct.
        let _ = raw.write(&mut Cursor::new(&mut block[..]));
        crc::seal(&mut block, 4);
        block
    }
}

/// Parses one header block, verifying signature and CRC-32C before the fields.
pub(crate) fn parse_header(file: &Path, slot: u8, offset: u64, block: &[u8]) -> Result<Header> {
    let structure = Structure::Header(slot);
    if block.get(0..4) != Some(b"head") {
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
    let raw = HeaderRaw::read(&mut Cursor::new(block)).map_err(|e| VhdxError::InvalidField {
        file: file.to_path_buf(),
        structure,
        reason: e.to_string(),
    })?;
    Header::try_from(raw).map_err(|Invalid(reason)| VhdxError::InvalidField {
        file: file.to_path_buf(),
        structure,
        reason,
    })
}

/// Chooses the current header from the two parse results (MS-VHDX §2.2.2.1). Returns the
/// header and its slot (0 or 1).
pub(crate) fn choose(
    file: &Path,
    first: Result<Header>,
    second: Result<Header>,
) -> Result<(Header, usize)> {
    match (first, second) {
        (Ok(a), Ok(b)) => {
            if a.sequence_number == b.sequence_number && a != b {
                // §2.2.2.1: equal sequence numbers with different contents are corrupt.
                return Err(VhdxError::InvalidField {
                    file: file.to_path_buf(),
                    structure: Structure::Header(1),
                    reason: "both headers carry the same sequence number but differ".into(),
                });
            }
            Ok(if b.sequence_number > a.sequence_number {
                (b, 1)
            } else {
                (a, 0)
            })
        }
        (Ok(a), Err(_)) => Ok((a, 0)),
        (Err(_), Ok(b)) => Ok((b, 1)),
        (Err(a), Err(b)) => Err(VhdxError::NoValidHeader {
            file: file.to_path_buf(),
            first: Box::new(a),
            second: Box::new(b),
        }),
    }
}

/// The 64 KiB file type identifier block with a creator string (UTF-16LE, at most 256 units).
pub(crate) fn file_identifier_block(creator: &str) -> Vec<u8> {
    let mut block = vec![0u8; 64 * 1024];
    if let Some(sig) = block.get_mut(0..8) {
        sig.copy_from_slice(FILE_SIGNATURE);
    }
    for (i, unit) in creator.encode_utf16().take(255).enumerate() {
        if let Some(dst) = block.get_mut(8 + 2 * i..10 + 2 * i) {
            dst.copy_from_slice(&unit.to_le_bytes());
        }
    }
    block
}

/// Decodes the creator string of a file type identifier block.
pub(crate) fn creator(block: &[u8]) -> String {
    let units: Vec<u16> = block
        .get(8..8 + 512)
        .unwrap_or(&[])
        .chunks_exact(2)
        .map(|c| {
            u16::from_le_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
        .take_while(|&u| u != 0)
        .collect();
    String::from_utf16_lossy(&units)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_round_trips() {
        let h = Header {
            sequence_number: 9,
            file_write_guid: Uuid::from_u128(1),
            data_write_guid: Uuid::from_u128(2),
            log_guid: Uuid::nil(),
            log_offset: MIB,
            log_length: MIB as u32,
        };
        let block = h.to_block();
        let back = parse_header(Path::new("x"), 1, 0, &block).map_err(|e| e.to_string());
        assert_eq!(back, Ok(h));
    }

    #[test]
    fn torn_header_falls_back_to_the_other() {
        let a = Header {
            sequence_number: 5,
            file_write_guid: Uuid::from_u128(1),
            data_write_guid: Uuid::from_u128(2),
            log_guid: Uuid::nil(),
            log_offset: MIB,
            log_length: MIB as u32,
        };
        let mut b = a;
        b.sequence_number = 6;
        let mut torn = b.to_block();
        torn[100] ^= 1;
        let second = parse_header(Path::new("x"), 2, 0, &torn);
        assert!(matches!(second, Err(VhdxError::BadChecksum { .. })));
        let (h, slot) = choose(Path::new("x"), Ok(a), second)
            .map_err(|e| e.to_string())
            .unwrap();
        assert_eq!((h, slot), (a, 0));
    }
}
