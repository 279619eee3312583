//! Base sources: the root file system of a base comes from nothing (the recipe's own entries),
//! a root directory, a tarball, an OCI image archive, or an existing ext4 disk image.
//!
//! Archives are unpacked into a scratch staging tree that is never followed through a link:
//! an entry whose path has a `..` component, or whose parent inside the tree is a symbolic
//! link (an entry written *through* a link, e.g. `evil -> /etc` then `evil/passwd`), or a
//! relative link or hard link whose target climbs above the root, is rejected with the
//! archive and entry named. Absolute link targets are kept as data: inside the image they
//! resolve against the image's own root. Owners, modes and device nodes from the archive are
//! recorded and applied to the image with debugfs, so no root is needed.
//!
//! OCI: an OCI image layout (`oci-layout`, `index.json`, `blobs/sha256/...`) or a `docker save`
//! archive (`manifest.json`); layers are applied in order with their whiteouts (`.wh.<name>`
//! removes a lower entry, `.wh..wh..opq` empties a lower directory), and every blob is checked
//! against its sha256 digest.

use std::collections::{BTreeMap, BTreeSet};
use std::fs::{self, File};
use std::io::{self, BufReader, Read, Seek, SeekFrom};
use std::path::{Component, Path, PathBuf};
use std::process::Command;

use sha2::{Digest as _, Sha256};

use super::ext4::Script;
use super::recipe::relative_stays_inside;
use super::BuildError;

/// Metadata of one staged entry, applied to the image after `mke2fs -d`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Meta {
    /// Type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
}

/// A device node or fifo to make with debugfs.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Node {
    /// Path in the image.
    pub path: String,
    /// `c`, `b` or `p`.
    pub kind: char,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// Metadata.
    pub meta: Meta,
}

/// A staged root tree built from archives.
#[derive(Debug)]
pub struct Stage {
    /// The tree.
    pub root: PathBuf,
    /// Metadata per image path (`/etc/passwd`).
    pub meta: BTreeMap<String, Meta>,
    /// Device nodes and fifos (not staged as files).
    pub nodes: BTreeMap<String, Node>,
    /// Paths written by the layer being applied (whiteouts only hide lower layers).
    this_layer: BTreeSet<String>,
}

fn arch_err(archive: &Path, entry: &str, problem: impl Into<String>) -> BuildError {
    BuildError::Archive {
        archive: archive.to_owned(),
        entry: entry.to_owned(),
        problem: problem.into(),
    }
}

/// Normalises an archive member name to an image path (`/a/b`), rejecting `..`.
fn member_path(archive: &Path, raw: &Path) -> Result<Option<String>, BuildError> {
    let shown = raw.display().to_string();
    let mut parts = Vec::new();
    for c in raw.components() {
        match c {
            Component::Normal(n) => {
                let n = n
                    .to_str()
                    .ok_or_else(|| arch_err(archive, &shown, "name is not UTF-8"))?;
                if n.chars().any(|ch| ch == '"' || ch.is_control()) {
                    return Err(arch_err(
                        archive,
                        &shown,
                        "name has quotes or control characters",
                    ));
                }
                parts.push(n.to_owned());
            }
            Component::CurDir | Component::RootDir => {}
            Component::ParentDir => {
                return Err(arch_err(archive, &shown, "path has a .. component"))
            }
            Component::Prefix(_) => return Err(arch_err(archive, &shown, "path has a prefix")),
        }
    }
    if parts.is_empty() {
        return Ok(None);
    }
    Ok(Some(format!("/{}", parts.join("/"))))
}

impl Stage {
    /// An empty stage in `root` (which must exist).
    pub fn new(root: PathBuf) -> Stage {
        Stage {
            root,
            meta: BTreeMap::new(),
            nodes: BTreeMap::new(),
            this_layer: BTreeSet::new(),
        }
    }

    fn host(&self, p: &str) -> PathBuf {
        self.root.join(p.trim_start_matches('/'))
    }

