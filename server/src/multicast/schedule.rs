//! Sessions scheduled by the server (docs/multicast.md, "Sessions scheduled by the server").
//!
//! When `strata serve` signs a node's manifest, [`Scheduler::offers`] offers a multicast
//! session for each layer of the configured kinds (the base, by default): the session for
//! that layer if one is waiting or sending, else a new one on a free group. A session starts
//! when `min_nodes` receivers wait on its group, when `max_wait_secs` have passed with at
//! least one, or on an operator's command ([`Scheduler::start`], `POST
//! /api/v1/multicast/sessions/{layer}/start`); with nobody waiting at the deadline it ends
//! without sending. Nodes hold the chunk hashes from the signed manifest, so no hash carousel
//! is sent. Each session runs on a blocking thread of the runtime; finished sessions are kept
//! (the last [`HISTORY`]) with their counters, for operators and tests.

use std::collections::{HashMap, VecDeque};
use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio_util::sync::CancellationToken;
use wire::chunk::LayerId;
use wire::manifest::{LayerKind, LayerRef, MulticastOffer, MAX_MULTICAST_WAIT};
use wire::multicast::packet::{Layout, DEFAULT_SYMBOL_SIZE};

use super::sender::{open_sender_socket, run_session, SenderControl, SocketOptions};
use super::session::{LayerInfo, SenderConfig};

/// Finished sessions remembered.
pub const HISTORY: usize = 64;
/// Network boots remembered (most recent per node; the oldest are forgotten beyond this).
pub const MAX_BOOTS: usize = 65_536;

/// `[multicast]`: sessions the server offers in manifests.
#[derive(Debug, Clone, Deserialize, Serialize, PartialEq, Eq)]
#[serde(deny_unknown_fields, default)]
pub struct MulticastConfig {
    /// Offer sessions at all.
    pub enabled: bool,
    /// Interface to send on (its address must reach the nodes; None: by route).
    pub interface: Option<String>,
    /// First group address; sessions use `group`, `group + 1`, ... (`groups` of them).
    pub group: Ipv4Addr,
    /// How many groups (concurrent sessions) at most.
    pub groups: u16,
    /// UDP port of every group.
    pub port: u16,
    /// Rate ceiling, bit/s of Ethernet frames.
    pub rate_bps: u64,
    /// Start a session as soon as this many nodes wait on it.
    pub min_nodes: usize,
    /// Start a session this long after it was first offered if at least one node waits
    /// (none: end it unsent).
    pub max_wait_secs: u64,
    /// How long a node waits for the session before fetching what is missing over HTTP
    /// (the offer's `wait_secs`).
    pub node_wait_secs: u32,
    /// Multicast TTL.
    pub ttl: u32,
    /// Which layers are offered.
    pub kinds: Vec<LayerKind>,
}

impl Default for MulticastConfig {
    fn default() -> Self {
        MulticastConfig {
            enabled: false,
            interface: None,
            group: Ipv4Addr::new(239, 255, 77, 1),
            groups: 16,
            port: 9300,
            rate_bps: 1_000_000_000,
            min_nodes: 2,
            max_wait_secs: 30,
            node_wait_secs: 300,
            ttl: 1,
            kinds: vec![LayerKind::Base],
        }
    }
}

impl MulticastConfig {
    /// Checks the values fit together (a message naming the key on error).
    pub fn validate(&self) -> Result<(), String> {
        if !self.enabled {
            return Ok(());
        }
        let first = u32::from(self.group);
        let last = first.checked_add(u32::from(self.groups).saturating_sub(1));
        let all_multicast = last.is_some_and(|l| Ipv4Addr::from(l).is_multicast());
        if !self.group.is_multicast() || self.groups == 0 || !all_multicast {
            return Err(format!(
                "multicast.group {} with multicast.groups {} must stay inside 224.0.0.0/4",
                self.group, self.groups
            ));
        }
        if self.port == 0 {
            return Err("multicast.port must not be 0".into());
        }
        if !(8_000..=100_000_000_000).contains(&self.rate_bps) {
            return Err("multicast.rate_bps must be 8000..=1e11".into());
        }
        if self.node_wait_secs == 0 || self.node_wait_secs > MAX_MULTICAST_WAIT {
            return Err(format!(
                "multicast.node_wait_secs must be 1..={MAX_MULTICAST_WAIT}"
            ));
        }
        Ok(())
    }
}

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SessionState {
    /// Announcing, waiting for nodes (or a deadline, or an operator).
    Waiting,
    /// Sending or repairing.
    Sending,
    /// Over (its counters are final).
    Finished,
    /// Ended by an error (socket or file).
    Failed,
}

