//! `strata vhdx ...`: inspect, check, hash and convert VHDX files and chains (MS-VHDX; the
//! engine is the `vhdx` crate). Chains are followed through parent locators, the way
//! qemu-img follows backing files.

use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::Context;
use serde_json::{json, Value};
use vhdx::{Chain, CreateOptions, DiskType, Vhdx};

/// `strata vhdx` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum VhdxCmd {
    /// Print a VHDX file's structure and its chain as JSON.
    Info {
        /// The VHDX file.
        file: PathBuf,
    },
    /// Write the virtual disk of a chain as a raw image (sparse where the chain has no data).
    ToRaw {
        /// The top file of the chain.
        top: PathBuf,
        /// The raw output file (written to a temporary and renamed into place).
        out: PathBuf,
    },
    /// Convert a raw image to a dynamic VHDX, or with --parent to a differencing VHDX holding
    /// only the sectors that differ from the parent chain.
    FromRaw {
        /// The raw input image.
        raw: PathBuf,
        /// The VHDX to write (written to a temporary and renamed into place).
        out: PathBuf,
        /// The parent (top of an existing chain): makes a differencing disk.
        #[arg(long)]
        parent: Option<PathBuf>,
        /// Block size: bytes, or with a K/M suffix (1M..256M, a power of two).
        #[arg(long, default_value = "32M", value_parser = parse_size)]
        block_size: u64,
        /// Write a fixed disk (all blocks allocated) instead of a dynamic one.
        #[arg(long, conflicts_with = "parent")]
        fixed: bool,
        /// Logical sector size (512 or 4096; a differencing disk takes its parent's).
        #[arg(long, default_value_t = 512)]
        logical_sector_size: u32,
        /// Fix the header's DataWriteGuid (and derive FileWriteGuid and page 83 from it) for
        /// reproducible output.
        #[arg(long)]
        data_write_guid: Option<vhdx::Uuid>,
        /// Also record the parent's absolute path in the parent locator
        /// (`absolute_win32_path`), which libvhdi's tools use to find the parent.
        #[arg(long, requires = "parent")]
        absolute_parent_path: bool,
    },
    /// Validate every structure of a file and its chain; exits non-zero naming the fault.
    Check {
        /// The VHDX file.
        file: PathBuf,
        /// Open read-write and replay a non-empty log (a crash left it) before checking.
        #[arg(long)]
        repair: bool,
    },
    /// Print the blake3 hash of a file (a layer's identity), as `b3sum` does.
    Hash {
        /// The file.
        file: PathBuf,
    },
    /// Print the chain's virtual disk as extents of layer files (JSON), as a device-mapper
    /// linear table would use them.
    Map {
        /// The top file of the chain.
        top: PathBuf,
    },
}

/// Parses `1048576`, `1024K`, `32M`, `1G` (binary units).
fn parse_size(s: &str) -> Result<u64, String> {
    let t = s.trim().trim_end_matches("iB").trim_end_matches('B');
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        _ => (t, 1),
    };
    num.parse::<u64>()
        .ok()
        .and_then(|n| n.checked_mul(mult))
        .ok_or_else(|| format!("invalid size {s:?}"))
}

