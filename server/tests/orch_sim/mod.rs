//! Shared by the orchestrator tests: an in-process server (the real API, database, fleet
//! flusher and rollout driver on 127.0.0.1:0) over a synthetic image source, an API client,
//! and simulated nodes that speak the node protocol of docs/api.md over real HTTP: they
//! report deltas, stage what the server asks, reboot when told, verify their manifests'
//! signatures, and can be made to fail a version (node-init's boot-counting rollback).
//!
//! The fake source also gives each node a node layer, a file under the data directory holding
//! the token the fleet passed for it (`NodeRecord::token`), served at `/layers/{id}` like a
//! real layer: a booting sim downloads it and uses that token from then on, as node-init does
//! with `/etc/strata/token` of its mounted root.
#![allow(dead_code)]

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use ed25519_dalek::{SigningKey, VerifyingKey};
use serde_json::{json, Value};
use strata_server::fleet::{FleetError, ImageChain, ImageInfo, ImageSource, NodeRecord};
use strata_server::orchestrator::{Options, Orchestrator, VersionRef};
use tokio_util::sync::CancellationToken;
use wire::manifest::{LayerKind, LayerRef, Manifest, SignedManifest};
use wire::report::{NodeState, NodeStatus, ReportAck, StateReport};
use wire::{Digest, LayerId};

/// Image `img`, versions 1..=`versions`, every role on every version: a base and a role layer,
/// plus a node layer per node holding its token (files in `dir`).
pub struct FakeImages {
    pub versions: u64,
    pub dir: PathBuf,
}

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

impl FakeImages {
    pub fn layers(role: &str, version: u64) -> Vec<LayerRef> {
        vec![
            layer(&format!("base {version}"), LayerKind::Base),
            layer(&format!("{role} {version}"), LayerKind::Role),
        ]
    }

    /// The role's chain at `version` plus the node's layer (written on first use).
    fn chain(&self, role: &str, version: u64, node: &NodeRecord) -> Result<ImageChain, FleetError> {
        let token = node
            .token
            .clone()
            .ok_or_else(|| FleetError::Internal(format!("no token for {}", node.mac)))?;
        let content = format!("{token}\n");
        let id =
            Digest(*blake3::hash(format!("{role} {version}\n{content}").as_bytes()).as_bytes());
        let path = self.dir.join(id.to_hex());
        if !path.is_file() {
            std::fs::create_dir_all(&self.dir).map_err(|e| FleetError::Internal(e.to_string()))?;
            std::fs::write(&path, &content).map_err(|e| FleetError::Internal(e.to_string()))?;
        }
        let mut layers = Self::layers(role, version);
        layers.push(LayerRef {
            id,
            size: content.len() as u64,
            kind: LayerKind::Node,
            chunk_size: 4096,
            chunks: vec![id],
            url: format!("/layers/{id}"),
        });
        Ok(ImageChain {
            image: "img".into(),
            version,
            layers,
            boot_tries: 3,
        })
    }
}

impl ImageSource for FakeImages {
    fn chain_for(&self, role: &str, node: &NodeRecord) -> Result<Option<ImageChain>, FleetError> {
        self.chain(role, self.versions, node).map(Some)
    }
    fn chain_at(
        &self,
        role: &str,
        v: &VersionRef,
        node: &NodeRecord,
    ) -> Result<Option<ImageChain>, FleetError> {
        if v.image != "img" || v.version == 0 || v.version > self.versions {
            return Ok(None);
        }
        self.chain(role, v.version, node).map(Some)
    }
    fn versions(&self) -> Result<Vec<ImageInfo>, FleetError> {
        Ok((1..=self.versions)
            .map(|v| ImageInfo {
                image: "img".into(),
                version: v,
                roles: vec![],
                created: 0,
            })
            .collect())
    }
    fn layer_path(&self, id: &LayerId) -> Option<PathBuf> {
        let path = self.dir.join(id.to_hex());
        path.is_file().then_some(path)
    }
}

/// The fixed server key of the tests.
pub fn key() -> SigningKey {
    SigningKey::from_bytes(&[7; 32])
}

/// Options for fast tests: 50 ms flushes and driver ticks, 1 s leases.
pub fn fast_options() -> Options {
    let mut o = Options::new("web");
    o.flush_every = Duration::from_millis(50);
    o.driver.tick = Duration::from_millis(50);
    o.driver.lease_ttl = Duration::from_millis(1000);
    o
}

