//! Writing the virtual disk of a chain as a raw image: sparse where the chain has no data,
//! written to a temporary and renamed into place.

use std::fs::File;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::path::Path;

use crate::chain::{Chain, Source};
use crate::create::atomic_write;
use crate::error::{Result, VhdxError};
use crate::io;

/// Copy unit for file extents.
const CHUNK: u64 = 8 * 1024 * 1024;

/// Writes the chain's virtual disk to `out` as raw bytes. Extents no layer holds are left
/// as holes. Returns the number of bytes copied from layer files.
pub fn to_raw(chain: &Chain, out: &Path) -> Result<u64> {
    atomic_write(out, |path, file| {
        io::set_len(&file, path, chain.virtual_size())?;
        let copied = copy_extents(chain, &file, path)?;
        file.sync_all().map_err(|source| VhdxError::Write { file: path.to_path_buf(), offset: 0, source })?;
        Ok(copied)
    })
}

/// Copies the file extents of the chain's map into `out` with a few threads, each taking
/// the next piece of at most [`CHUNK`] bytes: one pread and one pwrite per piece.
fn copy_extents(chain: &Chain, out: &File, out_path: &Path) -> Result<u64> {
    let mut pieces: Vec<(usize, u64, u64, u64)> = Vec::new();
    for e in chain.map()? {
        let Source::File { layer_index, file_offset } = e.source else { continue };
        let mut done = 0;
        while done < e.length {
            let n = (e.length - done).min(CHUNK);
            pieces.push((layer_index, file_offset + done, e.virtual_offset + done, n));
            done += n;
        }
    }
    let copied = pieces.iter().map(|p| p.3).sum();
    let next = AtomicUsize::new(0);
    let kernel_copy = AtomicBool::new(true);
    let workers = std::thread::available_parallelism().map_or(2, |n| n.get()).clamp(1, 4);
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers)
            .map(|_| {
                scope.spawn(|| -> Result<()> {
                    let mut buf = Vec::new();
                    loop {
                        let i = next.fetch_add(1, Ordering::Relaxed);
                        let Some(&(layer_index, from, to, n)) = pieces.get(i) else { return Ok(()) };
                        let Some(layer) = chain.layers().get(layer_index) else { continue };
                        if kernel_copy.load(Ordering::Relaxed) && copy_range(layer.file(), from, out, to, n) {
                            continue;
                        }
                        kernel_copy.store(false, Ordering::Relaxed);
                        buf.resize(n as usize, 0);
                        io::read_exact_at(layer.file(), layer.path(), &mut buf, from)?;
                        io::write_all_at(out, out_path, &buf, to)?;
                    }
                })
            })
            .collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(VhdxError::InvalidArgument { file: out_path.to_path_buf(), reason: "copy thread panicked".into() })
                })
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(copied)
}

/// Copies `n` bytes between files in the kernel (`copy_file_range`, no copy through user
/// memory). Returns false when the kernel cannot do it for these files (different file
/// systems, no support) or copies short; the caller then copies the piece itself.
fn copy_range(src: &File, mut from: u64, dst: &File, mut to: u64, n: u64) -> bool {
    let mut left = n;
    while left > 0 {
        let chunk = usize::try_from(left).unwrap_or(usize::MAX);
        match rustix::fs::copy_file_range(src, Some(&mut from), dst, Some(&mut to), chunk) {
            Ok(0) | Err(_) => return false,
            Ok(k) => left = left.saturating_sub(k as u64),
        }
    }
    true
}
