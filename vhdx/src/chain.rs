//! A chain of VHDX files, base first: reads fall through differencing layers to their
//! parents, resolving partially present blocks sector by sector through sector bitmaps;
//! writes go to the top file only. [`Chain::map`] describes the whole virtual disk as
//! extents of layer files, for a device-mapper linear table.

use std::collections::HashSet;
use std::path::{Path, PathBuf};

use crate::error::{Result, VhdxError};
use crate::file::{DiskType, Piece, Vhdx};

/// The deepest chain [`Chain::open`] and [`Chain::from_paths`] accept (base included).
pub const MAX_CHAIN_DEPTH: usize = 16;

/// Where an extent of the virtual disk lives.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum Source {
    /// In layer `layer_index` (0 = base) at `file_offset`.
    File {
        /// Index into [`Chain::layers`] (0 is the base).
        layer_index: usize,
        /// Byte offset in that file.
        file_offset: u64,
    },
    /// Zeros: no layer holds data here.
    Zero,
}

/// A run of the virtual disk. Offsets and lengths are multiples of the logical sector size;
/// adjacent extents never share a source that would let them merge.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub struct Extent {
    /// Offset in the virtual disk.
    pub virtual_offset: u64,
    /// Length in bytes.
    pub length: u64,
    /// Where the bytes are.
    pub source: Source,
}

/// An open chain: `layers()[0]` is the base, the last is the top.
#[derive(Debug)]
pub struct Chain {
    layers: Vec<Vhdx>,
}

impl Chain {
    /// Opens `top` read-only and follows parent locators down to the base, the way
    /// qemu-img follows backing files (see [`crate::ParentLocator::candidates`]). Each
    /// parent's DataWriteGuid must equal the child's parent_linkage.
    pub fn open(top: impl AsRef<Path>) -> Result<Chain> {
        Self::open_following(top.as_ref(), false)
    }

    /// Like [`Chain::open`] with the top file writable (parents stay read-only).
    pub fn open_writable(top: impl AsRef<Path>) -> Result<Chain> {
        Self::open_following(top.as_ref(), true)
    }

    fn open_following(top: &Path, writable: bool) -> Result<Chain> {
        let first = if writable {
            Vhdx::open_writable(top)?
        } else {
            Vhdx::open(top)?
        };
        let mut seen = HashSet::new();
        seen.insert(identity(top));
        let mut layers = vec![first];
        while let Some(child) = layers.last() {
            let Some(loc) = child.parent_locator() else {
                break;
            };
            if layers.len() >= MAX_CHAIN_DEPTH {
                return Err(VhdxError::ChainTooDeep {
                    file: child.path().to_path_buf(),
                    max: MAX_CHAIN_DEPTH,
                });
            }
            let tried = loc.candidates(child.path());
            let Some(found) = tried.iter().find(|p| p.is_file()).cloned() else {
                return Err(VhdxError::ParentNotFound {
                    child: child.path().to_path_buf(),
                    tried,
                });
            };
            if !seen.insert(identity(&found)) {
                return Err(VhdxError::ParentLoop { file: found });
            }
            let parent = Vhdx::open(&found)?;
            check_link(child, &parent)?;
            layers.push(parent);
        }
        layers.reverse();
        Ok(Chain { layers })
    }

    /// Opens the files named, base first and top last, read-only. The order comes from the
    /// caller (a manifest), not from the files' parent locators; the linkage GUIDs and
    /// geometry are checked all the same.
    pub fn from_paths(paths: &[PathBuf]) -> Result<Chain> {
        Self::from_paths_with(paths, false)
    }

    /// Like [`Chain::from_paths`] with the top file writable.
    pub fn from_paths_writable(paths: &[PathBuf]) -> Result<Chain> {
        Self::from_paths_with(paths, true)
    }

    fn from_paths_with(paths: &[PathBuf], writable: bool) -> Result<Chain> {
        let mut layers = Vec::with_capacity(paths.len().min(MAX_CHAIN_DEPTH));
        for (i, p) in paths.iter().enumerate() {
            let top = i + 1 == paths.len();
            layers.push(if writable && top {
                Vhdx::open_writable(p)?
            } else {
                Vhdx::open(p)?
            });
            if layers.len() > MAX_CHAIN_DEPTH {
                return Err(VhdxError::ChainTooDeep {
                    file: p.clone(),
                    max: MAX_CHAIN_DEPTH,
                });
            }
        }
        Self::from_layers(layers)
    }

