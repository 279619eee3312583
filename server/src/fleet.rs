//! The nodes the server knows, what each boots, the signed manifests that tell them, and the
//! state reports they send.
//!
//! A node is known by its MAC. One seen for the first time (iPXE asking for its script,
//! node-init asking for its manifest or reporting) is recorded as discovered with the default
//! role. Its manifest names the chain of the version it is assigned (an explicit pin, its
//! site's override of its role, or its role's version; a role without a version boots the
//! store's newest image for the role), plus its own node layer where the image source builds
//! one; it is signed with the server key node-init trusts.
//!
//! Nodes live in the orchestrator's SQLite database (`db::nodes`). Fast-moving facts (last
//! seen, layer bytes, reports) are kept in memory and written in batches by [`Fleet::flush`],
//! which [`Fleet::run_flusher`] calls every flush interval: SQLite sees one transaction per
//! interval however many nodes report. Desired-state changes (assignments, stage and reboot
//! requests) are written to the database at once by whoever makes them and picked up by every
//! server process sharing the file through the nodes' `rev` counter. A crash loses at most one
//! interval of facts; nodes then get `resend_full` and send their whole status again.

use std::collections::{HashMap, HashSet};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio_util::sync::CancellationToken;
use wire::manifest::{LayerRef, Manifest, SignedManifest};
use wire::report::{NodeState, ReportAck, StateReport};
use wire::LayerId;

use crate::db::events::NewEvent;
use crate::db::nodes::{Facts, NodeRow};
use crate::db::{now_ms, Db, DbError};
use crate::orchestrator::state::{self, Outcome};
use crate::orchestrator::VersionRef;

/// Errors the fleet reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The role has no image to boot.
    #[error("role {role:?} has no image")]
    NoImage {
        /// The role.
        role: String,
    },
    /// A manifest for a version the node is neither assigned nor staging.
    #[error("version {version} is not assigned to or staged on node {mac}")]
    NotAssigned {
        /// Node.
        mac: String,
        /// Version asked for.
        version: u64,
    },
    /// A report breaking the node state machine (rejected and recorded).
    #[error("illegal transition {from:?} -> {to:?}")]
    IllegalTransition {
        /// State held.
        from: NodeState,
        /// State reported.
        to: NodeState,
    },
    /// A report naming another MAC than its URL.
    #[error("report for {body} sent to the route of {path}")]
    MacMismatch {
        /// MAC in the URL.
        path: String,
        /// MAC in the body.
        body: String,
    },
    /// The database failed.
    #[error("database")]
    Db(#[from] DbError),
    /// Our own fault (store, catalog); details for the log.
    #[error("{0}")]
    Internal(String),
}

/// A node as the image source sees it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeRecord {
    /// Canonical MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Name (derived from the MAC until an operator names it).
    pub name: String,
    /// Role it boots.
    pub role: String,
    /// Site, if any.
    pub site: Option<String>,
    /// Unix seconds first seen.
    pub first_seen: u64,
    /// Unix seconds of the last request.
    pub last_seen: u64,
    /// Layer bytes sent to it over HTTP.
    pub layer_bytes_sent: u64,
    /// The last state report it sent.
    pub last_report: Option<serde_json::Value>,
    /// The token its node layer carries in `/etc/strata/token` (an API node token scoped to
    /// this node, `db::tokens::layer_token`). Set when the fleet asks for its chain; `None`
    /// elsewhere (the iPXE script needs none). Never serialised.
    #[serde(skip)]
    pub token: Option<String>,
}

/// The chain a role's node boots.
#[derive(Debug, Clone)]
pub struct ImageChain {
    /// Image name.
    pub image: String,
    /// Version of the role's image.
    pub version: u64,
    /// Layers, base first. Their `url` is a path on this server.
    pub layers: Vec<LayerRef>,
    /// How many boots a new version gets before node-init rolls back.
    pub boot_tries: u32,
}

