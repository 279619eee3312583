//! Writing the virtual disk of a chain as a raw image: sparse where the chain has no data,
//! written to a temporary and renamed into place.

use std::fs::File;
use std::path::Path;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};

use crate::chain::{Chain, Extent, Source};
use crate::create::atomic_write;
use crate::error::{Result, VhdxError};
use crate::io;

/// The unit of work: one window of the virtual disk.
const WINDOW: u64 = 8 * 1024 * 1024;

/// Writes the chain's virtual disk to `out` as raw bytes. Windows of 8 MiB that no layer
/// holds data for are left as holes. Returns the number of bytes taken from layer files.
pub fn to_raw(chain: &Chain, out: &Path) -> Result<u64> {
    atomic_write(out, true, |path, file| {
        io::set_len(&file, path, chain.virtual_size())?;
        let copied = copy_windows(chain, &file, path)?;
        file.sync_all().map_err(|source| VhdxError::Write {
            file: path.to_path_buf(),
            offset: 0,
            source,
        })?;
        Ok(copied)
    })
}

/// Copies the disk window by window with a few threads. A window that is one stretch of
/// one layer file is copied in the kernel (`copy_file_range`); a window of several
/// extents (partially present blocks, several layers) is composed in memory with one
/// `pread` per extent and written with one `pwrite`; a window of zeros is skipped.
fn copy_windows(chain: &Chain, out: &File, out_path: &Path) -> Result<u64> {
    let size = chain.virtual_size();
    let windows = size.div_ceil(WINDOW);
    let next = AtomicU64::new(0);
    let copied = AtomicU64::new(0);
    let kernel_copy = AtomicBool::new(true);
    let workers = std::thread::available_parallelism()
        .map_or(2, |n| n.get())
        .clamp(1, 4);
    let worker = || -> Result<()> {
        let mut buf = Vec::new();
        loop {
            let w = next.fetch_add(1, Ordering::Relaxed);
            if w >= windows {
                return Ok(());
            }
            let start = w * WINDOW;
            let len = WINDOW.min(size - start);
            let extents = chain.map_range(start, len)?;
            let data: u64 = extents
                .iter()
                .filter(|e| e.source != Source::Zero)
                .map(|e| e.length)
                .sum();
            copied.fetch_add(data, Ordering::Relaxed);
            match extents.as_slice() {
                _ if data == 0 => {}
                [Extent {
                    source:
                        Source::File {
                            layer_index,
                            file_offset,
                        },
                    ..
                }] => {
                    let Some(layer) = chain.layers().get(*layer_index) else {
                        continue;
                    };
                    if kernel_copy.load(Ordering::Relaxed)
                        && copy_range(layer.file(), *file_offset, out, start, len)
                    {
                        continue;
                    }
                    kernel_copy.store(false, Ordering::Relaxed);
                    buf.resize(len as usize, 0);
                    io::read_exact_at(layer.file(), layer.path(), &mut buf, *file_offset)?;
                    io::write_all_at(out, out_path, &buf, start)?;
                }
                _ => {
                    buf.resize(len as usize, 0);
                    for e in &extents {
                        let at = (e.virtual_offset - start) as usize;
                        let dst = buf.get_mut(at..at + e.length as usize).unwrap_or_default();
                        match e.source {
                            Source::Zero => dst.fill(0),
                            Source::File {
                                layer_index,
                                file_offset,
                            } => {
                                let Some(layer) = chain.layers().get(layer_index) else {
                                    continue;
                                };
                                io::read_exact_at(layer.file(), layer.path(), dst, file_offset)?;
                            }
                        }
                    }
                    io::write_all_at(out, out_path, &buf, start)?;
                }
            }
        }
    };
    let results: Vec<Result<()>> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..workers).map(|_| scope.spawn(worker)).collect();
        handles
            .into_iter()
            .map(|h| {
                h.join().unwrap_or_else(|_| {
                    Err(VhdxError::InvalidArgument {
                        file: out_path.to_path_buf(),
                        reason: "copy thread panicked".into(),
                    })
                })
            })
            .collect()
    });
    for r in results {
        r?;
    }
    Ok(copied.into_inner())
}

/// Copies `n` bytes between files in the kernel (`copy_file_range`, no copy through user
/// memory). Returns false when the kernel cannot do it for these files (different file
/// systems, no support) or copies short; the caller then copies the window itself.
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