/// An in-process server.
pub struct Server {
    pub url: String,
    pub admin: String,
    pub data_dir: PathBuf,
    shutdown: CancellationToken,
    task: Option<tokio::task::JoinHandle<()>>,
}

impl Server {
    /// Starts on `data_dir` (created if needed).
    pub async fn start(data_dir: &Path) -> Result<Server> {
        std::fs::create_dir_all(data_dir)?;
        let orch = Orchestrator::open(
            data_dir,
            key(),
            Arc::new(FakeImages {
                versions: 3,
                dir: data_dir.join("fake-layers"),
            }),
            fast_options(),
        )
        .await?;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let url = format!("http://{}", listener.local_addr()?);
        let shutdown = CancellationToken::new();
        let token = shutdown.clone();
        let task = tokio::spawn(async move {
            if let Err(e) = orch.serve(listener, token).await {
                eprintln!("server stopped: {e}");
            }
        });
        let admin = std::fs::read_to_string(data_dir.join("admin.token"))?
            .trim()
            .to_owned();
        Ok(Server {
            url,
            admin,
            data_dir: data_dir.to_owned(),
            shutdown,
            task: Some(task),
        })
    }

    /// Stops it (graceful: flushes).
    pub async fn stop(mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.task.take() {
            let _ = t.await;
        }
    }

    pub fn api(&self) -> Api {
        Api::new(&self.url, Some(&self.admin))
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.shutdown.cancel();
    }
}

/// A small API client.
#[derive(Clone)]
pub struct Api {
    pub url: String,
    pub token: Option<String>,
    client: reqwest::Client,
}

impl Api {
    pub fn new(url: &str, token: Option<&str>) -> Api {
        Api {
            url: url.to_owned(),
            token: token.map(str::to_owned),
            client: reqwest::Client::new(),
        }
    }

    pub fn with_token(&self, token: Option<&str>) -> Api {
        Api {
            token: token.map(str::to_owned),
            ..self.clone()
        }
    }

    /// Any request; returns the status and the JSON body (Null if none).
    pub async fn raw(
        &self,
        method: &str,
        path: &str,
        body: Option<Vec<u8>>,
    ) -> Result<(u16, Value)> {
        let m = reqwest::Method::from_bytes(method.as_bytes())?;
        let mut req = self
            .client
            .request(m, format!("{}{path}", self.url))
            .timeout(Duration::from_secs(20));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        if let Some(b) = body {
            req = req.header("content-type", "application/json").body(b);
        }
        let resp = req
            .send()
            .await
            .with_context(|| format!("{method} {path}"))?;
        let status = resp.status().as_u16();
        let bytes = resp.bytes().await?;
        let v = if bytes.is_empty() {
            Value::Null
        } else {
            serde_json::from_slice(&bytes)
                .unwrap_or(Value::String(String::from_utf8_lossy(&bytes).into_owned()))
        };
        Ok((status, v))
    }

    pub async fn call(
        &self,
        method: &str,
        path: &str,
        body: Option<Value>,
    ) -> Result<(u16, Value)> {
        self.raw(method, path, body.map(|b| b.to_string().into_bytes()))
            .await
    }

