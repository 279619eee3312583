//! Getting a layer from the server's multicast session when the signed manifest offers one
//! (docs/multicast.md, "node-init"), before HTTP.
//!
//! The receiver (`wire::multicast::net::receive`) follows only a session whose announcement
//! matches the layer's id, size, chunk size and chunk hashes from the manifest, and writes a
//! chunk into `partial/<id>` only after it hashes right; an existing partial download is
//! resumed. Whatever the session did not deliver before the offer's `wait_secs` (eviction, the
//! session ending, the deadline) is fetched chunk by chunk with HTTP `Range` requests, each
//! checked against its hash. The layer enters the cache only when the whole file matches the
//! layer id. Any failure here leaves the partial file to the ordinary HTTP download
//! ([`crate::fetch::fetch_layer`]), which keeps every chunk that verifies when it fetches by
//! data extents, and the verified prefix of the file when it fetches the whole file.

use std::fs::{File, OpenOptions};
use std::io::{self, Read};
use std::net::{IpAddr, Ipv4Addr, SocketAddr};
use std::os::unix::fs::FileExt;
use std::time::{Duration, Instant};

use wire::chunk::{chunk_range, Digest};
use wire::manifest::{LayerRef, MulticastOffer};
use wire::multicast::net::{receive, Outcome, ReceiveConfig, Received};
use wire::multicast::Expect;

use crate::cache::Cache;
use crate::http::{Client, HttpError};

/// Chunk buffers the receiver may hold at once (node memory is small).
pub const MAX_BUFFER_BYTES: usize = 32 << 20;
/// With more than this share of the chunks missing after the session, the sequential HTTP
/// download is cheaper than one range request per chunk.
const MAX_RANGE_SHARE: f64 = 0.5;

