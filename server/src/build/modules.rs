//! The kernel modules node-init needs, for one kernel release, as a newc cpio archive that the
//! server appends to node-init's initramfs (docs/images.md, "Kernel and modules").
//!
//! A version that records a kernel (release `R`) also records this archive as a blob. It holds
//! `/lib/modules/R/<path>.ko` for each module of [`NODE_INIT_MODULES`] present as a loadable
//! module of that kernel, with its dependencies (`modinfo`'s `depends`) and soft
//! pre-dependencies (`softdep pre:`, as ext4 wants crc32c), and
//! `/lib/modules/R/strata-modules.list`, their paths in load order (dependencies first), which
//! node-init reads when `uname -r` is `R`. A module built into the kernel (`modules.builtin`) or
//! absent from it is skipped with a note, not an error: the cloud kernel, for one, has ext4
//! built in and no e1000.
//!
//! Compressed modules (`.ko.xz`, `.ko.zst`, `.ko.gz`) are decompressed here, at build time, and
//! stored as plain `.ko`: node-init's `finit_module` then works whether or not the kernel can
//! decompress modules itself (`CONFIG_MODULE_DECOMPRESS`).
//!
//! The modules come from a host kernel tree (`[kernel] dir`, as Debian's package unpacks:
//! `lib/modules/R/...`, no `modules.dep` needed) or from the image itself (`debugfs`, read
//! only) when the kernel is the image's own. The archive is byte-for-byte reproducible (fixed
//! inode numbers, no timestamps).

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ext4;
use super::BuildError;
use crate::boot::initramfs::newc_archive;

/// What node-init loads (the same set as `scripts/build-initramfs.sh`): boot NICs and disks of
/// the lab and common hardware, loop and device-mapper for attaching the chain, ext4 for the
/// cache and images, nbd, and iscsi_tcp for diskless nodes. In load order.
pub const NODE_INIT_MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "virtio_blk",
    "virtio_scsi",
    "sd_mod",
    "e1000",
    "e1000e",
    "loop",
    "dm_mod",
    "dm_zero",
    "dm_snapshot",
    "crc32c_generic",
    "ext4",
    "nbd",
    "iscsi_tcp",
];

/// The name of the load-order list inside `/lib/modules/<release>/`.
pub const LIST_NAME: &str = "strata-modules.list";

/// Where a kernel's modules are read from.
#[derive(Debug, Clone, Copy)]
pub enum ModuleSource<'a> {
    /// A host directory holding `lib/modules/<release>/` (an unpacked kernel package).
    Host(&'a Path),
    /// A raw ext4 image holding `/lib/modules/<release>/`.
    Image(&'a Path),
}

/// Why a module is not in the archive.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize)]
#[serde(rename_all = "snake_case")]
pub enum SkipReason {
    /// Built into the kernel (`modules.builtin`): nothing to load.
    BuiltIn,
    /// Neither a module of this kernel nor built in.
    Absent,
}

/// A module of [`NODE_INIT_MODULES`] left out, and why.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct Skipped {
    /// Module name.
    pub module: String,
    /// Why.
    pub reason: SkipReason,
}

impl std::fmt::Display for Skipped {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self.reason {
            SkipReason::BuiltIn => write!(f, "module {} is built into the kernel", self.module),
            SkipReason::Absent => write!(f, "module {} is not in this kernel", self.module),
        }
    }
}

/// The archive and what went into it.
#[derive(Debug, Clone)]
pub struct ModuleArchive {
    /// Kernel release.
    pub release: String,
    /// The newc archive.
    pub bytes: Vec<u8>,
    /// Paths under `/lib/modules/<release>/` in load order (as in the list).
    pub loaded: Vec<String>,
    /// Modules asked for but not included.
    pub skipped: Vec<Skipped>,
}

/// The module name of a file name: `dm-mod.ko.xz` → `dm_mod`.
fn module_name(file: &str) -> Option<String> {
    let stem = [".ko", ".ko.xz", ".ko.zst", ".ko.gz"]
        .iter()
        .find_map(|s| file.strip_suffix(s))?;
    (!stem.is_empty()).then(|| stem.replace('-', "_"))
}

/// A release is one plain path component (it names a directory).
fn check_release(release: &str) -> Result<(), BuildError> {
    let plain = !release.is_empty()
        && release != "."
        && release != ".."
        && release
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"._-+~".contains(&b));
    if plain {
        Ok(())
    } else {
        Err(BuildError::BadSource {
            path: PathBuf::from(release),
            message: "not a kernel release name".into(),
        })
    }
}

/// Module files of a kernel: name → path relative to `lib/modules/<release>/`, and the names
/// built in.
#[derive(Debug, Default)]
struct Index {
    files: BTreeMap<String, String>,
    builtin: BTreeSet<String>,
}

