//! The image store and builder against real peers: e2fsprogs (`debugfs`, `e2fsck -fn`) reads
//! what the composed chains hold (composed by `strata vhdx to-raw`, following the layers'
//! parent locators), for every recipe feature; reproducibility; bad input; gc; updates; base
//! sources (tarball, OCI archive, qcow2 disk via qemu-img).

use std::collections::BTreeMap;
use std::fs;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::OnceLock;

use anyhow::{bail, Context, Result};
use strata_server::build::{self, BuildOptions, NodeFacts};
use strata_server::store::{ImageVersion, Store};

fn repo() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("..")
}

fn images() -> PathBuf {
    repo().join("images")
}

fn need(tool: &str, hint: &str) {
    let found = ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .any(|d| Path::new(d).join(tool).is_file());
    assert!(found, "{tool} is missing: {hint}");
}

fn tools() {
    need("mke2fs", "apt-get install e2fsprogs");
    need("debugfs", "apt-get install e2fsprogs");
    need("busybox", "apt-get install busybox-static");
}

/// The store every read-only test shares: busybox with its roles, built once.
fn shared() -> &'static (tempfile::TempDir, Store, build::Built) {
    static S: OnceLock<(tempfile::TempDir, Store, build::Built)> = OnceLock::new();
    S.get_or_init(|| {
        tools();
        let dir = tempfile::tempdir().unwrap();
        let store = Store::open(dir.path()).unwrap();
        let built = build::ensure_builtin(&store, &images()).unwrap();
        (dir, store, built)
    })
}

