//! Load generator for the orchestrator (docs/benchmarks.md, "Orchestrator"): N simulated nodes
//! each POST a state report every interval (real HTTP on loopback, spread evenly over the
//! interval; 9 in 10 reports are heartbeats with an empty delta, 1 in 10 changes a field);
//! the server runs in a separate process (this binary re-executed), so its CPU time is its
//! own. Prints, per fleet size: requests/s, p50/p99/max latency, server CPU (% of one core)
//! and the database size. Then the time to plan a rollout over the largest fleet (pure
//! planner, and end to end through the API), and SQLite's cost of one transaction per report
//! against one batched transaction per flush (the design choice the fleet's flusher makes).
//!
//! `cargo bench -p strata-server --bench orch_load -- [--nodes 1000,10000] [--secs 30] [--interval 10]`

use std::io::{BufRead, BufReader, Write};
use std::path::PathBuf;
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use strata_server::fleet::{FleetError, ImageChain, ImageSource, NodeRecord};
use strata_server::orchestrator::{Options, Orchestrator, VersionRef};
use wire::manifest::{LayerKind, LayerRef};
use wire::report::{NodeState, NodeStatus, ReportAck, StateReport};
use wire::{Digest, LayerId};

struct Images;

fn layer(tag: &str, kind: LayerKind) -> LayerRef {
    let id = Digest(*blake3::hash(tag.as_bytes()).as_bytes());
    LayerRef { id, size: 4096, kind, chunk_size: 4096, chunks: vec![id], url: format!("/layers/{id}") }
}

impl ImageSource for Images {
    fn chain_for(&self, role: &str, _n: &NodeRecord) -> Result<Option<ImageChain>, FleetError> {
        Ok(Some(ImageChain { image: "img".into(), version: 1, layers: vec![layer("base", LayerKind::Base), layer(role, LayerKind::Role)], boot_tries: 3 }))
    }
    fn chain_at(&self, role: &str, v: &VersionRef, _n: &NodeRecord) -> Result<Option<ImageChain>, FleetError> {
        Ok(Some(ImageChain { image: v.image.clone(), version: v.version, layers: vec![layer("base", LayerKind::Base), layer(role, LayerKind::Role)], boot_tries: 3 }))
    }
    fn layer_path(&self, _id: &LayerId) -> Option<PathBuf> {
        None
    }
}

fn server_main(dir: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build()?;
    rt.block_on(async move {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let orch = Orchestrator::open(std::path::Path::new(dir), key, Arc::new(Images), Options::new("web")).await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on http://{}", listener.local_addr()?);
        std::io::stdout().flush()?;
        orch.serve(listener, tokio_util::sync::CancellationToken::new()).await?;
        Ok(())
    })
}

fn cpu_ticks(pid: u32) -> Result<u64> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat"))?;
    let rest = stat.rsplit(')').next().context("stat")?;
    let f: Vec<&str> = rest.split_whitespace().collect();
    // After the command: state is field 3, utime 14, stime 15 (1-based over the whole line).
    Ok(f.get(11).context("utime")?.parse::<u64>()? + f.get(12).context("stime")?.parse::<u64>()?)
}

struct Node {
    mac: String,
    seq: u64,
    acked: NodeStatus,
    status: NodeStatus,
}

async fn report(client: &reqwest::Client, url: &str, n: &mut Node) -> Result<()> {
    for _ in 0..2 {
        let r = StateReport { mac: n.mac.clone(), seq: n.seq + 1, base_seq: n.seq, delta: n.acked.diff(&n.status) };
        let resp = client.post(format!("{url}/api/v1/nodes/by-mac/{}/report", n.mac)).json(&r).send().await?;
        if !resp.status().is_success() {
            bail!("HTTP {}", resp.status());
        }
        let ack: ReportAck = resp.json().await?;
        if ack.resend_full {
            n.seq = 0;
            n.acked = NodeStatus::default();
            continue;
        }
        n.seq += 1;
        n.acked = n.status.clone();
        return Ok(());
    }
    bail!("resend loop")
}

