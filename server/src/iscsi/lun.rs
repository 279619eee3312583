//! What a LUN is backed by, and which targets exist.
//!
//! A node's LUN is its VHDX chain: the base and role layers open read-only (they belong to
//! the image store and are never written), the node's own differencing layer on top,
//! writable. Writes land only in that top file; [`BlockDevice::flush`] makes them durable
//! (SYNCHRONIZE CACHE, FUA). A stateless node gets a scratch differencing file on top of
//! its chain for the length of one session, deleted at logout. Raw files are a backing too,
//! for standalone use and for benchmarking against tgt on the same image.
//!
//! Target names are derived from node ids ([`node_target_iqn`]) and a [`LunProvider`]
//! decides, per target, who may log in (CHAP secrets, initiator names).

use std::collections::BTreeMap;
use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use thiserror::Error;

/// Errors of a LUN's backing store.
#[derive(Debug, Error)]
pub enum LunError {
    /// The VHDX engine failed.
    #[error(transparent)]
    Vhdx(#[from] vhdx::VhdxError),
    /// A raw file failed.
    #[error("{op} {path} at offset {offset}")]
    Io {
        /// "read", "write", "flush" or "open".
        op: &'static str,
        /// The file.
        path: PathBuf,
        /// Byte offset.
        offset: u64,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
    /// The device is read-only.
    #[error("the LUN is read-only")]
    ReadOnly,
    /// No such target.
    #[error("no target named {0}")]
    NoTarget(String),
    /// A node's chain cannot be served (no image, a layer missing from the store).
    #[error("node {node}: {reason}")]
    Node {
        /// The node's MAC.
        node: String,
        /// Why.
        reason: String,
    },
    /// A scratch layer for a stateless session could not be made.
    #[error("scratch layer in {dir}")]
    Scratch {
        /// Where.
        dir: PathBuf,
        /// The cause.
        #[source]
        source: std::io::Error,
    },
}

/// A block device a LUN reads and writes. Offsets and lengths are in bytes and, from the
/// SCSI layer, always whole logical blocks inside the device.
pub trait BlockDevice: Send + Sync {
    /// Logical block size in bytes (512 or 4096).
    fn block_size(&self) -> u32;
    /// log2(physical block / logical block), for READ CAPACITY (16).
    fn physical_exponent(&self) -> u8 {
        0
    }
    /// Number of logical blocks.
    fn blocks(&self) -> u64;
    /// Whether writes are refused.
    fn read_only(&self) -> bool;
    /// Reads `buf.len()` bytes at `offset`.
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LunError>;
    /// Writes `buf` at `offset`.
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), LunError>;
    /// Makes every completed write durable.
    fn flush(&self) -> Result<(), LunError>;
    /// A stable 16-byte identifier (VPD pages 0x80 and 0x83).
    fn id(&self) -> [u8; 16];
}

/// A LUN backed by a VHDX chain; writes go to the top file only.
pub struct VhdxLun {
    chain: RwLock<vhdx::Chain>,
    blocks: u64,
    block_size: u32,
    phys_exp: u8,
    writable: bool,
    id: [u8; 16],
    /// Keeps a stateless session's scratch layer until the LUN is dropped.
    _scratch: Option<tempfile::TempDir>,
}

impl std::fmt::Debug for VhdxLun {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("VhdxLun")
            .field("blocks", &self.blocks)
            .field("writable", &self.writable)
            .finish()
    }
}

impl VhdxLun {
    /// Opens the chain under `top` (parents by their locators), the top writable.
    pub fn open_top(top: &Path) -> Result<VhdxLun, LunError> {
        Ok(Self::from_chain(
            vhdx::Chain::open_writable(top)?,
            true,
            None,
        ))
    }

    /// Opens `paths` (base first) read-only: every layer stays untouched.
    pub fn open_read_only(paths: &[PathBuf]) -> Result<VhdxLun, LunError> {
        Ok(Self::from_chain(
            vhdx::Chain::from_paths(paths)?,
            false,
            None,
        ))
    }

