//! The operator and node API: auth scopes, node layer tokens, bad input, delta reports
//! (duplicates, reordering, illegal transitions), drift, and the OpenAPI document against the
//! router. One test runs the real `strata serve` with its image store and reads the token out
//! of a real node layer with debugfs.

mod orch_sim;
mod support;

use std::sync::{Arc, RwLock};

use anyhow::{Context, Result};
use orch_sim::{mac, setup_fleet, Api, Server, Sim};
use serde_json::{json, Value};
use wire::report::{NodeState, NodeStatus, StateDelta, StateReport};

async fn counts(api: &Api) -> Result<(Value, Value, Value, usize)> {
    let mut nodes = api.ok("GET", "/api/v1/nodes", None).await?;
    // Last seen is a fact of any request, not a change.
    for n in nodes.as_array_mut().into_iter().flatten() {
        n["last_seen_ms"] = Value::Null;
    }
    let roles = api.ok("GET", "/api/v1/roles", None).await?;
    let rollouts = api.ok("GET", "/api/v1/rollouts", None).await?;
    let events = api
        .ok("GET", "/api/v1/events?limit=10000", None)
        .await?
        .as_array()
        .map_or(0, Vec::len);
    Ok((nodes, roles, rollouts, events))
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tokens_scope_what_callers_may_do() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let admin = server.api();
    let url = Arc::new(RwLock::new(server.url.clone()));
    let mut sims = setup_fleet(&admin, Arc::clone(&url), &[("web", 0, 2)]).await?;
    let (a, b) = (sims[0].mac.clone(), sims[1].mac.clone());

    // Tokens are created by admins and listed without their secrets.
    let viewer = admin
        .ok(
            "POST",
            "/api/v1/tokens",
            Some(json!({ "scope": "viewer", "name": "ops" })),
        )
        .await?;
    let viewer_secret = viewer["token"].as_str().context("secret")?.to_owned();
    let node_a = admin
        .ok(
            "POST",
            &format!("/api/v1/nodes/{a}/tokens"),
            Some(json!({})),
        )
        .await?;
    let node_secret = node_a["token"].as_str().context("secret")?.to_owned();
    let listed = admin.ok("GET", "/api/v1/tokens", None).await?.to_string();
    assert!(!listed.contains(&viewer_secret[4..]) && !listed.contains(&node_secret[4..]));

    // Anonymous callers reach no operator route.
    let anon = admin.with_token(None);
    let (s, v) = anon.call("GET", "/api/v1/nodes", None).await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthenticated"))
    );
    let (s, _) = admin
        .with_token(Some("stk_0000"))
        .call("GET", "/api/v1/nodes", None)
        .await?;
    assert_eq!(s, 401);

    // A viewer reads but cannot write.
    let v_api = admin.with_token(Some(&viewer_secret));
    v_api.ok("GET", "/api/v1/nodes", None).await?;
    v_api.ok("GET", "/api/v1/roles/web", None).await?;
    let before = counts(&admin).await?;
    for (m, p, body) in [
        (
            "PUT",
            "/api/v1/roles/web",
            json!({ "version": { "image": "img", "version": 2 } }),
        ),
        (
            "PATCH",
            &format!("/api/v1/nodes/{a}") as &str,
            json!({ "role": "db" }),
        ),
        (
            "POST",
            "/api/v1/rollouts",
            json!({ "roles": [{ "role": "web", "to": { "image": "img", "version": 2 } }] }),
        ),
        (
            "POST",
            "/api/v1/tokens",
            json!({ "scope": "admin", "name": "x" }),
        ),
        ("DELETE", &format!("/api/v1/nodes/{b}"), json!({})),
    ] {
        let (s, v) = v_api.call(m, p, Some(body)).await?;
        assert_eq!(
            (s, v["error"]["code"].as_str()),
            (403, Some("forbidden")),
            "{m} {p}"
        );
    }
    assert_eq!(counts(&admin).await?, before, "a viewer changed nothing");

    // A node token: its own manifest and reports, nothing else.
    let mut sim_a = sims.remove(0);
    sim_a.token = Some(node_secret.clone());
    sim_a.manifest(None).await?;
    sim_a.report().await?;
    let n_api = admin.with_token(Some(&node_secret));
    let (s, _) = n_api
        .call("GET", &format!("/api/v1/nodes/by-mac/{b}/manifest"), None)
        .await?;
    assert_eq!(s, 403, "a node cannot read another node's assignment");
    let forged = StateReport {
        mac: b.clone(),
        seq: 99,
        base_seq: 0,
        delta: StateDelta {
            state: Some(NodeState::Failed),
            ..Default::default()
        },
    };
    let (s, _) = n_api
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{b}/report"),
            Some(serde_json::to_vec(&forged)?),
        )
        .await?;
    assert_eq!(s, 403, "a node cannot report for another");
    for (m, p) in [
        ("GET", "/api/v1/nodes".to_owned()),
        ("GET", format!("/api/v1/nodes/{a}")),
        ("PUT", "/api/v1/roles/web".to_owned()),
        ("GET", "/api/v1/events".to_owned()),
    ] {
        let (s, _) = n_api.call(m, &p, Some(json!({}))).await?;
        assert_eq!(s, 403, "{m} {p}");
    }
    let node_b = admin.ok("GET", &format!("/api/v1/nodes/{b}"), None).await?;
    assert_eq!(node_b["state"], "healthy", "B's state untouched");

    // A has used a token: its anonymous reports are refused. Its manifest stays readable without
    // one (a booting node with an empty cache has none; documented in docs/api.md), and a node
    // never seen before reports without a token.
    let heartbeat = |m: &str| StateReport {
        mac: m.to_owned(),
        seq: 1,
        base_seq: 0,
        delta: StateDelta::default(),
    };
    let (s, v) = anon
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{a}/report"),
            Some(serde_json::to_vec(&heartbeat(&a))?),
        )
        .await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (401, Some("unauthenticated")),
        "{v}"
    );
    anon.ok("GET", &format!("/api/v1/nodes/by-mac/{a}/manifest"), None)
        .await?;
    let c = mac(200);
    anon.ok("GET", &format!("/api/v1/nodes/by-mac/{c}/manifest"), None)
        .await?;
    let (s, v) = anon
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{c}/report"),
            Some(serde_json::to_vec(&heartbeat(&c))?),
        )
        .await?;
    assert_eq!(s, 200, "{v}");
    // Revoking A's token takes effect at once, and does not reopen anonymous reports.
    let id = node_a["info"]["id"].as_u64().context("id")?;
    admin
        .ok("DELETE", &format!("/api/v1/tokens/{id}"), None)
        .await?;
    let (s, _) = n_api
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{a}/report"),
            Some(serde_json::to_vec(&heartbeat(&a))?),
        )
        .await?;
    assert_eq!(s, 401);
    // The manifest stays readable: a revoked token counts as none there.
    n_api
        .ok("GET", &format!("/api/v1/nodes/by-mac/{a}/manifest"), None)
        .await?;
    let (s, _) = anon
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{a}/report"),
            Some(serde_json::to_vec(&heartbeat(&a))?),
        )
        .await?;
    assert_eq!(s, 401);
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_node_layer_token_is_the_nodes_api_token() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let admin = server.api();
    let anon = admin.with_token(None);
    let url = Arc::new(RwLock::new(server.url.clone()));
    admin
        .ok(
            "PUT",
            "/api/v1/roles/web",
            Some(json!({ "version": { "image": "img", "version": 1 } })),
        )
        .await?;
    let mut other = Sim::new(&mac(9), Arc::clone(&url));
    other.boot().await?;

    // A new node: its first reports go without a token (it has none yet); booting its node
    // layer gives it the token, an API node token, which its later reports carry.
    let mut sim = Sim::new(&mac(8), Arc::clone(&url));
    sim.boot().await?;
    let token = sim
        .token
        .clone()
        .context("the node layer carries a token")?;
    assert!(token.starts_with("stk_") && token.len() == 68, "{token}");
    let tokens = admin.ok("GET", "/api/v1/tokens", None).await?;
    assert!(
        !tokens.to_string().contains(&token[4..]),
        "listed without the secret"
    );
    let mine: Vec<&Value> = tokens
        .as_array()
        .context("list")?
        .iter()
        .filter(|t| t["node"] == sim.mac.as_str())
        .collect();
    assert_eq!(mine.len(), 1, "{tokens}");
    assert_eq!(
        (mine[0]["scope"].as_str(), mine[0]["layer_gen"].as_u64()),
        (Some("node"), Some(1))
    );
    assert!(
        mine[0]["used_ms"].as_u64().is_some(),
        "used by the booted node's reports: {tokens}"
    );
    let first_id = mine[0]["id"].as_u64().context("id")?;

    // Scoped to its node: not another node's reports or manifest, no operator route.
    let n_api = admin.with_token(Some(&token));
    let forged = StateReport {
        mac: other.mac.clone(),
        seq: 50,
        base_seq: 0,
        delta: StateDelta {
            state: Some(NodeState::Failed),
            ..Default::default()
        },
    };
    let (s, _) = n_api
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{}/report", other.mac),
            Some(serde_json::to_vec(&forged)?),
        )
        .await?;
    assert_eq!(s, 403);
    let (s, _) = n_api
        .call(
            "GET",
            &format!("/api/v1/nodes/by-mac/{}/manifest", other.mac),
            None,
        )
        .await?;
    assert_eq!(s, 403);
    let (s, _) = n_api.call("GET", "/api/v1/nodes", None).await?;
    assert_eq!(s, 403);
    // Having used it, the node must: anonymous reports for it are refused.
    let anon_report = StateReport {
        mac: sim.mac.clone(),
        seq: 90,
        base_seq: 0,
        delta: StateDelta {
            state: Some(NodeState::Failed),
            ..Default::default()
        },
    };
    let (s, _) = anon
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{}/report", sim.mac),
            Some(serde_json::to_vec(&anon_report)?),
        )
        .await?;
    assert_eq!(s, 401);
    assert_eq!(
        admin
            .ok("GET", &format!("/api/v1/nodes/{}", sim.mac), None)
            .await?["state"],
        "healthy"
    );

    // Stable: a rebuilt node layer (the role moves to version 2) carries the same token.
    let m1 = sim.manifest(None).await?;
    admin
        .ok(
            "PUT",
            "/api/v1/roles/web",
            Some(json!({ "version": { "image": "img", "version": 2 } })),
        )
        .await?;
    let m2 = sim.manifest(None).await?;
    let node_layer = |m: &wire::manifest::Manifest| m.layers.last().map(|l| l.id);
    assert_eq!(m2.version, 2);
    assert_ne!(node_layer(&m1), node_layer(&m2), "a new node layer");
    assert_eq!(sim.layer_token(&m2).await?, token, "the same token in it");

    // Rotated deliberately: the next node layer carries a new token; the old one keeps working
    // until the node uses the new one (after its next boot), then it is revoked.
    let rotated = admin
        .ok(
            "POST",
            &format!("/api/v1/nodes/{}/tokens/rotate", sim.mac),
            None,
        )
        .await?;
    assert_eq!(rotated["layer_gen"], 2);
    let m3 = sim.manifest(None).await?;
    let new_token = sim.layer_token(&m3).await?;
    assert_ne!(new_token, token);
    assert_ne!(node_layer(&m3), node_layer(&m2));
    sim.report().await?;
    sim.boot().await?;
    assert_eq!(sim.token.as_deref(), Some(new_token.as_str()));
    let (s, _) = admin
        .with_token(Some(&token))
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{}/report", sim.mac),
            Some(serde_json::to_vec(&anon_report)?),
        )
        .await?;
    assert_eq!(
        s, 401,
        "the old generation was revoked at the new one's first use"
    );
    let used = admin.events("token.first_use").await?;
    assert!(
        used.iter()
            .any(|e| e["detail"]["superseded"] == json!([first_id])),
        "{used:?}"
    );

    // Revoked: refused at once; the next node layer carries the next generation.
    let id = rotated["id"].as_u64().context("id")?;
    admin
        .ok("DELETE", &format!("/api/v1/tokens/{id}"), None)
        .await?;
    let (s, _) = sim.post_report(&anon_report).await?;
    assert_eq!(s, 401);
    let m4 = sim.manifest(None).await?;
    let third = sim.layer_token(&m4).await?;
    assert!(third != new_token && third != token);
    sim.boot().await?;
    sim.report().await?;
    assert_eq!(
        admin
            .ok("GET", &format!("/api/v1/nodes/{}", sim.mac), None)
            .await?["state"],
        "healthy"
    );
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn bad_input_gets_clear_errors_and_changes_nothing() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let api = server.api();
    let url = Arc::new(RwLock::new(server.url.clone()));
    let sims = setup_fleet(&api, url, &[("web", 0, 2)]).await?;
    let a = sims[0].mac.clone();
    let before = counts(&api).await?;
    let huge = format!("{{\"description\": \"{}\"}}", "x".repeat(300 << 10));
    // (method, path, body, status, error code, words the message must hold)
    type Case<'a> = (&'a str, String, Vec<u8>, u16, &'a str, &'a str);
    let cases: Vec<Case> = vec![
        ("PUT", "/api/v1/roles/web".into(), b"{\"version\": ".to_vec(), 400, "invalid_request", "EOF"),
        ("PUT", "/api/v1/roles/web".into(), b"{\"order\": 1, \"colour\": 2}".to_vec(), 400, "invalid_request", "unknown field `colour`"),
        ("PUT", "/api/v1/roles/web".into(), b"[1, 2]".to_vec(), 400, "invalid_request", "request body"),
        ("PUT", "/api/v1/roles/web".into(), b"{\"version\": {\"image\": \"img\", \"version\": -1}}".to_vec(), 400, "invalid_request", "expected u64"),
        ("PUT", "/api/v1/roles/Bad%20Name".into(), b"{}".to_vec(), 400, "invalid_request", "role name"),
        ("PUT", "/api/v1/sites/s1".into(), huge.into_bytes(), 413, "too_large", "exceeds"),
        ("PATCH", "/api/v1/nodes/not-a-mac".into(), b"{\"role\": \"x\"}".to_vec(), 400, "invalid_request", "MAC"),
        ("PATCH", format!("/api/v1/nodes/{a}"), b"{\"role\": \"x\", \"pin\": 7}".to_vec(), 400, "invalid_request", "VersionRef"),
        ("PATCH", "/api/v1/nodes/52:54:00:99:99:99".into(), b"{\"role\": \"x\"}".to_vec(), 404, "not_found", "node"),
        ("GET", "/api/v1/rollouts/abc".into(), vec![], 400, "invalid_request", "not an id"),
        ("GET", "/api/v1/rollouts/99999999999999999999".into(), vec![], 400, "invalid_request", "not an id"),
        ("GET", "/api/v1/rollouts/42".into(), vec![], 404, "not_found", "rollout"),
        ("POST", "/api/v1/rollouts".into(), b"{\"roles\": [{\"role\": \"nope\", \"to\": {\"image\": \"img\", \"version\": 2}}]}".to_vec(), 400, "invalid_request", "no role"),
        ("POST", "/api/v1/rollouts".into(), b"{\"roles\": [], \"batch_size\": 0}".to_vec(), 400, "invalid_request", "at least one role"),
        ("POST", "/api/v1/rollouts".into(), b"{\"roles\": [{\"role\": \"web\", \"to\": {\"image\": \"img\", \"version\": 2}}], \"batch_size\": 0}".to_vec(), 400, "invalid_request", "batch_size"),
        ("GET", "/api/v1/events?limit=banana".into(), vec![], 400, "invalid_request", "limit"),
        ("GET", "/api/v1/nowhere".into(), vec![], 404, "not_found", "route"),
        ("POST", format!("/api/v1/nodes/by-mac/{a}/report"), b"{\"mac\": 1}".to_vec(), 400, "invalid_request", "request body"),
        ("POST", format!("/api/v1/nodes/by-mac/{a}/report"), vec![b' '; 70 << 10], 413, "too_large", "exceeds"),
        ("GET", format!("/api/v1/nodes/by-mac/{a}/manifest?version=9"), vec![], 404, "not_found", "not assigned"),
    ];
    for (m, p, body, status, code, needle) in cases {
        let (s, v) = api
            .raw(m, &p, if body.is_empty() { None } else { Some(body) })
            .await?;
        assert_eq!(s, status, "{m} {p}: {v}");
        assert_eq!(v["error"]["code"], code, "{m} {p}: {v}");
        let msg = v["error"]["message"].as_str().unwrap_or("");
        assert!(
            msg.contains(needle),
            "{m} {p}: message {msg:?} should mention {needle:?}"
        );
        assert_eq!(v["error"]["retryable"], false);
    }
    assert_eq!(counts(&api).await?, before, "nothing changed");
    server.stop().await;
    Ok(())
}

