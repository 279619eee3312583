//! Differencing chains: raw images R0..R2 written as a base plus differencing disks read
//! back as the last image exactly, through `Chain::open` (parent locators) and
//! `Chain::from_paths` (caller's order), by `read_at` and by following `map()`.

mod common;

use std::path::PathBuf;

use anyhow::Result;
use common::*;
use vhdx::{Chain, CreateOptions, DiskType, Vhdx};

fn build_chain(
    dir: &std::path::Path,
    images: &[Vec<u8>],
    block_mib: u32,
    lss: u32,
) -> Result<Vec<PathBuf>> {
    let mut paths: Vec<PathBuf> = Vec::new();
    for (i, img) in images.iter().enumerate() {
        let raw = dir.join(format!("r{i}.raw"));
        std::fs::write(&raw, img)?;
        let out = dir.join(format!("layer{i}.vhdx"));
        let parent = if paths.is_empty() {
            None
        } else {
            Some(Chain::from_paths(&paths)?)
        };
        let opts = CreateOptions {
            block_size: block_mib * MIB as u32,
            logical_sector_size: lss,
            ..CreateOptions::default()
        };
        vhdx::from_raw(&raw, &out, parent.as_ref(), &opts)?;
        paths.push(out);
    }
    Ok(paths)
}

#[test]
fn chains_of_depth_one_to_three_read_back_the_last_image() -> Result<()> {
    for (lss, block_mib) in [(512u32, 1u32), (4096, 2), (512, 8)] {
        let dir = scratch();
        let size = 11 * MIB + 8 * 4096;
        let r0 = random_raw(1, size);
        let r1 = mutate(2, &r0, 40, lss as usize);
        let r2 = mutate(3, &r1, 40, lss as usize);
        let images = [r0, r1, r2];
        for depth in 1..=3 {
            let sub = dir.path().join(format!("d{depth}"));
            std::fs::create_dir(&sub)?;
            let paths = build_chain(&sub, &images[..depth], block_mib, lss)?;
            let top = paths.last().expect("top");
            let want = &images[depth - 1];
            let chain = Chain::open(top)?;
            assert_eq!(chain.layers().len(), depth);
            assert_eq!(chain.logical_sector_size(), lss);
            assert_same(
                &format!("lss {lss} depth {depth}: Chain::open"),
                &read_chain(&chain)?,
                want,
            );
            assert_same(
                &format!("lss {lss} depth {depth}: map"),
                &read_via_map(&chain)?,
                want,
            );
            let chain = Chain::from_paths(&paths)?;
            assert_same(
                &format!("lss {lss} depth {depth}: from_paths"),
                &read_chain(&chain)?,
                want,
            );
            let out = sub.join("out.raw");
            vhdx::to_raw(&chain, &out)?;
            assert_same(
                &format!("lss {lss} depth {depth}: to_raw"),
                &std::fs::read(&out)?,
                want,
            );
            for (i, l) in chain.layers().iter().enumerate() {
                let want_type = if i == 0 {
                    DiskType::Dynamic
                } else {
                    DiskType::Differencing
                };
                assert_eq!(l.disk_type(), want_type);
            }
        }
    }
    Ok(())
}

#[test]
fn differencing_size_grows_with_changed_sectors_not_disk_size() -> Result<()> {
    let dir = scratch();
    // A 64 MiB virtual disk, mostly zero; the child changes a handful of sectors.
    let size = 64 * MIB;
    let base = vec![0u8; size as usize];
    let base_raw = dir.path().join("base.raw");
    std::fs::write(&base_raw, &base)?;
    let base_vhdx = dir.path().join("base.vhdx");
    let opts = CreateOptions {
        block_size: MIB as u32,
        ..CreateOptions::default()
    };
    vhdx::from_raw(&base_raw, &base_vhdx, None, &opts)?;
    let parent = Chain::open(&base_vhdx)?;
    let mut sizes = Vec::new();
    for (n, blocks_touched) in [(1usize, 1u64), (4, 4), (16, 16)] {
        let mut img = base.clone();
        for k in 0..n {
            // One sector in each of n distinct 1 MiB blocks.
            let at = (k as u64 * 3 + 1) * MIB + 512 * 5;
            img[at as usize..at as usize + 512].fill(0xA5);
        }
        let raw = dir.path().join(format!("c{n}.raw"));
        std::fs::write(&raw, &img)?;
        let out = dir.path().join(format!("c{n}.vhdx"));
        let stats = vhdx::from_raw(&raw, &out, Some(&parent), &opts)?;
        assert_eq!(
            stats.sectors, n as u64,
            "only the changed sectors are stored"
        );
        assert_eq!(stats.blocks, blocks_touched);
        let file_size = std::fs::metadata(&out)?.len();
        // Fixed overhead (4 MiB of headers, log, metadata, BAT) + one block per touched
        // block + one sector bitmap block.
        assert_eq!(file_size, 4 * MIB + blocks_touched * MIB + MIB, "n={n}");
        sizes.push(file_size);
        let chain = Chain::open(&out)?;
        assert_same("changed image", &read_chain(&chain)?, &img);
        assert_eq!(
            Vhdx::open(&out)?.allocated_bytes(),
            blocks_touched * MIB + MIB
        );
    }
    assert!(sizes.windows(2).all(|w| w[0] < w[1]));
    Ok(())
}

#[test]
fn to_raw_leaves_holes_where_the_chain_has_no_data() -> Result<()> {
    use std::os::unix::fs::MetadataExt;
    let dir = scratch();
    let p = dir.path().join("sparse.vhdx");
    let mut f = vhdx::create(
        &p,
        64 * MIB,
        &CreateOptions {
            block_size: MIB as u32,
            ..CreateOptions::default()
        },
    )?;
    drop(f);
    let mut chain = Chain::open_writable(&p)?;
    chain.write_at(&[7u8; 4096], 40 * MIB)?;
    let out = dir.path().join("sparse.raw");
    assert_eq!(
        vhdx::to_raw(&chain, &out)?,
        MIB,
        "one allocated block copied"
    );
    let meta = std::fs::metadata(&out)?;
    assert_eq!(meta.len(), 64 * MIB);
    assert!(
        meta.blocks() * 512 <= 8 * MIB,
        "{} bytes allocated",
        meta.blocks() * 512
    );
    let data = std::fs::read(&out)?;
    assert!(data[40 * MIB as usize..40 * MIB as usize + 4096]
        .iter()
        .all(|&b| b == 7));
    assert_eq!(data.iter().filter(|&&b| b != 0).count(), 4096);
    f = Vhdx::open(&p)?;
    assert_eq!(f.allocated_bytes(), MIB);
    Ok(())
}