    /// Makes sure every parent of `p` is a real directory in the stage (never a link).
    fn parents(&mut self, archive: &Path, p: &str) -> Result<(), BuildError> {
        let mut cur = String::new();
        let comps: Vec<&str> = p.trim_start_matches('/').split('/').collect();
        for c in comps.iter().take(comps.len().saturating_sub(1)) {
            cur.push('/');
            cur.push_str(c);
            let host = self.host(&cur);
            match fs::symlink_metadata(&host) {
                Ok(md) if md.is_dir() => {}
                Ok(md) if md.file_type().is_symlink() => {
                    return Err(arch_err(
                        archive,
                        p,
                        format!(
                        "parent {cur} is a symbolic link: writing through it could escape the root"
                    ),
                    ))
                }
                Ok(_) => {
                    return Err(arch_err(
                        archive,
                        p,
                        format!("parent {cur} is not a directory"),
                    ))
                }
                Err(e) if e.kind() == io::ErrorKind::NotFound => {
                    if self.nodes.contains_key(&cur) {
                        return Err(arch_err(
                            archive,
                            p,
                            format!("parent {cur} is a device node"),
                        ));
                    }
                    fs::create_dir(&host).map_err(|e| BuildError::io("creating", &host, e))?;
                    self.meta.entry(cur.clone()).or_insert(Meta {
                        mode: 0o040755,
                        uid: 0,
                        gid: 0,
                    });
                }
                Err(e) => return Err(BuildError::io("reading", &host, e)),
            }
        }
        Ok(())
    }

    /// Removes whatever is at `p` (for replacement or whiteout); `keep_this_layer` spares
    /// entries the current layer wrote.
    fn remove(&mut self, p: &str, keep_this_layer: bool) -> Result<(), BuildError> {
        let host = self.host(p);
        let prefix = format!("{p}/");
        let spared: Vec<String> = if keep_this_layer {
            self.this_layer
                .iter()
                .filter(|q| *q == p || q.starts_with(&prefix))
                .cloned()
                .collect()
        } else {
            Vec::new()
        };
        if !spared.is_empty() {
            // Opaque directory written partly by this layer: remove only lower entries.
            if let Ok(rd) = fs::read_dir(&host) {
                for e in rd.flatten() {
                    if let Some(n) = e.file_name().to_str() {
                        let child = format!("{p}/{n}");
                        if !self.this_layer.contains(&child) {
                            self.remove(&child, true)?;
                        }
                    }
                }
            }
            return Ok(());
        }
        match fs::symlink_metadata(&host) {
            Ok(md) if md.is_dir() => {
                fs::remove_dir_all(&host).map_err(|e| BuildError::io("removing", &host, e))?
            }
            Ok(_) => fs::remove_file(&host).map_err(|e| BuildError::io("removing", &host, e))?,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(BuildError::io("reading", &host, e)),
        }
        self.meta.retain(|k, _| k != p && !k.starts_with(&prefix));
        self.nodes.retain(|k, _| k != p && !k.starts_with(&prefix));
        Ok(())
    }