    /// Opens `paths` (base first) with the last one writable: a node's persistent LUN.
    pub fn open_node(paths: &[PathBuf]) -> Result<VhdxLun, LunError> {
        Ok(Self::from_chain(
            vhdx::Chain::from_paths_writable(paths)?,
            true,
            None,
        ))
    }

    /// A stateless LUN: `paths` (base first) read-only under a new scratch differencing
    /// layer in a temporary directory under `scratch_dir`; the scratch layer, and every
    /// write, is gone when the LUN is dropped.
    pub fn open_stateless(paths: &[PathBuf], scratch_dir: &Path) -> Result<VhdxLun, LunError> {
        let below = vhdx::Chain::from_paths(paths)?;
        let dir = tempfile::Builder::new()
            .prefix("strata-iscsi-")
            .tempdir_in(scratch_dir)
            .map_err(|source| LunError::Scratch {
                dir: scratch_dir.to_path_buf(),
                source,
            })?;
        let overlay = dir.path().join("scratch.vhdx");
        let opts = vhdx::CreateOptions {
            record_absolute_parent_path: true,
            ..Default::default()
        };
        vhdx::create_differencing(&overlay, &below, &opts)?;
        let mut all = paths.to_vec();
        all.push(overlay);
        let chain = vhdx::Chain::from_paths_writable(&all)?;
        // The identity a node sees is that of its image, not of the scratch file.
        let id = *below.top().page83().as_bytes();
        let mut lun = Self::from_chain(chain, true, Some(dir));
        lun.id = id;
        Ok(lun)
    }

    fn from_chain(
        chain: vhdx::Chain,
        writable: bool,
        scratch: Option<tempfile::TempDir>,
    ) -> VhdxLun {
        let block_size = chain.logical_sector_size();
        let phys = chain.top().physical_sector_size();
        let phys_exp = (phys / block_size.max(1)).max(1).trailing_zeros() as u8;
        VhdxLun {
            blocks: chain.virtual_size() / u64::from(block_size.max(1)),
            block_size,
            phys_exp,
            writable,
            id: *chain.top().page83().as_bytes(),
            chain: RwLock::new(chain),
            _scratch: scratch,
        }
    }
}

