//! The image store: content-addressed layers and boot files under one directory, with a
//! SQLite catalog (see `docs/images.md`, "Store layout").
//!
//! ```text
//! <root>/layers/<blake3>.vhdx   published layers, never rewritten
//! <root>/blobs/<blake3>         kernels extracted from bases
//! <root>/cache/<blake3>.raw     flattened role chains, templates for node layers
//! <root>/tmp/                   build scratch (stale entries of dead builders removed at open)
//! <root>/catalog.sqlite3        the catalog (layers, parents, blobs, images, versions, roles)
//! <root>/lock                   builds hold it shared, gc exclusive
//! ```
//!
//! A layer is published by writing a temp file in `layers/`, fsyncing it, hashing what was
//! written (the name is the blake3 of the bytes on disk, so a published name always matches
//! its content), renaming it to `<blake3>.vhdx`, fsyncing the directory, and only then
//! recording it in the catalog. An existing layer is never replaced.

pub mod atomic;
pub mod catalog;

use std::collections::BTreeSet;
use std::fs::{self, File};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Mutex, MutexGuard};

use wire::chunk::{chunk_hashes, Digest, LayerId, CHUNK_SIZE};
use wire::manifest::LayerKind;

pub use atomic::{TempDir, TempFile};
pub use catalog::{
    BlobRef, Catalog, CatalogError, ImageVersion, KernelRef, LayerRecord, RoleInfo, VersionInfo,
};