    /// Unpacks one tar stream into the stage. With `oci`, whiteouts are applied.
    pub fn unpack(
        &mut self,
        archive: &Path,
        reader: impl Read,
        oci: bool,
    ) -> Result<(), BuildError> {
        self.this_layer.clear();
        let mut ar = tar::Archive::new(reader);
        let entries = ar
            .entries()
            .map_err(|e| arch_err(archive, "-", format!("not a tar archive: {e}")))?;
        for entry in entries {
            let mut entry =
                entry.map_err(|e| arch_err(archive, "-", format!("corrupt tar: {e}")))?;
            let raw = entry
                .path()
                .map_err(|e| arch_err(archive, "-", format!("bad member name: {e}")))?
                .into_owned();
            let Some(p) = member_path(archive, &raw)? else {
                continue;
            };
            let name = p.rsplit('/').next().unwrap_or_default().to_owned();
            let dir = p[..p.len() - name.len()].trim_end_matches('/').to_owned();
            let dir = if dir.is_empty() { "/".to_owned() } else { dir };
            if oci && name == ".wh..wh..opq" {
                self.parents(archive, &p)?;
                let host = self.host(&dir);
                if let Ok(rd) = fs::read_dir(&host) {
                    let mut names: Vec<String> = rd
                        .flatten()
                        .filter_map(|e| e.file_name().to_str().map(str::to_owned))
                        .collect();
                    names.sort();
                    for n in names {
                        let child = super::ops::join(&dir, &n);
                        if !self.this_layer.contains(&child) {
                            self.remove(&child, true)?;
                        }
                    }
                }
                continue;
            }
            if oci {
                if let Some(hidden) = name.strip_prefix(".wh.") {
                    let victim = super::ops::join(&dir, hidden);
                    self.parents(archive, &victim)?;
                    self.remove(&victim, false)?;
                    continue;
                }
            }
            self.parents(archive, &p)?;
            let h = entry.header();
            let mode = h
                .mode()
                .map_err(|e| arch_err(archive, &p, format!("bad mode: {e}")))?
                & 0o7777;
            let uid = u32::try_from(
                h.uid()
                    .map_err(|e| arch_err(archive, &p, format!("bad uid: {e}")))?,
            )
            .map_err(|_| arch_err(archive, &p, "uid out of range"))?;
            let gid = u32::try_from(
                h.gid()
                    .map_err(|e| arch_err(archive, &p, format!("bad gid: {e}")))?,
            )
            .map_err(|_| arch_err(archive, &p, "gid out of range"))?;
            let host = self.host(&p);
            let kind = h.entry_type();
            // Replace what a lower layer (or an earlier member) put there, except a directory
            // by a directory.
            let existing_dir = fs::symlink_metadata(&host)
                .map(|m| m.is_dir())
                .unwrap_or(false);
            if !(kind.is_dir() && existing_dir) {
                self.remove(&p, false)?;
            }
            self.this_layer.insert(p.clone());
            match kind {
                tar::EntryType::Directory => {
                    if !existing_dir {
                        fs::create_dir(&host).map_err(|e| BuildError::io("creating", &host, e))?;
                    }
                    self.meta.insert(
                        p,
                        Meta {
                            mode: 0o040000 | mode,
                            uid,
                            gid,
                        },
                    );
                }
                tar::EntryType::Regular | tar::EntryType::Continuous => {
                    let mut f =
                        File::create(&host).map_err(|e| BuildError::io("creating", &host, e))?;
                    io::copy(&mut entry, &mut f)
                        .map_err(|e| arch_err(archive, &p, format!("reading content: {e}")))?;
                    self.meta.insert(
                        p,
                        Meta {
                            mode: 0o100000 | mode,
                            uid,
                            gid,
                        },
                    );
                }
                tar::EntryType::Symlink => {
                    let target = entry
                        .link_name()
                        .map_err(|e| arch_err(archive, &p, format!("bad link target: {e}")))?
                        .ok_or_else(|| arch_err(archive, &p, "symbolic link without a target"))?
                        .into_owned();
                    let t = target
                        .to_str()
                        .ok_or_else(|| arch_err(archive, &p, "link target is not UTF-8"))?;
                    if t.chars().any(|c| c == '"' || c.is_control()) || t.is_empty() {
                        return Err(arch_err(
                            archive,
                            &p,
                            "link target has quotes or control characters",
                        ));
                    }
                    if !target.is_absolute()
                        && !relative_stays_inside(
                            &Path::new(dir.trim_start_matches('/')).join(&target),
                        )
                    {
                        return Err(arch_err(
                            archive,
                            &p,
                            format!("symbolic link to {t} escapes the root"),
                        ));
                    }
                    std::os::unix::fs::symlink(&target, &host)
                        .map_err(|e| BuildError::io("creating", &host, e))?;
                    self.meta.insert(
                        p,
                        Meta {
                            mode: 0o120777,
                            uid,
                            gid,
                        },
                    );
                }
                tar::EntryType::Link => {
                    let target = entry
                        .link_name()
                        .map_err(|e| arch_err(archive, &p, format!("bad link target: {e}")))?
                        .ok_or_else(|| arch_err(archive, &p, "hard link without a target"))?
                        .into_owned();
                    let tp = member_path(archive, &target)
                        .map_err(|_| {
                            arch_err(
                                archive,
                                &p,
                                format!("hard link to {} escapes the root", target.display()),
                            )
                        })?
                        .ok_or_else(|| arch_err(archive, &p, "hard link to the root"))?;
                    let th = self.host(&tp);
                    match fs::symlink_metadata(&th) {
                        Ok(md) if md.is_file() => {}
                        _ => {
                            return Err(arch_err(
                                archive,
                                &p,
                                format!(
                                    "hard link to {tp}, which is not a regular file in the archive"
                                ),
                            ))
                        }
                    }
                    self.parents(archive, &tp)?;
                    fs::hard_link(&th, &host).map_err(|e| BuildError::io("linking", &host, e))?;
                    let m = self.meta.get(&tp).copied().unwrap_or(Meta {
                        mode: 0o100644,
                        uid: 0,
                        gid: 0,
                    });
                    self.meta.insert(p, m);
                }
                tar::EntryType::Char | tar::EntryType::Block | tar::EntryType::Fifo => {
                    let (k, ty) = match kind {
                        tar::EntryType::Char => ('c', 0o020000),
                        tar::EntryType::Block => ('b', 0o060000),
                        _ => ('p', 0o010000),
                    };
                    let major = h.device_major().ok().flatten().unwrap_or(0);
                    let minor = h.device_minor().ok().flatten().unwrap_or(0);
                    self.nodes.insert(
                        p.clone(),
                        Node {
                            path: p,
                            kind: k,
                            major,
                            minor,
                            meta: Meta {
                                mode: ty | mode,
                                uid,
                                gid,
                            },
                        },
                    );
                }
                tar::EntryType::XGlobalHeader
                | tar::EntryType::XHeader
                | tar::EntryType::GNULongName
                | tar::EntryType::GNULongLink => {}
                other => {
                    return Err(arch_err(
                        archive,
                        &p,
                        format!("unsupported member type {other:?}"),
                    ))
                }
            }
        }
        Ok(())
    }

