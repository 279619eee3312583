//! The log (MS-VHDX §2.3): a circular buffer of 4 KiB sectors holding entries that describe
//! metadata writes. A non-nil LogGuid in the current header means entries may need replay
//! (§2.3.3). This module finds the active sequence, checks every entry (signature, CRC-32C
//! over the whole entry, LogGuid, sequence numbers in descriptors and data sectors) and
//! produces the writes to replay. It also encodes entries, which tests use to simulate a
//! crash between logging and applying.

use std::io::Cursor;
use std::path::Path;

use binrw::{binrw, BinRead, BinWrite};
use uuid::Uuid;

use crate::crc;
use crate::error::{Result, VhdxError};
use crate::guid;

const SECTOR: u64 = 4096;
const ENTRY_HEADER: usize = 64;
const DESCRIPTOR: usize = 32;

/// MS-VHDX §2.3.1.1: log entry header.
#[binrw]
#[brw(little, magic = b"loge")]
struct EntryHeaderRaw {
    checksum: u32,
    entry_length: u32,
    tail: u32,
    sequence_number: u64,
    descriptor_count: u32,
    reserved: u32,
    log_guid: [u8; 16],
    flushed_file_offset: u64,
    last_file_offset: u64,
}

/// MS-VHDX §2.3.1.2 / §2.3.1.3: a zero or data descriptor (same size and layout of the
/// last two fields).
#[binrw]
#[brw(little)]
struct DescriptorRaw {
    signature: [u8; 4],
    /// Reserved (zero descriptor) or TrailingBytes (data descriptor).
    word: u32,
    /// ZeroLength (zero descriptor) or LeadingBytes (data descriptor).
    quad: u64,
    file_offset: u64,
    sequence_number: u64,
}

/// One write to replay.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum LogOp {
    /// Write these 4 KiB at the file offset.
    Data {
        /// File offset (4 KiB aligned).
        offset: u64,
        /// 4096 bytes.
        bytes: Vec<u8>,
    },
    /// Zero `len` bytes at the file offset.
    Zero {
        /// File offset (4 KiB aligned).
        offset: u64,
        /// Length (4 KiB multiple).
        len: u64,
    },
}

/// A log entry, decoded.
#[derive(Debug, Clone)]
struct Entry {
    position: u64,
    length: u64,
    tail: u64,
    sequence: u64,
    flushed_file_offset: u64,
    last_file_offset: u64,
    ops: Vec<LogOp>,
}

/// The result of scanning a log: what to replay.
#[derive(Debug, Clone, Default)]
pub(crate) struct Replay {
    pub ops: Vec<LogOp>,
    pub flushed_file_offset: u64,
    pub last_file_offset: u64,
}

/// Reads `len` bytes of the circular log starting at `pos` (wrapping).
fn read_log(log: &[u8], pos: u64, len: u64) -> Option<Vec<u8>> {
    let size = log.len() as u64;
    if len > size || pos >= size {
        return None;
    }
    let mut out = Vec::with_capacity(len as usize);
    let first = (size - pos).min(len);
    out.extend_from_slice(log.get(pos as usize..(pos + first) as usize)?);
    out.extend_from_slice(log.get(..(len - first) as usize)?);
    Some(out)
}

