//! Getting layers into the cache over HTTP: resumable downloads verified per chunk, and repair
//! of damaged chunks of a cached layer with `Range` requests (RFC 9110 §14).
//!
//! A download goes to `partial/<id>` and enters `layers/` only when every chunk and the
//! whole-file hash match the signed manifest. Two ways to fill it:
//!
//! - **Data extents** (docs/node-init.md, "Layer transfer"): the server's
//!   `GET /layers/{id}/extents` (`wire::extents`) names the byte ranges that hold data; the
//!   rest of the file is zeros. The partial file is made the layer's full size (sparse), and
//!   only the extents of chunks not yet verified are fetched, one `Range` request per run of
//!   extents closer than [`COALESCE_GAP`], each written at its offset. Resume needs no
//!   progress record: the chunks already in the partial file are hashed again, and those that
//!   match are kept, wherever they are (a previous attempt, a multicast session). After the
//!   transfer the whole file is hashed once; a chunk that still does not match (a wrong
//!   extents list, garbage where a hole should be) is fetched whole, by its own range. So a
//!   wrong list costs bytes, never a wrong layer.
//! - **Whole file**, when the server has no extents route (404: an older server), the list
//!   does not parse or does not match the manifest, or the layer has no holes: a sequential
//!   download verified chunk by chunk while it arrives. On resume the whole chunks already
//!   there are hashed again (a crash may have left garbage) and the download continues from
//!   the first chunk that is absent or wrong. A chunk that arrives wrong is cut off and
//!   fetched again.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::ops::Range;
use std::os::unix::fs::FileExt;

use wire::chunk::{chunk_count, chunk_range, Digest, LayerVerifier, VerifyError};
use wire::extents::{merge_gaps, Extents, MAX_DOCUMENT};
use wire::manifest::LayerRef;

use crate::cache::{Cache, CacheError};
use crate::http::{Client, HttpError};

/// Attempts per layer (each resumes where the previous stopped).
pub const ATTEMPTS: u32 = 4;

/// A `STRATA stage=progress layer=ID bytes=N size=S` marker each time a download passes a
/// multiple of this many bytes (so a watcher, or the lab's interrupted-download test, sees a
/// long download advance).
pub const PROGRESS_EVERY: u64 = 4 << 20;

