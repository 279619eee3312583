//! The node's layer cache on its local disk.
//!
//! Disk: a whole disk (or partition) holding an ext4 file system (with its journal) labelled
//! [`LABEL`], made on first use with e2fsprogs' `mke2fs` (the initramfs carries it and its
//! shared libraries for that alone). A disk node-init chose by itself is formatted only if it
//! is blank (no partition table, no file system signature); a disk named on the kernel
//! command line (`strata.disk=`) is formatted whenever it lacks the label.
//!
//! Layout under the mount point:
//!
//! ```text
//! layers/<id>.vhdx        whole, verified layers, named by their blake3 (one copy per layer,
//!                         shared by every version and role that uses it)
//! partial/<id>            downloads in progress (resumed with Range, verified per chunk)
//! manifests/<key>.json    signed manifests of the versions the node may boot offline
//! state.json              current / previous / last known good, boot counter (atomic)
//! cow                     the dm-snapshot exception store of the running boot (recreated)
//! ```
//!
//! Every replacement is atomic: write a temporary file, fsync it, rename it over the target,
//! fsync the directory.

use std::fs::{self, File, OpenOptions};
use std::io::{self, Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};

use ed25519_dalek::VerifyingKey;
use wire::chunk::{chunk_range, Digest};
use wire::manifest::{LayerRef, Manifest, SignedManifest};
use wire::LayerId;

use crate::bootcount::{Entry, State};

/// The cache file system's volume label.
pub const LABEL: &str = "strata-cache";
/// The node's bearer token in the cache (mode 0600; the token contract in docs/node-init.md).
pub const TOKEN_FILE: &str = "token";
/// e2fsprogs' mke2fs in the initramfs.
pub const MKE2FS: &str = "/sbin/mke2fs";

/// A cache failure.
#[derive(Debug, thiserror::Error)]
pub enum CacheError {
    /// File system I/O on the cache.
    #[error("cache I/O on {path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// No disk to use.
    #[error("no cache disk found (tried {tried})")]
    NoDisk {
        /// The paths tried.
        tried: String,
    },
    /// The disk holds something else and was not named explicitly.
    #[error("{device} holds a partition table or file system without the {LABEL} label; name it with strata.disk= to let node-init format it")]
    Foreign {
        /// The device.
        device: String,
    },
    /// mke2fs failed.
    #[error("formatting {device} failed: {detail}")]
    Format {
        /// The device.
        device: String,
        /// mke2fs output.
        detail: String,
    },
    /// A cached manifest does not verify.
    #[error("cached manifest {path}")]
    Manifest {
        /// The file.
        path: PathBuf,
        /// Cause.
        #[source]
        source: wire::manifest::ManifestError,
    },
}

fn io_at(path: &Path) -> impl FnOnce(io::Error) -> CacheError + '_ {
    move |source| CacheError::Io {
        path: path.to_owned(),
        source,
    }
}

/// An open cache rooted at a directory (the mounted cache disk, or any directory in tests).
#[derive(Debug, Clone)]
pub struct Cache {
    root: PathBuf,
}

/// What a disk looks like from its first blocks.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DiskKind {
    /// An ext2/3/4 file system labelled [`LABEL`].
    StrataCache,
    /// All zero where signatures live.
    Blank,
    /// A partition table or another file system.
    Foreign,
}

/// Classifies a disk from its first 2 KiB (MBR/GPT signatures, ext superblock at 1024).
pub fn classify(head: &[u8]) -> DiskKind {
    let get = |r: std::ops::Range<usize>| head.get(r).unwrap_or(&[]);
    let ext_magic = get(1024 + 56..1024 + 58) == [0x53, 0xef];
    if ext_magic {
        let name = get(1024 + 120..1024 + 136);
        let end = name.iter().position(|&b| b == 0).unwrap_or(name.len());
        if name.get(..end) == Some(LABEL.as_bytes()) {
            return DiskKind::StrataCache;
        }
        return DiskKind::Foreign;
    }
    let mbr = get(510..512) == [0x55, 0xaa];
    let gpt = get(512..520) == b"EFI PART";
    if mbr || gpt || head.iter().any(|&b| b != 0) {
        return DiskKind::Foreign;
    }
    DiskKind::Blank
}