    /// A request that must succeed.
    pub async fn ok(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value> {
        let (s, v) = self.call(method, path, body).await?;
        if !(200..300).contains(&s) {
            bail!("{method} {path}: HTTP {s}: {v}");
        }
        Ok(v)
    }

    /// Plans, approves and applies a rollout; returns its id.
    pub async fn start_rollout(&self, spec: Value) -> Result<u64> {
        let r = self.ok("POST", "/api/v1/rollouts", Some(spec)).await?;
        let id = r["id"].as_u64().context("rollout id")?;
        let digest = r["digest"].clone();
        self.ok(
            "POST",
            &format!("/api/v1/rollouts/{id}/approve"),
            Some(json!({ "digest": digest })),
        )
        .await?;
        self.ok("POST", &format!("/api/v1/rollouts/{id}/apply"), None)
            .await?;
        Ok(id)
    }

    /// Waits until the rollout is in a final state (or `timeout`).
    pub async fn wait_final(&self, id: u64, timeout: Duration) -> Result<Value> {
        let deadline = tokio::time::Instant::now() + timeout;
        loop {
            let r = self
                .ok("GET", &format!("/api/v1/rollouts/{id}"), None)
                .await?;
            if matches!(
                r["state"].as_str(),
                Some("succeeded" | "halted" | "aborted")
            ) {
                return Ok(r);
            }
            if tokio::time::Instant::now() > deadline {
                bail!(
                    "rollout {id} not finished: {}",
                    serde_json::to_string_pretty(&r["progress"])?
                );
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    pub async fn events(&self, kind: &str) -> Result<Vec<Value>> {
        let v = self
            .ok(
                "GET",
                &format!("/api/v1/events?kind={kind}&limit=10000"),
                None,
            )
            .await?;
        Ok(v.as_array().cloned().unwrap_or_default())
    }
}

/// A simulated node.
pub struct Sim {
    pub mac: String,
    pub url: Arc<RwLock<String>>,
    pub token: Option<String>,
    /// Take the token from the node layer at each boot (node-init's behaviour; default).
    pub use_layer_token: bool,
    /// A version this node cannot boot (it rolls back by itself).
    pub fail: Option<u64>,
    pub running: u64,
    pub lkg: u64,
    pub seq: u64,
    pub acked: NodeStatus,
    pub status: NodeStatus,
    pub reboots: u32,
    client: reqwest::Client,
    cached: BTreeSet<LayerId>,
}

pub fn mac(i: usize) -> String {
    format!("52:54:00:00:{:02x}:{:02x}", i / 256, i % 256)
}

impl Sim {
    pub fn new(mac: &str, url: Arc<RwLock<String>>) -> Sim {
        Sim {
            mac: mac.to_owned(),
            url,
            token: None,
            use_layer_token: true,
            fail: None,
            running: 0,
            lkg: 0,
            seq: 0,
            acked: NodeStatus::default(),
            status: NodeStatus::default(),
            reboots: 0,
            client: reqwest::Client::new(),
            cached: BTreeSet::new(),
        }
    }

    fn base(&self) -> String {
        self.url.read().map(|u| u.clone()).unwrap_or_default()
    }

    pub async fn post_report(&mut self, report: &StateReport) -> Result<(u16, Value)> {
        let mut req = self
            .client
            .post(format!(
                "{}/api/v1/nodes/by-mac/{}/report",
                self.base(),
                self.mac
            ))
            .timeout(Duration::from_secs(10))
            .json(report);
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        let s = resp.status().as_u16();
        let v: Value = resp.json().await.unwrap_or(Value::Null);
        Ok((s, v))
    }

    /// Sends what changed (a heartbeat if nothing did), like node-init's reporter, and
    /// resends in full when the server asks.
    pub async fn report(&mut self) -> Result<ReportAck> {
        for _ in 0..2 {
            let report = StateReport {
                mac: self.mac.clone(),
                seq: self.seq + 1,
                base_seq: self.seq,
                delta: self.acked.diff(&self.status),
            };
            let (s, v) = self.post_report(&report).await?;
            if s != 200 {
                bail!("report {}: HTTP {s}: {v}", self.mac);
            }
            let ack: ReportAck = serde_json::from_value(v)?;
            if ack.resend_full {
                self.new_session();
                continue;
            }
            self.seq += 1;
            self.acked = self.status.clone();
            return Ok(ack);
        }
        bail!("server keeps asking {} for full reports", self.mac)
    }

    fn new_session(&mut self) {
        self.seq = 0;
        self.acked = NodeStatus::default();
    }

    pub async fn manifest(&self, version: Option<u64>) -> Result<Manifest> {
        let q = version.map(|v| format!("?version={v}")).unwrap_or_default();
        let mut req = self
            .client
            .get(format!(
                "{}/api/v1/nodes/by-mac/{}/manifest{q}",
                self.base(),
                self.mac
            ))
            .timeout(Duration::from_secs(10));
        if let Some(t) = &self.token {
            req = req.bearer_auth(t);
        }
        let resp = req.send().await?;
        if !resp.status().is_success() {
            bail!("manifest {}: HTTP {}", self.mac, resp.status());
        }
        let signed: SignedManifest = resp.json().await?;
        let vk: VerifyingKey = key().verifying_key();
        Ok(signed.verify(&vk)?)
    }

    fn cache(&mut self, m: &Manifest) {
        self.cached.extend(m.layers.iter().map(|l| l.id));
        self.status.cached_layers = self.cached.iter().copied().collect();
    }

    /// The token the node layer of `m` carries (node-init reads `/etc/strata/token` of the
    /// mounted root): downloads the layer.
    pub async fn layer_token(&self, m: &Manifest) -> Result<String> {
        let node = m
            .layers
            .iter()
            .find(|l| l.kind == LayerKind::Node)
            .context("no node layer")?;
        let resp = self
            .client
            .get(format!("{}{}", self.base(), node.url))
            .timeout(Duration::from_secs(10))
            .send()
            .await?;
        if !resp.status().is_success() {
            bail!("node layer {}: HTTP {}", node.id, resp.status());
        }
        Ok(resp.text().await?.trim().to_owned())
    }

    /// First boot: fetch the assignment, boot it, report healthy.
    pub async fn boot(&mut self) -> Result<()> {
        self.new_session();
        let m = self.manifest(None).await?;
        self.cache(&m);
        self.status.state = NodeState::Fetching;
        self.status.role = Some(m.role.clone());
        self.status.version = Some(m.version);
        if let Err(e) = self.report().await {
            // A token the server no longer accepts (revoked): logged, not fatal (node-init).
            if self.token.is_none() {
                return Err(e);
            }
        }
        if self.use_layer_token {
            // The root is mounted: from now on the node has its layer's token.
            self.token = Some(self.layer_token(&m).await?);
        }
        if self.fail == Some(m.version) && self.lkg != 0 {
            // Boot counting ran out: node-init boots the last known good version.
            self.status.state = NodeState::RolledBack;
            self.status.version = Some(self.lkg);
            self.status.boot_count = 3;
            self.report().await?;
            self.running = self.lkg;
        } else {
            self.status.state = NodeState::Booted;
            self.report().await?;
            self.running = m.version;
            self.lkg = m.version;
            self.status.last_known_good = Some(m.version);
            self.status.boot_count = 0;
        }
        // The agent in the booted image: a new reporter session.
        self.new_session();
        self.status.state = NodeState::Healthy;
        self.status.version = Some(self.running);
        self.report().await?;
        Ok(())
    }

    /// One sync interval: report, then act on the server's answer.
    pub async fn tick(&mut self) -> Result<()> {
        let ack = self.report().await?;
        if let Some(v) = ack.stage {
            let m = self.manifest(Some(v)).await?;
            self.cache(&m);
            self.report().await?;
        }
        if ack.reboot {
            self.reboots += 1;
            self.boot().await?;
        }
        Ok(())
    }
}

/// Runs `sims` (each booted once) until `stop` is cancelled; returns them.
pub fn run_fleet(
    sims: Vec<Sim>,
    every: Duration,
    stop: CancellationToken,
) -> tokio::task::JoinHandle<Vec<Sim>> {
    tokio::spawn(async move {
        let mut tasks = Vec::new();
        for mut s in sims {
            let stop = stop.clone();
            tasks.push(tokio::spawn(async move {
                while !stop.is_cancelled() {
                    if s.running == 0 {
                        let _ = s.boot().await;
                    } else if let Err(e) = s.tick().await {
                        // A server restart or takeover: keep trying, like node-init.
                        let _ = e;
                    }
                    tokio::select! {
                        _ = stop.cancelled() => {}
                        _ = tokio::time::sleep(every) => {}
                    }
                }
                s
            }));
        }
        let mut out = Vec::new();
        for t in tasks {
            if let Ok(s) = t.await {
                out.push(s);
            }
        }
        out
    })
}

/// Creates roles (name, order) at `img@1` and places `counts` nodes in them (booted once).
pub async fn setup_fleet(
    api: &Api,
    url: Arc<RwLock<String>>,
    roles: &[(&str, i64, usize)],
) -> Result<Vec<Sim>> {
    setup_fleet_on(api, url, roles, "img", true).await
}

/// [`setup_fleet`] on `image@1`; `layer_tokens`: the sims take their token from their node
/// layer (the fake source's; a real server's node layers are VHDX files, read with debugfs
/// only in api.rs's real-server test).
pub async fn setup_fleet_on(
    api: &Api,
    url: Arc<RwLock<String>>,
    roles: &[(&str, i64, usize)],
    image: &str,
    layer_tokens: bool,
) -> Result<Vec<Sim>> {
    let mut sims = Vec::new();
    let mut i = 0;
    for (role, order, n) in roles {
        api.ok(
            "PUT",
            &format!("/api/v1/roles/{role}"),
            Some(json!({ "version": { "image": image, "version": 1 }, "order": order })),
        )
        .await?;
        for _ in 0..*n {
            let mut s = Sim::new(&mac(i), Arc::clone(&url));
            s.use_layer_token = layer_tokens;
            i += 1;
            s.boot().await?;
            api.ok(
                "PATCH",
                &format!("/api/v1/nodes/{}", s.mac),
                Some(json!({ "role": role })),
            )
            .await?;
            sims.push(s);
        }
    }
    // Reboot into the role's assignment so every node runs img@1 as role members.
    for s in &mut sims {
        s.boot().await?;
    }
    Ok(sims)
}
