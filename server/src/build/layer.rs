//! Turning raw ext4 images into published VHDX layers with the `vhdx` crate: a base is a
//! dynamic VHDX (all-zero blocks left out), a role or node layer is a differencing VHDX on its
//! parent chain holding only the sectors that differ. GUIDs are derived from the content (and
//! the parent), so the same inputs give the same bytes. Every layer is read back through its
//! chain and compared with the raw image before it is published.

use std::fs::File;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};

use vhdx::{Chain, CreateOptions};
use wire::chunk::LayerId;
use wire::manifest::LayerKind;

use crate::store::{LayerRecord, Store};

use super::BuildError;

/// Payload block size of our layers: 1 MiB, the smallest VHDX allows. A differencing layer
/// allocates a whole block for every block in which a sector changed, so small blocks keep a
/// role or node layer close to what it changed.
pub const BLOCK_SIZE: u32 = 1 << 20;

fn guid(seed: &blake3::Hash, what: &str) -> uuid::Uuid {
    let h = blake3::Hasher::new()
        .update(seed.as_bytes())
        .update(what.as_bytes())
        .finalize();
    let mut b = [0u8; 16];
    b.copy_from_slice(&h.as_bytes()[..16]);
    // RFC 9562 version 8 (custom), variant 10.
    b[6] = (b[6] & 0x0f) | 0x80;
    b[8] = (b[8] & 0x3f) | 0x80;
    uuid::Uuid::from_bytes(b)
}

/// Deterministic creation options: GUIDs from the raw content and the parent.
fn options(
    raw: &Path,
    parent: Option<&LayerId>,
    kind: LayerKind,
) -> Result<CreateOptions, BuildError> {
    let mut h = blake3::Hasher::new();
    h.update(b"strata layer guid v1\0");
    if let Some(p) = parent {
        h.update(p.as_bytes());
    }
    h.update_mmap(raw)
        .map_err(|e| BuildError::io("hashing", raw, e))?;
    let seed = h.finalize();
    let o = CreateOptions::deterministic(
        guid(&seed, "file"),
        guid(&seed, "data"),
        guid(&seed, "page83"),
    );
    Ok(layer_options(o, parent, kind))
}

/// The store's layer format: 1 MiB blocks and no log region (layers are never written after
/// they are published). A base (dynamic, no parent) stores each non-zero block whole. Role
/// and node layers store only the sectors that differ from their parent (partially present
/// blocks plus a sector bitmap block): the file is 4 MiB (headers, metadata, BAT, sector
/// bitmap) plus 1 MiB per block touched, but only the changed sectors are written (the rest
/// are holes), and nodes fetch only the data extents (`/layers/{id}/extents`), so what a role
/// costs on disk and on the wire is what it changed, not the parent's bytes around it.
/// See docs/images.md.
fn layer_options(mut o: CreateOptions, parent: Option<&LayerId>, kind: LayerKind) -> CreateOptions {
    o.block_size = BLOCK_SIZE;
    o.creator = "strata".to_owned();
    o.parent_relative_path = parent.map(|p| format!("{p}.vhdx"));
    o.log = false;
    o.whole_blocks = kind == LayerKind::Base;
    o
}

/// Deterministic options for a layer given as blocks: GUIDs from the blocks and the parent.
/// The file is not flushed: the caller publishes it (and flushes it then).
fn options_for_blocks(
    blocks: &[(u64, Vec<u8>)],
    parent: &LayerId,
    kind: LayerKind,
) -> CreateOptions {
    let mut h = blake3::Hasher::new();
    h.update(b"strata layer guid v1 blocks\0");
    h.update(parent.as_bytes());
    for (i, b) in blocks {
        h.update(&i.to_le_bytes());
        h.update(b);
    }
    let seed = h.finalize();
    let o = CreateOptions {
        sync: false,
        ..CreateOptions::deterministic(
            guid(&seed, "file"),
            guid(&seed, "data"),
            guid(&seed, "page83"),
        )
    };
    layer_options(o, Some(parent), kind)
}

/// The 1 MiB blocks in which two equally long raw files differ.
pub fn changed_blocks(a: &Path, b: &Path) -> Result<Vec<u64>, BuildError> {
    let mut fa = File::open(a).map_err(|e| BuildError::io("opening", a, e))?;
    let mut fb = File::open(b).map_err(|e| BuildError::io("opening", b, e))?;
    let len = fa
        .metadata()
        .map_err(|e| BuildError::io("reading", a, e))?
        .len();
    let step = u64::from(BLOCK_SIZE);
    let mut x = vec![0u8; BLOCK_SIZE as usize];
    let mut y = vec![0u8; BLOCK_SIZE as usize];
    let mut out = Vec::new();
    let mut off = 0;
    while off < len {
        let n = usize::try_from((len - off).min(step)).unwrap_or(0);
        fa.read_exact(&mut x[..n])
            .map_err(|e| BuildError::io("reading", a, e))?;
        fb.read_exact(&mut y[..n])
            .map_err(|e| BuildError::io("reading", b, e))?;
        if x[..n] != y[..n] {
            out.push(off / step);
        }
        off += n as u64;
    }
    Ok(out)
}

