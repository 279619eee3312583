//! The image builder: bases from a root tree, tarball, OCI archive or disk image; role layers
//! from recipes applied offline to a copy of the base; node layers from a node's facts; all
//! reproducible (same inputs, same blake3) and published into the [`Store`].
//!
//! Recipes and the store layout are described in `docs/images.md`. One build of an image
//! makes one *version*: a base layer plus a layer per role (and per site of a role), committed
//! to the catalog in one transaction after every layer file is published. A build whose inputs
//! (recipe texts, every source file, the base version updated) match an existing version
//! returns that version without building (`ensure_builtin` relies on it being fast).

pub mod base;
pub mod ext4;
pub mod layer;
pub mod modules;
pub mod node;
pub mod ops;
pub mod packages;
pub mod recipe;
pub mod template;

use std::collections::BTreeMap;
use std::fs;
use std::io;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};
use std::process::Command;

use wire::chunk::{Digest, LayerId};
use wire::manifest::LayerKind;

use crate::store::catalog::NewVersion;
use crate::store::{CatalogError, KernelRef, LayerRecord, RoleInfo, Store, StoreError};
pub use node::{machine_id, node_files, node_layer, node_layers, NodeFacts};
use ops::Op;
use recipe::{host_path, Loaded, RecipeKind, SourceKind};

/// Timestamp of every inode when a recipe gives none (2023-11-14T22:13:20Z).
pub const DEFAULT_EPOCH: u64 = 1_700_000_000;

/// Bumped when the builder's output for the same inputs changes.
pub(crate) const BUILDER_FORMAT: &str = "strata-builder-4";

/// Builder errors. Each names the recipe, source or path concerned.
#[derive(Debug, thiserror::Error)]
pub enum BuildError {
    /// A recipe is malformed or names something that does not work.
    #[error("{file}: {message}")]
    Recipe {
        /// The recipe file.
        file: PathBuf,
        /// What and where.
        message: String,
    },
    /// An archive (tarball, OCI) is unsafe or corrupt.
    #[error("{archive}: entry {entry}: {problem}")]
    Archive {
        /// The archive.
        archive: PathBuf,
        /// The member (or `-`).
        entry: String,
        /// What is wrong.
        problem: String,
    },
    /// A base source cannot be used.
    #[error("{path}: {message}")]
    BadSource {
        /// The source.
        path: PathBuf,
        /// Why.
        message: String,
    },
    /// A change cannot be applied to the image.
    #[error("in the image at {path}: {message}")]
    Apply {
        /// Image path.
        path: String,
        /// Why.
        message: String,
    },
    /// e2fsprogs failed.
    #[error(transparent)]
    Ext4(#[from] ext4::Ext4Error),
    /// The VHDX writer or reader failed.
    #[error("vhdx: {what}")]
    Vhdx {
        /// What we were doing.
        what: String,
        /// The cause.
        #[source]
        source: vhdx::VhdxError,
    },
    /// A written layer did not read back as the image it was made from.
    #[error("layer verification failed: {message}")]
    Verify {
        /// What differed.
        message: String,
    },
    /// The store failed.
    #[error(transparent)]
    Store(#[from] StoreError),
    /// A host tool is missing.
    #[error("{tool} not found: {hint}")]
    ToolMissing {
        /// The tool.
        tool: &'static str,
        /// How to install it.
        hint: &'static str,
    },
    /// I/O on a host path.
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
    /// Node facts are not usable.
    #[error("node {node}: {message}")]
    NodeFacts {
        /// The node.
        node: String,
        /// What is wrong.
        message: String,
    },
    /// The thing asked for is not in the catalog.
    #[error("{what} not found")]
    NotFound {
        /// What.
        what: String,
    },
}

impl From<recipe::RecipeError> for BuildError {
    fn from(e: recipe::RecipeError) -> Self {
        BuildError::Recipe {
            file: e.file,
            message: e.message,
        }
    }
}

impl From<CatalogError> for BuildError {
    fn from(e: CatalogError) -> Self {
        BuildError::Store(StoreError::Catalog(e))
    }
}

impl BuildError {
    /// An I/O error on `path`.
    pub fn io(op: &'static str, path: &Path, source: io::Error) -> Self {
        BuildError::Io {
            op,
            path: path.to_owned(),
            source,
        }
    }
}

/// Progress reports of long work (the CLI draws bars; the server logs).
pub trait Progress: Sync {
    /// A stage starts.
    fn stage(&self, what: &str);
}

/// Reports nothing.
pub struct NoProgress;

impl Progress for NoProgress {
    fn stage(&self, _what: &str) {}
}

/// Logs stages with `tracing`.
pub struct LogProgress;

impl Progress for LogProgress {
    fn stage(&self, what: &str) {
        tracing::info!(stage = what, "image build");
    }
}

/// Build options.
pub struct BuildOptions<'a> {
    /// Where role recipes live (default: the `roles` directory next to the base recipe's).
    pub roles_dir: Option<PathBuf>,
    /// Progress sink.
    pub progress: &'a dyn Progress,
}

impl Default for BuildOptions<'_> {
    fn default() -> Self {
        BuildOptions {
            roles_dir: None,
            progress: &NoProgress,
        }
    }
}

