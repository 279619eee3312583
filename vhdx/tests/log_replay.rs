//! The log (MS-VHDX §2.3): a file left with a logged but unapplied metadata update (as a
//! crash between logging and applying leaves it) is refused read-only with `DirtyLog`,
//! replayed on a read-write open, and qemu-img replays our log entry to the same bytes.

mod common;

use std::path::Path;

use anyhow::Result;
use common::*;
use vhdx::log::{encode_entry, LogOp};
use vhdx::{Chain, CreateOptions, Uuid, Vhdx, VhdxError};

const H1: u64 = 64 * 1024;
const H2: u64 = 128 * 1024;
const LOG: u64 = MIB;
const BAT: u64 = 3 * MIB;

fn patch(path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)?
        .write_all_at(bytes, offset)?;
    Ok(())
}

/// Makes `path` look like a crash happened after logging an allocation of block 5 (data
/// written at the end of the file, BAT update only in the log).
fn crash_with_logged_allocation(path: &Path, log_guid: Uuid) -> Result<Vec<u8>> {
    let data = std::fs::read(path)?;
    let end = data.len() as u64;
    let block = vec![0xC3u8; MIB as usize];
    patch(path, end, &block)?;
    let new_len = end + MIB;
    // BAT sector 0 with entry 5 = FULLY_PRESENT at the new block.
    let mut sector = data[BAT as usize..BAT as usize + 4096].to_vec();
    sector[40..48].copy_from_slice(&(end | 6).to_le_bytes());
    let entry = encode_entry(
        log_guid,
        1,
        0,
        new_len,
        new_len,
        &[LogOp::Data {
            offset: BAT,
            bytes: sector,
        }],
    );
    patch(path, LOG, &entry)?;
    // New current header (sequence 3 in slot 1) naming the log.
    let mut h = data[H2 as usize..H2 as usize + 4096].to_vec();
    h[8..16].copy_from_slice(&3u64.to_le_bytes());
    h[48..64].copy_from_slice(&log_guid.to_bytes_le());
    h[4..8].fill(0);
    let crc = crc32c::crc32c(&h);
    h[4..8].copy_from_slice(&crc.to_le_bytes());
    patch(path, H1, &h)?;
    Ok(block)
}

#[test]
fn logged_update_is_refused_read_only_and_replayed_read_write() -> Result<()> {
    let dir = scratch();
    let raw = dir.path().join("in.raw");
    let mut img = random_raw(21, 8 * MIB);
    img[5 * MIB as usize..6 * MIB as usize].fill(0); // block 5 unallocated
    std::fs::write(&raw, &img)?;
    let p = dir.path().join("d.vhdx");
    vhdx::from_raw(
        &raw,
        &p,
        None,
        &CreateOptions {
            block_size: MIB as u32,
            ..CreateOptions::default()
        },
    )?;
    let block = crash_with_logged_allocation(&p, Uuid::from_u128(0xABCD))?;
    let copy = dir.path().join("copy.vhdx");
    std::fs::copy(&p, &copy)?;

    let before = std::fs::read(&p)?;
    assert!(matches!(Vhdx::open(&p), Err(VhdxError::DirtyLog { .. })));
    assert!(matches!(Chain::open(&p), Err(VhdxError::DirtyLog { .. })));
    assert_eq!(std::fs::read(&p)?, before, "a read-only open wrote");

    let f = Vhdx::open_writable(&p)?;
    assert_eq!(f.header_sequence(), 4, "log cleared in a new header");
    drop(f);
    let chain = Chain::open(&p)?;
    let mut want = img.clone();
    want[5 * MIB as usize..6 * MIB as usize].copy_from_slice(&block);
    assert_same("after replay", &read_chain(&chain)?, &want);

    // qemu-img replays the same log entry (check -r opens read-write) to the same disk.
    run_qemu_img(&["check", "-r", "all", "-f", "vhdx", s(&copy)])?;
    let back = dir.path().join("copy.raw");
    run_qemu_img(&["convert", "-f", "vhdx", "-O", "raw", s(&copy), s(&back)])?;
    assert_same("qemu-img replay", &std::fs::read(&back)?, &want);
    run_qemu_img(&["check", "-f", "vhdx", s(&p)])?;
    Ok(())
}

#[test]
fn a_damaged_log_entry_is_not_replayed() -> Result<()> {
    let dir = scratch();
    let raw = dir.path().join("in.raw");
    let img = random_raw(22, 6 * MIB);
    std::fs::write(&raw, &img)?;
    let p = dir.path().join("d.vhdx");
    vhdx::from_raw(
        &raw,
        &p,
        None,
        &CreateOptions {
            block_size: MIB as u32,
            ..CreateOptions::default()
        },
    )?;
    crash_with_logged_allocation(&p, Uuid::from_u128(7))?;
    // Tear the entry: its checksum no longer matches, so there is no active sequence and
    // the update never happened.
    patch(&p, LOG + 5000, &[0xFF])?;
    let chain = Chain::open(&p)?;
    assert_same("unreplayed", &read_chain(&chain)?, &img);
    drop(chain);
    let f = Vhdx::open_writable(&p)?;
    drop(f);
    assert_same("after rw open", &read_chain(&Chain::open(&p)?)?, &img);
    Ok(())
}
