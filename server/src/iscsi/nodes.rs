//! The appliance's targets: one per node the fleet knows, named from its MAC
//! ([`node_target_iqn`] of the twelve hex digits), whose LUN 0 is the chain of the node's
//! current manifest.
//!
//! The chain is the manifest's layers (base, role and the node layer the builder made), all
//! opened read-only from the image store, plus a writable differencing layer of the node's
//! own under the data directory, `iscsi/nodes/<mac>/<top layer id>.vhdx`: published layers
//! are content-addressed and never change, so the node's writes need a file of their own. A
//! new image version (a new top layer) gets a new writable layer; the previous ones stay on
//! disk until an operator removes them. A stateless node instead gets a scratch layer per
//! session, discarded at logout ([`VhdxLun::open_stateless`]).
//!
//! Who may log in: the node's own initiator name ([`node_initiator_iqn`]) and, unless CHAP is
//! switched off, the node's own CHAP secret: derived from the server key and the MAC
//! ([`node_chap_secret`]) or set per node in the configuration. So a node's valid
//! credentials never open another node's target.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr, SocketAddrV4};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ed25519_dalek::SigningKey;
use wire::dhcp::MacAddr;
use wire::LayerId;

use super::lun::{
    node_initiator_iqn, node_target_iqn, BlockDevice, ChapCredentials, LunError, LunProvider,
    TargetAccess, VhdxLun, IQN_PREFIX,
};
use crate::config::{Config, ConfigError, IscsiConfig};
use crate::fleet::Fleet;

/// The iSCSI names and credentials of one node (what its boot script and node-init use).
#[derive(Clone, PartialEq, Eq)]
pub struct NodeCredentials {
    /// Its target, `iqn.2026-11.io.strata:node.<mac hex>`.
    pub target: String,
    /// The initiator name it must use, `iqn.2026-11.io.strata:init.<mac hex>`.
    pub initiator: String,
    /// CHAP user name and secret, `None` when CHAP is off.
    pub chap: Option<ChapCredentials>,
    /// Whether its writes are discarded at logout.
    pub stateless: bool,
}

impl std::fmt::Debug for NodeCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("NodeCredentials")
            .field("target", &self.target)
            .field("initiator", &self.initiator)
            .field("chap", &self.chap)
            .field("stateless", &self.stateless)
            .finish()
    }
}

fn mac_hex(mac: &MacAddr) -> String {
    mac.0.iter().map(|b| format!("{b:02x}")).collect()
}

/// The MAC a node target name is derived from, if `target` is one.
pub fn mac_of_target(target: &str) -> Option<MacAddr> {
    let hex = target.strip_prefix(IQN_PREFIX)?.strip_prefix(":node.")?;
    mac_of_hex(hex)
}

/// The MAC a node initiator name is derived from, if `initiator` is one.
pub fn mac_of_initiator(initiator: &str) -> Option<MacAddr> {
    let lower = initiator.to_ascii_lowercase();
    let hex = lower.strip_prefix(IQN_PREFIX)?.strip_prefix(":init.")?;
    mac_of_hex(hex)
}

fn mac_of_hex(hex: &str) -> Option<MacAddr> {
    if hex.len() != 12 || !hex.bytes().all(|c| c.is_ascii_hexdigit()) {
        return None;
    }
    let mut out = [0u8; 6];
    for (i, b) in out.iter_mut().enumerate() {
        *b = u8::from_str_radix(hex.get(2 * i..2 * i + 2)?, 16).ok()?;
    }
    Some(MacAddr(out))
}

/// A node's derived CHAP secret: 32 hex characters from the server key and the MAC, so
/// the server needs no table of secrets and every node's differs.
pub fn node_chap_secret(key: &SigningKey, mac: &MacAddr) -> String {
    let mut hasher = blake3::Hasher::new_derive_key("strata 2026 iscsi chap secret v1");
    hasher.update(&key.to_bytes());
    hasher.update(&mac.0);
    let hex = hasher.finalize().to_hex();
    hex.as_str().get(..32).unwrap_or(hex.as_str()).to_owned()
}

