//! Rollouts with simulated nodes speaking the real API over HTTP: role order, canary and
//! batches; a failing canary halting and rolling back; a server killed mid-rollout resuming at
//! the right wave; two server processes on one database, fenced. The crash and fencing tests
//! run the real `strata serve` binary (with its image store: the built-in busybox image and a
//! version 2 built by `strata image build`, real node layers per node).

mod orch_sim;
mod support;

use std::collections::HashMap;
use std::process::Command;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use orch_sim::{run_fleet, setup_fleet, setup_fleet_on, Api, Server};
use serde_json::{json, Value};
use support::TestServer;
use tokio_util::sync::CancellationToken;

fn spec(roles: &[&str], canary: usize, batch: usize, maxu: usize) -> Value {
    spec_on("img", roles, canary, batch, maxu)
}

fn spec_on(image: &str, roles: &[&str], canary: usize, batch: usize, maxu: usize) -> Value {
    json!({
        "roles": roles.iter().map(|r| json!({ "role": r, "to": { "image": image, "version": 2 } })).collect::<Vec<_>>(),
        "canary": canary, "batch_size": batch, "max_unavailable": maxu,
        "health_timeout_secs": 30, "stage_timeout_secs": 30,
    })
}

fn ops(events: &[Value]) -> Vec<(u64, String, Value)> {
    events
        .iter()
        .filter(|e| e["kind"] == "rollout.op")
        .map(|e| {
            (
                e["detail"]["wave"].as_u64().unwrap_or(u64::MAX),
                e["actor"].as_str().unwrap_or("").to_owned(),
                e["detail"]["op"].clone(),
            )
        })
        .collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn rollout_over_three_roles_in_role_order_with_canary_and_batches() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let api = server.api();
    let url = Arc::new(RwLock::new(server.url.clone()));
    // compute goes last, storage first: the order field, not the spec's order, decides.
    let sims = setup_fleet(
        &api,
        Arc::clone(&url),
        &[
            ("compute", 20, 50),
            ("storage", 0, 20),
            ("database", 10, 30),
        ],
    )
    .await?;
    let role_of: HashMap<String, String> = api
        .ok("GET", "/api/v1/nodes", None)
        .await?
        .as_array()
        .context("nodes")?
        .iter()
        .map(|n| {
            (
                n["mac"].as_str().unwrap_or("").to_owned(),
                n["role"].as_str().unwrap_or("").to_owned(),
            )
        })
        .collect();
    assert_eq!(role_of.len(), 100);
    let stop = CancellationToken::new();
    let fleet = run_fleet(sims, Duration::from_millis(20), stop.clone());

    let id = api
        .start_rollout(spec(&["compute", "database", "storage"], 1, 10, 5))
        .await?;
    let r = api.wait_final(id, Duration::from_secs(240)).await?;
    assert_eq!(r["state"], "succeeded", "{r}");
    let waves = r["plan"]["waves"].as_array().context("waves")?;
    let shape: Vec<(String, String, usize)> = waves
        .iter()
        .map(|w| {
            (
                w["role"].as_str().unwrap_or("").to_owned(),
                w["kind"].as_str().unwrap_or("").to_owned(),
                w["nodes"].as_array().map_or(0, Vec::len),
            )
        })
        .collect();
    let expect = |role: &str, n: usize| {
        let mut v = vec![(role.to_owned(), "canary".to_owned(), 1)];
        let mut left = n - 1;
        while left > 0 {
            v.push((role.to_owned(), "batch".to_owned(), left.min(10)));
            left -= left.min(10);
        }
        v
    };
    let mut want = expect("storage", 20);
    want.extend(expect("database", 30));
    want.extend(expect("compute", 50));
    assert_eq!(shape, want);

    // What actually happened, from the event log: activations in role order, canary first,
    // never more than max_unavailable nodes of a wave activated before the previous group was
    // healthy (groups of 5), and each node activated exactly once.
    let events = api.events("rollout.").await?;
    let acts: Vec<(u64, String)> = ops(&events)
        .into_iter()
        .filter(|(_, _, op)| op["op"] == "activate")
        .map(|(w, _, op)| (w, op["node"].as_str().unwrap_or("").to_owned()))
        .collect();
    assert_eq!(acts.len(), 100);
    let roles_seen: Vec<&str> = acts.iter().map(|(_, m)| role_of[m].as_str()).collect();
    let mut dedup = roles_seen.clone();
    dedup.dedup();
    assert_eq!(dedup, vec!["storage", "database", "compute"]);
    let waves_seen: Vec<u64> = acts.iter().map(|(w, _)| *w).collect();
    assert!(
        waves_seen.windows(2).all(|p| p[0] <= p[1]),
        "waves in order"
    );
    let mut per_node: HashMap<&str, usize> = HashMap::new();
    for (_, m) in &acts {
        *per_node.entry(m.as_str()).or_default() += 1;
    }
    assert!(per_node.values().all(|&n| n == 1));

    // The fleet: every node runs img@2, every role's desired version is img@2, no pins left.
    stop.cancel();
    let sims = fleet.await?;
    assert!(
        sims.iter().all(|s| s.running == 2),
        "{:?}",
        sims.iter().map(|s| (&s.mac, s.running)).collect::<Vec<_>>()
    );
    assert!(sims.iter().all(|s| s.reboots == 1));
    for role in ["storage", "database", "compute"] {
        let r = api
            .ok("GET", &format!("/api/v1/roles/{role}"), None)
            .await?;
        assert_eq!(r["version"], json!({ "image": "img", "version": 2 }));
    }
    let nodes = api.ok("GET", "/api/v1/nodes", None).await?;
    for n in nodes.as_array().context("nodes")? {
        assert_eq!(n["pin"], Value::Null);
        assert_eq!(n["state"], "healthy");
        assert_eq!(n["status"]["version"], 2);
    }
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failing_canary_halts_the_rollout_and_rolls_back() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let api = server.api();
    let url = Arc::new(RwLock::new(server.url.clone()));
    let mut sims = setup_fleet(&api, Arc::clone(&url), &[("web", 0, 8)]).await?;
    // The canary is the first node by MAC; version 2 does not come up on it.
    sims[0].fail = Some(2);
    let canary = sims[0].mac.clone();
    let stop = CancellationToken::new();
    let fleet = run_fleet(sims, Duration::from_millis(20), stop.clone());

    let id = api.start_rollout(spec(&["web"], 1, 4, 2)).await?;
    let r = api.wait_final(id, Duration::from_secs(120)).await?;
    assert_eq!(r["state"], "halted", "{r}");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("health gate") && reason.contains(&canary),
        "{reason}"
    );
    assert_eq!(r["progress"]["wave"], 0, "halted in the canary wave");

    let events = api.events("rollout.").await?;
    let done = ops(&events);
    let activated: Vec<&Value> = done
        .iter()
        .filter(|(_, _, o)| o["op"] == "activate")
        .map(|(_, _, o)| o)
        .collect();
    assert_eq!(activated.len(), 1, "only the canary was activated");
    assert_eq!(activated[0]["node"], canary.as_str());
    assert!(
        done.iter()
            .any(|(w, _, o)| *w == 0 && o["op"] == "rollback" && o["node"] == canary.as_str()),
        "the canary wave rolled back by plan"
    );
    assert!(!done.iter().any(|(_, _, o)| o["op"] == "set_role"));

    // Let the fleet settle, then: every node on img@1, the role unchanged, no pins.
    tokio::time::sleep(Duration::from_millis(300)).await;
    stop.cancel();
    let sims = fleet.await?;
    assert!(sims.iter().all(|s| s.running == 1));
    let role = api.ok("GET", "/api/v1/roles/web", None).await?;
    assert_eq!(role["version"]["version"], 1);
    let node = api
        .ok("GET", &format!("/api/v1/nodes/{canary}"), None)
        .await?;
    assert_eq!(node["pin"], Value::Null);
    assert_eq!(node["status"]["version"], 1);
    server.stop().await;
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn pause_resume_and_abort() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let api = server.api();
    let url = Arc::new(RwLock::new(server.url.clone()));
    let sims = setup_fleet(&api, Arc::clone(&url), &[("web", 0, 6)]).await?;
    let id = api.start_rollout(spec(&["web"], 1, 2, 1)).await?;
    // No node runs yet: the rollout waits in staging. Pause it there.
    let r = api
        .ok("POST", &format!("/api/v1/rollouts/{id}/pause"), None)
        .await?;
    assert_eq!(r["state"], "paused");
    let (s, v) = api
        .call("POST", &format!("/api/v1/rollouts/{id}/pause"), None)
        .await?;
    assert_eq!((s, v["error"]["code"].as_str()), (409, Some("conflict")));
    // Changing a role under an active rollout is refused.
    let (s, _) = api
        .call(
            "PUT",
            "/api/v1/roles/web",
            Some(json!({ "version": { "image": "img", "version": 3 } })),
        )
        .await?;
    assert_eq!(s, 409);
    api.ok("POST", &format!("/api/v1/rollouts/{id}/resume"), None)
        .await?;
    let stop = CancellationToken::new();
    let fleet = run_fleet(sims, Duration::from_millis(20), stop.clone());
    // Abort once the canary is healthy and the next wave started.
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let r = api
            .ok("GET", &format!("/api/v1/rollouts/{id}"), None)
            .await?;
        if r["progress"]["wave"].as_u64() >= Some(1) {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("canary wave never passed: {r}");
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    api.ok("POST", &format!("/api/v1/rollouts/{id}/abort"), None)
        .await?;
    let r = api.wait_final(id, Duration::from_secs(60)).await?;
    assert_eq!(r["state"], "aborted", "{r}");
    stop.cancel();
    let sims = fleet.await?;
    // The canary (wave 0, done) keeps img@2; nothing of the aborted wave stays on it.
    let on2: Vec<&str> = sims
        .iter()
        .filter(|s| s.running == 2)
        .map(|s| s.mac.as_str())
        .collect();
    assert!(on2.len() <= 1, "{on2:?}");
    server.stop().await;
    Ok(())
}

