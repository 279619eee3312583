//! Load generator for the orchestrator (docs/benchmarks.md, "Orchestrator"): N simulated nodes
//! each POST a state report every interval (real HTTP on loopback, spread evenly over the
//! interval; 9 in 10 reports are heartbeats with an empty delta, 1 in 10 changes a field);
//! the server runs in a separate process (this binary re-executed), so its CPU time is its
//! own. Prints, per fleet size: requests/s, p50/p99/max latency, server CPU (% of one core)
//! and the database size. Then the time to plan a rollout over the largest fleet (pure
//! planner, and end to end through the API), and SQLite's cost of one transaction per report
//! against one batched transaction per flush (the design choice the fleet's flusher makes).
//!
//! With `--tokens` every node authenticates its reports with a node token, as node-init does
//! once it has read its layer's token. The run also reports the handler time inside the server,
//! and timer stalls in both processes, to tell the server's own latency from scheduling.
//!
//! `cargo bench -p strata-server --bench orch_load -- [--nodes 1000,10000] [--secs 30] [--interval 10] [--tokens]`

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
    LayerRef {
        id,
        size: 4096,
        kind,
        chunk_size: 4096,
        chunks: vec![id],
        url: format!("/layers/{id}"),
    }
}

impl ImageSource for Images {
    fn chain_for(&self, role: &str, _n: &NodeRecord) -> Result<Option<ImageChain>, FleetError> {
        Ok(Some(ImageChain {
            image: "img".into(),
            version: 1,
            layers: vec![layer("base", LayerKind::Base), layer(role, LayerKind::Role)],
            boot_tries: 3,
        }))
    }
    fn chain_at(
        &self,
        role: &str,
        v: &VersionRef,
        _n: &NodeRecord,
    ) -> Result<Option<ImageChain>, FleetError> {
        Ok(Some(ImageChain {
            image: v.image.clone(),
            version: v.version,
            layers: vec![layer("base", LayerKind::Base), layer(role, LayerKind::Role)],
            boot_tries: 3,
        }))
    }
    fn layer_path(&self, _id: &LayerId) -> Option<PathBuf> {
        None
    }
}

/// Time spent inside the server's handlers (microseconds) per request, by path kind: what the
/// server itself adds to a report's latency, apart from scheduling and the load generator.
static HANDLER_US: std::sync::Mutex<Vec<u32>> = std::sync::Mutex::new(Vec::new());

async fn timing(
    req: axum::extract::Request,
    next: axum::middleware::Next,
) -> axum::response::Response {
    let report = req.uri().path().ends_with("/report");
    let t = Instant::now();
    let resp = next.run(req).await;
    if report {
        let us = u32::try_from(t.elapsed().as_micros()).unwrap_or(u32::MAX);
        HANDLER_US
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .push(us);
    }
    resp
}

/// How late a 10 ms timer fires in this process: the worst, and how often by over 20 ms. A
/// process the machine does not schedule (other load on the cores) shows it here.
#[derive(Default)]
struct Stalls {
    worst: Duration,
    over_20ms: u64,
}

static STALLS: std::sync::Mutex<Stalls> = std::sync::Mutex::new(Stalls {
    worst: Duration::ZERO,
    over_20ms: 0,
});

async fn watch_stalls() {
    let mut next = tokio::time::Instant::now();
    loop {
        next += Duration::from_millis(10);
        tokio::time::sleep_until(next).await;
        let late = tokio::time::Instant::now().saturating_duration_since(next);
        let mut s = STALLS.lock().unwrap_or_else(|e| e.into_inner());
        s.worst = s.worst.max(late);
        s.over_20ms += u64::from(late > Duration::from_millis(20));
        next = next.max(tokio::time::Instant::now());
    }
}

fn take_stalls() -> String {
    let s = std::mem::take(&mut *STALLS.lock().unwrap_or_else(|e| e.into_inner()));
    format!(
        "10 ms timer late by >20 ms {} times, worst {:.1} ms",
        s.over_20ms,
        s.worst.as_secs_f64() * 1e3
    )
}

/// `GET /bench/handler-times?reset`: p50/p99/max of the handler times since the last reset.
async fn handler_times(q: axum::extract::RawQuery) -> String {
    let mut v = std::mem::take(&mut *HANDLER_US.lock().unwrap_or_else(|e| e.into_inner()));
    let stalls = take_stalls();
    if q.0.is_some() {
        return "reset".into();
    }
    v.sort_unstable();
    let p = |f: f64| {
        v.get(((v.len().saturating_sub(1)) as f64 * f).round() as usize)
            .copied()
            .unwrap_or(0) as f64
            / 1e3
    };
    format!(
        "handler time of {} reports: p50 {:.2} ms  p99 {:.2} ms  max {:.2} ms; {stalls}",
        v.len(),
        p(0.5),
        p(0.99),
        p(1.0)
    )
}