/// The portal diskless nodes are told: `iscsi.portal`, else the bound address when it names
/// an IPv4 address, else the HTTP public URL's host with the bound port.
pub fn portal(config: &Config, bound: SocketAddr) -> Result<SocketAddrV4, ConfigError> {
    if let Some(p) = config.iscsi.portal {
        return Ok(p);
    }
    match bound.ip() {
        IpAddr::V4(ip) if !ip.is_unspecified() => return Ok(SocketAddrV4::new(ip, bound.port())),
        _ => {}
    }
    let url = config.public_url();
    let host = url
        .trim_start_matches("http://")
        .split(['/', ':'])
        .next()
        .unwrap_or_default();
    host.parse()
        .map(|ip| SocketAddrV4::new(ip, bound.port()))
        .map_err(|_| {
            ConfigError::Invalid(format!(
                "iscsi.portal is needed: the public URL {url} names no IPv4 address"
            ))
        })
}

/// The names and credentials of `mac` under `config` and the server `key`.
pub fn node_credentials(config: &IscsiConfig, key: &SigningKey, mac: &MacAddr) -> NodeCredentials {
    let own = config
        .nodes
        .iter()
        .find(|n| n.mac.parse::<MacAddr>().is_ok_and(|m| m == *mac));
    let initiator = node_initiator_iqn(&mac_hex(mac));
    let chap = config.chap.then(|| ChapCredentials {
        user: initiator.clone(),
        secret: own
            .and_then(|n| n.chap_secret.clone())
            .unwrap_or_else(|| node_chap_secret(key, mac))
            .into_bytes(),
    });
    NodeCredentials {
        target: node_target_iqn(&mac_hex(mac)),
        initiator,
        chap,
        stateless: own.and_then(|n| n.stateless).unwrap_or(config.stateless),
    }
}

/// One persistent LUN kept open between sessions of a node.
struct OpenLun {
    top: LayerId,
    lun: Arc<VhdxLun>,
}

/// The [`LunProvider`] of `strata serve`: a target per node the fleet knows.
pub struct FleetLuns {
    fleet: Arc<Fleet>,
    config: IscsiConfig,
    key: SigningKey,
    dir: PathBuf,
    runtime: tokio::runtime::Handle,
    portal: SocketAddrV4,
    open: Mutex<HashMap<MacAddr, OpenLun>>,
}

impl std::fmt::Debug for FleetLuns {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("FleetLuns")
            .field("dir", &self.dir)
            .finish_non_exhaustive()
    }
}

impl FleetLuns {
    /// Targets for `fleet`'s nodes; writable layers and scratch files live under `dir`
    /// (`<data_dir>/iscsi`); `runtime` runs the fleet's lookups. `key` is the server key
    /// (manifests are verified with it, CHAP secrets derived from it).
    pub fn new(
        fleet: Arc<Fleet>,
        config: IscsiConfig,
        key: SigningKey,
        dir: PathBuf,
        runtime: tokio::runtime::Handle,
        portal: SocketAddrV4,
    ) -> FleetLuns {
        FleetLuns {
            fleet,
            config,
            key,
            dir,
            runtime,
            portal,
            open: Mutex::new(HashMap::new()),
        }
    }

    /// The iPXE script that `sanboot`s `mac`'s LUN, for a node configured `sanboot` (an image
    /// that carries its own bootloader); `None` for the others. iPXE's root path:
    /// `iscsi:<server>:<protocol>:<port>:<lun>:<target>`.
    pub fn sanboot_script(&self, mac: &str) -> Option<String> {
        let mac: MacAddr = mac.parse().ok()?;
        let own = self
            .config
            .nodes
            .iter()
            .find(|n| n.mac.parse::<MacAddr>().is_ok_and(|m| m == mac))?;
        if !own.sanboot {
            return None;
        }
        let c = self.credentials(&mac);
        let mut s = format!(
            "#!ipxe\necho Strata: node {mac} sanboot {}\nset initiator-iqn {}\n",
            c.target, c.initiator
        );
        if let Some(chap) = &c.chap {
            s.push_str(&format!(
                "set username {}\nset password {}\n",
                chap.user,
                String::from_utf8_lossy(&chap.secret)
            ));
        }
        s.push_str(&format!(
            "sanboot iscsi:{}::{}::{}\n",
            self.portal.ip(),
            self.portal.port(),
            c.target
        ));
        Some(s)
    }

    /// The kernel arguments that make node-init attach `mac`'s chain over iSCSI
    /// (`strata.disk=ram strata.iscsi=IP:PORT strata.iscsi_secret=..`), for a node that boots
    /// diskless (`iscsi.diskless`, or its `[[iscsi.nodes]]` entry); `None` for the others.
    pub fn boot_args(&self, mac: &str) -> Option<String> {
        let mac: MacAddr = mac.parse().ok()?;
        let own = self
            .config
            .nodes
            .iter()
            .find(|n| n.mac.parse::<MacAddr>().is_ok_and(|m| m == mac));
        if !own.and_then(|n| n.diskless).unwrap_or(self.config.diskless) {
            return None;
        }
        let mut args = format!("strata.disk=ram strata.iscsi={}", self.portal);
        if let Some(chap) = self.credentials(&mac).chap {
            args.push_str(&format!(
                " strata.iscsi_secret={}",
                String::from_utf8_lossy(&chap.secret)
            ));
        }
        Some(args)
    }

