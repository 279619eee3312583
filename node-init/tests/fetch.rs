//! Downloads and repair against the fixture server (no VM): verified while received,
//! resumed after a cut transfer, repaired chunk by chunk, refused when the bytes are wrong.

mod support;

use node_init::cache::Cache;
use node_init::fetch::{fetch_layer, repair_chunks, FetchError};
use node_init::http::Client;
use support::server::Server;
use wire::chunk::{chunk_hashes, VerifyError};
use wire::manifest::{LayerKind, LayerRef};

fn layer(bytes: &[u8]) -> LayerRef {
    let (id, size, chunks) = chunk_hashes(bytes, 4096).unwrap();
    LayerRef {
        id,
        size,
        kind: LayerKind::Base,
        chunk_size: 4096,
        chunks,
        url: format!("/layers/{id}"),
    }
}

fn data(n: usize) -> Vec<u8> {
    (0..n).map(|i| (i * 31 % 251) as u8).collect()
}

fn setup(bytes: &[u8]) -> (Server, Client, Cache, LayerRef, tempfile::TempDir) {
    let srv = Server::start().unwrap();
    let l = layer(bytes);
    srv.add_layer(l.id, bytes.to_vec());
    let client = Client::new(format!("127.0.0.1:{}", srv.port).parse().unwrap());
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    (srv, client, cache, l, dir)
}

#[test]
fn whole_download_enters_the_cache_verified() {
    let bytes = data(50_000);
    let (srv, client, cache, l, _d) = setup(&bytes);
    let st = fetch_layer(&client, &cache, &l, |_| {}).unwrap();
    assert_eq!(st.received, 50_000);
    assert_eq!(std::fs::read(cache.layer_path(&l.id)).unwrap(), bytes);
    assert!(!cache.partial_path(&l.id).exists());
    assert!(cache.verify_layer(&l).unwrap().is_empty());
    assert_eq!(srv.sent(&l.id), 50_000);
}

#[test]
fn cut_transfer_resumes_from_the_last_whole_chunk() {
    let bytes = data(50_000);
    let (srv, client, cache, l, _d) = setup(&bytes);
    srv.state.lock().unwrap().cut = Some((l.id, 20_000));
    let st = fetch_layer(&client, &cache, &l, |_| {}).unwrap();
    // 20,000 bytes, then from chunk 4 (16,384) to the end.
    assert_eq!(st.received, 20_000 + (50_000 - 16_384));
    assert_eq!(std::fs::read(cache.layer_path(&l.id)).unwrap(), bytes);
    let reqs = srv.state.lock().unwrap().requests.clone();
    assert_eq!(reqs.len(), 2);
}

#[test]
fn partial_left_by_a_previous_boot_is_rechecked_and_resumed() {
    let bytes = data(50_000);
    let (srv, client, cache, l, _d) = setup(&bytes);
    // A previous boot got 3 chunks, the third one damaged, plus half a chunk.
    let mut partial = bytes[..14_000].to_vec();
    partial[9000] ^= 0xff;
    std::fs::write(cache.partial_path(&l.id), &partial).unwrap();
    let st = fetch_layer(&client, &cache, &l, |_| {}).unwrap();
    assert_eq!(st.resumed_from, 8192);
    assert_eq!(srv.sent(&l.id), 50_000 - 8192);
    assert_eq!(std::fs::read(cache.layer_path(&l.id)).unwrap(), bytes);
}

#[test]
fn wrong_bytes_never_enter_the_cache() {
    let bytes = data(50_000);
    let (srv, client, cache, l, _d) = setup(&bytes);
    let mut evil = bytes.clone();
    evil[30_000] ^= 1;
    srv.add_layer(l.id, evil);
    let err = fetch_layer(&client, &cache, &l, |_| {}).unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Verify {
                source: VerifyError::ChunkMismatch { index: 7, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!cache.layer_path(&l.id).exists());
    // Only the good chunks before the bad one are kept for a resume.
    assert_eq!(
        std::fs::metadata(cache.partial_path(&l.id)).unwrap().len(),
        7 * 4096
    );
}

#[test]
fn damaged_cached_chunk_is_repaired_alone() {
    let bytes = data(50_000);
    let (srv, client, cache, l, _d) = setup(&bytes);
    fetch_layer(&client, &cache, &l, |_| {}).unwrap();
    srv.reset_counters();
    let path = cache.layer_path(&l.id);
    let mut on_disk = std::fs::read(&path).unwrap();
    on_disk[45_000] ^= 0x01;
    std::fs::write(&path, &on_disk).unwrap();
    let bad = cache.verify_layer(&l).unwrap();
    assert_eq!(bad, vec![10]);
    let got = repair_chunks(&client, &cache, &l, &bad).unwrap();
    assert_eq!(got, 4096);
    assert_eq!(srv.sent(&l.id), 4096);
    assert!(cache.verify_layer(&l).unwrap().is_empty());
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
}

#[test]
fn unreachable_server_is_reported_as_such() {
    let bytes = data(5000);
    let l = layer(&bytes);
    let dir = tempfile::tempdir().unwrap();
    let cache = Cache::open(dir.path()).unwrap();
    // A port nobody listens on.
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    let client = Client::new(format!("127.0.0.1:{port}").parse().unwrap());
    let err = fetch_layer(&client, &cache, &l, |_| {}).unwrap_err();
    assert!(err.is_unreachable(), "{err:?}");
}
