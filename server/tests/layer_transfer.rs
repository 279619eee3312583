//! Layer transfer by data extents, end to end: the real `strata serve` (its store, its
//! `/layers/{id}` and `/layers/{id}/extents` routes, its per-node byte counter) and node-init's
//! own fetch code (`node_init::fetch::fetch_layer`) into a node cache in a temporary directory.
//! What a node moves tracks the bytes allocated on the server's disk, the cached copy is
//! byte-identical, and a download that stopped inside an extent resumes there.

mod support;

use std::os::unix::fs::MetadataExt;

use anyhow::{ensure, Context, Result};
use node_init::cache::Cache;
use node_init::fetch::{fetch_layer, plan_requests};
use node_init::http::Client;
use wire::chunk::{chunk_count, chunk_range};
use wire::extents::Extents;
use wire::manifest::{LayerKind, Manifest, SignedManifest};

const MAC: &str = "52:54:00:5a:00:01";

fn manifest(server: &support::TestServer, client: &Client) -> Result<Manifest> {
    let json = client.get_bytes(&format!("/api/v1/nodes/by-mac/{MAC}/manifest"), 1 << 20)?;
    let signed = SignedManifest::from_json(&json)?;
    let key_hex = std::fs::read_to_string(server.data_dir.join("keys/server.key"))?;
    let mut secret = [0u8; 32];
    hex::decode_to_slice(key_hex.trim(), &mut secret)?;
    let vk = ed25519_dalek::SigningKey::from_bytes(&secret).verifying_key();
    Ok(signed.verify(&vk)?)
}

/// The node's `layer_bytes` as the operator API reports it.
fn layer_bytes(server: &support::TestServer, client: &Client) -> Result<u64> {
    let admin = std::fs::read_to_string(server.data_dir.join("admin.token"))?;
    let c = client.clone().with_token(Some(admin.trim()));
    let v: serde_json::Value =
        serde_json::from_slice(&c.get_bytes(&format!("/api/v1/nodes/{MAC}"), 1 << 20)?)?;
    v["layer_bytes"]
        .as_u64()
        .with_context(|| format!("no layer_bytes in {v}"))
}

#[test]
fn a_node_moves_the_allocated_bytes_and_gets_identical_layers() -> Result<()> {
    let server = support::TestServer::start("")?;
    let client = Client::new(server.http);
    let m = manifest(&server, &client)?;
    ensure!(m.layers.len() == 3, "base, role, node: {:?}", m.layers);
    let dir = tempfile::tempdir()?;
    let cache = Cache::open(dir.path())?;
    let store = server.data_dir.join("store/layers");
    let mut moved = 0;
    for l in &m.layers {
        let stored = store.join(format!("{}.vhdx", l.id));
        let on_disk = std::fs::metadata(&stored)?.blocks() * 512;
        let doc = client.get_bytes(&format!("/layers/{}/extents", l.id), 1 << 20)?;
        let ext = Extents::parse_for(&doc, &l.id, l.size)?;
        let st = fetch_layer(&client, &cache, l, |_| {})?;
        // The extents, and the few zeros between extents closer than COALESCE_GAP (fetched
        // in one request): about what the store allocated.
        let all: Vec<u64> = (0..chunk_count(l.size, l.chunk_size)).collect();
        let planned: u64 = plan_requests(l, &ext, &all)
            .iter()
            .map(|r| r.end - r.start)
            .sum();
        ensure!(
            st.received == planned && planned >= ext.data_bytes(),
            "{:?} layer: moved {} bytes, planned {planned}, its extents hold {}",
            l.kind,
            st.received,
            ext.data_bytes()
        );
        ensure!(
            st.received <= on_disk + (64 << 10) && st.received + (64 << 10) >= on_disk,
            "{:?} layer: moved {} bytes, {on_disk} allocated on the server",
            l.kind,
            st.received
        );
        eprintln!(
            "{:?} layer: {} file, {on_disk} on disk, {} in {} extents, {} moved",
            l.kind,
            l.size,
            ext.data_bytes(),
            ext.ranges().len(),
            st.received
        );
        ensure!(
            st.received < l.size / 2,
            "{:?} layer: moved {} of a {}-byte file",
            l.kind,
            st.received,
            l.size
        );
        let cached = cache.layer_path(&l.id);
        ensure!(
            std::fs::read(&cached)? == std::fs::read(&stored)?,
            "{:?} layer: the cached copy differs from the store's",
            l.kind
        );
        ensure!(
            wire::Digest::from(blake3::hash(&std::fs::read(&cached)?)) == l.id,
            "blake3"
        );
        ensure!(
            std::fs::metadata(&cached)?.blocks() * 512 < l.size / 2,
            "the node's cached copy keeps the holes"
        );
        moved += st.received;
    }
    // The server counted what it sent to this node, not the files' sizes.
    ensure!(
        layer_bytes(&server, &client)? == moved,
        "layer_bytes {} after moving {moved}",
        layer_bytes(&server, &client)?
    );

    // `strata image inspect` names the same figures for the role's chain.
    let role = m
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::Role)
        .context("role layer")?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["image", "inspect", "--json", "--store"])
        .arg(server.data_dir.join("store"))
        .arg(&m.image)
        .args(["--role", &m.role])
        .output()?;
    ensure!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    let t = v["transfer"]
        .as_array()
        .and_then(|a| a.iter().find(|t| t["id"] == role.id.to_hex()))
        .with_context(|| format!("no transfer entry for the role layer in {v}"))?;
    let doc = client.get_bytes(&format!("/layers/{}/extents", role.id), 1 << 20)?;
    let ext = Extents::parse_for(&doc, &role.id, role.size)?;
    ensure!(
        t["transfer"] == ext.data_bytes() && t["size"] == role.size,
        "{t}"
    );
    ensure!(
        t["allocated"]
            .as_u64()
            .is_some_and(|a| a >= ext.data_bytes()),
        "{t}"
    );
    Ok(())
}

