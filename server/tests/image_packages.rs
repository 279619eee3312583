//! `[packages]` in update recipes (server/src/build/packages.rs), against real peers: packages
//! made with `dpkg-deb`, installed and purged by the host's dpkg into the copy of the previous
//! version, and the result read back with `strata vhdx to-raw`, `debugfs` and `e2fsck -fn`.
//! Needs root (the builder mounts the previous version read-only), as CI runs.

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, Context, Result};
use strata_server::build::{self, BuildOptions};
use strata_server::store::Store;

fn images() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../images")
}

/// A binary package made with `dpkg-deb --build`: `files` are (path, mode, content); the
/// optional `postinst` is its maintainer script.
fn deb(
    dir: &Path,
    name: &str,
    files: &[(&str, u32, &str)],
    postinst: Option<&str>,
) -> Result<PathBuf> {
    use std::os::unix::fs::PermissionsExt;
    let root = dir.join(format!("{name}-pkg"));
    fs::create_dir_all(root.join("DEBIAN"))?;
    fs::write(
        root.join("DEBIAN/control"),
        format!(
            "Package: {name}\nVersion: 1.0\nArchitecture: all\nMaintainer: Strata tests <t@example.org>\nDescription: a test package\n"
        ),
    )?;
    if let Some(script) = postinst {
        let p = root.join("DEBIAN/postinst");
        fs::write(&p, script)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(0o755))?;
    }
    for (path, mode, content) in files {
        let p = root.join(path.trim_start_matches('/'));
        fs::create_dir_all(p.parent().context("parent")?)?;
        fs::write(&p, content)?;
        fs::set_permissions(&p, fs::Permissions::from_mode(*mode))?;
    }
    let out = dir.join(format!("{name}.deb"));
    let o = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Znone", "--build"])
        .arg(&root)
        .arg(&out)
        .output()
        .context("dpkg-deb missing: Debian's dpkg package")?;
    if !o.status.success() {
        bail!("dpkg-deb: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(out)
}

/// The unpacked Debian kernels `scripts/setup.sh` keeps in the cache: (release, vmlinuz).
fn cached_kernel(which: &str) -> Result<(String, PathBuf)> {
    let home = std::env::var_os("HOME").context("HOME")?;
    let cache = std::env::var_os("STRATA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| Path::new(&home).join(".cache/strata"));
    let boot = cache.join(which).join("root/boot");
    for e in
        fs::read_dir(&boot).with_context(|| format!("{}: run scripts/setup.sh", boot.display()))?
    {
        let e = e?;
        if let Some(r) = e
            .file_name()
            .to_str()
            .and_then(|n| n.strip_prefix("vmlinuz-"))
        {
            return Ok((r.to_owned(), e.path()));
        }
    }
    bail!("no vmlinuz-* in {}: run scripts/setup.sh", boot.display())
}

fn recipe(dir: &Path, name: &str, text: &str) -> Result<PathBuf> {
    let d = dir.join(name);
    fs::create_dir_all(&d)?;
    fs::write(d.join("recipe.toml"), text)?;
    Ok(d)
}

fn build(store: &Store, recipe: &Path) -> Result<build::Built, build::BuildError> {
    build::build(
        store,
        recipe,
        &BuildOptions {
            roles_dir: Some(images().join("roles")),
            ..Default::default()
        },
    )
}

/// The chain of `image@version` (optionally a role's), composed to raw, checked by e2fsck.
struct Composed {
    _dir: tempfile::TempDir,
    raw: PathBuf,
}

impl Composed {
    fn of(store: &Store, version: u64, role: Option<&str>) -> Result<Composed> {
        let v = store
            .image_version("busybox", version, role, None)?
            .context("no such version")?;
        let top = store.layer_path(&v.layers.last().context("empty chain")?.id);
        let dir = tempfile::tempdir()?;
        let raw = dir.path().join("disk.raw");
        let o = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["vhdx", "to-raw"])
            .arg(&top)
            .arg(&raw)
            .output()?;
        if !o.status.success() {
            bail!("strata vhdx to-raw: {}", String::from_utf8_lossy(&o.stderr));
        }
        let f = Command::new("e2fsck").arg("-fn").arg(&raw).output()?;
        if !f.status.success() {
            bail!("e2fsck -fn: {}", String::from_utf8_lossy(&f.stdout));
        }
        Ok(Composed { _dir: dir, raw })
    }

    fn debugfs(&self, cmd: &str) -> Result<String> {
        let o = Command::new("debugfs")
            .arg("-R")
            .arg(cmd)
            .arg(&self.raw)
            .output()?;
        Ok(String::from_utf8_lossy(&o.stdout).into_owned())
    }

    fn cat(&self, path: &str) -> Result<String> {
        self.debugfs(&format!("cat {path}"))
    }

    fn exists(&self, path: &str) -> Result<bool> {
        Ok(self.debugfs(&format!("stat {path}"))?.contains("Inode:"))
    }

    /// The permission bits of `path`.
    fn mode(&self, path: &str) -> Result<u32> {
        let s = self.debugfs(&format!("stat {path}"))?;
        let m = s
            .split("Mode:")
            .nth(1)
            .and_then(|r| r.split_whitespace().next())
            .context("no mode")?;
        Ok(u32::from_str_radix(m, 8)? & 0o7777)
    }
}

/// The catalog's (image, version) pairs and the files in `layers/` and `blobs/`.
type StoreState = (Vec<(String, u64)>, Vec<String>);

/// What a failed build must leave as it was: versions, layers, blobs; and no mount or loop
/// device behind.
fn snapshot(store: &Store) -> Result<StoreState> {
    let versions = store
        .catalog()
        .versions(None)?
        .into_iter()
        .map(|v| (v.image, v.version))
        .collect();
    let mut files = Vec::new();
    for d in ["layers", "blobs"] {
        for e in fs::read_dir(store.root().join(d))? {
            files.push(format!("{d}/{}", e?.file_name().to_string_lossy()));
        }
    }
    files.sort();
    Ok((versions, files))
}

fn nothing_mounted_from(store_dir: &Path) -> Result<()> {
    let mounts = fs::read_to_string("/proc/self/mountinfo")?;
    let dir = store_dir.to_string_lossy();
    anyhow::ensure!(
        !mounts.contains(dir.as_ref()),
        "a mount under the store is left: {mounts}"
    );
    let loops = Command::new("losetup").arg("-a").output()?;
    let loops = String::from_utf8_lossy(&loops.stdout);
    anyhow::ensure!(
        !loops.contains(dir.as_ref()),
        "a loop device on a store file is left: {loops}"
    );
    Ok(())
}

#[test]
fn an_update_installs_and_purges_packages_reproducibly() -> Result<()> {
    let work = tempfile::tempdir()?;
    let store_dir = work.path().join("store");
    let store = Store::open(&store_dir)?;
    let v1 = build::ensure_builtin(&store, &images())?;
    let hello = deb(
        work.path(),
        "strata-hello",
        &[
            ("/usr/share/strata-hello/greeting", 0o644, "hello from a package\n"),
            ("/usr/lib/strata-hello/secret", 0o750, "s3cret\n"),
        ],
        Some("#!/bin/sh\nset -e\nmkdir -p /var/lib/strata-hello\necho \"configured $1\" > /var/lib/strata-hello/postinst\n"),
    )?;
    let install = recipe(
        work.path(),
        "install",
        &format!(
            "[update]\nimage = \"busybox\"\n\n[packages]\ndebs = [{:?}]\n\n[[file]]\npath = \"/etc/after-packages\"\ncontent = \"entries come after packages\\n\"\n",
            hello.display().to_string()
        ),
    )?;
    let v2 = build(&store, &install)?;
    assert_eq!(v2.version, v1.version + 1);
    // The busybox base boots a host kernel ([kernel] dir): packages never switch it.
    assert_eq!(
        v2.kernel.as_ref().map(|k| k.id),
        v1.kernel.as_ref().map(|k| k.id)
    );
    assert_ne!(v2.base.id, v1.base.id);
    let img = Composed::of(&store, v2.version, None)?;
    assert_eq!(
        img.cat("/usr/share/strata-hello/greeting")?,
        "hello from a package\n"
    );
    assert_eq!(img.mode("/usr/lib/strata-hello/secret")?, 0o750);
    // The maintainer script ran, chrooted in the image (busybox's /bin/sh).
    assert_eq!(
        img.cat("/var/lib/strata-hello/postinst")?,
        "configured configure\n"
    );
    assert!(img
        .cat("/var/lib/dpkg/status")?
        .contains("Package: strata-hello\nStatus: install ok installed"));
    assert_eq!(
        img.cat("/etc/after-packages")?,
        "entries come after packages\n"
    );
    // The previous version's files are all still there.
    assert!(img.cat("/etc/motd")?.starts_with("Strata busybox image"));
    assert!(
        !img.exists("/var/log/dpkg.log")?,
        "the run's log stayed in the image"
    );
    // Roles are rebuilt on the new version in the same command, and see the package.
    let web = Composed::of(&store, v2.version, Some("web"))?;
    assert_eq!(
        web.cat("/usr/share/strata-hello/greeting")?,
        "hello from a package\n"
    );
    nothing_mounted_from(&store_dir)?;

    // Reproducible: the same previous version and the same .deb give the same layers.
    let other_dir = work.path().join("other");
    let other = Store::open(&other_dir)?;
    build::ensure_builtin(&other, &images())?;
    let again = build(&other, &install)?;
    assert_eq!(
        again.base.id, v2.base.id,
        "an update with packages is not reproducible"
    );
    let ids = |b: &build::Built| {
        b.roles
            .iter()
            .map(|(r, s, l)| (r.clone(), s.clone(), l.id))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&again), ids(&v2));

    // Purged by the next update.
    let purge = recipe(
        work.path(),
        "purge",
        "[update]\nimage = \"busybox\"\n\n[packages]\nremove = [\"strata-hello\"]\n",
    )?;
    let v3 = build(&store, &purge)?;
    let img = Composed::of(&store, v3.version, None)?;
    assert!(!img.exists("/usr/share/strata-hello/greeting")?);
    assert!(!img.exists("/usr/lib/strata-hello")?);
    assert!(!img
        .cat("/var/lib/dpkg/status")?
        .contains("install ok installed"));
    assert_eq!(
        img.cat("/etc/after-packages")?,
        "entries come after packages\n"
    );
    // The earlier versions are kept until collected.
    assert!(store.layer_path(&v2.base.id).is_file());
    nothing_mounted_from(&store_dir)?;
    Ok(())
}