async fn post(api: &Api, m: &str, r: &StateReport) -> Result<(u16, Value)> {
    api.with_token(None)
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{m}/report"),
            Some(serde_json::to_vec(r)?),
        )
        .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reports_are_idempotent_ordered_and_checked_against_the_state_machine() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let api = server.api();
    let m = mac(77);
    let s0 = NodeStatus::default();
    let s1 = NodeStatus {
        state: NodeState::Fetching,
        version: Some(1),
        ..Default::default()
    };
    let s2 = NodeStatus {
        state: NodeState::Booted,
        ..s1.clone()
    };
    let s3 = NodeStatus {
        state: NodeState::Healthy,
        message: Some("up".into()),
        ..s2.clone()
    };
    let s4 = NodeStatus {
        boot_count: 1,
        ..s3.clone()
    };
    let r = |seq: u64, a: &NodeStatus, b: &NodeStatus| StateReport {
        mac: m.clone(),
        seq,
        base_seq: seq - 1,
        delta: a.diff(b),
    };
    let (r1, r2, r3, r4) = (
        r(1, &s0, &s1),
        r(2, &s1, &s2),
        r(3, &s2, &s3),
        r(4, &s3, &s4),
    );
    for rep in [&r1, &r2, &r3] {
        let (s, v) = post(&api, &m, rep).await?;
        assert_eq!((s, v["applied_seq"].as_u64()), (200, Some(rep.seq)));
    }
    let transitions =
        |api: Api| async move { api.events("node.transition").await.map(|e| e.len()) };
    let t_before = transitions(api.clone()).await?;
    // Duplicates and reordered copies: acknowledged, applied zero times.
    for rep in [&r3, &r2, &r3, &r2] {
        let (s, v) = post(&api, &m, rep).await?;
        assert_eq!(
            (s, v["applied_seq"].as_u64(), v["resend_full"].as_bool()),
            (200, Some(3), Some(false)),
            "{v}"
        );
    }
    // A delta from the future (seq 4 lost, seq 5 on base 4): the server asks for a full report.
    let r5 = StateReport {
        seq: 5,
        base_seq: 4,
        ..r4.clone()
    };
    let (_, v) = post(&api, &m, &r5).await?;
    assert_eq!(v["resend_full"], true);
    // The same seq with other content: also a full report, nothing applied.
    let r3x = StateReport {
        delta: s2.diff(&NodeStatus {
            message: Some("other".into()),
            ..s3.clone()
        }),
        ..r3.clone()
    };
    let (_, v) = post(&api, &m, &r3x).await?;
    assert_eq!(v["resend_full"], true);
    let node = api.ok("GET", &format!("/api/v1/nodes/{m}"), None).await?;
    assert_eq!(node["status"], serde_json::to_value(&s3)?);
    assert_eq!(
        transitions(api.clone()).await?,
        t_before,
        "no transition recorded twice"
    );

    // An illegal transition: healthy → fetching without a reboot. Rejected, recorded, no change.
    let bad = StateReport {
        mac: m.clone(),
        seq: 4,
        base_seq: 3,
        delta: StateDelta {
            state: Some(NodeState::Fetching),
            ..Default::default()
        },
    };
    let (s, v) = post(&api, &m, &bad).await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("illegal_transition")),
        "{v}"
    );
    let illegal = api.events("node.illegal_transition").await?;
    assert_eq!(illegal.len(), 1);
    assert_eq!(illegal[0]["detail"]["from"], "healthy");
    assert_eq!(illegal[0]["detail"]["to"], "fetching");
    let node = api.ok("GET", &format!("/api/v1/nodes/{m}"), None).await?;
    assert_eq!(node["state"], "healthy");
    // The legal next delta still applies.
    let (_, v) = post(&api, &m, &r4).await?;
    assert_eq!(v["applied_seq"], 4);
    // Unknown fields in a report are ignored, not refused (docs/api.md: a newer node-init may
    // send fields this server does not know); the known ones apply.
    let newer = br#"{"mac": "MAC", "seq": 5, "base_seq": 4, "future": 1, "delta": {"message": "from a newer node", "gpu": "ok"}}"#;
    let newer = String::from_utf8_lossy(newer)
        .replace("MAC", &m)
        .into_bytes();
    let (s, v) = api
        .with_token(None)
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{m}/report"),
            Some(newer),
        )
        .await?;
    assert_eq!((s, v["applied_seq"].as_u64()), (200, Some(5)), "{v}");
    let node = api.ok("GET", &format!("/api/v1/nodes/{m}"), None).await?;
    assert_eq!(node["status"]["message"], "from a newer node");
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn drift_is_recorded_and_a_repair_scheduled() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let api = server.api();
    let url = Arc::new(RwLock::new(server.url.clone()));
    let mut sim = Sim::new(&mac(5), url);
    sim.boot().await?;
    let layer = sim.manifest(None).await?.layers[0].id;
    sim.status.drift = vec![layer];
    let ack = sim.report().await?;
    assert_eq!(
        ack.repair,
        vec![layer],
        "the server asks for the layer again"
    );
    let node = api
        .ok("GET", &format!("/api/v1/nodes/{}", sim.mac), None)
        .await?;
    assert_eq!(node["drifted"], true);
    let ev = api.events("node.drifted").await?;
    assert_eq!(ev.len(), 1);
    assert_eq!(ev[0]["detail"]["repair"], "scheduled");
    sim.status.drift.clear();
    let ack = sim.report().await?;
    assert!(ack.repair.is_empty());
    assert_eq!(api.events("node.repaired").await?.len(), 1);
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_route_exists_and_the_document_is_served() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let api = server.api();
    let doc = api.ok("GET", "/api/v1/openapi.json", None).await?;
    assert_eq!(doc, strata_server::api::openapi::document());
    for r in strata_server::api::openapi::ROUTES {
        let path = r
            .path
            .replace("{mac}", &mac(1))
            .replace("{name}", "zzz")
            .replace("{id}", "7");
        let (s, v) = api
            .call(&r.method.to_uppercase(), &path, Some(json!({})))
            .await?;
        assert!(
            s != 405
                && !(s == 404
                    && v["error"]["message"]
                        .as_str()
                        .is_some_and(|m| m.contains("route"))),
            "{} {}: {s} {v}",
            r.method,
            r.path
        );
    }
    server.stop().await;
    Ok(())
}

