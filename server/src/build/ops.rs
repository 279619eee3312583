//! Applying a recipe's entries to an ext4 image offline, through debugfs.
//!
//! A recipe's entries are first resolved into [`Op`]s (trees walked in sorted order, templates
//! rendered into scratch files, every source checked), then planned against what the image
//! already holds (one read-only debugfs session lists the directories involved), then written
//! in one `debugfs -w` session. Order: deletions, directories, trees, files, symlinks; parents
//! are made as needed (0755, root); an existing file or link at a target is replaced; a
//! directory is never silently replaced by a file.

use std::collections::{BTreeMap, BTreeSet};
use std::fs;
use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::{Path, PathBuf};

use super::ext4::{self, Entry, Script};
use super::recipe::{host_path, Loaded, Mode};
use super::template;
use super::BuildError;

/// One resolved change to an image.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Op {
    /// Remove a path (recursively); `missing_ok` tolerates its absence.
    Delete {
        /// Path in the image.
        path: String,
        /// Absent is fine.
        missing_ok: bool,
    },
    /// Make (or re-own) a directory.
    Dir {
        /// Path.
        path: String,
        /// From a tree: an existing directory keeps its mode and owner.
        keep_existing: bool,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// Write a regular file from a host file.
    File {
        /// Path.
        path: String,
        /// Host file holding the content.
        host: PathBuf,
        /// Permission bits.
        mode: u32,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
    /// Set the mode and/or owner of an existing path.
    Attr {
        /// Path.
        path: String,
        /// Permission bits.
        mode: Option<u32>,
        /// Owner.
        uid: Option<u32>,
        /// Group.
        gid: Option<u32>,
    },
    /// Make a symbolic link.
    Symlink {
        /// Path.
        path: String,
        /// Target, as stored.
        target: String,
        /// Owner.
        uid: u32,
        /// Group.
        gid: u32,
    },
}

impl Op {
    fn path(&self) -> &str {
        match self {
            Op::Delete { path, .. }
            | Op::Dir { path, .. }
            | Op::File { path, .. }
            | Op::Symlink { path, .. }
            | Op::Attr { path, .. } => path,
        }
    }
}

/// Joins an image directory and a relative name.
pub fn join(dir: &str, name: &str) -> String {
    if dir == "/" {
        format!("/{name}")
    } else {
        format!("{dir}/{name}")
    }
}

fn parent(p: &str) -> &str {
    match p.rfind('/') {
        Some(0) | None => "/",
        Some(i) => &p[..i],
    }
}

fn recipe_err(l: &Loaded, message: String) -> BuildError {
    BuildError::Recipe {
        file: l.file.clone(),
        message,
    }
}

/// Resolves a recipe's entries into ops, rendering templates with `vars` into `scratch`.
pub fn resolve(
    l: &Loaded,
    vars: &BTreeMap<String, String>,
    scratch: &Path,
) -> Result<Vec<Op>, BuildError> {
    let r = &l.recipe;
    let mut ops = Vec::new();
    for d in &r.delete {
        for p in &d.paths {
            ops.push(Op::Delete {
                path: p.clone(),
                missing_ok: d.missing_ok,
            });
        }
    }
    for d in &r.dir {
        ops.push(Op::Dir {
            path: d.path.clone(),
            keep_existing: false,
            mode: d.mode.map_or(0o755, |m| m.0),
            uid: d.uid,
            gid: d.gid,
        });
    }
    for (i, t) in r.tree.iter().enumerate() {
        let from = host_path(&l.dir, &t.from);
        let md = fs::symlink_metadata(&from).map_err(|e| {
            recipe_err(
                l,
                format!("[[tree]] #{} from {}: {e}", i + 1, from.display()),
            )
        })?;
        if !md.is_dir() {
            return Err(recipe_err(
                l,
                format!(
                    "[[tree]] #{} from {}: not a directory",
                    i + 1,
                    from.display()
                ),
            ));
        }
        walk_tree(l, i, &from, &t.to, t.uid, t.gid, &mut ops)?;
    }
    for (i, f) in r.file.iter().enumerate() {
        let place = format!("[[file]] #{} ({})", i + 1, f.path);
        let (host, default_mode) = if let Some(src) = &f.source {
            let host = host_path(&l.dir, src);
            let md = fs::metadata(&host)
                .map_err(|e| recipe_err(l, format!("{place}: source {}: {e}", host.display())))?;
            if !md.is_file() {
                return Err(recipe_err(
                    l,
                    format!("{place}: source {} is not a regular file", host.display()),
                ));
            }
            (host, md.permissions().mode() & 0o7777)
        } else if let Some(content) = &f.content {
            let host = scratch.join(format!("content-{}", ops.len()));
            fs::write(&host, content).map_err(|e| BuildError::io("writing", &host, e))?;
            (host, 0o644)
        } else if let Some(tpl) = &f.template {
            let src = host_path(&l.dir, tpl);
            let text = fs::read_to_string(&src)
                .map_err(|e| recipe_err(l, format!("{place}: template {}: {e}", src.display())))?;
            let out = template::render(&text, vars)
                .map_err(|e| recipe_err(l, format!("{place}: template {}: {e}", src.display())))?;
            let host = scratch.join(format!("template-{}", ops.len()));
            fs::write(&host, out).map_err(|e| BuildError::io("writing", &host, e))?;
            (host, 0o644)
        } else {
            return Err(recipe_err(
                l,
                format!("{place}: needs source, content or template"),
            ));
        };
        let mode = f.mode.map_or(default_mode, |Mode(m)| m);
        ops.push(Op::File {
            path: f.path.clone(),
            host,
            mode,
            uid: f.uid,
            gid: f.gid,
        });
    }
    for s in &r.symlink {
        for p in &s.paths {
            ops.push(Op::Symlink {
                path: p.clone(),
                target: s.target.clone(),
                uid: 0,
                gid: 0,
            });
        }
    }
    for a in &r.attr {
        for p in &a.paths {
            ops.push(Op::Attr {
                path: p.clone(),
                mode: a.mode.map(|m| m.0),
                uid: a.uid,
                gid: a.gid,
            });
        }
    }
    Ok(ops)
}

fn walk_tree(
    l: &Loaded,
    i: usize,
    dir: &Path,
    to: &str,
    uid: u32,
    gid: u32,
    ops: &mut Vec<Op>,
) -> Result<(), BuildError> {
    let place =
        |p: &Path, e: String| recipe_err(l, format!("[[tree]] #{} at {}: {e}", i + 1, p.display()));
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| place(dir, e.to_string()))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| place(dir, e.to_string()))?;
    names.sort();
    for name in names {
        let host = dir.join(&name);
        let name = name
            .to_str()
            .ok_or_else(|| place(&host, "file name is not UTF-8".into()))?;
        let path = join(to, name);
        super::recipe::check_image_path(&path).map_err(|e| place(&host, e))?;
        let md = fs::symlink_metadata(&host).map_err(|e| place(&host, e.to_string()))?;
        let mode = tree_mode(md.mode());
        let ft = md.file_type();
        if ft.is_dir() {
            ops.push(Op::Dir {
                path: path.clone(),
                keep_existing: true,
                mode,
                uid,
                gid,
            });
            walk_tree(l, i, &host, &path, uid, gid, ops)?;
        } else if ft.is_file() {
            ops.push(Op::File {
                path,
                host,
                mode,
                uid,
                gid,
            });
        } else if ft.is_symlink() {
            let target = fs::read_link(&host).map_err(|e| place(&host, e.to_string()))?;
            let target = target
                .to_str()
                .ok_or_else(|| place(&host, "link target is not UTF-8".into()))?
                .to_owned();
            ops.push(Op::Symlink {
                path,
                target,
                uid,
                gid,
            });
        } else {
            return Err(place(
                &host,
                "only files, directories and symlinks can be copied from a tree".into(),
            ));
        }
    }
    Ok(())
}