/// Why the multicast path did not put the layer in the cache (the caller falls back to HTTP).
#[derive(Debug, thiserror::Error)]
pub enum McastError {
    /// The receiver failed (socket or file).
    #[error("multicast receive")]
    Receive(#[source] wire::multicast::RecvError),
    /// A range request for a missing chunk failed.
    #[error("range request for chunk {chunk}")]
    Http {
        /// Chunk index.
        chunk: u32,
        /// Cause.
        #[source]
        source: HttpError,
    },
    /// The server's range answer or bytes did not match the chunk.
    #[error("chunk {chunk} from HTTP does not match its range or hash")]
    BadChunk {
        /// Chunk index.
        chunk: u32,
    },
    /// Too much is missing for range requests.
    #[error("{missing} of {chunks} chunks missing after the session")]
    MostlyMissing {
        /// Missing chunks.
        missing: usize,
        /// All chunks.
        chunks: u64,
    },
    /// Reading, writing or committing the partial file failed.
    #[error("cache file")]
    Io(#[source] io::Error),
    /// The finished file does not hash to the layer id.
    #[error("assembled layer does not match its id")]
    LayerMismatch,
}

/// What the multicast path did for one layer.
#[derive(Debug, Clone)]
pub struct McastFetch {
    /// How the session part ended.
    pub outcome: Outcome,
    /// Chunks received and verified from the group.
    pub chunks_from_group: u64,
    /// Chunks fetched with range requests afterwards.
    pub chunks_by_http: u64,
    /// Bytes of those range requests.
    pub http_bytes: u64,
}

/// The interface the kernel routes `server` through (`/proc/net/route`, longest prefix), the
/// one the group is joined on.
pub fn interface_towards(server: SocketAddr) -> Option<String> {
    let IpAddr::V4(ip) = server.ip() else {
        return None;
    };
    let text = std::fs::read_to_string("/proc/net/route").ok()?;
    route_interface(&text, ip)
}

/// Parses `/proc/net/route` text and picks the interface of the longest matching prefix.
pub fn route_interface(text: &str, ip: Ipv4Addr) -> Option<String> {
    let target = u32::from(ip);
    let mut best: Option<(u32, String)> = None;
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        let (Some(name), Some(dest), Some(mask)) = (f.first(), f.get(1), f.get(7)) else {
            continue;
        };
        // Addresses are hex in host (little-endian) byte order.
        let parse = |s: &str| {
            u32::from_str_radix(s, 16)
                .ok()
                .map(|v| u32::from_be_bytes(v.to_le_bytes()))
        };
        let (Some(dest), Some(mask)) = (parse(dest), parse(mask)) else {
            continue;
        };
        if target & mask == dest & mask
            && best
                .as_ref()
                .is_none_or(|(m, _)| mask.count_ones() > m.count_ones())
        {
            best = Some((mask, (*name).to_owned()));
        }
    }
    best.map(|(_, n)| n)
}

/// Receives `l` from the session `offer` names into the cache's partial file, fills what the
/// session left missing with range requests, verifies the whole layer and commits it.
/// `Ok` means the layer is in the cache; on `Err` the partial file keeps every verified chunk
/// and the caller downloads the rest over HTTP.
pub fn fetch_layer(
    client: &Client,
    cache: &Cache,
    l: &LayerRef,
    offer: &MulticastOffer,
) -> Result<McastFetch, McastError> {
    let path = cache.partial_path(&l.id);
    let mut cfg = ReceiveConfig::new(
        offer.group,
        Expect::Known {
            id: l.id,
            size: l.size,
            chunk_size: l.chunk_size,
            chunks: l.chunks.clone(),
        },
    );
    cfg.iface = interface_towards(client.addr());
    cfg.deadline = Some(Instant::now() + Duration::from_secs(u64::from(offer.wait_secs)));
    cfg.max_buffer_bytes = MAX_BUFFER_BYTES;
    crate::marker!(
        "stage=multicast layer={} group={} iface={}",
        l.id,
        offer.group,
        cfg.iface.as_deref().unwrap_or("-")
    );
    let r: Received = receive(&cfg, &path).map_err(McastError::Receive)?;
    let mut done = McastFetch {
        outcome: r.outcome,
        chunks_from_group: r.stats.chunks_written,
        chunks_by_http: 0,
        http_bytes: 0,
    };
    if r.outcome != Outcome::Complete {
        // Never joined: everything is missing.
        let missing: Vec<u32> = if r.layer.is_none() {
            (0..wire::chunk::chunk_count(l.size, l.chunk_size) as u32).collect()
        } else {
            r.missing.clone()
        };
        let chunks = wire::chunk::chunk_count(l.size, l.chunk_size);
        if missing.len() as f64 > chunks as f64 * MAX_RANGE_SHARE {
            return Err(McastError::MostlyMissing {
                missing: missing.len(),
                chunks,
            });
        }
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .open(&path)
            .map_err(McastError::Io)?;
        for c in missing {
            let n = fill_chunk(client, &file, l, c)?;
            done.chunks_by_http += 1;
            done.http_bytes += n;
        }
        if layer_digest(&file).map_err(McastError::Io)? != l.id {
            return Err(McastError::LayerMismatch);
        }
    }
    cache
        .commit_partial(&l.id)
        .map_err(|e| McastError::Io(io::Error::other(e.to_string())))?;
    crate::marker!(
        "stage=multicast_done layer={} outcome={:?} group_chunks={} http_chunks={} http_bytes={}",
        l.id,
        done.outcome,
        done.chunks_from_group,
        done.chunks_by_http,
        done.http_bytes
    );
    Ok(done)
}

/// Fetches chunk `c` with a range request, checks it and writes it at its offset.
fn fill_chunk(client: &Client, file: &File, l: &LayerRef, c: u32) -> Result<u64, McastError> {
    let r = chunk_range(u64::from(c), l.size, l.chunk_size);
    let bad = McastError::BadChunk { chunk: c };
    if r.is_empty() {
        return Err(bad);
    }
    let mut resp = client
        .get(&l.url, Some((r.start, Some(r.end - 1))))
        .map_err(|source| McastError::Http { chunk: c, source })?;
    let ok = resp.status == 206
        && resp
            .content_range
            .is_some_and(|cr| cr.first == r.start && cr.last + 1 == r.end);
    if !ok {
        return Err(bad);
    }
    let mut data = vec![0u8; (r.end - r.start) as usize];
    resp.read_exact(&mut data).map_err(|e| McastError::Http {
        chunk: c,
        source: HttpError::Io(e),
    })?;
    if l.chunks.get(c as usize) != Some(&Digest::of(&data)) {
        return Err(bad);
    }
    file.write_all_at(&data, r.start).map_err(McastError::Io)?;
    Ok(data.len() as u64)
}

fn layer_digest(file: &File) -> io::Result<Digest> {
    let mut h = blake3::Hasher::new();
    let mut buf = vec![0u8; 1 << 20];
    let mut off = 0u64;
    loop {
        let n = file.read_at(&mut buf, off)?;
        if n == 0 {
            break;
        }
        h.update(buf.get(..n).unwrap_or_default());
        off += n as u64;
    }
    Ok(Digest::from(h.finalize()))
}

#[cfg(test)]
mod tests {
    use super::*;

    const ROUTES: &str =
        "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
        eth0\t00000000\t0102000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
        eth0\t0002000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
        eth1\t0000A8C0\t00000000\t0001\t0\t0\t0\t0000FFFF\t0\t0\t0\n";

    #[test]
    fn the_longest_prefix_names_the_interface() {
        assert_eq!(
            route_interface(ROUTES, Ipv4Addr::new(10, 0, 2, 2)).as_deref(),
            Some("eth0")
        );
        assert_eq!(
            route_interface(ROUTES, Ipv4Addr::new(192, 168, 7, 1)).as_deref(),
            Some("eth1")
        );
        assert_eq!(
            route_interface(ROUTES, Ipv4Addr::new(8, 8, 8, 8)).as_deref(),
            Some("eth0")
        );
        let no_default = ROUTES
            .lines()
            .filter(|l| !l.contains("0102000A"))
            .collect::<Vec<_>>()
            .join("\n");
        assert_eq!(
            route_interface(&no_default, Ipv4Addr::new(8, 8, 8, 8)),
            None
        );
        assert_eq!(
            route_interface("garbage\nx y z\n", Ipv4Addr::new(1, 2, 3, 4)),
            None
        );
    }
}
