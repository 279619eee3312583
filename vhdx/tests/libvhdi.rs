//! Differencing disks we write, read by a second, independent peer: Debian's libvhdi tools
//! (`vhdiinfo`, `vhdimount`, package libvhdi-utils). libvhdi finds the parent locator by its
//! MS-VHDX §2.6.2.6 item ID and the parent file through `absolute_win32_path` (it never
//! matches `relative_path`), taking the name after the last `\` next to the child; it shows
//! each layer of the chain as `vhdi1` (the base) to `vhdiN` (the top).

mod common;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use common::{mutate, random_raw, scratch, MIB};
use vhdx::{Chain, CreateOptions};

fn tool(name: &str) -> Result<PathBuf> {
    let p = PathBuf::from("/usr/bin").join(name);
    if !p.exists() {
        bail!(
            "{name} not found: install it with `apt-get install libvhdi-utils` (scripts/setup.sh)"
        );
    }
    Ok(p)
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The value of `vhdiinfo`'s `label` line ("\tParent identifier\t: ...").
fn vhdiinfo_field(file: &Path, label: &str) -> Result<String> {
    let out = run(Command::new(tool("vhdiinfo")?).arg(file))?;
    out.lines()
        .find_map(|l| {
            let (k, v) = l.split_once(':')?;
            (k.trim() == label).then(|| v.trim().to_string())
        })
        .with_context(|| format!("vhdiinfo {}: no {label:?} line in:\n{out}", file.display()))
}

/// A vhdimount FUSE mount, unmounted on drop whatever happened in between.
struct Mount {
    dir: PathBuf,
    mounted: bool,
}

impl Mount {
    fn new(image: &Path, dir: &Path) -> Result<Mount> {
        std::fs::create_dir_all(dir)?;
        let mut m = Mount {
            dir: dir.to_path_buf(),
            mounted: false,
        };
        // vhdimount daemonizes only once the file system is mounted.
        let res = run(Command::new(tool("vhdimount")?).arg(image).arg(dir));
        m.mounted = is_mountpoint(dir);
        res?;
        if !m.mounted {
            bail!(
                "vhdimount {} {} returned but nothing is mounted there",
                image.display(),
                dir.display()
            );
        }
        Ok(m)
    }
}

fn is_mountpoint(dir: &Path) -> bool {
    let Ok(dir) = dir.canonicalize() else {
        return false;
    };
    std::fs::read_to_string("/proc/self/mountinfo")
        .map(|s| {
            s.lines()
                .any(|l| l.split(' ').nth(4) == Some(&*dir.to_string_lossy()))
        })
        .unwrap_or(false)
}

impl Drop for Mount {
    fn drop(&mut self) {
        if !self.mounted {
            return;
        }
        for cmd in ["fusermount3", "fusermount"] {
            if Command::new(cmd)
                .arg("-u")
                .arg(&self.dir)
                .status()
                .is_ok_and(|s| s.success())
            {
                return;
            }
        }
        let _ = Command::new("umount").arg(&self.dir).status();
    }
}

/// The parent identifier libvhdi reports is the parent's DataWriteGuid, with or without
/// `absolute_win32_path` (before the item ID fix it was nil: libvhdi skipped the item).
#[test]
fn vhdiinfo_reports_the_parent_linkage() -> Result<()> {
    let dir = scratch();
    let size = 4 * MIB;
    let r0 = random_raw(7001, size);
    let r1 = mutate(7002, &r0, 40, 512);
    let (p0, p1) = (dir.path().join("r0.raw"), dir.path().join("r1.raw"));
    std::fs::write(&p0, &r0)?;
    std::fs::write(&p1, &r1)?;
    let base = dir.path().join("base.vhdx");
    vhdx::from_raw(
        &p0,
        &base,
        None,
        &CreateOptions {
            block_size: MIB as u32,
            ..CreateOptions::default()
        },
    )?;
    let base_chain = Chain::open(&base)?;
    let want = base_chain.top().data_write_guid().to_string();
    for absolute in [false, true] {
        let child = dir.path().join(format!("child-{absolute}.vhdx"));
        let opts = CreateOptions {
            record_absolute_parent_path: absolute,
            ..CreateOptions::default()
        };
        vhdx::from_raw(&p1, &child, Some(&base_chain), &opts)?;
        assert_eq!(vhdiinfo_field(&child, "Disk type")?, "Differential");
        assert_eq!(
            vhdiinfo_field(&child, "Parent identifier")?,
            want,
            "absolute_win32_path recorded: {absolute}"
        );
    }
    Ok(())
}

/// vhdimount opens the chain through our parent locator and reads the base as R0 and the
/// top as R1, byte for byte.
#[test]
fn vhdimount_reads_the_chain_like_we_do() -> Result<()> {
    let dir = scratch();
    let size = 6 * MIB;
    let r0 = random_raw(7101, size);
    let r1 = mutate(7102, &r0, 60, 512);
    let (p0, p1) = (dir.path().join("r0.raw"), dir.path().join("r1.raw"));
    std::fs::write(&p0, &r0)?;
    std::fs::write(&p1, &r1)?;
    let layers = dir.path().join("layers");
    std::fs::create_dir(&layers)?;
    let base = layers.join("base.vhdx");
    let child = layers.join("child.vhdx");
    vhdx::from_raw(
        &p0,
        &base,
        None,
        &CreateOptions {
            block_size: 2 * MIB as u32,
            ..CreateOptions::default()
        },
    )?;
    let opts = CreateOptions {
        record_absolute_parent_path: true,
        ..CreateOptions::default()
    };
    vhdx::from_raw(&p1, &child, Some(&Chain::open(&base)?), &opts)?;
    let mnt = Mount::new(&child, &dir.path().join("mnt"))?;
    let layer = |n: u32| -> Result<Vec<u8>> {
        let p = mnt.dir.join(format!("vhdi{n}"));
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    let (bottom, top) = (layer(1)?, layer(2)?);
    assert!(
        !mnt.dir.join("vhdi3").exists(),
        "vhdimount shows more layers than the chain has"
    );
    assert!(bottom == r0, "vhdimount's vhdi1 (base) differs from R0");
    assert!(top == r1, "vhdimount's vhdi2 (top) differs from R1");
    drop(mnt);
    assert!(
        !is_mountpoint(&dir.path().join("mnt")),
        "vhdimount file system still mounted"
    );
    Ok(())
}

/// Files written before the item ID fix (parent locator under {A8D35F2B-...}) still open
/// and read through their parent.
#[test]
fn legacy_parent_locator_item_id_still_reads() -> Result<()> {
    let dir = scratch();
    let size = 2 * MIB;
    let r0 = random_raw(7201, size);
    let r1 = mutate(7202, &r0, 10, 512);
    let (p0, p1) = (dir.path().join("r0.raw"), dir.path().join("r1.raw"));
    std::fs::write(&p0, &r0)?;
    std::fs::write(&p1, &r1)?;
    let base = dir.path().join("base.vhdx");
    let child = dir.path().join("child.vhdx");
    vhdx::from_raw(&p0, &base, None, &CreateOptions::default())?;
    vhdx::from_raw(
        &p1,
        &child,
        Some(&Chain::open(&base)?),
        &CreateOptions::default(),
    )?;
    // The item ID as stored (mixed-endian GUID), and the mistyped one.
    let good: [u8; 16] = [
        0x2d, 0x5f, 0xd3, 0xa8, 0x0b, 0xb3, 0x4d, 0x45, 0xab, 0xf7, 0xd3, 0xd8, 0x48, 0x34, 0xab,
        0x0c,
    ];
    let mut legacy = good;
    legacy[0] = 0x2b;
    let mut bytes = std::fs::read(&child)?;
    let at: Vec<usize> = bytes
        .windows(16)
        .enumerate()
        .filter(|(_, w)| *w == good)
        .map(|(i, _)| i)
        .collect();
    assert_eq!(
        at.len(),
        1,
        "the parent locator item ID appears once in the file"
    );
    bytes[at[0]..at[0] + 16].copy_from_slice(&legacy);
    std::fs::write(&child, &bytes)?;
    let chain = Chain::open(&child)?;
    let mut back = vec![0u8; size as usize];
    chain.read_at(&mut back, 0)?;
    assert!(back == r1, "legacy-ID child does not read back as R1");
    Ok(())
}

/// A log-less base and a log-less, whole-block differencing child (the store's layers)
/// mount with vhdimount and read as R0 and R1; the child holds no sector bitmap block.
#[test]
fn vhdimount_reads_logless_whole_block_layers() -> Result<()> {
    let dir = scratch();
    let size = 6 * MIB;
    let r0 = random_raw(7301, size);
    let r1 = mutate(7302, &r0, 5, 512);
    let (p0, p1) = (dir.path().join("r0.raw"), dir.path().join("r1.raw"));
    std::fs::write(&p0, &r0)?;
    std::fs::write(&p1, &r1)?;
    let layers = dir.path().join("layers");
    std::fs::create_dir(&layers)?;
    let base = layers.join("base.vhdx");
    let child = layers.join("child.vhdx");
    let opts = CreateOptions {
        block_size: MIB as u32,
        log: false,
        record_absolute_parent_path: true,
        ..CreateOptions::default()
    };
    vhdx::from_raw(&p0, &base, None, &opts)?;
    let stats = vhdx::from_raw(
        &p1,
        &child,
        Some(&Chain::open(&base)?),
        &CreateOptions {
            whole_blocks: true,
            ..opts
        },
    )?;
    assert_eq!(
        stats.partial_blocks, 0,
        "whole-block output has no partially present block"
    );
    // Headers, metadata and BAT (1 MiB each) plus the changed blocks, no bitmap block.
    assert_eq!(stats.file_size, (3 + stats.blocks) * MIB);
    let changed = (0..size / MIB)
        .filter(|b| {
            r0[(b * MIB) as usize..((b + 1) * MIB) as usize]
                != r1[(b * MIB) as usize..((b + 1) * MIB) as usize]
        })
        .count();
    assert_eq!(stats.blocks, changed as u64);
    let mnt = Mount::new(&child, &dir.path().join("mnt"))?;
    let layer = |n: u32| -> Result<Vec<u8>> {
        let p = mnt.dir.join(format!("vhdi{n}"));
        std::fs::read(&p).with_context(|| format!("reading {}", p.display()))
    };
    assert!(
        layer(1)? == r0,
        "vhdimount's vhdi1 (log-less base) differs from R0"
    );
    assert!(
        layer(2)? == r1,
        "vhdimount's vhdi2 (whole-block child) differs from R1"
    );
    drop(mnt);
    Ok(())
}