/// Finds the cache disk, formats it if allowed and needed, and mounts it at `mountpoint`.
/// `explicit` is the `strata.disk=` value. `reformat` formats our own cache disk again (its
/// file system is damaged beyond use: it is only a cache, everything in it can be fetched
/// again). A labelled cache that no longer mounts is formatted again too.
pub fn prepare_disk(
    explicit: Option<&str>,
    mountpoint: &Path,
    reformat: bool,
) -> Result<(String, bool), CacheError> {
    if explicit == Some(crate::cmdline::RAM_DISK) {
        // Diskless: layers live in memory; same layout, same attach path (loop over tmpfs).
        fs::create_dir_all(mountpoint).map_err(io_at(mountpoint))?;
        crate::sys::mount::mount("tmpfs", mountpoint, "tmpfs", 0, Some("mode=0700"))
            .map_err(io_at(mountpoint))?;
        return Ok(("ram".into(), true));
    }
    let candidates: Vec<&str> = match explicit {
        Some(d) => vec![d],
        None => vec!["/dev/vda", "/dev/sda", "/dev/nvme0n1", "/dev/xvda"],
    };
    let device = candidates
        .iter()
        .find(|d| Path::new(d).exists())
        .ok_or_else(|| CacheError::NoDisk {
            tried: candidates.join(", "),
        })?
        .to_string();
    let mut head = vec![0u8; 2048];
    {
        let mut f = File::open(&device).map_err(io_at(Path::new(&device)))?;
        f.read_exact(&mut head).map_err(io_at(Path::new(&device)))?;
    }
    let kind = classify(&head);
    let mut formatted = false;
    match kind {
        DiskKind::StrataCache if !reformat => {}
        DiskKind::StrataCache => {
            crate::info!("the cache file system on {device} is damaged: formatting it again");
            format(&device)?;
            formatted = true;
        }
        DiskKind::Foreign if explicit.is_none() => return Err(CacheError::Foreign { device }),
        DiskKind::Blank | DiskKind::Foreign => {
            crate::info!("formatting {device} as the Strata cache ({LABEL})");
            format(&device)?;
            formatted = true;
        }
    }
    fs::create_dir_all(mountpoint).map_err(io_at(mountpoint))?;
    if let Err(e) = crate::sys::mount::mount(&device, mountpoint, "ext4", 0, None) {
        if formatted || kind != DiskKind::StrataCache {
            return Err(CacheError::Io {
                path: mountpoint.to_owned(),
                source: e,
            });
        }
        crate::info!("the cache on {device} does not mount ({e}): formatting it again");
        format(&device)?;
        formatted = true;
        crate::sys::mount::mount(&device, mountpoint, "ext4", 0, None)
            .map_err(io_at(mountpoint))?;
    }
    Ok((device, formatted))
}

/// True if `e` says the cache's file system is damaged (not full, not missing).
pub fn is_damage(e: &CacheError) -> bool {
    match e {
        CacheError::Io { source, .. } => {
            matches!(source.raw_os_error(), Some(libc::EIO) | Some(libc::EUCLEAN))
        }
        _ => false,
    }
}

fn format(device: &str) -> Result<(), CacheError> {
    // ext4 with a journal: the cache's metadata survives a node reset at any moment (nodes
    // are often powered off hard), with no fsck at boot.
    let out = std::process::Command::new(MKE2FS)
        .args([
            "-q", "-F", "-t", "ext4", "-b", "4096", "-L", LABEL, "-m", "0",
        ])
        .args(["-E", "lazy_itable_init=1,lazy_journal_init=1", device])
        .output()
        .map_err(io_at(Path::new(MKE2FS)))?;
    if !out.status.success() {
        let mut detail = String::from_utf8_lossy(&out.stderr).into_owned();
        detail.truncate(400);
        return Err(CacheError::Format {
            device: device.to_owned(),
            detail,
        });
    }
    Ok(())
}

