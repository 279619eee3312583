//! `differencing_from_blocks`: given the changed blocks, it writes the same bytes as
//! `from_raw` does from the whole image, reads back through the chain as the new image,
//! and rejects blocks out of order, of the wrong length or past the disk.

mod common;

use anyhow::Result;
use common::*;
use vhdx::{Chain, CreateOptions};

fn blocks_of(a: &[u8], b: &[u8], bs: usize) -> Vec<(u64, Vec<u8>)> {
    a.chunks(bs)
        .zip(b.chunks(bs))
        .enumerate()
        .filter(|(_, (x, y))| x != y)
        .map(|(i, (_, y))| (i as u64, y.to_vec()))
        .collect()
}

#[test]
fn same_bytes_as_from_raw_and_reads_back() -> Result<()> {
    let dir = scratch();
    // A partial last block (5.5 MiB disk) with 1 MiB blocks.
    let size = 5 * MIB + MIB / 2;
    let r0 = random_raw(9001, size);
    let r1 = mutate(9002, &r0, 6, 512);
    let (p0, p1) = (dir.path().join("r0.raw"), dir.path().join("r1.raw"));
    std::fs::write(&p0, &r0)?;
    std::fs::write(&p1, &r1)?;
    let base = dir.path().join("base.vhdx");
    let g = |n| uuid::Uuid::from_u128(n);
    for (log, whole) in [(true, false), (false, true), (false, false)] {
        let opts = CreateOptions {
            block_size: MIB as u32,
            log,
            whole_blocks: whole,
            ..CreateOptions::deterministic(g(1), g(2), g(3))
        };
        vhdx::from_raw(&p0, &base, None, &opts)?;
        let parent = Chain::open(&base)?;
        let copts = CreateOptions {
            parent_relative_path: Some("base.vhdx".into()),
            ..CreateOptions::deterministic(g(4), g(5), g(6))
        };
        let copts = CreateOptions {
            block_size: MIB as u32,
            log,
            whole_blocks: whole,
            ..copts
        };
        let (a, b) = (dir.path().join("a.vhdx"), dir.path().join("b.vhdx"));
        let sa = vhdx::from_raw(&p1, &a, Some(&parent), &copts)?;
        let changed = blocks_of(&r0, &r1, MIB as usize);
        assert!(!changed.is_empty());
        // Unchanged blocks given as well are left to the parent.
        let mut given = changed.clone();
        given.insert(0, (0, r1[..MIB as usize].to_vec()));
        given.sort_by_key(|x| x.0);
        given.dedup_by_key(|x| x.0);
        let sb = vhdx::differencing_from_blocks(
            &b,
            &parent,
            &copts,
            given.iter().map(|(i, d)| (*i, d.as_slice())),
        )?;
        assert_eq!(sa, sb, "log {log} whole {whole}: stats");
        assert!(
            std::fs::read(&a)? == std::fs::read(&b)?,
            "log {log} whole {whole}: differs from from_raw's output"
        );
        let chain = Chain::from_paths(&[base.clone(), b.clone()])?;
        assert_same("chain read", &read_chain(&chain)?, &r1);
        assert_same("chain map", &read_via_map(&chain)?, &r1);
        if whole {
            assert_eq!(sb.partial_blocks, 0);
        }
    }
    Ok(())
}

#[test]
fn bad_block_lists_are_refused() -> Result<()> {
    let dir = scratch();
    let size = 4 * MIB;
    let p0 = dir.path().join("r0.raw");
    std::fs::write(&p0, random_raw(9101, size))?;
    let base = dir.path().join("base.vhdx");
    let opts = CreateOptions {
        block_size: MIB as u32,
        ..CreateOptions::default()
    };
    vhdx::from_raw(&p0, &base, None, &opts)?;
    let parent = Chain::open(&base)?;
    let out = dir.path().join("out.vhdx");
    let block = vec![7u8; MIB as usize];
    type Case<'a> = (Vec<(u64, &'a [u8])>, &'static str);
    let cases: Vec<Case> = vec![
        (vec![(2, &block[..]), (1, &block[..])], "out of order"),
        (vec![(1, &block[..]), (1, &block[..])], "out of order"),
        (vec![(4, &block[..])], "past the disk"),
        (vec![(0, &block[..4096])], "the block is"),
    ];
    for (blocks, want) in cases {
        let err = vhdx::differencing_from_blocks(&out, &parent, &opts, blocks).unwrap_err();
        assert!(
            matches!(err, vhdx::VhdxError::InvalidArgument { .. }),
            "{err}"
        );
        assert!(err.to_string().contains(want), "{err} should say {want:?}");
        assert!(
            !out.exists(),
            "nothing is left at the destination after {want}"
        );
    }
    Ok(())
}