fn server_main(dir: &str) -> Result<()> {
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    rt.block_on(async move {
        let key = ed25519_dalek::SigningKey::from_bytes(&[9; 32]);
        let orch = Orchestrator::open(
            std::path::Path::new(dir),
            key,
            Arc::new(Images),
            Options::new("web"),
        )
        .await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        println!("listening on http://{}", listener.local_addr()?);
        std::io::stdout().flush()?;
        let app = axum::Router::new()
            .route("/bench/handler-times", axum::routing::get(handler_times))
            .merge(orch.router())
            .layer(axum::middleware::from_fn(timing));
        let mut services =
            strata_server::app::Services::new(tokio_util::sync::CancellationToken::new());
        services.spawn("http", move |token| async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
        });
        orch.spawn(&mut services);
        tokio::spawn(watch_stalls());
        services.run().await?;
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
    token: Option<String>,
    seq: u64,
    acked: NodeStatus,
    status: NodeStatus,
}

async fn report(client: &reqwest::Client, url: &str, n: &mut Node) -> Result<()> {
    for _ in 0..2 {
        let r = StateReport {
            mac: n.mac.clone(),
            seq: n.seq + 1,
            base_seq: n.seq,
            delta: n.acked.diff(&n.status),
        };
        let mut req = client
            .post(format!("{url}/api/v1/nodes/by-mac/{}/report", n.mac))
            .json(&r);
        if let Some(t) = &n.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
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

fn mac_of(i: usize) -> String {
    format!(
        "02:00:{:02x}:{:02x}:{:02x}:{:02x}",
        (i >> 24) & 255,
        (i >> 16) & 255,
        (i >> 8) & 255,
        i & 255
    )
}

/// Gives every node a node token (discovered by a first report, then `POST .../tokens`), 32
/// at a time. Returns the secrets by node index.
async fn issue_tokens(
    client: &reqwest::Client,
    url: &str,
    dir: &std::path::Path,
    nodes: usize,
) -> Result<Vec<String>> {
    let admin = std::fs::read_to_string(dir.join("admin.token"))?
        .trim()
        .to_owned();
    let mut tasks = Vec::new();
    for w in 0..32 {
        let (client, url, admin) = (client.clone(), url.to_owned(), admin.clone());
        tasks.push(tokio::spawn(async move {
            let mut out = Vec::new();
            for i in (w..nodes).step_by(32) {
                let mut n = Node {
                    mac: mac_of(i),
                    token: None,
                    seq: 0,
                    acked: NodeStatus::default(),
                    status: NodeStatus::default(),
                };
                report(&client, &url, &mut n).await?;
                let resp = client
                    .post(format!("{url}/api/v1/nodes/{}/tokens", n.mac))
                    .bearer_auth(&admin)
                    .json(&serde_json::json!({}))
                    .send()
                    .await?;
                anyhow::ensure!(
                    resp.status().is_success(),
                    "token for {}: {}",
                    n.mac,
                    resp.status()
                );
                let v: serde_json::Value = resp.json().await?;
                out.push((i, v["token"].as_str().context("secret")?.to_owned()));
            }
            Ok::<_, anyhow::Error>(out)
        }));
    }
    let mut secrets = vec![String::new(); nodes];
    for t in tasks {
        for (i, s) in t.await?? {
            secrets[i] = s;
        }
    }
    Ok(secrets)
}

async fn run_load(nodes: usize, secs: u64, interval: u64, with_tokens: bool) -> Result<()> {
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
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(1024)
        .timeout(Duration::from_secs(30))
        .build()?;
    let secrets = if with_tokens {
        issue_tokens(&client, &url, dir.path(), nodes).await?
    } else {
        Vec::new()
    };
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
                let status = NodeStatus {
                    state: NodeState::Healthy,
                    role: Some("web".into()),
                    version: Some(1),
                    ..Default::default()
                };
                (
                    offset,
                    Node {
                        mac: mac_of(i),
                        token: secrets.get(i).cloned(),
                        seq: 0,
                        acked: NodeStatus::default(),
                        status,
                    },
                )
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
                        let first = {
                            let mut c = cpu0.lock().unwrap_or_else(|e| e.into_inner());
                            let first = c.is_none();
                            if first {
                                *c = cpu_ticks(pid).ok().map(|t| (t, Instant::now()));
                            }
                            first
                        };
                        if first {
                            let _ = client
                                .get(format!("{url}/bench/handler-times?reset"))
                                .send()
                                .await;
                            take_stalls();
                        }
                    }
                    if (k as u32 + round).is_multiple_of(10) && round > 0 {
                        n.status.boot_count = n.status.boot_count.wrapping_add(1);
                    }
                    let t = Instant::now();
                    let late = tokio::time::Instant::now().saturating_duration_since(due);
                    let ok = report(&client, &url, n).await.is_ok();
                    if due >= measure_from {
                        if ok {
                            lat.push((
                                t.elapsed(),
                                due.saturating_duration_since(measure_from),
                                late,
                            ));
                        } else {
                            errors += 1;
                        }
                    }
                }
                round += 1;
            }
        }));
    }
    let mut all = Vec::new();
    let mut errors = 0;
    for t in tasks {
        let (l, e) = t.await?;
        all.extend(l);
        errors += e;
    }
    let mut lat: Vec<Duration> = all.iter().map(|(l, _, _)| *l).collect();
    let cpu1 = cpu_ticks(pid)?;
    let (c0, t0) = cpu0
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .context("no measurement")?;
    let wall = t0.elapsed().as_secs_f64();
    let ticks_per_sec = 100.0;
    let cpu = (cpu1 - c0) as f64 / ticks_per_sec / wall * 100.0;
    lat.sort();
    let db_size = std::fs::metadata(dir.path().join("orchestrator.db"))
        .map(|m| m.len())
        .unwrap_or(0)
        + std::fs::metadata(dir.path().join("orchestrator.db-wal"))
            .map(|m| m.len())
            .unwrap_or(0);
    println!(
        "{nodes:>6} nodes every {interval}s{}: {:>7.0} req/s  p50 {:>6.2} ms  p99 {:>6.2} ms  max {:>7.2} ms  server CPU {:>5.1}% of a core  errors {errors}  db {:.1} MiB",
        if with_tokens { " with tokens" } else { "" },
        lat.len() as f64 / wall,
        pct(&lat, 0.5).as_secs_f64() * 1e3,
        pct(&lat, 0.99).as_secs_f64() * 1e3,
        lat.last().copied().unwrap_or_default().as_secs_f64() * 1e3,
        cpu,
        db_size as f64 / (1 << 20) as f64,
    );
    // Where the slow ones are: when (seconds into the measurement) and whether the generator
    // itself sent them late (a worker still busy with the previous request).
    let p99 = pct(&lat, 0.99);
    let mut slow: Vec<&(Duration, Duration, Duration)> =
        all.iter().filter(|(l, _, _)| *l >= p99).collect();
    slow.sort_by_key(|(_, at, _)| *at);
    let mut per_sec = std::collections::BTreeMap::<u64, usize>::new();
    for (_, at, _) in &slow {
        *per_sec.entry(at.as_secs()).or_default() += 1;
    }
    let late_sent = all
        .iter()
        .filter(|(_, _, late)| *late > Duration::from_millis(5))
        .count();
    let slow_and_late = slow
        .iter()
        .filter(|(_, _, late)| *late > Duration::from_millis(5))
        .count();
    println!(
        "  slowest 1% ({}) by second of the run: {per_sec:?}",
        slow.len()
    );
    println!("  generator: {late_sent} requests sent >5 ms after their due time ({slow_and_late} of the slowest 1%); {}", take_stalls());
    if let Ok(r) = client
        .get(format!("{url}/bench/handler-times"))
        .send()
        .await
    {
        println!("  server side: {}", r.text().await.unwrap_or_default());
    }
    if nodes == 10_000 || std::env::var_os("ORCH_BENCH_PLAN").is_some() {
        plan_through_api(&client, &url, dir.path(), nodes).await?;
        plan_breakdown(dir.path()).await?;
    }
    let _ = child.kill();
    let _ = child.wait();
    Ok(())
}