/// The kernel a node's version records, with node-init's modules for it (docs/images.md,
/// "Kernel and modules"): what its iPXE script boots.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootKernel {
    /// Image name.
    pub image: String,
    /// Version.
    pub version: u64,
    /// Kernel release (`uname -r`).
    pub release: String,
    /// The kernel blob.
    pub kernel: wire::chunk::Digest,
    /// The module archive blob and its file; `None` for versions built before Strata
    /// recorded one.
    pub modules: Option<(wire::chunk::Digest, PathBuf)>,
}

/// An image version the store holds, for listings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageInfo {
    /// Image name.
    pub image: String,
    /// Version.
    pub version: u64,
    /// Roles built on it.
    pub roles: Vec<String>,
    /// Unix seconds.
    pub created: u64,
}

/// Where images come from: the image store and builder.
pub trait ImageSource: Send + Sync + 'static {
    /// The newest chain a node of `role` boots (including its node layer where the source
    /// builds one), or `None` if the role has no image. May block (store I/O).
    fn chain_for(&self, role: &str, node: &NodeRecord) -> Result<Option<ImageChain>, FleetError>;
    /// The chain of `role` in one image version (for the node's site where the source has a
    /// site variant). The default serves only the newest version. May block.
    fn chain_at(
        &self,
        role: &str,
        version: &VersionRef,
        node: &NodeRecord,
    ) -> Result<Option<ImageChain>, FleetError> {
        Ok(self
            .chain_for(role, node)?
            .filter(|c| c.image == version.image && c.version == version.version))
    }
    /// Image versions, for listings. May block.
    fn versions(&self) -> Result<Vec<ImageInfo>, FleetError> {
        Ok(Vec::new())
    }
    /// The file holding a published layer, if the store has it. May block.
    fn layer_path(&self, id: &LayerId) -> Option<PathBuf>;
    /// The kernel recorded with the version a node of `role` boots: `version`, or with `None`
    /// the one [`ImageSource::chain_for`] picks (the same version its manifest names). `None`
    /// if that version records no kernel, or the source keeps none. May block.
    fn boot_kernel(
        &self,
        role: &str,
        version: Option<&VersionRef>,
        node: &NodeRecord,
    ) -> Result<Option<BootKernel>, FleetError> {
        let _ = (role, version, node);
        Ok(None)
    }
    /// The file of a stored blob of `kind` (`kernel`, `modules`), if the source has it. May
    /// block.
    fn blob_path(&self, id: &wire::chunk::Digest, kind: &str) -> Option<PathBuf> {
        let _ = (id, kind);
        None
    }
}

#[derive(Debug, Clone)]
struct LiveNode {
    row: NodeRow,
    report_dirty: bool,
    staged_dirty: bool,
    seen_dirty: bool,
    bytes: u64,
    /// Layers of the stage target, once looked up.
    stage_layers: Option<(VersionRef, Vec<LayerId>)>,
}

#[derive(Default)]
struct Live {
    nodes: HashMap<String, LiveNode>,
    events: Vec<NewEvent>,
    rev: u64,
    enrolled: HashSet<String>,
    /// Node tokens this process has recorded as used.
    used_tokens: HashSet<u64>,
}

/// Nodes, their assignments and manifests, and their reports.
pub struct Fleet {
    key: SigningKey,
    images: Arc<dyn ImageSource>,
    default_role: String,
    db: Db,
    live: Mutex<Live>,
    multicast: std::sync::OnceLock<Arc<crate::multicast::Scheduler>>,
}

/// Counters of one flush, for logs and benchmarks.
#[derive(Debug, Clone, Copy, Default)]
pub struct FlushStats {
    /// Nodes written.
    pub nodes: usize,
    /// Events written.
    pub events: usize,
    /// Desired-state rows picked up.
    pub refreshed: usize,
}

fn record_of(r: &NodeRow) -> NodeRecord {
    NodeRecord {
        mac: r.mac.clone(),
        name: r.name.clone(),
        role: r.role.clone(),
        site: r.site.clone(),
        first_seen: r.first_seen_ms / 1000,
        last_seen: r.last_seen_ms / 1000,
        layer_bytes_sent: r.layer_bytes,
        last_report: serde_json::to_value(&r.status).ok(),
        token: None,
    }
}