impl BlockDevice for VhdxLun {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn physical_exponent(&self) -> u8 {
        self.phys_exp
    }
    fn blocks(&self) -> u64 {
        self.blocks
    }
    fn read_only(&self) -> bool {
        !self.writable
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LunError> {
        let chain = self.chain.read().unwrap_or_else(|p| p.into_inner());
        Ok(chain.read_at(buf, offset)?)
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), LunError> {
        if !self.writable {
            return Err(LunError::ReadOnly);
        }
        let mut chain = self.chain.write().unwrap_or_else(|p| p.into_inner());
        Ok(chain.write_at(buf, offset)?)
    }
    fn flush(&self) -> Result<(), LunError> {
        if !self.writable {
            return Ok(());
        }
        let chain = self.chain.read().unwrap_or_else(|p| p.into_inner());
        Ok(chain.flush()?)
    }
    fn id(&self) -> [u8; 16] {
        self.id
    }
}

/// A LUN backed by a raw image file.
#[derive(Debug)]
pub struct RawLun {
    file: File,
    path: PathBuf,
    blocks: u64,
    writable: bool,
    id: [u8; 16],
}

impl RawLun {
    /// Opens `path` (512-byte blocks; a trailing partial block is not exposed).
    pub fn open(path: &Path, writable: bool) -> Result<RawLun, LunError> {
        let io = |source| LunError::Io {
            op: "open",
            path: path.to_path_buf(),
            offset: 0,
            source,
        };
        let file = std::fs::OpenOptions::new()
            .read(true)
            .write(writable)
            .open(path)
            .map_err(io)?;
        let len = file.metadata().map_err(io)?.len();
        let h = blake3::hash(path.to_string_lossy().as_bytes());
        let mut id = [0u8; 16];
        id.copy_from_slice(h.as_bytes().get(..16).unwrap_or(&[0; 16]));
        Ok(RawLun {
            file,
            path: path.to_path_buf(),
            blocks: len / 512,
            writable,
            id,
        })
    }
}

impl BlockDevice for RawLun {
    fn block_size(&self) -> u32 {
        512
    }
    fn blocks(&self) -> u64 {
        self.blocks
    }
    fn read_only(&self) -> bool {
        !self.writable
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LunError> {
        self.file
            .read_exact_at(buf, offset)
            .map_err(|source| LunError::Io {
                op: "read",
                path: self.path.clone(),
                offset,
                source,
            })
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), LunError> {
        if !self.writable {
            return Err(LunError::ReadOnly);
        }
        self.file
            .write_all_at(buf, offset)
            .map_err(|source| LunError::Io {
                op: "write",
                path: self.path.clone(),
                offset,
                source,
            })
    }
    fn flush(&self) -> Result<(), LunError> {
        self.file.sync_data().map_err(|source| LunError::Io {
            op: "flush",
            path: self.path.clone(),
            offset: 0,
            source,
        })
    }
    fn id(&self) -> [u8; 16] {
        self.id
    }
}

/// A CHAP name and secret (RFC 7143 §12.1.3; RFC 1994).
#[derive(Clone, PartialEq, Eq)]
pub struct ChapCredentials {
    /// CHAP_N.
    pub user: String,
    /// The shared secret (at least 12 bytes recommended by RFC 7143 §12.1.3).
    pub secret: Vec<u8>,
}

impl std::fmt::Debug for ChapCredentials {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ChapCredentials")
            .field("user", &self.user)
            .finish_non_exhaustive()
    }
}

/// Who may log in to a target.
#[derive(Debug, Clone, Default)]
pub struct TargetAccess {
    /// When set, the initiator must prove this secret (one-way CHAP).
    pub chap: Option<ChapCredentials>,
    /// When set (mutual CHAP), the target proves this secret to an initiator that asks.
    pub target_chap: Option<ChapCredentials>,
    /// Initiator names allowed; empty means any.
    pub initiators: Vec<String>,
}

impl TargetAccess {
    /// Whether `initiator` may use this target (before authentication).
    pub fn allows(&self, initiator: &str) -> bool {
        self.initiators.is_empty()
            || self
                .initiators
                .iter()
                .any(|i| i.eq_ignore_ascii_case(initiator))
    }
}

/// The targets a server offers. Every target has one LUN (LUN 0).
pub trait LunProvider: Send + Sync {
    /// Targets `initiator` may see in a SendTargets discovery.
    fn targets_for(&self, initiator: &str) -> Vec<String>;
    /// Access rules of `target`, `None` if there is no such target.
    fn access(&self, target: &str) -> Option<TargetAccess>;
    /// The LUN of `target` for a new session (a stateless target gets a fresh scratch
    /// layer per call; persistent targets share one device between sessions).
    fn attach(&self, target: &str) -> Result<Arc<dyn BlockDevice>, LunError>;
}

/// The IQN of a node's target (RFC 3720 §3.2.6.3.1 "iqn." form): `node_id` lowercased,
/// characters an iSCSI name does not allow replaced by `-`.
pub fn node_target_iqn(node_id: &str) -> String {
    format!("{IQN_PREFIX}:node.{}", iqn_part(node_id))
}

/// The initiator name a node uses (node-init sets it), so the target can tell nodes apart
/// before CHAP: `iqn.2026-11.io.strata:init.<node>`.
pub fn node_initiator_iqn(node_id: &str) -> String {
    format!("{IQN_PREFIX}:init.{}", iqn_part(node_id))
}

/// The naming authority part of Strata's IQNs.
pub const IQN_PREFIX: &str = "iqn.2026-11.io.strata";

fn iqn_part(s: &str) -> String {
    s.chars()
        .map(|c| c.to_ascii_lowercase())
        .map(|c| {
            if c.is_ascii_alphanumeric() || c == '.' || c == '-' {
                c
            } else {
                '-'
            }
        })
        .collect()
}

/// How a [`StaticLuns`] target is backed.
pub enum Backing {
    /// One device shared by every session.
    Shared(Arc<dyn BlockDevice>),
    /// A chain (base first) read-only plus a fresh scratch layer per session.
    Stateless {
        /// Layers, base first.
        paths: Vec<PathBuf>,
        /// Where scratch layers are made.
        scratch_dir: PathBuf,
    },
}

/// A fixed set of targets, for the standalone CLI and tests.
#[derive(Default)]
pub struct StaticLuns {
    targets: BTreeMap<String, (TargetAccess, Backing)>,
}

impl StaticLuns {
    /// An empty set.
    pub fn new() -> StaticLuns {
        StaticLuns::default()
    }

