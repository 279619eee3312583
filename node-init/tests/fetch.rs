//! Downloads and repair against the fixture server (no VM): verified while received,
//! resumed after a cut transfer, repaired chunk by chunk, refused when the bytes are wrong;
//! and by data extents (`GET /layers/{id}/extents`): only the extents move, resumed inside an
//! extent, a wrong list costs bytes and never a wrong layer.
// `&[a..b]` below is a list of one data run, not a range to expand.
#![allow(clippy::single_range_in_vec_init)]

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
    // Two layer requests (the fixture has no extents route: 404, a whole-file download).
    let reqs = srv.state.lock().unwrap().ranges.clone();
    assert_eq!(reqs, vec![None, Some((16_384, None))]);
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

/// A server holding a cut copy of the layer (fewer bytes than the manifest names) is a size
/// mismatch, whether the node starts from nothing (a 200 that is too short) or resumes past
/// verified chunks (a 206 whose `Content-Range` total is too small); nothing enters the cache.
#[test]
fn a_server_with_a_cut_copy_is_a_size_mismatch() {
    let bytes = data(50_000);
    for resumed in [false, true] {
        let (srv, client, cache, l, _d) = setup(&bytes);
        srv.add_layer(l.id, bytes[..30_000].to_vec());
        if resumed {
            std::fs::write(cache.partial_path(&l.id), &bytes[..20_480]).unwrap();
        }
        let err = fetch_layer(&client, &cache, &l, |_| {}).unwrap_err();
        assert!(
            matches!(
                err,
                FetchError::ServerShorter { size: 50_000, .. }
                    | FetchError::Verify {
                        source: VerifyError::Incomplete { .. },
                        ..
                    }
            ),
            "resumed={resumed}: {err:?}"
        );
        if resumed {
            assert!(
                matches!(err, FetchError::ServerShorter { from: 20_480, .. }),
                "{err:?}"
            );
        }
        assert!(!cache.layer_path(&l.id).exists());
    }
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

// ---- Transfer by data extents (`GET /layers/{id}/extents`) ----

use node_init::fetch::plan_requests;
use wire::extents::Extents;

/// A 400,000-byte layer whose data sits in `runs` (zeros elsewhere), served with its
/// extents document.
fn sparse_setup(
    runs: &[std::ops::Range<usize>],
) -> (Server, Client, Cache, LayerRef, Vec<u8>, tempfile::TempDir) {
    let mut bytes = vec![0u8; 400_000];
    for r in runs {
        for i in r.clone() {
            bytes[i] = (i % 251) as u8 | 1;
        }
    }
    let (srv, client, cache, l, dir) = setup(&bytes);
    let ext = Extents::from_runs(
        l.id,
        l.size,
        runs.iter().map(|r| r.start as u64..r.end as u64),
    );
    srv.state
        .lock()
        .unwrap()
        .extents
        .insert(l.id, ext.to_json());
    (srv, client, cache, l, bytes, dir)
}

fn allocated(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).unwrap().blocks() * 512
}

#[test]
fn a_sparse_layer_moves_only_its_extents_and_stays_sparse() {
    let (srv, client, cache, l, bytes, _d) = sparse_setup(&[0..5000, 200_000..260_000]);
    let st = fetch_layer(&client, &cache, &l, |_| {}).unwrap();
    assert_eq!(st.received, 65_000, "the two extents, nothing else");
    assert_eq!(srv.sent(&l.id), 65_000);
    let path = cache.layer_path(&l.id);
    assert_eq!(std::fs::read(&path).unwrap(), bytes);
    assert!(cache.verify_layer(&l).unwrap().is_empty());
    assert!(
        allocated(&path) < 200_000,
        "the cached copy keeps the holes: {} bytes allocated",
        allocated(&path)
    );
    let ranges = srv.state.lock().unwrap().ranges.clone();
    assert_eq!(
        ranges,
        vec![Some((0, Some(4999))), Some((200_000, Some(259_999)))]
    );
}

#[test]
fn extents_closer_than_32_kib_go_in_one_request() {
    let (srv, client, cache, l, bytes, _d) =
        sparse_setup(&[0..5000, 25_000..26_000, 100_000..101_000]);
    let st = fetch_layer(&client, &cache, &l, |_| {}).unwrap();
    assert_eq!(
        st.received,
        26_000 + 1000,
        "the 20,000 zeros between the first two travel too"
    );
    assert_eq!(std::fs::read(cache.layer_path(&l.id)).unwrap(), bytes);
    assert_eq!(
        srv.state.lock().unwrap().ranges,
        vec![Some((0, Some(25_999))), Some((100_000, Some(100_999)))]
    );
}

