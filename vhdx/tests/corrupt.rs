//! Bad input: truncated files, flipped bytes in each structure, wrong checksums, BAT
//! entries pointing past the end, parent loops, missing and mismatched parents. Each is a
//! named error, never a panic, and never a write to the file.

mod common;

use std::path::{Path, PathBuf};

use anyhow::Result;
use common::*;
use proptest::prelude::*;
use vhdx::{Chain, CreateOptions, ErrorKind, MetadataItem, Structure, Vhdx, VhdxError};

const KIB: u64 = 1024;
const H1: u64 = 64 * KIB;
const H2: u64 = 128 * KIB;
const RT1: u64 = 192 * KIB;
const RT2: u64 = 256 * KIB;
const METADATA: u64 = 2 * MIB;
const BAT: u64 = 3 * MIB;

/// A 6 MiB dynamic disk with 1 MiB blocks, written by us (layout: log at 1 MiB, metadata at
/// 2 MiB, BAT at 3 MiB, blocks from 4 MiB).
fn fixture(dir: &Path, name: &str) -> Result<PathBuf> {
    let raw = dir.join(format!("{name}.raw"));
    let mut img = random_raw(11, 6 * MIB);
    img[..MIB as usize].fill(0x5A); // block 0 allocated
    std::fs::write(&raw, &img)?;
    let out = dir.join(format!("{name}.vhdx"));
    vhdx::from_raw(
        &raw,
        &out,
        None,
        &CreateOptions {
            block_size: MIB as u32,
            ..CreateOptions::default()
        },
    )?;
    Ok(out)
}

fn patch(path: &Path, offset: u64, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new().write(true).open(path)?;
    f.write_all_at(bytes, offset)?;
    Ok(())
}

fn flip(path: &Path, offset: u64) -> Result<()> {
    let mut data = std::fs::read(path)?;
    data[offset as usize] ^= 0x40;
    std::fs::write(path, data)?;
    Ok(())
}

/// Rewrites a checksummed block's CRC after editing it, so the edit reaches the field
/// validation rather than the checksum check.
fn reseal(path: &Path, offset: u64, len: usize) -> Result<()> {
    let data = std::fs::read(path)?;
    let mut block = data[offset as usize..offset as usize + len].to_vec();
    block[4..8].fill(0);
    let crc = crc32c::crc32c(&block);
    patch(path, offset + 4, &crc.to_le_bytes())
}

/// Opens read-only and read-write, asserting both fail the same way and the file is
/// unchanged; returns the read-only error.
fn open_err(path: &Path) -> VhdxError {
    let before = std::fs::read(path).expect("read");
    let ro = Vhdx::open(path).expect_err("read-only open must fail");
    let rw = Vhdx::open_writable(path).expect_err("read-write open must fail");
    assert_eq!(ro.to_string(), rw.to_string());
    assert_eq!(
        std::fs::read(path).expect("read"),
        before,
        "a failed open wrote to the file"
    );
    ro
}

/// The first BAT entry's file offset field for block `n` (chunk ratio is large, so the
/// payload index is n).
fn bat_entry(offset_mib: u64, state: u64) -> [u8; 8] {
    ((offset_mib << 20) | state).to_le_bytes()
}

#[test]
fn truncated_files() -> Result<()> {
    let dir = scratch();
    let good = fixture(dir.path(), "good")?;
    let full = std::fs::read(&good)?;
    for (len, check) in [
        (0u64, "not"),
        (7, "not"),
        (100, "trunc-id"),
        (H1 + 100, "header"),
        (RT1 + 10, "region"),
        (MIB + 10, "log"),
        (METADATA + 100, "log"),
        (BAT + 8, "log"),
        (4 * MIB + 100, "log"),
        (full.len() as u64 - 1, "log"),
    ] {
        let p = dir.path().join(format!("t{len}.vhdx"));
        std::fs::write(&p, &full[..len as usize])?;
        let e = open_err(&p);
        let ok = match check {
            "not" => matches!(e, VhdxError::NotVhdx { .. }),
            "trunc-id" => matches!(
                e,
                VhdxError::Truncated {
                    structure: Structure::FileIdentifier,
                    ..
                }
            ),
            "header" => matches!(e, VhdxError::NoValidHeader { .. }),
            "region" => matches!(e, VhdxError::NoValidRegionTable { .. }),
            // The log region (1..2 MiB) is checked against the file size first.
            _ => matches!(
                e,
                VhdxError::Truncated { .. } | VhdxError::BatPastEnd { .. }
            ),
        };
        assert!(ok, "length {len}: unexpected {e:?}");
        assert_ne!(e.kind(), ErrorKind::Io, "length {len}: {e}");
    }
    // Cut inside the last block only: the log and all tables are present, the BAT names a
    // block past the end.
    let p = dir.path().join("tail.vhdx");
    std::fs::write(&p, &full[..full.len() - 4096])?;
    assert!(matches!(open_err(&p), VhdxError::BatPastEnd { .. }));
    Ok(())
}