/// Composes a chain (top file) into a raw image with `strata vhdx to-raw`.
fn compose(top: &Path, out: &Path) -> Result<()> {
    let o = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["vhdx", "to-raw"])
        .arg(top)
        .arg(out)
        .output()?;
    if !o.status.success() {
        bail!("strata vhdx to-raw: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

/// A composed chain, read with debugfs.
struct Image {
    _dir: tempfile::TempDir,
    raw: PathBuf,
}

impl Image {
    fn of(store: &Store, v: &ImageVersion) -> Result<Image> {
        Self::top(&store.layer_path(&v.layers.last().context("empty chain")?.id))
    }

    fn top(top: &Path) -> Result<Image> {
        let dir = tempfile::tempdir()?;
        let raw = dir.path().join("disk.raw");
        compose(top, &raw)?;
        let img = Image { _dir: dir, raw };
        let o = Command::new("e2fsck")
            .args(["-f", "-n"])
            .arg(&img.raw)
            .output()?;
        assert!(
            o.status.success(),
            "e2fsck -fn: {}{}",
            String::from_utf8_lossy(&o.stdout),
            String::from_utf8_lossy(&o.stderr)
        );
        Ok(img)
    }

    fn debugfs(&self, cmd: &str) -> String {
        let o = Command::new("debugfs")
            .arg("-R")
            .arg(cmd)
            .arg(&self.raw)
            .output()
            .unwrap();
        String::from_utf8_lossy(&o.stdout).into_owned()
    }

    fn cat(&self, path: &str) -> String {
        self.debugfs(&format!("cat {path}"))
    }

    /// (mode, uid, gid) from `stat`, or None if absent.
    fn meta(&self, path: &str) -> Option<(u32, u32, u32)> {
        let o = Command::new("debugfs")
            .arg("-R")
            .arg(format!("stat {path}"))
            .arg(&self.raw)
            .output()
            .unwrap();
        let s = String::from_utf8_lossy(&o.stdout);
        let line = s.lines().find(|l| l.starts_with("Inode:"))?;
        let mode =
            u32::from_str_radix(line.split("Mode:").nth(1)?.split_whitespace().next()?, 8).ok()?;
        let ug = s.lines().find(|l| l.starts_with("User:"))?;
        let mut w = ug.split_whitespace();
        let uid = w.nth(1)?.parse().ok()?;
        let gid = w.nth(1)?.parse().ok()?;
        Some((mode, uid, gid))
    }

    fn kind(&self, path: &str) -> Option<String> {
        let s = self.debugfs(&format!("stat {path}"));
        let line = s.lines().find(|l| l.starts_with("Inode:"))?;
        Some(
            line.split("Type:")
                .nth(1)?
                .split_whitespace()
                .next()?
                .to_owned(),
        )
    }

    fn link(&self, path: &str) -> String {
        let s = self.debugfs(&format!("stat {path}"));
        s.lines()
            .find_map(|l| {
                l.trim()
                    .strip_prefix("Fast link dest: ")
                    .map(|t| t.trim_matches('"').to_owned())
            })
            .unwrap_or_default()
    }
}

fn facts(n: u32) -> NodeFacts {
    NodeFacts {
        hostname: format!("node{n}"),
        mac: format!("52:54:00:00:{:02x}:{:02x}", n >> 8, n & 0xff),
        ip: Some(format!("10.0.{}.{}/16", n >> 8, n & 0xff)),
        gateway: Some("10.0.0.1".into()),
        node_id: format!("node-{n}"),
        token: format!("token-{n}"),
    }
}

#[test]
fn builds_are_reproducible() -> Result<()> {
    let (_d, store, a) = shared();
    let dir = tempfile::tempdir()?;
    let other = Store::open(dir.path())?;
    let b = build::ensure_builtin(&other, &images())?;
    assert!(!b.reused);
    assert_eq!(
        a.base.id, b.base.id,
        "base layer differs between two builds"
    );
    let ids = |x: &build::Built| {
        x.roles
            .iter()
            .map(|(r, s, l)| (r.clone(), s.clone(), l.id))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(a), ids(&b), "role layers differ between two builds");
    assert_eq!(
        a.kernel.as_ref().map(|k| k.id),
        b.kernel.as_ref().map(|k| k.id)
    );
    // Node layers too.
    let ra = store.image_for_role("web")?.context("web")?;
    let rb = other.image_for_role("web")?.context("web")?;
    assert_eq!(
        build::node_layer(store, &ra, &facts(7))?.id,
        build::node_layer(&other, &rb, &facts(7))?.id
    );
    // And a second build of an unchanged recipe is found, not rebuilt.
    let again = build::ensure_builtin(&other, &images())?;
    assert!(again.reused);
    assert_eq!(again.version, b.version);
    Ok(())
}

#[test]
fn base_holds_what_the_recipe_says() -> Result<()> {
    let (_d, store, built) = shared();
    let v = store
        .image_version("busybox", built.version, None, None)?
        .context("base")?;
    assert_eq!(v.layers.len(), 1);
    let img = Image::of(store, &v)?;
    assert_eq!(img.cat("/etc/strata/image"), "busybox\n");
    assert_eq!(
        img.cat("/etc/motd"),
        "Strata busybox image: images, not installs.\n"
    );
    assert_eq!(img.meta("/bin/busybox"), Some((0o755, 0, 0)));
    assert_eq!(
        img.meta("/etc/shadow").map(|m| m.0),
        Some(0o600),
        "[[attr]] mode"
    );
    assert_eq!(img.meta("/tmp").map(|m| m.0), Some(0o1777));
    assert_eq!(img.meta("/root").map(|m| m.0), Some(0o700));
    assert_eq!(img.link("/bin/sh"), "/bin/busybox");
    assert_eq!(img.link("/sbin/init"), "/bin/busybox");
    assert_eq!(img.meta("/etc/init.d/rcS").map(|m| m.0), Some(0o755));
    assert!(img.cat("/etc/init.d/rcS").contains("stage=running"));
    // The busybox binary is Debian's, byte for byte.
    let dumped = img._dir.path().join("busybox");
    img.debugfs(&format!("dump /bin/busybox {}", dumped.display()));
    assert_eq!(fs::read(&dumped)?, fs::read("/bin/busybox")?);
    // The kernel is recorded and stored.
    let k = v.kernel.context("kernel recorded")?;
    assert!(k.release.starts_with("6."), "{}", k.release);
    assert_eq!(
        blake3::hash(&fs::read(&k.path)?).to_hex().to_string(),
        k.id.to_hex()
    );
    // With node-init's modules for that release, as a cpio blob GNU cpio reads.
    let m = k.modules.context("module archive recorded")?;
    let bytes = fs::read(&m.path)?;
    assert_eq!(blake3::hash(&bytes).to_hex().to_string(), m.id.to_hex());
    assert_eq!(m.size, bytes.len() as u64);
    let list = String::from_utf8(cpio_cat(
        &bytes,
        &format!("lib/modules/{}/strata-modules.list", k.release),
    )?)?;
    for m in [
        "/loop.ko",
        "/dm-mod.ko",
        "/dm-snapshot.ko",
        "/ext4.ko",
        "/virtio_net.ko",
    ] {
        assert!(list.lines().any(|l| l.ends_with(m)), "{m} not in {list}");
    }
    Ok(())
}

/// One member of a cpio archive, extracted by GNU cpio.
fn cpio_cat(archive: &[u8], member: &str) -> Result<Vec<u8>> {
    let dir = tempfile::tempdir()?;
    let path = dir.path().join("a.cpio");
    fs::write(&path, archive)?;
    let out = Command::new("cpio")
        .args(["-i", "--quiet", "--to-stdout", member])
        .stdin(fs::File::open(&path)?)
        .output()
        .context("cpio missing: run scripts/setup.sh (Debian package cpio)")?;
    if !out.status.success() {
        bail!("cpio: {}", String::from_utf8_lossy(&out.stderr));
    }
    Ok(out.stdout)
}

/// A base whose kernel is its own (`[kernel]` without `dir`): the kernel comes out of the
/// image's `/boot`, and node-init's modules out of its `/lib/modules/<release>`, where
/// present; the rest are noted, not errors.
#[test]
fn an_image_carried_kernel_is_recorded_with_its_modules() -> Result<()> {
    tools();
    let generic = std::env::var_os("HOME")
        .map(PathBuf::from)
        .context("HOME")?
        .join(".cache/strata/kernel/root/lib/modules");
    let release = fs::read_dir(&generic)
        .with_context(|| format!("{}: run scripts/setup.sh", generic.display()))?
        .next()
        .context("no kernel: run scripts/setup.sh")??
        .file_name()
        .to_string_lossy()
        .into_owned();
    let d = recipe("[base]\nsource = \"dir\"\npath = \"root\"\n[kernel]\n");
    let root = d.path().join("img/root");
    write(&root, "boot/vmlinuz-9.9.9-test", "not really a kernel\n");
    let loop_rel = "kernel/drivers/block/loop.ko";
    let dest = root.join("lib/modules/9.9.9-test").join(loop_rel);
    fs::create_dir_all(dest.parent().context("parent")?)?;
    fs::copy(generic.join(&release).join(loop_rel), &dest)?;
    write(
        &root,
        "lib/modules/9.9.9-test/modules.builtin",
        "kernel/fs/ext4/ext4.ko\n",
    );
    let sd = tempfile::tempdir()?;
    let store = Store::open(sd.path())?;
    let built = build::build(&store, &d.path().join("img"), &BuildOptions::default())?;
    let k = built.kernel.context("kernel recorded")?;
    assert_eq!(k.release, "9.9.9-test");
    assert_eq!(fs::read(&k.path)?, b"not really a kernel\n");
    let m = k.modules.context("modules recorded")?;
    let bytes = fs::read(&m.path)?;
    let list = String::from_utf8(cpio_cat(
        &bytes,
        "lib/modules/9.9.9-test/strata-modules.list",
    )?)?;
    let loaded: Vec<&str> = list.lines().filter(|l| !l.starts_with('#')).collect();
    assert_eq!(loaded, [format!("/lib/modules/9.9.9-test/{loop_rel}")]);
    assert_eq!(
        cpio_cat(&bytes, &format!("lib/modules/9.9.9-test/{loop_rel}"))?,
        fs::read(&dest)?
    );
    assert!(
        built
            .notes
            .iter()
            .any(|n| n.contains("module ext4 is built into the kernel")),
        "{:?}",
        built.notes
    );
    assert!(
        built
            .notes
            .iter()
            .any(|n| n.contains("module virtio_net is not in this kernel")),
        "{:?}",
        built.notes
    );
    // The catalog records it next to the kernel; inspect shows it.
    let info = store.catalog().version("t", built.version)?.context("v")?;
    assert_eq!(info.modules, Some(m.id));
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["image", "inspect", "--store"])
        .arg(sd.path())
        .arg("t")
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!("modules for node-init: {}", m.id)),
        "{text}"
    );
    let out = Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["image", "inspect", "--json", "--store"])
        .arg(sd.path())
        .arg("t")
        .output()?;
    let v: serde_json::Value = serde_json::from_slice(&out.stdout)?;
    assert_eq!(v["kernel"]["modules"]["id"], m.id.to_hex().as_str(), "{v}");
    Ok(())
}