/// Extents closer than this are fetched with one range request (the zeros between them
/// travel too): fewer requests, each a new connection, for a few bytes more. Below VHDX's
/// 64 KiB spacing of its header structures (file identifier, two headers, two region tables
/// 64 KiB apart, 4 KiB each), so those stay five small requests instead of 260 KiB; ext4's
/// scattered 4 KiB holes inside data merge.
pub const COALESCE_GAP: u64 = 32 * 1024;

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
    let extents = layer_extents(client, l)?;
    for attempt in 0..ATTEMPTS {
        let result = match &extents {
            Some(ext) => fetch_extents_once(client, cache, l, ext),
            None => fetch_once(client, cache, l),
        };
        match result {
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

/// The path of a layer's extents document: the layer URL's path (without its query) plus
/// `/extents`.
pub fn extents_path(layer_url: &str) -> String {
    let path = layer_url.split('?').next().unwrap_or(layer_url);
    format!("{}/extents", path.trim_end_matches('/'))
}

/// Asks the server for `l`'s data extents. `Ok(None)` means "fetch the whole file": the
/// server has no such route (404), answered badly, sent a list that does not parse or names
/// another layer or size, or the layer has no holes. Only an unreachable server is an error
/// (the whole-file download could not reach it either).
pub fn layer_extents(client: &Client, l: &LayerRef) -> Result<Option<Extents>, FetchError> {
    if l.size == 0 {
        return Ok(None);
    }
    let path = extents_path(&l.url);
    let doc = match client.get_bytes(&path, MAX_DOCUMENT) {
        Ok(doc) => doc,
        Err(source) if source.is_unreachable() => {
            return Err(FetchError::Http { id: l.id, source })
        }
        Err(HttpError::Status { status: 404, .. }) => {
            crate::info!("layer {}: no extents route on the server; whole file", l.id);
            return Ok(None);
        }
        Err(e) => {
            crate::info!("layer {}: extents: {}; whole file", l.id, chain(&e));
            return Ok(None);
        }
    };
    match Extents::parse_for(&doc, &l.id, l.size) {
        Ok(ext) if ext.data_bytes() < l.size => {
            crate::marker!(
                "stage=extents layer={} extents={} data={} size={}",
                l.id,
                ext.ranges().len(),
                ext.data_bytes(),
                l.size
            );
            Ok(Some(ext))
        }
        Ok(_) => Ok(None),
        Err(e) => {
            crate::info!("layer {}: extents refused: {e}; whole file", l.id);
            Ok(None)
        }
    }
}

/// Hashes every chunk of `file` (the layer's size) and the whole of it in one pass: the
/// indices of chunks that do not match `l`, and the whole file's blake3.
fn scan(file: &File, l: &LayerRef) -> io::Result<(Vec<u64>, Digest)> {
    let mut whole = blake3::Hasher::new();
    let mut bad = Vec::new();
    let mut buf = vec![0u8; l.chunk_size as usize];
    for i in 0..chunk_count(l.size, l.chunk_size) {
        let r = chunk_range(i, l.size, l.chunk_size);
        let b = buf
            .get_mut(..(r.end - r.start) as usize)
            .unwrap_or_default();
        file.read_exact_at(b, r.start)?;
        whole.update(b);
        if l.chunks.get(i as usize) != Some(&Digest::of(b)) {
            bad.push(i);
        }
    }
    Ok((bad, Digest::from(whole.finalize())))
}

/// [`FetchError::ServerShorter`] when the server's answer shows its file is shorter than the
/// manifest's size: the full length of a `Content-Range`, or the length of a whole (200)
/// answer. A server holding a cut copy of a layer is told apart from one answering a range
/// wrongly.
fn server_shorter<R: std::io::BufRead>(
    l: &LayerRef,
    from: u64,
    resp: &crate::http::Response<R>,
) -> Option<FetchError> {
    let total = match (resp.status, resp.content_range) {
        (206, Some(c)) => c.total,
        (200, _) => resp.content_length,
        _ => None,
    }?;
    (total < l.size).then_some(FetchError::ServerShorter {
        id: l.id,
        size: l.size,
        from,
    })
}

/// `GET l.url` for exactly `r` (206 with that `Content-Range`, or 200 when `r` is the whole
/// file).
fn get_range(
    client: &Client,
    l: &LayerRef,
    r: &Range<u64>,
) -> Result<crate::http::Response, FetchError> {
    let resp = client
        .get(&l.url, Some((r.start, Some(r.end - 1))))
        .map_err(|source| match source {
            HttpError::Status { status: 416, .. } => FetchError::ServerShorter {
                id: l.id,
                size: l.size,
                from: r.start,
            },
            source => FetchError::Http { id: l.id, source },
        })?;
    let exact = resp
        .content_range
        .is_some_and(|c| c.first == r.start && c.last + 1 == r.end);
    let whole = resp.status == 200 && r.start == 0 && resp.content_length == Some(r.end);
    if (resp.status == 206 && exact) || whole {
        return Ok(resp);
    }
    if let Some(e) = server_shorter(l, r.start, &resp) {
        return Err(e);
    }
    Err(FetchError::BadRange {
        id: l.id,
        from: r.start,
        got: resp.content_range.map(|c| (c.first, c.last)),
    })
}

/// Fetches chunk `i` of `l` whole by range and checks it against its hash (in memory, nothing
/// written): the chunk's bytes.
fn fetch_chunk(client: &Client, l: &LayerRef, i: u64) -> Result<Vec<u8>, FetchError> {
    let r = chunk_range(i, l.size, l.chunk_size);
    let mut resp = get_range(client, l, &r)?;
    let mut data = vec![0u8; (r.end - r.start) as usize];
    resp.read_exact(&mut data).map_err(|e| FetchError::Http {
        id: l.id,
        source: HttpError::Io(e),
    })?;
    if l.chunks.get(i as usize) != Some(&Digest::of(&data)) {
        return Err(FetchError::Verify {
            id: l.id,
            source: VerifyError::ChunkMismatch { index: i, range: r },
        });
    }
    Ok(data)
}

/// The ranges to request for chunks `todo` of `l`: the parts of the extents inside each
/// (the whole chunk if it has none yet must not be zeros: the list was wrong), runs closer
/// than [`COALESCE_GAP`] merged.
pub fn plan_requests(l: &LayerRef, ext: &Extents, todo: &[u64]) -> Vec<Range<u64>> {
    let mut wanted = Vec::new();
    let mut zero: Vec<(u64, Digest)> = Vec::new();
    for &i in todo {
        let r = chunk_range(i, l.size, l.chunk_size);
        let before = wanted.len();
        wanted.extend(ext.within(r.clone()));
        if wanted.len() == before {
            let len = r.end - r.start;
            let z = match zero.iter().find(|(n, _)| *n == len) {
                Some((_, d)) => *d,
                None => {
                    let d = Digest::of(&vec![0u8; len as usize]);
                    zero.push((len, d));
                    d
                }
            };
            if l.chunks.get(i as usize) != Some(&z) {
                wanted.push(r);
            }
        }
    }
    merge_gaps(wanted, COALESCE_GAP)
}

/// One attempt by extents (see the module docs); on error also returns what it received.
fn fetch_extents_once(
    client: &Client,
    cache: &Cache,
    l: &LayerRef,
    ext: &Extents,
) -> Result<FetchStats, (FetchStats, FetchError)> {
    let mut stats = FetchStats::default();
    let path = cache.partial_path(&l.id);
    let wrap = |stats: FetchStats| move |e: FetchError| (stats, e);
    let file = OpenOptions::new()
        .read(true)
        .write(true)
        .create(true)
        .truncate(false)
        .open(&path)
        .map_err(cache_io(l.id, &path))
        .map_err(wrap(stats))?;
    let had = file
        .metadata()
        .map_err(cache_io(l.id, &path))
        .map_err(wrap(stats))?
        .len();
    if had != l.size {
        // Sparse: what is not written stays a hole and reads as zeros.
        file.set_len(l.size)
            .map_err(cache_io(l.id, &path))
            .map_err(wrap(stats))?;
    }
    let all: Vec<u64> = (0..chunk_count(l.size, l.chunk_size)).collect();
    let todo = if had == 0 {
        all
    } else {
        let (bad, whole) = scan(&file, l)
            .map_err(cache_io(l.id, &path))
            .map_err(wrap(stats))?;
        let bad_bytes: u64 = bad
            .iter()
            .map(|&i| {
                let r = chunk_range(i, l.size, l.chunk_size);
                r.end - r.start
            })
            .sum();
        stats.resumed_from = l.size - bad_bytes;
        if bad.is_empty() && whole == l.id {
            return Ok(stats);
        }
        if stats.resumed_from > 0 {
            crate::marker!(
                "stage=resume layer={} from={} size={} chunks_left={}",
                l.id,
                stats.resumed_from,
                l.size,
                bad.len()
            );
        }
        bad
    };
    let requests = plan_requests(l, ext, &todo);
    let planned: u64 = requests.iter().map(|r| r.end - r.start).sum();
    let mut buf = vec![0u8; 128 * 1024];
    for r in &requests {
        let mut resp = get_range(client, l, r).map_err(wrap(stats))?;
        let mut pos = r.start;
        while pos < r.end {
            let want = buf
                .len()
                .min(usize::try_from(r.end - pos).unwrap_or(usize::MAX));
            let n = match resp.read(buf.get_mut(..want).unwrap_or_default()) {
                Ok(0) => {
                    return Err((
                        stats,
                        FetchError::Http {
                            id: l.id,
                            source: HttpError::Io(io::Error::new(
                                io::ErrorKind::UnexpectedEof,
                                "range body cut short",
                            )),
                        },
                    ))
                }
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
            file.write_all_at(buf.get(..n).unwrap_or_default(), pos)
                .map_err(cache_io(l.id, &path))
                .map_err(wrap(stats))?;
            let before = stats.received;
            stats.received += n as u64;
            pos += n as u64;
            if stats.received / PROGRESS_EVERY > before / PROGRESS_EVERY && stats.received < planned
            {
                crate::marker!(
                    "stage=progress layer={} bytes={} of={planned} size={}",
                    l.id,
                    stats.received,
                    l.size
                );
            }
        }
    }
    file.sync_data()
        .map_err(cache_io(l.id, &path))
        .map_err(wrap(stats))?;
    let (mut bad, mut whole) = scan(&file, l)
        .map_err(cache_io(l.id, &path))
        .map_err(wrap(stats))?;
    if !bad.is_empty() {
        crate::info!(
            "layer {}: {} chunk(s) wrong after the extents; fetching them whole",
            l.id,
            bad.len()
        );
        for &i in &bad {
            let data = fetch_chunk(client, l, i).map_err(wrap(stats))?;
            stats.received += data.len() as u64;
            let at = chunk_range(i, l.size, l.chunk_size).start;
            file.write_all_at(&data, at)
                .map_err(cache_io(l.id, &path))
                .map_err(wrap(stats))?;
        }
        file.sync_data()
            .map_err(cache_io(l.id, &path))
            .map_err(wrap(stats))?;
        (bad, whole) = scan(&file, l)
            .map_err(cache_io(l.id, &path))
            .map_err(wrap(stats))?;
    }
    if let Some(&index) = bad.first() {
        let range = chunk_range(index, l.size, l.chunk_size);
        return Err((
            stats,
            FetchError::Verify {
                id: l.id,
                source: VerifyError::ChunkMismatch { index, range },
            },
        ));
    }
    if whole != l.id {
        return Err((
            stats,
            FetchError::Verify {
                id: l.id,
                source: VerifyError::LayerMismatch {
                    expected: l.id,
                    actual: whole,
                },
            },
        ));
    }
    Ok(stats)
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
            if let Some(e) = server_shorter(l, good, &resp) {
                return Err((stats, e));
            }
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
        let data = fetch_chunk(client, l, i)?;
        received += data.len() as u64;
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