    /// Builds a chain from open files, base first, checking shape, loops and linkage.
    pub fn from_layers(layers: Vec<Vhdx>) -> Result<Chain> {
        let Some(base) = layers.first() else {
            return Err(VhdxError::InvalidArgument {
                file: PathBuf::new(),
                reason: "empty chain".into(),
            });
        };
        if layers.len() > MAX_CHAIN_DEPTH {
            return Err(VhdxError::ChainTooDeep {
                file: base.path().to_path_buf(),
                max: MAX_CHAIN_DEPTH,
            });
        }
        if base.disk_type() == DiskType::Differencing && layers.len() > 1 {
            return Err(VhdxError::ChainShape {
                file: base.path().to_path_buf(),
                reason: "the base of a chain is a differencing disk".into(),
            });
        }
        let mut seen = HashSet::new();
        for l in &layers {
            if !seen.insert(identity(l.path())) {
                return Err(VhdxError::ParentLoop {
                    file: l.path().to_path_buf(),
                });
            }
        }
        for pair in layers.windows(2) {
            if let [parent, child] = pair {
                if child.disk_type() != DiskType::Differencing {
                    return Err(VhdxError::ChainShape {
                        file: child.path().to_path_buf(),
                        reason: "a layer above the base is not a differencing disk".into(),
                    });
                }
                check_link(child, parent)?;
            }
        }
        if layers.len() == 1 && base.disk_type() == DiskType::Differencing {
            return Err(VhdxError::ChainShape {
                file: base.path().to_path_buf(),
                reason: "a differencing disk needs its parent below it in the chain".into(),
            });
        }
        Ok(Chain { layers })
    }

    /// The layers, base first.
    pub fn layers(&self) -> &[Vhdx] {
        &self.layers
    }

    /// The top layer.
    #[expect(
        clippy::indexing_slicing,
        reason = "a chain always has at least one layer"
    )]
    pub fn top(&self) -> &Vhdx {
        // Non-empty: from_layers rejects an empty list and open always pushes the top.
        &self.layers[self.layers.len() - 1]
    }

    fn top_mut(&mut self) -> Option<&mut Vhdx> {
        self.layers.last_mut()
    }

    /// Virtual disk size in bytes.
    pub fn virtual_size(&self) -> u64 {
        self.top().virtual_size()
    }

    /// Logical sector size of the chain.
    pub fn logical_sector_size(&self) -> u32 {
        self.top().logical_sector_size()
    }

    fn range_check(&self, offset: u64, len: u64) -> Result<()> {
        if offset
            .checked_add(len)
            .is_none_or(|e| e > self.virtual_size())
        {
            return Err(VhdxError::OutOfRange {
                file: self.top().path().to_path_buf(),
                offset,
                len,
                virtual_size: self.virtual_size(),
            });
        }
        Ok(())
    }

    /// Resolves a virtual range into extents through the chain.
    pub fn map_range(&self, offset: u64, len: u64) -> Result<Vec<Extent>> {
        self.range_check(offset, len)?;
        let mut out = Vec::new();
        let top = self.layers.len().saturating_sub(1);
        self.resolve(top, offset, len, &mut out)?;
        Ok(out)
    }

    /// The whole virtual disk as extents (see [`Extent`]).
    pub fn map(&self) -> Result<Vec<Extent>> {
        self.map_range(0, self.virtual_size())
    }

    fn resolve(&self, layer: usize, offset: u64, len: u64, out: &mut Vec<Extent>) -> Result<()> {
        let Some(file) = self.layers.get(layer) else {
            return Ok(());
        };
        let mut pieces = Vec::new();
        file.pieces(offset, len, &mut pieces)?;
        for (voff, n, piece) in pieces {
            match piece {
                Piece::Here(fo) => push(
                    out,
                    voff,
                    n,
                    Source::File {
                        layer_index: layer,
                        file_offset: fo,
                    },
                ),
                Piece::Zero => push(out, voff, n, Source::Zero),
                Piece::Parent if layer == 0 => push(out, voff, n, Source::Zero),
                Piece::Parent => self.resolve(layer - 1, voff, n, out)?,
            }
        }
        Ok(())
    }

    /// Reads `buf.len()` bytes of the virtual disk at `offset`.
    pub fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<()> {
        let extents = self.map_range(offset, buf.len() as u64)?;
        for e in extents {
            let at = (e.virtual_offset - offset) as usize;
            let dst = buf.get_mut(at..at + e.length as usize).unwrap_or_default();
            match e.source {
                Source::Zero => dst.fill(0),
                Source::File {
                    layer_index,
                    file_offset,
                } => {
                    let Some(l) = self.layers.get(layer_index) else {
                        continue;
                    };
                    crate::io::read_exact_at(l.file(), l.path(), dst, file_offset)?;
                }
            }
        }
        Ok(())
    }

    /// Writes `buf` at `offset` into the top file (never a parent). Unaligned edges are
    /// completed with the chain's current contents.
    pub fn write_at(&mut self, buf: &[u8], offset: u64) -> Result<()> {
        self.range_check(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let lss = u64::from(self.logical_sector_size());
        let start = offset / lss * lss;
        let end = (offset + buf.len() as u64).div_ceil(lss) * lss;
        if start == offset && end == offset + buf.len() as u64 {
            return self
                .top_mut()
                .map_or(Ok(()), |t| t.write_sectors(buf, offset));
        }
        let mut aligned = vec![0u8; (end - start) as usize];
        // Only the first and last sectors can be partial: read just those.
        let first = aligned.get_mut(..lss as usize).unwrap_or_default();
        self.read_at(first, start)?;
        if end - start > lss {
            let tail_at = (end - start - lss) as usize;
            let last = aligned.get_mut(tail_at..).unwrap_or_default();
            self.read_at(last, end - lss)?;
        }
        let at = (offset - start) as usize;
        aligned
            .get_mut(at..at + buf.len())
            .unwrap_or_default()
            .copy_from_slice(buf);
        self.top_mut()
            .map_or(Ok(()), |t| t.write_sectors(&aligned, start))
    }

    /// Flushes the top file.
    pub fn flush(&self) -> Result<()> {
        self.top().flush()
    }

    /// Consumes the chain, giving back its layers (base first).
    pub fn into_layers(self) -> Vec<Vhdx> {
        self.layers
    }
}

