//! `[packages]` of update recipes: Debian packages purged from, and installed into, a copy of
//! the previous version's root file system.
//!
//! Maintainer scripts need a real tree, so this is the one build step that works on files
//! rather than through debugfs:
//! 1. the previous version's raw image is mounted read-only (a loop device) in a private mount
//!    namespace (`unshare --mount`: a killed builder leaves no mount and no loop device behind,
//!    the kernel drops both with the namespace) and copied out with `cp -a` (owners, modes,
//!    hard links, device nodes, extended attributes);
//! 2. `remove` is purged and `debs` installed with the host's `dpkg --root` (maintainer scripts
//!    run chrooted in the tree); `install` runs the image's own `apt-get` in a chroot with
//!    `/proc`, `/sys` and `/dev` mounted, again in a private mount namespace;
//! 3. logs, caches and dpkg's `-old` files are removed (they hold the time of the build);
//! 4. a fresh ext4 is made from the tree with the image's fixed UUID, hash seed and size and
//!    every timestamp set to the epoch, so the same previous version and the same `.deb` files
//!    give the same layer. (Packages by name follow the mirror, as debootstrap does.)
//!
//! It needs root (mounting, and dpkg's owners). The rest of the update recipe's entries are
//! applied afterwards, on the new file system, as in any update.

use std::fs;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use super::ext4::{self, MkfsOptions};
use super::recipe::{host_path, Loaded, PackagesSection};
use super::{ops, BuildError, Progress};

/// Files a package operation leaves behind that say when it ran, not what is installed.
const RUN_DEBRIS: &[&str] = &[
    "var/log/dpkg.log",
    "var/log/alternatives.log",
    "var/log/apt/history.log",
    "var/log/apt/term.log",
    "var/log/apt/eipp.log.xz",
    "var/cache/ldconfig/aux-cache",
    "var/lib/dpkg/status-old",
    "var/lib/dpkg/diversions-old",
    "var/lib/dpkg/statoverride-old",
    "var/cache/debconf/config.dat-old",
    "var/cache/debconf/templates.dat-old",
    "var/cache/debconf/passwords.dat-old",
    "var/cache/apt/pkgcache.bin",
    "var/cache/apt/srcpkgcache.bin",
];

/// The inode count of the ext4 file system in `raw` (its superblock's `s_inodes_count`), so
/// the remade file system has as many.
pub fn inode_count(raw: &Path) -> Result<u64, BuildError> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = fs::File::open(raw).map_err(|e| BuildError::io("opening", raw, e))?;
    let mut sb = [0u8; 4];
    f.seek(SeekFrom::Start(1024))
        .and_then(|_| f.read_exact(&mut sb))
        .map_err(|e| BuildError::io("reading the superblock of", raw, e))?;
    Ok(u64::from(u32::from_le_bytes(sb)))
}

