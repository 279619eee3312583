//! Layer files for nodes: `GET /layers/{id}` (the file, with `Range`: RFC 9110 §14) and
//! `GET /layers/{id}/extents` (its data extents, `wire::extents`, so that a node fetches only
//! the bytes that are not holes of the sparse store file).
//!
//! Both are reachable without a token (content-addressed: a client must already know the
//! blake3 it asks for). `?node=<mac>` on a layer download counts the body bytes toward that
//! node's `layer_bytes` as they are handed to the connection, so an interrupted or ranged
//! download counts what was sent, not the response's length.

use std::collections::HashMap;
use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path as FsPath;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use axum::body::{Body, Bytes};
use axum::extract::{Path, Query, Request, State};
use axum::http::header;
use axum::response::{IntoResponse, Response};
use axum::routing::get;
use axum::Router;
use http_body::{Body as HttpBody, Frame, SizeHint};
use serde::Deserialize;
use wire::extents::Extents;
use wire::LayerId;

use super::{serve_file, truncate, HttpError};
use crate::boot::ipxe;
use crate::fleet::Fleet;

/// Extents documents kept per router (one per layer asked for; the cache starts over when
/// full, layers never change so nothing goes stale).
const MAX_CACHED: usize = 4096;

#[derive(Clone)]
struct LayerState {
    fleet: Arc<Fleet>,
    extents: Arc<Mutex<HashMap<LayerId, Bytes>>>,
}

/// The layer routes, served from `fleet`'s store.
pub(super) fn router(fleet: Arc<Fleet>) -> Router {
    Router::new()
        .route("/layers/{id}", get(layer))
        .route("/layers/{id}/extents", get(extents))
        .with_state(LayerState {
            fleet,
            extents: Arc::default(),
        })
}

/// The data runs of `file` (its first `size` bytes) found with `SEEK_DATA`/`SEEK_HOLE`: the
/// ranges that are not holes. A file system without hole reporting gives one run, the whole
/// file (Linux treats every byte as data there).
pub fn data_runs(file: &File, size: u64) -> io::Result<Vec<Range<u64>>> {
    use rustix::fs::{seek, SeekFrom};
    let mut runs = Vec::new();
    let mut pos = 0u64;
    while pos < size {
        let data = match seek(file, SeekFrom::Data(pos)) {
            Ok(d) => d,
            // No data at or after pos.
            Err(rustix::io::Errno::NXIO) => break,
            Err(e) => return Err(e.into()),
        };
        if data >= size {
            break;
        }
        let hole = match seek(file, SeekFrom::Hole(data)) {
            Ok(h) if h > data => h.min(size),
            Ok(_) | Err(rustix::io::Errno::NXIO) => size,
            Err(e) => return Err(e.into()),
        };
        runs.push(data..hole);
        pos = hole;
    }
    Ok(runs)
}

/// The extents of the layer file at `path` (named `id`), and its bytes allocated on disk.
pub fn layer_extents(path: &FsPath, id: LayerId) -> io::Result<(Extents, u64)> {
    use std::os::unix::fs::MetadataExt;
    let file = File::open(path)?;
    let meta = file.metadata()?;
    let runs = data_runs(&file, meta.len())?;
    Ok((
        Extents::from_runs(id, meta.len(), runs),
        meta.blocks().saturating_mul(512),
    ))
}

fn parse_id(text: &str) -> Result<LayerId, HttpError> {
    text.trim_end_matches(".vhdx")
        .parse()
        .map_err(|_| HttpError::bad_request(format!("not a layer id: {:?}", truncate(text))))
}

#[derive(Deserialize)]
struct LayerQuery {
    node: Option<String>,
}