#[test]
fn one_torn_header_falls_back_both_torn_fail() -> Result<()> {
    let dir = scratch();
    let p = fixture(dir.path(), "h")?;
    let want = read_chain(&Chain::open(&p)?)?;
    let seq = Vhdx::open(&p)?.header_sequence();
    // The current header is header 2 (higher sequence number): tear it.
    flip(&p, H2 + 300)?;
    let f = Vhdx::open(&p)?;
    assert_eq!(f.header_sequence(), seq - 1, "fell back to header 1");
    assert!(
        matches!(f.check(), Err(VhdxError::DamagedCopy { .. })),
        "check reports the torn copy"
    );
    assert_same("after fallback", &read_chain(&Chain::open(&p)?)?, &want);
    flip(&p, H1 + 40)?;
    let e = open_err(&p);
    match e {
        VhdxError::NoValidHeader { first, second, .. } => {
            assert!(matches!(
                *first,
                VhdxError::BadChecksum {
                    structure: Structure::Header(1),
                    ..
                }
            ));
            assert!(matches!(
                *second,
                VhdxError::BadChecksum {
                    structure: Structure::Header(2),
                    ..
                }
            ));
        }
        e => panic!("unexpected {e:?}"),
    }
    Ok(())
}

#[test]
fn header_fields_and_signatures() -> Result<()> {
    let dir = scratch();
    let p = fixture(dir.path(), "sig")?;
    patch(&p, 0, b"vhdxfilX")?;
    assert!(matches!(open_err(&p), VhdxError::NotVhdx { .. }));

    let p = fixture(dir.path(), "hsig")?;
    patch(&p, H1, b"HEAD")?;
    patch(&p, H2, b"HEAD")?;
    assert!(matches!(open_err(&p), VhdxError::NoValidHeader { .. }));

    // Version 2 in both headers, checksums fixed: a field error, not a checksum error.
    let p = fixture(dir.path(), "hver")?;
    for h in [H1, H2] {
        patch(&p, h + 66, &2u16.to_le_bytes())?;
        reseal(&p, h, 4096)?;
    }
    match open_err(&p) {
        VhdxError::NoValidHeader { first, .. } => {
            assert!(matches!(
                *first,
                VhdxError::InvalidField {
                    structure: Structure::Header(1),
                    ..
                }
            ))
        }
        e => panic!("unexpected {e:?}"),
    }
    Ok(())
}

#[test]
fn region_tables() -> Result<()> {
    let dir = scratch();
    let p = fixture(dir.path(), "rt")?;
    let want = read_chain(&Chain::open(&p)?)?;
    flip(&p, RT1 + 20)?;
    assert_same("table 2 used", &read_chain(&Chain::open(&p)?)?, &want);
    assert!(matches!(
        Vhdx::open(&p)?.check(),
        Err(VhdxError::DamagedCopy { .. })
    ));
    flip(&p, RT2 + 20)?;
    match open_err(&p) {
        VhdxError::NoValidRegionTable { first, second, .. } => {
            assert!(matches!(
                *first,
                VhdxError::BadChecksum {
                    structure: Structure::RegionTable(1),
                    ..
                }
            ));
            assert!(matches!(
                *second,
                VhdxError::BadChecksum {
                    structure: Structure::RegionTable(2),
                    ..
                }
            ));
        }
        e => panic!("unexpected {e:?}"),
    }
    // BAT region moved onto the metadata region in both tables: overlap.
    let p = fixture(dir.path(), "rtov")?;
    for rt in [RT1, RT2] {
        // Entry 0 is the BAT: guid(16) then file offset (u64) at entry start + 16.
        patch(&p, rt + 16 + 16, &METADATA.to_le_bytes())?;
        reseal(&p, rt, 64 * 1024)?;
    }
    match open_err(&p) {
        VhdxError::NoValidRegionTable { first, .. } => {
            assert!(matches!(*first, VhdxError::RegionOverlap { .. }))
        }
        e => panic!("unexpected {e:?}"),
    }
    // The BAT region moved onto the log.
    let p = fixture(dir.path(), "rtlog")?;
    for rt in [RT1, RT2] {
        patch(&p, rt + 16 + 16, &MIB.to_le_bytes())?;
        reseal(&p, rt, 64 * 1024)?;
    }
    assert!(matches!(open_err(&p), VhdxError::RegionOverlap { .. }));
    // The metadata region's GUID changed and marked required: unknown required region.
    let p = fixture(dir.path(), "rtreq")?;
    for rt in [RT1, RT2] {
        patch(&p, rt + 16 + 32, &[0xEE])?;
        reseal(&p, rt, 64 * 1024)?;
    }
    let e = open_err(&p);
    assert!(matches!(e, VhdxError::Unsupported { .. }), "{e:?}");
    assert_eq!(e.kind(), ErrorKind::Unsupported);
    Ok(())
}