    /// The names and credentials of `mac`.
    pub fn credentials(&self, mac: &MacAddr) -> NodeCredentials {
        node_credentials(&self.config, &self.key, mac)
    }

    fn known(&self, mac: &MacAddr) -> bool {
        self.fleet.node(&mac.to_string()).is_some()
    }

    fn node_error(mac: &MacAddr, reason: impl Into<String>) -> LunError {
        LunError::Node {
            node: mac.to_string(),
            reason: reason.into(),
        }
    }

    /// The layer files of the node's current manifest, base first, and its top layer. The
    /// manifest comes from the fleet exactly as node-init gets it (same assignment, same
    /// node layer), so a diskless node runs the bits a node with a disk runs.
    fn chain_paths(&self, mac: &MacAddr) -> Result<(Vec<PathBuf>, LayerId), LunError> {
        let canonical = mac.to_string();
        let fleet = Arc::clone(&self.fleet);
        // `attach` is synchronous (the target calls it on the blocking pool); the fleet is
        // async. A scoped thread entering the runtime is safe from any calling context.
        let signed = std::thread::scope(|scope| {
            scope
                .spawn(|| {
                    self.runtime
                        .block_on(fleet.signed_manifest(&canonical, None))
                })
                .join()
        })
        .map_err(|_| Self::node_error(mac, "manifest task panicked"))?
        .map_err(|e| Self::node_error(mac, format!("manifest: {e}")))?;
        let manifest = signed
            .verify(&self.key.verifying_key())
            .map_err(|e| Self::node_error(mac, format!("manifest: {e}")))?;
        let top = manifest
            .layers
            .last()
            .map(|l| l.id)
            .ok_or_else(|| Self::node_error(mac, "empty chain"))?;
        let images = self.fleet.images();
        let paths = manifest
            .layers
            .iter()
            .map(|l| {
                images.layer_path(&l.id).ok_or_else(|| {
                    Self::node_error(mac, format!("layer {} is not in the store", l.id))
                })
            })
            .collect::<Result<Vec<_>, _>>()?;
        Ok((paths, top))
    }

    /// The node's persistent LUN: its manifest's chain plus its writable layer (made on
    /// first use), shared by its sessions while its manifest's top layer stays the same.
    fn persistent(
        &self,
        mac: &MacAddr,
        paths: Vec<PathBuf>,
        top: LayerId,
    ) -> Result<Arc<VhdxLun>, LunError> {
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(o) = open.get(mac) {
            if o.top == top {
                return Ok(o.lun.clone());
            }
        }
        let dir = self.dir.join("nodes").join(mac_hex(mac));
        std::fs::create_dir_all(&dir).map_err(|source| LunError::Scratch {
            dir: dir.clone(),
            source,
        })?;
        let writable = dir.join(format!("{top}.vhdx"));
        if !writable.exists() {
            let below = vhdx::Chain::from_paths(&paths)?;
            let opts = vhdx::CreateOptions {
                record_absolute_parent_path: true,
                ..Default::default()
            };
            vhdx::create_differencing(&writable, &below, &opts)?;
            tracing::info!(node = %mac, layer = %writable.display(), "created the node's writable iSCSI layer");
        }
        let mut all = paths;
        all.push(writable);
        let lun = Arc::new(VhdxLun::open_node(&all)?);
        open.insert(
            *mac,
            OpenLun {
                top,
                lun: lun.clone(),
            },
        );
        Ok(lun)
    }
}

impl LunProvider for FleetLuns {
    fn targets_for(&self, initiator: &str) -> Vec<String> {
        // A node discovers its own target only; other initiators see nothing.
        match mac_of_initiator(initiator) {
            Some(mac) if self.known(&mac) => vec![self.credentials(&mac).target],
            _ => Vec::new(),
        }
    }

