//! Getting layers into the cache over HTTP: resumable downloads verified per chunk while they
//! arrive, and repair of damaged chunks of a cached layer with `Range` requests.
//!
//! A download goes to `partial/<id>`. On resume, the whole chunks already there are hashed
//! again (a crash may have left garbage) and the download continues from the first chunk that
//! is absent or wrong. A chunk that arrives wrong is cut off and fetched again. The file
//! enters `layers/` only when every chunk and the whole-file hash match.

use std::fs::OpenOptions;
use std::io::{self, Read, Seek, SeekFrom, Write};

use wire::chunk::{chunk_range, Digest, LayerVerifier, VerifyError};
use wire::manifest::LayerRef;

use crate::cache::{Cache, CacheError};
use crate::http::{Client, HttpError};

/// Attempts per layer (each resumes where the previous stopped).
pub const ATTEMPTS: u32 = 4;

/// A `STRATA stage=progress layer=ID bytes=N size=S` marker each time a download passes a
/// multiple of this many bytes (so a watcher, or the lab's interrupted-download test, sees a
/// long download advance).
pub const PROGRESS_EVERY: u64 = 4 << 20;

/// A fetch failure.
#[derive(Debug, thiserror::Error)]
pub enum FetchError {
    /// HTTP failed.
    #[error("fetching layer {id}")]
    Http {
        /// Layer.
        id: wire::LayerId,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// The bytes received do not match the signed hashes.
    #[error("layer {id} failed verification")]
    Verify {
        /// Layer.
        id: wire::LayerId,
        /// Cause.
        #[source]
        source: VerifyError,
    },
    /// The server's range answer does not match the request.
    #[error("layer {id}: server answered range {got:?} to a request from byte {from}")]
    BadRange {
        /// Layer.
        id: wire::LayerId,
        /// Requested start.
        from: u64,
        /// What came back.
        got: Option<(u64, u64)>,
    },
    /// The server has fewer bytes than the manifest says (416 on a resume).
    #[error("layer {id}: the server has fewer than the {size} bytes the manifest names (resume from {from} refused)")]
    ServerShorter {
        /// Layer.
        id: wire::LayerId,
        /// Size in the manifest.
        size: u64,
        /// Where the resume started.
        from: u64,
    },
    /// Writing the cache failed (for instance a full disk).
    #[error("writing layer {id} into the cache")]
    Cache {
        /// Layer.
        id: wire::LayerId,
        /// Cause.
        #[source]
        source: CacheError,
    },
}

impl FetchError {
    /// True if the server could not be reached.
    pub fn is_unreachable(&self) -> bool {
        matches!(self, FetchError::Http { source, .. } if source.is_unreachable())
    }
}

/// What a fetch did.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct FetchStats {
    /// Bytes received over the network.
    pub received: u64,
    /// Bytes already in `partial/` and reused.
    pub resumed_from: u64,
}

fn cache_io(
    id: wire::LayerId,
    path: &std::path::Path,
) -> impl FnOnce(io::Error) -> FetchError + '_ {
    move |source| FetchError::Cache {
        id,
        source: CacheError::Io {
            path: path.to_owned(),
            source,
        },
    }
}

/// Downloads `l` into the cache (no-op if present), resuming a partial download, with up to
/// [`ATTEMPTS`] attempts. `progress` is called after each attempt.
pub fn fetch_layer(
    client: &Client,
    cache: &Cache,
    l: &LayerRef,
    mut progress: impl FnMut(&FetchStats),
) -> Result<FetchStats, FetchError> {
    let mut total = FetchStats::default();
    let mut last_err = None;
    for attempt in 0..ATTEMPTS {
        match fetch_once(client, cache, l) {
            Ok(stats) => {
                if attempt == 0 {
                    total.resumed_from = stats.resumed_from;
                }
                total.received += stats.received;
                progress(&total);
                cache
                    .commit_partial(&l.id)
                    .map_err(|source| FetchError::Cache { id: l.id, source })?;
                return Ok(total);
            }
            Err((stats, e)) => {
                if attempt == 0 {
                    total.resumed_from = stats.resumed_from;
                }
                total.received += stats.received;
                crate::info!(
                    "layer {}: attempt {} failed: {}",
                    l.id,
                    attempt + 1,
                    chain(&e)
                );
                let unreachable = e.is_unreachable();
                let fatal = matches!(e, FetchError::Cache { .. });
                last_err = Some(e);
                if unreachable || fatal {
                    break;
                }
                std::thread::sleep(std::time::Duration::from_millis(500));
            }
        }
    }
    Err(last_err.unwrap_or(FetchError::BadRange {
        id: l.id,
        from: 0,
        got: None,
    }))
}