/// What a build produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct Built {
    /// Image name.
    pub image: String,
    /// Version number.
    pub version: u64,
    /// True if an existing version had these exact inputs (nothing was built).
    pub reused: bool,
    /// Base layer.
    pub base: LayerRecord,
    /// Role layers: role, site ("" generic), layer.
    pub roles: Vec<(String, String, LayerRecord)>,
    /// Kernel (with its module archive).
    pub kernel: Option<KernelRef>,
    /// What the build log should tell the operator (modules skipped: built in or absent).
    pub notes: Vec<String>,
}

/// The repository's `images/` directory (recipes of the built-in images): `$STRATA_IMAGES`
/// if set, else the source tree's.
pub fn default_images_dir() -> PathBuf {
    std::env::var_os("STRATA_IMAGES")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            Path::new(env!("CARGO_MANIFEST_DIR"))
                .join("..")
                .join("images")
        })
}

/// Makes sure the built-in busybox test image and its roles (`images/busybox`,
/// `images/roles/*` on it) are in the store; builds them if absent. Idempotent, and fast when
/// present (hashes the inputs, builds nothing).
pub fn ensure_builtin(store: &Store, images_dir: &Path) -> Result<Built, BuildError> {
    build(
        store,
        &images_dir.join("busybox"),
        &BuildOptions {
            roles_dir: Some(images_dir.join("roles")),
            progress: &LogProgress,
        },
    )
}

/// Role recipes in `dir` whose `[role] image` is `image`, sorted by role name.
pub fn discover_roles(dir: &Path, image: &str) -> Result<Vec<Loaded>, BuildError> {
    let mut out = Vec::new();
    let rd = match fs::read_dir(dir) {
        Ok(rd) => rd,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(BuildError::io("listing", dir, e)),
    };
    for entry in rd {
        let entry = entry.map_err(|e| BuildError::io("listing", dir, e))?;
        let path = entry.path();
        if !path.join(recipe::RECIPE_FILE).is_file() {
            continue;
        }
        let l = recipe::load(&path)?;
        if l.kind != RecipeKind::Role {
            continue;
        }
        if l.recipe.role.as_ref().is_some_and(|r| r.image == image) {
            out.push(l);
        }
    }
    out.sort_by(|a, b| {
        a.recipe
            .role
            .as_ref()
            .map(|r| r.name.clone())
            .cmp(&b.recipe.role.as_ref().map(|r| r.name.clone()))
    });
    for w in out.windows(2) {
        if let [a, b] = w {
            if a.recipe.role.as_ref().map(|r| &r.name) == b.recipe.role.as_ref().map(|r| &r.name) {
                return Err(BuildError::Recipe {
                    file: b.file.clone(),
                    message: format!(
                        "role {:?} is also defined in {}",
                        b.recipe
                            .role
                            .as_ref()
                            .map(|r| r.name.as_str())
                            .unwrap_or(""),
                        a.file.display()
                    ),
                });
            }
        }
    }
    Ok(out)
}

/// Hashes a host file or tree into `h` (names relative to the top, types, executable bits,
/// contents, link targets).
fn hash_host(h: &mut blake3::Hasher, path: &Path) -> Result<(), BuildError> {
    hash_host_at(h, path, path)
}

fn hash_host_at(h: &mut blake3::Hasher, top: &Path, path: &Path) -> Result<(), BuildError> {
    let md = fs::symlink_metadata(path).map_err(|e| BuildError::io("reading", path, e))?;
    h.update(
        path.strip_prefix(top)
            .unwrap_or(path)
            .as_os_str()
            .as_encoded_bytes(),
    );
    h.update(b"\0");
    // Only what a git checkout keeps: the type and the executable bit (see ops::tree_mode).
    h.update(&(md.mode() & 0o170000).to_le_bytes());
    h.update(&[u8::from(md.mode() & 0o111 != 0)]);
    if md.is_dir() {
        let mut names: Vec<_> = fs::read_dir(path)
            .map_err(|e| BuildError::io("listing", path, e))?
            .map(|e| e.map(|e| e.file_name()))
            .collect::<Result<_, _>>()
            .map_err(|e| BuildError::io("listing", path, e))?;
        names.sort();
        for n in names {
            hash_host_at(h, top, &path.join(n))?;
        }
    } else if md.file_type().is_symlink() {
        let t = fs::read_link(path).map_err(|e| BuildError::io("reading", path, e))?;
        h.update(t.as_os_str().as_encoded_bytes());
    } else if md.is_file() {
        h.update_mmap(path)
            .map_err(|e| BuildError::io("hashing", path, e))?;
    }
    Ok(())
}

/// Host paths a recipe reads besides its own directory.
fn external_sources(l: &Loaded) -> Vec<PathBuf> {
    let r = &l.recipe;
    let mut v = Vec::new();
    let mut add = |p: &str| {
        let hp = host_path(&l.dir, p);
        if !hp.starts_with(&l.dir) {
            v.push(hp);
        }
    };
    if let Some(b) = &r.base {
        if let Some(p) = &b.path {
            add(p);
        }
    }
    for t in &r.tree {
        add(&t.from);
    }
    for f in &r.file {
        if let Some(s) = &f.source {
            add(s);
        }
        if let Some(s) = &f.template {
            add(s);
        }
    }
    for d in r.packages.iter().flat_map(|p| p.debs.iter()) {
        add(d);
    }
    v
}