#[test]
fn bad_packages_fail_clearly_and_leave_the_store_unchanged() -> Result<()> {
    let work = tempfile::tempdir()?;
    let store_dir = work.path().join("store");
    let store = Store::open(&store_dir)?;
    build::ensure_builtin(&store, &images())?;
    let before = snapshot(&store)?;

    let garbage = work.path().join("garbage.deb");
    fs::write(&garbage, b"!<arch>\nthis is not a debian package")?;
    let failing = deb(
        work.path(),
        "strata-fails",
        &[("/etc/strata-fails", 0o644, "x\n")],
        Some("#!/bin/sh\necho 'postinst refuses' >&2\nexit 3\n"),
    )?;
    // A package that turns /var/log into a link to a host directory: the clean-up after dpkg
    // must not follow it (the builder runs as root).
    let victim = work.path().join("victim");
    fs::create_dir_all(&victim)?;
    fs::write(victim.join("dpkg.log"), "host file\n")?;
    let linker = deb(
        work.path(),
        "strata-linker",
        &[("/usr/share/strata-linker/x", 0o644, "x\n")],
        Some(&format!(
            "#!/bin/sh\nrm -rf /var/log\nln -s {} /var/log\n",
            victim.display()
        )),
    )?;
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "link-out",
            format!(
                "[update]\nimage = \"busybox\"\n[packages]\ndebs = [{:?}]\n",
                linker.display().to_string()
            ),
            "/var/log: is a symbolic link",
        ),
        (
            "missing",
            "[update]\nimage = \"busybox\"\n[packages]\ndebs = [\"no-such.deb\"]\n".into(),
            "no-such.deb does not exist",
        ),
        (
            "garbage",
            format!(
                "[update]\nimage = \"busybox\"\n[packages]\ndebs = [{:?}]\n",
                garbage.display().to_string()
            ),
            "dpkg --install failed",
        ),
        (
            "postinst",
            format!(
                "[update]\nimage = \"busybox\"\n[packages]\ndebs = [{:?}]\n",
                failing.display().to_string()
            ),
            "postinst refuses",
        ),
        (
            "not-installed",
            "[update]\nimage = \"busybox\"\n[packages]\nremove = [\"no-such-package\"]\n".into(),
            "no-such-package is not installed",
        ),
        (
            "bad-name",
            "[update]\nimage = \"busybox\"\n[packages]\ninstall = [\"Bad_Name\"]\n".into(),
            "\"Bad_Name\" is not a Debian package name",
        ),
        (
            "empty",
            "[update]\nimage = \"busybox\"\n[packages]\n".into(),
            "[packages] is empty",
        ),
        (
            "unknown-key",
            "[update]\nimage = \"busybox\"\n[packages]\ndebs = []\nflavour = \"x\"\n".into(),
            "unknown field `flavour`",
        ),
        (
            "no-apt",
            "[update]\nimage = \"busybox\"\n[packages]\ninstall = [\"htop\"]\n".into(),
            "the image has no /usr/bin/apt-get",
        ),
        (
            "role",
            "[role]\nname = \"r\"\nimage = \"busybox\"\n[packages]\nremove = [\"x\"]\n".into(),
            "[packages] is for update recipes",
        ),
    ];
    for (name, text, want) in cases {
        let dir = recipe(work.path(), name, &text)?;
        let chain = match build(&store, &dir) {
            Ok(b) => bail!("{name}: built version {} instead of failing", b.version),
            Err(e) => {
                let mut s = e.to_string();
                let mut src = std::error::Error::source(&e);
                while let Some(x) = src {
                    s.push_str(": ");
                    s.push_str(&x.to_string());
                    src = x.source();
                }
                s
            }
        };
        assert!(
            chain.contains(want),
            "{name}: {chain:?} does not say {want:?}"
        );
        assert!(
            chain.contains("recipe.toml")
                || chain.contains("dpkg")
                || chain.contains(".deb")
                || chain.contains("in the image at /"),
            "{name}: the error names no place: {chain}"
        );
        assert_eq!(snapshot(&store)?, before, "{name}: the store changed");
        nothing_mounted_from(&store_dir)?;
    }
    assert_eq!(
        fs::read_to_string(victim.join("dpkg.log"))?,
        "host file\n",
        "the packages step removed a host file through a link in the image"
    );
    Ok(())
}