/// One attempt; on error also returns what it received.
fn fetch_once(
    client: &Client,
    cache: &Cache,
    l: &LayerRef,
) -> Result<FetchStats, (FetchStats, FetchError)> {
    let mut stats = FetchStats::default();
    let path = cache.partial_path(&l.id);
    let wrap = |stats: FetchStats| move |e: FetchError| (stats, e);
    let mut file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(cache_io(l.id, &path))
        .map_err(wrap(stats))?;
    // Re-verify what is there, whole chunks only.
    let mut verifier = LayerVerifier::new(l.id, l.size, l.chunk_size, &l.chunks);
    let have = file
        .metadata()
        .map_err(cache_io(l.id, &path))
        .map_err(wrap(stats))?
        .len();
    let cs = u64::from(l.chunk_size);
    let mut good = 0u64;
    if have > 0 && have <= l.size {
        let whole = if have == l.size { have } else { have / cs * cs };
        let mut buf = vec![0u8; l.chunk_size as usize];
        let mut r = io::BufReader::new(&file);
        while good < whole {
            let n = (whole - good).min(cs) as usize;
            let b = buf.get_mut(..n).unwrap_or_default();
            if r.read_exact(b).is_err() {
                break;
            }
            // A chunk-local check first, so a bad chunk does not poison `verifier`.
            let idx = good / cs;
            let ok = l
                .chunks
                .get(idx as usize)
                .is_some_and(|h| *h == Digest::of(b));
            if !ok {
                break;
            }
            if verifier.update(b).is_err() {
                break;
            }
            good += n as u64;
        }
    }
    if good != have {
        file.set_len(good)
            .map_err(cache_io(l.id, &path))
            .map_err(wrap(stats))?;
    }
    stats.resumed_from = good;
    if good == l.size {
        return match verifier.finish() {
            Ok(()) => Ok(stats),
            Err(source) => {
                let _ = file.set_len(0);
                Err((stats, FetchError::Verify { id: l.id, source }))
            }
        };
    }
    if good > 0 {
        crate::marker!("stage=resume layer={} from={good} size={}", l.id, l.size);
    }
    let range = (good > 0).then_some((good, None));
    let mut resp = client.get(&l.url, range).map_err(|source| {
        let e = match source {
            HttpError::Status { status: 416, .. } if good > 0 => FetchError::ServerShorter {
                id: l.id,
                size: l.size,
                from: good,
            },
            source => FetchError::Http { id: l.id, source },
        };
        (stats, e)
    })?;
    if good > 0 {
        let ok = resp.status == 206
            && resp
                .content_range
                .is_some_and(|r| r.first == good && r.last + 1 == l.size);
        if !ok {
            let got = resp.content_range.map(|r| (r.first, r.last));
            return Err((
                stats,
                FetchError::BadRange {
                    id: l.id,
                    from: good,
                    got,
                },
            ));
        }
    }
    file.seek(SeekFrom::Start(good))
        .map_err(cache_io(l.id, &path))
        .map_err(wrap(stats))?;
    let mut buf = vec![0u8; 128 * 1024];
    let mut pos = good;
    loop {
        let n = match resp.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                let _ = file.sync_data();
                return Err((
                    stats,
                    FetchError::Http {
                        id: l.id,
                        source: HttpError::Io(e),
                    },
                ));
            }
        };
        let data = buf.get(..n).unwrap_or_default();
        if let Err(source) = verifier.update(data) {
            // Keep the verified chunks before the bad one (some may be in this buffer).
            if let VerifyError::ChunkMismatch { range, .. } = &source {
                let good = usize::try_from(range.start.saturating_sub(pos))
                    .unwrap_or(0)
                    .min(n);
                if file.write_all(data.get(..good).unwrap_or_default()).is_ok() {
                    stats.received += good as u64;
                    let _ = file.set_len(pos + good as u64);
                    let _ = file.sync_data();
                }
            }
            return Err((stats, FetchError::Verify { id: l.id, source }));
        }
        file.write_all(data)
            .map_err(cache_io(l.id, &path))
            .map_err(wrap(stats))?;
        if (pos + n as u64) / PROGRESS_EVERY > pos / PROGRESS_EVERY && pos + (n as u64) < l.size {
            crate::marker!(
                "stage=progress layer={} bytes={} size={}",
                l.id,
                pos + n as u64,
                l.size
            );
        }
        pos += n as u64;
        stats.received += n as u64;
    }
    file.sync_all()
        .map_err(cache_io(l.id, &path))
        .map_err(wrap(stats))?;
    verifier
        .finish()
        .map_err(|source| (stats, FetchError::Verify { id: l.id, source }))?;
    Ok(stats)
}

/// Re-fetches the listed chunks of a cached layer with range requests, checks each against
/// its signed hash and writes it in place. Returns the bytes received.
pub fn repair_chunks(
    client: &Client,
    cache: &Cache,
    l: &LayerRef,
    bad: &[u64],
) -> Result<u64, FetchError> {
    let mut received = 0;
    for &i in bad {
        let r = chunk_range(i, l.size, l.chunk_size);
        if r.is_empty() {
            continue;
        }
        let mut resp = client
            .get(&l.url, Some((r.start, Some(r.end - 1))))
            .map_err(|source| FetchError::Http { id: l.id, source })?;
        let ok = resp.status == 206
            && resp
                .content_range
                .is_some_and(|c| c.first == r.start && c.last + 1 == r.end);
        if !ok {
            let got = resp.content_range.map(|c| (c.first, c.last));
            return Err(FetchError::BadRange {
                id: l.id,
                from: r.start,
                got,
            });
        }
        let mut data = vec![0u8; (r.end - r.start) as usize];
        resp.read_exact(&mut data).map_err(|e| FetchError::Http {
            id: l.id,
            source: HttpError::Io(e),
        })?;
        received += data.len() as u64;
        if l.chunks.get(i as usize) != Some(&Digest::of(&data)) {
            return Err(FetchError::Verify {
                id: l.id,
                source: VerifyError::ChunkMismatch { index: i, range: r },
            });
        }
        cache
            .write_chunk(&l.id, r.start, &data)
            .map_err(|source| FetchError::Cache { id: l.id, source })?;
    }
    Ok(received)
}

/// An error and its sources on one line.
pub fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}
