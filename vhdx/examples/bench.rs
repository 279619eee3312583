//! VHDX engine benchmark: chain read throughput through 1 and 3 layers against
//! `qemu-img convert -O raw` of the same base, and blake3 hashing against sha256sum.
//! Prints figures and ratios measured in the same run; asserts nothing about time.
//!
//! Run with scripts/bench-vhdx.sh (release build; files in /dev/shm).

use std::path::PathBuf;
use std::process::Command;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{RngCore, SeedableRng};
use vhdx::{Chain, CreateOptions};

const MIB: u64 = 1 << 20;

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(())
}

fn gbps(bytes: u64, d: Duration) -> f64 {
    bytes as f64 / d.as_secs_f64() / 1e9
}

fn main() -> Result<()> {
    let size: u64 = std::env::var("BENCH_SIZE_MIB")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(1024)
        * MIB;
    let runs: usize = std::env::var("BENCH_RUNS")
        .ok()
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = PathBuf::from(
        std::env::var("BENCH_DIR").unwrap_or_else(|_| "/dev/shm/strata-vhdx-bench".into()),
    );
    std::fs::create_dir_all(&dir)?;
    let p = |n: &str| dir.join(n);

    // Inputs: random data (incompressible, every block allocated), then two layers that each
    // change 1% of the sectors, spread over the disk.
    eprintln!(
        "preparing {} MiB images in {} ...",
        size / MIB,
        dir.display()
    );
    let mut rng = rand::rngs::StdRng::seed_from_u64(1);
    let mut img = vec![0u8; size as usize];
    rng.fill_bytes(&mut img);
    std::fs::write(p("r0.raw"), &img)?;
    let opts = CreateOptions {
        block_size: 32 * MIB as u32,
        ..CreateOptions::default()
    };
    run(Command::new("qemu-img")
        .args([
            "convert",
            "-f",
            "raw",
            "-O",
            "vhdx",
            "-o",
            "subformat=dynamic,block_size=33554432",
        ])
        .arg(p("r0.raw"))
        .arg(p("qbase.vhdx")))?;
    vhdx::from_raw(&p("r0.raw"), &p("base.vhdx"), None, &opts)?;
    for layer in 1..=2 {
        let sectors = size / 512;
        for _ in 0..sectors / 100 {
            let s = (rng.next_u64() % sectors) as usize;
            rng.fill_bytes(&mut img[s * 512..s * 512 + 512]);
        }
        std::fs::write(p("rn.raw"), &img)?;
        let parent = Chain::open(p(&format!(
            "{}.vhdx",
            if layer == 1 {
                "base".into()
            } else {
                format!("l{}", layer - 1)
            }
        )))?;
        vhdx::from_raw(
            &p("rn.raw"),
            &p(&format!("l{layer}.vhdx")),
            Some(&parent),
            &opts,
        )?;
    }
    std::fs::remove_file(p("rn.raw"))?;
    let out = p("out.raw");
    let rm = || -> Result<()> {
        let _ = std::fs::remove_file(&out);
        Ok(())
    };

    // Every measurement once per round, rounds repeated, the best of each kept: load from
    // other work on the machine then hits every column alike.
    let c1 = Chain::open(p("base.vhdx"))?;
    let c3 = Chain::open(p("l2.vhdx"))?;
    let cq = Chain::open(p("qbase.vhdx"))?;
    let read_all = |chain: &Chain| -> Result<()> {
        let mut buf = vec![0u8; 8 * MIB as usize];
        let mut off = 0;
        while off < size {
            chain.read_at(&mut buf, off)?;
            off += buf.len() as u64;
        }
        Ok(())
    };
    let hash = |rayon: bool| -> Result<()> {
        let mut h = blake3::Hasher::new();
        if rayon {
            h.update_mmap_rayon(p("r0.raw"))?;
        } else {
            h.update_mmap(p("r0.raw"))?;
        }
        std::hint::black_box(h.finalize());
        Ok(())
    };
    let qemu = |src: &str| {
        run(Command::new("qemu-img")
            .args(["convert", "-f", "vhdx", "-O", "raw"])
            .arg(p(src))
            .arg(&out))
    };
    let mut t = [Duration::MAX; 10];
    for round in 0..runs {
        eprintln!("round {} of {runs}", round + 1);
        let mut timed = |i: usize, f: &mut dyn FnMut() -> Result<()>| -> Result<()> {
            rm()?;
            let start = Instant::now();
            f()?;
            t[i] = t[i].min(start.elapsed());
            Ok(())
        };
        timed(0, &mut || qemu("qbase.vhdx"))?;
        timed(1, &mut || qemu("base.vhdx"))?;
        timed(2, &mut || {
            vhdx::to_raw(&cq, &out).map(|_| ()).map_err(Into::into)
        })?;
        timed(3, &mut || {
            vhdx::to_raw(&c1, &out).map(|_| ()).map_err(Into::into)
        })?;
        timed(4, &mut || {
            vhdx::to_raw(&c3, &out).map(|_| ()).map_err(Into::into)
        })?;
        timed(5, &mut || read_all(&c1))?;
        timed(6, &mut || read_all(&c3))?;
        timed(7, &mut || hash(true))?;
        timed(8, &mut || hash(false))?;
        if round < 2 {
            timed(9, &mut || run(Command::new("sha256sum").arg(p("r0.raw"))))?;
        }
    }
    rm()?;
    let [t_qemu, t_qemu_ours, t_ours_q, t_ours1, t_ours3, t_read1, t_read3, t_b3, t_b3_1, t_sha] =
        t;
    let mib = size / MIB;
    println!("VHDX engine benchmark: {mib} MiB virtual disk, random data, 32 MiB blocks, files and output in {}", dir.display());
    println!("best of {runs} rounds (each round runs every case once); GB/s = 10^9 bytes of virtual disk per second");
    println!(
        "3 layers: base + 2 differencing layers, each changing 1% of the sectors at random places,"
    );
    println!("so every block of both layers is partially present (worst case for sector bitmaps)");
    println!();
    println!(
        "{:<58} {:>8} {:>8}",
        "read the whole disk to a raw file in /dev/shm", "s", "GB/s"
    );
    for (name, t) in [
        ("qemu-img convert -O raw, base written by qemu-img", t_qemu),
        (
            "qemu-img convert -O raw, base written by strata",
            t_qemu_ours,
        ),
        (
            "strata to_raw, base written by qemu-img (1 layer)",
            t_ours_q,
        ),
        ("strata to_raw, base written by strata (1 layer)", t_ours1),
        (
            "strata to_raw, base + 2 differencing layers (3 layers)",
            t_ours3,
        ),
    ] {
        println!(
            "{:<58} {:>8.3} {:>8.2}",
            name,
            t.as_secs_f64(),
            gbps(size, t)
        );
    }
    println!();
    println!(
        "{:<58} {:>8} {:>8}",
        "read the whole disk into memory (8 MiB read_at calls)", "s", "GB/s"
    );
    println!(
        "{:<58} {:>8.3} {:>8.2}",
        "strata Chain::read_at, 1 layer",
        t_read1.as_secs_f64(),
        gbps(size, t_read1)
    );
    println!(
        "{:<58} {:>8.3} {:>8.2}",
        "strata Chain::read_at, 3 layers",
        t_read3.as_secs_f64(),
        gbps(size, t_read3)
    );
    println!();
    println!(
        "{:<58} {:>8} {:>8}",
        "hash a file of the disk's size", "s", "GB/s"
    );
    println!(
        "{:<58} {:>8.3} {:>8.2}",
        "blake3 (mmap, rayon, all cores)",
        t_b3.as_secs_f64(),
        gbps(size, t_b3)
    );
    println!(
        "{:<58} {:>8.3} {:>8.2}",
        "blake3 (mmap, one thread)",
        t_b3_1.as_secs_f64(),
        gbps(size, t_b3_1)
    );
    println!(
        "{:<58} {:>8.3} {:>8.2}",
        "sha256sum",
        t_sha.as_secs_f64(),
        gbps(size, t_sha)
    );
    println!();
    println!("ratios (ours / peer, higher is better for us):");
    println!(
        "  to_raw 1 layer vs qemu-img convert (same qemu-written base): {:.2}x",
        t_qemu.as_secs_f64() / t_ours_q.as_secs_f64()
    );
    println!(
        "  to_raw 1 layer vs qemu-img convert (same strata-written base): {:.2}x",
        t_qemu_ours.as_secs_f64() / t_ours1.as_secs_f64()
    );
    println!(
        "  to_raw 3 layers vs qemu-img convert of the base: {:.2}x",
        t_qemu.as_secs_f64() / t_ours3.as_secs_f64()
    );
    println!(
        "  blake3 (all cores) vs sha256sum: {:.1}x",
        t_sha.as_secs_f64() / t_b3.as_secs_f64()
    );
    if std::env::var_os("BENCH_KEEP").is_none() {
        std::fs::remove_dir_all(&dir)?;
    }
    Ok(())
}