async fn plan_through_api(
    client: &reqwest::Client,
    url: &str,
    dir: &std::path::Path,
    nodes: usize,
) -> Result<()> {
    let admin = std::fs::read_to_string(dir.join("admin.token"))?
        .trim()
        .to_owned();
    let put = client
        .put(format!("{url}/api/v1/roles/web"))
        .bearer_auth(&admin)
        .json(&serde_json::json!({ "version": { "image": "img", "version": 1 } }))
        .send()
        .await?;
    anyhow::ensure!(put.status().is_success(), "role: {}", put.status());
    let spec = serde_json::json!({ "roles": [{ "role": "web", "to": { "image": "img", "version": 2 } }], "canary": 1, "batch_size": 100, "max_unavailable": 10 });
    let t = Instant::now();
    let resp = client
        .post(format!("{url}/api/v1/rollouts"))
        .bearer_auth(&admin)
        .json(&spec)
        .send()
        .await?;
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

/// Where the API's plan time goes: the same steps on the same database, timed one by one.
async fn plan_breakdown(dir: &std::path::Path) -> Result<()> {
    use strata_server::db::{nodes, rollouts, Db};
    use strata_server::orchestrator::plan::RolloutSpec;
    let db = Db::open(&dir.join("orchestrator.db"))?;
    let spec: RolloutSpec = serde_json::from_value(
        serde_json::json!({ "roles": [{ "role": "web", "to": { "image": "img", "version": 2 } }], "canary": 1, "batch_size": 100, "max_unavailable": 10 }),
    )?;
    let line = db
        .call(move |c| {
            let ms = |t: Instant| t.elapsed().as_secs_f64() * 1e3;
            let t = Instant::now();
            let n = nodes::list(c, Some("web"))?.len();
            let read = ms(t);
            let t = Instant::now();
            let plan = rollouts::plan(c, &spec)?.map_err(|e| strata_server::db::DbError::Conflict(e.to_string()))?;
            let read_plan = ms(t);
            let t = Instant::now();
            let json = serde_json::to_string(&plan).unwrap_or_default();
            let ser = ms(t);
            let t = Instant::now();
            let _ = plan.digest();
            let digest = ms(t);
            let t = Instant::now();
            let r = rollouts::create(c, &plan, "bench")?;
            let create = ms(t);
            let t = Instant::now();
            let _ = rollouts::get(c, r.id)?;
            let get = ms(t);
            let t = Instant::now();
            let body = serde_json::to_vec(&r).unwrap_or_default();
            let resp = ms(t);
            Ok(format!(
                "  plan breakdown over {n} nodes: full node rows {read:.1} ms (what planning read until session 2), assignment columns + plan {read_plan:.1} ms, plan to JSON ({} KiB) {ser:.1} ms, digest {digest:.1} ms, \
                 store (insert + event) {create:.1} ms (a read back, not done, would add {get:.1} ms), response JSON {resp:.1} ms",
                json.len() / 1024
            ) + &format!(" ({} KiB)", body.len() / 1024))
        })
        .await?;
    println!("{line}");
    Ok(())
}

fn plan_pure(nodes: usize) {
    use strata_server::orchestrator::plan::{plan, NodeFact, RoleFact, RoleTarget, RolloutSpec};
    let v = |n| VersionRef {
        image: "img".into(),
        version: n,
    };
    let roles: Vec<RoleFact> = ["storage", "database", "compute"]
        .iter()
        .enumerate()
        .map(|(i, r)| RoleFact {
            name: (*r).into(),
            order: i as i64,
            current: Some(v(1)),
        })
        .collect();
    let facts: Vec<NodeFact> = (0..nodes)
        .map(|i| NodeFact {
            mac: format!(
                "02:00:00:{:02x}:{:02x}:{:02x}",
                (i >> 16) & 255,
                (i >> 8) & 255,
                i & 255
            ),
            role: roles[i % 3].name.clone(),
            pinned: None,
            effective: Some(v(1)),
        })
        .collect();
    let spec = RolloutSpec {
        roles: roles
            .iter()
            .map(|r| RoleTarget {
                role: r.name.clone(),
                to: v(2),
            })
            .collect(),
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
    println!(
        "plan over {nodes} nodes, 3 roles (pure planner, best of 5): {:.2} ms, {waves} waves",
        best.as_secs_f64() * 1e3
    );
}

async fn sqlite_batching(n: usize) -> Result<()> {
    use strata_server::db::nodes::{self, Facts};
    use strata_server::db::Db;
    let dir = tempfile::tempdir()?;
    let db = Db::open(&dir.path().join("b.db"))?;
    let macs: Vec<String> = (0..n)
        .map(|i| format!("02:00:00:00:{:02x}:{:02x}", (i >> 8) & 255, i & 255))
        .collect();
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
                report: Some((
                    NodeStatus {
                        state: NodeState::Healthy,
                        boot_count: seen as u32,
                        ..Default::default()
                    },
                    Default::default(),
                    seen,
                    seen,
                )),
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
    let get = |name: &str| {
        args.iter()
            .position(|a| a == name)
            .and_then(|i| args.get(i + 1))
            .cloned()
    };
    let sizes: Vec<usize> = get("--nodes")
        .unwrap_or_else(|| "1000,10000".into())
        .split(',')
        .filter_map(|s| s.parse().ok())
        .collect();
    let secs: u64 = get("--secs").and_then(|s| s.parse().ok()).unwrap_or(30);
    let interval: u64 = get("--interval").and_then(|s| s.parse().ok()).unwrap_or(10);
    let tokens = args.iter().any(|a| a == "--tokens");
    let rt = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?;
    rt.block_on(async {
        tokio::spawn(watch_stalls());
        for &n in &sizes {
            run_load(n, secs, interval, tokens).await?;
        }
        plan_pure(sizes.iter().copied().max().unwrap_or(10_000));
        sqlite_batching(2000).await
    })
}
