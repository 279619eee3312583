//! The bridge between the image store/builder and the fleet: which chain a node boots. A
//! node's chain is its role's current image (base, role layer) plus its own node layer
//! (hostname, machine-id, and the node's API token from `db::tokens::layer_token`, which the
//! fleet passes in [`NodeRecord::token`]), built on first request and reused while its facts
//! and its role's layer are unchanged.

use std::path::PathBuf;
use std::sync::Arc;

use anyhow::Context;
use wire::manifest::LayerRef;
use wire::LayerId;

use crate::build::{self, NodeFacts};
use crate::config::Config;
use crate::fleet::{BootKernel, FleetError, ImageChain, ImageInfo, ImageSource, NodeRecord};
use crate::orchestrator::VersionRef;
use crate::store::catalog::{ImageVersion, LayerRecord};
use crate::store::Store;

/// Boot tries a new version gets before node-init rolls it back.
pub const DEFAULT_BOOT_TRIES: u32 = 3;

/// Images from the store under the data directory.
pub struct StoreImages {
    store: Store,
}

/// Opens the store under the data directory and makes sure the built-in busybox test image
/// and its roles are in it (built on first start, reused after).
pub async fn open(config: &Config) -> anyhow::Result<Arc<dyn ImageSource>> {
    let root = config.data_dir.join("store");
    let images_dir = build::default_images_dir();
    let store = tokio::task::spawn_blocking(move || -> anyhow::Result<Store> {
        let store = Store::open(&root)
            .with_context(|| format!("opening the image store {}", root.display()))?;
        let built = build::ensure_builtin(&store, &images_dir).with_context(|| {
            format!("building the built-in image from {}", images_dir.display())
        })?;
        tracing::info!(image = %built.image, version = built.version, reused = built.reused,
            roles = built.roles.len(), "built-in image ready");
        Ok(store)
    })
    .await
    .context("image store task")??;
    Ok(Arc::new(StoreImages { store }))
}

fn layer_ref(rec: &LayerRecord) -> LayerRef {
    LayerRef {
        id: rec.id,
        size: rec.size,
        kind: rec.kind,
        chunk_size: rec.chunk_size,
        chunks: rec.chunks.clone(),
        url: format!("/layers/{}", rec.id),
    }
}

impl StoreImages {
    /// The image version a node of `role` boots: `version` (the node's site variant of the
    /// role where one was built, else the generic role), or with `None` the newest version
    /// that has the role for the node's site.
    fn image_at(
        &self,
        role: &str,
        version: Option<&VersionRef>,
        node: &NodeRecord,
    ) -> Result<Option<ImageVersion>, FleetError> {
        let Some(version) = version else {
            return self
                .store
                .image_for_role_site(role, node.site.as_deref())
                .map_err(|e| FleetError::Internal(format!("{role}: {e}")));
        };
        let lookup = |site: Option<&str>| {
            self.store
                .image_version(&version.image, version.version, Some(role), site)
                .map_err(|e| FleetError::Internal(format!("{role} {version}: {e}")))
        };
        match node.site.as_deref() {
            Some(site) => match lookup(Some(site))? {
                Some(image) => Ok(Some(image)),
                None => lookup(None),
            },
            None => lookup(None),
        }
    }

    /// `image`'s chain plus the node layer of `node`.
    fn with_node_layer(
        &self,
        image: ImageVersion,
        node: &NodeRecord,
    ) -> Result<ImageChain, FleetError> {
        let facts = NodeFacts {
            hostname: node.name.clone(),
            mac: node.mac.clone(),
            ip: None,
            gateway: None,
            node_id: node.name.clone(),
            token: node.token.clone().ok_or_else(|| {
                FleetError::Internal(format!("node layer for {}: no node token given", node.mac))
            })?,
        };
        let node_layer = build::node_layer(&self.store, &image, &facts)
            .map_err(|e| FleetError::Internal(format!("node layer for {}: {e}", node.mac)))?;
        let mut layers: Vec<LayerRef> = image.layers.iter().map(layer_ref).collect();
        layers.push(layer_ref(&node_layer));
        Ok(ImageChain {
            image: image.image,
            version: image.version,
            layers,
            boot_tries: DEFAULT_BOOT_TRIES,
        })
    }
}

impl ImageSource for StoreImages {
    fn chain_for(&self, role: &str, node: &NodeRecord) -> Result<Option<ImageChain>, FleetError> {
        self.image_at(role, None, node)?
            .map(|image| self.with_node_layer(image, node))
            .transpose()
    }

    fn chain_at(
        &self,
        role: &str,
        version: &VersionRef,
        node: &NodeRecord,
    ) -> Result<Option<ImageChain>, FleetError> {
        self.image_at(role, Some(version), node)?
            .map(|image| self.with_node_layer(image, node))
            .transpose()
    }

    fn boot_kernel(
        &self,
        role: &str,
        version: Option<&VersionRef>,
        node: &NodeRecord,
    ) -> Result<Option<BootKernel>, FleetError> {
        let Some(image) = self.image_at(role, version, node)? else {
            return Err(FleetError::NoImage {
                role: role.to_owned(),
            });
        };
        Ok(image.kernel.map(|k| BootKernel {
            image: image.image,
            version: image.version,
            release: k.release,
            kernel: k.id,
            modules: k.modules.map(|m| (m.id, m.path)),
        }))
    }

    fn blob_path(&self, id: &wire::chunk::Digest, kind: &str) -> Option<PathBuf> {
        match self.store.blob_file(id, kind) {
            Ok(path) => path,
            Err(e) => {
                tracing::error!(blob = %id, error = %e, "blob lookup");
                None
            }
        }
    }

    fn versions(&self) -> Result<Vec<ImageInfo>, FleetError> {
        let versions = self
            .store
            .catalog()
            .versions(None)
            .map_err(|e| FleetError::Internal(format!("listing versions: {e}")))?;
        Ok(versions
            .into_iter()
            .map(|v| {
                let mut roles: Vec<String> = v.roles.into_iter().map(|r| r.role).collect();
                roles.sort();
                roles.dedup();
                ImageInfo {
                    image: v.image,
                    version: v.version,
                    roles,
                    created: v.created,
                }
            })
            .collect())
    }

    fn layer_path(&self, id: &LayerId) -> Option<PathBuf> {
        let path = self.store.layer_path(id);
        path.is_file().then_some(path)
    }
}