/// The version a node's manifest names: with `version` None its assignment (pin, site
/// override or role; `None` = its role's newest), else `version` if it is the node's assigned
/// or staged one.
fn wanted(row: &NodeRow, version: Option<u64>) -> Result<Option<VersionRef>, FleetError> {
    match version {
        None => Ok(row.effective.clone()),
        Some(v) => {
            let ok = [row.effective.as_ref(), row.stage.as_ref()]
                .into_iter()
                .flatten()
                .find(|x| x.version == v);
            Ok(Some(ok.cloned().ok_or_else(|| {
                FleetError::NotAssigned {
                    mac: row.mac.clone(),
                    version: v,
                }
            })?))
        }
    }
}

impl Fleet {
    /// A fleet over `db`, signing with `key`, booting images from `images`. Loads every node.
    pub async fn open(
        key: SigningKey,
        images: Arc<dyn ImageSource>,
        default_role: String,
        db: Db,
    ) -> Result<Arc<Fleet>, FleetError> {
        let (rows, enrolled) = db
            .call(|c| {
                Ok((
                    crate::db::nodes::list(c, None)?,
                    crate::db::tokens::enrolled_nodes(c)?,
                ))
            })
            .await?;
        let mut live = Live {
            enrolled: enrolled.into_iter().collect(),
            ..Default::default()
        };
        for r in rows {
            live.rev = live.rev.max(r.rev);
            live.nodes.insert(r.mac.clone(), LiveNode::new(r));
        }
        Ok(Arc::new(Fleet {
            key,
            images,
            default_role,
            db,
            live: Mutex::new(live),
            multicast: std::sync::OnceLock::new(),
        }))
    }

    /// The database.
    pub fn db(&self) -> &Db {
        &self.db
    }

    /// The key manifests are signed with (and node layer tokens derived from).
    pub fn signing_key(&self) -> &SigningKey {
        &self.key
    }