/// Compares blocks `blocks` (1 MiB each) of the chain's virtual disk with the raw file.
fn verify_blocks(chain: &Chain, raw: &Path, blocks: &[u64]) -> Result<(), BuildError> {
    use std::os::unix::fs::FileExt;
    let f = File::open(raw).map_err(|e| BuildError::io("opening", raw, e))?;
    let len = f
        .metadata()
        .map_err(|e| BuildError::io("reading", raw, e))?
        .len();
    if len != chain.virtual_size() {
        return Err(BuildError::Verify {
            message: format!(
                "virtual size {} but raw image {len} bytes",
                chain.virtual_size()
            ),
        });
    }
    let step = u64::from(BLOCK_SIZE);
    let mut a = vec![0u8; BLOCK_SIZE as usize];
    let mut b = vec![0u8; BLOCK_SIZE as usize];
    for &blk in blocks {
        let off = blk.saturating_mul(step);
        if off >= len {
            continue;
        }
        let n = usize::try_from((len - off).min(step)).unwrap_or(0);
        f.read_exact_at(&mut a[..n], off)
            .map_err(|e| BuildError::io("reading", raw, e))?;
        chain
            .read_at(&mut b[..n], off)
            .map_err(|e| BuildError::Vhdx {
                what: "reading back".into(),
                source: e,
            })?;
        if a[..n] != b[..n] {
            return Err(BuildError::Verify {
                message: format!("content differs from the raw image in block {blk}"),
            });
        }
    }
    Ok(())
}

/// Compares the virtual disk of `chain` with the raw file; both must be identical.
fn verify(chain: &Chain, raw: &Path) -> Result<(), BuildError> {
    let mut f = File::open(raw).map_err(|e| BuildError::io("opening", raw, e))?;
    let len = f
        .metadata()
        .map_err(|e| BuildError::io("reading", raw, e))?
        .len();
    if len != chain.virtual_size() {
        return Err(BuildError::Verify {
            message: format!(
                "virtual size {} but raw image {len} bytes",
                chain.virtual_size()
            ),
        });
    }
    let step = 4 << 20;
    let mut a = vec![0u8; step];
    let mut b = vec![0u8; step];
    let mut off = 0u64;
    while off < len {
        let n = usize::try_from((len - off).min(step as u64)).unwrap_or(step);
        let (a, b) = (&mut a[..n], &mut b[..n]);
        f.read_exact(a)
            .map_err(|e| BuildError::io("reading", raw, e))?;
        chain.read_at(b, off).map_err(|e| BuildError::Vhdx {
            what: "reading back".into(),
            source: e,
        })?;
        if a != b {
            return Err(BuildError::Verify {
                message: format!("content differs from the raw image near offset {off}"),
            });
        }
        off += n as u64;
    }
    Ok(())
}

/// A layer written and verified in scratch, not yet published.
#[derive(Debug, Clone)]
pub struct Prepared {
    /// The VHDX file (in the store's scratch).
    pub path: PathBuf,
    /// Its blake3.
    pub id: LayerId,
    /// Virtual disk size.
    pub virtual_size: u64,
}

/// Writes `raw` as a VHDX at `out`: dynamic if `parent` is empty, else differencing on the
/// chain `parent` (id and file of each layer, base first). Reads the new chain back and
/// compares it with `raw` before returning.
pub fn prepare(
    raw: &Path,
    parent: &[(LayerId, PathBuf)],
    out: &Path,
    kind: LayerKind,
) -> Result<Prepared, BuildError> {
    prepare_checked(raw, parent, out, None, kind)
}

/// Like [`prepare`]; with `changed`, only those blocks (where `raw` differs from the parent's
/// image) are read back: the writer has compared every sector with the parent already, and
/// everything else must come from the parent.
pub fn prepare_checked(
    raw: &Path,
    parent: &[(LayerId, PathBuf)],
    out: &Path,
    changed: Option<&[u64]>,
    kind: LayerKind,
) -> Result<Prepared, BuildError> {
    let top = parent.last().map(|p| p.0);
    let opts = options(raw, top.as_ref(), kind)?;
    let vsize = std::fs::metadata(raw)
        .map_err(|e| BuildError::io("reading", raw, e))?
        .len();
    let vx = |what: &str| {
        let what = what.to_owned();
        move |source| BuildError::Vhdx { what, source }
    };
    let paths: Vec<PathBuf> = parent.iter().map(|p| p.1.clone()).collect();
    if paths.is_empty() {
        vhdx::from_raw(raw, out, None, &opts).map_err(vx("writing the base layer"))?;
    } else {
        let pchain = Chain::from_paths(&paths).map_err(vx("opening the parent chain"))?;
        vhdx::from_raw(raw, out, Some(&pchain), &opts)
            .map_err(vx("writing the differencing layer"))?;
    }
    let mut all = paths;
    all.push(out.to_owned());
    let chain = Chain::from_paths(&all).map_err(vx("opening the new chain"))?;
    match changed {
        None => verify(&chain, raw)?,
        Some(blocks) => verify_blocks(&chain, raw, blocks)?,
    }
    // Layers are world-readable (the HTTP and iSCSI services may run as another user).
    std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|e| BuildError::io("chmod", out, e))?;
    let (id, _, _) = crate::store::hash_file(out)?;
    Ok(Prepared {
        path: out.to_owned(),
        id,
        virtual_size: vsize,
    })
}