#[test]
fn roles_and_sites_hold_what_their_recipes_say() -> Result<()> {
    let (_d, store, built) = shared();
    let web = store
        .image_version("busybox", built.version, Some("web"), None)?
        .context("web")?;
    assert_eq!(web.layers.len(), 2);
    assert_eq!(
        web.layers[0].id, built.base.id,
        "web sits on the shared base"
    );
    let img = Image::of(store, &web)?;
    let v = built.version;
    assert_eq!(img.cat("/etc/strata/role"), "web\n");
    assert_eq!(img.cat("/etc/strata/version"), format!("{v}\n"));
    assert_eq!(
        img.cat("/var/www/index.html"),
        format!("<!doctype html>\n<title>web on busybox v{v}</title>\n<p>Hello from a Strata web node (generic).</p>\n")
    );
    assert_eq!(
        img.meta("/var/www/index.html"),
        Some((0o644, 33, 33)),
        "template with owner"
    );
    assert_eq!(
        img.meta("/var/www"),
        Some((0o755, 33, 33)),
        "dir with owner"
    );
    assert_eq!(
        img.meta("/etc/strata/web.conf"),
        Some((0o640, 0, 33)),
        "integer mode"
    );
    assert_eq!(img.cat("/etc/strata/web.conf"), "document_root=/var/www\n");
    assert_eq!(
        img.cat("/etc/issue"),
        format!("Strata web node (generic), image busybox version {v}\n"),
        "deleted then re-made"
    );
    assert_eq!(img.kind("/srv/www").as_deref(), Some("symlink"));
    assert_eq!(img.link("/srv/www"), "/var/www");
    assert_eq!(
        img.meta("/etc/init.d/S50httpd").map(|m| m.0),
        Some(0o755),
        "tree keeps the exec bit"
    );
    assert_eq!(img.cat("/etc/strata/httpd.env"), "port=80\n");

    // Sites override values of the one generic definition.
    let lab = store
        .image_version("busybox", v, Some("web"), Some("lab"))?
        .context("web@lab")?;
    let img = Image::of(store, &lab)?;
    assert!(img
        .cat("/var/www/index.html")
        .contains("Hello from the lab (lab)."));
    assert_eq!(img.cat("/etc/strata/site"), "lab\n");
    let prod = store
        .image_version("busybox", v, Some("web"), Some("prod"))?
        .context("web@prod")?;
    let img = Image::of(store, &prod)?;
    assert_eq!(img.cat("/etc/strata/httpd.env"), "port=8080\n");
    assert!(
        img.cat("/var/www/index.html")
            .contains("Hello from a Strata web node (prod)."),
        "generic value kept"
    );

    // db: deletions, a private data directory, attr on a tree file.
    let db = store
        .image_version("busybox", v, Some("db"), None)?
        .context("db")?;
    assert_eq!(db.layers[0].id, built.base.id, "db and web share one base");
    let img = Image::of(store, &db)?;
    assert_eq!(img.meta("/usr/sbin/httpd"), None, "deleted");
    assert_eq!(img.meta("/usr/bin/ftpget"), None, "deleted");
    assert!(img.meta("/usr/bin/wget").is_some(), "kept");
    assert_eq!(img.meta("/var/lib/db"), Some((0o700, 999, 999)));
    assert_eq!(img.meta("/var/lib/db/README"), Some((0o600, 999, 999)));
    assert_eq!(img.meta("/etc/db.conf"), Some((0o640, 0, 999)));
    assert!(img.cat("/etc/db.conf").contains("max_connections=100"));
    assert_eq!(img.meta("/etc/init.d/S60db").map(|m| m.0), Some(0o750));
    assert_eq!(img.link("/srv/db"), "/var/lib/db");
    let dblab = store
        .image_version("busybox", v, Some("db"), Some("lab"))?
        .context("db@lab")?;
    assert!(Image::of(store, &dblab)?
        .cat("/etc/db.conf")
        .contains("max_connections=10\n"));
    // web's changes are not in db's chain.
    assert_eq!(img.meta("/var/www"), None);
    Ok(())
}