fn pct(sorted: &[Duration], p: f64) -> Duration {
    if sorted.is_empty() {
        return Duration::ZERO;
    }
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

async fn run_load(nodes: usize, secs: u64, interval: u64) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let mut child = Command::new(std::env::current_exe()?)
        .args(["--server", dir.path().to_str().context("path")?])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()?;
    let pid = child.id();
    let out = child.stdout.take().context("stdout")?;
    let mut url = String::new();
    for line in BufReader::new(out).lines() {
        let line = line?;
        if let Some(u) = line.split("listening on ").nth(1) {
            url = u.trim().to_owned();
            break;
        }
    }
    anyhow::ensure!(!url.is_empty(), "server did not start");
    let client = reqwest::Client::builder().pool_max_idle_per_host(1024).timeout(Duration::from_secs(30)).build()?;
    let workers = 512.min(nodes);
    let period = Duration::from_secs(interval);
    let start = tokio::time::Instant::now() + Duration::from_millis(200);
    let warmup = Duration::from_secs(interval);
    let measure_from = start + warmup;
    let end = measure_from + Duration::from_secs(secs);
    let cpu0 = Arc::new(std::sync::Mutex::new(None::<(u64, Instant)>));
    let mut tasks = Vec::new();
    for w in 0..workers {
        let client = client.clone();
        let url = url.clone();
        let mut mine: Vec<(Duration, Node)> = (w..nodes)
            .step_by(workers)
            .map(|i| {
                let offset = period.mul_f64(i as f64 / nodes as f64);
                let status = NodeStatus { state: NodeState::Healthy, role: Some("web".into()), version: Some(1), ..Default::default() };
                (offset, Node { mac: format!("02:00:{:02x}:{:02x}:{:02x}:{:02x}", (i >> 24) & 255, (i >> 16) & 255, (i >> 8) & 255, i & 255), seq: 0, acked: NodeStatus::default(), status })
            })
            .collect();
        let cpu0 = Arc::clone(&cpu0);
        tasks.push(tokio::spawn(async move {
            let mut lat = Vec::new();
            let mut errors = 0u64;
            let mut round = 0u32;
            loop {
                for (k, (offset, n)) in mine.iter_mut().enumerate() {
                    let due = start + period * round + *offset;
                    if due >= end {
                        return (lat, errors);
                    }
                    tokio::time::sleep_until(due).await;
                    if due >= measure_from {
                        let mut c = cpu0.lock().unwrap_or_else(|e| e.into_inner());
                        if c.is_none() {
                            *c = cpu_ticks(pid).ok().map(|t| (t, Instant::now()));
                        }
                    }
                    if (k as u32 + round) % 10 == 0 && round > 0 {
                        n.status.boot_count = n.status.boot_count.wrapping_add(1);
                    }
                    let t = Instant::now();
                    let ok = report(&client, &url, n).await.is_ok();
                    if due >= measure_from {
                        if ok {
                            lat.push(t.elapsed());
                        } else {
                            errors += 1;
                        }
                    }
                }
                round += 1;
            }
        }));
    }
    let mut lat = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        lat.extend(l);
        errors += e;
    }
    let cpu1 = cpu_ticks(pid)?;
    let (c0, t0) = cpu0.lock().unwrap_or_else(|e| e.into_inner()).context("no measurement")?;
    let wall = t0.elapsed().as_secs_f64();
    let ticks_per_sec = 100.0;
    let cpu = (cpu1 - c0) as f64 / ticks_per_sec / wall * 100.0;
    lat.sort();
    let db_size = std::fs::metadata(dir.path().join("orchestrator.db")).map(|m| m.len()).unwrap_or(0)
        + std::fs::metadata(dir.path().join("orchestrator.db-wal")).map(|m| m.len()).unwrap_or(0);
    println!(
        "{nodes:>6} nodes every {interval}s: {:>7.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  server CPU {:>5.1}% of a core  errors {errors}  db {:.1} MiB",
        lat.len() as f64 / wall,
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        cpu,
        db_size as f64 / (1 << 20) as f64,
    );
    if nodes == 10_000 || std::env::var_os("ORCH_BENCH_PLAN").is_some() {
        plan_through_api(&client, &url, dir.path(), nodes).await?;
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

async fn plan_through_api(client: &reqwest::Client, url: &str, dir: &std::path::Path, nodes: usize) -> Result<()> {
    let admin = std::fs::read_to_string(dir.join("admin.token"))?.trim().to_owned();
    let put = client
        .put(format!("{url}/api/v1/roles/web"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({ "version": { "image": "img", "version": 1 } }))
        .send()
        .await?;
    anyhow::ensure!(put.status().is_success(), "role: {}", put.status());
    let spec = serde_json::json!({ "roles": [{ "role": "web", "to": { "image": "img", "version": 2 } }], "canary": 1, "batch_size": 100, "max_unavailable": 10 });
    let t = Instant::now();
    let resp = client.post(format!("{url}/api/v1/rollouts")).bearer_auth(&admin).json(&spec).send().await?;
    let status = resp.status();
    let body: serde_json::Value = resp.json().await?;
    let took = t.elapsed();
    anyhow::ensure!(status.is_success(), "plan: {status} {body}");
    println!(
        "plan over {nodes} nodes through the API (POST /api/v1/rollouts, db read + plan + store): {:.1} ms, {} waves, {} KiB of plan JSON",
        took.as_secs_f64() * 1e3,
        body["plan"]["waves"].as_array().map_or(0, Vec::len),
        body["plan"].to_string().len() / 1024
    );
    Ok(())
}

fn plan_pure(nodes: usize) {
    use strata_server::orchestrator::plan::{plan, NodeFact, RoleFact, RoleTarget, RolloutSpec};
    let v = |n| VersionRef { image: "img".into(), version: n };
    let roles: Vec<RoleFact> = ["storage", "database", "compute"].iter().enumerate().map(|(i, r)| RoleFact { name: (*r).into(), order: i as i64, current: Some(v(1)) }).collect();
    let facts: Vec<NodeFact> = (0..nodes)
        .map(|i| NodeFact { mac: format!("02:00:00:{:02x}:{:02x}:{:02x}", (i >> 16) & 255, (i >> 8) & 255, i & 255), role: roles[i % 3].name.clone(), pinned: None, effective: Some(v(1)) })
        .collect();
    let spec = RolloutSpec {
        roles: roles.iter().map(|r| RoleTarget { role: r.name.clone(), to: v(2) }).collect(),
        canary: 1,
        batch_size: 100,
        max_unavailable: 10,
        health_timeout_secs: 600,
        stage_timeout_secs: 3600,
    };
    let mut best = Duration::MAX;
    let mut waves = 0;
    for _ in 0..5 {
        let t = Instant::now();
        let p = plan(&spec, &roles, &facts);
        best = best.min(t.elapsed());
        waves = p.map(|p| p.waves.len()).unwrap_or(0);
    }
    println!("plan over {nodes} nodes, 3 roles (pure planner, best of 5): {:.2} ms, {waves} waves", best.as_secs_f64() * 1e3);
}

async fn sqlite_batching(n: usize) -> Result<()> {
    use strata_server::db::nodes::{self, Facts};
    use strata_server::db::Db;
    let dir = tempfile::tempdir()?;
    let db = Db::open(&dir.path().join("b.db"))?;
    let macs: Vec<String> = (0..n).map(|i| format!("02:00:00:00:{:02x}:{:02x}", (i >> 8) & 255, i & 255)).collect();
    let m2 = macs.clone();
    db.call(move |c| {
        for m in &m2 {
            nodes::discover(c, m, "web", 1)?;
        }
        Ok(())
    })
    .await?;
    let facts = |seen: u64| -> Vec<Facts> {
        macs.iter()
            .map(|m| Facts {
                mac: m.clone(),
                report: Some((NodeStatus { state: NodeState::Healthy, boot_count: seen as u32, ..Default::default() }, Default::default(), seen, seen)),
                staged: None,
                last_seen_ms: seen,
                layer_bytes: 0,
            })
            .collect()
    };
    let one_by_one = facts(2);
    let t = Instant::now();
    for f in one_by_one {
        db.call(move |c| nodes::flush(c, &[f], &[])).await?;
    }
    let single = t.elapsed();
    let batch = facts(3);
    let t = Instant::now();
    db.call(move |c| nodes::flush(c, &batch, &[])).await?;
    let batched = t.elapsed();
    println!(
        "SQLite, {n} node reports: one transaction each {:.1} ms ({:.0} reports/s), one batched transaction {:.1} ms ({:.0} reports/s): batching {:.1}x",
        single.as_secs_f64() * 1e3,
        n as f64 / single.as_secs_f64(),
        batched.as_secs_f64() * 1e3,
        n as f64 / batched.as_secs_f64(),
        single.as_secs_f64() / batched.as_secs_f64()
    );
    Ok(())
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    if let Some(i) = args.iter().position(|a| a == "--server") {
        return server_main(args.get(i + 1).context("--server DIR")?);
    }
    let get = |name: &str| args.iter().position(|a| a == name).and_then(|i| args.get(i + 1)).cloned();
    let sizes: Vec<usize> = get("--nodes").unwrap_or_else(|| "1000,10000".into()).split(',').filter_map(|s| s.parse().ok()).collect();
    let secs: u64 = get("--secs").and_then(|s| s.parse().ok()).unwrap_or(30);
    let interval: u64 = get("--interval").and_then(|s| s.parse().ok()).unwrap_or(10);
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async {
        for &n in &sizes {
            run_load(n, secs, interval).await?;
        }
        plan_pure(sizes.iter().copied().max().unwrap_or(10_000));
        sqlite_batching(2000).await
    })
}