/// Runs a `strata vhdx` subcommand.
pub fn run(cmd: VhdxCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        VhdxCmd::Info { file } => {
            println!("{}", serde_json::to_string_pretty(&info(&file)?)?);
            Ok(ExitCode::SUCCESS)
        }
        VhdxCmd::ToRaw { top, out } => {
            let chain = Chain::open(&top)?;
            vhdx::to_raw(&chain, &out)?;
            Ok(ExitCode::SUCCESS)
        }
        VhdxCmd::FromRaw {
            raw,
            out,
            parent,
            block_size,
            fixed,
            logical_sector_size,
            data_write_guid,
            absolute_parent_path,
        } => {
            let parent = parent.map(Chain::open).transpose()?;
            let mut opts = CreateOptions {
                block_size: u32::try_from(block_size).context("block size too large")?,
                disk_type: if fixed {
                    DiskType::Fixed
                } else {
                    DiskType::Dynamic
                },
                logical_sector_size,
                record_absolute_parent_path: absolute_parent_path,
                ..CreateOptions::default()
            };
            if let Some(g) = data_write_guid {
                let derive = |n: u8| {
                    let h = blake3::hash(&[g.as_bytes().as_slice(), &[n]].concat());
                    let mut b = [0u8; 16];
                    b.copy_from_slice(&h.as_bytes()[..16]);
                    vhdx::Uuid::from_bytes(b)
                };
                opts.data_write_guid = Some(g);
                opts.file_write_guid = Some(derive(1));
                opts.page83 = Some(derive(2));
            }
            let stats = vhdx::from_raw(&raw, &out, parent.as_ref(), &opts)?;
            eprintln!(
                "wrote {}: {} blocks ({} partial), {} sectors, {} bytes",
                out.display(),
                stats.blocks,
                stats.partial_blocks,
                stats.sectors,
                stats.file_size
            );
            Ok(ExitCode::SUCCESS)
        }
        VhdxCmd::Check { file, repair } => Ok(check(&file, repair)),
        VhdxCmd::Hash { file } => {
            let mut h = blake3::Hasher::new();
            h.update_mmap_rayon(&file)
                .with_context(|| format!("{}: hashing", file.display()))?;
            println!("{}  {}", h.finalize().to_hex(), file.display());
            Ok(ExitCode::SUCCESS)
        }
        VhdxCmd::Map { top } => {
            let chain = Chain::open(&top)?;
            let layers: Vec<Value> = chain.layers().iter().map(|l| json!(l.path())).collect();
            let extents: Vec<Value> = chain
                .map()?
                .into_iter()
                .map(|e| match e.source {
                    vhdx::Source::File {
                        layer_index,
                        file_offset,
                    } => json!({
                        "virtual_offset": e.virtual_offset, "length": e.length,
                        "layer": layer_index, "file_offset": file_offset,
                    }),
                    vhdx::Source::Zero => json!({
                        "virtual_offset": e.virtual_offset, "length": e.length, "zero": true,
                    }),
                })
                .collect();
            println!(
                "{}",
                serde_json::to_string_pretty(&json!({ "layers": layers, "extents": extents }))?
            );
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn file_json(f: &Vhdx) -> anyhow::Result<Value> {
    let size = std::fs::metadata(f.path())
        .with_context(|| f.path().display().to_string())?
        .len();
    let parent = f.parent_locator().map(|loc| {
        let entries: serde_json::Map<String, Value> = loc
            .entries
            .iter()
            .map(|(k, v)| (k.clone(), json!(v)))
            .collect();
        json!({ "linkage": loc.parent_linkage.to_string(), "locator": entries })
    });
    Ok(json!({
        "path": f.path(),
        "type": f.disk_type().as_str(),
        "virtual_size": f.virtual_size(),
        "block_size": f.block_size(),
        "logical_sector_size": f.logical_sector_size(),
        "physical_sector_size": f.physical_sector_size(),
        "data_write_guid": f.data_write_guid().to_string(),
        "file_write_guid": f.file_write_guid().to_string(),
        "page83": f.page83().to_string(),
        "creator": f.creator(),
        "allocated_bytes": f.allocated_bytes(),
        "file_size": size,
        "parent": parent,
    }))
}

fn info(path: &Path) -> anyhow::Result<Value> {
    let file = Vhdx::open(path)?;
    let mut v = file_json(&file)?;
    let chain = match Chain::open(path) {
        Ok(chain) => {
            let below: Vec<Value> = chain
                .layers()
                .iter()
                .rev()
                .skip(1)
                .map(file_json)
                .collect::<anyhow::Result<_>>()?;
            if let (Some(p), Some(first)) = (
                v.get_mut("parent").and_then(Value::as_object_mut),
                below.first(),
            ) {
                p.insert("path".into(), first["path"].clone());
            }
            json!(below)
        }
        Err(e) => json!({ "error": e.to_string() }),
    };
    if let Some(o) = v.as_object_mut() {
        o.insert("chain".into(), chain);
    }
    Ok(v)
}

fn check(path: &Path, repair: bool) -> ExitCode {
    let result = (|| -> Result<(), vhdx::VhdxError> {
        let file = if repair {
            Vhdx::open_writable(path)?
        } else {
            Vhdx::open(path)?
        };
        file.check()?;
        drop(file);
        let chain = Chain::open(path)?;
        for layer in chain.layers() {
            layer.check()?;
        }
        Ok(())
    })();
    match result {
        Ok(()) => {
            println!("{}: ok", path.display());
            ExitCode::SUCCESS
        }
        Err(e) => {
            println!("{}: {:?}: {e}", path.display(), e.kind());
            ExitCode::FAILURE
        }
    }
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("32M"), Ok(32 << 20));
        assert_eq!(parse_size("1MiB"), Ok(1 << 20));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("x").is_err());
    }
}
