//! Agent mode: the same binary, run inside the booted image as `/run/strata/node-init agent
//! <command>` (node-init leaves a copy of itself, the server key and `boot.json` in
//! /run/strata, and the cache mounted at /run/strata/cache).
//!
//! - `confirm`: the image is healthy: the running version becomes last known good.
//! - `stage [version]`: ask the server for this node's assignment (or that version of it); if
//!   it names another version, download and verify its layers into the cache now. It
//!   becomes active at the next boot.
//! - `verify`: re-hash every cached layer of the running version; report drift.
//! - `run [interval-secs]`: confirm, then every interval (default: `strata.agent=` from
//!   `boot.json`, else 60 s) stage and report (deltas; an empty delta is the heartbeat), and
//!   re-verify the running layers every [`VERIFY_EVERY`],
//!   acting on the server's answer: `stage` (download that version), `repair` (re-fetch
//!   damaged chunks of those layers), `reboot` (sync and reboot into the assigned version).
//!
//! Every API call carries `Authorization: Bearer <token>` when the node has a token: the
//! image's `/etc/strata/token` (its node layer), else the copy node-init kept in the cache. A
//! report the server refuses (401/403) is logged and the loop goes on.
//!
//! Markers: `STRATA agent=confirmed ...`, `STRATA agent=staged ...`, `STRATA agent=drift ...`,
//! `STRATA agent=repaired ...`, `STRATA agent=reboot ...`.

use std::net::SocketAddr;
use std::path::Path;
use std::time::{Duration, Instant};

use wire::report::{NodeState, NodeStatus};

use crate::boot::{self, BootInfo, InitError, CACHE_MOUNT, RUN_DIR};
use crate::bootcount::{self, Entry};
use crate::cache::Cache;
use crate::fetch;
use crate::http::Client;
use crate::report::Reporter;
use crate::{info, marker};