/// Writes a differencing layer at `out` on `parent` (the parent chain, opened from the
/// store's layer files `parent_paths`, base first; its top is `parent_id`) from the 1 MiB
/// blocks of the new image that may differ from the parent's (increasing block order;
/// blocks equal to the parent's are left out), reads those blocks back through the new
/// chain, compares them, and hashes the file. Only these blocks are read, so the cost
/// follows the change, not the disk. The file is not flushed: publish it with the store.
pub fn prepare_blocks(
    blocks: &[(u64, Vec<u8>)],
    parent: &Chain,
    parent_id: &LayerId,
    parent_paths: &[PathBuf],
    kind: LayerKind,
    out: &Path,
) -> Result<LayerRecord, BuildError> {
    let opts = options_for_blocks(blocks, parent_id, kind);
    let vx = |what: &'static str| {
        move |source| BuildError::Vhdx {
            what: what.into(),
            source,
        }
    };
    vhdx::differencing_from_blocks(
        out,
        parent,
        &opts,
        blocks.iter().map(|(i, b)| (*i, b.as_slice())),
    )
    .map_err(vx("writing the differencing layer"))?;
    let mut paths = parent_paths.to_vec();
    paths.push(out.to_owned());
    let chain = Chain::from_paths(&paths).map_err(vx("opening the new chain"))?;
    let step = u64::from(BLOCK_SIZE);
    let mut back = Vec::new();
    for (i, want) in blocks {
        back.resize(want.len(), 0);
        chain
            .read_at(&mut back, i.saturating_mul(step))
            .map_err(vx("reading back"))?;
        if back != *want {
            return Err(BuildError::Verify {
                message: format!("content differs from the image in block {i}"),
            });
        }
    }
    std::fs::set_permissions(out, std::os::unix::fs::PermissionsExt::from_mode(0o644))
        .map_err(|e| BuildError::io("chmod", out, e))?;
    let (id, size, chunks) = crate::store::hash_file(out)?;
    Ok(LayerRecord {
        id,
        size,
        virtual_size: chain.virtual_size(),
        parent: Some(*parent_id),
        kind,
        chunk_size: wire::chunk::CHUNK_SIZE,
        chunks,
    })
}

/// Reads a chain (base first) into a raw file.
pub fn vhdx_to_raw(paths: &[PathBuf], out: &Path) -> Result<(), BuildError> {
    let chain = Chain::from_paths(paths).map_err(|source| BuildError::Vhdx {
        what: "opening".into(),
        source,
    })?;
    let mut f = File::create(out).map_err(|e| BuildError::io("creating", out, e))?;
    let len = chain.virtual_size();
    let step: u64 = 4 << 20;
    let mut buf = vec![0u8; usize::try_from(step).unwrap_or(4 << 20)];
    let mut off = 0;
    while off < len {
        let n = usize::try_from((len - off).min(step)).unwrap_or(0);
        let b = &mut buf[..n];
        chain.read_at(b, off).map_err(|source| BuildError::Vhdx {
            what: "reading".into(),
            source,
        })?;
        if b.iter().all(|&x| x == 0) {
            // Keep the raw file sparse.
            std::io::Seek::seek(&mut f, std::io::SeekFrom::Current(n as i64))
                .map_err(|e| BuildError::io("writing", out, e))?;
        } else {
            f.write_all(b)
                .map_err(|e| BuildError::io("writing", out, e))?;
        }
        off += n as u64;
    }
    f.set_len(len)
        .map_err(|e| BuildError::io("writing", out, e))?;
    Ok(())
}

/// The raw image of the chain ending at `chain`'s top, from the store's cache (made once,
/// published atomically).
pub fn cached_raw(
    store: &Store,
    chain: &[LayerRecord],
    scratch: &Path,
) -> Result<PathBuf, BuildError> {
    let Some(top) = chain.last() else {
        return Err(BuildError::Verify {
            message: "empty chain".into(),
        });
    };
    let path = store.cache_path(&top.id);
    if path.is_file() {
        return Ok(path);
    }
    let tmp = scratch.join("cache.raw");
    vhdx_to_raw(&store.chain_paths(chain), &tmp)?;
    Ok(store.publish_cache(&tmp, &top.id)?)
}