/// Store errors.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// File-system I/O on a store path failed.
    #[error("{op} {path}")]
    Io {
        /// What we were doing.
        op: &'static str,
        /// The path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The catalog failed.
    #[error(transparent)]
    Catalog(#[from] CatalogError),
    /// A layer on disk does not hash to its name.
    #[error("layer {id} is corrupt: its content hashes to {actual}")]
    Corrupt {
        /// Expected (the name).
        id: LayerId,
        /// What the bytes hash to.
        actual: Digest,
    },
    /// A layer the catalog names is missing.
    #[error("layer {id} is missing from {path}")]
    Missing {
        /// Layer.
        id: LayerId,
        /// Where it should be.
        path: PathBuf,
    },
    /// gc needs the store to itself.
    #[error("store {root} is busy (a build holds it); try again when it is done")]
    Busy {
        /// Store root.
        root: PathBuf,
    },
}

fn io_err<'a>(op: &'static str, path: &'a Path) -> impl FnOnce(io::Error) -> StoreError + 'a {
    move |source| StoreError::Io {
        op,
        path: path.to_owned(),
        source,
    }
}

/// What `gc` removed (or would remove, in a dry run).
#[derive(Debug, Clone, Default, serde::Serialize)]
pub struct GcReport {
    /// Layers removed.
    pub layers: Vec<LayerId>,
    /// Blobs removed.
    pub blobs: Vec<Digest>,
    /// Cache files removed.
    pub cache_files: usize,
    /// Bytes freed.
    pub bytes: u64,
    /// True if nothing was removed on purpose.
    pub dry_run: bool,
}

/// A held store lock (shared for builds, exclusive for gc).
#[derive(Debug)]
pub struct StoreLock {
    _file: File,
}

/// The image store.
#[derive(Debug)]
pub struct Store {
    root: PathBuf,
    catalog: Mutex<Catalog>,
    node_templates: crate::build::node::TemplateCache,
}

impl Store {
    /// Opens the store at `root`, creating its layout if absent, and removes temp files that
    /// builders killed mid-write left behind.
    pub fn open(root: &Path) -> Result<Store, StoreError> {
        for sub in ["", "layers", "blobs", "cache", "tmp"] {
            let p = root.join(sub);
            fs::create_dir_all(&p).map_err(io_err("creating", &p))?;
        }
        for sub in ["layers", "blobs", "cache", "tmp"] {
            let p = root.join(sub);
            atomic::clean_stale(&p).map_err(io_err("cleaning", &p))?;
        }
        let catalog = Catalog::open(&root.join("catalog.sqlite3"))?;
        Ok(Store {
            root: root.to_owned(),
            catalog: Mutex::new(catalog),
            node_templates: Default::default(),
        })
    }

    /// The store's root directory.
    pub fn root(&self) -> &Path {
        &self.root
    }

    /// Where layer `id` lives (whether or not it exists).
    pub fn layer_path(&self, id: &LayerId) -> PathBuf {
        self.root.join("layers").join(format!("{id}.vhdx"))
    }

    /// Where blob `id` lives.
    pub fn blob_path(&self, id: &Digest) -> PathBuf {
        self.root.join("blobs").join(id.to_hex())
    }

    /// Where the flattened raw image of chain top `id` is cached.
    pub fn cache_path(&self, id: &LayerId) -> PathBuf {
        self.root.join("cache").join(format!("{id}.raw"))
    }

    /// The node templates of this store's roles (see `build::node`).
    pub(crate) fn node_templates(&self) -> &crate::build::node::TemplateCache {
        &self.node_templates
    }

    /// The catalog (locked for the caller; keep the guard short).
    pub fn catalog(&self) -> MutexGuard<'_, Catalog> {
        self.catalog.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A layer's catalog record.
    pub fn layer_info(&self, id: &LayerId) -> Result<Option<LayerRecord>, StoreError> {
        Ok(self.catalog().layer(id)?)
    }

    /// True if layer `id` is published (file present and recorded).
    pub fn has_layer(&self, id: &LayerId) -> Result<bool, StoreError> {
        Ok(self.layer_path(id).is_file() && self.catalog().layer(id)?.is_some())
    }

    /// Publishes `src` (a scratch file of this store) as the cached raw image of chain top
    /// `id`.
    pub fn publish_cache(&self, src: &Path, id: &LayerId) -> Result<PathBuf, StoreError> {
        let dest = self.cache_path(id);
        atomic::persist_path(src, &dest).map_err(io_err("publishing", &dest))?;
        Ok(dest)
    }

    /// A new scratch directory in `tmp/`, removed on drop.
    pub fn scratch(&self, tag: &str) -> Result<TempDir, StoreError> {
        let dir = self.root.join("tmp");
        TempDir::new_in(&dir, tag).map_err(io_err("creating a scratch directory in", &dir))
    }

    /// Takes the build lock (shared: builds may run side by side; gc waits for them).
    pub fn lock_shared(&self) -> Result<StoreLock, StoreError> {
        let path = self.root.join("lock");
        let file = File::create(&path).map_err(io_err("opening", &path))?;
        file.lock_shared().map_err(io_err("locking", &path))?;
        Ok(StoreLock { _file: file })
    }

    fn try_lock_exclusive(&self) -> Result<StoreLock, StoreError> {
        let path = self.root.join("lock");
        let file = File::create(&path).map_err(io_err("opening", &path))?;
        match file.try_lock() {
            Ok(()) => Ok(StoreLock { _file: file }),
            Err(fs::TryLockError::WouldBlock) => Err(StoreError::Busy {
                root: self.root.clone(),
            }),
            Err(fs::TryLockError::Error(e)) => Err(io_err("locking", &path)(e)),
        }
    }

    /// Publishes a finished layer file `src` (written in a scratch directory of this store,
    /// already verified by the caller): fsync, hash, rename to `layers/<blake3>.vhdx` (unless
    /// that layer exists: layers are never rewritten), fsync the directories, record it.
    pub fn publish_layer(
        &self,
        src: &Path,
        kind: LayerKind,
        parent: Option<LayerId>,
        virtual_size: u64,
    ) -> Result<LayerRecord, StoreError> {
        File::open(src)
            .and_then(|f| f.sync_all())
            .map_err(io_err("syncing", src))?;
        let (id, size, chunks) = hash_file(src)?;
        let rec = LayerRecord {
            id,
            size,
            virtual_size,
            parent,
            kind,
            chunk_size: CHUNK_SIZE,
            chunks,
        };
        let dest = self.layer_path(&id);
        if !dest.is_file() {
            atomic::persist_path(src, &dest).map_err(io_err("publishing", &dest))?;
        }
        self.catalog().insert_layer(&rec)?;
        Ok(rec)
    }

    /// Publishes node layers already written and hashed in scratch (see `build::node`), in
    /// one go: every file is fsynced and renamed into `layers/`, the directory fsynced once,
    /// then the layers and the node records go into the catalog in one transaction. Each
    /// item: the file, its record, the node id, the role layer and the facts digest.
    pub fn publish_node_layers(
        &self,
        items: &[(PathBuf, LayerRecord, String, LayerId, String)],
    ) -> Result<(), StoreError> {
        let dir = self.root.join("layers");
        let moves: Vec<(PathBuf, PathBuf)> = items
            .iter()
            .map(|i| (i.0.clone(), self.layer_path(&i.1.id)))
            .collect();
        atomic::persist_many(&moves, &dir).map_err(io_err("publishing into", &dir))?;
        let rows: Vec<(&LayerRecord, &str, &LayerId, &str)> = items
            .iter()
            .map(|i| (&i.1, i.2.as_str(), &i.3, i.4.as_str()))
            .collect();
        self.catalog().insert_node_layers(&rows)?;
        Ok(())
    }

    /// Publishes a blob (kernel) the same way; returns its id and size.
    pub fn publish_blob(
        &self,
        src: &Path,
        kind: &str,
        name: &str,
    ) -> Result<(Digest, u64), StoreError> {
        let dir = self.root.join("blobs");
        let mut tmp =
            TempFile::new_in(&dir, kind).map_err(io_err("creating a temp file in", &dir))?;
        let mut input = File::open(src).map_err(io_err("opening", src))?;
        io::copy(&mut input, tmp.file()).map_err(io_err("copying", src))?;
        tmp.file().sync_all().map_err(io_err("syncing", src))?;
        let (id, size, _) = hash_file(tmp.path())?;
        let dest = self.blob_path(&id);
        if !dest.is_file() {
            tmp.persist(&dest).map_err(io_err("publishing", &dest))?;
        }
        self.catalog().insert_blob(&id, size, kind, name)?;
        Ok((id, size))
    }

    /// Re-hashes a published layer and checks it against its name.
    pub fn verify_layer(&self, id: &LayerId) -> Result<(), StoreError> {
        let path = self.layer_path(id);
        if !path.is_file() {
            return Err(StoreError::Missing { id: *id, path });
        }
        let (actual, _, _) = hash_file(&path)?;
        if actual != *id {
            return Err(StoreError::Corrupt { id: *id, actual });
        }
        Ok(())
    }

    /// The chain (base first) ending at layer `top`, from the catalog.
    pub fn chain(&self, top: &LayerId) -> Result<Vec<LayerRecord>, StoreError> {
        Ok(self.catalog().chain(top)?)
    }

    /// The files of a chain, base first.
    pub fn chain_paths(&self, chain: &[LayerRecord]) -> Vec<PathBuf> {
        chain.iter().map(|l| self.layer_path(&l.id)).collect()
    }

    /// A recorded blob.
    pub fn blob_ref(&self, id: &Digest) -> Result<BlobRef, StoreError> {
        let size = self.catalog().blob_size(id)?.unwrap_or(0);
        Ok(BlobRef {
            id: *id,
            path: self.blob_path(id),
            size,
        })
    }

    /// The file of a published blob of `kind` (`kernel`, `modules`), if the catalog records
    /// one with that id and the file is there.
    pub fn blob_file(&self, id: &Digest, kind: &str) -> Result<Option<PathBuf>, StoreError> {
        if self.catalog().blob_kind(id)?.as_deref() != Some(kind) {
            return Ok(None);
        }
        let path = self.blob_path(id);
        Ok(path.is_file().then_some(path))
    }

    fn kernel_ref(
        &self,
        kernel: Option<(Digest, String)>,
        modules: Option<Digest>,
    ) -> Result<Option<KernelRef>, StoreError> {
        let Some((id, release)) = kernel else {
            return Ok(None);
        };
        let k = self.blob_ref(&id)?;
        Ok(Some(KernelRef {
            id,
            release,
            path: k.path,
            size: k.size,
            modules: modules.map(|m| self.blob_ref(&m)).transpose()?,
        }))
    }

    /// The newest image version that has `role` (generic definition, no site).
    pub fn image_for_role(&self, role: &str) -> Result<Option<ImageVersion>, StoreError> {
        self.image_for_role_site(role, None)
    }

    /// The newest image version that has `role` for `site` (None: the generic definition).
    pub fn image_for_role_site(
        &self,
        role: &str,
        site: Option<&str>,
    ) -> Result<Option<ImageVersion>, StoreError> {
        let found = self.catalog().find_role(role, site.unwrap_or(""))?;
        let Some((image, version, _)) = found else {
            return Ok(None);
        };
        self.image_version(&image, version, Some(role), site)
    }

    /// One image version: the base alone (`role` None) or one role's chain.
    pub fn image_version(
        &self,
        image: &str,
        version: u64,
        role: Option<&str>,
        site: Option<&str>,
    ) -> Result<Option<ImageVersion>, StoreError> {
        let Some(info) = self.catalog().version(image, version)? else {
            return Ok(None);
        };
        let top = match role {
            None => info.base,
            Some(r) => {
                let site = site.unwrap_or("");
                match info.roles.iter().find(|x| x.role == r && x.site == site) {
                    Some(x) => x.layer,
                    None => return Ok(None),
                }
            }
        };
        let layers = self.chain(&top)?;
        Ok(Some(ImageVersion {
            image: info.image,
            version: info.version,
            role: role.map(str::to_owned),
            site: site.filter(|s| !s.is_empty()).map(str::to_owned),
            layers,
            kernel: self.kernel_ref(info.kernel, info.modules)?,
            created: info.created,
        }))
    }

    /// Removes unreferenced layers, blobs and cache files. With `dry_run`, only reports them.
    /// Fails with `Busy` while a build holds the store.
    pub fn gc(&self, dry_run: bool) -> Result<GcReport, StoreError> {
        let _lock = self.try_lock_exclusive()?;
        let mut report = GcReport {
            dry_run,
            ..GcReport::default()
        };
        if !dry_run {
            self.catalog().prune_node_layers()?;
        }
        let (keep_layers, keep_blobs) = self.catalog().referenced()?;
        // Catalog rows: delete children before parents (node, role, base).
        let mut doomed: Vec<LayerRecord> = self
            .catalog()
            .layers()?
            .into_iter()
            .filter(|l| !keep_layers.contains(&l.id))
            .collect();
        doomed.sort_by_key(|l| match l.kind {
            LayerKind::Node => 0,
            LayerKind::Role => 1,
            LayerKind::Base => 2,
        });
        let mut seen: BTreeSet<LayerId> = BTreeSet::new();
        for l in &doomed {
            let path = self.layer_path(&l.id);
            report.bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            report.layers.push(l.id);
            seen.insert(l.id);
            if !dry_run {
                remove_if_exists(&path)?;
                self.catalog().delete_layer(&l.id)?;
            }
        }
        // Files with no catalog row at all (published by a builder killed before recording).
        let dir = self.root.join("layers");
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".vhdx"))
                .and_then(|h| h.parse::<Digest>().ok())
            else {
                continue;
            };
            if keep_layers.contains(&id)
                || seen.contains(&id)
                || self.catalog().layer(&id)?.is_some()
            {
                continue;
            }
            report.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
            report.layers.push(id);
            if !dry_run {
                remove_if_exists(&entry.path())?;
            }
        }
        let blobs = self.catalog().blobs()?;
        for b in blobs {
            if keep_blobs.contains(&b) {
                continue;
            }
            let path = self.blob_path(&b);
            report.bytes += fs::metadata(&path).map(|m| m.len()).unwrap_or(0);
            report.blobs.push(b);
            if !dry_run {
                remove_if_exists(&path)?;
                self.catalog().delete_blob(&b)?;
            }
        }
        let dir = self.root.join("cache");
        for entry in fs::read_dir(&dir).map_err(io_err("listing", &dir))? {
            let entry = entry.map_err(io_err("listing", &dir))?;
            let name = entry.file_name();
            let Some(id) = name
                .to_str()
                .and_then(|n| n.strip_suffix(".raw"))
                .and_then(|h| h.parse::<Digest>().ok())
            else {
                continue;
            };
            if keep_layers.contains(&id) {
                continue;
            }
            report.bytes += entry.metadata().map(|m| m.len()).unwrap_or(0);
            report.cache_files += 1;
            if !dry_run {
                remove_if_exists(&entry.path())?;
            }
        }
        if !dry_run {
            for d in ["layers", "blobs", "cache"] {
                let p = self.root.join(d);
                atomic::fsync_dir(&p).map_err(io_err("syncing", &p))?;
            }
        }
        Ok(report)
    }
}