/// An agent failure.
#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    /// Missing /run/strata files (not started by node-init?).
    #[error("{path}: {source}")]
    Setup {
        /// The file.
        path: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
    /// The running version is not the cache's current one.
    #[error("running version {0} is not the cache's current version")]
    NotCurrent(u64),
    /// A boot-flow step failed.
    #[error(transparent)]
    Boot(#[from] InitError),
    /// Usage.
    #[error("usage: node-init agent confirm|stage|verify|run [interval-secs]")]
    Usage,
}

struct Ctx {
    info: BootInfo,
    cache: Cache,
    key: ed25519_dalek::VerifyingKey,
    /// One client for the agent's life: it remembers whether the server takes the token.
    client: Option<Client>,
    /// node-init's reporter as it left it (the report session goes on).
    reporter: Option<Reporter>,
}

fn setup(run: &Path, image_root: Option<&Path>) -> Result<Ctx, AgentError> {
    let read = |name: &str| {
        let p = run.join(name);
        std::fs::read(&p).map_err(|source| AgentError::Setup {
            path: p.display().to_string(),
            source,
        })
    };
    let info: BootInfo =
        serde_json::from_slice(&read("boot.json")?).map_err(|e| AgentError::Setup {
            path: "boot.json".into(),
            source: std::io::Error::other(e),
        })?;
    let key_text = String::from_utf8_lossy(&read("server.pub")?).into_owned();
    let key = wire::manifest::parse_verifying_key(&key_text)
        .map_err(|e| AgentError::Boot(InitError::Key(e.to_string())))?;
    let cache = Cache::open(&run.join("cache")).map_err(|e| AgentError::Boot(e.into()))?;
    let token = image_root
        .and_then(|r| std::fs::read_to_string(r.join(boot::NODE_TOKEN)).ok())
        .and_then(|t| crate::http::parse_token(&t))
        .or_else(|| cache.load_token());
    let client = info
        .server
        .map(|a| Client::new(a).with_token(token.as_deref()));
    // The session node-init opened this boot, if it is this node's.
    let reporter = std::fs::read(run.join(boot::REPORTER_FILE))
        .ok()
        .and_then(|b| serde_json::from_slice::<Reporter>(&b).ok())
        .filter(|r| r.mac == info.mac);
    Ok(Ctx {
        info,
        cache,
        key,
        client,
        reporter,
    })
}

/// Runs an agent command; `args` excludes `agent`.
pub fn main(args: &[String]) -> Result<(), AgentError> {
    debug_assert!(Path::new(CACHE_MOUNT).starts_with(RUN_DIR));
    main_with(Path::new(RUN_DIR), Some(Path::new("/")), args)
}

/// Runs an agent command with the files node-init left in `run` (`boot.json`, `server.pub`,
/// the cache in `cache/`); the token comes from the cache's copy.
pub fn main_in(run: &Path, args: &[String]) -> Result<(), AgentError> {
    main_with(run, None, args)
}

/// [`main_in`], reading the node token from `<image_root>/etc/strata/token` first.
pub fn main_with(run: &Path, image_root: Option<&Path>, args: &[String]) -> Result<(), AgentError> {
    let ctx = setup(run, image_root)?;
    match args.first().map(String::as_str) {
        Some("confirm") => confirm(&ctx),
        Some("stage") => {
            let v = args.get(1).and_then(|s| s.parse().ok());
            stage(&ctx, v).map(|_| ())
        }
        Some("verify") => verify(&ctx, true).map(|_| ()),
        Some("run") => {
            let secs = args
                .get(1)
                .and_then(|s| s.parse().ok())
                .or(ctx.info.agent_interval)
                .unwrap_or(60u64);
            run_loop(&ctx, Duration::from_secs(secs.max(1)))
        }
        _ => Err(AgentError::Usage),
    }
}

fn confirm(ctx: &Ctx) -> Result<(), AgentError> {
    let mut state = ctx.cache.load_state();
    if !bootcount::confirm(&mut state, &ctx.info.entry) {
        return Err(AgentError::NotCurrent(ctx.info.entry.version));
    }
    ctx.cache
        .save_state(&state)
        .map_err(|e| AgentError::Boot(e.into()))?;
    crate::sys::process::sync();
    marker!(
        "agent=confirmed version={} role={}",
        ctx.info.entry.version,
        ctx.info.entry.role
    );
    Ok(())
}

fn client(ctx: &Ctx) -> Option<Client> {
    ctx.client.clone()
}

/// Stages the server's assignment (or, with `version`, that version of the node's image,
/// as a report answer's `stage` asks); returns the staged entry if it differs from the
/// running one.
fn stage(ctx: &Ctx, version: Option<u64>) -> Result<Option<Entry>, AgentError> {
    let Some(c) = client(ctx) else {
        return Ok(None);
    };
    let fetched = match version {
        None => boot::fetch_manifest(&c, &ctx.info.mac, &ctx.key)?,
        Some(v) => boot::fetch_manifest_version(&c, &ctx.info.mac, &ctx.key, v)?,
    };
    let Some((signed, m)) = fetched else {
        info!("agent: server unreachable, nothing staged");
        return Ok(None);
    };
    let entry = Entry::of(&m);
    if entry == ctx.info.entry {
        return Ok(None);
    }
    // A version that ran out of tries here is not staged again (node-init will not boot it
    // while the server keeps offering it), and one already cached needs nothing.
    let ids = |m: &wire::manifest::Manifest| m.layers.iter().map(|l| l.id).collect::<Vec<_>>();
    let cached = m.layers.iter().all(|l| ctx.cache.has_layer(l))
        && ctx
            .cache
            .load_manifest(&entry, &ctx.key)
            .is_ok_and(|old| ids(&old) == ids(&m));
    if cached || ctx.cache.load_state().failed.contains(&entry) {
        return Ok(None);
    }
    ctx.cache
        .store_manifest(&entry, &signed)
        .map_err(|e| AgentError::Boot(e.into()))?;
    let (bytes, _) = boot::ensure_layers(&ctx.cache, Some(&c), &m)?;
    marker!(
        "agent=staged version={} role={} bytes={}",
        entry.version,
        entry.role,
        bytes
    );
    Ok(Some(entry))
}

/// Re-fetches the damaged chunks of the listed layers of the running version.
fn repair(ctx: &Ctx, ids: &[wire::LayerId]) -> Result<(), AgentError> {
    let Some(c) = client(ctx) else { return Ok(()) };
    let m = ctx
        .cache
        .load_manifest(&ctx.info.entry, &ctx.key)
        .map_err(|e| AgentError::Boot(e.into()))?;
    for l in m.layers.iter().filter(|l| ids.contains(&l.id)) {
        let bad = ctx
            .cache
            .verify_layer(l)
            .map_err(|e| AgentError::Boot(e.into()))?;
        if bad.is_empty() {
            continue;
        }
        let bytes = fetch::repair_chunks(&c, &ctx.cache, l, &bad)
            .map_err(|e| AgentError::Boot(e.into()))?;
        marker!(
            "agent=repaired layer={} chunks={} bytes={bytes}",
            l.id,
            bad.len()
        );
    }
    Ok(())
}

/// Re-verifies the running version's layers; returns the drifted ones.
fn verify(ctx: &Ctx, announce_clean: bool) -> Result<Vec<wire::LayerId>, AgentError> {
    let m = ctx
        .cache
        .load_manifest(&ctx.info.entry, &ctx.key)
        .map_err(|e| AgentError::Boot(e.into()))?;
    let mut drift = Vec::new();
    for l in &m.layers {
        let bad = ctx
            .cache
            .verify_layer(l)
            .map_err(|e| AgentError::Boot(e.into()))?;
        if !bad.is_empty() {
            marker!("agent=drift layer={} chunks={}", l.id, bad.len());
            drift.push(l.id);
        }
    }
    if drift.is_empty() && announce_clean {
        marker!("agent=verified layers={}", m.layers.len());
    }
    Ok(drift)
}

/// How often `agent run` re-hashes the running version's layers (drift check).
pub const VERIFY_EVERY: Duration = Duration::from_secs(300);

fn run_loop(ctx: &Ctx, every: Duration) -> Result<(), AgentError> {
    confirm(ctx)?;
    let mut reporter = ctx
        .reporter
        .clone()
        .unwrap_or_else(|| Reporter::new(&ctx.info.mac));
    let mut stage_version: Option<u64> = None;
    let mut message = None;
    let mut drift = Vec::new();
    let mut last_verify = None;
    loop {
        match stage(ctx, stage_version) {
            Ok(Some(e)) => message = Some(format!("staged version {}", e.version)),
            Ok(None) => {}
            Err(e) => info!("agent: staging failed: {}", fetch::chain(&e)),
        }
        // Re-hashing the running chain costs CPU the image wants: at start, then every
        // VERIFY_EVERY (or every interval if that is longer), and after a repair.
        if last_verify.is_none_or(|t: Instant| t.elapsed() >= VERIFY_EVERY.max(every)) {
            let announce = last_verify.is_none() || !drift.is_empty();
            drift = verify(ctx, announce).unwrap_or_default();
            last_verify = Some(Instant::now());
        }
        let state = ctx.cache.load_state();
        let status = NodeStatus {
            state: NodeState::Healthy,
            role: Some(ctx.info.entry.role.clone()),
            version: Some(ctx.info.entry.version),
            last_known_good: state.last_known_good.as_ref().map(|e| e.version),
            boot_count: state.boot_count,
            cached_layers: ctx.cache.cached_layers(),
            drift: drift.clone(),
            message: message.clone(),
        };
        let ack = client(ctx).and_then(|c| reporter.send(&c, &status));
        if let Some(ack) = ack {
            if ack.stage.is_some() || ack.reboot || !ack.repair.is_empty() {
                info!(
                    "agent: the server asks: stage={:?} reboot={} repair={}",
                    ack.stage,
                    ack.reboot,
                    ack.repair.len()
                );
            }
            stage_version = ack.stage;
            if !ack.repair.is_empty() {
                if let Err(e) = repair(ctx, &ack.repair) {
                    info!("agent: repair failed: {}", fetch::chain(&e));
                }
                last_verify = None;
            }
            if ack.reboot {
                marker!("agent=reboot version={}", ctx.info.entry.version);
                // The image's root is a throw-away snapshot; reboot() syncs the cache. The
                // image's own shutdown does not run, so take the NICs down first as it would
                // (once, under TCG, a virtio-net receive softirq spun through the kernel's
                // restart path for minutes).
                for (name, _) in crate::net::interfaces() {
                    if name != "lo" {
                        let _ = crate::sys::netif::set_down(&name);
                    }
                }
                let e = crate::sys::process::reboot();
                info!("agent: reboot refused: {e}");
            }
        }
        std::thread::sleep(every);
    }
}

/// The server address an agent would use (for tests).
pub fn server_of(info: &BootInfo) -> Option<SocketAddr> {
    info.server
}