    /// The debugfs script that gives every staged path its archive metadata and the epoch as
    /// its times, and makes the device nodes.
    pub fn fixup_script(&self, epoch: u64) -> Result<Script, BuildError> {
        let mut s = Script::new(epoch);
        s.set_meta("/", 0o040755, 0, 0, epoch)?;
        s.set_times("/lost+found", epoch)?;
        for (p, m) in &self.meta {
            s.set_meta(p, m.mode, m.uid, m.gid, epoch)?;
        }
        for n in self.nodes.values() {
            s.mknod(&n.path, n.kind, n.major, n.minor)?;
            s.set_meta(&n.path, n.meta.mode, n.meta.uid, n.meta.gid, epoch)?;
        }
        Ok(s)
    }
}

/// Opens a possibly gzip-compressed stream (by its magic bytes).
fn maybe_gunzip<'a>(mut r: impl Read + 'a) -> io::Result<Box<dyn Read + 'a>> {
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < 2 {
        let n = r.read(&mut magic[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = io::Cursor::new(magic[..got].to_vec());
    let chained = head.chain(r);
    if got == 2 && magic == [0x1f, 0x8b] {
        Ok(Box::new(flate2::read::GzDecoder::new(chained)))
    } else {
        Ok(Box::new(chained))
    }
}

/// Unpacks a (possibly gzipped) tarball into the stage.
pub fn unpack_tarball(stage: &mut Stage, archive: &Path) -> Result<(), BuildError> {
    let f = File::open(archive).map_err(|e| BuildError::io("opening", archive, e))?;
    let r = maybe_gunzip(BufReader::new(f)).map_err(|e| arch_err(archive, "-", e.to_string()))?;
    stage.unpack(archive, r, false)
}

/// Where one member of an outer archive lives: (data offset, size).
type Index = BTreeMap<String, (u64, u64)>;

fn index_archive(archive: &Path) -> Result<Index, BuildError> {
    let f = File::open(archive).map_err(|e| BuildError::io("opening", archive, e))?;
    let mut ar = tar::Archive::new(BufReader::new(f));
    let mut idx = Index::new();
    let entries = ar
        .entries()
        .map_err(|e| arch_err(archive, "-", format!("not a tar archive: {e}")))?;
    for e in entries {
        let e = e.map_err(|e| arch_err(archive, "-", format!("corrupt archive: {e}")))?;
        let name = e
            .path()
            .map_err(|e| arch_err(archive, "-", format!("bad member name: {e}")))?;
        let name = name.to_string_lossy().trim_start_matches("./").to_owned();
        if e.header().entry_type().is_file() {
            idx.insert(name, (e.raw_file_position(), e.size()));
        }
    }
    Ok(idx)
}

const MAX_JSON: u64 = 4 << 20;

fn member(
    archive: &Path,
    idx: &Index,
    name: &str,
) -> Result<io::Take<BufReader<File>>, BuildError> {
    let &(off, size) = idx
        .get(name)
        .ok_or_else(|| arch_err(archive, name, "member missing from the archive"))?;
    let mut f = File::open(archive).map_err(|e| BuildError::io("opening", archive, e))?;
    f.seek(SeekFrom::Start(off))
        .map_err(|e| BuildError::io("seeking", archive, e))?;
    Ok(BufReader::new(f).take(size))
}

fn member_json(archive: &Path, idx: &Index, name: &str) -> Result<serde_json::Value, BuildError> {
    let &(_, size) = idx
        .get(name)
        .ok_or_else(|| arch_err(archive, name, "member missing from the archive"))?;
    if size > MAX_JSON {
        return Err(arch_err(
            archive,
            name,
            format!("{size} bytes of JSON is more than the {MAX_JSON} allowed"),
        ));
    }
    let mut text = Vec::new();
    member(archive, idx, name)?
        .read_to_end(&mut text)
        .map_err(|e| BuildError::io("reading", archive, e))?;
    serde_json::from_slice(&text).map_err(|e| arch_err(archive, name, format!("bad JSON: {e}")))
}

fn blob_name(archive: &Path, digest: &str) -> Result<(String, String), BuildError> {
    let hex = digest
        .strip_prefix("sha256:")
        .filter(|h| h.len() == 64 && h.bytes().all(|b| b.is_ascii_hexdigit()))
        .ok_or_else(|| arch_err(archive, digest, "digest is not sha256:<64 hex>"))?;
    Ok((format!("blobs/sha256/{hex}"), hex.to_ascii_lowercase()))
}

/// Reads a blob, checking its sha256 while reading; the reader hands the bytes on.
struct Verified<R> {
    inner: R,
    hasher: Sha256,
    want: String,
}

impl<R: Read> Read for Verified<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let n = self.inner.read(buf)?;
        self.hasher.update(buf.get(..n).unwrap_or_default());
        Ok(n)
    }
}