fn remove_if_exists(path: &Path) -> Result<(), StoreError> {
    match fs::remove_file(path) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == io::ErrorKind::NotFound => Ok(()),
        Err(e) => Err(io_err("removing", path)(e)),
    }
}

/// Hashes a file: (blake3, size, chunk hashes at [`CHUNK_SIZE`]).
pub fn hash_file(path: &Path) -> Result<(LayerId, u64, Vec<Digest>), StoreError> {
    let f = File::open(path).map_err(io_err("opening", path))?;
    let len = f.metadata().map_err(io_err("reading", path))?.len();
    chunk_hashes(
        SparseReader {
            file: f,
            pos: 0,
            len,
            data_end: 0,
            hole_end: 0,
        },
        CHUNK_SIZE,
    )
    .map_err(io_err("reading", path))
}

/// Reads a file, producing the zeros of its holes itself (found with `SEEK_DATA` and
/// `SEEK_HOLE`) instead of reading them: layers are mostly holes, and reading a hole makes
/// the kernel zero and copy page-cache pages for nothing.
struct SparseReader {
    file: File,
    pos: u64,
    len: u64,
    /// `[pos, data_end)` is known to hold data.
    data_end: u64,
    /// `[pos, hole_end)` is known to be a hole.
    hole_end: u64,
}