#[test]
fn a_transfer_cut_mid_extent_resumes_at_the_first_unverified_chunk() {
    let (srv, client, cache, l, bytes, _d) = sparse_setup(&[200_000..260_000]);
    srv.state.lock().unwrap().cut = Some((l.id, 30_000));
    let st = fetch_layer(&client, &cache, &l, |_| {}).unwrap();
    // 200,000..230,000 arrived; chunk 56 (229,376..233,472) was cut, so the second request
    // starts there, inside the extent: 260,000 - 229,376 = 30,624 bytes.
    assert_eq!(st.received, 30_000 + 30_624);
    assert_eq!(srv.sent(&l.id), 30_000 + 30_624);
    let ranges = srv.state.lock().unwrap().ranges.clone();
    assert_eq!(
        ranges,
        vec![
            Some((200_000, Some(259_999))),
            Some((229_376, Some(259_999)))
        ]
    );
    assert_eq!(std::fs::read(cache.layer_path(&l.id)).unwrap(), bytes);
}

#[test]
fn a_partial_left_by_a_previous_boot_keeps_every_verified_chunk() {
    let (srv, client, cache, l, bytes, _d) = sparse_setup(&[0..5000, 200_000..260_000]);
    // The previous boot got the first extent and part of the second, with one chunk (50:
    // 204,800..208,896) damaged.
    let mut partial = vec![0u8; 400_000];
    partial[..5000].copy_from_slice(&bytes[..5000]);
    partial[200_000..240_000].copy_from_slice(&bytes[200_000..240_000]);
    partial[205_000] ^= 0xff;
    std::fs::write(cache.partial_path(&l.id), &partial).unwrap();
    let st = fetch_layer(&client, &cache, &l, |_| {}).unwrap();
    // Chunk 50 (204,800..208,896) again, and from chunk 58 (237,568) to the extent's end
    // (260,000): 28,672 bytes apart, so one request (the verified chunks between travel too).
    assert_eq!(st.received, 260_000 - 204_800);
    assert_eq!(
        srv.state.lock().unwrap().ranges,
        vec![Some((204_800, Some(259_999)))]
    );
    assert_eq!(st.resumed_from, 400_000 - 4096 - (262_144 - 237_568));
    assert_eq!(std::fs::read(cache.layer_path(&l.id)).unwrap(), bytes);
}

#[test]
fn a_wrong_extents_list_costs_bytes_never_a_wrong_layer() {
    // 128 KiB chunks: 0..131,072, ..262,144, ..393,216, ..400,000.
    let mut bytes = vec![0u8; 400_000];
    for i in (0..5000).chain(200_000..260_000) {
        bytes[i] = (i % 251) as u8 | 1;
    }
    let (id, size, chunks) = chunk_hashes(&bytes[..], 128 << 10).unwrap();
    let l = LayerRef {
        id,
        size,
        kind: LayerKind::Role,
        chunk_size: 128 << 10,
        chunks,
        url: format!("/layers/{id}?node=52:54:00:00:00:01"),
    };
    let (srv, client, cache, _, _d) = setup(&bytes);
    srv.add_layer(id, bytes.clone());
    // The list names a part of each extent only.
    let lie = Extents::new(id, size, vec![0..1000, 250_000..260_000]).unwrap();
    srv.state.lock().unwrap().extents.insert(id, lie.to_json());
    let st = fetch_layer(&client, &cache, &l, |_| {}).unwrap();
    assert_eq!(std::fs::read(cache.layer_path(&id)).unwrap(), bytes);
    // The 11,000 listed bytes, then chunks 0 and 1 whole once their hashes show them wrong.
    assert_eq!(st.received, 11_000 + 2 * (128 << 10));
    assert_eq!(
        srv.state.lock().unwrap().ranges,
        vec![
            Some((0, Some(999))),
            Some((250_000, Some(259_999))),
            Some((0, Some(131_071))),
            Some((131_072, Some(262_143))),
        ]
    );
}

#[test]
fn an_unusable_extents_document_means_a_whole_file_download() {
    for doc in [
        b"not json".to_vec(),
        // Another size than the manifest's.
        Extents::new(wire::Digest::of(b"x"), 10, vec![0..1])
            .unwrap()
            .to_json(),
    ] {
        let (srv, client, cache, l, bytes, _d) = sparse_setup(&[0..5000]);
        srv.state.lock().unwrap().extents.insert(l.id, doc);
        let st = fetch_layer(&client, &cache, &l, |_| {}).unwrap();
        assert_eq!(st.received, 400_000);
        assert_eq!(std::fs::read(cache.layer_path(&l.id)).unwrap(), bytes);
        assert_eq!(srv.state.lock().unwrap().ranges, vec![None]);
    }
}