impl Index {
    fn add_builtin(&mut self, text: &str) {
        self.builtin.extend(builtin_names(text));
    }
}

/// The module names a `modules.builtin` text lists (`kernel/fs/ext4/ext4.ko` → `ext4`); lines
/// that name no module are ignored. The text comes from the image: any bytes are accepted.
pub fn builtin_names(text: &str) -> BTreeSet<String> {
    text.lines()
        .filter_map(|line| line.trim().rsplit('/').next().and_then(module_name))
        .collect()
}

/// What `modinfo`'s output says a module needs: the `depends:` list and the `softdep:` names
/// after `pre:` (until `post:`), `-` read as `_`. Other lines are ignored; any text is
/// accepted (the fields come from the module file, which comes from the image).
pub fn parse_modinfo(text: &str) -> (Vec<String>, Vec<String>) {
    let (mut deps, mut pre) = (Vec::new(), Vec::new());
    for line in text.lines() {
        if let Some(v) = line.strip_prefix("depends:") {
            deps.extend(
                v.split(',')
                    .map(str::trim)
                    .filter(|s| !s.is_empty())
                    .map(|s| s.replace('-', "_")),
            );
        } else if let Some(v) = line.strip_prefix("softdep:") {
            let mut in_pre = false;
            for w in v.split_whitespace() {
                match w {
                    "pre:" => in_pre = true,
                    "post:" => in_pre = false,
                    m if in_pre => pre.push(m.replace('-', "_")),
                    _ => {}
                }
            }
        }
    }
    (deps, pre)
}

fn host_index(mroot: &Path) -> Result<Index, BuildError> {
    let mut index = Index::default();
    fn walk(dir: &Path, rel: &str, index: &mut Index) -> Result<(), BuildError> {
        let rd = match fs::read_dir(dir) {
            Ok(rd) => rd,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(()),
            Err(e) => return Err(BuildError::io("listing", dir, e)),
        };
        let mut entries = Vec::new();
        for e in rd {
            let e = e.map_err(|e| BuildError::io("listing", dir, e))?;
            entries.push(e);
        }
        entries.sort_by_key(|e| e.file_name());
        for e in entries {
            let Some(name) = e.file_name().to_str().map(str::to_owned) else {
                continue;
            };
            let ft = e
                .file_type()
                .map_err(|err| BuildError::io("reading", &e.path(), err))?;
            let r = if rel.is_empty() {
                name.clone()
            } else {
                format!("{rel}/{name}")
            };
            // `build` and `source` are symlinks out of the tree: never followed.
            if ft.is_dir() {
                walk(&e.path(), &r, index)?;
            } else if ft.is_file() {
                if let Some(m) = module_name(&name) {
                    index.files.entry(m).or_insert(r);
                }
            }
        }
        Ok(())
    }
    walk(mroot, "", &mut index)?;
    match fs::read_to_string(mroot.join("modules.builtin")) {
        Ok(text) => index.add_builtin(&text),
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(BuildError::io("reading", &mroot.join("modules.builtin"), e)),
    }
    Ok(index)
}

/// Lists `/lib/modules/<release>` of an image level by level (one debugfs session per level).
fn image_index(raw: &Path, mroot: &str, scratch: &Path) -> Result<Index, BuildError> {
    let mut index = Index::default();
    let mut level = vec![(mroot.to_owned(), String::new())];
    // Module trees are a handful of levels deep; the bound keeps a hostile image from looping.
    for _ in 0..32 {
        if level.is_empty() {
            break;
        }
        let dirs: Vec<String> = level.iter().map(|(d, _)| d.clone()).collect();
        let listed = ext4::list_dirs(raw, &dirs, scratch)?;
        let mut next = Vec::new();
        for ((dir, rel), entries) in level.iter().zip(listed) {
            for e in entries.into_iter().flatten() {
                let r = if rel.is_empty() {
                    e.name.clone()
                } else {
                    format!("{rel}/{}", e.name)
                };
                if e.is_dir() {
                    next.push((format!("{dir}/{}", e.name), r));
                } else if e.mode & 0o170000 == 0o100000 {
                    if let Some(m) = module_name(&e.name) {
                        index.files.entry(m).or_insert(r);
                    }
                }
            }
        }
        level = next;
    }
    let builtin = scratch.join("modules.builtin");
    if ext4::dump(raw, &format!("{mroot}/modules.builtin"), &builtin, scratch).is_ok() {
        if let Ok(text) = fs::read_to_string(&builtin) {
            index.add_builtin(&text);
        }
    }
    Ok(index)
}