#[test]
fn node_layers_hold_the_node_facts() -> Result<()> {
    let (_d, store, _) = shared();
    let web = store.image_for_role("web")?.context("web")?;
    let f = facts(300);
    let rec = build::node_layer(store, &web, &f)?;
    assert_eq!(rec.parent, Some(web.layers[1].id));
    let img = Image::top(&store.layer_path(&rec.id))?;
    assert_eq!(img.cat("/etc/hostname"), "node300\n");
    assert_eq!(img.cat("/etc/strata/token"), "token-300\n");
    assert_eq!(img.meta("/etc/strata/token"), Some((0o600, 0, 0)));
    assert_eq!(
        img.cat("/etc/machine-id"),
        format!("{}\n", build::machine_id("node-300"))
    );
    assert_eq!(
        img.cat("/etc/strata/network"),
        "mac=52:54:00:00:01:2c\naddress=10.0.1.44/16\ngateway=10.0.0.1\n"
    );
    assert_eq!(
        img.cat("/etc/strata/role"),
        "web\n",
        "role layer visible through the node layer"
    );
    // Same facts: the same layer, found without building. New facts: a new layer.
    assert_eq!(build::node_layer(store, &web, &f)?.id, rec.id);
    let mut g = f.clone();
    g.hostname = "renamed".into();
    assert_ne!(build::node_layer(store, &web, &g)?.id, rec.id);
    // Bad facts are refused with the node named.
    let mut bad = f.clone();
    bad.hostname = "no/slashes".into();
    let e = build::node_layer(store, &web, &bad)
        .unwrap_err()
        .to_string();
    assert!(e.contains("node-300") && e.contains("hostname"), "{e}");
    Ok(())
}

/// Node layers come from the role's node template (patched inodes and data blocks, no
/// debugfs); they must hold exactly the image the general way (debugfs on a copy of the
/// role image) makes, for several nodes, a file needing two blocks (a new shape), DHCP and
/// static addresses, and pass e2fsck (Image::top runs it).
#[test]
fn node_layers_from_the_template_equal_the_general_way() -> Result<()> {
    let (_d, store, _) = shared();
    let db = store.image_for_role("db")?.context("db")?;
    let mut cases: Vec<NodeFacts> = (400..404).map(facts).collect();
    cases[1].ip = None;
    cases[1].gateway = None;
    cases[2].token = "t".repeat(4096);
    cases[3].hostname = "a-much-longer-host-name-than-the-others-0123456789".into();
    for f in &cases {
        let rec = build::node_layer(store, &db, f)?;
        assert!(
            build::node::node_template_in_use(store, &db.layers[1].id),
            "{}: the fast path was not used",
            f.node_id
        );
        let img = Image::top(&store.layer_path(&rec.id))?;
        let general = img._dir.path().join("general.raw");
        build::node::node_image_general(store, &db, f, &general)?;
        assert!(
            fs::read(&img.raw)? == fs::read(&general)?,
            "{}: the templated node image differs from debugfs's",
            f.node_id
        );
        assert_eq!(img.cat("/etc/strata/token"), format!("{}\n", f.token));
        // 3 MiB of VHDX structures, a sector bitmap block and the 1 MiB blocks a node
        // changes (three here), of which only the changed sectors use disk space.
        assert_eq!(rec.size, 7 << 20, "{}: node layer size", f.node_id);
        let used =
            std::os::unix::fs::MetadataExt::blocks(&fs::metadata(store.layer_path(&rec.id))?) * 512;
        assert!(
            used <= 256 << 10,
            "{}: node layer uses {used} bytes of disk",
            f.node_id
        );
    }
    Ok(())
}

/// The files in `layers/` and the catalog's (image, version) pairs.
type StoreState = (Vec<String>, Vec<(String, u64)>);

/// Everything in `layers/` plus the catalog's versions: what "the store is unchanged" means.
fn snapshot(store: &Store) -> Result<StoreState> {
    let mut files: Vec<String> = fs::read_dir(store.root().join("layers"))?
        .map(|e| e.map(|e| e.file_name().to_string_lossy().into_owned()))
        .collect::<Result<_, _>>()?;
    files.sort();
    let versions = store
        .catalog()
        .versions(None)?
        .into_iter()
        .map(|v| (v.image, v.version))
        .collect();
    Ok((files, versions))
}

fn write(dir: &Path, rel: &str, text: &str) {
    let p = dir.join(rel);
    fs::create_dir_all(p.parent().unwrap()).unwrap();
    fs::write(p, text).unwrap();
}

/// A base recipe in a fresh directory (with an empty roles dir next to it).
fn recipe(base_extra: &str) -> tempfile::TempDir {
    let d = tempfile::tempdir().unwrap();
    write(
        d.path(),
        "img/recipe.toml",
        &format!("[image]\nname = \"t\"\nsize_mib = 16\n{base_extra}"),
    );
    fs::create_dir_all(d.path().join("roles")).unwrap();
    d
}