/// The mode a tree entry gets: what a git checkout keeps (0755 for directories and
/// executables, 0644 otherwise), so the image does not depend on the checkout's umask.
/// `[[attr]]` sets anything else.
pub fn tree_mode(host_mode: u32) -> u32 {
    if host_mode & 0o170000 == 0o040000 || host_mode & 0o111 != 0 {
        0o755
    } else {
        0o644
    }
}

/// What the planner knows about a path.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Dir,
    /// Anything else, with its type bits (`S_IFMT`).
    Other(u32),
}

/// The image's namespace as far as the planner has seen it.
struct Model {
    /// Known paths (from listings, and from planned changes). Missing = does not exist, if its
    /// parent was listed.
    known: BTreeMap<String, Kind>,
}

impl Model {
    fn exists(&self, p: &str) -> Option<Kind> {
        if p == "/" {
            return Some(Kind::Dir);
        }
        self.known.get(p).copied()
    }

    fn remove_subtree(&mut self, p: &str) {
        let prefix = format!("{p}/");
        self.known.retain(|k, _| k != p && !k.starts_with(&prefix));
    }
}

/// Applies `ops` to the ext4 image at `image` (in place), stamping changes with `epoch`.
pub fn apply(image: &Path, ops: &[Op], epoch: u64, scratch: &Path) -> Result<(), BuildError> {
    if ops.is_empty() {
        return Ok(());
    }
    // 1. List every ancestor directory of every target, and each deleted path's subtree.
    let mut dirs: BTreeSet<String> = BTreeSet::new();
    for op in ops {
        let mut p = op.path();
        loop {
            let par = parent(p);
            dirs.insert(par.to_owned());
            if par == "/" {
                break;
            }
            p = par;
        }
        if let Op::Dir { path, .. } = op {
            dirs.insert(path.clone());
        }
    }
    let mut model = Model {
        known: BTreeMap::new(),
    };
    let mut listed: BTreeMap<String, Vec<Entry>> = BTreeMap::new();
    list_into(
        image,
        dirs.into_iter().collect(),
        scratch,
        &mut model,
        &mut listed,
    )?;
    // Subtrees of deleted directories, level by level.
    let mut pending: Vec<String> = ops
        .iter()
        .filter_map(|op| match op {
            Op::Delete { path, .. } if model.exists(path) == Some(Kind::Dir) => Some(path.clone()),
            _ => None,
        })
        .collect();
    while !pending.is_empty() {
        let todo: Vec<String> = pending
            .drain(..)
            .filter(|d| !listed.contains_key(d))
            .collect();
        if todo.is_empty() {
            break;
        }
        list_into(image, todo.clone(), scratch, &mut model, &mut listed)?;
        for d in todo {
            if let Some(entries) = listed.get(&d) {
                pending.extend(
                    entries
                        .iter()
                        .filter(|e| e.is_dir())
                        .map(|e| join(&d, &e.name)),
                );
            }
        }
    }

    // 2. Plan.
    let mut script = Script::new(epoch);
    for op in ops {
        match op {
            Op::Delete { path, missing_ok } => match model.exists(path) {
                None if *missing_ok => {}
                None => {
                    return Err(BuildError::Apply {
                        path: path.clone(),
                        message: "cannot delete: no such file or directory".into(),
                    })
                }
                Some(Kind::Other(_)) => {
                    script.rm(path)?;
                    model.remove_subtree(path);
                }
                Some(Kind::Dir) => {
                    delete_tree(path, &listed, &model, &mut script)?;
                    model.remove_subtree(path);
                }
            },
            Op::Dir {
                path,
                keep_existing,
                mode,
                uid,
                gid,
            } => {
                ensure_parents(path, &mut model, &mut script, epoch)?;
                match model.exists(path) {
                    Some(Kind::Dir) if *keep_existing => continue,
                    Some(Kind::Dir) => {}
                    Some(Kind::Other(_)) => {
                        script.rm(path)?;
                        script.mkdir(path)?;
                    }
                    None => script.mkdir(path)?,
                }
                model.known.insert(path.clone(), Kind::Dir);
                script.set_meta(path, 0o040000 | mode, *uid, *gid, epoch)?;
            }
            Op::File {
                path,
                host,
                mode,
                uid,
                gid,
            } => {
                ensure_parents(path, &mut model, &mut script, epoch)?;
                replace_target(path, &model, &mut script)?;
                script.write(host, path)?;
                model.known.insert(path.clone(), Kind::Other(0o100000));
                script.set_meta(path, 0o100000 | mode, *uid, *gid, epoch)?;
            }
            Op::Symlink {
                path,
                target,
                uid,
                gid,
            } => {
                ensure_parents(path, &mut model, &mut script, epoch)?;
                replace_target(path, &model, &mut script)?;
                script.symlink(path, target)?;
                model.known.insert(path.clone(), Kind::Other(0o120000));
                script.set_meta(path, 0o120777, *uid, *gid, epoch)?;
            }
            Op::Attr {
                path,
                mode,
                uid,
                gid,
            } => {
                let ty = match model.exists(path) {
                    None => {
                        return Err(BuildError::Apply {
                            path: path.clone(),
                            message: "cannot set attributes: no such file or directory".into(),
                        })
                    }
                    Some(Kind::Dir) => 0o040000,
                    Some(Kind::Other(t)) => t,
                };
                if let Some(m) = mode {
                    script.sif(path, "mode", &format!("0{:o}", ty | m))?;
                }
                if let Some(u) = uid {
                    script.sif(path, "uid", &u.to_string())?;
                }
                if let Some(g) = gid {
                    script.sif(path, "gid", &g.to_string())?;
                }
                script.set_times(path, epoch)?;
            }
        }
    }
    // Directories whose entries changed get the epoch as mtime (debugfs already uses the
    // current time it was given; this also covers ctime).
    ext4::debugfs(image, true, &script, scratch)?;
    Ok(())
}