/// Decodes and validates the entry at `pos`; `None` when it is not a valid entry.
fn entry_at(log: &[u8], pos: u64, log_guid: Uuid) -> Option<Entry> {
    let head = read_log(log, pos, SECTOR)?;
    let raw = EntryHeaderRaw::read(&mut Cursor::new(&head)).ok()?;
    let length = u64::from(raw.entry_length);
    if length == 0
        || length % SECTOR != 0
        || length > log.len() as u64
        || u64::from(raw.tail) % SECTOR != 0
    {
        return None;
    }
    if guid::from_disk(raw.log_guid) != log_guid || raw.sequence_number == 0 {
        return None;
    }
    let count = raw.descriptor_count as u64;
    let desc_sectors = (ENTRY_HEADER as u64 + count * DESCRIPTOR as u64).div_ceil(SECTOR);
    if desc_sectors > length / SECTOR {
        return None;
    }
    let bytes = read_log(log, pos, length)?;
    if crc::checksum(&bytes, 4) != raw.checksum {
        return None;
    }
    let mut cur = Cursor::new(bytes.get(ENTRY_HEADER..)?);
    let mut data_sector = desc_sectors;
    let mut ops = Vec::new();
    for _ in 0..count {
        let d = DescriptorRaw::read(&mut cur).ok()?;
        if d.sequence_number != raw.sequence_number || d.file_offset % SECTOR != 0 {
            return None;
        }
        match &d.signature {
            b"zero" => {
                if d.quad % SECTOR != 0 {
                    return None;
                }
                ops.push(LogOp::Zero {
                    offset: d.file_offset,
                    len: d.quad,
                });
            }
            b"desc" => {
                let at = (data_sector * SECTOR) as usize;
                let sector = bytes.get(at..at + SECTOR as usize)?;
                data_sector += 1;
                let high = u32::from_le_bytes(sector.get(4..8)?.try_into().ok()?);
                let low = u32::from_le_bytes(sector.get(4092..4096)?.try_into().ok()?);
                if sector.get(0..4)? != b"data"
                    || (u64::from(high) << 32 | u64::from(low)) != raw.sequence_number
                {
                    return None;
                }
                let mut out = Vec::with_capacity(SECTOR as usize);
                out.extend_from_slice(&d.quad.to_le_bytes());
                out.extend_from_slice(sector.get(8..4092)?);
                out.extend_from_slice(&d.word.to_le_bytes());
                ops.push(LogOp::Data {
                    offset: d.file_offset,
                    bytes: out,
                });
            }
            _ => return None,
        }
    }
    if data_sector > length / SECTOR {
        return None;
    }
    Some(Entry {
        position: pos,
        length,
        tail: u64::from(raw.tail),
        sequence: raw.sequence_number,
        flushed_file_offset: raw.flushed_file_offset,
        last_file_offset: raw.last_file_offset,
        ops,
    })
}

/// Finds the active sequence (MS-VHDX §2.3.3): of all runs of valid entries with
/// consecutive sequence numbers, the one whose last entry has the highest sequence number
/// and whose tail names an entry of the run. Returns `None` when no entry is valid.
pub(crate) fn scan(file: &Path, log: &[u8], log_guid: Uuid) -> Result<Option<Replay>> {
    let size = log.len() as u64;
    let mut best: Option<Vec<Entry>> = None;
    let mut pos = 0;
    while pos < size {
        let Some(first) = entry_at(log, pos, log_guid) else {
            pos += SECTOR;
            continue;
        };
        let mut run = vec![first];
        while let Some(last) = run.last() {
            let next_pos = (last.position + last.length) % size;
            let next_seq = last.sequence + 1;
            if run.len() as u64 > size / SECTOR {
                break;
            }
            match entry_at(log, next_pos, log_guid) {
                Some(e) if e.sequence == next_seq => run.push(e),
                _ => break,
            }
        }
        // The run's head (last entry) names the tail: replay from there.
        if let Some(head) = run.last() {
            if let Some(start) = run.iter().position(|e| e.position == head.tail) {
                let seq = run.split_off(start);
                let better = best
                    .as_ref()
                    .and_then(|b| b.last())
                    .is_none_or(|b| seq.last().is_some_and(|s| s.sequence > b.sequence));
                if better {
                    best = Some(seq);
                }
            }
        }
        pos += SECTOR;
    }
    let Some(seq) = best else { return Ok(None) };
    let head = seq.last().ok_or_else(|| VhdxError::BadLog {
        file: file.to_path_buf(),
        reason: "empty sequence".into(),
    })?;
    let mut replay = Replay {
        ops: Vec::new(),
        flushed_file_offset: head.flushed_file_offset,
        last_file_offset: head.last_file_offset,
    };
    for e in seq {
        replay.ops.extend(e.ops);
    }
    Ok(Some(replay))
}