fn inputs_digest(
    recipes: &[&Loaded],
    extra: &[u8],
    kernel: Option<&Path>,
) -> Result<String, BuildError> {
    let mut h = blake3::Hasher::new();
    h.update(BUILDER_FORMAT.as_bytes());
    h.update(extra);
    h.update(mke2fs_version().as_bytes());
    for l in recipes {
        h.update(l.text.as_bytes());
        hash_host(&mut h, &l.dir)?;
        for p in external_sources(l) {
            if p.exists() {
                hash_host(&mut h, &p)?;
            } else {
                h.update(b"missing:");
                h.update(p.as_os_str().as_encoded_bytes());
            }
        }
    }
    if let Some(k) = kernel {
        hash_host(&mut h, k)?;
    }
    Ok(h.finalize().to_hex().to_string())
}

fn mke2fs_version() -> String {
    Command::new("/sbin/mke2fs")
        .arg("-V")
        .output()
        .map(|o| {
            String::from_utf8_lossy(&o.stderr)
                .lines()
                .next()
                .unwrap_or_default()
                .to_owned()
        })
        .unwrap_or_default()
}

fn uuid_from(name: &str, what: &str) -> String {
    let h = blake3::Hasher::new()
        .update(b"strata ext4 ")
        .update(what.as_bytes())
        .update(name.as_bytes())
        .finalize();
    let b = h.as_bytes();
    let hex = hex::encode(&b[..16]);
    format!(
        "{}-{}-8{}-a{}-{}",
        &hex[0..8],
        &hex[8..12],
        &hex[13..16],
        &hex[17..20],
        &hex[20..32]
    )
}

/// The kernel a base boots with: `boot/vmlinuz-<release>` of `dir`.
fn find_vmlinuz(dir: &Path, recipe_file: &Path) -> Result<(PathBuf, String), BuildError> {
    let boot = dir.join("boot");
    let mut found = Vec::new();
    let rd = fs::read_dir(&boot).map_err(|e| BuildError::Recipe {
        file: recipe_file.to_owned(),
        message: format!("[kernel] dir: cannot list {}: {e}", boot.display()),
    })?;
    for e in rd.flatten() {
        if let Some(rel) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("vmlinuz-"))
        {
            found.push((e.path(), rel.to_owned()));
        }
    }
    found.sort();
    match found.len() {
        1 => found.pop().ok_or_else(|| BuildError::Verify {
            message: "unreachable".into(),
        }),
        0 => Err(BuildError::Recipe {
            file: recipe_file.to_owned(),
            message: format!("[kernel] dir: no vmlinuz-* in {}", boot.display()),
        }),
        n => Err(BuildError::Recipe {
            file: recipe_file.to_owned(),
            message: format!("[kernel] dir: {n} kernels in {}; keep one", boot.display()),
        }),
    }
}

/// Copies the named modules (and what they depend on) of kernel `release` from `kdir` into a
/// staging tree `lib/modules/<release>/...` with a fresh `modules.dep` (depmod -b).
fn stage_modules(
    kdir: &Path,
    release: &str,
    names: &[String],
    stage: &Path,
    recipe_file: &Path,
) -> Result<(), BuildError> {
    let mroot = kdir.join("lib/modules").join(release);
    let mut all: BTreeMap<String, PathBuf> = BTreeMap::new();
    fn index(dir: &Path, root: &Path, out: &mut BTreeMap<String, PathBuf>) {
        if let Ok(rd) = fs::read_dir(dir) {
            for e in rd.flatten() {
                let p = e.path();
                if p.is_dir() {
                    index(&p, root, out);
                } else if let Some(n) = p.file_name().and_then(|n| n.to_str()) {
                    if let Some(stem) = n
                        .strip_suffix(".ko")
                        .or_else(|| n.strip_suffix(".ko.xz"))
                        .or_else(|| n.strip_suffix(".ko.zst"))
                    {
                        out.insert(
                            stem.replace('-', "_"),
                            p.strip_prefix(root)
                                .map(Path::to_owned)
                                .unwrap_or(p.clone()),
                        );
                    }
                }
            }
        }
    }
    index(&mroot, &mroot, &mut all);
    let mut todo: Vec<String> = names.iter().map(|n| n.replace('-', "_")).collect();
    let mut done = std::collections::BTreeSet::new();
    while let Some(m) = todo.pop() {
        if !done.insert(m.clone()) {
            continue;
        }
        let rel = all.get(&m).ok_or_else(|| BuildError::Recipe {
            file: recipe_file.to_owned(),
            message: format!("[kernel] modules: {m} not found under {}", mroot.display()),
        })?;
        let src = mroot.join(rel);
        let dst = stage.join("lib/modules").join(release).join(rel);
        if let Some(p) = dst.parent() {
            fs::create_dir_all(p).map_err(|e| BuildError::io("creating", p, e))?;
        }
        fs::copy(&src, &dst).map_err(|e| BuildError::io("copying", &src, e))?;
        let out = Command::new("/sbin/modinfo")
            .args(["-F", "depends"])
            .arg(&src)
            .output()
            .map_err(|e| match e.kind() {
                io::ErrorKind::NotFound => BuildError::ToolMissing {
                    tool: "modinfo",
                    hint: "apt-get install kmod",
                },
                _ => BuildError::io("running modinfo on", &src, e),
            })?;
        for d in String::from_utf8_lossy(&out.stdout)
            .trim()
            .split(',')
            .filter(|s| !s.is_empty())
        {
            todo.push(d.replace('-', "_"));
        }
    }
    for f in [
        "modules.order",
        "modules.builtin",
        "modules.builtin.modinfo",
    ] {
        let src = mroot.join(f);
        if src.is_file() {
            let dst = stage.join("lib/modules").join(release).join(f);
            fs::copy(&src, &dst).map_err(|e| BuildError::io("copying", &src, e))?;
        }
    }
    let o = Command::new("/sbin/depmod")
        .arg("-b")
        .arg(stage)
        .arg(release)
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BuildError::ToolMissing {
                tool: "depmod",
                hint: "apt-get install kmod",
            },
            _ => BuildError::io("running depmod on", stage, e),
        })?;
    if !o.status.success() {
        return Err(BuildError::BadSource {
            path: stage.to_owned(),
            message: format!("depmod: {}", String::from_utf8_lossy(&o.stderr).trim()),
        });
    }
    Ok(())
}