async fn layer(
    State(st): State<LayerState>,
    Path(id): Path<String>,
    Query(q): Query<LayerQuery>,
    req: Request,
) -> Result<Response, HttpError> {
    let id = parse_id(&id)?;
    let path = st
        .fleet
        .layer_path(&id)
        .await?
        .ok_or_else(|| HttpError::not_found(format!("no layer {id}")))?;
    let resp = serve_file(Some(&path), "layer", req).await?;
    let Some(mac) = q.node.as_deref().and_then(ipxe::normalize_mac) else {
        return Ok(resp);
    };
    let (parts, body) = resp.into_parts();
    let counted = Counted {
        inner: body,
        fleet: st.fleet,
        mac,
    };
    Ok(Response::from_parts(parts, Body::new(counted)))
}

async fn extents(
    State(st): State<LayerState>,
    Path(id): Path<String>,
) -> Result<Response, HttpError> {
    let id = parse_id(&id)?;
    let cached = st
        .extents
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&id)
        .cloned();
    let doc = match cached {
        Some(doc) => doc,
        None => {
            let path = st
                .fleet
                .layer_path(&id)
                .await?
                .ok_or_else(|| HttpError::not_found(format!("no layer {id}")))?;
            let found = tokio::task::spawn_blocking({
                let path = path.clone();
                move || layer_extents(&path, id)
            })
            .await;
            let (ext, _) = match found {
                Ok(Ok(found)) => found,
                Ok(Err(err)) => {
                    tracing::error!(file = %path.display(), error = %err, "layer extents");
                    return Err(HttpError::not_found(format!("layer {id} unreadable")));
                }
                Err(err) => {
                    return Err(super::file_internal(&path, &format!("extents task: {err}")))
                }
            };
            let doc = Bytes::from(ext.to_json());
            let mut cache = st.extents.lock().unwrap_or_else(|e| e.into_inner());
            if cache.len() >= MAX_CACHED {
                cache.clear();
            }
            cache.insert(id, doc.clone());
            doc
        }
    };
    Ok(([(header::CONTENT_TYPE, "application/json")], doc).into_response())
}

/// A response body that counts its data bytes toward a node's `layer_bytes` as the
/// connection takes them (at most one frame, [`super::file::CHUNK`] bytes, may be counted but
/// not yet on the wire when a client goes away).
struct Counted {
    inner: Body,
    fleet: Arc<Fleet>,
    mac: String,
}

impl HttpBody for Counted {
    type Data = Bytes;
    type Error = axum::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, axum::Error>>> {
        let this = &mut *self;
        let polled = Pin::new(&mut this.inner).poll_frame(cx);
        if let Poll::Ready(Some(Ok(frame))) = &polled {
            if let Some(data) = frame.data_ref() {
                this.fleet.count_layer_bytes(&this.mac, data.len() as u64);
            }
        }
        polled
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::FileExt;

    #[test]
    fn data_runs_skip_holes_and_cover_every_written_byte() -> anyhow::Result<()> {
        let dir = tempfile::tempdir()?;
        let p = dir.path().join("f");
        let f = File::create(&p)?;
        f.set_len(8 << 20)?;
        f.write_all_at(&[1; 10], 0)?;
        f.write_all_at(&[2; 5000], 3 << 20)?;
        f.write_all_at(&[3; 1], (8 << 20) - 1)?;
        let runs = data_runs(&f, 8 << 20)?;
        // Whatever the file system's granularity, every written byte is inside a run...
        for at in [0, 9, 3 << 20, (3 << 20) + 4999, (8 << 20) - 1] {
            assert!(runs.iter().any(|r| r.contains(&at)), "{at} not in {runs:?}");
        }
        // ...and on one that reports holes (ext4, tmpfs, xfs, btrfs) the 8 MiB are not all data.
        let data: u64 = runs.iter().map(|r| r.end - r.start).sum();
        assert!(data < 1 << 20, "{runs:?}");
        let (ext, allocated) = layer_extents(&p, wire::Digest::of(b"x"))?;
        assert_eq!(ext.data_bytes(), data);
        assert!(allocated >= data && allocated < 1 << 20, "{allocated}");
        // An empty file has none.
        let e = dir.path().join("e");
        File::create(&e)?;
        assert!(data_runs(&File::open(&e)?, 0)?.is_empty());
        Ok(())
    }
}