impl io::Read for SparseReader {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        use std::os::unix::fs::FileExt;
        if self.pos >= self.len || buf.is_empty() {
            return Ok(0);
        }
        if self.pos >= self.data_end && self.pos >= self.hole_end {
            match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Data(self.pos)) {
                Ok(d) if d > self.pos => self.hole_end = d.min(self.len),
                Ok(_) => match rustix::fs::seek(&self.file, rustix::fs::SeekFrom::Hole(self.pos)) {
                    Ok(h) if h > self.pos => self.data_end = h.min(self.len),
                    // A file system without hole reporting: all data.
                    _ => self.data_end = self.len,
                },
                // No data past pos: the rest is a hole.
                Err(rustix::io::Errno::NXIO) => self.hole_end = self.len,
                Err(_) => self.data_end = self.len,
            }
        }
        let n = if self.pos < self.data_end {
            let want = usize::try_from(self.data_end - self.pos)
                .unwrap_or(usize::MAX)
                .min(buf.len());
            let b = buf.get_mut(..want).unwrap_or_default();
            let n = self.file.read_at(b, self.pos)?;
            if n == 0 {
                return Err(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "file shrank while being read",
                ));
            }
            n
        } else {
            let n = usize::try_from(self.hole_end.saturating_sub(self.pos))
                .unwrap_or(usize::MAX)
                .min(buf.len());
            buf.get_mut(..n).unwrap_or_default().fill(0);
            n
        };
        self.pos += n as u64;
        Ok(n)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::os::unix::fs::FileExt;

    proptest! {
        #![proptest_config(ProptestConfig { cases: 48, ..ProptestConfig::default() })]
        /// Hashing a sparse file (holes skipped) gives what hashing its bytes gives.
        #[test]
        fn sparse_files_hash_like_their_bytes(len in 0u64..(3 << 20), writes in proptest::collection::vec((0u64..(3 << 20), 1usize..20000, any::<u8>()), 0..8)) {
            let dir = tempfile::tempdir().unwrap();
            let p = dir.path().join("f");
            let f = File::create(&p).unwrap();
            f.set_len(len).unwrap();
            let mut bytes = vec![0u8; len as usize];
            for (at, n, v) in writes {
                if at >= len { continue; }
                let n = n.min((len - at) as usize);
                let data = vec![v; n];
                f.write_all_at(&data, at).unwrap();
                bytes[at as usize..at as usize + n].copy_from_slice(&data);
            }
            drop(f);
            let want = chunk_hashes(&bytes[..], CHUNK_SIZE).unwrap();
            prop_assert_eq!(hash_file(&p).unwrap(), want);
        }
    }
}
