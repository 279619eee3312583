//! Agent mode against the fixture server, on a cache laid out as node-init leaves it in
//! /run/strata: confirm, stage a version named by the server (`?version=`), verify (drift).

mod support;

use ed25519_dalek::SigningKey;
use node_init::boot::BootInfo;
use node_init::bootcount::{self, Entry, Offer, State};
use node_init::cache::Cache;
use node_init::http::Client;
use node_init::report::Reporter;
use support::server::Server;
use support::MAC;
use wire::chunk::chunk_hashes;
use wire::manifest::{LayerKind, LayerRef, SignedManifest};
use wire::report::{NodeState, NodeStatus};

fn layer(kind: LayerKind, seed: u8) -> (LayerRef, Vec<u8>) {
    let bytes: Vec<u8> = (0..20_000u32)
        .map(|i| (i as u8).wrapping_mul(seed))
        .collect();
    let (id, size, chunks) = chunk_hashes(&bytes[..], 4096).unwrap();
    (
        LayerRef {
            id,
            size,
            kind,
            chunk_size: 4096,
            chunks,
            url: format!("/layers/{id}?node={MAC}"),
        },
        bytes,
    )
}

#[test]
fn agent_confirms_stages_and_verifies() {
    let key = SigningKey::from_bytes(&[3u8; 32]);
    let srv = Server::start().unwrap();
    let (base, base_bytes) = layer(LayerKind::Base, 3);
    let (r1, r1_bytes) = layer(LayerKind::Role, 5);
    let (r2, r2_bytes) = layer(LayerKind::Role, 7);
    for (l, b) in [
        (&base, base_bytes),
        (&r1, r1_bytes.clone()),
        (&r2, r2_bytes),
    ] {
        srv.add_layer(l.id, b);
    }
    let m1 = support::manifest("web", 1, 3, vec![base.clone(), r1.clone()]);
    let m2 = support::manifest("web", 2, 3, vec![base.clone(), r2.clone()]);
    let s1 = SignedManifest::sign(&m1, &key).unwrap();
    let s2 = SignedManifest::sign(&m2, &key).unwrap();

    // What node-init leaves behind after booting v1.
    let run = tempfile::tempdir().unwrap();
    let cache = Cache::open(&run.path().join("cache")).unwrap();
    let e1 = Entry::of(&m1);
    cache.store_manifest(&e1, &s1).unwrap();
    std::fs::write(
        cache.layer_path(&base.id),
        srv.state.lock().unwrap().layers[&base.id].as_slice(),
    )
    .unwrap();
    std::fs::write(cache.layer_path(&r1.id), &r1_bytes).unwrap();
    let (_, st) = bootcount::decide(
        &State::default(),
        &Offer::Assigned {
            entry: e1.clone(),
            tries: 3,
        },
        |_| true,
    );
    cache.save_state(&st).unwrap();
    let server = format!("127.0.0.1:{}", srv.port).parse().unwrap();
    let info = BootInfo {
        server: Some(server),
        mac: MAC.into(),
        entry: e1.clone(),
        agent_interval: None,
    };
    std::fs::write(
        run.path().join("boot.json"),
        serde_json::to_vec(&info).unwrap(),
    )
    .unwrap();
    std::fs::write(
        run.path().join("server.pub"),
        hex::encode(key.verifying_key().as_bytes()),
    )
    .unwrap();
    let args = |a: &[&str]| a.iter().map(|s| s.to_string()).collect::<Vec<_>>();

    // confirm: v1 becomes last known good.
    node_init::agent::main_in(run.path(), &args(&["confirm"])).unwrap();
    let st = cache.load_state();
    assert_eq!(st.last_known_good, Some(e1.clone()));
    assert!(st.confirmed);

    // The server asks (report answer) to stage v2 while its effective manifest is still v1.
    srv.set_manifest(MAC, s1.to_json());
    srv.state.lock().unwrap().ack = Some(r#"{"applied_seq":1,"stage":2}"#.into());
    let mut rep = Reporter::new(MAC);
    let client = Client::new(server);
    let ack = rep
        .send(
            &client,
            &NodeStatus {
                state: NodeState::Healthy,
                ..Default::default()
            },
        )
        .unwrap();
    assert_eq!(ack.stage, Some(2));
    // The fixture serves whatever manifest is set; serve v2 for the versioned request.
    srv.set_manifest(MAC, s2.to_json());
    node_init::agent::main_in(run.path(), &args(&["stage", "2"])).unwrap();
    assert!(cache.has_layer(&r2));
    assert_eq!(srv.sent(&r2.id), r2.size);
    assert_eq!(srv.sent(&base.id), 0, "the base is shared and cached");
    assert!(srv
        .state
        .lock()
        .unwrap()
        .requests
        .iter()
        .any(|r| r.ends_with("/manifest?version=2")));
    // Staging does not activate: state still names v1.
    assert_eq!(cache.load_state().current, Some(e1.clone()));
    assert_eq!(cache.cached_layers().len(), 3);

    // Asking for version 3 while the server answers version 2 is refused.
    let err = node_init::agent::main_in(run.path(), &args(&["stage", "3"])).unwrap_err();
    assert!(format!("{err:?}").contains("ManifestVersion"), "{err:?}");

    // verify: a flipped byte in the running role layer is drift.
    let p = cache.layer_path(&r1.id);
    let mut b = std::fs::read(&p).unwrap();
    b[100] ^= 1;
    std::fs::write(&p, b).unwrap();
    node_init::agent::main_in(run.path(), &args(&["verify"])).unwrap();
    assert_eq!(cache.verify_layer(&r1).unwrap(), vec![0]);
}
