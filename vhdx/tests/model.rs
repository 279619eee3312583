//! Property tests: random interleaved reads and writes through a chain agree with an
//! in-memory model of the disk; parents are never written; `map()` agrees with `read_at`;
//! the written file reopens to the same contents.

mod common;

use anyhow::Result;
use common::*;
use proptest::prelude::*;
use vhdx::{Chain, CreateOptions};

#[derive(Debug, Clone)]
enum Op {
    Write { offset: u64, len: usize, byte: u8 },
    Read { offset: u64, len: usize },
}

fn ops(size: u64) -> impl Strategy<Value = Vec<Op>> {
    let op = prop_oneof![
        (0..size, 1usize..300_000, any::<u8>()).prop_map(|(offset, len, byte)| Op::Write {
            offset,
            len,
            byte
        }),
        (0..size, 1usize..300_000).prop_map(|(offset, len)| Op::Read { offset, len }),
        // Small sector-sized writes: partially present blocks.
        (0..size / 512, 1usize..4, any::<u8>()).prop_map(|(s, n, byte)| Op::Write {
            offset: s * 512,
            len: n * 512,
            byte
        }),
    ];
    proptest::collection::vec(op, 1..24)
}

fn run(depth: usize, lss: u32, ops: &[Op]) -> Result<()> {
    let dir = scratch();
    let size = 3 * MIB + 8 * 4096;
    let opts = CreateOptions {
        block_size: MIB as u32,
        logical_sector_size: lss,
        ..CreateOptions::default()
    };
    let base_img = random_raw(5, size);
    let raw = dir.path().join("base.raw");
    std::fs::write(&raw, &base_img)?;
    let mut paths = vec![dir.path().join("base.vhdx")];
    vhdx::from_raw(&raw, &paths[0], None, &opts)?;
    for i in 1..depth {
        let parent = Chain::from_paths(&paths)?;
        let p = dir.path().join(format!("d{i}.vhdx"));
        vhdx::create_differencing(&p, &parent, &opts)?;
        paths.push(p);
    }
    let parent_bytes: Vec<Vec<u8>> = paths[..depth - 1]
        .iter()
        .map(std::fs::read)
        .collect::<std::io::Result<_>>()?;
    let mut model = base_img.clone();
    let mut chain = Chain::from_paths_writable(&paths)?;
    for op in ops {
        match *op {
            Op::Write { offset, len, byte } => {
                let len = len.min((size - offset) as usize);
                let data: Vec<u8> = (0..len).map(|i| byte.wrapping_add(i as u8)).collect();
                chain.write_at(&data, offset)?;
                model[offset as usize..offset as usize + len].copy_from_slice(&data);
            }
            Op::Read { offset, len } => {
                let len = len.min((size - offset) as usize);
                let mut buf = vec![0u8; len];
                chain.read_at(&mut buf, offset)?;
                assert_same("read", &buf, &model[offset as usize..offset as usize + len]);
            }
        }
    }
    assert_same("whole disk", &read_chain(&chain)?, &model);
    assert_same("via map", &read_via_map(&chain)?, &model);
    drop(chain);
    for (p, before) in paths.iter().zip(&parent_bytes) {
        assert_eq!(
            &std::fs::read(p)?,
            before,
            "parent {} was written",
            p.display()
        );
    }
    let reopened = Chain::open(paths.last().expect("top"))?;
    assert_same("reopened", &read_chain(&reopened)?, &model);
    // qemu-img 7.2 opens only 512-byte-sector VHDX files.
    if depth == 1 && lss == 512 {
        run_qemu_img(&["check", "-f", "vhdx", s(&paths[0])])?;
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 16, .. ProptestConfig::default() })]

    #[test]
    fn writes_through_a_chain_match_a_model(depth in 1usize..=3, big in any::<bool>(), ops in ops(3 * MIB + 8 * 4096)) {
        let lss = if big { 4096 } else { 512 };
        run(depth, lss, &ops).map_err(|e| TestCaseError::fail(format!("{e:#}")))?;
    }
}

#[test]
fn out_of_range_and_read_only_are_errors() -> Result<()> {
    let dir = scratch();
    let p = dir.path().join("x.vhdx");
    vhdx::create(
        &p,
        MIB,
        &CreateOptions {
            block_size: MIB as u32,
            ..CreateOptions::default()
        },
    )?;
    let mut ro = Chain::open(&p)?;
    assert!(matches!(
        ro.write_at(&[1; 512], 0),
        Err(vhdx::VhdxError::ReadOnly { .. })
    ));
    let mut rw = Chain::open_writable(&p)?;
    let mut buf = [0u8; 2];
    assert!(matches!(
        rw.read_at(&mut buf, MIB - 1),
        Err(vhdx::VhdxError::OutOfRange { .. })
    ));
    assert!(matches!(
        rw.write_at(&[1; 2], MIB - 1),
        Err(vhdx::VhdxError::OutOfRange { .. })
    ));
    assert!(matches!(
        rw.read_at(&mut buf, u64::MAX),
        Err(vhdx::VhdxError::OutOfRange { .. })
    ));
    rw.write_at(&[9; 3], MIB - 3)?;
    rw.read_at(&mut buf, MIB - 2)?;
    assert_eq!(buf, [9, 9]);
    Ok(())
}
