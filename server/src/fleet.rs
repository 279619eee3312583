//! The nodes the server knows, what each boots, and the signed manifests that tell them.
//!
//! A node is known by its MAC. One seen for the first time (iPXE asking for its script, or
//! node-init asking for its manifest) is recorded as discovered and gets the default role.
//! Its manifest names the chain of its role's current image (base first) plus, when the image
//! source builds them, its own node layer; it is signed with the server key node-init trusts.
//! Layer bytes sent are counted per node, so a rollback that downloads nothing shows it.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::{SystemTime, UNIX_EPOCH};

use ed25519_dalek::SigningKey;
use wire::manifest::{LayerRef, Manifest, SignedManifest};
use wire::LayerId;

/// Errors the fleet reports to its callers.
#[derive(Debug, thiserror::Error)]
pub enum FleetError {
    /// The role has no image to boot.
    #[error("role {role:?} has no image")]
    NoImage {
        /// The role.
        role: String,
    },
    /// Our own fault (store, catalog); details for the log.
    #[error("{0}")]
    Internal(String),
}

/// A node as the server records it.
#[derive(Debug, Clone, serde::Serialize)]
pub struct NodeRecord {
    /// Canonical MAC, `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Name (derived from the MAC until an operator names it).
    pub name: String,
    /// Role it boots.
    pub role: String,
    /// Unix seconds first seen.
    pub first_seen: u64,
    /// Unix seconds of the last request.
    pub last_seen: u64,
    /// Layer bytes sent to it over HTTP.
    pub layer_bytes_sent: u64,
    /// The last state report it sent.
    pub last_report: Option<serde_json::Value>,
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

/// Where images come from: the image store and builder.
pub trait ImageSource: Send + Sync + 'static {
    /// The chain a node of `role` boots (including its node layer where the source builds
    /// one), or `None` if the role has no image. May block (store I/O).
    fn chain_for(&self, role: &str, node: &NodeRecord) -> Result<Option<ImageChain>, FleetError>;
    /// The file holding a published layer, if the store has it. May block.
    fn layer_path(&self, id: &LayerId) -> Option<PathBuf>;
}

/// Nodes, their roles, and their manifests.
pub struct Fleet {
    key: SigningKey,
    images: Arc<dyn ImageSource>,
    default_role: String,
    nodes: Mutex<HashMap<String, NodeRecord>>,
}

fn now() -> u64 {
    SystemTime::now().duration_since(UNIX_EPOCH).map(|d| d.as_secs()).unwrap_or(0)
}

impl Fleet {
    /// A fleet that signs with `key` and boots images from `images`.
    pub fn new(key: SigningKey, images: Arc<dyn ImageSource>, default_role: String) -> Self {
        Fleet { key, images, default_role, nodes: Mutex::new(HashMap::new()) }
    }

    fn with_node<T>(&self, mac: &str, f: impl FnOnce(&mut NodeRecord) -> T) -> T {
        let mut nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let t = now();
        let node = nodes.entry(mac.to_owned()).or_insert_with(|| {
            tracing::info!(%mac, role = %self.default_role, "discovered node");
            NodeRecord {
                mac: mac.to_owned(),
                name: format!("node-{}", mac.replace(':', "")),
                role: self.default_role.clone(),
                first_seen: t,
                last_seen: t,
                layer_bytes_sent: 0,
                last_report: None,
            }
        });
        node.last_seen = t;
        f(node)
    }

    /// Records that `mac` is booting (iPXE asked for its script) and returns its record.
    pub async fn node_booting(&self, mac: &str) -> Result<NodeRecord, FleetError> {
        Ok(self.with_node(mac, |n| n.clone()))
    }

    /// All known nodes.
    pub fn nodes(&self) -> Vec<NodeRecord> {
        let nodes = self.nodes.lock().unwrap_or_else(|e| e.into_inner());
        let mut v: Vec<_> = nodes.values().cloned().collect();
        v.sort_by(|a, b| a.mac.cmp(&b.mac));
        v
    }

    /// Sets the role a node boots (creating its record if needed).
    pub fn set_role(&self, mac: &str, role: &str) {
        self.with_node(mac, |n| n.role = role.to_owned());
    }

    /// The signed manifest for `mac`.
    pub async fn signed_manifest(self: &Arc<Self>, mac: &str) -> Result<SignedManifest, FleetError> {
        let node = self.with_node(mac, |n| n.clone());
        let images = Arc::clone(&self.images);
        let role = node.role.clone();
        let chain = tokio::task::spawn_blocking(move || images.chain_for(&role, &node).map(|c| (c, node)))
            .await
            .map_err(|e| FleetError::Internal(format!("image lookup task: {e}")))?;
        let (chain, node) = chain?;
        let chain = chain.ok_or_else(|| FleetError::NoImage { role: node.role.clone() })?;
        let layers = chain
            .layers
            .into_iter()
            .map(|mut l| {
                // Per-node counting: the layer URL names the node asking.
                l.url = format!("/layers/{}?node={}", l.id, node.mac);
                l
            })
            .collect();
        let manifest = Manifest {
            node: node.name.clone(),
            mac: node.mac.clone(),
            role: node.role.clone(),
            image: chain.image,
            version: chain.version,
            issued_at: now(),
            boot_tries: chain.boot_tries,
            layers,
        };
        SignedManifest::sign(&manifest, &self.key)
            .map_err(|e| FleetError::Internal(format!("signing manifest: {e}")))
    }

    /// The file of a published layer.
    pub async fn layer_path(&self, id: &LayerId) -> Result<Option<PathBuf>, FleetError> {
        let images = Arc::clone(&self.images);
        let id = *id;
        tokio::task::spawn_blocking(move || images.layer_path(&id))
            .await
            .map_err(|e| FleetError::Internal(format!("layer lookup task: {e}")))
    }

    /// Counts layer bytes sent to a node.
    pub fn count_layer_bytes(&self, mac: &str, bytes: u64) {
        self.with_node(mac, |n| n.layer_bytes_sent += bytes);
    }

    /// Stores a node's report.
    pub async fn record_report(&self, mac: &str, report: serde_json::Value) -> Result<(), FleetError> {
        self.with_node(mac, |n| n.last_report = Some(report));
        Ok(())
    }
}