/// A version that boots the image's own kernel follows it through updates: a package that
/// installs a newer kernel makes the new version record that kernel (and modules for it); an
/// update that does not touch /boot keeps it; a base booting a host kernel never switches.
#[test]
fn an_update_that_installs_a_kernel_records_it() -> Result<()> {
    let work = tempfile::tempdir()?;
    let store = Store::open(&work.path().join("store"))?;
    let (generic, generic_file) = cached_kernel("kernel")?;
    let (cloud, cloud_file) = cached_kernel("kernel-cloud")?;
    // A base whose kernel is its own /boot/vmlinuz-<generic>.
    let tree = work.path().join("tree");
    fs::create_dir_all(tree.join("boot"))?;
    fs::create_dir_all(tree.join("bin"))?;
    fs::copy(&generic_file, tree.join(format!("boot/vmlinuz-{generic}")))?;
    fs::copy("/bin/busybox", tree.join("bin/busybox"))?;
    std::os::unix::fs::symlink("busybox", tree.join("bin/sh"))?;
    let base = recipe(
        work.path(),
        "base",
        &format!(
            "[image]\nname = \"own-kernel\"\nsize_mib = 96\n\n[base]\nsource = \"dir\"\npath = {:?}\n\n[kernel]\n",
            tree.display().to_string()
        ),
    )?;
    let v1 = build(&store, &base)?;
    let k1 = v1.kernel.as_ref().context("v1 records no kernel")?;
    assert_eq!(k1.release, generic);

    // A "kernel package": the cloud kernel's vmlinuz into /boot.
    let kpkg = work.path().join("kpkg");
    fs::create_dir_all(kpkg.join("DEBIAN"))?;
    fs::create_dir_all(kpkg.join("boot"))?;
    fs::write(
        kpkg.join("DEBIAN/control"),
        "Package: strata-test-kernel\nVersion: 1.0\nArchitecture: all\nMaintainer: t <t@example.org>\nDescription: a kernel\n",
    )?;
    fs::copy(&cloud_file, kpkg.join(format!("boot/vmlinuz-{cloud}")))?;
    let kdeb = work.path().join("kernel.deb");
    let o = Command::new("dpkg-deb")
        .args(["--root-owner-group", "-Znone", "--build"])
        .arg(&kpkg)
        .arg(&kdeb)
        .output()?;
    anyhow::ensure!(
        o.status.success(),
        "dpkg-deb: {}",
        String::from_utf8_lossy(&o.stderr)
    );
    let upgrade = recipe(
        work.path(),
        "upgrade",
        &format!(
            "[update]\nimage = \"own-kernel\"\n\n[packages]\ndebs = [{:?}]\n",
            kdeb.display().to_string()
        ),
    )?;
    let v2 = build(&store, &upgrade)?;
    let k2 = v2.kernel.as_ref().context("v2 records no kernel")?;
    assert_eq!(
        k2.release, cloud,
        "the update installed {cloud} but records {}",
        k2.release
    );
    assert_eq!(
        fs::read(&k2.path)?,
        fs::read(&cloud_file)?,
        "the recorded kernel is not the installed one"
    );
    assert!(k2.modules.is_some(), "no module archive for the new kernel");
    // The store's catalog says the same.
    let info = store
        .catalog()
        .version("own-kernel", v2.version)?
        .context("v2")?;
    assert_eq!(info.kernel.map(|k| k.1), Some(cloud.clone()));

    // An update that leaves /boot alone keeps the kernel.
    let motd = recipe(
        work.path(),
        "motd",
        "[update]\nimage = \"own-kernel\"\n\n[[file]]\npath = \"/etc/motd\"\ncontent = \"v3\\n\"\n",
    )?;
    let v3 = build(&store, &motd)?;
    assert_eq!(v3.kernel.as_ref().map(|k| k.release.clone()), Some(cloud));
    assert_eq!(v3.kernel.as_ref().map(|k| k.id), Some(k2.id));
    Ok(())
}