    fn access(&self, target: &str) -> Option<TargetAccess> {
        let mac = mac_of_target(target)?;
        if !self.known(&mac) {
            return None;
        }
        let creds = self.credentials(&mac);
        let own = self
            .config
            .nodes
            .iter()
            .find(|n| n.mac.parse::<MacAddr>().is_ok_and(|m| m == mac));
        let target_chap = match (&creds.chap, own.and_then(|n| n.target_secret.clone())) {
            (Some(_), Some(secret)) => Some(ChapCredentials {
                user: creds.target.clone(),
                secret: secret.into_bytes(),
            }),
            _ => None,
        };
        Some(TargetAccess {
            chap: creds.chap,
            target_chap,
            initiators: vec![creds.initiator],
        })
    }

    fn attach(&self, target: &str) -> Result<Arc<dyn BlockDevice>, LunError> {
        let mac = mac_of_target(target).ok_or_else(|| LunError::NoTarget(target.to_owned()))?;
        let (paths, top) = self.chain_paths(&mac)?;
        if self.credentials(&mac).stateless {
            let scratch = self.dir.join("scratch");
            std::fs::create_dir_all(&scratch).map_err(|source| LunError::Scratch {
                dir: scratch.clone(),
                source,
            })?;
            return Ok(Arc::new(VhdxLun::open_stateless(&paths, &scratch)?));
        }
        Ok(self.persistent(&mac, paths, top)?)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_round_trip_to_the_mac() {
        let mac: MacAddr = "52:54:00:AB:cd:0f".parse().unwrap();
        let c = node_credentials(
            &IscsiConfig::default(),
            &SigningKey::from_bytes(&[7; 32]),
            &mac,
        );
        assert_eq!(c.target, "iqn.2026-11.io.strata:node.525400abcd0f");
        assert_eq!(c.initiator, "iqn.2026-11.io.strata:init.525400abcd0f");
        assert_eq!(mac_of_target(&c.target), Some(mac));
        assert_eq!(
            mac_of_initiator(&c.initiator.to_uppercase().replace("IQN", "iqn")),
            Some(mac)
        );
        assert_eq!(
            mac_of_target("iqn.2026-11.io.strata:node.525400abcd0"),
            None
        );
        assert_eq!(
            mac_of_target("iqn.2026-11.io.strata:node.525400abcd0g"),
            None
        );
        assert_eq!(
            mac_of_target("iqn.2026-11.io.strata:init.525400abcd0f"),
            None
        );
    }

    proptest::proptest! {
        /// Names from the wire (login keys) never panic the parsers, and every MAC's names
        /// parse back to it.
        #[test]
        fn names_parse_back_and_garbage_is_refused(mac in proptest::prelude::any::<[u8; 6]>(), junk in ".{0,80}") {
            let mac = MacAddr(mac);
            let c = node_credentials(&IscsiConfig::default(), &SigningKey::from_bytes(&[3; 32]), &mac);
            proptest::prop_assert_eq!(mac_of_target(&c.target), Some(mac));
            proptest::prop_assert_eq!(mac_of_initiator(&c.initiator), Some(mac));
            let _ = (mac_of_target(&junk), mac_of_initiator(&junk));
            let t = format!("{IQN_PREFIX}:node.{junk}");
            if let Some(m) = mac_of_target(&t) {
                proptest::prop_assert_eq!(node_credentials(&IscsiConfig::default(), &SigningKey::from_bytes(&[3; 32]), &m).target, t.to_ascii_lowercase());
            }
        }
    }

    #[test]
    fn secrets_differ_per_node_and_key_and_config_wins() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let b = SigningKey::from_bytes(&[2; 32]);
        let m1 = MacAddr([0x52, 0x54, 0, 0, 0, 1]);
        let m2 = MacAddr([0x52, 0x54, 0, 0, 0, 2]);
        assert_eq!(node_chap_secret(&a, &m1).len(), 32);
        assert_ne!(node_chap_secret(&a, &m1), node_chap_secret(&a, &m2));
        assert_ne!(node_chap_secret(&a, &m1), node_chap_secret(&b, &m1));
        let mut cfg = IscsiConfig::default();
        cfg.nodes.push(crate::config::IscsiNodeConfig {
            mac: "52-54-00-00-00-01".into(),
            chap_secret: Some("configured-secret".into()),
            target_secret: None,
            stateless: Some(true),
            diskless: None,
            sanboot: false,
        });
        let c = node_credentials(&cfg, &a, &m1);
        assert_eq!(
            c.chap.as_ref().map(|c| c.secret.as_slice()),
            Some(&b"configured-secret"[..])
        );
        assert!(c.stateless);
        assert!(!node_credentials(&cfg, &a, &m2).stateless);
        cfg.chap = false;
        assert!(node_credentials(&cfg, &a, &m2).chap.is_none());
    }
}
