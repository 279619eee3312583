//! Node layers: a node's own files (host name, hosts, machine-id, node id, network
//! settings, identity token; see docs/images.md) as a differencing VHDX on its role layer.
//!
//! The first node layer of a role (per *shape*: how many file-system blocks each of the six
//! files takes) is made the general way: a copy of the role's raw image, the files written
//! with `debugfs`, `e2fsck -fn`. That image is the role's **node template**: the builder
//! records where each file's inode and data blocks sit, and keeps the 1 MiB blocks in
//! which the template differs from the role image. Every node layer of that role and shape
//! is then the template's blocks with the six files' data blocks and inode sizes replaced
//! (and the inode checksums of ext4's `metadata_csum` recomputed), written with
//! [`vhdx::differencing_from_blocks`]: no copy of the image, no debugfs, no read of the
//! whole disk. Directory entries, bitmaps, group descriptors and the superblock do not
//! depend on the files' contents, only on their block counts, which the shape fixes.
//!
//! The template checks itself when it is made: patching it with the facts it was built
//! from must give its own bytes back (this proves the inode checksum code against
//! e2fsprogs on this file system). A file system the fast path does not understand (inline
//! data, a file the template cannot locate, a failed self-check) falls back to the general
//! way for every node of that role; server/tests/images.rs checks that both ways give the
//! same image. Every layer is read back through its chain before it is published.

use std::collections::HashMap;
use std::fs;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use vhdx::Chain;
use wire::chunk::LayerId;
use wire::manifest::LayerKind;

use crate::store::{ImageVersion, LayerRecord, Store};

use super::ops::{self, Op};
use super::{copy_sparse, ext4, layer, BuildError, BUILDER_FORMAT, DEFAULT_EPOCH};

/// What the server knows about a node, written into its node layer.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct NodeFacts {
    /// Host name (RFC 1123 label).
    pub hostname: String,
    /// Canonical MAC `aa:bb:cc:dd:ee:ff`.
    pub mac: String,
    /// Static address in CIDR form (`10.0.0.5/24`), or None for DHCP.
    pub ip: Option<String>,
    /// Default gateway for a static address.
    pub gateway: Option<String>,
    /// Stable node identifier.
    pub node_id: String,
    /// The node's identity token (written 0600).
    pub token: String,
}

fn check_facts(f: &NodeFacts) -> Result<(), BuildError> {
    let bad = |m: String| BuildError::NodeFacts {
        node: f.node_id.clone(),
        message: m,
    };
    let h = f.hostname.as_bytes();
    if h.is_empty()
        || h.len() > 63
        || !h.iter().all(|c| c.is_ascii_alphanumeric() || *c == b'-')
        || h.first() == Some(&b'-')
    {
        return Err(bad(format!(
            "hostname {:?} is not an RFC 1123 label",
            f.hostname
        )));
    }
    if !wire::manifest::is_canonical_mac(&f.mac) {
        return Err(bad(format!("MAC {:?} is not aa:bb:cc:dd:ee:ff", f.mac)));
    }
    if f.node_id.is_empty()
        || f.node_id.len() > 128
        || f.node_id
            .chars()
            .any(|c| c.is_control() || c.is_whitespace())
    {
        return Err(bad(format!(
            "node id {:?} must be 1-128 printable characters",
            f.node_id
        )));
    }
    if f.token.is_empty() || f.token.len() > 4096 || f.token.chars().any(|c| c.is_control()) {
        return Err(bad("token must be 1-4096 printable characters".into()));
    }
    if let Some(ip) = &f.ip {
        let (addr, len) = ip
            .split_once('/')
            .ok_or_else(|| bad(format!("ip {ip:?} needs a /prefix")))?;
        addr.parse::<std::net::IpAddr>()
            .map_err(|_| bad(format!("ip {ip:?} is not an address")))?;
        len.parse::<u8>()
            .ok()
            .filter(|l| *l <= 128)
            .ok_or_else(|| bad(format!("ip {ip:?} has a bad prefix")))?;
    }
    if let Some(g) = &f.gateway {
        g.parse::<std::net::IpAddr>()
            .map_err(|_| bad(format!("gateway {g:?} is not an address")))?;
    }
    Ok(())
}