/// Writes `bytes` to `dir/name` atomically (temp file, fsync, rename, fsync dir).
pub fn write_atomic(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    write_atomic_mode(dir, name, bytes, 0o644)
}

/// [`write_atomic`] with the file's permission bits (the temp file is created with them, so
/// a secret is never readable by others, not even for a moment).
pub fn write_atomic_mode(dir: &Path, name: &str, bytes: &[u8], mode: u32) -> io::Result<()> {
    use std::os::unix::fs::{OpenOptionsExt, PermissionsExt};
    let tmp = dir.join(format!(".{name}.tmp"));
    let _ = fs::remove_file(&tmp);
    {
        let mut f = OpenOptions::new()
            .write(true)
            .create(true)
            .truncate(true)
            .mode(mode)
            .open(&tmp)?;
        f.set_permissions(fs::Permissions::from_mode(mode))?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    fs::rename(&tmp, dir.join(name))?;
    File::open(dir)?.sync_all()
}

/// Cache key for a manifest file name: version plus a digest of image and role (names may
/// hold any printable character, file names may not).
fn entry_key(e: &Entry) -> String {
    let d = Digest::of(format!("{}\0{}", e.image, e.role).as_bytes());
    format!("{}-{}", e.version, &d.to_hex()[..16])
}

impl Cache {
    /// Opens (and lays out) a cache at `root`.
    pub fn open(root: &Path) -> Result<Self, CacheError> {
        for d in ["layers", "partial", "manifests"] {
            let p = root.join(d);
            fs::create_dir_all(&p).map_err(io_at(&p))?;
        }
        Ok(Self {
            root: root.to_owned(),
        })
    }

    /// The cache root.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Path of a whole layer.
    pub fn layer_path(&self, id: &LayerId) -> PathBuf {
        self.root.join("layers").join(format!("{id}.vhdx"))
    }

    /// Path of a partial download.
    pub fn partial_path(&self, id: &LayerId) -> PathBuf {
        self.root.join("partial").join(id.to_hex())
    }

    /// True if the layer file is present with the right size (content is checked by
    /// [`Cache::verify_layer`]).
    pub fn has_layer(&self, l: &LayerRef) -> bool {
        fs::metadata(self.layer_path(&l.id)).is_ok_and(|m| m.len() == l.size)
    }

    /// Every whole layer in the cache (each was verified when it entered).
    pub fn cached_layers(&self) -> Vec<LayerId> {
        let mut out: Vec<LayerId> = fs::read_dir(self.root.join("layers"))
            .map(|rd| {
                rd.flatten()
                    .filter_map(|e| {
                        let name = e.file_name();
                        name.to_str()?.strip_suffix(".vhdx")?.parse().ok()
                    })
                    .collect()
            })
            .unwrap_or_default();
        out.sort();
        out
    }

    /// Moves a finished, verified download into `layers/`.
    pub fn commit_partial(&self, id: &LayerId) -> Result<(), CacheError> {
        let from = self.partial_path(id);
        let to = self.layer_path(id);
        File::open(&from)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&from))?;
        fs::rename(&from, &to).map_err(io_at(&to))?;
        let dir = self.root.join("layers");
        File::open(&dir)
            .and_then(|f| f.sync_all())
            .map_err(io_at(&dir))?;
        Ok(())
    }

    /// Hashes every chunk of a cached layer; returns the indices of chunks that do not match
    /// (empty: the layer is intact). A missing or short file is reported as all of its absent
    /// chunks damaged.
    pub fn verify_layer(&self, l: &LayerRef) -> Result<Vec<u64>, CacheError> {
        let path = self.layer_path(&l.id);
        let mut f = File::open(&path).map_err(io_at(&path))?;
        let len = f.metadata().map_err(io_at(&path))?.len();
        if len != l.size {
            // Cut or grown: to its size (the missing tail reads as zeros and so as damaged
            // chunks, which repair fetches), on a handle that may write.
            f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&path)
                .map_err(io_at(&path))?;
            f.set_len(l.size).map_err(io_at(&path))?;
        }
        let mut bad = Vec::new();
        let mut buf = vec![0u8; l.chunk_size as usize];
        for (i, expected) in l.chunks.iter().enumerate() {
            let r = chunk_range(i as u64, l.size, l.chunk_size);
            let n = (r.end - r.start) as usize;
            let chunk = buf.get_mut(..n).unwrap_or_default();
            f.read_exact(chunk).map_err(io_at(&path))?;
            if Digest::of(chunk) != *expected {
                bad.push(i as u64);
            }
        }
        Ok(bad)
    }

    /// Writes a repaired chunk into a cached layer at `offset` and syncs it.
    pub fn write_chunk(&self, id: &LayerId, offset: u64, data: &[u8]) -> Result<(), CacheError> {
        let path = self.layer_path(id);
        let mut f = OpenOptions::new()
            .write(true)
            .open(&path)
            .map_err(io_at(&path))?;
        f.seek(SeekFrom::Start(offset)).map_err(io_at(&path))?;
        f.write_all(data).map_err(io_at(&path))?;
        f.sync_data().map_err(io_at(&path))
    }

    /// Loads `state.json`; a missing or unreadable file gives the empty state (the node then
    /// behaves as on first boot), and says so.
    pub fn load_state(&self) -> State {
        let path = self.root.join("state.json");
        match fs::read(&path) {
            Ok(bytes) => serde_json::from_slice(&bytes).unwrap_or_else(|e| {
                crate::info!("state.json unreadable ({e}); starting from an empty state");
                State::default()
            }),
            Err(_) => State::default(),
        }
    }

    /// Replaces `state.json` atomically.
    pub fn save_state(&self, s: &State) -> Result<(), CacheError> {
        let bytes = serde_json::to_vec_pretty(s).map_err(|e| CacheError::Io {
            path: self.root.join("state.json"),
            source: io::Error::other(e),
        })?;
        write_atomic(&self.root, "state.json", &bytes).map_err(io_at(&self.root.join("state.json")))
    }

    /// The node's bearer token as saved by a previous boot (`token`, 0600), if usable.
    pub fn load_token(&self) -> Option<String> {
        let text = fs::read_to_string(self.root.join(TOKEN_FILE)).ok()?;
        crate::http::parse_token(&text)
    }

    /// Keeps the node's bearer token (from its node layer) for the next boot's early
    /// reports: written atomically, mode 0600, only when it changed. Returns whether it did.
    pub fn save_token(&self, token: &str) -> Result<bool, CacheError> {
        if self.load_token().as_deref() == Some(token) {
            return Ok(false);
        }
        let path = self.root.join(TOKEN_FILE);
        write_atomic_mode(
            &self.root,
            TOKEN_FILE,
            format!("{token}\n").as_bytes(),
            0o600,
        )
        .map_err(io_at(&path))?;
        Ok(true)
    }

    /// Stores a verified signed manifest for offline boots.
    pub fn store_manifest(&self, e: &Entry, signed: &SignedManifest) -> Result<(), CacheError> {
        let dir = self.root.join("manifests");
        write_atomic(
            &dir,
            &format!("{}.json", entry_key(e)),
            signed.to_json().as_bytes(),
        )
        .map_err(io_at(&dir))
    }

    /// Loads and re-verifies the stored manifest of `e`.
    pub fn load_manifest(&self, e: &Entry, key: &VerifyingKey) -> Result<Manifest, CacheError> {
        let path = self
            .root
            .join("manifests")
            .join(format!("{}.json", entry_key(e)));
        let bytes = fs::read(&path).map_err(io_at(&path))?;
        let signed = SignedManifest::from_json(&bytes).map_err(|source| CacheError::Manifest {
            path: path.clone(),
            source,
        })?;
        signed
            .verify(key)
            .map_err(|source| CacheError::Manifest { path, source })
    }

    /// True if `e`'s manifest is stored and all its layers are present.
    pub fn has_entry(&self, e: &Entry, key: &VerifyingKey) -> bool {
        self.load_manifest(e, key)
            .is_ok_and(|m| m.layers.iter().all(|l| self.has_layer(l)))
    }

    /// Deletes cached layers and partial downloads not in `keep`, oldest first, until the
    /// layers take at most `limit` bytes of disk; stale partial downloads always go. Returns
    /// the bytes of disk freed. Layers are counted by what they take on disk, not their
    /// length: they are fetched and kept sparse (a 7 MiB role layer takes 1-2 MiB).
    pub fn evict(&self, keep: &[LayerId], limit: u64) -> Result<u64, CacheError> {
        use std::os::unix::fs::MetadataExt;
        let on_disk = |m: &fs::Metadata| m.blocks().saturating_mul(512);
        let dir = self.root.join("layers");
        let mut files = Vec::new();
        let mut total = 0u64;
        for ent in fs::read_dir(&dir).map_err(io_at(&dir))? {
            let ent = ent.map_err(io_at(&dir))?;
            let meta = ent.metadata().map_err(io_at(&ent.path()))?;
            total += on_disk(&meta);
            let name = ent.file_name().to_string_lossy().into_owned();
            let id = name
                .strip_suffix(".vhdx")
                .and_then(|s| s.parse::<LayerId>().ok());
            if id.is_some_and(|id| keep.contains(&id)) {
                continue;
            }
            files.push((meta.modified().ok(), on_disk(&meta), ent.path()));
        }
        files.sort();
        let mut freed = 0;
        for (_, len, path) in files {
            if total <= limit {
                break;
            }
            fs::remove_file(&path).map_err(io_at(&path))?;
            total -= len;
            freed += len;
        }
        let pdir = self.root.join("partial");
        for ent in fs::read_dir(&pdir).map_err(io_at(&pdir))? {
            let ent = ent.map_err(io_at(&pdir))?;
            let keep_it = ent
                .file_name()
                .to_str()
                .and_then(|s| s.parse::<LayerId>().ok())
                .is_some_and(|id| keep.contains(&id));
            if !keep_it {
                let len = ent.metadata().map(|m| on_disk(&m)).unwrap_or(0);
                fs::remove_file(ent.path()).map_err(io_at(&ent.path()))?;
                freed += len;
            }
        }
        Ok(freed)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn classify_disks() {
        let blank = vec![0u8; 2048];
        assert_eq!(classify(&blank), DiskKind::Blank);
        let mut mbr = blank.clone();
        mbr[510] = 0x55;
        mbr[511] = 0xaa;
        assert_eq!(classify(&mbr), DiskKind::Foreign);
        let mut ext = blank.clone();
        ext[1024 + 56] = 0x53;
        ext[1024 + 57] = 0xef;
        assert_eq!(classify(&ext), DiskKind::Foreign);
        ext[1024 + 120..1024 + 120 + LABEL.len()].copy_from_slice(LABEL.as_bytes());
        assert_eq!(classify(&ext), DiskKind::StrataCache);
    }

    #[test]
    fn real_mke2fs_label_is_recognised() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("disk");
        File::create(&img).unwrap().set_len(8 << 20).unwrap();
        let st = std::process::Command::new("mke2fs")
            .args(["-q", "-F", "-L", LABEL, "-t", "ext4"])
            .arg(&img)
            .status()
            .expect("mke2fs missing: apt-get install e2fsprogs");
        assert!(st.success());
        let mut head = vec![0u8; 2048];
        File::open(&img).unwrap().read_exact(&mut head).unwrap();
        assert_eq!(classify(&head), DiskKind::StrataCache);
    }

    /// A cached layer cut short (a power cut before the data reached the disk) is reported as
    /// its missing chunks damaged, which repair then fetches; not as an I/O error.
    #[test]
    fn a_cut_cached_layer_reports_its_missing_chunks() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let bytes: Vec<u8> = (0..10_000u32).map(|i| (i % 251) as u8 + 1).collect();
        let (id, size, chunks) = wire::chunk::chunk_hashes(&bytes[..], 4096).unwrap();
        let l = LayerRef {
            id,
            size,
            kind: wire::manifest::LayerKind::Base,
            chunk_size: 4096,
            chunks,
            url: String::new(),
        };
        fs::write(c.layer_path(&id), &bytes[..5000]).unwrap();
        assert_eq!(c.verify_layer(&l).unwrap(), vec![1, 2]);
        assert_eq!(fs::metadata(c.layer_path(&id)).unwrap().len(), size);
    }

    #[test]
    fn eviction_keeps_the_kept_and_stays_under_the_limit() {
        use std::os::unix::fs::{FileExt, MetadataExt};
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        let ids: Vec<LayerId> = (0u8..4).map(|i| Digest::of(&[i])).collect();
        let on_disk = |p: &Path| fs::metadata(p).unwrap().blocks() * 512;
        for (i, id) in ids.iter().enumerate() {
            // Sparse, as fetched: 1 MiB files with 64 KiB of data.
            let f = File::create(c.layer_path(id)).unwrap();
            f.set_len(1 << 20).unwrap();
            f.write_all_at(&[1u8; 65536], 4096).unwrap();
            // Distinct modification times, oldest first.
            let t =
                std::time::SystemTime::UNIX_EPOCH + std::time::Duration::from_secs(1000 + i as u64);
            f.set_modified(t).unwrap();
        }
        let each = on_disk(&c.layer_path(&ids[0]));
        assert!(each < 1 << 20, "sparse test files take {each} bytes");
        fs::write(c.partial_path(&Digest::of(b"stale")), b"x").unwrap();
        fs::write(c.partial_path(&ids[3]), b"y").unwrap();
        let stale = on_disk(&c.partial_path(&Digest::of(b"stale")));
        // Keep 0 and 3; a limit of three layers' disk (far below their 3 MiB of length):
        // removing the oldest unkept layer (1) is enough.
        let freed = c.evict(&[ids[0], ids[3]], 3 * each).unwrap();
        assert!(c.layer_path(&ids[0]).exists() && c.layer_path(&ids[3]).exists());
        assert!(!c.layer_path(&ids[1]).exists());
        assert!(c.layer_path(&ids[2]).exists());
        assert!(!c.partial_path(&Digest::of(b"stale")).exists());
        assert!(c.partial_path(&ids[3]).exists());
        assert_eq!(freed, each + stale);
        assert_eq!(c.cached_layers().len(), 3);
    }

    #[test]
    fn state_round_trips_atomically() {
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.load_state(), State::default());
        let s = State {
            current: Some(Entry {
                image: "i".into(),
                role: "web".into(),
                version: 2,
            }),
            boot_count: 1,
            ..State::default()
        };
        c.save_state(&s).unwrap();
        assert_eq!(c.load_state(), s);
        assert!(!dir.path().join(".state.json.tmp").exists());
        fs::write(dir.path().join("state.json"), b"{garbage").unwrap();
        assert_eq!(c.load_state(), State::default());
    }

    #[test]
    fn token_is_kept_private_and_replaced_only_when_changed() {
        use std::os::unix::fs::PermissionsExt;
        let dir = tempfile::tempdir().unwrap();
        let c = Cache::open(dir.path()).unwrap();
        assert_eq!(c.load_token(), None);
        assert!(c.save_token("stk_one").unwrap());
        let path = dir.path().join(TOKEN_FILE);
        assert_eq!(
            fs::metadata(&path).unwrap().permissions().mode() & 0o777,
            0o600
        );
        assert_eq!(c.load_token().as_deref(), Some("stk_one"));
        assert!(!c.save_token("stk_one").unwrap());
        assert!(c.save_token("stk_two").unwrap());
        assert_eq!(c.load_token().as_deref(), Some("stk_two"));
        fs::write(&path, b"bad token with spaces").unwrap();
        assert_eq!(c.load_token(), None);
    }
}