/// Applies `[packages]` to the ext4 image `raw` (the copy of the previous version), replacing
/// it with a fresh file system made with `mk`. `scratch` is the build's scratch directory.
pub fn apply(
    l: &Loaded,
    section: &PackagesSection,
    raw: &Path,
    mk: &MkfsOptions,
    scratch: &Path,
    progress: &dyn Progress,
) -> Result<(), BuildError> {
    let recipe_err = |message: String| BuildError::Recipe {
        file: l.file.clone(),
        message,
    };
    // /proc/self belongs to the process's effective user.
    let euid = fs::metadata("/proc/self")
        .map(|m| m.uid())
        .unwrap_or(u32::MAX);
    if euid != 0 {
        return Err(recipe_err(
            "[packages] needs root: the previous version is mounted (loop) and dpkg sets owners"
                .into(),
        ));
    }
    let mut debs = Vec::new();
    for d in &section.debs {
        let p = host_path(&l.dir, d);
        if !p.is_file() {
            return Err(recipe_err(format!(
                "[packages] debs: {} does not exist",
                p.display()
            )));
        }
        debs.push(p);
    }
    for (tool, hint) in [
        ("unshare", "apt-get install util-linux"),
        ("mount", "apt-get install mount"),
        ("dpkg", "Debian's dpkg"),
        ("chroot", "apt-get install coreutils"),
    ] {
        if ext4::find_tool(tool).is_none() {
            return Err(BuildError::ToolMissing { tool, hint });
        }
    }

    progress.stage("copying the previous version's files out");
    let tree = scratch.join("packages-root");
    let mnt = scratch.join("packages-mnt");
    for d in [&tree, &mnt] {
        fs::create_dir_all(d).map_err(|e| BuildError::io("creating", d, e))?;
    }
    run(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-euc"])
            .arg(r#"mount -t ext4 -o loop,ro "$0" "$1"; cp -a "$1/." "$2/""#)
            .arg(raw)
            .arg(&mnt)
            .arg(&tree),
        "copying the previous version out (mount -o loop,ro + cp -a)",
    )?;

    let admin = in_tree_dir(&tree, "var/lib/dpkg")?;
    if !admin.join("status").is_file() {
        // A base without a package database (the busybox image): dpkg starts an empty one.
        for d in ["info", "updates", "triggers"] {
            let p = admin.join(d);
            fs::create_dir_all(&p).map_err(|e| BuildError::io("creating", &p, e))?;
        }
        let status = admin.join("status");
        fs::write(&status, b"").map_err(|e| BuildError::io("writing", &status, e))?;
    }
    let dpkg = |args: &[&str], extra: &[PathBuf], what: &str| {
        let mut c = Command::new("dpkg");
        c.arg(format!("--root={}", tree.display()))
            .args(["--force-unsafe-io", "--no-triggers"])
            .args(args)
            .args(extra)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin");
        run(&mut c, what)
    };
    if !section.remove.is_empty() {
        let installed = installed(&admin.join("status"))?;
        if let Some(n) = section
            .remove
            .iter()
            .find(|n| !installed.contains(n.as_str()))
        {
            return Err(recipe_err(format!(
                "[packages] remove: {n} is not installed in the image"
            )));
        }
        progress.stage("purging packages");
        let names: Vec<&str> = section.remove.iter().map(String::as_str).collect();
        let mut args = vec!["--purge"];
        args.extend(names);
        dpkg(&args, &[], "dpkg --purge")?;
    }
    if !debs.is_empty() {
        progress.stage("installing .deb files");
        dpkg(&["--install"], &debs, "dpkg --install")?;
    }
    // Deferred triggers (man-db, ldconfig...) once for everything above.
    if !section.remove.is_empty() || !debs.is_empty() {
        dpkg(
            &["--triggers-only", "--pending"],
            &[],
            "dpkg --triggers-only",
        )?;
    }
    if !section.install.is_empty() {
        progress.stage("installing packages with the image's apt-get");
        apt_install(&tree, &section.install, &l.file)?;
    }
    for rel in RUN_DEBRIS {
        let p = in_tree(&tree, rel)?;
        match fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(BuildError::io("removing", &p, e)),
        }
    }
    for dir in ["var/cache/apt/archives", "var/lib/apt/lists"] {
        clear_files(&in_tree(&tree, dir)?)?;
    }

    progress.stage("making the updated file system");
    let fresh = scratch.join("packages.raw");
    ext4::mkfs(&fresh, Some(&tree), mk)?;
    ops::normalize_times(&fresh, Some(&tree), mk.epoch, scratch)?;
    fs::rename(&fresh, raw).map_err(|e| BuildError::io("replacing", raw, e))?;
    let _ = fs::remove_dir_all(&tree);
    Ok(())
}

/// `apt-get update` and `apt-get install` inside the tree, in a private mount namespace with
/// `/proc`, `/sys` and `/dev` mounted and the host's resolv.conf lent for the duration.
fn apt_install(tree: &Path, names: &[String], recipe: &Path) -> Result<(), BuildError> {
    if !tree.join("usr/bin/apt-get").exists() {
        return Err(BuildError::Recipe {
            file: recipe.to_owned(),
            message: "[packages] install: the image has no /usr/bin/apt-get; use debs".into(),
        });
    }
    for d in ["proc", "sys", "dev", "etc"] {
        let p = in_tree_dir(tree, d)?;
        fs::create_dir_all(&p).map_err(|e| BuildError::io("creating", &p, e))?;
    }
    // The host's resolv.conf, for the duration, in place of what the image has there: nothing,
    // a file, or a link (systemd-resolved's stub, dangling outside a running system). What was
    // there comes back afterwards.
    let resolv = in_tree(tree, "etc/resolv.conf")?;
    let kept = match fs::symlink_metadata(&resolv) {
        Ok(m) if m.file_type().is_symlink() => Some(Kept::Link(
            fs::read_link(&resolv).map_err(|e| BuildError::io("reading", &resolv, e))?,
        )),
        Ok(_) => Some(Kept::File(
            fs::read(&resolv).map_err(|e| BuildError::io("reading", &resolv, e))?,
        )),
        Err(_) => None,
    };
    if kept.is_some() {
        fs::remove_file(&resolv).map_err(|e| BuildError::io("removing", &resolv, e))?;
    }
    fs::copy("/etc/resolv.conf", &resolv)
        .map_err(|e| BuildError::io("copying", Path::new("/etc/resolv.conf"), e))?;
    let script = r#"mount -t proc proc "$0/proc"
mount -t sysfs sys "$0/sys"
mount --rbind /dev "$0/dev"
chroot "$0" apt-get -q update
chroot "$0" apt-get -q -y --no-install-recommends install "$@"
chroot "$0" apt-get -q clean"#;
    let res = run(
        Command::new("unshare")
            .args(["--mount", "--propagation", "private", "--", "sh", "-euc"])
            .arg(script)
            .arg(tree)
            .args(names)
            .env("DEBIAN_FRONTEND", "noninteractive")
            .env("PATH", "/usr/sbin:/usr/bin:/sbin:/bin"),
        "apt-get install in the image",
    );
    let _ = fs::remove_file(&resolv);
    let restored = match kept {
        Some(Kept::Link(target)) => std::os::unix::fs::symlink(&target, &resolv),
        Some(Kept::File(bytes)) => fs::write(&resolv, bytes),
        None => Ok(()),
    };
    res?;
    restored.map_err(|e| BuildError::io("restoring", &resolv, e))
}