    /// Adds (or replaces) `name`.
    pub fn insert(&mut self, name: impl Into<String>, access: TargetAccess, backing: Backing) {
        self.targets.insert(name.into(), (access, backing));
    }
}

impl LunProvider for StaticLuns {
    fn targets_for(&self, initiator: &str) -> Vec<String> {
        self.targets
            .iter()
            .filter(|(_, (a, _))| a.allows(initiator))
            .map(|(n, _)| n.clone())
            .collect()
    }
    fn access(&self, target: &str) -> Option<TargetAccess> {
        self.targets.get(target).map(|(a, _)| a.clone())
    }
    fn attach(&self, target: &str) -> Result<Arc<dyn BlockDevice>, LunError> {
        match self.targets.get(target) {
            None => Err(LunError::NoTarget(target.to_owned())),
            Some((_, Backing::Shared(d))) => Ok(d.clone()),
            Some((_, Backing::Stateless { paths, scratch_dir })) => {
                Ok(Arc::new(VhdxLun::open_stateless(paths, scratch_dir)?))
            }
        }
    }
}

/// A device in memory, for tests of the protocol layers.
#[derive(Debug)]
pub struct MemDevice {
    data: RwLock<Vec<u8>>,
    block_size: u32,
    read_only: bool,
}

impl MemDevice {
    /// `blocks` zeroed blocks of `block_size` bytes.
    pub fn new(blocks: u64, block_size: u32, read_only: bool) -> MemDevice {
        MemDevice {
            data: RwLock::new(vec![0; (blocks * u64::from(block_size)) as usize]),
            block_size,
            read_only,
        }
    }
}

impl BlockDevice for MemDevice {
    fn block_size(&self) -> u32 {
        self.block_size
    }
    fn blocks(&self) -> u64 {
        self.data.read().map(|d| d.len() as u64).unwrap_or(0) / u64::from(self.block_size)
    }
    fn read_only(&self) -> bool {
        self.read_only
    }
    fn read_at(&self, buf: &mut [u8], offset: u64) -> Result<(), LunError> {
        let d = self.data.read().unwrap_or_else(|p| p.into_inner());
        let src = d
            .get(offset as usize..offset as usize + buf.len())
            .ok_or_else(|| LunError::Io {
                op: "read",
                path: PathBuf::from("memory"),
                offset,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })?;
        buf.copy_from_slice(src);
        Ok(())
    }
    fn write_at(&self, buf: &[u8], offset: u64) -> Result<(), LunError> {
        if self.read_only {
            return Err(LunError::ReadOnly);
        }
        let mut d = self.data.write().unwrap_or_else(|p| p.into_inner());
        let dst = d
            .get_mut(offset as usize..offset as usize + buf.len())
            .ok_or_else(|| LunError::Io {
                op: "write",
                path: PathBuf::from("memory"),
                offset,
                source: std::io::ErrorKind::UnexpectedEof.into(),
            })?;
        dst.copy_from_slice(buf);
        Ok(())
    }
    fn flush(&self) -> Result<(), LunError> {
        Ok(())
    }
    fn id(&self) -> [u8; 16] {
        [0x5a; 16]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn iqns_from_node_ids() {
        assert_eq!(
            node_target_iqn("Rack1_Node 07"),
            "iqn.2026-11.io.strata:node.rack1-node-07"
        );
        assert_eq!(node_initiator_iqn("n1"), "iqn.2026-11.io.strata:init.n1");
    }

    #[test]
    fn access_by_initiator() {
        let a = TargetAccess {
            initiators: vec!["iqn.a".into()],
            ..Default::default()
        };
        assert!(a.allows("IQN.A"));
        assert!(!a.allows("iqn.b"));
        assert!(TargetAccess::default().allows("anyone"));
    }
}