#[test]
fn wrong_bytes_by_extents_never_enter_the_cache() {
    let (srv, client, cache, l, bytes, _d) = sparse_setup(&[200_000..260_000]);
    let mut evil = bytes.clone();
    evil[210_000] ^= 1;
    srv.add_layer(l.id, evil);
    let err = fetch_layer(&client, &cache, &l, |_| {}).unwrap_err();
    assert!(
        matches!(
            err,
            FetchError::Verify {
                source: VerifyError::ChunkMismatch { index: 51, .. },
                ..
            }
        ),
        "{err:?}"
    );
    assert!(!cache.layer_path(&l.id).exists());
}

#[test]
fn requests_cover_the_extents_of_unverified_chunks_only() {
    let bytes: Vec<u8> = (0..1_000_000).map(|i| u8::from(i < 940_000)).collect();
    let l = layer(&bytes);
    let ext = Extents::new(l.id, l.size, vec![1000..2000, 9000..900_000]).unwrap();
    // Chunk 0 holds 1000..2000 and chunk 2 (8192..12288) 9000..12288: 7,000 apart, one
    // request. Chunks 100 and 200 lie inside the second extent. Chunk 229 (937,984..942,080)
    // has no extent but is not zeros (the list is wrong): whole. Chunk 240 has no extent and
    // is zeros: nothing to fetch.
    let got = plan_requests(&l, &ext, &[0, 2, 100, 200, 229, 240]);
    assert_eq!(
        got,
        vec![
            1000..12_288,
            409_600..413_696,
            819_200..823_296,
            937_984..942_080
        ]
    );
}

mod by_extents_model {
    //! Whatever the server's list says (right, missing data, naming zeros, empty) and whatever
    //! a previous attempt left in the partial file (right chunks, garbage, a cut transfer), a
    //! fetch by extents ends with exactly the layer, and never moves more than the whole file
    //! plus one re-fetch of each chunk.
    use super::*;
    use proptest::prelude::*;
    use std::ops::Range;

    fn runs(size: u64) -> impl Strategy<Value = Vec<Range<u64>>> {
        proptest::collection::vec((0..size, 1u64..20_000), 0..6)
            .prop_map(move |v| v.into_iter().map(|(s, l)| s..(s + l).min(size)).collect())
    }

    proptest! {
        #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]
        #[test]
        fn any_list_and_any_partial_give_the_layer(
            data in runs(120_000),
            claimed in runs(120_000),
            use_true in any::<bool>(),
            partial in proptest::collection::vec((0u64..30, 0u8..3), 0..8),
            cut in proptest::option::of(1u64..30_000),
        ) {
            let size = 120_000u64;
            let mut bytes = vec![0u8; size as usize];
            for r in &data {
                for i in r.clone() {
                    bytes[i as usize] = (i % 253) as u8 | 1;
                }
            }
            let (srv, client, cache, l, _d) = setup(&bytes);
            let list = if use_true { data.clone() } else { claimed.clone() };
            let ext = Extents::from_runs(l.id, size, list);
            srv.state.lock().unwrap().extents.insert(l.id, ext.to_json());
            srv.state.lock().unwrap().cut = cut.map(|n| (l.id, n));
            if !partial.is_empty() {
                // A previous attempt: some chunks right, some garbage, some zeros.
                let mut p = vec![0u8; size as usize];
                for (chunk, kind) in &partial {
                    let r = wire::chunk::chunk_range(*chunk, size, 4096);
                    let (a, b) = (r.start as usize, r.end as usize);
                    match kind {
                        0 => p[a..b].copy_from_slice(&bytes[a..b]),
                        1 => p[a..b].fill(0xee),
                        _ => p[a..b].fill(0),
                    }
                }
                std::fs::write(cache.partial_path(&l.id), &p).unwrap();
            }
            let st = fetch_layer(&client, &cache, &l, |_| {}).unwrap();
            prop_assert_eq!(std::fs::read(cache.layer_path(&l.id)).unwrap(), bytes);
            prop_assert!(!cache.partial_path(&l.id).exists());
            let cut_extra = cut.unwrap_or(0);
            prop_assert!(
                st.received <= 2 * size + cut_extra,
                "moved {} for a {size}-byte layer", st.received
            );
            if use_true && partial.is_empty() && cut.is_none() {
                // A true list on a fresh download: the data (and gaps under 32 KiB), nothing else.
                let all: Vec<u64> = (0..wire::chunk::chunk_count(size, 4096)).collect();
                let planned: u64 = plan_requests(&l, &ext, &all).iter().map(|r| r.end - r.start).sum();
                prop_assert_eq!(st.received, planned);
                prop_assert!(planned >= ext.data_bytes());
            }
        }
    }
}