fn list_into(
    image: &Path,
    dirs: Vec<String>,
    scratch: &Path,
    model: &mut Model,
    listed: &mut BTreeMap<String, Vec<Entry>>,
) -> Result<(), BuildError> {
    let res = ext4::list_dirs(image, &dirs, scratch)?;
    for (d, entries) in dirs.into_iter().zip(res) {
        if let Some(entries) = entries {
            for e in &entries {
                model.known.insert(
                    join(&d, &e.name),
                    if e.is_dir() {
                        Kind::Dir
                    } else {
                        Kind::Other(e.mode & 0o170000)
                    },
                );
            }
            listed.insert(d, entries);
        }
    }
    Ok(())
}

fn ensure_parents(
    path: &str,
    model: &mut Model,
    script: &mut Script,
    epoch: u64,
) -> Result<(), BuildError> {
    let par = parent(path);
    if par == "/" {
        return Ok(());
    }
    match model.exists(par) {
        Some(Kind::Dir) => Ok(()),
        Some(Kind::Other(_)) => Err(BuildError::Apply {
            path: path.to_owned(),
            message: format!("parent {par} exists and is not a directory"),
        }),
        None => {
            ensure_parents(par, model, script, epoch)?;
            script.mkdir(par)?;
            script.set_meta(par, 0o040755, 0, 0, epoch)?;
            model.known.insert(par.to_owned(), Kind::Dir);
            Ok(())
        }
    }
}