/// Files the builder itself writes, described as a recipe would be.
fn implicit_file(path: &str, content: &str, scratch: &Path, n: usize) -> Result<Op, BuildError> {
    let host = scratch.join(format!("implicit-{n}"));
    fs::write(&host, content).map_err(|e| BuildError::io("writing", &host, e))?;
    Ok(Op::File {
        path: path.to_owned(),
        host,
        mode: 0o644,
        uid: 0,
        gid: 0,
    })
}

/// Makes a base's raw ext4 image at `raw`. Returns the kernel file (and release) to publish.
fn make_base(
    l: &Loaded,
    raw: &Path,
    scratch: &Path,
    progress: &dyn Progress,
) -> Result<Option<(PathBuf, String)>, BuildError> {
    let r = &l.recipe;
    let img = r.image.as_ref().ok_or_else(|| BuildError::Recipe {
        file: l.file.clone(),
        message: "missing [image]".into(),
    })?;
    let base = r.base.as_ref().ok_or_else(|| BuildError::Recipe {
        file: l.file.clone(),
        message: "missing [base]".into(),
    })?;
    let epoch = img.epoch.unwrap_or(DEFAULT_EPOCH);
    let mk = ext4::MkfsOptions {
        size: img.size_mib.unwrap_or(0).saturating_mul(1 << 20),
        uuid: uuid_from(&img.name, "uuid"),
        hash_seed: uuid_from(&img.name, "hash_seed"),
        epoch,
        label: img.name.chars().take(16).collect(),
        inodes: img.inodes,
    };
    let src = base.path.as_deref().map(|p| host_path(&l.dir, p));
    let missing = |p: &Path| BuildError::Recipe {
        file: l.file.clone(),
        message: format!("[base] path {}: does not exist", p.display()),
    };
    progress.stage("making the base file system");
    match (base.source, &src) {
        (SourceKind::Empty, _) => {
            ext4::mkfs(raw, None, &mk)?;
            ops::normalize_times(raw, None, epoch, scratch)?;
        }
        (SourceKind::Dir, Some(dir)) => {
            if !dir.is_dir() {
                return Err(missing(dir));
            }
            ext4::mkfs(raw, Some(dir), &mk)?;
            ops::normalize_times(raw, Some(dir), epoch, scratch)?;
        }
        (SourceKind::Tar | SourceKind::Oci, Some(archive)) => {
            if !archive.is_file() {
                return Err(missing(archive));
            }
            let root = scratch.join("stage");
            fs::create_dir(&root).map_err(|e| BuildError::io("creating", &root, e))?;
            let mut stage = base::Stage::new(root.clone());
            if base.source == SourceKind::Tar {
                base::unpack_tarball(&mut stage, archive)?;
            } else {
                base::unpack_oci(&mut stage, archive)?;
            }
            // Staged files must be readable by mke2fs whatever the archive said.
            make_readable(&root)?;
            ext4::mkfs(raw, Some(&root), &mk)?;
            let s = stage.fixup_script(epoch)?;
            ext4::debugfs(raw, true, &s, scratch)?;
            let _ = fs::remove_dir_all(&root);
        }
        (SourceKind::Disk, Some(disk)) => {
            if !disk.is_file() {
                return Err(missing(disk));
            }
            base::disk_to_raw(disk, base.format.as_deref(), raw)?;
        }
        (_, None) => {
            return Err(BuildError::Recipe {
                file: l.file.clone(),
                message: "[base] needs a path".into(),
            })
        }
    }
    // Kernel (and modules) from a host directory, or from the image's own /boot.
    let mut kernel = None;
    let mut extra: Vec<Op> = Vec::new();
    if let Some(k) = &r.kernel {
        match &k.dir {
            Some(d) => {
                let kdir = host_path(&l.dir, d);
                let (file, release) = find_vmlinuz(&kdir, &l.file)?;
                if !k.modules.is_empty() {
                    let mstage = scratch.join("modules");
                    fs::create_dir_all(&mstage)
                        .map_err(|e| BuildError::io("creating", &mstage, e))?;
                    stage_modules(&kdir, &release, &k.modules, &mstage, &l.file)?;
                    let fake = Loaded {
                        file: l.file.clone(),
                        dir: mstage.clone(),
                        text: String::new(),
                        recipe: recipe::Recipe {
                            tree: vec![recipe::TreeOp {
                                from: mstage.display().to_string(),
                                to: "/".into(),
                                uid: 0,
                                gid: 0,
                            }],
                            ..empty_recipe()
                        },
                        kind: RecipeKind::Base,
                    };
                    extra.extend(ops::resolve(&fake, &BTreeMap::new(), scratch)?);
                }
                kernel = Some((file, release));
            }
            None => {
                if !k.modules.is_empty() {
                    return Err(BuildError::Recipe {
                        file: l.file.clone(),
                        message: "[kernel] modules need [kernel] dir".into(),
                    });
                }
            }
        }
    }
    progress.stage("applying the base recipe");
    let mut vars = r.vars.clone();
    vars.insert("image".into(), img.name.clone());
    let mut all = ops::resolve(l, &vars, scratch)?;
    all.extend(extra);
    all.push(implicit_file(
        "/etc/strata/image",
        &format!("{}\n", img.name),
        scratch,
        0,
    )?);
    ops::apply(raw, &all, epoch, scratch)?;
    if let (Some(k), None) = (&r.kernel, &kernel) {
        if k.dir.is_none() {
            kernel = Some(kernel_from_image(raw, scratch, &l.file)?);
        }
    }
    Ok(kernel)
}