/// The machine id (32 hex digits) of a node: derived from its id, so rebuilding gives the same.
pub fn machine_id(node_id: &str) -> String {
    let h = blake3::Hasher::new()
        .update(b"strata machine-id\0")
        .update(node_id.as_bytes())
        .finalize();
    hex::encode(&h.as_bytes()[..16])
}

/// The files of a node layer: (path, content, mode).
pub fn node_files(f: &NodeFacts) -> Vec<(&'static str, String, u32)> {
    let mut net = format!("mac={}\n", f.mac);
    match &f.ip {
        Some(ip) => {
            net.push_str(&format!("address={ip}\n"));
            if let Some(g) = &f.gateway {
                net.push_str(&format!("gateway={g}\n"));
            }
        }
        None => net.push_str("dhcp=yes\n"),
    }
    vec![
        ("/etc/hostname", format!("{}\n", f.hostname), 0o644),
        (
            "/etc/hosts",
            format!("127.0.0.1\tlocalhost\n127.0.1.1\t{}\n", f.hostname),
            0o644,
        ),
        (
            "/etc/machine-id",
            format!("{}\n", machine_id(&f.node_id)),
            0o444,
        ),
        ("/etc/strata/node-id", format!("{}\n", f.node_id), 0o644),
        ("/etc/strata/network", net, 0o644),
        ("/etc/strata/token", format!("{}\n", f.token), 0o600),
    ]
}

/// Builds (or finds) the node layer of `node` on the chain `role` (its top is the role layer):
/// deterministic, recorded in the catalog, reused while the facts and the role are unchanged.
pub fn node_layer(
    store: &Store,
    role: &ImageVersion,
    facts: &NodeFacts,
) -> Result<LayerRecord, BuildError> {
    let mut v = node_layers(store, role, std::slice::from_ref(facts))?;
    v.pop().ok_or_else(|| BuildError::NotFound {
        what: format!("node layer of {}", facts.node_id),
    })
}

/// Node layers published per catalog transaction (and per flush of `layers/`).
const PUBLISH_BATCH: usize = 256;