#[test]
fn metadata_items() -> Result<()> {
    let dir = scratch();
    let p = fixture(dir.path(), "mdsig")?;
    patch(&p, METADATA, b"METADATA")?;
    assert!(matches!(
        open_err(&p),
        VhdxError::BadSignature {
            structure: Structure::MetadataTable,
            ..
        }
    ));

    // Items are placed from 64 KiB on 8-byte boundaries: file parameters (+0), virtual
    // size (+8), page 83 (+16), logical (+32) and physical (+40) sector size.
    let items = METADATA + 64 * KIB;
    for (name, offset, bytes, item) in [
        (
            "bs",
            items,
            3_000_000u32.to_le_bytes().to_vec(),
            MetadataItem::FileParameters,
        ),
        (
            "vsz",
            items + 8,
            (6 * MIB + 100).to_le_bytes().to_vec(),
            MetadataItem::VirtualDiskSize,
        ),
        (
            "lss",
            items + 32,
            1000u32.to_le_bytes().to_vec(),
            MetadataItem::LogicalSectorSize,
        ),
        (
            "pss",
            items + 40,
            0u32.to_le_bytes().to_vec(),
            MetadataItem::PhysicalSectorSize,
        ),
    ] {
        let p = fixture(dir.path(), name)?;
        patch(&p, offset, &bytes)?;
        let e = open_err(&p);
        assert!(
            matches!(&e, VhdxError::InvalidField { structure: Structure::MetadataItem(i), .. } if *i == item),
            "{name}: {e:?}"
        );
    }
    // Remove the logical sector size entry (entry 3 of the table: an all-zero entry is an
    // unknown, optional item).
    let p = fixture(dir.path(), "mdmissing")?;
    patch(&p, METADATA + 32 + 3 * 32, &[0u8; 32])?;
    let e = open_err(&p);
    assert!(
        matches!(
            e,
            VhdxError::MissingMetadata {
                item: MetadataItem::LogicalSectorSize,
                ..
            }
        ),
        "{e:?}"
    );
    // An item pointing outside the region.
    let p = fixture(dir.path(), "mdrange")?;
    patch(&p, METADATA + 32 + 16, &(2 * MIB as u32).to_le_bytes())?;
    assert!(matches!(
        open_err(&p),
        VhdxError::InvalidField {
            structure: Structure::MetadataTable,
            ..
        }
    ));
    Ok(())
}

#[test]
fn bat_entries() -> Result<()> {
    let dir = scratch();
    // Block 1 pointing far past the end of the file.
    let p = fixture(dir.path(), "past")?;
    patch(&p, BAT + 8, &bat_entry(4096, 6))?;
    let e = open_err(&p);
    assert!(matches!(e, VhdxError::BatPastEnd { index: 1, .. }), "{e:?}");
    // A reserved state.
    let p = fixture(dir.path(), "state")?;
    patch(&p, BAT + 8, &bat_entry(4, 4))?;
    assert!(matches!(
        open_err(&p),
        VhdxError::BadBatEntry { index: 1, .. }
    ));
    // Two blocks at the same offset.
    let p = fixture(dir.path(), "dup")?;
    let first = std::fs::read(&p)?[BAT as usize..BAT as usize + 8].to_vec();
    patch(&p, BAT + 8, &first)?;
    assert!(matches!(open_err(&p), VhdxError::BadBatEntry { .. }));
    // A block on top of the metadata region.
    let p = fixture(dir.path(), "onmeta")?;
    patch(&p, BAT + 8, &bat_entry(2, 6))?;
    assert!(matches!(open_err(&p), VhdxError::BadBatEntry { .. }));
    // Partially present in a disk without a parent.
    let p = fixture(dir.path(), "partial")?;
    let mut e = first.clone();
    e[0] = (e[0] & !7) | 7;
    patch(&p, BAT, &e)?;
    assert!(matches!(
        open_err(&p),
        VhdxError::BadBatEntry { index: 0, .. }
    ));
    Ok(())
}