/// `apply` performs only planned operations: when the fleet leaves the plan (here a machine
/// never seen before boots and is discovered into the role being rolled) the rollout halts
/// and the current wave rolls back by plan. Operators cannot move planned nodes meanwhile.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_fleet_leaving_the_plan_halts_the_rollout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let api = server.api();
    let url = Arc::new(RwLock::new(server.url.clone()));
    let sims = setup_fleet(&api, Arc::clone(&url), &[("web", 0, 10)]).await?;
    let planned = orch_sim::mac(3);
    let stop = CancellationToken::new();
    let fleet = run_fleet(sims, Duration::from_millis(20), stop.clone());
    let id = api.start_rollout(spec(&["web"], 1, 2, 1)).await?;
    wait_for(&api, id, "wave 1", |r| {
        r["progress"]["wave"].as_u64() >= Some(1)
    })
    .await?;
    let (s, v) = api
        .call(
            "PATCH",
            &format!("/api/v1/nodes/{planned}"),
            Some(json!({ "role": "db" })),
        )
        .await?;
    assert_eq!(
        (s, v["error"]["code"].as_str()),
        (409, Some("conflict")),
        "{v}"
    );

    let mut newcomer = orch_sim::Sim::new(&orch_sim::mac(500), Arc::clone(&url));
    newcomer.boot().await?;
    let r = api.wait_final(id, Duration::from_secs(60)).await?;
    assert_eq!(r["state"], "halted", "{r}");
    let reason = r["reason"].as_str().unwrap_or("");
    assert!(
        reason.contains("outside the plan") && reason.contains(&newcomer.mac),
        "{reason}"
    );
    let halted_wave = r["progress"]["wave"].as_u64().context("wave")?;
    assert!((1..5).contains(&halted_wave), "{r}");
    // Waves done before the halt keep the new version; the halted wave's nodes run the old
    // one again (once they have acted on the rollback's reboot); later waves were never touched.
    let done: Vec<String> = r["plan"]["waves"].as_array().context("waves")?[..halted_wave as usize]
        .iter()
        .flat_map(|w| w["nodes"].as_array().cloned().unwrap_or_default())
        .filter_map(|n| n.as_str().map(str::to_owned))
        .collect();
    let deadline = tokio::time::Instant::now() + Duration::from_secs(60);
    loop {
        let nodes = api.ok("GET", "/api/v1/nodes?role=web", None).await?;
        let settled = nodes
            .as_array()
            .context("nodes")?
            .iter()
            .filter(|n| n["mac"] != newcomer.mac.as_str())
            .all(|n| {
                let expect = if done.iter().any(|d| n["mac"] == d.as_str()) {
                    2
                } else {
                    1
                };
                n["status"]["version"] == expect && n["state"] == "healthy"
            });
        if settled {
            break;
        }
        if tokio::time::Instant::now() > deadline {
            bail!("the fleet did not settle after the halt: {nodes}");
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    stop.cancel();
    let sims = fleet.await?;
    for s in &sims {
        let expect = if done.contains(&s.mac) { 2 } else { 1 };
        assert_eq!(s.running, expect, "{}: {r}", s.mac);
    }
    server.stop().await;
    Ok(())
}

// ---- separate server processes -------------------------------------------------------------

/// Fast timings for `strata serve`: 50 ms flushes and ticks, 2 s leases. A worker the loaded
/// machine does not schedule for a lease lifetime loses its lease and takes it again with a
/// new fencing token, so the tests check the fencing invariants (tokens only grow; after the
/// other process's takeover nothing by the old one), not an exact token sequence.
const FAST: &str = "[orchestrator]\nflush_ms = 50\ntick_ms = 50\nlease_ms = 2000\n";

/// `(fencing token, pid)` of every lease taken, in order.
fn leases_taken(events: &[Value]) -> Vec<(u64, u32)> {
    events
        .iter()
        .filter(|e| e["kind"] == "rollout.lease_taken")
        .map(|e| {
            (
                e["detail"]["token"].as_u64().unwrap_or(0),
                pid_of(e["actor"].as_str().unwrap_or("")),
            )
        })
        .collect()
}

/// A data directory for `strata serve`: the tests' server key (the sims verify manifests with
/// it) and a store holding busybox versions 1 and 2 with their roles, built by `strata image
/// build` as an operator does.
fn prepare_data_dir(data: &std::path::Path) -> Result<()> {
    std::fs::create_dir_all(data.join("keys"))?;
    std::fs::write(
        data.join("keys/server.key"),
        format!("{}\n", hex::encode(orch_sim::key().to_bytes())),
    )?;
    let images = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
    let update = data.join("update");
    std::fs::create_dir_all(&update)?;
    std::fs::write(
        update.join("recipe.toml"),
        "[update]\nimage = \"busybox\"\n[[file]]\npath = \"/etc/release\"\ncontent = \"2\\n\"\n",
    )?;
    for recipe in [images.join("busybox"), update] {
        let o = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["image", "build"])
            .arg(&recipe)
            .arg("--roles")
            .arg(images.join("roles"))
            .arg("--store")
            .arg(data.join("store"))
            .output()?;
        anyhow::ensure!(
            o.status.success(),
            "strata image build {}: {}",
            recipe.display(),
            String::from_utf8_lossy(&o.stderr)
        );
    }
    Ok(())
}