/// [`node_layer`] for many nodes of one role, in the order given. Every node's facts are
/// checked before anything is built. Layers are published in batches: each file flushed
/// and renamed into the store, the directory flushed once and the catalog written in one
/// transaction per batch, so that a thousand nodes cost a thousand small writes, not a
/// thousand transactions. A failure leaves the batches before it published.
pub fn node_layers(
    store: &Store,
    role: &ImageVersion,
    facts: &[NodeFacts],
) -> Result<Vec<LayerRecord>, BuildError> {
    for f in facts {
        check_facts(f)?;
    }
    let top = role.layers.last().ok_or_else(|| BuildError::NotFound {
        what: "role chain layers".into(),
    })?;
    let mut done: Vec<Option<LayerRecord>> = vec![None; facts.len()];
    let mut todo = Vec::new();
    for (i, f) in facts.iter().enumerate() {
        let json = serde_json::to_vec(f).map_err(|e| BuildError::NodeFacts {
            node: f.node_id.clone(),
            message: e.to_string(),
        })?;
        let digest = blake3::Hasher::new()
            .update(BUILDER_FORMAT.as_bytes())
            .update(&json)
            .finalize()
            .to_hex()
            .to_string();
        let known = store.catalog().node_layer(&f.node_id, &top.id)?;
        if let Some((id, d)) = known {
            if d == digest {
                if let Some(rec) = store.layer_info(&id)? {
                    if store.layer_path(&id).is_file() {
                        if let Some(slot) = done.get_mut(i) {
                            *slot = Some(rec);
                        }
                        continue;
                    }
                }
            }
        }
        todo.push((i, digest));
    }
    if !todo.is_empty() {
        let _lock = store.lock_shared()?;
        let scratch = store.scratch("node")?;
        let sdir = scratch.path();
        let parent_paths = store.chain_paths(&role.layers);
        let mut parent: Option<Chain> = None;
        let mut batch = Vec::new();
        for (k, (i, digest)) in todo.into_iter().enumerate() {
            let Some(f) = facts.get(i) else { continue };
            let files = node_files(f);
            let out = sdir.join(format!("node-{k}.vhdx"));
            let rec = match template(store, role, f, &files, sdir)? {
                Some(t) => {
                    let blocks = t.patch(&files)?;
                    let chain = match parent.take() {
                        Some(c) => c,
                        None => {
                            Chain::from_paths(&parent_paths).map_err(|source| BuildError::Vhdx {
                                what: "opening the role chain".into(),
                                source,
                            })?
                        }
                    };
                    let rec = layer::prepare_blocks(
                        &blocks,
                        &chain,
                        &top.id,
                        &parent_paths,
                        LayerKind::Node,
                        &out,
                    );
                    parent = Some(chain);
                    rec?
                }
                None => {
                    let raw = sdir.join("node.raw");
                    let role_raw = write_node_image(store, role, &files, &raw, sdir)?;
                    // The blocks that differ from the role image are the only ones the layer
                    // holds, and the only ones read back.
                    let changed = layer::changed_blocks(&role_raw, &raw)?;
                    let chain: Vec<(LayerId, PathBuf)> = role
                        .layers
                        .iter()
                        .map(|l| (l.id, store.layer_path(&l.id)))
                        .collect();
                    let p = layer::prepare_checked(
                        &raw,
                        &chain,
                        &out,
                        Some(&changed),
                        LayerKind::Node,
                    )?;
                    let _ = fs::remove_file(&raw);
                    let (id, size, chunks) = crate::store::hash_file(&p.path)?;
                    LayerRecord {
                        id,
                        size,
                        virtual_size: p.virtual_size,
                        parent: Some(top.id),
                        kind: LayerKind::Node,
                        chunk_size: wire::chunk::CHUNK_SIZE,
                        chunks,
                    }
                }
            };
            if let Some(slot) = done.get_mut(i) {
                *slot = Some(rec.clone());
            }
            batch.push((out, rec, f.node_id.clone(), top.id, digest));
            if batch.len() >= PUBLISH_BATCH {
                store.publish_node_layers(&batch)?;
                batch.clear();
            }
        }
        store.publish_node_layers(&batch)?;
    }
    done.into_iter()
        .zip(facts)
        .map(|(r, f)| {
            r.ok_or_else(|| BuildError::NotFound {
                what: format!("node layer of {}", f.node_id),
            })
        })
        .collect()
}