fn build_err(store: &Store, dir: &Path) -> String {
    let before = snapshot(store).unwrap();
    let e = build::build(store, &dir.join("img"), &BuildOptions::default())
        .expect_err("the build must fail");
    assert_eq!(
        snapshot(store).unwrap(),
        before,
        "a failed build changed the store"
    );
    let tmp = fs::read_dir(store.root().join("tmp")).unwrap().count();
    assert_eq!(tmp, 0, "a failed build left scratch files");
    e.to_string()
}

fn tar_bytes(entries: &[(&str, tar::EntryType, &[u8], Option<&str>)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, ty, data, link) in entries {
        let mut h = tar::Header::new_gnu();
        h.set_entry_type(*ty);
        h.set_mode(if *ty == tar::EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_size(data.len() as u64);
        h.set_mtime(1);
        h.set_uid(0);
        h.set_gid(0);
        // Names go in raw, so `..` survives (Builder::append_data would refuse it).
        let raw = name.as_bytes();
        h.as_old_mut().name[..raw.len()].copy_from_slice(raw);
        if let Some(l) = link {
            h.set_link_name(l).unwrap();
        }
        h.set_cksum();
        b.append(&h, *data).unwrap();
    }
    b.into_inner().unwrap()
}

#[test]
fn bad_input_is_named_and_leaves_the_store_unchanged() -> Result<()> {
    tools();
    let sd = tempfile::tempdir()?;
    let store = Store::open(sd.path())?;
    // A good build first, so "unchanged" has something to compare against.
    let good = recipe("[base]\nsource = \"empty\"\n[[file]]\npath = \"/a\"\ncontent = \"a\"\n");
    build::build(&store, &good.path().join("img"), &BuildOptions::default())?;

    let d = recipe("colour = \"red\"\n[base]\nsource = \"empty\"\n");
    let e = build_err(&store, d.path());
    assert!(
        e.contains("recipe.toml") && e.contains("colour") && e.contains("line 4"),
        "unknown key: {e}"
    );

    let d = recipe("[base]\nsource = \"empty\"\n[[file]]\npath = \"/x\"\nsource = \"nope.txt\"\n");
    let e = build_err(&store, d.path());
    assert!(
        e.contains("[[file]] #1 (/x)") && e.contains("nope.txt"),
        "missing source: {e}"
    );

    let d = recipe("[base]\nsource = \"empty\"\n[[file]]\npath = \"/x\"\ntemplate = \"t.tmpl\"\n");
    write(d.path(), "img/t.tmpl", "hello {{ who }}\n");
    let e = build_err(&store, d.path());
    assert!(
        e.contains("\"who\"") && e.contains("t.tmpl") && e.contains("(/x)"),
        "template variable: {e}"
    );

    // A role whose site lacks a value: the site is named.
    let d = recipe("[base]\nsource = \"empty\"\n");
    write(d.path(), "roles/r/recipe.toml", "[role]\nname = \"r\"\nimage = \"t\"\n[vars]\nwho = \"x\"\n[sites.s.vars]\nother = \"y\"\n[[file]]\npath = \"/x\"\ntemplate = \"t.tmpl\"\n");
    write(d.path(), "roles/r/t.tmpl", "{{ who }} {{ where }}\n");
    let e = build_err(&store, d.path());
    assert!(
        e.contains("\"where\"") && e.contains("roles/r/recipe.toml"),
        "role template variable: {e}"
    );

    let tars: [(&str, Vec<u8>, &str); 4] = [
        (
            "dotdot",
            tar_bytes(&[("a/../../etc/passwd", tar::EntryType::Regular, b"x", None)]),
            ".. component",
        ),
        (
            "through-link",
            tar_bytes(&[
                ("evil", tar::EntryType::Symlink, b"", Some("/etc")),
                ("evil/passwd", tar::EntryType::Regular, b"x", None),
            ]),
            "parent /evil is a symbolic link",
        ),
        (
            "escaping-link",
            tar_bytes(&[("a/up", tar::EntryType::Symlink, b"", Some("../../../etc"))]),
            "escapes the root",
        ),
        (
            "hardlink-out",
            tar_bytes(&[("a", tar::EntryType::Link, b"", Some("../etc/passwd"))]),
            "escapes the root",
        ),
    ];
    for (name, bytes, want) in tars {
        let d = recipe("[base]\nsource = \"tar\"\npath = \"root.tar\"\n");
        fs::write(d.path().join("img/root.tar"), bytes)?;
        let e = build_err(&store, d.path());
        assert!(e.contains("root.tar") && e.contains(want), "{name}: {e}");
    }

    let d = recipe("[base]\nsource = \"oci\"\npath = \"image.tar\"\n");
    fs::write(
        d.path().join("img/image.tar"),
        b"this is not an archive at all, just text. ".repeat(20),
    )?;
    let e = build_err(&store, d.path());
    assert!(e.contains("image.tar"), "corrupt OCI: {e}");
    // An OCI layout whose layer blob does not match its digest.
    let d = recipe("[base]\nsource = \"oci\"\npath = \"image.tar\"\n");
    fs::write(
        d.path().join("img/image.tar"),
        oci_layout(
            &[tar_bytes(&[("f", tar::EntryType::Regular, b"1", None)])],
            true,
        ),
    )?;
    let e = build_err(&store, d.path());
    assert!(
        e.contains("image.tar") && e.contains("hashes to sha256:"),
        "OCI digest: {e}"
    );

    let d = recipe("[base]\nsource = \"disk\"\npath = \"disk.img\"\n");
    let text = fs::read_to_string(d.path().join("img/recipe.toml"))?.replace("size_mib = 16\n", "");
    fs::write(d.path().join("img/recipe.toml"), text)?;
    fs::write(d.path().join("img/disk.img"), vec![0u8; 1 << 20])?;
    let e = build_err(&store, d.path());
    assert!(
        e.contains("disk.img") && e.contains("not an ext4 file system"),
        "not ext4: {e}"
    );
    Ok(())
}

/// An OCI image layout tar holding `layers` (uncompressed); `corrupt` breaks the first layer's
/// digest.
fn oci_layout(layers: &[Vec<u8>], corrupt: bool) -> Vec<u8> {
    use sha2::Digest;
    let sha = |b: &[u8]| hex::encode(sha2::Sha256::digest(b));
    let mut blobs: BTreeMap<String, Vec<u8>> = BTreeMap::new();
    let mut descs = Vec::new();
    for (i, l) in layers.iter().enumerate() {
        let mut digest = sha(l);
        if corrupt && i == 0 {
            digest = sha(b"something else");
        }
        descs.push(serde_json::json!({"mediaType": "application/vnd.oci.image.layer.v1.tar", "digest": format!("sha256:{digest}"), "size": l.len()}));
        blobs.insert(digest, l.clone());
    }
    let config = br#"{"architecture":"amd64","os":"linux"}"#.to_vec();
    let cd = sha(&config);
    blobs.insert(cd.clone(), config.clone());
    let manifest = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "config": {"mediaType": "application/vnd.oci.image.config.v1+json", "digest": format!("sha256:{cd}"), "size": config.len()},
        "layers": descs,
    }))
    .unwrap();
    let md = sha(&manifest);
    blobs.insert(md.clone(), manifest.clone());
    let index = serde_json::to_vec(&serde_json::json!({
        "schemaVersion": 2,
        "manifests": [{"mediaType": "application/vnd.oci.image.manifest.v1+json", "digest": format!("sha256:{md}"), "size": manifest.len()}],
    }))
    .unwrap();
    let mut b = tar::Builder::new(Vec::new());
    let mut add = |name: &str, data: &[u8]| {
        let mut h = tar::Header::new_gnu();
        h.set_size(data.len() as u64);
        h.set_mode(0o644);
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_cksum();
        b.append_data(&mut h, name, data).unwrap();
    };
    add("oci-layout", br#"{"imageLayoutVersion":"1.0.0"}"#);
    add("index.json", &index);
    for (d, data) in &blobs {
        add(&format!("blobs/sha256/{d}"), data);
    }
    b.into_inner().unwrap()
}

