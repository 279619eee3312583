//! Open + read + map of damaged VHDX files. The input is either a whole file (first byte
//! 0) or a list of patches `(offset: u32 LE, len: u8, bytes)` applied to a valid 5 MiB
//! template (two allocated blocks, one partially present block in a differencing child),
//! with an optional truncation, so the fuzzer reaches the BAT, metadata and bitmap code
//! without inventing megabytes of structure.
#![no_main]

use std::path::PathBuf;
use std::sync::OnceLock;

use vhdx::{Chain, CreateOptions, Vhdx};

struct Templates {
    dir: PathBuf,
    base: Vec<u8>,
    child: Vec<u8>,
}

fn templates() -> &'static Templates {
    static T: OnceLock<Templates> = OnceLock::new();
    T.get_or_init(|| {
        let dir = std::path::Path::new("/dev/shm").join(format!("vhdx-fuzz-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("fuzz dir");
        let mut img = vec![0u8; 3 << 20];
        img[..1 << 20].fill(0x11);
        img[(2 << 20) + 4096..(2 << 20) + 8192].fill(0x22);
        let raw = dir.join("t.raw");
        std::fs::write(&raw, &img).expect("raw");
        let opts = CreateOptions { block_size: 1 << 20, ..CreateOptions::deterministic(
            vhdx::Uuid::from_u128(1), vhdx::Uuid::from_u128(2), vhdx::Uuid::from_u128(3)) };
        let base = dir.join("base.vhdx");
        vhdx::from_raw(&raw, &base, None, &opts).expect("base");
        img[(1 << 20) + 512..(1 << 20) + 1024].fill(0x33);
        std::fs::write(&raw, &img).expect("raw");
        let parent = Chain::open(&base).expect("chain");
        let child = dir.join("child.vhdx");
        vhdx::from_raw(&raw, &child, Some(&parent), &opts).expect("child");
        Templates { base: std::fs::read(&base).expect("read"), child: std::fs::read(&child).expect("read"), dir }
    })
}

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    let t = templates();
    let Some((&mode, rest)) = data.split_first() else { return };
    let mut file = match mode % 3 {
        0 => rest.to_vec(),
        1 => t.base.clone(),
        _ => t.child.clone(),
    };
    if mode % 3 != 0 {
        let mut r = rest;
        while r.len() >= 5 {
            let off = u32::from_le_bytes([r[0], r[1], r[2], r[3]]) as usize;
            let len = r[4] as usize;
            r = &r[5..];
            if off == u32::MAX as usize {
                file.truncate(len << 12);
                continue;
            }
            let n = len.min(r.len());
            let off = off % file.len().max(1);
            let end = (off + n).min(file.len());
            file[off..end].copy_from_slice(&r[..end - off]);
            r = &r[n..];
        }
    }
    // The child's parent locator names base.vhdx next to it, which stays pristine; damaged
    // bases are written under another name.
    let path = t.dir.join(if mode % 3 == 2 { "child.vhdx" } else { "input.vhdx" });
    std::fs::write(&path, &file).expect("write input");
    let before = std::fs::read(&path).expect("read back");
    if let Ok(f) = Vhdx::open(&path) {
        let _ = f.check();
        let _ = f.allocated_bytes();
    }
    if let Ok(chain) = Chain::open(&path) {
        let size = chain.virtual_size().min(8 << 20) as usize;
        let mut buf = vec![0u8; size];
        let _ = chain.read_at(&mut buf, 0);
        let _ = chain.map();
        let _ = vhdx::Chain::from_paths(&[t.dir.join("base.vhdx"), path.clone()]);
    }
    assert_eq!(std::fs::read(&path).expect("read"), before, "opening wrote to the file");
});
