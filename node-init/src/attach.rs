//! Attaching a layer chain as one block device without unpacking it.
//!
//! The kernel cannot read VHDX, but VHDX files are block addressed: the vhdx crate resolves
//! the chain (base first, differencing layers on top, partially present blocks sector by
//! sector) into extents of the layer files ([`vhdx::Chain::map`]). Each layer file gets a
//! read-only loop device; a device-mapper table of `linear` targets (one per extent) and
//! `zero` targets (holes) presents the resolved virtual disk (`strata-chain`, read-only). A
//! non-persistent `snapshot` target on top (`strata-root`) takes the running system's writes
//! into a sparse exception store file (`cow` in the cache), thrown away at the next boot: the
//! layers are never written.
//!
//! Chosen over node-init serving the chain through NBD because the kernel does all I/O: no
//! user-space process has to live on after switch_root, and reads cost what a loop device
//! costs.

use std::fs::OpenOptions;
use std::io;
use std::path::{Path, PathBuf};

use crate::sys::dm::{self, Target};
use crate::sys::loopdev::{self, LoopDevice};

const SECTOR: u64 = 512;
/// Name of the read-only chain device.
pub const CHAIN_NAME: &str = "strata-chain";
/// Name of the writable root device.
pub const ROOT_NAME: &str = "strata-root";
/// dm-snapshot chunk size in sectors (4 KiB).
const SNAPSHOT_CHUNK: u64 = 8;