#[test]
fn tarball_oci_and_disk_bases() -> Result<()> {
    tools();
    need("qemu-img", "apt-get install qemu-utils");
    let sd = tempfile::tempdir()?;
    let store = Store::open(sd.path())?;
    // Tarball with owners, a device node, a hard link and an absolute symlink (kept as data).
    let mut b = tar::Builder::new(Vec::new());
    let hdr = || {
        let mut h = tar::Header::new_gnu();
        h.set_uid(0);
        h.set_gid(0);
        h.set_mtime(1);
        h.set_mode(0o644);
        h
    };
    let mut h = hdr();
    h.set_entry_type(tar::EntryType::Directory);
    h.set_mode(0o750);
    h.set_uid(5);
    h.set_gid(6);
    h.set_size(0);
    h.set_cksum();
    b.append_data(&mut h, "opt/", &b""[..])?;
    let mut h = hdr();
    h.set_mode(0o4755);
    h.set_uid(0);
    h.set_size(5);
    h.set_cksum();
    b.append_data(&mut h, "opt/tool", &b"tool\n"[..])?;
    let mut h = hdr();
    h.set_entry_type(tar::EntryType::Link);
    h.set_size(0);
    h.set_cksum();
    b.append_link(&mut h, "opt/tool2", "opt/tool")?;
    let mut h = hdr();
    h.set_entry_type(tar::EntryType::Symlink);
    h.set_size(0);
    h.set_cksum();
    b.append_link(&mut h, "etc/localtime", "/usr/share/zoneinfo/UTC")?;
    let mut h = hdr();
    h.set_entry_type(tar::EntryType::Char);
    h.set_mode(0o666);
    h.set_device_major(1)?;
    h.set_device_minor(3)?;
    h.set_size(0);
    h.set_cksum();
    b.append_data(&mut h, "dev/null", &b""[..])?;
    let d = recipe("[base]\nsource = \"tar\"\npath = \"root.tar.gz\"\n");
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    std::io::Write::write_all(&mut gz, &b.into_inner()?)?;
    fs::write(d.path().join("img/root.tar.gz"), gz.finish()?)?;
    let built = build::build(&store, &d.path().join("img"), &BuildOptions::default())?;
    let img = Image::top(&store.layer_path(&built.base.id))?;
    assert_eq!(img.meta("/opt"), Some((0o750, 5, 6)));
    assert_eq!(img.meta("/opt/tool"), Some((0o4755, 0, 0)));
    assert_eq!(img.cat("/opt/tool2"), "tool\n");
    assert!(
        img.debugfs("stat /opt/tool").contains("Links: 2"),
        "hard link kept"
    );
    assert_eq!(img.link("/etc/localtime"), "/usr/share/zoneinfo/UTC");
    assert_eq!(img.kind("/dev/null").as_deref(), Some("character"));
    assert_eq!(img.meta("/dev/null").map(|m| m.0), Some(0o666));

    // OCI layout: the second layer deletes a file (whiteout) and empties a directory (opaque).
    let l1 = tar_bytes(&[
        ("keep", tar::EntryType::Regular, b"keep\n", None),
        ("gone", tar::EntryType::Regular, b"gone\n", None),
        ("d/", tar::EntryType::Directory, b"", None),
        ("d/old", tar::EntryType::Regular, b"old\n", None),
    ]);
    let l2 = tar_bytes(&[
        (".wh.gone", tar::EntryType::Regular, b"", None),
        ("d/new", tar::EntryType::Regular, b"new\n", None),
        ("d/.wh..wh..opq", tar::EntryType::Regular, b"", None),
        ("added", tar::EntryType::Regular, b"added\n", None),
    ]);
    let d = recipe("[base]\nsource = \"oci\"\npath = \"image.tar\"\n");
    fs::write(d.path().join("img/image.tar"), oci_layout(&[l1, l2], false))?;
    let built = build::build(&store, &d.path().join("img"), &BuildOptions::default())?;
    let img = Image::top(&store.layer_path(&built.base.id))?;
    assert_eq!(img.cat("/keep"), "keep\n");
    assert_eq!(img.cat("/added"), "added\n");
    assert_eq!(img.meta("/gone"), None, "whiteout");
    assert_eq!(img.meta("/d/old"), None, "opaque directory");
    assert_eq!(
        img.cat("/d/new"),
        "new\n",
        "opaque keeps the layer's own entries"
    );

    // A qcow2 disk made by qemu-img from the busybox base.
    let (_sd, shared_store, sb) = shared();
    let raw = sd.path().join("bb.raw");
    compose(&shared_store.layer_path(&sb.base.id), &raw)?;
    let d = recipe("[base]\nsource = \"disk\"\npath = \"disk.qcow2\"\n");
    let o = Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "qcow2"])
        .arg(&raw)
        .arg(d.path().join("img/disk.qcow2"))
        .output()?;
    assert!(o.status.success(), "{}", String::from_utf8_lossy(&o.stderr));
    let text = fs::read_to_string(d.path().join("img/recipe.toml"))?.replace("size_mib = 16\n", "");
    fs::write(d.path().join("img/recipe.toml"), text)?;
    let built = build::build(&store, &d.path().join("img"), &BuildOptions::default())?;
    let img = Image::top(&store.layer_path(&built.base.id))?;
    assert_eq!(
        img.cat("/etc/motd"),
        "Strata busybox image: images, not installs.\n"
    );
    assert_eq!(
        img.cat("/etc/strata/image"),
        "t\n",
        "the recipe's own entries applied on the disk's file system"
    );
    Ok(())
}