#[test]
fn parents_missing_mismatched_looping_too_deep() -> Result<()> {
    let dir = scratch();
    let d = dir.path();
    let size = MIB;
    let opts = CreateOptions {
        block_size: MIB as u32,
        ..CreateOptions::default()
    };
    let base = d.join("base.vhdx");
    vhdx::create(&base, size, &opts)?;
    let base_chain = Chain::open(&base)?;
    let child = d.join("child.vhdx");
    vhdx::create_differencing(&child, &base_chain, &opts)?;
    drop(base_chain);
    assert_eq!(Chain::open(&child)?.layers().len(), 2);

    // Missing parent: named, with the paths tried.
    std::fs::rename(&base, d.join("moved.vhdx"))?;
    match Chain::open(&child).expect_err("missing parent") {
        VhdxError::ParentNotFound { child: c, tried } => {
            assert_eq!(c, child);
            assert!(tried.contains(&base), "{tried:?}");
        }
        e => panic!("unexpected {e:?}"),
    }
    // A different file under the parent's name: linkage mismatch.
    vhdx::create(&base, size, &opts)?;
    let e = Chain::open(&child).expect_err("mismatch");
    assert!(
        matches!(&e, VhdxError::ParentMismatch { child: c, parent, .. } if *c == child && *parent == base),
        "{e:?}"
    );
    let e = Chain::from_paths(&[base.clone(), child.clone()]).expect_err("mismatch");
    assert!(matches!(e, VhdxError::ParentMismatch { .. }));
    // Wrong order in from_paths.
    std::fs::rename(d.join("moved.vhdx"), &base)?;
    let e = Chain::from_paths(&[child.clone(), base.clone()]).expect_err("order");
    assert!(matches!(e, VhdxError::ChainShape { .. }), "{e:?}");
    let e = Chain::from_paths(std::slice::from_ref(&child)).expect_err("alone");
    assert!(matches!(e, VhdxError::ChainShape { .. }), "{e:?}");
    let e = Chain::from_paths(&[base.clone(), child.clone(), child.clone()]).expect_err("loop");
    assert!(matches!(e, VhdxError::ParentLoop { .. }), "{e:?}");

    // A disk whose locator names itself, and two naming each other.
    let base_chain = Chain::open(&base)?;
    let selfp = d.join("self.vhdx");
    let o = CreateOptions {
        parent_relative_path: Some(".\\self.vhdx".into()),
        ..opts.clone()
    };
    vhdx::create_differencing(&selfp, &base_chain, &o)?;
    assert!(matches!(
        Chain::open(&selfp).expect_err("self"),
        VhdxError::ParentLoop { .. }
    ));
    let a = d.join("a.vhdx");
    let b = d.join("b.vhdx");
    vhdx::create_differencing(
        &a,
        &base_chain,
        &CreateOptions {
            parent_relative_path: Some(".\\b.vhdx".into()),
            ..opts.clone()
        },
    )?;
    vhdx::create_differencing(
        &b,
        &base_chain,
        &CreateOptions {
            parent_relative_path: Some(".\\a.vhdx".into()),
            ..opts.clone()
        },
    )?;
    let e = Chain::open(&a).expect_err("cycle");
    assert!(
        matches!(
            e,
            VhdxError::ParentLoop { .. } | VhdxError::ParentMismatch { .. }
        ),
        "{e:?}"
    );

    // Deeper than the cap.
    let mut top = base.clone();
    for i in 0..vhdx::MAX_CHAIN_DEPTH {
        let next = d.join(format!("deep{i}.vhdx"));
        let parent = Chain::open(&top)?;
        vhdx::create_differencing(&next, &parent, &opts)?;
        top = next;
    }
    let e = Chain::open(&top).expect_err("too deep");
    assert!(matches!(e, VhdxError::ChainTooDeep { .. }), "{e:?}");
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 32, .. ProptestConfig::default() })]

    /// Flipping random bytes anywhere in the structures or data never panics: the file
    /// either opens and reads (data damage is not detectable) or gives an error.
    #[test]
    fn random_flips_never_panic(flips in proptest::collection::vec((0u64..5 * MIB, any::<u8>()), 1..6)) {
        let dir = scratch();
        let p = fixture(dir.path(), "flip").expect("fixture");
        let mut data = std::fs::read(&p).expect("read");
        // Aim half the flips at the first 320 KiB and the tables.
        for (i, (off, x)) in flips.iter().enumerate() {
            let off = if i % 2 == 0 { off % (320 * KIB) } else { *off };
            let o = (off as usize).min(data.len() - 1);
            data[o] ^= x | 1;
        }
        std::fs::write(&p, &data).expect("write");
        if let Ok(chain) = Chain::open(&p) {
            let mut buf = vec![0u8; chain.virtual_size() as usize];
            let _ = chain.read_at(&mut buf, 0);
            let _ = chain.map();
        }
        prop_assert_eq!(std::fs::read(&p).expect("read"), data);
    }
}