#[test]
fn a_download_stopped_inside_an_extent_resumes_there() -> Result<()> {
    let server = support::TestServer::start("")?;
    let client = Client::new(server.http);
    let m = manifest(&server, &client)?;
    let l = m
        .layers
        .iter()
        .find(|l| l.kind == LayerKind::Base)
        .context("base layer")?;
    let stored = std::fs::read(server.data_dir.join(format!("store/layers/{}.vhdx", l.id)))?;
    let doc = client.get_bytes(&format!("/layers/{}/extents", l.id), 1 << 20)?;
    let ext = Extents::parse_for(&doc, &l.id, l.size)?;
    // The largest extent, cut a third of the way in (not on a chunk boundary).
    let big = ext
        .ranges()
        .iter()
        .max_by_key(|r| r.end - r.start)
        .context("no extents")?
        .clone();
    ensure!(
        big.end - big.start > u64::from(l.chunk_size),
        "the base's largest extent {big:?} spans less than a chunk"
    );
    let cut = big.start + (big.end - big.start) / 3 + 12_345;
    // What a node had written when it stopped: every extent before the cut, holes elsewhere.
    let dir = tempfile::tempdir()?;
    let cache = Cache::open(dir.path())?;
    let partial = std::fs::File::create(cache.partial_path(&l.id))?;
    partial.set_len(l.size)?;
    for r in ext.within(0..cut) {
        use std::os::unix::fs::FileExt;
        partial.write_all_at(&stored[r.start as usize..r.end as usize], r.start)?;
    }
    drop(partial);

    let st = fetch_layer(&client, &cache, l, |_| {})?;
    // From the start of the chunk the cut fell in: the chunks after it that hold data.
    let first = cut / u64::from(l.chunk_size);
    let left: Vec<u64> = (first..chunk_count(l.size, l.chunk_size)).collect();
    let expect: u64 = plan_requests(l, &ext, &left)
        .iter()
        .map(|r| r.end - r.start)
        .sum();
    ensure!(
        st.received == expect,
        "resumed download moved {} bytes, expected {expect} (from chunk {first})",
        st.received
    );
    let after_cut: u64 = ext.within(cut..l.size).map(|r| r.end - r.start).sum();
    ensure!(
        st.received < ext.data_bytes() && st.received >= after_cut,
        "moved {} of {} data bytes; {after_cut} lay after the cut",
        st.received,
        ext.data_bytes(),
    );
    ensure!(
        st.resumed_from >= chunk_range(first, l.size, l.chunk_size).start,
        "kept {} bytes",
        st.resumed_from
    );
    ensure!(
        std::fs::read(cache.layer_path(&l.id))? == stored,
        "the resumed copy differs from the store's"
    );
    ensure!(
        layer_bytes(&server, &client)? == st.received,
        "the server counted {} bytes for a {}-byte resume",
        layer_bytes(&server, &client)?,
        st.received
    );
    Ok(())
}

#[test]
fn the_extents_route_names_bad_ids_and_unknown_layers() -> Result<()> {
    let server = support::TestServer::start("")?;
    let client = Client::new(server.http);
    let status = |path: &str| match client.get_bytes(path, 1 << 20) {
        Ok(_) => 200,
        Err(node_init::http::HttpError::Status { status, .. }) => status,
        Err(e) => panic!("{path}: {e}"),
    };
    assert_eq!(status("/layers/zz/extents"), 400);
    assert_eq!(status(&format!("/layers/{}/extents", "AB".repeat(32))), 400);
    assert_eq!(status(&format!("/layers/{}/extents", "ab".repeat(32))), 404);
    // A known layer's list, twice (the second from the server's cache): the same document.
    let m = manifest(&server, &client)?;
    let path = format!("/layers/{}/extents", m.layers[0].id);
    let first = client.get_bytes(&path, 1 << 20)?;
    assert_eq!(client.get_bytes(&path, 1 << 20)?, first);
    Extents::parse_for(&first, &m.layers[0].id, m.layers[0].size)?;
    Ok(())
}