/// An attach failure.
#[derive(Debug, thiserror::Error)]
pub enum AttachError {
    /// The chain does not open or map.
    #[error("mapping the VHDX chain")]
    Vhdx(#[from] vhdx::VhdxError),
    /// An extent not aligned to 512-byte sectors.
    #[error("extent at virtual offset {virtual_offset} (length {length}) is not sector aligned")]
    Unaligned {
        /// Virtual offset.
        virtual_offset: u64,
        /// Length.
        length: u64,
    },
    /// An extent names a layer that is not in the chain.
    #[error("extent names layer {index} of a {count}-layer chain")]
    NoSuchLayer {
        /// Index.
        index: usize,
        /// Layers.
        count: usize,
    },
    /// The extents leave a gap or overlap.
    #[error("extents are not contiguous at virtual offset {at}")]
    Gap {
        /// Where.
        at: u64,
    },
    /// A loop or device-mapper call failed.
    #[error("{what}")]
    Sys {
        /// What was being done.
        what: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
}

fn sys(what: impl Into<String>) -> impl FnOnce(io::Error) -> AttachError {
    let what = what.into();
    move |source| AttachError::Sys { what, source }
}

/// Builds the `strata-chain` table: one `linear` or `zero` target per extent, adjacent
/// extents of one file merged. `devs[i]` is the (major, minor) of layer `i`'s loop device.
pub fn chain_table(
    extents: &[vhdx::Extent],
    devs: &[(u32, u32)],
) -> Result<Vec<Target>, AttachError> {
    // (start sector, sectors, Some((layer, file sector)) or None for zeros)
    type Run = (u64, u64, Option<(usize, u64)>);
    let mut out: Vec<Run> = Vec::new();
    let mut at = 0u64;
    for e in extents {
        if e.virtual_offset % SECTOR != 0 || e.length % SECTOR != 0 || e.length == 0 {
            return Err(AttachError::Unaligned {
                virtual_offset: e.virtual_offset,
                length: e.length,
            });
        }
        if e.virtual_offset != at {
            return Err(AttachError::Gap { at });
        }
        at = e.virtual_offset + e.length;
        let src = match e.source {
            vhdx::Source::Zero => None,
            vhdx::Source::File {
                layer_index,
                file_offset,
            } => {
                if layer_index >= devs.len() {
                    return Err(AttachError::NoSuchLayer {
                        index: layer_index,
                        count: devs.len(),
                    });
                }
                if file_offset % SECTOR != 0 {
                    return Err(AttachError::Unaligned {
                        virtual_offset: e.virtual_offset,
                        length: e.length,
                    });
                }
                Some((layer_index, file_offset / SECTOR))
            }
        };
        let start = e.virtual_offset / SECTOR;
        let len = e.length / SECTOR;
        if let Some(last) = out.last_mut() {
            let merges = match (last.2, src) {
                (None, None) => true,
                (Some((la, lo)), Some((a, o))) => la == a && lo + last.1 == o,
                _ => false,
            };
            if merges {
                last.1 += len;
                continue;
            }
        }
        out.push((start, len, src));
    }
    Ok(out
        .into_iter()
        .map(|(start, len, src)| match src {
            None => Target {
                start,
                len,
                kind: "zero",
                params: String::new(),
            },
            Some((layer, sector)) => {
                // Checked above: layer < devs.len().
                let (ma, mi) = devs.get(layer).copied().unwrap_or_default();
                Target {
                    start,
                    len,
                    kind: "linear",
                    params: format!("{ma}:{mi} {sector}"),
                }
            }
        })
        .collect())
}

/// The attached chain. Holding it keeps node-init's handles; the devices themselves stay
/// configured after node-init execs the image's init.
#[derive(Debug)]
pub struct Attached {
    /// The writable root device (`/dev/mapper/strata-root`).
    pub root: PathBuf,
    /// Virtual disk size in bytes.
    pub size: u64,
    /// Targets in the chain table.
    pub targets: usize,
    _loops: Vec<LoopDevice>,
}

/// Attaches the chain `layers` (base first) with a fresh exception store at `cow`.
pub fn attach(layers: &[PathBuf], cow: &Path) -> Result<Attached, AttachError> {
    // A previous attempt of this boot may have left its devices.
    let _ = dm::remove(ROOT_NAME);
    let _ = dm::remove(CHAIN_NAME);
    let chain = vhdx::Chain::from_paths(layers)?;
    let size = chain.virtual_size();
    let extents = chain.map()?;
    drop(chain);
    let mut loops = Vec::with_capacity(layers.len());
    for p in layers {
        loops.push(
            loopdev::attach(p, false).map_err(sys(format!("loop device for {}", p.display())))?,
        );
    }
    let devs: Vec<(u32, u32)> = loops.iter().map(|l| (l.major, l.minor)).collect();
    let table = chain_table(&extents, &devs)?;
    let chain_dev = dm::create(CHAIN_NAME).map_err(sys("creating dm device strata-chain"))?;
    dm::load_table(CHAIN_NAME, &table, true).map_err(sys(format!(
        "loading the strata-chain table ({} targets)",
        table.len()
    )))?;
    dm::resume(CHAIN_NAME).map_err(sys("resuming strata-chain"))?;

    // A fresh, sparse exception store as large as the disk.
    {
        let f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .open(cow)
            .map_err(sys(format!("creating {}", cow.display())))?;
        f.set_len(size)
            .map_err(sys(format!("sizing {}", cow.display())))?;
    }
    let cow_loop =
        loopdev::attach(cow, true).map_err(sys("loop device for the exception store"))?;
    let root = dm::create(ROOT_NAME).map_err(sys("creating dm device strata-root"))?;
    let snap = Target {
        start: 0,
        len: size / SECTOR,
        kind: "snapshot",
        params: format!(
            "{}:{} {}:{} N {SNAPSHOT_CHUNK}",
            chain_dev.major, chain_dev.minor, cow_loop.major, cow_loop.minor
        ),
    };
    dm::load_table(ROOT_NAME, &[snap], false)
        .map_err(sys("loading the strata-root snapshot table"))?;
    dm::resume(ROOT_NAME).map_err(sys("resuming strata-root"))?;
    loops.push(cow_loop);
    Ok(Attached {
        root: root.path,
        size,
        targets: table.len(),
        _loops: loops,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use vhdx::{Extent, Source};

    fn file(v: u64, len: u64, layer: usize, off: u64) -> Extent {
        Extent {
            virtual_offset: v,
            length: len,
            source: Source::File {
                layer_index: layer,
                file_offset: off,
            },
        }
    }

    #[test]
    fn table_merges_and_maps_zero() {
        let ex = vec![
            file(0, 1 << 20, 0, 4 << 20),
            file(1 << 20, 1 << 20, 0, 5 << 20),
            Extent {
                virtual_offset: 2 << 20,
                length: 4096,
                source: Source::Zero,
            },
            file((2 << 20) + 4096, 512, 1, 8 << 20),
        ];
        let t = chain_table(&ex, &[(7, 0), (7, 1)]).unwrap();
        assert_eq!(
            t,
            vec![
                Target {
                    start: 0,
                    len: 4096,
                    kind: "linear",
                    params: "7:0 8192".into()
                },
                Target {
                    start: 4096,
                    len: 8,
                    kind: "zero",
                    params: String::new()
                },
                Target {
                    start: 4104,
                    len: 1,
                    kind: "linear",
                    params: "7:1 16384".into()
                },
            ]
        );
    }

    #[test]
    fn bad_extents_are_refused() {
        assert!(matches!(
            chain_table(&[file(0, 100, 0, 0)], &[(7, 0)]),
            Err(AttachError::Unaligned { .. })
        ));
        assert!(matches!(
            chain_table(&[file(0, 512, 3, 0)], &[(7, 0)]),
            Err(AttachError::NoSuchLayer { index: 3, count: 1 })
        ));
        assert!(matches!(
            chain_table(&[file(512, 512, 0, 0)], &[(7, 0)]),
            Err(AttachError::Gap { at: 0 })
        ));
    }

    proptest! {
        /// The table covers exactly the virtual disk, and every sector maps where the extents
        /// say.
        #[test]
        fn table_covers_extents(parts in proptest::collection::vec((1u64..64, 0usize..3, any::<bool>()), 1..30)) {
            let mut ex = Vec::new();
            let mut v = 0;
            let mut file_off = [0u64; 3];
            for (len, layer, zero) in parts {
                let len = len * 512;
                ex.push(if zero {
                    Extent { virtual_offset: v, length: len, source: Source::Zero }
                } else {
                    let e = file(v, len, layer, file_off[layer]);
                    file_off[layer] += len;
                    e
                });
                v += len;
            }
            let devs = [(7, 0), (7, 1), (7, 2)];
            let t = chain_table(&ex, &devs).unwrap();
            let mut at = 0;
            for tt in &t {
                prop_assert_eq!(tt.start, at);
                at += tt.len;
            }
            prop_assert_eq!(at * 512, v);
            for e in &ex {
                let s = e.virtual_offset / 512;
                let tt = t.iter().find(|tt| tt.start <= s && s < tt.start + tt.len).unwrap();
                match e.source {
                    Source::Zero => prop_assert_eq!(tt.kind, "zero"),
                    Source::File { layer_index, file_offset } => {
                        let (ma, mi) = devs[layer_index];
                        let mut p = tt.params.split(' ');
                        prop_assert_eq!(p.next().unwrap(), format!("{ma}:{mi}"));
                        let base: u64 = p.next().unwrap().parse().unwrap();
                        prop_assert_eq!(base + (s - tt.start), file_offset / 512);
                    }
                }
            }
        }
    }
}