#[test]
fn updates_rebuild_roles_and_gc_collects_old_versions() -> Result<()> {
    tools();
    let sd = tempfile::tempdir()?;
    let store = Store::open(sd.path())?;
    let v1 = build::ensure_builtin(&store, &images())?;
    let d = tempfile::tempdir()?;
    write(d.path(), "upd/recipe.toml", "[update]\nimage = \"busybox\"\n[[file]]\npath = \"/etc/patched\"\ncontent = \"yes\\n\"\n[[delete]]\npaths = [\"/usr/bin/wget\"]\n");
    let v2 = build::build(
        &store,
        &d.path().join("upd"),
        &BuildOptions {
            roles_dir: Some(images().join("roles")),
            ..Default::default()
        },
    )?;
    assert_eq!(v2.version, v1.version + 1);
    assert_ne!(v2.base.id, v1.base.id);
    assert_eq!(
        v2.roles.len(),
        v1.roles.len(),
        "every role rebuilt on the new base"
    );
    let web2 = store.image_for_role("web")?.context("web")?;
    assert_eq!(
        web2.version, v2.version,
        "roles resolve to the newest version"
    );
    let img = Image::of(&store, &web2)?;
    assert_eq!(img.cat("/etc/patched"), "yes\n");
    assert_eq!(img.meta("/usr/bin/wget"), None);
    assert_eq!(img.cat("/etc/strata/version"), format!("{}\n", v2.version));
    assert_eq!(
        v2.kernel.as_ref().map(|k| k.id),
        v1.kernel.as_ref().map(|k| k.id),
        "kernel carried over"
    );
    let modules = v2
        .kernel
        .as_ref()
        .and_then(|k| k.modules.as_ref())
        .map(|m| m.id);
    assert!(modules.is_some(), "module archive carried over");
    assert_eq!(
        modules,
        v1.kernel
            .as_ref()
            .and_then(|k| k.modules.as_ref())
            .map(|m| m.id)
    );
    // The diff between the two web versions names what changed.
    let web1 = store
        .image_version("busybox", v1.version, Some("web"), None)?
        .context("web v1")?;
    let changes = strata_server::cli::image::diff(&store, &web1, &web2)?;
    assert_eq!(changes.get("/etc/patched"), Some(&'A'));
    assert_eq!(changes.get("/usr/bin/wget"), Some(&'D'));
    assert_eq!(changes.get("/etc/strata/version"), Some(&'M'));
    assert_eq!(
        changes.get("/var/www/index.html"),
        Some(&'M'),
        "the template shows the version"
    );
    assert!(!changes.contains_key("/bin/busybox"));
    // gc: nothing to collect while both versions exist; v1's layers go once v1 is removed.
    let node = build::node_layer(&store, &web1, &facts(1))?;
    assert!(store.gc(true)?.layers.is_empty());
    assert!(store.catalog().remove_version("busybox", v1.version)?);
    let dry = store.gc(true)?;
    assert!(
        dry.layers.contains(&v1.base.id) && dry.layers.contains(&node.id),
        "{dry:?}"
    );
    assert!(
        store.layer_path(&v1.base.id).is_file(),
        "a dry run removes nothing"
    );
    let done = store.gc(false)?;
    assert_eq!(done.layers.len(), dry.layers.len());
    // v2 still references the kernel and its module archive: gc keeps both.
    for b in [v2.kernel.as_ref().map(|k| k.id), modules]
        .into_iter()
        .flatten()
    {
        assert!(!done.blobs.contains(&b), "gc removed blob {b}");
        assert!(store.blob_path(&b).is_file());
    }
    assert!(!store.layer_path(&v1.base.id).exists());
    assert!(!store.layer_path(&node.id).exists());
    for (_, _, l) in &v2.roles {
        store.verify_layer(&l.id)?;
    }
    store.verify_layer(&v2.base.id)?;
    store.catalog().check()?;
    Ok(())
}