/// What the image had at `/etc/resolv.conf` while the host's is lent.
enum Kept {
    Link(PathBuf),
    File(Vec<u8>),
}

/// `tree/rel`, refused when a directory on the way is a symbolic link: the builder runs as
/// root, and a link in the image (or made by a maintainer script) such as
/// `var/cache/apt -> /var/cache/apt` must not turn a clean-up of the tree into one of the
/// host. The last component may be a link (removing it removes the link).
fn in_tree(tree: &Path, rel: &str) -> Result<PathBuf, BuildError> {
    walk_tree(tree, rel, true)
}

/// `tree/rel` for a directory the step writes into: no component may be a link, the last one
/// included.
fn in_tree_dir(tree: &Path, rel: &str) -> Result<PathBuf, BuildError> {
    walk_tree(tree, rel, false)
}

fn walk_tree(tree: &Path, rel: &str, last_may_be_link: bool) -> Result<PathBuf, BuildError> {
    let mut p = tree.to_path_buf();
    let parts: Vec<&str> = rel.split('/').filter(|c| !c.is_empty()).collect();
    for (i, c) in parts.iter().enumerate() {
        p.push(c);
        let last = i + 1 == parts.len();
        if !(last && last_may_be_link)
            && fs::symlink_metadata(&p)
                .map(|m| m.file_type().is_symlink())
                .unwrap_or(false)
        {
            return Err(BuildError::Apply {
                path: format!("/{}", parts[..=i].join("/")),
                message: "is a symbolic link; the packages step works on the tree only through real directories".into(),
            });
        }
    }
    Ok(p)
}

/// Names of the packages dpkg's `status` file says are installed (`Status: ... installed`,
/// not `not-installed` or `config-files`).
fn installed(status: &Path) -> Result<std::collections::BTreeSet<String>, BuildError> {
    let text = fs::read_to_string(status).map_err(|e| BuildError::io("reading", status, e))?;
    let mut out = std::collections::BTreeSet::new();
    for stanza in text.split("\n\n") {
        let field = |name: &str| {
            stanza
                .lines()
                .find_map(|l| l.strip_prefix(name).map(str::trim))
        };
        if let (Some(p), Some(st)) = (field("Package:"), field("Status:")) {
            if st.ends_with(" installed") {
                out.insert(p.to_owned());
            }
        }
    }
    Ok(out)
}

/// Removes the plain files directly in `dir` (not `lock`). A `dir` that is a link is left alone
/// (it could point out of the tree).
fn clear_files(dir: &Path) -> Result<(), BuildError> {
    if !fs::symlink_metadata(dir).is_ok_and(|m| m.is_dir()) {
        return Ok(());
    }
    let Ok(rd) = fs::read_dir(dir) else {
        return Ok(());
    };
    for e in rd.flatten() {
        let p = e.path();
        if e.file_type().map(|t| t.is_file()).unwrap_or(false)
            && p.file_name() != Some("lock".as_ref())
        {
            fs::remove_file(&p).map_err(|e| BuildError::io("removing", &p, e))?;
        }
    }
    Ok(())
}

/// Runs `c`, its output captured; a failure carries the last lines of what it printed.
fn run(c: &mut Command, what: &str) -> Result<(), BuildError> {
    let out = c
        .stdin(Stdio::null())
        .output()
        .map_err(|e| BuildError::io("running", Path::new(what), e))?;
    if out.status.success() {
        return Ok(());
    }
    let text =
        String::from_utf8_lossy(&out.stderr).into_owned() + &String::from_utf8_lossy(&out.stdout);
    let tail: Vec<&str> = text.lines().rev().take(12).collect();
    Err(BuildError::Apply {
        path: "/".into(),
        message: format!(
            "{what} failed ({}): {}",
            out.status,
            tail.into_iter().rev().collect::<Vec<_>>().join(" | ")
        ),
    })
}