/// The releases of the kernels in the image's `/boot` (`vmlinuz-<release>`), oldest first in
/// version order (`6.1.0-9` before `6.1.0-50`).
fn image_kernels(raw: &Path, scratch: &Path) -> Result<Vec<String>, BuildError> {
    let listing = ext4::list_dirs(raw, &["/boot".to_owned()], scratch)?;
    let mut found: Vec<String> = listing
        .into_iter()
        .flatten()
        .flatten()
        .filter(|e| !e.is_dir())
        .filter_map(|e| e.name.strip_prefix("vmlinuz-").map(str::to_owned))
        .collect();
    found.sort_by(|a, b| version_cmp(a, b));
    Ok(found)
}

/// Compares two kernel releases as versions: runs of digits by value, the rest as text.
fn version_cmp(a: &str, b: &str) -> std::cmp::Ordering {
    fn parts(s: &str) -> Vec<(bool, &str)> {
        let mut out = Vec::new();
        let mut start = 0;
        let bytes = s.as_bytes();
        for i in 1..=bytes.len() {
            if i == bytes.len() || bytes[i].is_ascii_digit() != bytes[start].is_ascii_digit() {
                out.push((bytes[start].is_ascii_digit(), &s[start..i]));
                start = i;
            }
        }
        out
    }
    let (pa, pb) = (parts(a), parts(b));
    for ((da, x), (db, y)) in pa.iter().zip(pb.iter()) {
        let o = match (da, db) {
            (true, true) => {
                let (x, y) = (x.trim_start_matches('0'), y.trim_start_matches('0'));
                x.len().cmp(&y.len()).then_with(|| x.cmp(y))
            }
            _ => x.cmp(y),
        };
        if o != std::cmp::Ordering::Equal {
            return o;
        }
    }
    pa.len().cmp(&pb.len()).then_with(|| a.cmp(b))
}

/// The newest kernel in the image's `/boot`, copied into `scratch`, and its release.
fn kernel_from_image(
    raw: &Path,
    scratch: &Path,
    recipe_file: &Path,
) -> Result<(PathBuf, String), BuildError> {
    let Some(release) = image_kernels(raw, scratch)?.pop() else {
        return Err(BuildError::Recipe {
            file: recipe_file.to_owned(),
            message: "[kernel]: the image has no /boot/vmlinuz-*".into(),
        });
    };
    let name = format!("vmlinuz-{release}");
    let dest = scratch.join(&name);
    ext4::dump(raw, &format!("/boot/{name}"), &dest, scratch)?;
    Ok((dest, release))
}

fn empty_recipe() -> recipe::Recipe {
    recipe::Recipe {
        image: None,
        base: None,
        update: None,
        role: None,
        kernel: None,
        packages: None,
        vars: BTreeMap::new(),
        sites: BTreeMap::new(),
        delete: Vec::new(),
        dir: Vec::new(),
        tree: Vec::new(),
        file: Vec::new(),
        symlink: Vec::new(),
        attr: Vec::new(),
    }
}