/// The general way: the role's raw image copied to `raw` with the node's files written by
/// debugfs. Returns the role image's path (the store's cache).
fn write_node_image(
    store: &Store,
    role: &ImageVersion,
    files: &[(&'static str, String, u32)],
    raw: &Path,
    sdir: &Path,
) -> Result<PathBuf, BuildError> {
    let role_raw = layer::cached_raw(store, &role.layers, sdir)?;
    copy_sparse(&role_raw, raw)?;
    let mut all = Vec::new();
    for (i, (path, content, mode)) in files.iter().enumerate() {
        let host = sdir.join(format!("node-{i}"));
        fs::write(&host, content).map_err(|e| BuildError::io("writing", &host, e))?;
        all.push(Op::File {
            path: (*path).to_owned(),
            host,
            mode: *mode,
            uid: 0,
            gid: 0,
        });
    }
    ops::apply(raw, &all, DEFAULT_EPOCH, sdir)?;
    Ok(role_raw)
}

/// Writes the raw image of `facts`'s node on `role` to `out` the general way (the role's
/// image with the files written by debugfs), whatever way [`node_layer`] takes: tests and
/// benchmarks compare the two.
pub fn node_image_general(
    store: &Store,
    role: &ImageVersion,
    facts: &NodeFacts,
    out: &Path,
) -> Result<(), BuildError> {
    check_facts(facts)?;
    let scratch = store.scratch("node")?;
    write_node_image(store, role, &node_files(facts), out, scratch.path())?;
    Ok(())
}

/// True if node layers of the role whose top layer is `role_layer` have been made from a
/// node template (false before the first one, and for roles that take the general way).
pub fn node_template_in_use(store: &Store, role_layer: &LayerId) -> bool {
    store
        .node_templates()
        .map
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .iter()
        .any(|(k, v)| k.0 == *role_layer && v.is_some())
}

/// Node templates of a store, per (role layer, shape). `None` records that the fast path
/// does not apply to that role (its nodes take the general way).
#[derive(Debug, Default)]
pub struct TemplateCache {
    map: Mutex<HashMap<TemplateKey, Option<Arc<Template>>>>,
}

/// A role layer and a shape (file-system blocks per node file).
type TemplateKey = (LayerId, Vec<u64>);

/// At most this many templates are kept (each holds a few MiB of blocks).
const MAX_TEMPLATES: usize = 16;

fn template(
    store: &Store,
    role: &ImageVersion,
    facts: &NodeFacts,
    files: &[(&'static str, String, u32)],
    sdir: &Path,
) -> Result<Option<Arc<Template>>, BuildError> {
    let Some(top) = role.layers.last() else {
        return Ok(None);
    };
    let role_raw = layer::cached_raw(store, &role.layers, sdir)?;
    let fs_info = match FsInfo::read(&role_raw)? {
        Ok(i) => i,
        Err(why) => {
            tracing::debug!(role = %top.id, why, "node layers take the general way");
            return Ok(None);
        }
    };
    let shape: Vec<u64> = files
        .iter()
        .map(|f| (f.1.len() as u64).div_ceil(fs_info.block_size))
        .collect();
    let key = (top.id, shape);
    let cache = store.node_templates();
    if let Some(t) = cache
        .map
        .lock()
        .unwrap_or_else(|e| e.into_inner())
        .get(&key)
    {
        return Ok(t.clone());
    }
    let made = match Template::make(store, role, &role_raw, fs_info, files, sdir)? {
        Ok(t) => Some(Arc::new(t)),
        Err(why) => {
            tracing::warn!(role = %top.id, node = %facts.node_id, why, "node template not usable: node layers of this role take the general way");
            None
        }
    };
    let mut map = cache.map.lock().unwrap_or_else(|e| e.into_inner());
    if map.len() >= MAX_TEMPLATES {
        map.clear();
    }
    map.insert(key, made.clone());
    Ok(made)
}

/// What the fast path needs of the file system (from its superblock).
#[derive(Debug, Clone, Copy)]
struct FsInfo {
    block_size: u64,
    inode_size: usize,
    /// The seed of metadata_csum checksums, if the file system has them.
    csum_seed: Option<u32>,
}

/// ext4 superblock fields (at byte 1024 of the disk; Linux `struct ext4_super_block`).
const SB_OFFSET: u64 = 1024;
const SB_MAGIC: usize = 0x38;
const SB_LOG_BLOCK_SIZE: usize = 0x18;
const SB_INODE_SIZE: usize = 0x58;
const SB_FEATURE_INCOMPAT: usize = 0x60;
const SB_FEATURE_RO_COMPAT: usize = 0x64;
const SB_UUID: usize = 0x68;
const SB_CHECKSUM_SEED: usize = 0x270;
const INCOMPAT_CSUM_SEED: u32 = 0x2000;
const INCOMPAT_INLINE_DATA: u32 = 0x8000;
const RO_COMPAT_METADATA_CSUM: u32 = 0x400;
/// ext4 inode fields (`struct ext4_inode`).
const I_SIZE_LO: usize = 0x04;
const I_FLAGS: usize = 0x20;
const I_GENERATION: usize = 0x64;
const I_SIZE_HIGH: usize = 0x6C;
const I_CHECKSUM_LO: usize = 0x7C;
const I_EXTRA_ISIZE: usize = 0x80;
const I_CHECKSUM_HI: usize = 0x82;
const INODE_FLAG_INLINE_DATA: u32 = 0x1000_0000;
/// The VHDX block size of layers (see `layer::BLOCK_SIZE`).
const VBLOCK: u64 = layer::BLOCK_SIZE as u64;

fn le16(b: &[u8], at: usize) -> u16 {
    b.get(at..at + 2)
        .map_or(0, |x| u16::from_le_bytes([x[0], x[1]]))
}

fn le32(b: &[u8], at: usize) -> u32 {
    b.get(at..at + 4)
        .map_or(0, |x| u32::from_le_bytes([x[0], x[1], x[2], x[3]]))
}

fn put(b: &mut [u8], at: usize, v: &[u8]) {
    if let Some(x) = b.get_mut(at..at + v.len()) {
        x.copy_from_slice(v);
    }
}

/// CRC-32C as e2fsprogs' `ext2fs_crc32c_le` computes it: no inversion before or after.
fn crc32c_raw(seed: u32, data: &[u8]) -> u32 {
    !crc32c::crc32c_append(!seed, data)
}

impl FsInfo {
    /// Reads the superblock of the ext4 image `raw`; `Ok(Err(why))` if the fast path does not
    /// apply to it.
    fn read(raw: &Path) -> Result<Result<FsInfo, String>, BuildError> {
        let f = fs::File::open(raw).map_err(|e| BuildError::io("opening", raw, e))?;
        let mut sb = [0u8; 1024];
        f.read_exact_at(&mut sb, SB_OFFSET)
            .map_err(|e| BuildError::io("reading the superblock of", raw, e))?;
        if le16(&sb, SB_MAGIC) != 0xEF53 {
            return Ok(Err("no ext2/3/4 superblock".into()));
        }
        let log = le32(&sb, SB_LOG_BLOCK_SIZE);
        if log > 6 {
            return Ok(Err(format!("block size 2^{} bytes", 10 + log)));
        }
        let block_size = 1024u64 << log;
        let inode_size = usize::from(le16(&sb, SB_INODE_SIZE));
        if !(128..=4096).contains(&inode_size) || !inode_size.is_power_of_two() {
            return Ok(Err(format!("inode size {inode_size}")));
        }
        let incompat = le32(&sb, SB_FEATURE_INCOMPAT);
        if incompat & INCOMPAT_INLINE_DATA != 0 {
            return Ok(Err("inline_data: small files live in their inodes".into()));
        }
        let csum_seed =
            (le32(&sb, SB_FEATURE_RO_COMPAT) & RO_COMPAT_METADATA_CSUM != 0).then(|| {
                if incompat & INCOMPAT_CSUM_SEED != 0 {
                    le32(&sb, SB_CHECKSUM_SEED)
                } else {
                    crc32c_raw(!0, sb.get(SB_UUID..SB_UUID + 16).unwrap_or_default())
                }
            });
        Ok(Ok(FsInfo {
            block_size,
            inode_size,
            csum_seed,
        }))
    }
}

/// Where one node file lives in the template.
#[derive(Debug, Clone)]
struct Slot {
    path: &'static str,
    inode: u32,
    /// Disk offset of the inode.
    inode_at: u64,
    /// Disk offsets of the data blocks, in file order.
    data_at: Vec<u64>,
}

/// A role's node template (see the module docs).
#[derive(Debug)]
pub struct Template {
    fs: FsInfo,
    slots: Vec<Slot>,
    /// The template's 1 MiB blocks that differ from the role image or hold a slot, in
    /// increasing order.
    blocks: Vec<(u64, Vec<u8>)>,
}

impl Template {
    /// Makes the template from the facts of the node being built. `Ok(Err(why))` if the
    /// fast path does not apply.
    fn make(
        store: &Store,
        role: &ImageVersion,
        role_raw: &Path,
        fs_info: FsInfo,
        files: &[(&'static str, String, u32)],
        sdir: &Path,
    ) -> Result<Result<Template, String>, BuildError> {
        let raw = sdir.join("template.raw");
        write_node_image(store, role, files, &raw, sdir)?;
        ext4::fsck(&raw)?;
        // Where each file's inode and blocks are.
        let mut script = ext4::Script::default();
        for (path, _, _) in files {
            script.line(format!("imap {}", ext4::quote(path)?));
            script.line(format!("blocks {}", ext4::quote(path)?));
        }
        let out = ext4::debugfs(&raw, false, &script, sdir)?;
        let slots = match parse_locations(&out, files, fs_info.block_size) {
            Ok(s) => s,
            Err(why) => return Ok(Err(why)),
        };
        // The blocks to keep: those that differ from the role image, and those holding a slot.
        let mut keep: std::collections::BTreeSet<u64> =
            layer::changed_blocks(role_raw, &raw)?.into_iter().collect();
        for s in &slots {
            keep.insert(s.inode_at / VBLOCK);
            keep.extend(s.data_at.iter().map(|d| d / VBLOCK));
        }
        let f = fs::File::open(&raw).map_err(|e| BuildError::io("opening", &raw, e))?;
        let len = f
            .metadata()
            .map_err(|e| BuildError::io("reading", &raw, e))?
            .len();
        let mut blocks = Vec::with_capacity(keep.len());
        for b in keep {
            let start = b * VBLOCK;
            let n = usize::try_from(VBLOCK.min(len.saturating_sub(start))).unwrap_or(0);
            let mut buf = vec![0u8; n];
            f.read_exact_at(&mut buf, start)
                .map_err(|e| BuildError::io("reading", &raw, e))?;
            blocks.push((b, buf));
        }
        let t = Template {
            fs: fs_info,
            slots,
            blocks,
        };
        // Each inode must be one the fast path can rewrite.
        for s in &t.slots {
            let inode = t.read(s.inode_at, fs_info.inode_size)?;
            if le32(&inode, I_FLAGS) & INODE_FLAG_INLINE_DATA != 0 {
                return Ok(Err(format!("{} has inline data", s.path)));
            }
        }
        // Self-check: patching the template with its own facts gives its own bytes.
        let again = t.patch(files)?;
        if again != t.blocks {
            return Ok(Err(
                "patching the template with its own files does not reproduce it (inode checksum?)"
                    .into(),
            ));
        }
        Ok(Ok(t))
    }

    fn find(&self, at: u64, len: usize) -> Result<(usize, usize), BuildError> {
        let b = at / VBLOCK;
        let i = self
            .blocks
            .binary_search_by_key(&b, |x| x.0)
            .map_err(|_| BuildError::Verify {
                message: format!("node template: offset {at} outside its blocks"),
            })?;
        let off = usize::try_from(at % VBLOCK).unwrap_or(usize::MAX);
        if self
            .blocks
            .get(i)
            .is_none_or(|x| off.saturating_add(len) > x.1.len())
        {
            return Err(BuildError::Verify {
                message: format!("node template: {len} bytes at {at} cross a block"),
            });
        }
        Ok((i, off))
    }

    fn read(&self, at: u64, len: usize) -> Result<Vec<u8>, BuildError> {
        let (i, off) = self.find(at, len)?;
        Ok(self
            .blocks
            .get(i)
            .and_then(|b| b.1.get(off..off + len))
            .unwrap_or_default()
            .to_vec())
    }

    /// The node image's blocks for `files` (whose shape must be the template's).
    fn patch(
        &self,
        files: &[(&'static str, String, u32)],
    ) -> Result<Vec<(u64, Vec<u8>)>, BuildError> {
        let mut blocks = self.blocks.clone();
        let bs = usize::try_from(self.fs.block_size).unwrap_or(4096);
        if files.len() != self.slots.len() {
            return Err(BuildError::Verify {
                message: "node template: file count differs".into(),
            });
        }
        for (slot, (path, content, _)) in self.slots.iter().zip(files) {
            let bytes = content.as_bytes();
            if slot.path != *path || bytes.len().div_ceil(bs) != slot.data_at.len() {
                return Err(BuildError::Verify {
                    message: format!("node template: {path} does not fit its slot"),
                });
            }
            let mut buf = vec![0u8; bs];
            for (k, &at) in slot.data_at.iter().enumerate() {
                buf.fill(0);
                let part = bytes
                    .get(k * bs..((k + 1) * bs).min(bytes.len()))
                    .unwrap_or_default();
                put(&mut buf, 0, part);
                let (i, off) = self.find(at, bs)?;
                if let Some(b) = blocks.get_mut(i) {
                    put(&mut b.1, off, &buf);
                }
            }
            let isz = self.fs.inode_size;
            let (i, off) = self.find(slot.inode_at, isz)?;
            let Some(inode) = blocks.get_mut(i).and_then(|b| b.1.get_mut(off..off + isz)) else {
                continue;
            };
            let size = bytes.len() as u64;
            put(inode, I_SIZE_LO, &(size as u32).to_le_bytes());
            put(inode, I_SIZE_HIGH, &((size >> 32) as u32).to_le_bytes());
            if let Some(seed) = self.fs.csum_seed {
                let has_hi = isz > 128 && le16(inode, I_EXTRA_ISIZE) >= 4;
                put(inode, I_CHECKSUM_LO, &[0, 0]);
                if has_hi {
                    put(inode, I_CHECKSUM_HI, &[0, 0]);
                }
                let mut c = crc32c_raw(seed, &slot.inode.to_le_bytes());
                c = crc32c_raw(c, &le32(inode, I_GENERATION).to_le_bytes());
                c = crc32c_raw(c, inode);
                put(inode, I_CHECKSUM_LO, &((c & 0xffff) as u16).to_le_bytes());
                if has_hi {
                    put(inode, I_CHECKSUM_HI, &((c >> 16) as u16).to_le_bytes());
                }
            }
        }
        Ok(blocks)
    }
}

/// Parses the output of `imap P` and `blocks P` for each file, in order. debugfs echoes each
/// command as `debugfs: CMD`; `imap` prints `Inode N is part of block group G` and
/// `located at block B, offset 0xOFF`; `blocks` prints the data blocks on one line.
fn parse_locations(
    out: &str,
    files: &[(&'static str, String, u32)],
    block_size: u64,
) -> Result<Vec<Slot>, String> {
    let mut sections: Vec<Vec<&str>> = Vec::new();
    for line in out.lines() {
        if line.starts_with("debugfs: ") {
            sections.push(Vec::new());
        } else if let Some(s) = sections.last_mut() {
            s.push(line.trim());
        }
    }
    if sections.len() != files.len() * 2 {
        return Err(format!(
            "debugfs printed {} sections for {} commands",
            sections.len(),
            files.len() * 2
        ));
    }
    let mut slots = Vec::new();
    for (k, (path, content, _)) in files.iter().enumerate() {
        let imap = sections.get(2 * k).map(|s| s.join(" ")).unwrap_or_default();
        let blocks = sections
            .get(2 * k + 1)
            .map(|s| s.join(" "))
            .unwrap_or_default();
        let inode: u32 = imap
            .strip_prefix("Inode ")
            .and_then(|r| r.split_whitespace().next())
            .and_then(|n| n.parse().ok())
            .ok_or_else(|| format!("{path}: cannot read imap output {imap:?}"))?;
        let at = imap
            .find("located at block ")
            .map(|i| &imap[i + "located at block ".len()..])
            .ok_or_else(|| format!("{path}: imap {imap:?}"))?;
        let (blk, off) = at
            .split_once(", offset 0x")
            .ok_or_else(|| format!("{path}: imap {imap:?}"))?;
        let blk: u64 = blk
            .trim()
            .parse()
            .map_err(|_| format!("{path}: imap block {blk:?}"))?;
        let off = u64::from_str_radix(off.trim(), 16)
            .map_err(|_| format!("{path}: imap offset {off:?}"))?;
        let data_at: Vec<u64> = blocks
            .split_whitespace()
            .map(|b| {
                b.parse::<u64>()
                    .map(|b| b * block_size)
                    .map_err(|_| format!("{path}: block {b:?}"))
            })
            .collect::<Result<_, _>>()?;
        if data_at.len() as u64 != (content.len() as u64).div_ceil(block_size) {
            return Err(format!(
                "{path}: {} data blocks for {} bytes",
                data_at.len(),
                content.len()
            ));
        }
        slots.push(Slot {
            path,
            inode,
            inode_at: blk * block_size + off,
            data_at,
        });
    }
    Ok(slots)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn files() -> Vec<(&'static str, String, u32)> {
        vec![
            ("/etc/hostname", "n1\n".into(), 0o644),
            ("/etc/strata/token", "t".repeat(5000), 0o600),
        ]
    }

    #[test]
    fn debugfs_locations_parse() {
        let out = "debugfs: imap \"/etc/hostname\"\nInode 12 is part of block group 0\n\tlocated at block 25, offset 0x0b00\n\
                   debugfs: blocks \"/etc/hostname\"\n4242 \n\
                   debugfs: imap \"/etc/strata/token\"\nInode 13 is part of block group 0\n\tlocated at block 25, offset 0x0c00\n\
                   debugfs: blocks \"/etc/strata/token\"\n5000 5001 \n";
        let s = parse_locations(out, &files(), 4096).unwrap();
        assert_eq!(
            (s[0].inode, s[0].inode_at, s[0].data_at.clone()),
            (12, 25 * 4096 + 0xb00, vec![4242 * 4096])
        );
        assert_eq!(s[1].data_at, vec![5000 * 4096, 5001 * 4096]);
    }

    #[test]
    fn unexpected_debugfs_output_is_refused_not_guessed() {
        let f = files();
        // Missing sections, a garbled imap line, a block count that does not fit the size.
        assert!(parse_locations("", &f, 4096).is_err());
        let garbled = "debugfs: imap\nInode x\ndebugfs: blocks\n1\ndebugfs: imap\nInode 13 is part of block group 0 located at block 2, offset 0x0\ndebugfs: blocks\n1 2\n";
        assert!(parse_locations(garbled, &f, 4096).is_err());
        let short = "debugfs: imap\nInode 12 is part of block group 0 located at block 2, offset 0x0\ndebugfs: blocks\n1\n\
                     debugfs: imap\nInode 13 is part of block group 0 located at block 2, offset 0x100\ndebugfs: blocks\n7\n";
        assert!(parse_locations(short, &f, 4096)
            .unwrap_err()
            .contains("data blocks"));
    }

    #[test]
    fn raw_crc32c_matches_e2fsprogs_convention() {
        // ext2fs_crc32c_le(~0, "123456789") without the final inversion is the complement of
        // the standard CRC-32C check value 0xE3069283.
        assert_eq!(crc32c_raw(!0, b"123456789"), !0xE306_9283);
    }
}