/// Counters of a finished session.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionCounters {
    /// First-pass data packets (each symbol of the layer once).
    pub data_packets: u64,
    /// Repair data packets.
    pub repair_packets: u64,
    /// Symbols in the layer (what one whole pass sends).
    pub layer_symbols: u64,
    /// Ethernet frame bytes sent, all packets.
    pub frame_bytes: u64,
    /// `frame_bytes` per layer byte.
    pub wire_ratio: f64,
    /// Receivers that reported completion.
    pub receivers_done: u64,
    /// Receivers evicted as too slow (they fetch the rest over HTTP).
    pub receivers_evicted: u64,
    /// Milliseconds from the first data packet to the end.
    pub send_ms: u64,
}

/// A session as operators see it.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct SessionInfo {
    /// Serial number (per server run).
    pub id: u64,
    /// The layer sent.
    pub layer: LayerId,
    /// Its size in bytes.
    pub size: u64,
    /// Group and port.
    pub group: SocketAddrV4,
    /// State.
    pub state: SessionState,
    /// MACs of the nodes whose manifests offered it.
    pub offered_to: Vec<String>,
    /// Counters, once finished.
    pub counters: Option<SessionCounters>,
    /// Why it failed.
    pub error: Option<String>,
}

struct Live {
    info: SessionInfo,
    control: Arc<SenderControl>,
}

#[derive(Default)]
struct Inner {
    live: HashMap<LayerId, Live>,
    /// When each node last network-booted (its boot script), Unix ms.
    booted: HashMap<String, u64>,
    done: VecDeque<SessionInfo>,
    next_id: u64,
}

/// The server's multicast sessions.
pub struct Scheduler {
    cfg: MulticastConfig,
    inner: Mutex<Inner>,
    runtime: tokio::runtime::Handle,
}

impl Scheduler {
    /// A scheduler with `cfg` whose sessions run on `runtime`'s blocking threads.
    pub fn new(cfg: MulticastConfig, runtime: tokio::runtime::Handle) -> Arc<Self> {
        Arc::new(Scheduler {
            cfg,
            inner: Mutex::default(),
            runtime,
        })
    }

    fn lock(&self) -> MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Offers for `mac`'s manifest: for each layer of a configured kind (with its file on
    /// this server), the session for it, created on a free group if none is waiting or
    /// sending. A layer gets no offer when every group is busy or the socket cannot be set up
    /// (the node fetches it over HTTP).
    pub fn offers(
        self: &Arc<Self>,
        mac: &str,
        layers: &[(LayerRef, PathBuf)],
    ) -> Vec<MulticastOffer> {
        if !self.cfg.enabled {
            return Vec::new();
        }
        let mut out = Vec::new();
        for (l, path) in layers {
            if !self.cfg.kinds.contains(&l.kind) {
                continue;
            }
            if let Some(group) = self.session_for(mac, l, path) {
                out.push(MulticastOffer {
                    layer: l.id,
                    group,
                    wait_secs: self.cfg.node_wait_secs,
                });
            }
        }
        out
    }

    fn session_for(
        self: &Arc<Self>,
        mac: &str,
        l: &LayerRef,
        path: &std::path::Path,
    ) -> Option<SocketAddrV4> {
        let mut inner = self.lock();
        if let Some(live) = inner.live.get_mut(&l.id) {
            if !live.info.offered_to.iter().any(|m| m == mac) {
                live.info.offered_to.push(mac.to_owned());
            }
            return Some(live.info.group);
        }
        let used: Vec<SocketAddrV4> = inner.live.values().map(|s| s.info.group).collect();
        let group = (0..u32::from(self.cfg.groups))
            .map(|i| {
                SocketAddrV4::new(
                    Ipv4Addr::from(u32::from(self.cfg.group).wrapping_add(i)),
                    self.cfg.port,
                )
            })
            .find(|g| !used.contains(g))?;
        let layout = match Layout::new(l.size, l.chunk_size, DEFAULT_SYMBOL_SIZE) {
            Ok(y) => y,
            Err(e) => {
                tracing::warn!(layer = %l.id, error = %e, "layer cannot be sent by multicast");
                return None;
            }
        };
        let opts = SocketOptions {
            iface: self.cfg.interface.clone(),
            ttl: Some(self.cfg.ttl),
            loopback: false,
        };
        let sock = match open_sender_socket(group, &opts) {
            Ok(s) => s,
            Err(e) => {
                tracing::error!(%group, error = %e, "multicast session socket");
                return None;
            }
        };
        let info = LayerInfo {
            id: l.id,
            layout,
            chunks: l.chunks.clone(),
        };
        let cfg = SenderConfig {
            rate_bps: self.cfg.rate_bps,
            min_receivers: self.cfg.min_nodes.max(1),
            max_wait: Some(Duration::from_secs(self.cfg.max_wait_secs)),
            skip_if_nobody: true,
            hash_carousel: false,
            ..SenderConfig::default()
        };
        inner.next_id += 1;
        let id = inner.next_id;
        let control = SenderControl::new();
        inner.live.insert(
            l.id,
            Live {
                info: SessionInfo {
                    id,
                    layer: l.id,
                    size: l.size,
                    group,
                    state: SessionState::Waiting,
                    offered_to: vec![mac.to_owned()],
                    counters: None,
                    error: None,
                },
                control: Arc::clone(&control),
            },
        );
        drop(inner);
        tracing::info!(session = id, layer = %l.id, %group, "multicast session offered");
        let me = Arc::clone(self);
        let (layer, path) = (l.id, path.to_owned());
        self.runtime.spawn_blocking(move || {
            let result = run_session(&sock, group, &path, info, cfg, &control);
            me.finish(layer, result);
        });
        Some(group)
    }