fn replace_target(path: &str, model: &Model, script: &mut Script) -> Result<(), BuildError> {
    match model.exists(path) {
        None => Ok(()),
        Some(Kind::Other(_)) => Ok(script.rm(path)?),
        Some(Kind::Dir) => Err(BuildError::Apply {
            path: path.to_owned(),
            message: "is a directory in the image; delete it first to replace it".into(),
        }),
    }
}

fn delete_tree(
    dir: &str,
    listed: &BTreeMap<String, Vec<Entry>>,
    model: &Model,
    script: &mut Script,
) -> Result<(), BuildError> {
    if let Some(entries) = listed.get(dir) {
        for e in entries {
            let p = join(dir, &e.name);
            // Entries already removed by an earlier op are skipped.
            match model.exists(&p) {
                None => {}
                Some(Kind::Dir) => delete_tree(&p, listed, model, script)?,
                Some(Kind::Other(_)) => script.rm(&p)?,
            }
        }
    }
    script.rmdir(dir)?;
    Ok(())
}

/// Resets atime/mtime/ctime/crtime of every path under `root` (a host tree just copied in by
/// `mke2fs -d`) plus `/` and `/lost+found` to `epoch`.
pub fn normalize_times(
    image: &Path,
    root: Option<&Path>,
    epoch: u64,
    scratch: &Path,
) -> Result<(), BuildError> {
    let mut script = Script::new(epoch);
    script.set_times("/", epoch)?;
    script.set_times("/lost+found", epoch)?;
    if let Some(root) = root {
        let mut paths = Vec::new();
        collect_paths(root, "/", &mut paths)?;
        for p in &paths {
            script.set_times(p, epoch)?;
        }
    }
    ext4::debugfs(image, true, &script, scratch)?;
    Ok(())
}

fn collect_paths(dir: &Path, at: &str, out: &mut Vec<String>) -> Result<(), BuildError> {
    let mut names: Vec<_> = fs::read_dir(dir)
        .map_err(|e| BuildError::io("listing", dir, e))?
        .map(|e| e.map(|e| e.file_name()))
        .collect::<Result<_, _>>()
        .map_err(|e| BuildError::io("listing", dir, e))?;
    names.sort();
    for name in names {
        let host = dir.join(&name);
        let name = name.to_str().ok_or_else(|| BuildError::Apply {
            path: host.display().to_string(),
            message: "file name is not UTF-8".into(),
        })?;
        let p = join(at, name);
        out.push(p.clone());
        if fs::symlink_metadata(&host)
            .map_err(|e| BuildError::io("reading", &host, e))?
            .is_dir()
        {
            collect_paths(&host, &p, out)?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn path_helpers() {
        assert_eq!(join("/", "etc"), "/etc");
        assert_eq!(join("/etc", "motd"), "/etc/motd");
        assert_eq!(parent("/etc/motd"), "/etc");
        assert_eq!(parent("/etc"), "/");
    }
}