/// The real `strata serve` and its image store: the node layer it builds for a node holds, in
/// `/etc/strata/token`, a token the API accepts as that node's (debugfs reads the layer chain
/// exactly as downloaded from `/layers/{id}`).
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_real_node_layer_holds_the_nodes_api_token() -> Result<()> {
    let found = std::process::Command::new("sh")
        .arg("-c")
        .arg("command -v debugfs")
        .output()?
        .status
        .success();
    anyhow::ensure!(found, "debugfs is missing: apt-get install e2fsprogs");
    let server = support::TestServer::start("")?;
    let url = server.url("");
    let admin_secret = std::fs::read_to_string(server.data_dir.join("admin.token"))?
        .trim()
        .to_owned();
    let admin = Api::new(&url, Some(&admin_secret));
    let anon = admin.with_token(None);
    let m = "52:54:00:aa:00:01";
    let signed: wire::manifest::SignedManifest = serde_json::from_value(
        anon.ok("GET", &format!("/api/v1/nodes/by-mac/{m}/manifest"), None)
            .await?,
    )?;
    let key_hex = std::fs::read_to_string(server.data_dir.join("keys/server.key"))?;
    let mut secret = [0u8; 32];
    hex::decode_to_slice(key_hex.trim(), &mut secret)?;
    let vk = ed25519_dalek::SigningKey::from_bytes(&secret).verifying_key();
    let manifest = signed.verify(&vk)?;
    let dir = tempfile::tempdir()?;
    let http = reqwest::Client::new();
    for l in &manifest.layers {
        let bytes = http
            .get(format!("{url}{}", l.url))
            .send()
            .await?
            .error_for_status()?
            .bytes()
            .await?;
        std::fs::write(dir.path().join(format!("{}.vhdx", l.id)), &bytes)?;
    }
    let top = dir.path().join(format!(
        "{}.vhdx",
        manifest.layers.last().context("chain")?.id
    ));
    let raw = dir.path().join("root.raw");
    let o = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["vhdx", "to-raw"])
        .arg(&top)
        .arg(&raw)
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "strata vhdx to-raw: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let o = std::process::Command::new("debugfs")
        .arg("-R")
        .arg("cat /etc/strata/token")
        .arg(&raw)
        .output()?;
    let token = String::from_utf8_lossy(&o.stdout).trim().to_owned();
    assert!(
        token.starts_with("stk_") && token.len() == 68,
        "token file: {token:?}"
    );

    // The API knows it: a node token of this node, stored hashed, accepted for its reports.
    let node = admin.with_token(Some(&token));
    let report = StateReport {
        mac: m.to_owned(),
        seq: 1,
        base_seq: 0,
        delta: StateDelta {
            state: Some(NodeState::Booting),
            ..Default::default()
        },
    };
    let (s, v) = node
        .raw(
            "POST",
            &format!("/api/v1/nodes/by-mac/{m}/report"),
            Some(serde_json::to_vec(&report)?),
        )
        .await?;
    assert_eq!(s, 200, "{v}");
    let tokens = admin.ok("GET", "/api/v1/tokens", None).await?;
    assert!(!tokens.to_string().contains(&token[4..]));
    assert!(
        tokens
            .as_array()
            .context("list")?
            .iter()
            .any(|t| t["node"] == m && t["layer_gen"] == 1 && t["used_ms"].is_u64()),
        "{tokens}"
    );
    let db = rusqlite::Connection::open(server.data_dir.join("orchestrator.db"))?;
    let stored: Vec<u8> = db.query_row(
        "SELECT hash FROM tokens WHERE node = ?1 AND layer_gen = 1",
        [m],
        |r| r.get(0),
    )?;
    assert_eq!(stored, blake3::hash(token.as_bytes()).as_bytes().to_vec());
    // Not another node's.
    let (s, _) = node
        .call(
            "GET",
            "/api/v1/nodes/by-mac/52:54:00:aa:00:02/manifest",
            None,
        )
        .await?;
    assert_eq!(s, 403);
    // Rebuilt for the same node: the same layer, the same token.
    let again: wire::manifest::SignedManifest = serde_json::from_value(
        node.ok("GET", &format!("/api/v1/nodes/by-mac/{m}/manifest"), None)
            .await?,
    )?;
    assert_eq!(
        again.verify(&vk)?.layers.last().map(|l| l.id),
        manifest.layers.last().map(|l| l.id)
    );
    Ok(())
}