/// What `modinfo` says a module needs: hard dependencies and soft pre-dependencies.
fn modinfo(file: &Path) -> Result<(Vec<String>, Vec<String>), BuildError> {
    let out = Command::new("/sbin/modinfo")
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BuildError::ToolMissing {
                tool: "modinfo",
                hint: "apt-get install kmod",
            },
            _ => BuildError::io("running modinfo on", file, e),
        })?;
    if !out.status.success() {
        return Err(BuildError::BadSource {
            path: file.to_owned(),
            message: format!("modinfo: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(parse_modinfo(&String::from_utf8_lossy(&out.stdout)))
}

/// The plain `.ko` bytes of `file` (decompressing `.xz`, `.zst`, `.gz` with the host tools).
fn module_bytes(file: &Path) -> Result<Vec<u8>, BuildError> {
    let name = file.to_string_lossy();
    let tool = if name.ends_with(".xz") {
        Some(("xz", "apt-get install xz-utils"))
    } else if name.ends_with(".zst") {
        Some(("zstd", "apt-get install zstd"))
    } else if name.ends_with(".gz") {
        Some(("gzip", "apt-get install gzip"))
    } else {
        None
    };
    let Some((tool, hint)) = tool else {
        return fs::read(file).map_err(|e| BuildError::io("reading", file, e));
    };
    let out = Command::new(tool)
        .args(["-d", "-c"])
        .arg(file)
        .stdin(Stdio::null())
        .output()
        .map_err(|e| match e.kind() {
            io::ErrorKind::NotFound => BuildError::ToolMissing {
                tool: "xz/zstd/gzip",
                hint,
            },
            _ => BuildError::io("decompressing", file, e),
        })?;
    if !out.status.success() {
        return Err(BuildError::BadSource {
            path: file.to_owned(),
            message: format!("{tool} -d: {}", String::from_utf8_lossy(&out.stderr).trim()),
        });
    }
    Ok(out.stdout)
}

/// Path of a module inside the archive: compression suffix dropped.
fn plain_rel(rel: &str) -> String {
    for s in [".xz", ".zst", ".gz"] {
        if let Some(p) = rel.strip_suffix(s) {
            return p.to_owned();
        }
    }
    rel.to_owned()
}

/// What a module needs: hard dependencies and soft pre-dependencies (module names).
type Needs = (Vec<String>, Vec<String>);

/// The load order of `names` and what they need, from `index`: module names, each after its
/// dependencies and soft pre-dependencies (depth-first post-order; the first listed first),
/// each once; plus the names skipped (built in or absent). `needs(name, path)` reads what a
/// module needs; it is called once per module reached. A dependency that is not a module file
/// is left out (built in, or the kernel cannot load the dependant anyway); a dependency cycle,
/// which no sane kernel has, is broken where it closes.
fn resolve(
    names: &[&str],
    index: &Index,
    mut needs: impl FnMut(&str, &str) -> Result<Needs, BuildError>,
) -> Result<(Vec<String>, Vec<Skipped>), BuildError> {
    let mut skipped = Vec::new();
    let mut order = Vec::new();
    let mut known: BTreeMap<String, Needs> = BTreeMap::new();
    let mut placed = BTreeSet::new();
    for want in names {
        let want = want.replace('-', "_");
        if !index.files.contains_key(&want) {
            let reason = if index.builtin.contains(&want) {
                SkipReason::BuiltIn
            } else {
                SkipReason::Absent
            };
            if !skipped.iter().any(|s: &Skipped| s.module == want) {
                skipped.push(Skipped {
                    module: want,
                    reason,
                });
            }
            continue;
        }
        // (module, its dependencies already pushed)
        let mut stack: Vec<(String, bool)> = vec![(want, false)];
        let mut on_path = BTreeSet::new();
        while let Some((m, expanded)) = stack.pop() {
            if placed.contains(&m) {
                continue;
            }
            let Some(rel) = index.files.get(&m) else {
                continue;
            };
            if expanded {
                on_path.remove(&m);
                placed.insert(m.clone());
                order.push(m);
                continue;
            }
            if !on_path.insert(m.clone()) {
                continue;
            }
            if !known.contains_key(&m) {
                let n = needs(&m, rel)?;
                known.insert(m.clone(), n);
            }
            stack.push((m.clone(), true));
            if let Some((deps, pre)) = known.get(&m) {
                // Pushed in reverse so the first listed is loaded first; soft
                // pre-dependencies before hard ones.
                for d in deps.iter().rev().chain(pre.iter().rev()) {
                    if !placed.contains(d) && index.files.contains_key(d) {
                        stack.push((d.clone(), false));
                    }
                }
            }
        }
    }
    Ok((order, skipped))
}

/// Builds the module archive of kernel `release` for `names` (in load order) from `src`.
/// `scratch` is a directory the call may write to.
pub fn module_archive(
    src: ModuleSource<'_>,
    release: &str,
    names: &[&str],
    scratch: &Path,
) -> Result<ModuleArchive, BuildError> {
    check_release(release)?;
    let work = scratch.join(format!("modules-{release}"));
    fs::create_dir_all(&work).map_err(|e| BuildError::io("creating", &work, e))?;
    let index = match src {
        ModuleSource::Host(root) => host_index(&root.join("lib/modules").join(release))?,
        ModuleSource::Image(raw) => image_index(raw, &format!("/lib/modules/{release}"), &work)?,
    };
    // One local file per module: the host's, or a copy dumped out of the image.
    let mut dumped = 0usize;
    let mut local = |rel: &str| -> Result<PathBuf, BuildError> {
        match src {
            ModuleSource::Host(root) => Ok(root.join("lib/modules").join(release).join(rel)),
            ModuleSource::Image(raw) => {
                let ext = rel.rsplit_once(".ko").map(|(_, e)| e).unwrap_or("");
                dumped += 1;
                let dest = work.join(format!("m{dumped}.ko{ext}"));
                ext4::dump(raw, &format!("/lib/modules/{release}/{rel}"), &dest, &work)?;
                Ok(dest)
            }
        }
    };

    // What each module needs, read once per module (modinfo on the local file).
    let mut files_of: BTreeMap<String, PathBuf> = BTreeMap::new();
    let (names_in_order, skipped) = resolve(names, &index, |m, rel| {
        let file = local(rel)?;
        let needs = modinfo(&file)?;
        files_of.insert(m.to_owned(), file);
        Ok(needs)
    })?;
    let mut order: Vec<String> = Vec::new();
    let mut files: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    for m in &names_in_order {
        let (Some(rel), Some(file)) = (index.files.get(m), files_of.get(m)) else {
            continue;
        };
        let plain = plain_rel(rel);
        files.insert(plain.clone(), module_bytes(file)?);
        order.push(plain);
    }

    let base = format!("lib/modules/{release}");
    let mut list = format!("# kernel {release}: load order (strata image build)\n");
    for rel in &order {
        list.push_str(&format!("/{base}/{rel}\n"));
    }
    let mut dirs = BTreeSet::new();
    for p in ["lib".to_owned(), "lib/modules".to_owned(), base.clone()] {
        dirs.insert(p);
    }
    for rel in files.keys() {
        let mut acc = base.clone();
        let parts: Vec<&str> = rel.split('/').collect();
        if let Some((_, parent)) = parts.split_last() {
            for part in parent {
                acc = format!("{acc}/{part}");
                dirs.insert(acc.clone());
            }
        }
    }
    let names_full: Vec<(String, &[u8])> = files
        .iter()
        .map(|(rel, b)| (format!("{base}/{rel}"), b.as_slice()))
        .collect();
    let list_path = format!("{base}/{LIST_NAME}");
    let mut entries: Vec<(&str, u32, &[u8])> = Vec::new();
    for d in &dirs {
        entries.push((d.as_str(), 0o040755, b""));
    }
    for (p, b) in &names_full {
        entries.push((p.as_str(), 0o100644, b));
    }
    entries.push((list_path.as_str(), 0o100644, list.as_bytes()));
    // Parents before children (BTreeSet order gives that: a prefix sorts first).
    entries.sort_by(|a, b| a.0.cmp(b.0));
    let bytes = newc_archive(&entries);
    let _ = fs::remove_dir_all(&work);
    Ok(ModuleArchive {
        release: release.to_owned(),
        bytes,
        loaded: order,
        skipped,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::Strategy;
    use std::collections::BTreeMap;

    fn cache() -> PathBuf {
        if let Some(d) = std::env::var_os("STRATA_CACHE") {
            return PathBuf::from(d);
        }
        let home = std::env::var_os("HOME")
            .map(PathBuf::from)
            .unwrap_or_default();
        home.join(".cache/strata")
    }

    /// An unpacked kernel package from scripts/setup.sh: (root, release).
    fn kernel_tree(dir: &str) -> (PathBuf, String) {
        let root = cache().join(dir).join("root");
        let release = fs::read_dir(root.join("lib/modules"))
            .ok()
            .and_then(|mut rd| rd.next())
            .and_then(|e| e.ok())
            .and_then(|e| e.file_name().to_str().map(str::to_owned))
            .unwrap_or_else(|| {
                panic!(
                    "no kernel under {}: run scripts/setup.sh (it unpacks Debian's kernels)",
                    root.display()
                )
            });
        (root, release)
    }

    /// GNU cpio (a real peer) lists the archive.
    fn cpio_list(bytes: &[u8]) -> Vec<String> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.cpio");
        fs::write(&path, bytes).unwrap();
        let out = Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(fs::File::open(&path).unwrap())
            .output()
            .expect("cpio missing: run scripts/setup.sh (Debian package cpio)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8(out.stdout)
            .unwrap()
            .lines()
            .map(str::to_owned)
            .collect()
    }

    /// GNU cpio extracts one member.
    fn cpio_cat(bytes: &[u8], member: &str) -> Vec<u8> {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("m.cpio");
        fs::write(&path, bytes).unwrap();
        let out = Command::new("cpio")
            .args(["-i", "--quiet", "--to-stdout", member])
            .stdin(fs::File::open(&path).unwrap())
            .output()
            .expect("cpio missing: run scripts/setup.sh (Debian package cpio)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        out.stdout
    }

    /// kmod itself (a real peer): `depmod` on a hard-linked copy of the tree, then
    /// `modprobe --show-depends` for each module (what it would insert), and depmod's
    /// `modules.dep` (module → what it needs, as paths relative to the release directory).
    #[allow(clippy::type_complexity)]
    fn modprobe_order(
        root: &Path,
        release: &str,
        names: &[&str],
    ) -> (Vec<Vec<String>>, BTreeMap<String, Vec<String>>) {
        let dir = tempfile::tempdir().unwrap();
        let copy = dir.path().join("lib/modules");
        fs::create_dir_all(&copy).unwrap();
        let st = Command::new("cp")
            .arg("-al")
            .arg(root.join("lib/modules").join(release))
            .arg(&copy)
            .status()
            .unwrap();
        assert!(st.success());
        let st = Command::new("/sbin/depmod")
            .arg("-b")
            .arg(dir.path())
            .arg(release)
            .status()
            .expect("depmod missing: apt-get install kmod");
        assert!(st.success());
        let dep = fs::read_to_string(copy.join(release).join("modules.dep")).unwrap();
        let deps = dep
            .lines()
            .filter_map(|l| l.split_once(':'))
            .map(|(m, d)| {
                (
                    m.to_owned(),
                    d.split_whitespace().map(str::to_owned).collect(),
                )
            })
            .collect();
        let chains = names
            .iter()
            .map(|n| {
                let out = Command::new("/sbin/modprobe")
                    .arg("-d")
                    .arg(dir.path())
                    .args(["-S", release, "--show-depends", n])
                    .output()
                    .unwrap();
                String::from_utf8_lossy(&out.stdout)
                    .lines()
                    .filter_map(|l| l.strip_prefix("insmod "))
                    .map(|p| {
                        let p = p.trim();
                        let marker = format!("/lib/modules/{release}/");
                        p.split_once(&marker)
                            .map(|(_, r)| r)
                            .unwrap_or(p)
                            .to_owned()
                    })
                    .collect()
            })
            .collect();
        (chains, deps)
    }

    fn list_of(a: &ModuleArchive) -> Vec<String> {
        let text = cpio_cat(&a.bytes, &format!("lib/modules/{}/{LIST_NAME}", a.release));
        String::from_utf8(text)
            .unwrap()
            .lines()
            .filter(|l| !l.starts_with('#'))
            .map(str::to_owned)
            .collect()
    }

    #[test]
    fn generic_kernel_archive_matches_modprobe() {
        let (root, release) = kernel_tree("kernel");
        let scratch = tempfile::tempdir().unwrap();
        let a = module_archive(
            ModuleSource::Host(&root),
            &release,
            NODE_INIT_MODULES,
            scratch.path(),
        )
        .unwrap();
        // GNU cpio lists exactly: the directories, every module of the list, the list.
        let listed: BTreeSet<String> = cpio_list(&a.bytes).into_iter().collect();
        let base = format!("lib/modules/{release}");
        let mut want: BTreeSet<String> = ["lib".into(), "lib/modules".into(), base.clone()]
            .into_iter()
            .collect();
        want.insert(format!("{base}/{LIST_NAME}"));
        for rel in &a.loaded {
            let mut acc = base.clone();
            for part in rel.split('/') {
                acc = format!("{acc}/{part}");
                want.insert(acc.clone());
            }
        }
        assert_eq!(listed, want);
        let list = list_of(&a);
        assert_eq!(
            list,
            a.loaded
                .iter()
                .map(|r| format!("/{base}/{r}"))
                .collect::<Vec<_>>()
        );
        // Every module of the set, and each one's dependencies before it, as kmod orders them.
        let pos: BTreeMap<&str, usize> = a
            .loaded
            .iter()
            .enumerate()
            .map(|(i, r)| (r.as_str(), i))
            .collect();
        let (chains, deps) = modprobe_order(&root, &release, NODE_INIT_MODULES);
        // Expected: what modprobe inserts for each wanted module, less what it reaches only
        // through a soft dependency on a crypto alias (`crc32c`, `crct10dif`: aliases are
        // not resolved; the list names crc32c_generic itself).
        let mut from_kmod = BTreeSet::new();
        for (name, chain) in NODE_INIT_MODULES.iter().zip(&chains) {
            if a.skipped.iter().any(|s| s.module == *name) {
                continue;
            }
            assert!(!chain.is_empty(), "modprobe knows no {name}");
            let top = chain.last().cloned().unwrap_or_default();
            let mut todo = vec![top];
            while let Some(m) = todo.pop() {
                if from_kmod.insert(m.clone()) {
                    todo.extend(deps.get(&m).into_iter().flatten().cloned());
                }
            }
            for m in chain {
                let by_alias = ["crc32c-intel", "crct10dif-pclmul", "crct10dif_generic"]
                    .iter()
                    .any(|a| m.ends_with(&format!("/{a}.ko")));
                assert!(
                    by_alias || from_kmod.contains(m),
                    "{name}: modprobe inserts {m}, not a dependency we know"
                );
            }
        }
        for (i, m) in a.loaded.iter().enumerate() {
            for d in deps.get(m).into_iter().flatten() {
                assert!(
                    pos.get(d.as_str()).is_some_and(|j| *j < i),
                    "{m} needs {d} loaded before it: {:?}",
                    a.loaded
                );
            }
        }
        let ours: BTreeSet<String> = a.loaded.iter().cloned().collect();
        assert_eq!(ours, from_kmod, "our set differs from modprobe's");
        // ext4's soft pre-dependency comes first; the files are the tree's bytes.
        let crc = a
            .loaded
            .iter()
            .position(|r| r.ends_with("/crc32c_generic.ko"));
        let ext4 = a.loaded.iter().position(|r| r.ends_with("/ext4.ko"));
        assert!(
            crc.is_some() && ext4.is_some() && crc < ext4,
            "{:?}",
            a.loaded
        );
        let loop_rel = a.loaded.iter().find(|r| r.ends_with("/loop.ko")).unwrap();
        assert_eq!(
            cpio_cat(&a.bytes, &format!("{base}/{loop_rel}")),
            fs::read(root.join("lib/modules").join(&release).join(loop_rel)).unwrap()
        );
        // Reproducible.
        let again = module_archive(
            ModuleSource::Host(&root),
            &release,
            NODE_INIT_MODULES,
            scratch.path(),
        )
        .unwrap();
        assert_eq!(a.bytes, again.bytes);
    }

    #[test]
    fn cloud_kernel_skips_built_in_and_absent_modules() {
        let (root, release) = kernel_tree("kernel-cloud");
        let scratch = tempfile::tempdir().unwrap();
        let a = module_archive(
            ModuleSource::Host(&root),
            &release,
            NODE_INIT_MODULES,
            scratch.path(),
        )
        .unwrap();
        let reason = |m: &str| a.skipped.iter().find(|s| s.module == m).map(|s| s.reason);
        assert_eq!(reason("ext4"), Some(SkipReason::BuiltIn));
        assert_eq!(reason("crc32c_generic"), Some(SkipReason::BuiltIn));
        assert_eq!(reason("e1000"), Some(SkipReason::Absent));
        assert_eq!(reason("e1000e"), Some(SkipReason::Absent));
        assert_eq!(reason("virtio_net"), None);
        let list = list_of(&a);
        for m in [
            "virtio_net.ko",
            "virtio_blk.ko",
            "loop.ko",
            "dm-snapshot.ko",
        ] {
            assert!(
                list.iter()
                    .any(|l| l.starts_with(&format!("/lib/modules/{release}/")) && l.ends_with(m)),
                "{m} not in {list:?}"
            );
        }
    }

    /// A small kernel tree (some modules compressed) gives the same archive read from the host
    /// or from an ext4 image holding it, with the compressed modules stored decompressed.
    #[test]
    fn image_and_host_sources_agree_and_modules_are_decompressed() {
        let (root, release) = kernel_tree("kernel");
        let src = root.join("lib/modules").join(&release);
        let dir = tempfile::tempdir().unwrap();
        let tree = dir.path().join("tree");
        let mdir = tree.join("lib/modules").join(&release);
        let pick = [
            ("kernel/drivers/block/loop.ko", false),
            ("kernel/drivers/md/dm-mod.ko", false),
            ("kernel/drivers/md/dm-bufio.ko", true),
            ("kernel/drivers/md/dm-snapshot.ko", true),
        ];
        for (rel, xz) in pick {
            let to = mdir.join(rel);
            fs::create_dir_all(to.parent().unwrap()).unwrap();
            fs::copy(src.join(rel), &to).unwrap();
            if xz {
                let st = Command::new("xz")
                    .arg("-q")
                    .arg(&to)
                    .status()
                    .expect("xz missing: apt-get install xz-utils");
                assert!(st.success());
            }
        }
        fs::write(mdir.join("modules.builtin"), "kernel/fs/ext4/ext4.ko\n").unwrap();
        let names = ["loop", "dm_snapshot", "ext4", "nbd"];
        let scratch = dir.path().join("scratch");
        fs::create_dir(&scratch).unwrap();
        let host = module_archive(ModuleSource::Host(&tree), &release, &names, &scratch).unwrap();
        assert_eq!(
            host.loaded,
            [
                "kernel/drivers/block/loop.ko",
                "kernel/drivers/md/dm-mod.ko",
                "kernel/drivers/md/dm-bufio.ko",
                "kernel/drivers/md/dm-snapshot.ko",
            ]
        );
        assert_eq!(
            host.skipped,
            [
                Skipped {
                    module: "ext4".into(),
                    reason: SkipReason::BuiltIn
                },
                Skipped {
                    module: "nbd".into(),
                    reason: SkipReason::Absent
                },
            ]
        );
        assert_eq!(
            cpio_cat(
                &host.bytes,
                &format!("lib/modules/{release}/kernel/drivers/md/dm-snapshot.ko")
            ),
            fs::read(src.join("kernel/drivers/md/dm-snapshot.ko")).unwrap()
        );
        let raw = dir.path().join("image.raw");
        ext4::mkfs(
            &raw,
            Some(&tree),
            &ext4::MkfsOptions {
                size: 64 << 20,
                uuid: "6a0f1d3c-1111-4222-8333-444455556666".into(),
                hash_seed: "6a0f1d3c-1111-4222-8333-444455556667".into(),
                epoch: 1_700_000_000,
                label: "mods".into(),
                inodes: None,
            },
        )
        .unwrap();
        let image = module_archive(ModuleSource::Image(&raw), &release, &names, &scratch).unwrap();
        assert_eq!(image.bytes, host.bytes);
        assert_eq!(image.skipped, host.skipped);
    }

    /// A random module graph: `n` modules `m0..`, module `i` depending on some `j < i` (a
    /// DAG, as kernels have), some wanted names absent or built in.
    fn graph() -> impl Strategy<Value = (Vec<Vec<usize>>, Vec<usize>, Vec<usize>)> {
        (1usize..24).prop_flat_map(|n| {
            (
                proptest::collection::vec(proptest::collection::vec(0usize..64, 0..4), n),
                proptest::collection::vec(0usize..(n + 6), 0..10),
                proptest::collection::vec(n..(n + 6), 0..3),
            )
        })
    }

    fn index_of(n: usize, builtin: &[usize]) -> Index {
        let mut index = Index::default();
        for i in 0..n {
            index
                .files
                .insert(format!("m{i}"), format!("kernel/m{i}.ko"));
        }
        for b in builtin {
            index.builtin.insert(format!("m{b}"));
        }
        index
    }

    proptest::proptest! {
        /// Every wanted module present is loaded once, after everything it needs; nothing
        /// else is loaded; the rest is skipped with the right reason; `needs` runs once per
        /// module.
        #[test]
        fn resolve_orders_dependencies_first((edges, wanted, builtin) in graph()) {
            let n = edges.len();
            let deps_of = |i: usize| -> Vec<String> {
                edges[i].iter().filter(|d| **d < i).map(|d| format!("m{d}")).collect()
            };
            let index = index_of(n, &builtin);
            let names: Vec<String> = wanted.iter().map(|w| format!("m{w}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let mut calls = BTreeMap::new();
            let (order, skipped) = resolve(&refs, &index, |m, _| {
                *calls.entry(m.to_owned()).or_insert(0) += 1;
                let i: usize = m[1..].parse().unwrap();
                // Even modules also name a soft pre-dependency on the previous one.
                let pre = if i.is_multiple_of(2) && i > 0 { vec![format!("m{}", i - 1)] } else { vec![] };
                Ok((deps_of(i), pre))
            }).unwrap();
            let pos: BTreeMap<&str, usize> =
                order.iter().enumerate().map(|(p, m)| (m.as_str(), p)).collect();
            proptest::prop_assert_eq!(pos.len(), order.len(), "a module twice: {:?}", order);
            proptest::prop_assert!(calls.values().all(|c| *c == 1));
            // The closure of what was wanted, exactly.
            let mut closure = BTreeSet::new();
            let mut todo: Vec<usize> = wanted.iter().copied().filter(|w| *w < n).collect();
            while let Some(i) = todo.pop() {
                if closure.insert(format!("m{i}")) {
                    todo.extend(edges[i].iter().filter(|d| **d < i));
                    if i.is_multiple_of(2) && i > 0 {
                        todo.push(i - 1);
                    }
                }
            }
            let got: BTreeSet<String> = order.iter().cloned().collect();
            proptest::prop_assert_eq!(&got, &closure);
            for m in &order {
                let i: usize = m[1..].parse().unwrap();
                for d in deps_of(i) {
                    proptest::prop_assert!(pos[d.as_str()] < pos[m.as_str()], "{} before {}", d, m);
                }
                if i.is_multiple_of(2) && i > 0 {
                    let p = format!("m{}", i - 1);
                    proptest::prop_assert!(pos[p.as_str()] < pos[m.as_str()]);
                }
            }
            for w in wanted.iter().filter(|w| **w >= n) {
                let name = format!("m{w}");
                let reason = if builtin.contains(w) { SkipReason::BuiltIn } else { SkipReason::Absent };
                proptest::prop_assert_eq!(
                    skipped.iter().filter(|s| s.module == name).map(|s| s.reason).collect::<Vec<_>>(),
                    vec![reason]
                );
            }
        }

        /// Any graph, cycles included, terminates with each module at most once.
        #[test]
        fn resolve_survives_cycles(edges in proptest::collection::vec(proptest::collection::vec(0usize..8, 0..4), 1..8)) {
            let n = edges.len();
            let index = index_of(n, &[]);
            let names: Vec<String> = (0..n).map(|i| format!("m{i}")).collect();
            let refs: Vec<&str> = names.iter().map(String::as_str).collect();
            let (order, _) = resolve(&refs, &index, |m, _| {
                let i: usize = m[1..].parse().unwrap();
                Ok((edges[i].iter().filter(|d| **d < n).map(|d| format!("m{d}")).collect(), vec![]))
            }).unwrap();
            let set: BTreeSet<&String> = order.iter().collect();
            proptest::prop_assert_eq!(set.len(), order.len());
            proptest::prop_assert_eq!(order.len(), n);
        }
    }

    proptest::proptest! {
        /// modinfo's fields as kmod prints them come back as written (`-` as `_`); what
        /// follows `post:` is not a pre-dependency; other lines change nothing.
        #[test]
        fn modinfo_fields_parse(
            deps in proptest::collection::vec("[a-z0-9][a-z0-9_-]{0,12}", 0..5),
            pre in proptest::collection::vec("[a-z0-9][a-z0-9_-]{0,12}", 0..3),
            post in proptest::collection::vec("[a-z0-9][a-z0-9_-]{0,12}", 0..3),
            noise in proptest::collection::vec("[a-z]{1,8}: [ -~]{0,20}", 0..4),
        ) {
            let mut text = String::from("filename:       /x.ko\n");
            for n in &noise {
                if !n.starts_with("depends:") && !n.starts_with("softdep:") {
                    text.push_str(n);
                    text.push('\n');
                }
            }
            text.push_str(&format!("depends:        {}\n", deps.join(",")));
            let mut soft = String::new();
            if !pre.is_empty() {
                soft.push_str(&format!("pre: {}", pre.join(" ")));
            }
            if !post.is_empty() {
                soft.push_str(&format!(" post: {}", post.join(" ")));
            }
            text.push_str(&format!("softdep:        {soft}\n"));
            let (d, p) = parse_modinfo(&text);
            let us = |v: &Vec<String>| v.iter().map(|s| s.replace('-', "_")).collect::<Vec<_>>();
            proptest::prop_assert_eq!(d, us(&deps));
            proptest::prop_assert_eq!(p, us(&pre));
        }

        /// Every `<dir>/<name>.ko` line of modules.builtin names `<name>` (`-` as `_`), and
        /// nothing else is named.
        #[test]
        fn builtin_lines_parse(names in proptest::collection::vec(("[a-z]{1,6}", "[a-z0-9][a-z0-9_-]{0,10}"), 0..8), junk in "[ -~\n]{0,40}") {
            let mut text = String::new();
            for (dir, n) in &names {
                text.push_str(&format!("kernel/{dir}/{n}.ko\n"));
            }
            let got = builtin_names(&text);
            let want: BTreeSet<String> = names.iter().map(|(_, n)| n.replace('-', "_")).collect();
            proptest::prop_assert_eq!(&got, &want);
            // Junk lines add only names of lines ending in `.ko` or a compressed `.ko`.
            let with = builtin_names(&format!("{text}{junk}"));
            proptest::prop_assert!(want.is_subset(&with));
        }
    }

    #[test]
    fn module_names() {
        assert_eq!(module_name("dm-mod.ko").as_deref(), Some("dm_mod"));
        assert_eq!(module_name("ext4.ko.xz").as_deref(), Some("ext4"));
        assert_eq!(module_name("x.ko.zst").as_deref(), Some("x"));
        assert_eq!(module_name("modules.dep"), None);
        assert_eq!(module_name(".ko"), None);
        assert_eq!(plain_rel("kernel/a/b.ko.xz"), "kernel/a/b.ko");
    }

    #[test]
    fn releases_are_one_component() {
        assert!(check_release("6.1.0-56-cloud-amd64").is_ok());
        for bad in ["", ".", "..", "a/b", "../x", "a b"] {
            assert!(check_release(bad).is_err(), "{bad:?}");
        }
    }
}