fn make_readable(dir: &Path) -> Result<(), BuildError> {
    for e in fs::read_dir(dir).map_err(|e| BuildError::io("listing", dir, e))? {
        let e = e.map_err(|e| BuildError::io("listing", dir, e))?;
        let p = e.path();
        let md = fs::symlink_metadata(&p).map_err(|e| BuildError::io("reading", &p, e))?;
        if md.file_type().is_symlink() {
            continue;
        }
        let want = if md.is_dir() { 0o755 } else { 0o644 };
        fs::set_permissions(
            &p,
            fs::Permissions::from_mode(md.permissions().mode() | want),
        )
        .map_err(|e| BuildError::io("chmod", &p, e))?;
        if md.is_dir() {
            make_readable(&p)?;
        }
    }
    Ok(())
}

pub(crate) fn copy_sparse(src: &Path, dst: &Path) -> Result<(), BuildError> {
    // `cp --sparse=always` keeps holes (fs::copy may fill them).
    let o = Command::new("cp")
        .arg("--sparse=always")
        .arg(src)
        .arg(dst)
        .output()
        .map_err(|e| BuildError::io("running cp on", src, e))?;
    if !o.status.success() {
        return Err(BuildError::io(
            "copying",
            src,
            io::Error::other(String::from_utf8_lossy(&o.stderr).trim().to_owned()),
        ));
    }
    Ok(())
}