/// MS-VHDX §2.6.2.6: the parent's DataWriteGuid must equal the child's parent_linkage
/// (or parent_linkage2); sizes and sector sizes must agree.
fn check_link(child: &Vhdx, parent: &Vhdx) -> Result<()> {
    let Some(loc) = child.parent_locator() else {
        return Err(VhdxError::ChainShape {
            file: child.path().to_path_buf(),
            reason: "not a differencing disk".into(),
        });
    };
    let found = parent.data_write_guid();
    if loc.parent_linkage != found && loc.parent_linkage2 != Some(found) {
        return Err(VhdxError::ParentMismatch {
            child: child.path().to_path_buf(),
            parent: parent.path().to_path_buf(),
            expected: loc.parent_linkage,
            found,
        });
    }
    if child.virtual_size() != parent.virtual_size()
        || child.logical_sector_size() != parent.logical_sector_size()
    {
        return Err(VhdxError::ParentGeometry {
            child: child.path().to_path_buf(),
            parent: parent.path().to_path_buf(),
            reason: format!(
                "child {} bytes / {}-byte sectors, parent {} bytes / {}-byte sectors",
                child.virtual_size(),
                child.logical_sector_size(),
                parent.virtual_size(),
                parent.logical_sector_size()
            ),
        });
    }
    Ok(())
}

/// A key identifying a file for loop detection: (device, inode) when it exists.
fn identity(p: &Path) -> (u64, u64, PathBuf) {
    use std::os::unix::fs::MetadataExt;
    match std::fs::metadata(p) {
        Ok(m) => (m.dev(), m.ino(), PathBuf::new()),
        Err(_) => (0, 0, p.to_path_buf()),
    }
}

fn push(out: &mut Vec<Extent>, virtual_offset: u64, length: u64, source: Source) {
    if length == 0 {
        return;
    }
    if let Some(last) = out.last_mut() {
        let merge = match (last.source, source) {
            (Source::Zero, Source::Zero) => true,
            (
                Source::File {
                    layer_index: a,
                    file_offset: fa,
                },
                Source::File {
                    layer_index: b,
                    file_offset: fb,
                },
            ) => a == b && fa + last.length == fb,
            _ => false,
        };
        if merge && last.virtual_offset + last.length == virtual_offset {
            last.length += length;
            return;
        }
    }
    out.push(Extent {
        virtual_offset,
        length,
        source,
    });
}