/// Encodes one log entry with data and zero descriptors (used by tests and by writers that
/// log their metadata updates). Data ops must be 4096 bytes.
pub fn encode_entry(
    log_guid: Uuid,
    sequence: u64,
    tail: u32,
    flushed_file_offset: u64,
    last_file_offset: u64,
    ops: &[LogOp],
) -> Vec<u8> {
    let count = ops.len();
    let desc_sectors = (ENTRY_HEADER + count * DESCRIPTOR).div_ceil(SECTOR as usize);
    let data_count = ops
        .iter()
        .filter(|o| matches!(o, LogOp::Data { .. }))
        .count();
    let length = (desc_sectors + data_count) * SECTOR as usize;
    let mut out = vec![0u8; length];
    let head = EntryHeaderRaw {
        checksum: 0,
        entry_length: length as u32,
        tail,
        sequence_number: sequence,
        descriptor_count: count as u32,
        reserved: 0,
        log_guid: guid::to_disk(log_guid),
        flushed_file_offset,
        last_file_offset,
    };
    let mut cur = Cursor::new(&mut out[..]);
    // Writes into a buffer sized for header and descriptors cannot fail.
    let _ = head.write(&mut cur);
    let mut data = Vec::new();
    for op in ops {
        let d = match op {
            LogOp::Zero { offset, len } => DescriptorRaw {
                signature: *b"zero",
                word: 0,
                quad: *len,
                file_offset: *offset,
                sequence_number: sequence,
            },
            LogOp::Data { offset, bytes } => {
                let mut b = [0u8; 4096];
                let n = bytes.len().min(4096);
                b.get_mut(..n)
                    .unwrap_or_default()
                    .copy_from_slice(bytes.get(..n).unwrap_or_default());
                data.push(b);
                DescriptorRaw {
                    signature: *b"desc",
                    word: u32::from_le_bytes([b[4092], b[4093], b[4094], b[4095]]),
                    quad: u64::from_le_bytes([b[0], b[1], b[2], b[3], b[4], b[5], b[6], b[7]]),
                    file_offset: *offset,
                    sequence_number: sequence,
                }
            }
        };
        let _ = d.write(&mut cur);
    }
    for (i, b) in data.iter().enumerate() {
        let at = (desc_sectors + i) * SECTOR as usize;
        let mut sector = *b;
        sector[0..4].copy_from_slice(b"data");
        sector[4..8].copy_from_slice(&((sequence >> 32) as u32).to_le_bytes());
        sector[4092..4096].copy_from_slice(&(sequence as u32).to_le_bytes());
        if let Some(s) = out.get_mut(at..at + SECTOR as usize) {
            s.copy_from_slice(&sector);
        }
    }
    crc::seal(&mut out, 4);
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn entry_round_trips_and_is_found() {
        let g = Uuid::from_u128(5);
        let mut page = vec![0u8; 4096];
        page[0] = 1;
        page[4095] = 2;
        page[100] = 3;
        let ops = vec![
            LogOp::Data {
                offset: 3 << 20,
                bytes: page,
            },
            LogOp::Zero {
                offset: 4 << 20,
                len: 8192,
            },
        ];
        let e = encode_entry(g, 7, 4096, 1 << 30, 1 << 30, &ops);
        let mut log = vec![0u8; 1 << 20];
        log[4096..4096 + e.len()].copy_from_slice(&e);
        let r = scan(Path::new("x"), &log, g)
            .map_err(|e| e.to_string())
            .unwrap()
            .unwrap();
        assert_eq!(r.ops, ops);
        assert!(scan(Path::new("x"), &log, Uuid::from_u128(6))
            .map_err(|e| e.to_string())
            .unwrap()
            .is_none());
        let mut bad = log.clone();
        bad[4096 + 200] ^= 1;
        assert!(scan(Path::new("x"), &bad, g)
            .map_err(|e| e.to_string())
            .unwrap()
            .is_none());
    }

    #[test]
    fn entry_wraps_around_the_end() {
        let g = Uuid::from_u128(5);
        let ops = vec![LogOp::Data {
            offset: 1 << 20,
            bytes: vec![9u8; 4096],
        }];
        let e = encode_entry(g, 1, (1 << 20) - 4096, 0, 0, &ops);
        let mut log = vec![0u8; 1 << 20];
        let split = 4096;
        log[(1 << 20) - split..].copy_from_slice(&e[..split]);
        log[..e.len() - split].copy_from_slice(&e[split..]);
        let r = scan(Path::new("x"), &log, g)
            .map_err(|e| e.to_string())
            .unwrap()
            .unwrap();
        assert_eq!(r.ops, ops);
    }
}