/// Builds (or finds) the image of a base or update recipe, with its roles.
pub fn build(
    store: &Store,
    recipe_path: &Path,
    opts: &BuildOptions<'_>,
) -> Result<Built, BuildError> {
    let _lock = store.lock_shared()?;
    let l = recipe::load(recipe_path)?;
    let (name, prev) = match l.kind {
        RecipeKind::Base => (
            l.recipe
                .image
                .as_ref()
                .map(|i| i.name.clone())
                .unwrap_or_default(),
            None,
        ),
        RecipeKind::Update => {
            let name = l
                .recipe
                .update
                .as_ref()
                .map(|u| u.image.clone())
                .unwrap_or_default();
            let latest =
                store
                    .catalog()
                    .latest_version(&name)?
                    .ok_or_else(|| BuildError::Recipe {
                        file: l.file.clone(),
                        message: format!(
                        "[update] image {name:?} has no version to update; build its base first"
                    ),
                    })?;
            let info =
                store
                    .catalog()
                    .version(&name, latest)?
                    .ok_or_else(|| BuildError::NotFound {
                        what: format!("{name} version {latest}"),
                    })?;
            (name, Some(info))
        }
        RecipeKind::Role => {
            return Err(BuildError::Recipe {
                file: l.file.clone(),
                message: "a role is built with its image: build the image's base or update recipe"
                    .into(),
            })
        }
    };
    let roles_dir = opts
        .roles_dir
        .clone()
        .unwrap_or_else(|| l.dir.join("..").join("roles"));
    let roles = discover_roles(&roles_dir, &name)?;
    let mut all: Vec<&Loaded> = vec![&l];
    all.extend(roles.iter());
    let kernel_dir = l
        .recipe
        .kernel
        .as_ref()
        .and_then(|k| k.dir.as_deref())
        .map(|d| host_path(&l.dir, d));
    let kernel_file = match &kernel_dir {
        Some(d) => Some(find_vmlinuz(d, &l.file)?.0),
        None => None,
    };
    let extra = prev.as_ref().map(|p| p.base.to_hex()).unwrap_or_default();
    let inputs = inputs_digest(&all, extra.as_bytes(), kernel_file.as_deref())?;
    let same = store.catalog().version_by_inputs(&name, &inputs)?;
    if let Some(v) = same {
        if let Some(b) = existing(store, &name, v)? {
            return Ok(b);
        }
    }
    let version = store.catalog().latest_version(&name)?.unwrap_or(0) + 1;
    let scratch = store.scratch("build")?;
    let sdir = scratch.path();
    let raw = sdir.join("base.raw");
    let epoch;
    let kernel;
    match &prev {
        None => {
            epoch = l
                .recipe
                .image
                .as_ref()
                .and_then(|i| i.epoch)
                .unwrap_or(DEFAULT_EPOCH);
            kernel = make_base(&l, &raw, sdir, opts.progress)?;
        }
        Some(p) => {
            epoch = DEFAULT_EPOCH;
            opts.progress.stage("copying the previous version");
            let chain = store.chain(&p.base)?;
            let cached = layer::cached_raw(store, &chain, sdir)?;
            copy_sparse(&cached, &raw)?;
            // A version booting the image's own kernel follows it: an update that installs a
            // newer kernel (a package upgrade) records that one and its modules.
            let prev_release = p.kernel.as_ref().map(|k| k.1.clone());
            let prev_kernels = image_kernels(&raw, sdir)?;
            let own_kernel = prev_release
                .as_ref()
                .is_some_and(|r| prev_kernels.contains(r));
            if let Some(pk) = &l.recipe.packages {
                let mk = ext4::MkfsOptions {
                    size: fs::metadata(&raw)
                        .map_err(|e| BuildError::io("reading", &raw, e))?
                        .len(),
                    uuid: uuid_from(&name, "uuid"),
                    hash_seed: uuid_from(&name, "hash_seed"),
                    epoch,
                    label: name.chars().take(16).collect(),
                    inodes: Some(packages::inode_count(&raw)?),
                };
                packages::apply(&l, pk, &raw, &mk, sdir, opts.progress)?;
            }
            opts.progress.stage("applying the update recipe");
            let mut vars = l.recipe.vars.clone();
            vars.insert("image".into(), name.clone());
            let ops = ops::resolve(&l, &vars, sdir)?;
            ops::apply(&raw, &ops, epoch, sdir)?;
            // Only a kernel the update brought counts: one that was already there (another
            // flavour, or one an older build ordered differently) does not switch the nodes.
            kernel = match image_kernels(&raw, sdir)?.last() {
                Some(newest)
                    if own_kernel
                        && Some(newest) != prev_release.as_ref()
                        && !prev_kernels.contains(newest) =>
                {
                    opts.progress.stage("recording the image's new kernel");
                    Some(kernel_from_image(&raw, sdir, &l.file)?)
                }
                _ => None,
            };
        }
    }
    opts.progress.stage("checking the base file system");
    ext4::fsck(&raw)?;
    // node-init's modules for the kernel, from where the kernel came from.
    let mut notes = Vec::new();
    let modules_file = match &kernel {
        Some((_, release)) => {
            opts.progress
                .stage("collecting node-init's modules for the kernel");
            let src = match &kernel_dir {
                Some(d) => modules::ModuleSource::Host(d),
                None => modules::ModuleSource::Image(&raw),
            };
            let a = modules::module_archive(src, release, modules::NODE_INIT_MODULES, sdir)?;
            for s in &a.skipped {
                tracing::info!(image = %name, release = %release, module = %s.module, reason = ?s.reason, "module skipped");
                notes.push(format!("kernel {release}: {s}; skipped"));
            }
            let path = sdir.join("modules.cpio");
            fs::write(&path, &a.bytes).map_err(|e| BuildError::io("writing", &path, e))?;
            Some(path)
        }
        None => None,
    };
    opts.progress.stage("writing the base layer");
    let base_vhdx = layer::prepare(&raw, &[], &sdir.join("base.vhdx"), LayerKind::Base)?;
    let base_chain = vec![(base_vhdx.id, base_vhdx.path.clone())];
    // Every role (and site) is built and verified before anything is published, so a bad
    // role leaves the store as it was.
    let mut prepared = Vec::new();
    for rl in &roles {
        let role = rl
            .recipe
            .role
            .as_ref()
            .map(|r| r.name.clone())
            .unwrap_or_default();
        let mut sites: Vec<String> = vec![String::new()];
        sites.extend(rl.recipe.sites.keys().cloned());
        for site in sites {
            let label = if site.is_empty() {
                role.clone()
            } else {
                format!("{role}@{site}")
            };
            opts.progress.stage(&format!("building role {label}"));
            let (p, role_raw) =
                build_role(rl, &name, version, &site, &raw, &base_chain, epoch, sdir)?;
            prepared.push((role.clone(), site, rl.text.clone(), p, role_raw));
        }
    }
    opts.progress.stage("publishing");
    let (kernel, modules) = match (kernel, &prev) {
        (Some((file, release)), _) => {
            let (id, _) = store.publish_blob(&file, "kernel", &format!("vmlinuz-{release}"))?;
            let modules = match &modules_file {
                Some(m) => Some(
                    store
                        .publish_blob(m, "modules", &format!("modules-{release}.cpio"))?
                        .0,
                ),
                None => None,
            };
            (Some((id, release)), modules)
        }
        (None, Some(p)) => (p.kernel.clone(), p.modules),
        (None, None) => (None, None),
    };
    let base_rec = store.publish_layer(
        &base_vhdx.path,
        LayerKind::Base,
        None,
        base_vhdx.virtual_size,
    )?;
    // The base raw becomes the cache of the base layer (update recipes start from it).
    if !store.cache_path(&base_rec.id).is_file() {
        store.publish_cache(&raw, &base_rec.id)?;
    }
    let mut role_infos = Vec::new();
    let mut role_recs = Vec::new();
    for (role, site, text, p, role_raw) in prepared {
        let rec =
            store.publish_layer(&p.path, LayerKind::Role, Some(base_rec.id), p.virtual_size)?;
        if !store.cache_path(&rec.id).is_file() {
            store.publish_cache(&role_raw, &rec.id)?;
        }
        role_infos.push(RoleInfo {
            role: role.clone(),
            site: site.clone(),
            layer: rec.id,
            recipe: text,
        });
        role_recs.push((role, site, rec));
    }
    opts.progress.stage("committing the version");
    store.catalog().commit_version(&NewVersion {
        image: name.clone(),
        version,
        base: base_rec.id,
        kernel: kernel.clone(),
        modules,
        inputs,
        recipe: l.text.clone(),
        roles: role_infos,
    })?;
    let kernel = match kernel {
        Some((id, release)) => Some(KernelRef {
            id,
            release,
            path: store.blob_path(&id),
            size: store.blob_ref(&id)?.size,
            modules: modules.map(|m| store.blob_ref(&m)).transpose()?,
        }),
        None => None,
    };
    Ok(Built {
        image: name,
        version,
        reused: false,
        base: base_rec,
        roles: role_recs,
        kernel,
        notes,
    })
}