/// Checks what a killed builder may have left: every file in `layers/` hashes to its name,
/// the catalog is intact, and every version it records is complete.
fn check_store_after_kill(root: &Path) -> Result<usize> {
    let store = Store::open(root)?;
    store.catalog().check()?;
    let mut layers = 0;
    for e in fs::read_dir(root.join("layers"))? {
        let name = e?.file_name().to_string_lossy().into_owned();
        let id = name
            .strip_suffix(".vhdx")
            .with_context(|| format!("stray file {name} in layers/"))?;
        store
            .verify_layer(&id.parse()?)
            .with_context(|| format!("layer {name}"))?;
        layers += 1;
    }
    let versions = store.catalog().versions(None)?;
    for v in versions {
        store.verify_layer(&v.base)?;
        for r in &v.roles {
            let chain = store.chain(&r.layer)?;
            assert_eq!(chain.first().map(|l| l.id), Some(v.base));
            store.verify_layer(&r.layer)?;
        }
    }
    assert_eq!(
        fs::read_dir(root.join("tmp"))?.count(),
        0,
        "scratch of a dead builder left after open"
    );
    Ok(layers)
}

#[test]
fn killing_the_builder_never_leaves_a_bad_layer_or_catalog() -> Result<()> {
    let (_d, _s, reference) = shared();
    let dir = tempfile::tempdir()?;
    let root = dir.path().join("store");
    // How long one whole build takes on this machine now (0.1 s quiet, seconds under load), in
    // a store of its own: the kill points below are spread over that span.
    let full = {
        let measure = dir.path().join("measure");
        let t0 = std::time::Instant::now();
        let status = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["image", "build"])
            .arg(images().join("busybox"))
            .arg("--store")
            .arg(&measure)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .status()?;
        anyhow::ensure!(status.success(), "an uninterrupted build failed: {status}");
        t0.elapsed().as_millis() as u64
    };
    // Kill points spread over the whole build, in a fixed pseudo-random order: round r kills in
    // the r-th fourteenth of the measured span, somewhere inside it.
    let rounds = 14;
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut kills = 0;
    for round in 0..rounds {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        let delay_ms = (full * round + full * (x % 1000) / 1000) / rounds;
        let mut child = Command::new(env!("CARGO_BIN_EXE_strata"))
            .args(["image", "build"])
            .arg(images().join("busybox"))
            .arg("--store")
            .arg(&root)
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .process_group(0)
            .spawn()?;
        std::thread::sleep(std::time::Duration::from_millis(delay_ms));
        if child.try_wait()?.is_none() {
            // The whole process group, as a service manager stops a server: the builder and
            // the e2fsprogs it runs (a child forked but not yet exec'd still holds the
            // store's lock).
            Command::new("kill")
                .args(["-KILL", "--", &format!("-{}", child.id())])
                .status()?;
            kills += 1;
        }
        child.wait()?;
        // Wait until every process of the group is gone (reaped by init).
        let gone = |pg: u32| {
            Command::new("kill")
                .args(["-0", "--", &format!("-{pg}")])
                .stderr(std::process::Stdio::null())
                .status()
                .map(|s| !s.success())
        };
        let mut waited = 0;
        while !gone(child.id())? {
            std::thread::sleep(std::time::Duration::from_millis(10));
            waited += 1;
            assert!(
                waited < 3000,
                "processes of the killed build still run after 30 s"
            );
        }
        check_store_after_kill(&root).with_context(|| format!("after a kill at {delay_ms} ms"))?;
        // A build that finished: forget it, so the next round builds (and is killed) again.
        let store = Store::open(&root)?;
        let versions = store.catalog().versions(None)?;
        for v in versions {
            store.catalog().remove_version(&v.image, v.version)?;
        }
        store.gc(false)?;
    }
    assert!(
        kills >= 5,
        "only {kills} builds were interrupted; the test needs kill points inside builds"
    );
    // A build after all that completes and gives the reference layers.
    let store = Store::open(&root)?;
    let built = build::ensure_builtin(&store, &images())?;
    assert_eq!(built.base.id, reference.base.id);
    let ids = |x: &build::Built| {
        x.roles
            .iter()
            .map(|(r, s, l)| (r.clone(), s.clone(), l.id))
            .collect::<Vec<_>>()
    };
    assert_eq!(ids(&built), ids(reference));
    drop(store);
    check_store_after_kill(&root)?;
    Ok(())
}

#[test]
fn every_recipe_in_the_repository_parses() -> Result<()> {
    let mut n = 0;
    for dir in [
        images().join("busybox"),
        images().join("debian-bookworm"),
        images().join("roles/web"),
        images().join("roles/db"),
    ] {
        build::recipe::load(&dir).with_context(|| format!("{}", dir.display()))?;
        n += 1;
    }
    assert_eq!(n, 4);
    Ok(())
}