/// `strata serve` on `data`, fast timings.
fn serve(data: &std::path::Path) -> Result<TestServer> {
    TestServer::start_in(data, FAST)
}

fn token_of(actor: &str) -> u64 {
    actor
        .rsplit('#')
        .next()
        .and_then(|t| t.parse().ok())
        .unwrap_or(0)
}

fn pid_of(actor: &str) -> u32 {
    actor
        .split(':')
        .nth(2)
        .and_then(|p| p.parse().ok())
        .unwrap_or(0)
}

async fn wait_for(
    api: &Api,
    id: u64,
    what: &str,
    mut f: impl FnMut(&Value) -> bool,
) -> Result<Value> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(120);
    loop {
        if let Ok(r) = api.ok("GET", &format!("/api/v1/rollouts/{id}"), None).await {
            if f(&r) {
                return Ok(r);
            }
            if tokio::time::Instant::now() > deadline {
                bail!("waiting for {what}: {r}");
            }
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_server_resumes_the_rollout_at_the_right_wave() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    prepare_data_dir(&data)?;
    let a = serve(&data)?;
    let a_url = a.url("");
    let admin = std::fs::read_to_string(data.join("admin.token"))?
        .trim()
        .to_owned();
    let url = Arc::new(RwLock::new(a_url.clone()));
    let mut api = Api::new(&a_url, Some(&admin));
    let sims = setup_fleet_on(&api, Arc::clone(&url), &[("web", 0, 13)], "busybox", false).await?;
    let stop = CancellationToken::new();
    let fleet = run_fleet(sims, Duration::from_millis(20), stop.clone());
    let id = api
        .start_rollout(spec_on("busybox", &["web"], 1, 4, 2))
        .await?;
    wait_for(&api, id, "wave 2", |r| {
        r["progress"]["wave"].as_u64() >= Some(2)
    })
    .await?;
    let a_pid = a.pid();
    drop(a); // SIGKILL: no flush, no lease release.

    let b = serve(&data)?;
    let b_url = b.url("");
    *url.write().map_err(|_| anyhow::anyhow!("lock"))? = b_url.clone();
    api.url = b_url.clone();
    let stored = api
        .ok("GET", &format!("/api/v1/rollouts/{id}"), None)
        .await?;
    let resume_wave = stored["progress"]["wave"].as_u64().context("wave")?;
    assert!(resume_wave >= 2, "{stored}");
    let r = api.wait_final(id, Duration::from_secs(120)).await?;
    assert_eq!(r["state"], "succeeded", "{r}\n{}", b.log());

    let events = api.events("rollout.").await?;
    let taken = leases_taken(&events);
    assert!(
        taken.windows(2).all(|w| w[0].0 < w[1].0),
        "fencing tokens only grow: {taken:?}"
    );
    let b_token = taken
        .iter()
        .find(|(_, pid)| *pid == b.pid())
        .context("B took the lease")?
        .0;
    assert!(
        taken
            .iter()
            .all(|(t, pid)| (*pid == a_pid && *t < b_token) || (*pid == b.pid() && *t >= b_token)),
        "A before B, B last, higher: {taken:?}"
    );
    let done = ops(&events);
    let (before, after): (Vec<_>, Vec<_>) = done
        .iter()
        .partition(|(_, actor, _)| pid_of(actor) == a_pid);
    assert!(!after.is_empty());
    assert!(
        after
            .iter()
            .all(|(w, actor, _)| *w >= resume_wave && pid_of(actor) == b.pid()),
        "resumed at wave {resume_wave}: {after:?}"
    );
    assert!(before.iter().all(|(w, _, _)| *w <= resume_wave));
    let mut per_node: HashMap<String, usize> = HashMap::new();
    for (_, _, op) in &done {
        if op["op"] == "activate" {
            *per_node
                .entry(op["node"].as_str().unwrap_or("").to_owned())
                .or_default() += 1;
        }
    }
    assert_eq!(per_node.len(), 13);
    assert!(
        per_node.values().all(|&n| n == 1),
        "no node activated twice: {per_node:?}"
    );
    stop.cancel();
    let sims = fleet.await?;
    assert!(sims.iter().all(|s| s.running == 2));
    Ok(())
}

/// Stops `a` outside any SQLite write transaction (so the other process is not blocked on
/// a lock the stopped one holds).
fn stop_outside_transactions(a: &TestServer, db: &std::path::Path) -> Result<()> {
    let probe = rusqlite::Connection::open(db)?;
    probe.busy_timeout(Duration::from_millis(300))?;
    for _ in 0..50 {
        a.signal("STOP")?;
        if probe.execute_batch("BEGIN IMMEDIATE; ROLLBACK;").is_ok() {
            return Ok(());
        }
        a.signal("CONT")?;
        std::thread::sleep(Duration::from_millis(7));
    }
    bail!("could not stop the worker outside a transaction")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn two_server_processes_never_both_act_on_a_rollout() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let data = dir.path().join("data");
    std::fs::create_dir_all(&data)?;
    prepare_data_dir(&data)?;
    let a = serve(&data)?;
    let a_url = a.url("");
    let admin = std::fs::read_to_string(data.join("admin.token"))?
        .trim()
        .to_owned();
    let url = Arc::new(RwLock::new(a_url.clone()));
    let mut api = Api::new(&a_url, Some(&admin));
    let sims = setup_fleet_on(&api, Arc::clone(&url), &[("web", 0, 13)], "busybox", false).await?;
    let stop = CancellationToken::new();
    let fleet = run_fleet(sims, Duration::from_millis(20), stop.clone());
    let id = api
        .start_rollout(spec_on("busybox", &["web"], 1, 4, 2))
        .await?;
    wait_for(&api, id, "A holds the lease and acted", |r| {
        r["lease"]["holder"]
            .as_str()
            .is_some_and(|h| h.contains(&format!(":{}:", a.pid())))
            && r["progress"]["wave"].as_u64() >= Some(1)
    })
    .await?;
    // Pausing keeps A's lease alive (heartbeats) without further steps.
    api.ok("POST", &format!("/api/v1/rollouts/{id}/pause"), None)
        .await?;

    // B starts against the same database while A is alive: for several lease lifetimes it
    // never takes the rollout.
    let b = serve(&data)?;
    let b_url = b.url("");
    for _ in 0..50 {
        let r = api
            .ok("GET", &format!("/api/v1/rollouts/{id}"), None)
            .await?;
        // A alone holds it (A may have re-taken its own lease after a stall, with a new token).
        assert!(
            r["lease"]["holder"]
                .as_str()
                .is_some_and(|h| h.contains(&format!(":{}:", a.pid()))),
            "{r}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // A hangs (SIGSTOP): its lease expires and B takes over with a higher token. Nodes now talk to B.
    stop_outside_transactions(&a, &data.join("orchestrator.db"))?;
    *url.write().map_err(|_| anyhow::anyhow!("lock"))? = b_url.clone();
    api.url = b_url.clone();
    wait_for(&api, id, "B takes over", |r| {
        r["lease"]["holder"]
            .as_str()
            .is_some_and(|h| h.contains(&format!(":{}:", b.pid())))
    })
    .await?;
    api.ok("POST", &format!("/api/v1/rollouts/{id}/resume"), None)
        .await?;
    // A wakes up believing it holds the lease: its next write is fenced off.
    a.signal("CONT")?;
    let r = api.wait_final(id, Duration::from_secs(120)).await?;
    assert_eq!(
        r["state"],
        "succeeded",
        "{r}\nA:\n{}\nB:\n{}",
        a.log(),
        b.log()
    );
    let deadline = std::time::Instant::now() + Duration::from_secs(10);
    while !(a.log().contains("lease lost") || a.log().contains("fenced off"))
        && std::time::Instant::now() < deadline
    {
        tokio::time::sleep(Duration::from_millis(50)).await;
    }

    let events = api.events("rollout.").await?;
    let done = ops(&events);
    let first_b = done
        .iter()
        .position(|(_, actor, _)| pid_of(actor) == b.pid())
        .context("B performed operations")?;
    let taken = leases_taken(&events);
    assert!(
        taken.windows(2).all(|w| w[0].0 < w[1].0),
        "fencing tokens only grow: {taken:?}"
    );
    let b_token = taken
        .iter()
        .find(|(_, pid)| *pid == b.pid())
        .context("B took the lease")?
        .0;
    assert!(done[..first_b]
        .iter()
        .all(|(_, actor, _)| pid_of(actor) == a.pid() && token_of(actor) < b_token));
    assert!(
        done[first_b..]
            .iter()
            .all(|(_, actor, _)| pid_of(actor) == b.pid() && token_of(actor) >= b_token),
        "after B's takeover nothing by A: {:?}",
        &done[first_b..]
    );
    let a_log = a.log();
    assert!(
        a_log.contains("lease lost")
            || a_log.contains("fenced off")
            || !a_log.contains("driving rollout"),
        "A noticed it lost the lease:\n{a_log}"
    );
    stop.cancel();
    let sims = fleet.await?;
    assert!(sims.iter().all(|s| s.running == 2));
    Ok(())
}

#[tokio::test]
async fn a_stale_fencing_token_writes_nothing() -> Result<()> {
    use strata_server::db::rollouts;
    let dir = tempfile::tempdir()?;
    let server = Server::start(dir.path()).await?;
    let api = server.api();
    let url = Arc::new(RwLock::new(server.url.clone()));
    setup_fleet(&api, url, &[("web", 0, 2)]).await?;
    let r = api
        .ok("POST", "/api/v1/rollouts", Some(spec(&["web"], 1, 1, 1)))
        .await?;
    let id = r["id"].as_u64().context("id")?;
    api.ok(
        "POST",
        &format!("/api/v1/rollouts/{id}/approve"),
        Some(json!({ "digest": r["digest"] })),
    )
    .await?;
    server.stop().await;
    // Two workers on the database directly, with explicit clocks.
    let db = strata_server::db::Db::open(&dir.path().join("orchestrator.db"))?;
    let out = db
        .call(move |c| {
            c.execute(
                "UPDATE rollouts SET state = 'running' WHERE id = ?1",
                [id as i64],
            )?;
            let a = rollouts::acquire(c, id, "A", 1_000, 100)?;
            let held = rollouts::acquire(c, id, "B", 1_050, 100);
            let b = rollouts::acquire(c, id, "B", 1_100, 100)?;
            let plan = rollouts::get(c, id)?.plan;
            let op = plan.waves[0].ops[0].clone();
            let progress = strata_server::orchestrator::rollout::Progress::default();
            let stale = rollouts::apply_step(
                c,
                id,
                "A",
                a.token,
                1_101,
                0,
                std::slice::from_ref(&op),
                &progress,
                None,
            );
            let node = strata_server::db::nodes::get(
                c,
                match &op {
                    strata_server::orchestrator::plan::Op::Stage { node, .. } => node,
                    _ => "",
                },
            )?;
            let fresh = rollouts::apply_step(c, id, "B", b.token, 1_102, 0, &[op], &progress, None);
            Ok((
                a.token,
                held.is_err(),
                b.token,
                stale.map_err(|e| e.to_string()),
                node.and_then(|n| n.stage),
                fresh.is_ok(),
            ))
        })
        .await?;
    let (ta, held, tb, stale, stage_after_stale, fresh) = out;
    assert_eq!((ta, tb), (1, 2));
    assert!(held, "B cannot take a live lease");
    assert!(
        stale.as_ref().is_err_and(|e| e.contains("lease lost")),
        "{stale:?}"
    );
    assert_eq!(stage_after_stale, None, "the stale write changed nothing");
    assert!(fresh);
    Ok(())
}