impl<R: Read> Verified<R> {
    fn finish(mut self, archive: &Path, name: &str) -> Result<(), BuildError> {
        // Bytes after the tar end-of-archive still count toward the digest.
        io::copy(&mut self, &mut io::sink()).map_err(|e| BuildError::io("reading", archive, e))?;
        let got = hex::encode(self.hasher.finalize());
        if got != self.want {
            return Err(arch_err(
                archive,
                name,
                format!("content hashes to sha256:{got}, not sha256:{}", self.want),
            ));
        }
        Ok(())
    }
}

/// Unpacks an OCI image archive (OCI layout or `docker save`) into the stage.
pub fn unpack_oci(stage: &mut Stage, archive: &Path) -> Result<(), BuildError> {
    let idx = index_archive(archive)?;
    let layers: Vec<(String, Option<String>)> = if idx.contains_key("index.json") {
        let index = member_json(archive, &idx, "index.json")?;
        let mut desc = index
            .get("manifests")
            .and_then(|m| m.as_array())
            .and_then(|m| m.first())
            .cloned()
            .ok_or_else(|| arch_err(archive, "index.json", "no manifests"))?;
        // Follow nested indexes (multi-platform) to the first image manifest.
        let mut depth = 0;
        loop {
            let digest = desc
                .get("digest")
                .and_then(|d| d.as_str())
                .ok_or_else(|| arch_err(archive, "index.json", "manifest without digest"))?;
            let (name, _) = blob_name(archive, digest)?;
            let m = member_json(archive, &idx, &name)?;
            if let Some(next) = m
                .get("manifests")
                .and_then(|x| x.as_array())
                .and_then(|x| x.first())
            {
                depth += 1;
                if depth > 4 {
                    return Err(arch_err(archive, &name, "image indexes nested too deep"));
                }
                desc = next.clone();
                continue;
            }
            let ls = m
                .get("layers")
                .and_then(|l| l.as_array())
                .ok_or_else(|| arch_err(archive, &name, "manifest has no layers"))?;
            let mut out = Vec::new();
            for l in ls {
                let d = l
                    .get("digest")
                    .and_then(|d| d.as_str())
                    .ok_or_else(|| arch_err(archive, &name, "layer without digest"))?;
                let (n, hex) = blob_name(archive, d)?;
                out.push((n, Some(hex)));
            }
            break out;
        }
    } else if idx.contains_key("manifest.json") {
        let m = member_json(archive, &idx, "manifest.json")?;
        let first = m
            .as_array()
            .and_then(|a| a.first())
            .ok_or_else(|| arch_err(archive, "manifest.json", "empty manifest list"))?;
        let ls = first
            .get("Layers")
            .and_then(|l| l.as_array())
            .ok_or_else(|| arch_err(archive, "manifest.json", "no Layers"))?;
        let mut out = Vec::new();
        for l in ls {
            let n = l
                .as_str()
                .ok_or_else(|| arch_err(archive, "manifest.json", "layer name is not a string"))?;
            // Newer docker writes layers as blobs/sha256/<hex>: verify those.
            let hex = n.strip_prefix("blobs/sha256/").map(str::to_owned);
            out.push((n.trim_start_matches("./").to_owned(), hex));
        }
        out
    } else {
        return Err(arch_err(
            archive,
            "-",
            "neither index.json (OCI layout) nor manifest.json (docker save) found",
        ));
    };
    if layers.is_empty() {
        return Err(arch_err(archive, "-", "image has no layers"));
    }
    for (name, hex) in layers {
        let r = member(archive, &idx, &name)?;
        match hex {
            Some(want) => {
                let mut v = Verified {
                    inner: r,
                    hasher: Sha256::new(),
                    want,
                };
                {
                    let z = maybe_gunzip(&mut v)
                        .map_err(|e| arch_err(archive, &name, e.to_string()))?;
                    stage.unpack(archive, z, true).map_err(|e| match e {
                        BuildError::Archive {
                            archive,
                            entry,
                            problem,
                        } => BuildError::Archive {
                            archive,
                            entry: format!("{name}: {entry}"),
                            problem,
                        },
                        other => other,
                    })?;
                }
                v.finish(archive, &name)?;
            }
            None => {
                let z = maybe_gunzip(r).map_err(|e| arch_err(archive, &name, e.to_string()))?;
                stage.unpack(archive, z, true)?;
            }
        }
    }
    Ok(())
}

