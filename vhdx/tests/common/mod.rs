//! Shared test helpers: random raw images, qemu-img, scratch directories in /dev/shm.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use rand::{Rng, RngCore, SeedableRng};

pub const MIB: u64 = 1024 * 1024;

/// A scratch directory on tmpfs (fast fsync), removed on drop.
pub fn scratch() -> tempfile::TempDir {
    let base = Path::new("/dev/shm");
    if base.is_dir() {
        tempfile::tempdir_in(base).expect("tempdir in /dev/shm")
    } else {
        tempfile::tempdir().expect("tempdir")
    }
}

/// A raw image of `len` bytes: runs of zeros, random bytes and constant bytes, so that
/// whole blocks are zero and others partly so.
pub fn random_raw(seed: u64, len: u64) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = vec![0u8; len as usize];
    let mut pos = 0usize;
    while pos < v.len() {
        let run = (rng.gen_range(1..=8) * 64 * 1024).min(v.len() - pos);
        let kind = rng.gen_range(0..10);
        let slice = &mut v[pos..pos + run];
        match kind {
            0..=3 => {}
            4..=7 => rng.fill_bytes(slice),
            _ => slice.fill(rng.gen()),
        }
        pos += run;
    }
    v
}

/// `base` with `changes` random sector-sized edits and one whole-block rewrite.
pub fn mutate(seed: u64, base: &[u8], changes: usize, sector: usize) -> Vec<u8> {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let mut v = base.to_vec();
    let sectors = v.len() / sector;
    for _ in 0..changes {
        let s = rng.gen_range(0..sectors);
        let n = rng.gen_range(1..=8).min(sectors - s);
        rng.fill_bytes(&mut v[s * sector..(s + n) * sector]);
    }
    v
}

pub fn qemu_img() -> Result<PathBuf> {
    let p = PathBuf::from("/usr/bin/qemu-img");
    if !p.exists() {
        bail!(
            "qemu-img not found: install it with `apt-get install qemu-utils` (scripts/setup.sh)"
        );
    }
    Ok(p)
}

/// Runs qemu-img with `args`, failing with its output on a non-zero exit.
pub fn run_qemu_img(args: &[&str]) -> Result<String> {
    let out = Command::new(qemu_img()?)
        .args(args)
        .output()
        .context("running qemu-img")?;
    if !out.status.success() {
        bail!(
            "qemu-img {:?} failed: {}\n{}",
            args,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

pub fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Reads the whole virtual disk of a chain.
pub fn read_chain(chain: &vhdx::Chain) -> Result<Vec<u8>> {
    let mut buf = vec![0u8; chain.virtual_size() as usize];
    // Odd-sized reads exercise the extent splitting.
    let mut pos = 0usize;
    let mut step = 3 * 1024 * 1024 + 512;
    while pos < buf.len() {
        let n = step.min(buf.len() - pos);
        chain.read_at(&mut buf[pos..pos + n], pos as u64)?;
        pos += n;
        step = if step > 1_000_000 {
            4096 * 7
        } else {
            5 * 1024 * 1024
        };
    }
    Ok(buf)
}

/// Reads the whole virtual disk by following `chain.map()` with plain file reads.
pub fn read_via_map(chain: &vhdx::Chain) -> Result<Vec<u8>> {
    use std::os::unix::fs::FileExt;
    let mut buf = vec![0u8; chain.virtual_size() as usize];
    let files: Vec<std::fs::File> = chain
        .layers()
        .iter()
        .map(|l| std::fs::File::open(l.path()))
        .collect::<std::io::Result<_>>()?;
    let lss = u64::from(chain.logical_sector_size());
    let mut expect_at = 0;
    for e in chain.map()? {
        assert_eq!(e.virtual_offset, expect_at, "extents are contiguous");
        assert_eq!(e.virtual_offset % lss, 0, "sector aligned offset");
        assert_eq!(e.length % lss, 0, "sector aligned length");
        assert!(e.length > 0);
        expect_at += e.length;
        let dst = &mut buf[e.virtual_offset as usize..(e.virtual_offset + e.length) as usize];
        match e.source {
            vhdx::Source::Zero => dst.fill(0),
            vhdx::Source::File {
                layer_index,
                file_offset,
            } => files[layer_index].read_exact_at(dst, file_offset)?,
        }
    }
    assert_eq!(expect_at, chain.virtual_size());
    Ok(buf)
}

/// Asserts two byte slices are equal, reporting the first difference instead of dumping.
pub fn assert_same(what: &str, got: &[u8], want: &[u8]) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    if let Some(i) = got.iter().zip(want).position(|(a, b)| a != b) {
        panic!("{what}: first difference at byte {i} (sector {})", i / 512);
    }
}