    fn finish(&self, layer: LayerId, result: Result<super::SendReport, super::SendError>) {
        let mut inner = self.lock();
        let Some(live) = inner.live.remove(&layer) else {
            return;
        };
        let mut info = live.info;
        match result {
            Ok(r) => {
                let st = &r.stats;
                info.state = SessionState::Finished;
                info.counters = Some(SessionCounters {
                    data_packets: st.data_packets,
                    repair_packets: st.repair_packets,
                    layer_symbols: (0..r.layer.layout.chunks())
                        .map(|c| u64::from(r.layer.layout.symbols_in(c as u32)))
                        .sum(),
                    frame_bytes: st.frame_bytes,
                    wire_ratio: r.wire_ratio(),
                    receivers_done: st.receivers_done,
                    receivers_evicted: st.receivers_evicted,
                    send_ms: u64::try_from(st.send_time.as_millis()).unwrap_or(u64::MAX),
                });
                tracing::info!(session = info.id, layer = %layer, counters = ?info.counters, "multicast session finished");
            }
            Err(e) => {
                info.state = SessionState::Failed;
                info.error = Some(format!("{e:#}"));
                tracing::error!(session = info.id, layer = %layer, error = %e, "multicast session failed");
            }
        }
        if inner.done.len() >= HISTORY {
            inner.done.pop_front();
        }
        inner.done.push_back(info);
    }

    /// A node network-booted (it fetched its iPXE boot script).
    pub fn node_booting(&self, mac: &str, now_ms: u64) {
        let mut inner = self.lock();
        if inner.booted.len() >= MAX_BOOTS && !inner.booted.contains_key(mac) {
            if let Some(oldest) = inner
                .booted
                .iter()
                .min_by_key(|(_, t)| **t)
                .map(|(m, _)| m.clone())
            {
                inner.booted.remove(&oldest);
            }
        }
        inner.booted.insert(mac.to_owned(), now_ms);
    }

    /// When `mac` last network-booted (Unix ms), if this server saw it.
    pub fn netbooted_at(&self, mac: &str) -> Option<u64> {
        self.lock().booted.get(mac).copied()
    }

    /// Every live session, then the finished ones (oldest first).
    pub fn sessions(&self) -> Vec<SessionInfo> {
        let inner = self.lock();
        let mut live: Vec<SessionInfo> = inner
            .live
            .values()
            .map(|l| {
                let mut i = l.info.clone();
                if l.control.is_sending() {
                    i.state = SessionState::Sending;
                }
                i
            })
            .collect();
        live.sort_by_key(|i| i.id);
        live.extend(inner.done.iter().cloned());
        live
    }

    /// An operator's "start now" for the live session of `layer`; false if there is none.
    pub fn start(&self, layer: &LayerId) -> bool {
        match self.lock().live.get(layer) {
            Some(l) => {
                l.control.start_now();
                true
            }
            None => false,
        }
    }

    /// The service: on cancellation, ends every live session and waits (at most 5 s) for
    /// them to announce their end.
    pub async fn run(
        self: Arc<Self>,
        token: CancellationToken,
    ) -> Result<(), std::convert::Infallible> {
        token.cancelled().await;
        for l in self.lock().live.values() {
            l.control.cancel();
        }
        for _ in 0..50 {
            if self.lock().live.is_empty() {
                break;
            }
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_defaults_validate_and_bad_groups_are_refused() {
        let mut c = MulticastConfig {
            enabled: true,
            ..MulticastConfig::default()
        };
        assert_eq!(c.validate(), Ok(()));
        c.group = Ipv4Addr::new(239, 255, 255, 250);
        c.groups = 16;
        assert!(c.validate().unwrap_err().contains("224.0.0.0/4"));
        c.group = Ipv4Addr::new(10, 0, 0, 1);
        assert!(c.validate().is_err());
        let c = MulticastConfig {
            enabled: true,
            node_wait_secs: 0,
            ..MulticastConfig::default()
        };
        assert!(c.validate().is_err());
        let parsed: MulticastConfig = toml::from_str(
            "enabled = true\ninterface = \"br0\"\nmin_nodes = 3\nkinds = [\"base\", \"role\"]\n",
        )
        .unwrap();
        assert_eq!(parsed.kinds, vec![LayerKind::Base, LayerKind::Role]);
        assert_eq!(parsed.port, 9300);
    }
}
