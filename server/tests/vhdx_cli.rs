//! `strata vhdx` against qemu-img: to-raw of qemu-img's files equals `qemu-img convert -O
//! raw`; from-raw output passes `qemu-img check` and converts back to the input; chains via
//! --parent; info JSON; check names faults with a non-zero exit; hash is blake3.

use std::path::Path;
use std::process::{Command, Output};

use anyhow::{bail, Context, Result};

const MIB: usize = 1 << 20;

fn strata(args: &[&str]) -> Result<Output> {
    Command::new(env!("CARGO_BIN_EXE_strata"))
        .arg("vhdx")
        .args(args)
        .output()
        .context("running strata")
}

fn ok(args: &[&str]) -> Result<String> {
    let out = strata(args)?;
    if !out.status.success() {
        bail!(
            "strata vhdx {args:?}: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn qemu_img(args: &[&str]) -> Result<()> {
    let out = Command::new("qemu-img")
        .args(args)
        .output()
        .context("qemu-img not found: install it with `apt-get install qemu-utils`")?;
    if !out.status.success() {
        bail!(
            "qemu-img {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(())
}

fn s(p: &Path) -> &str {
    p.to_str().expect("utf-8 path")
}

/// Deterministic pseudo-random bytes with zero runs (xorshift; no extra dependency).
fn image(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    let mut v = vec![0u8; len];
    for (i, chunk) in v.chunks_mut(64 * 1024).enumerate() {
        if i % 3 == 1 {
            continue;
        }
        for b in chunk.iter_mut() {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            *b = x as u8;
        }
    }
    v
}

#[test]
fn round_trips_with_qemu_img() -> Result<()> {
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?;
    let d = dir.path();
    let raw = d.join("in.raw");
    let data = image(1, 9 * MIB + 4096);
    std::fs::write(&raw, &data)?;

    // qemu-img writes, strata reads.
    let q = d.join("q.vhdx");
    qemu_img(&[
        "convert",
        "-f",
        "raw",
        "-O",
        "vhdx",
        "-o",
        "subformat=dynamic,block_size=8388608",
        s(&raw),
        s(&q),
    ])?;
    let out = d.join("q.raw");
    ok(&["to-raw", s(&q), s(&out)])?;
    assert!(std::fs::read(&out)? == data, "to-raw of a qemu-img file");

    // strata writes, qemu-img reads.
    let v = d.join("s.vhdx");
    ok(&["from-raw", s(&raw), s(&v), "--block-size", "1M"])?;
    qemu_img(&["check", "-f", "vhdx", s(&v)])?;
    let back = d.join("s.raw");
    qemu_img(&["convert", "-f", "vhdx", "-O", "raw", s(&v), s(&back)])?;
    assert!(
        std::fs::read(&back)? == data,
        "qemu-img convert of from-raw output"
    );
    ok(&["check", s(&v)])?;

    // A differencing layer holding a few changed sectors.
    let mut changed = data.clone();
    changed[5 * MIB + 512..5 * MIB + 1024].fill(0xEE);
    let raw2 = d.join("in2.raw");
    std::fs::write(&raw2, &changed)?;
    let child = d.join("child.vhdx");
    ok(&[
        "from-raw",
        s(&raw2),
        s(&child),
        "--parent",
        s(&v),
        "--block-size",
        "2M",
    ])?;
    let out2 = d.join("child.raw");
    ok(&["to-raw", s(&child), s(&out2)])?;
    assert!(std::fs::read(&out2)? == changed, "to-raw through the chain");

    let info: serde_json::Value = serde_json::from_str(&ok(&["info", s(&child)])?)?;
    assert_eq!(info["type"], "differencing");
    assert_eq!(info["virtual_size"], data.len() as u64);
    assert_eq!(info["block_size"], 2 * MIB as u64);
    assert_eq!(info["logical_sector_size"], 512);
    assert_eq!(
        info["allocated_bytes"],
        (2 * MIB + MIB) as u64,
        "one block and one sector bitmap"
    );
    assert_eq!(info["chain"][0]["type"], "dynamic");
    let base_info: serde_json::Value = serde_json::from_str(&ok(&["info", s(&v)])?)?;
    assert_eq!(info["parent"]["linkage"], base_info["data_write_guid"]);
    assert_eq!(info["parent"]["path"], serde_json::json!(v));

    // hash is the blake3 of the file.
    let line = ok(&["hash", s(&child)])?;
    let want = blake3::hash(&std::fs::read(&child)?).to_hex().to_string();
    assert!(line.starts_with(&want), "{line}");
    Ok(())
}

#[test]
fn check_names_the_fault_and_fails() -> Result<()> {
    let dir = tempfile::tempdir_in("/dev/shm").or_else(|_| tempfile::tempdir())?;
    let d = dir.path();
    let raw = d.join("in.raw");
    std::fs::write(&raw, image(2, 3 * MIB))?;
    let v = d.join("v.vhdx");
    ok(&["from-raw", s(&raw), s(&v), "--block-size", "1M"])?;
    // Point BAT entry 1 far past the end of the file.
    let mut bytes = std::fs::read(&v)?;
    let at = 3 * MIB + 8;
    bytes[at..at + 8].copy_from_slice(&((4096u64 << 20) | 6).to_le_bytes());
    std::fs::write(&v, &bytes)?;
    let out = strata(&["check", s(&v)])?;
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("BAT entry 1") && text.contains("past the end"),
        "{text}"
    );
    // A missing parent is named too.
    let out = strata(&["info", "/nonexistent.vhdx"])?;
    assert!(!out.status.success());
    Ok(())
}