    /// The image source.
    pub fn images(&self) -> &Arc<dyn ImageSource> {
        &self.images
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Live> {
        self.live.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// The node's record, discovering it if new; marks it seen.
    async fn ensure(&self, mac: &str) -> Result<NodeRow, FleetError> {
        let now = now_ms();
        if let Some(n) = self.lock().nodes.get_mut(mac) {
            n.row.last_seen_ms = now;
            n.seen_dirty = true;
            return Ok(n.row.clone());
        }
        let (m, role) = (mac.to_owned(), self.default_role.clone());
        let row = self
            .db
            .call(move |c| crate::db::nodes::discover(c, &m, &role, now))
            .await?;
        let mut live = self.lock();
        live.rev = live.rev.max(row.rev);
        let n = live.nodes.entry(mac.to_owned()).or_insert_with(|| {
            tracing::info!(%mac, role = %row.role, "discovered node");
            LiveNode::new(row)
        });
        Ok(n.row.clone())
    }

    /// Records that `mac` is booting (iPXE asked for its script) and returns its record.
    pub async fn node_booting(&self, mac: &str) -> Result<NodeRecord, FleetError> {
        Ok(record_of(&self.ensure(mac).await?))
    }

    /// Whether the node holds a node token (and so must authenticate).
    pub fn enrolled(&self, mac: &str) -> bool {
        self.lock().enrolled.contains(mac)
    }

    /// The node's desired-state revision as this process holds it (changes when an operator,
    /// the rollout driver or a token change touches the node).
    pub fn node_rev(&self, mac: &str) -> Option<u64> {
        self.lock().nodes.get(mac).map(|n| n.row.rev)
    }

    /// The node's current record as this process holds it (facts may be newer than the
    /// database's by up to one flush interval).
    pub fn node(&self, mac: &str) -> Option<NodeRow> {
        self.lock().nodes.get(mac).map(|n| n.row.clone())
    }

    /// The token `mac`'s node layer carries (creating its first generation if needed).
    pub async fn layer_token(&self, mac: &str) -> Result<String, FleetError> {
        let key = self.key.clone();
        let m = mac.to_owned();
        let (_, secret) = self
            .db
            .call(move |c| {
                crate::db::tokens::layer_token(c, &m, &|gen| crate::keys::node_token(&key, &m, gen))
            })
            .await?;
        Ok(secret)
    }

    /// Records that node token `token` authenticated a request for `mac`: from now on the
    /// node's anonymous reports are refused, and older generations of its layer token are
    /// revoked. Returns the ids of tokens revoked by it (the caller drops cached lookups).
    pub async fn token_used(
        &self,
        mac: &str,
        token: &crate::db::tokens::TokenInfo,
    ) -> Result<Vec<u64>, FleetError> {
        if token.used_ms.is_some() || self.lock().used_tokens.contains(&token.id) {
            return Ok(Vec::new());
        }
        let (id, m) = (token.id, mac.to_owned());
        let used = self
            .db
            .call(move |c| crate::db::tokens::first_use(c, id, &m, now_ms()))
            .await?;
        let mut live = self.lock();
        live.used_tokens.insert(id);
        live.enrolled.insert(mac.to_owned());
        if used.marked {
            tracing::info!(%mac, token = id, superseded = ?used.superseded, "node authenticated with its token for the first time");
        }
        Ok(used.superseded)
    }

    /// The signed manifest for `mac`: its assigned version, or with `version`, a version it is
    /// assigned or asked to stage.
    pub async fn signed_manifest(
        self: &Arc<Self>,
        mac: &str,
        version: Option<u64>,
    ) -> Result<SignedManifest, FleetError> {
        let row = self.ensure(mac).await?;
        let want = wanted(&row, version)?;
        let mut node = record_of(&row);
        node.token = Some(self.layer_token(mac).await?);
        let images = Arc::clone(&self.images);
        let role = row.role.clone();
        let chain = tokio::task::spawn_blocking(move || match &want {
            Some(v) => images.chain_at(&role, v, &node),
            None => images.chain_for(&role, &node),
        })
        .await
        .map_err(|e| FleetError::Internal(format!("image lookup task: {e}")))??;
        let chain = chain.ok_or_else(|| FleetError::NoImage {
            role: row.role.clone(),
        })?;
        let layers = chain
            .layers
            .into_iter()
            .map(|mut l| {
                // Per-node counting: the layer URL names the node asking.
                l.url = format!("/layers/{}?node={}", l.id, row.mac);
                l
            })
            .collect::<Vec<_>>();
        let manifest = Manifest {
            node: row.name.clone(),
            mac: row.mac.clone(),
            role: row.role.clone(),
            image: chain.image,
            version: chain.version,
            issued_at: now_ms() / 1000,
            boot_tries: chain.boot_tries,
            multicast: self.multicast_offers(&row.mac, &layers).await,
            layers,
        };
        SignedManifest::sign(&manifest, &self.key)
            .map_err(|e| FleetError::Internal(format!("signing manifest: {e}")))
    }

    /// The kernel (and node-init's modules for it) recorded with the version `mac` boots: the
    /// version its manifest names (the same choice as [`Fleet::signed_manifest`] without
    /// `version`). `None` when that version records no kernel (the node boots the configured
    /// one); `NoImage` when its role has no image.
    pub async fn boot_kernel(&self, mac: &str) -> Result<Option<BootKernel>, FleetError> {
        let row = self.ensure(mac).await?;
        let want = wanted(&row, None)?;
        let node = record_of(&row);
        let images = Arc::clone(&self.images);
        let found = tokio::task::spawn_blocking(move || {
            images.boot_kernel(&node.role, want.as_ref(), &node)
        })
        .await
        .map_err(|e| FleetError::Internal(format!("kernel lookup task: {e}")))??;
        Ok(found)
    }

    /// The file of a stored blob of `kind` (a kernel a version records, a module archive).
    pub async fn blob_path(
        &self,
        id: &wire::chunk::Digest,
        kind: &'static str,
    ) -> Result<Option<PathBuf>, FleetError> {
        let images = Arc::clone(&self.images);
        let id = *id;
        tokio::task::spawn_blocking(move || images.blob_path(&id, kind))
            .await
            .map_err(|e| FleetError::Internal(format!("blob lookup task: {e}")))
    }

    /// Offers multicast sessions in manifests from now on (docs/multicast.md, "Sessions
    /// scheduled by the server"); a second call is ignored.
    pub fn set_multicast(&self, scheduler: Arc<crate::multicast::Scheduler>) {
        let _ = self.multicast.set(scheduler);
    }

    /// The node fetched its network boot script: its next manifests offer multicast sessions
    /// whatever it reported cached (it may have been wiped).
    pub fn netbooted(&self, mac: &str) {
        if let Some(s) = self.multicast.get() {
            s.node_booting(mac, now_ms());
        }
    }

    /// The multicast scheduler, when sessions are offered.
    pub fn multicast(&self) -> Option<&Arc<crate::multicast::Scheduler>> {
        self.multicast.get()
    }

    /// The multicast sessions offered to `mac` for `layers` (none without a scheduler). A node
    /// whose last report says it runs an image (booted or healthy: its agent is asking) is not
    /// offered the layers it reported cached, unless it network-booted after that report (it
    /// may have been wiped).
    async fn multicast_offers(
        &self,
        mac: &str,
        layers: &[wire::manifest::LayerRef],
    ) -> Vec<wire::manifest::MulticastOffer> {
        let Some(sched) = self.multicast.get() else {
            return Vec::new();
        };
        let cached = match self.node(mac) {
            Some(row)
                if matches!(row.status.state, NodeState::Booted | NodeState::Healthy)
                    && sched.netbooted_at(mac).is_none_or(|t| t < row.report_ms) =>
            {
                row.status.cached_layers
            }
            _ => Vec::new(),
        };
        let mut files = Vec::new();
        for l in layers.iter().filter(|l| !cached.contains(&l.id)) {
            if let Ok(Some(path)) = self.layer_path(&l.id).await {
                files.push((l.clone(), path));
            }
        }
        sched.offers(mac, &files)
    }

    /// The file of a published layer.
    pub async fn layer_path(&self, id: &LayerId) -> Result<Option<PathBuf>, FleetError> {
        let images = Arc::clone(&self.images);
        let id = *id;
        tokio::task::spawn_blocking(move || images.layer_path(&id))
            .await
            .map_err(|e| FleetError::Internal(format!("layer lookup task: {e}")))
    }

    /// Counts layer bytes sent to a node (a known one; unknown MACs are ignored).
    pub fn count_layer_bytes(&self, mac: &str, bytes: u64) {
        if let Some(n) = self.lock().nodes.get_mut(mac) {
            n.bytes = n.bytes.saturating_add(bytes);
            n.row.layer_bytes = n.row.layer_bytes.saturating_add(bytes);
            n.row.last_seen_ms = now_ms();
            n.seen_dirty = true;
        }
    }

    /// Applies a node's state report and answers with what the node should do next.
    pub async fn record_report(
        &self,
        mac: &str,
        report: StateReport,
    ) -> Result<ReportAck, FleetError> {
        if wire_mac(&report.mac) != mac {
            return Err(FleetError::MacMismatch {
                path: mac.to_owned(),
                body: report.mac,
            });
        }
        self.ensure(mac).await?;
        let now = now_ms();
        let lookup = {
            let mut live = self.lock();
            let Live { nodes, events, .. } = &mut *live;
            let n = nodes
                .get_mut(mac)
                .ok_or_else(|| FleetError::Internal(format!("node {mac} vanished")))?;
            let actor = format!("node:{mac}");
            let subject = format!("node/{mac}");
            match state::apply_report(&n.row.status, &n.row.cursor, &report) {
                Outcome::Apply {
                    status,
                    cursor,
                    transition,
                    new_session,
                } => {
                    if let Some((from, to)) = transition {
                        events.push(NewEvent::now(&actor, "node.transition", &subject, serde_json::json!({ "from": from, "to": to, "version": status.version, "seq": report.seq })));
                    }
                    if n.row.status.drift.is_empty() && !status.drift.is_empty() {
                        events.push(NewEvent::now(
                            &actor,
                            "node.drifted",
                            &subject,
                            serde_json::json!({ "layers": status.drift, "repair": "scheduled" }),
                        ));
                    } else if !n.row.status.drift.is_empty() && status.drift.is_empty() {
                        events.push(NewEvent::now(
                            &actor,
                            "node.repaired",
                            &subject,
                            serde_json::json!({}),
                        ));
                    }
                    let layers_changed = status.cached_layers != n.row.status.cached_layers;
                    if new_session {
                        n.row.session_ms = now;
                    }
                    n.row.report_ms = now;
                    n.row.state = status.state;
                    n.row.drifted = !status.drift.is_empty();
                    n.row.status = status;
                    n.row.cursor = cursor;
                    n.report_dirty = true;
                    n.check_staged(layers_changed)
                }
                Outcome::Ignore => None,
                Outcome::ResendFull => {
                    return Ok(ReportAck {
                        applied_seq: n.row.cursor.applied_seq,
                        resend_full: true,
                        ..Default::default()
                    })
                }
                Outcome::Illegal { from, to } => {
                    tracing::warn!(%mac, ?from, ?to, seq = report.seq, "illegal state transition rejected");
                    events.push(NewEvent::now(&actor, "node.illegal_transition", &subject, serde_json::json!({ "from": from, "to": to, "seq": report.seq, "base_seq": report.base_seq })));
                    return Err(FleetError::IllegalTransition { from, to });
                }
            }
        };
        if let Some((target, row)) = lookup {
            // First time this stage target is checked: look its layers up (store I/O).
            let images = Arc::clone(&self.images);
            let mut node = record_of(&row);
            node.token = Some(self.layer_token(mac).await?);
            let t = target.clone();
            let chain = tokio::task::spawn_blocking(move || images.chain_at(&node.role, &t, &node))
                .await
                .map_err(|e| FleetError::Internal(format!("image lookup task: {e}")))??;
            let layers: Vec<LayerId> = chain
                .map(|c| c.layers.iter().map(|l| l.id).collect())
                .unwrap_or_default();
            if let Some(n) = self.lock().nodes.get_mut(mac) {
                if n.row.stage.as_ref() == Some(&target) {
                    n.stage_layers = Some((target, layers));
                    n.check_staged(true);
                }
            }
        }
        let live = self.lock();
        let n = live
            .nodes
            .get(mac)
            .ok_or_else(|| FleetError::Internal(format!("node {mac} vanished")))?;
        Ok(n.ack())
    }

    /// Writes buffered facts and events, then picks up desired-state changes made by anyone
    /// (this process's API and driver, or another server process).
    pub async fn flush(&self) -> Result<FlushStats, FleetError> {
        let (facts, events, rev) = {
            let mut live = self.lock();
            let mut facts = Vec::new();
            for n in live.nodes.values_mut() {
                if !(n.report_dirty || n.staged_dirty || n.seen_dirty) {
                    continue;
                }
                facts.push(Facts {
                    mac: n.row.mac.clone(),
                    report: n.report_dirty.then(|| {
                        (
                            n.row.status.clone(),
                            n.row.cursor,
                            n.row.session_ms,
                            n.row.report_ms,
                        )
                    }),
                    staged: n.staged_dirty.then(|| n.row.staged.clone()),
                    last_seen_ms: n.row.last_seen_ms,
                    layer_bytes: n.bytes,
                });
                n.report_dirty = false;
                n.staged_dirty = false;
                n.seen_dirty = false;
                n.bytes = 0;
            }
            (facts, std::mem::take(&mut live.events), live.rev)
        };
        let stats = FlushStats {
            nodes: facts.len(),
            events: events.len(),
            refreshed: 0,
        };
        let (changed, enrolled) = self
            .db
            .call(move |c| {
                if !facts.is_empty() || !events.is_empty() {
                    crate::db::nodes::flush(c, &facts, &events)?;
                }
                let changed = crate::db::nodes::changed_since(c, rev)?;
                let enrolled = if changed.is_empty() {
                    None
                } else {
                    Some(crate::db::tokens::enrolled_nodes(c)?)
                };
                Ok((changed, enrolled))
            })
            .await?;
        let refreshed = changed.len();
        let mut live = self.lock();
        if let Some(e) = enrolled {
            live.enrolled = e.into_iter().collect();
            live.used_tokens.clear();
        }
        for r in changed {
            live.rev = live.rev.max(r.rev);
            match live.nodes.get_mut(&r.mac) {
                Some(n) => n.take_desired(r),
                None => {
                    live.nodes.insert(r.mac.clone(), LiveNode::new(r));
                }
            }
        }
        // Nodes deleted by an operator.
        Ok(FlushStats { refreshed, ..stats })
    }

    /// Forgets a node deleted from the database.
    pub fn forget(&self, mac: &str) {
        let mut live = self.lock();
        // Still enrolled: a node that used a token must keep using one (db::tokens).
        live.nodes.remove(mac);
    }

    /// Flushes every `every` until `shutdown`, then once more.
    pub async fn run_flusher(
        self: Arc<Self>,
        every: Duration,
        shutdown: CancellationToken,
    ) -> Result<(), FleetError> {
        let mut tick = tokio::time::interval(every);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tick.tick() => {
                    if let Err(e) = self.flush().await {
                        tracing::error!(error = %e, "flushing node facts");
                    }
                }
            }
        }
        self.flush().await.map(|_| ())
    }
}