#[allow(clippy::too_many_arguments)]
fn build_role(
    rl: &Loaded,
    image: &str,
    version: u64,
    site: &str,
    base_raw: &Path,
    base_chain: &[(LayerId, PathBuf)],
    epoch: u64,
    sdir: &Path,
) -> Result<(layer::Prepared, PathBuf), BuildError> {
    let role = rl
        .recipe
        .role
        .as_ref()
        .map(|r| r.name.clone())
        .unwrap_or_default();
    let rdir = sdir.join(format!("role-{role}-{site}"));
    fs::create_dir_all(&rdir).map_err(|e| BuildError::io("creating", &rdir, e))?;
    let raw = rdir.join("role.raw");
    copy_sparse(base_raw, &raw)?;
    let mut vars = rl.recipe.vars.clone();
    if !site.is_empty() {
        if let Some(s) = rl.recipe.sites.get(site) {
            vars.extend(s.vars.clone());
        }
    }
    vars.insert("image".into(), image.to_owned());
    vars.insert("role".into(), role.clone());
    vars.insert("site".into(), site.to_owned());
    vars.insert("version".into(), version.to_string());
    let in_site = |e: BuildError| match (e, site.is_empty()) {
        (BuildError::Recipe { file, message }, false) => BuildError::Recipe {
            file,
            message: format!("site {site}: {message}"),
        },
        (BuildError::Apply { path, message }, false) => BuildError::Apply {
            path,
            message: format!("{message} (role {role}, site {site})"),
        },
        (BuildError::Apply { path, message }, true) => BuildError::Apply {
            path,
            message: format!("{message} (role {role})"),
        },
        (e, _) => e,
    };
    let mut all = ops::resolve(rl, &vars, &rdir).map_err(in_site)?;
    all.push(implicit_file(
        "/etc/strata/role",
        &format!("{role}\n"),
        &rdir,
        1,
    )?);
    all.push(implicit_file(
        "/etc/strata/version",
        &format!("{version}\n"),
        &rdir,
        2,
    )?);
    all.push(implicit_file(
        "/etc/strata/site",
        &format!("{site}\n"),
        &rdir,
        3,
    )?);
    ops::apply(&raw, &all, epoch, &rdir).map_err(in_site)?;
    ext4::fsck(&raw)?;
    let p = layer::prepare(&raw, base_chain, &rdir.join("role.vhdx"), LayerKind::Role)?;
    Ok((p, raw))
}

fn existing(store: &Store, image: &str, version: u64) -> Result<Option<Built>, BuildError> {
    let Some(info) = store.catalog().version(image, version)? else {
        return Ok(None);
    };
    let Some(base) = store.layer_info(&info.base)? else {
        return Ok(None);
    };
    if !store.layer_path(&base.id).is_file() {
        return Ok(None);
    }
    let mut roles = Vec::new();
    for r in &info.roles {
        let Some(rec) = store.layer_info(&r.layer)? else {
            return Ok(None);
        };
        if !store.layer_path(&rec.id).is_file() {
            return Ok(None);
        }
        roles.push((r.role.clone(), r.site.clone(), rec));
    }
    let kernel = store
        .image_version(image, version, None, None)?
        .and_then(|v| v.kernel);
    Ok(Some(Built {
        image: image.to_owned(),
        version,
        reused: true,
        base,
        roles,
        kernel,
        notes: Vec::new(),
    }))
}

/// Looks up a layer id given as a prefix of at least 8 hex digits.
pub fn resolve_layer_prefix(store: &Store, prefix: &str) -> Result<LayerId, BuildError> {
    if let Ok(d) = prefix.parse::<Digest>() {
        return Ok(d);
    }
    let matches: Vec<LayerId> = store
        .catalog()
        .layers()?
        .into_iter()
        .map(|l| l.id)
        .filter(|id| id.to_hex().starts_with(prefix))
        .collect();
    match matches.as_slice() {
        [one] if prefix.len() >= 8 => Ok(*one),
        [] => Err(BuildError::NotFound {
            what: format!("layer {prefix}"),
        }),
        _ => Err(BuildError::NotFound {
            what: format!("a unique layer for prefix {prefix}"),
        }),
    }
}

#[cfg(test)]
mod tests {
    use super::version_cmp;
    use std::cmp::Ordering::*;

    #[test]
    fn kernel_releases_compare_as_versions() {
        assert_eq!(version_cmp("6.1.0-9-amd64", "6.1.0-50-amd64"), Less);
        assert_eq!(version_cmp("6.1.0-50-amd64", "6.1.0-50-amd64"), Equal);
        assert_eq!(version_cmp("6.10.0-1-amd64", "6.9.0-1-amd64"), Greater);
        assert_eq!(version_cmp("6.1.0-50-amd64", "6.1.0-50-cloud-amd64"), Less);
        let mut v = vec![
            "6.1.0-56-amd64",
            "6.1.0-9-amd64",
            "6.1.0-50-amd64",
            "5.10.0-30-amd64",
        ];
        v.sort_by(|a, b| version_cmp(a, b));
        assert_eq!(
            v,
            [
                "5.10.0-30-amd64",
                "6.1.0-9-amd64",
                "6.1.0-50-amd64",
                "6.1.0-56-amd64"
            ]
        );
    }
}