/// Converts an existing disk image to a raw file at `out` and checks it holds ext4.
pub fn disk_to_raw(src: &Path, format: Option<&str>, out: &Path) -> Result<(), BuildError> {
    let format = match format {
        Some(f) => f.to_owned(),
        None => sniff_format(src)?,
    };
    match format.as_str() {
        "raw" => {
            fs::copy(src, out).map_err(|e| BuildError::io("copying", src, e))?;
        }
        "qcow2" => qemu_img_convert(src, "qcow2", out)?,
        "vhdx" => super::layer::vhdx_to_raw(&[src.to_owned()], out)?,
        other => {
            return Err(BuildError::BadSource {
                path: src.to_owned(),
                message: format!("unknown disk format {other:?} (raw, qcow2, vhdx)"),
            })
        }
    }
    if !super::ext4::has_ext_superblock(out).map_err(|e| BuildError::io("reading", out, e))? {
        return Err(BuildError::BadSource {
            path: src.to_owned(),
            message: "not an ext4 file system (no ext2/3/4 superblock at offset 1024; partitioned disks are not supported)".into(),
        });
    }
    super::ext4::fsck(out).map_err(|e| BuildError::BadSource {
        path: src.to_owned(),
        message: format!("file system check failed: {e}"),
    })?;
    Ok(())
}

fn sniff_format(src: &Path) -> Result<String, BuildError> {
    let mut f = File::open(src).map_err(|e| BuildError::io("opening", src, e))?;
    let mut magic = [0u8; 8];
    let n = f
        .read(&mut magic)
        .map_err(|e| BuildError::io("reading", src, e))?;
    Ok(match &magic[..n.min(8)] {
        [b'Q', b'F', b'I', 0xfb, ..] => "qcow2",
        b"vhdxfile" => "vhdx",
        _ => "raw",
    }
    .to_owned())
}