fn wire_mac(text: &str) -> String {
    crate::boot::ipxe::normalize_mac(text).unwrap_or_default()
}

impl LiveNode {
    fn new(row: NodeRow) -> Self {
        LiveNode {
            row,
            report_dirty: false,
            staged_dirty: false,
            seen_dirty: false,
            bytes: 0,
            stage_layers: None,
        }
    }

    /// Takes desired-state fields from a fresher database row, keeping this process's facts.
    fn take_desired(&mut self, r: NodeRow) {
        let row = &mut self.row;
        row.name = r.name;
        row.role = r.role;
        row.site = r.site;
        row.pin = r.pin;
        row.effective = r.effective;
        if row.stage != r.stage {
            self.stage_layers = None;
        }
        row.stage = r.stage;
        row.reboot_ms = r.reboot_ms;
        row.rev = r.rev;
        if !self.staged_dirty {
            row.staged = r.staged;
        }
        let _ = self.check_staged(false);
    }

    /// Re-evaluates whether the stage target is in the cache. Returns the target and the row
    /// when its layers must be looked up first.
    fn check_staged(&mut self, layers_changed: bool) -> Option<(VersionRef, NodeRow)> {
        let target = self.row.stage.clone()?;
        match &self.stage_layers {
            Some((t, layers)) if *t == target => {
                if layers_changed || self.row.staged.as_ref() != Some(&target) {
                    let have: HashSet<&LayerId> = self.row.status.cached_layers.iter().collect();
                    let complete = !layers.is_empty() && layers.iter().all(|l| have.contains(l));
                    let staged = complete.then(|| target.clone());
                    if staged != self.row.staged {
                        self.row.staged = staged;
                        self.staged_dirty = true;
                    }
                }
                None
            }
            _ => Some((target, self.row.clone())),
        }
    }

    fn ack(&self) -> ReportAck {
        let r = &self.row;
        let stage = r
            .stage
            .as_ref()
            .filter(|s| r.staged.as_ref() != Some(*s) && r.status.version != Some(s.version))
            .map(|s| s.version);
        let reboot = r.reboot_ms.is_some_and(|t| r.session_ms < t);
        ReportAck {
            applied_seq: r.cursor.applied_seq,
            resend_full: false,
            stage,
            reboot,
            repair: r.status.drift.clone(),
        }
    }
}