fn qemu_img_convert(src: &Path, fmt: &str, out: &Path) -> Result<(), BuildError> {
    let o = Command::new("qemu-img")
        .args(["convert", "-f", fmt, "-O", "raw"])
        .arg(src)
        .arg(out)
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BuildError::ToolMissing {
                tool: "qemu-img",
                hint: "apt-get install qemu-utils",
            },
            _ => BuildError::io("running qemu-img on", src, e),
        })?;
    if !o.status.success() {
        return Err(BuildError::BadSource {
            path: src.to_owned(),
            message: format!(
                "qemu-img convert: {}",
                String::from_utf8_lossy(&o.stderr).trim()
            ),
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn entry() -> impl Strategy<Value = (String, u8, String)> {
        let comp = prop_oneof![Just("a"), Just("b"), Just(".."), Just("."), Just("out")];
        let name = proptest::collection::vec(comp.clone(), 1..4).prop_map(|v| v.join("/"));
        let target = prop_oneof![
            proptest::collection::vec(comp, 1..4).prop_map(|v| v.join("/")),
            Just("/".to_owned()),
            Just("OUTSIDE".to_owned()),
        ];
        (name, 0u8..4, target)
    }

    fn archive(entries: &[(String, u8, String)], outside: &Path) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, target) in entries {
            let target = if target == "OUTSIDE" {
                outside.display().to_string()
            } else {
                target.clone()
            };
            let mut h = tar::Header::new_gnu();
            h.set_mode(0o644);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(0);
            let raw = name.as_bytes();
            let n = raw.len().min(99);
            h.as_old_mut().name[..n].copy_from_slice(&raw[..n]);
            let (ty, data): (tar::EntryType, &[u8]) = match kind {
                0 => (tar::EntryType::Regular, b"data"),
                1 => (tar::EntryType::Directory, b""),
                2 => (tar::EntryType::Symlink, b""),
                _ => (tar::EntryType::Link, b""),
            };
            h.set_entry_type(ty);
            h.set_size(data.len() as u64);
            if *kind >= 2 {
                let _ = h.set_link_name(&target);
            }
            h.set_cksum();
            b.append(&h, data).unwrap();
        }
        b.into_inner().unwrap()
    }

    proptest! {
        #![proptest_config(ProptestConfig::with_cases(200))]
        /// Whatever the archive says, nothing is created or changed outside the stage.
        #[test]
        fn unpacking_never_escapes_the_stage(entries in proptest::collection::vec(entry(), 1..8)) {
            let dir = tempfile::tempdir().unwrap();
            let outside = dir.path().join("outside");
            fs::create_dir(&outside).unwrap();
            let root = dir.path().join("stage").join("root");
            fs::create_dir_all(&root).unwrap();
            let bytes = archive(&entries, &outside);
            let mut stage = Stage::new(root.clone());
            let _ = stage.unpack(Path::new("t.tar"), &bytes[..], true);
            prop_assert_eq!(fs::read_dir(&outside).unwrap().count(), 0);
            let top: Vec<_> = fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
            prop_assert_eq!(top.len(), 2);
            prop_assert_eq!(fs::read_dir(dir.path().join("stage")).unwrap().count(), 1);
        }

        /// Random bytes are an error or an empty stage, never a panic.
        #[test]
        fn random_bytes_do_not_panic(bytes in proptest::collection::vec(any::<u8>(), 0..3000)) {
            let dir = tempfile::tempdir().unwrap();
            let mut stage = Stage::new(dir.path().to_owned());
            let _ = stage.unpack(Path::new("t.tar"), &bytes[..], true);
        }
    }

    #[test]
    fn member_paths_normalise_and_reject_dotdot() {
        let a = Path::new("a.tar");
        assert_eq!(
            member_path(a, Path::new("./etc/passwd"))
                .unwrap()
                .as_deref(),
            Some("/etc/passwd")
        );
        assert_eq!(
            member_path(a, Path::new("/etc/x")).unwrap().as_deref(),
            Some("/etc/x")
        );
        assert_eq!(member_path(a, Path::new("./")).unwrap(), None);
        assert!(member_path(a, Path::new("etc/../../x")).is_err());
    }
}
