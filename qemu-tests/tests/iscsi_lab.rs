//! The iSCSI target of `strata serve` against the Linux kernel's initiator driven by
//! open-iscsi, in the lab (the host kernel has no `iscsi_tcp`; the lab VMs run Debian's
//! kernel, which has it). A VM boots Debian's kernel straight into a test initramfs carrying
//! busybox, open-iscsi's `iscsid` and `iscsiadm`, e2fsprogs' `mke2fs` and `e2fsck` (each with
//! the shared libraries `ldd` names) and the kernel modules for virtio-net, iSCSI over TCP and
//! SCSI disks. It discovers its target (SendTargets), logs in with its own initiator name and
//! CHAP secret, makes a file system on the LUN, checks it and logs out. The host then reads
//! the node's LUN through libiscsi and checks the file system the VM made is there, and that
//! the image store's layers did not change.
//!
//! Also: node-init booting a diskless VM over iSCSI through `strata serve` (PXE, then
//! iscsistart, then the image's marker), and QEMU's iPXE ROM `sanboot`ing a LUN whose base
//! layer carries its own bootloader (extlinux) to that image's marker.
//!
//! Needs `open-iscsi` and `extlinux` (scripts/setup.sh) and the `strata` binary (`$STRATA_BIN`, else next
//! to this test's target directory).

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use strata_lab::fixture::{self, Cpio};
use strata_lab::server::LAB_CONFIG_TEMPLATE;
use strata_lab::{tools, Firmware, Lab, LabConfig, Strata, StrataConfig, VmConfig};

const BOOT: Duration = Duration::from_secs(300);
const MAC: &str = "52:54:00:42:15:01";
const VM_IP: &str = "10.42.0.51";

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Programs copied into the initramfs, with where they are on the host.
const PROGRAMS: &[(&str, &str)] = &[
    ("iscsid", "/usr/sbin/iscsid"),
    ("iscsiadm", "/usr/sbin/iscsiadm"),
    ("mke2fs", "/usr/sbin/mke2fs"),
    ("e2fsck", "/usr/sbin/e2fsck"),
];

/// Modules to load, dependencies resolved with `modinfo -F depends`.
const MODULES: &[&str] = &[
    "virtio_pci",
    "virtio_net",
    "crc32c_generic",
    "iscsi_tcp",
    "sd_mod",
];

/// `name -> path` of every module under `dir`.
fn module_paths(dir: &Path, out: &mut HashMap<String, PathBuf>) -> Result<()> {
    for e in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let p = e?.path();
        if p.is_dir() {
            module_paths(&p, out)?;
        } else if let Some(n) = p
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".ko"))
        {
            out.insert(n.replace('-', "_"), p.clone());
        }
    }
    Ok(())
}

/// Modules in load order (dependencies first).
fn module_order(kernel_root: &Path) -> Result<Vec<PathBuf>> {
    let mods = std::fs::read_dir(kernel_root.join("lib/modules"))?
        .next()
        .context("no lib/modules/<version> in the kernel tree")??
        .path();
    let mut paths = HashMap::new();
    module_paths(&mods, &mut paths)?;
    fn visit(
        n: &str,
        paths: &HashMap<String, PathBuf>,
        seen: &mut Vec<String>,
        order: &mut Vec<PathBuf>,
    ) -> Result<()> {
        let n = n.replace('-', "_");
        if seen.contains(&n) {
            return Ok(());
        }
        seen.push(n.clone());
        let p = paths
            .get(&n)
            .with_context(|| format!("module {n} not in the kernel tree"))?;
        let deps = run(Command::new("modinfo").args(["-F", "depends"]).arg(p))?;
        for d in deps.trim().split(',').filter(|d| !d.is_empty()) {
            visit(d, paths, seen, order)?;
        }
        order.push(p.clone());
        Ok(())
    }
    let (mut seen, mut order) = (Vec::new(), Vec::new());
    for m in MODULES {
        visit(m, &paths, &mut seen, &mut order)?;
    }
    Ok(order)
}

/// The test initramfs: busybox, the programs and their libraries, the modules, `/init`.
fn write_initramfs(out: &Path, init: &str) -> Result<()> {
    tools::require(&["modinfo", "ldd"], &[tools::BUSYBOX, "/usr/sbin/iscsiadm", "/usr/sbin/iscsid", "/usr/sbin/mke2fs"])
        .context("open-iscsi and e2fsprogs are needed: apt-get install open-iscsi e2fsprogs (scripts/setup.sh)")?;
    let kernel = fixture::debian_kernel()?;
    let kernel_root = kernel
        .parent()
        .and_then(Path::parent)
        .context("kernel tree")?
        .to_path_buf();
    let file = std::fs::File::create(out).with_context(|| format!("creating {}", out.display()))?;
    let mut cpio = Cpio::new(std::io::BufWriter::new(file));
    let mut dirs: Vec<String> = Vec::new();
    let mut mkdirs = |cpio: &mut Cpio<_>, path: &str| -> Result<()> {
        let mut at = String::new();
        for part in path.split('/').filter(|p| !p.is_empty()) {
            at = if at.is_empty() {
                part.to_owned()
            } else {
                format!("{at}/{part}")
            };
            if !dirs.contains(&at) {
                cpio.dir(&at)?;
                dirs.push(at.clone());
            }
        }
        Ok(())
    };
    for d in [
        "bin",
        "sbin",
        "dev",
        "proc",
        "sys",
        "tmp",
        "run/lock",
        "etc/iscsi",
        "var/lib/iscsi",
        "modules",
        "usr/local/sbin",
    ] {
        mkdirs(&mut cpio, d)?;
    }
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.char_dev("dev/null", 0o666, 1, 3)?;
    cpio.file("bin/busybox", 0o755, &std::fs::read(tools::BUSYBOX)?)?;
    cpio.symlink("bin/sh", "busybox")?;
    let mut libs: Vec<String> = Vec::new();
    for (name, host) in PROGRAMS {
        cpio.file(
            &format!("usr/local/sbin/{name}"),
            0o755,
            &std::fs::read(host).with_context(|| format!("reading {host}"))?,
        )?;
        for lib in run(Command::new("ldd").arg(host))?
            .split_whitespace()
            .filter(|w| w.starts_with('/'))
        {
            if !libs.iter().any(|l| l == lib) {
                libs.push(lib.to_owned());
            }
        }
    }
    for lib in &libs {
        let rel = lib.trim_start_matches('/');
        if let Some(parent) = Path::new(rel).parent().and_then(Path::to_str) {
            mkdirs(&mut cpio, parent)?;
        }
        cpio.file(
            rel,
            0o755,
            &std::fs::read(lib).with_context(|| format!("reading {lib}"))?,
        )?;
    }
    // iscsid asks who is calling (getpwuid) and refuses an unknown uid 0.
    cpio.file("etc/passwd", 0o644, b"root:x:0:0:root:/:/bin/sh\n")?;
    cpio.file("etc/group", 0o644, b"root:x:0:\n")?;
    for conf in ["/etc/iscsi/iscsid.conf", "/etc/mke2fs.conf"] {
        if let Ok(data) = std::fs::read(conf) {
            cpio.file(conf.trim_start_matches('/'), 0o644, &data)?;
        }
    }
    let mut load = String::new();
    for (i, m) in module_order(&kernel_root)?.iter().enumerate() {
        cpio.file(&format!("modules/{i:02}.ko"), 0o644, &std::fs::read(m)?)?;
        load.push_str(&format!("insmod /modules/{i:02}.ko || fail insmod-{i}\n"));
    }
    cpio.file("init", 0o755, init.replace("@MODULES@", &load).as_bytes())?;
    let w = cpio.finish()?;
    w.into_inner()
        .map_err(|e| e.into_error())
        .context("writing the initramfs")?
        .sync_all()?;
    Ok(())
}

/// `/init`: network, iscsid, discovery, CHAP login, mkfs + fsck on the LUN, logout.
fn init_script(server: &str, target: &str, initiator: &str, user: &str, secret: &str) -> String {
    format!(
        r#"#!/bin/busybox sh
/bin/busybox --install -s /bin
# Debian's busybox shell prefers its own applets (mke2fs, e2fsck): name the real programs
# by their full paths.
export PATH=/usr/local/sbin:/sbin:/bin
fail() {{ cat /tmp/err 2>/dev/null; dmesg | tail -15; echo "ISCSI-LAB step $1: FAILED"; poweroff -f; }}
mount -t proc proc /proc; mount -t sysfs sysfs /sys; mount -t devtmpfs dev /dev
@MODULES@
ip link set lo up; ip link set eth0 up || fail link
ip addr add {VM_IP}/24 dev eth0 || fail address
echo "InitiatorName={initiator}" > /etc/iscsi/initiatorname.iscsi
iscsid 2>/tmp/err || fail iscsid
P={server}:3260
T={target}
iscsiadm -m discovery -t sendtargets -p $P > /tmp/found 2>/tmp/err || fail discovery
echo "ISCSI-LAB discovered $(cat /tmp/found)"
upd() {{ iscsiadm -m node -T $T -p $P -o update -n "$1" -v "$2" || fail "update-$1"; }}
upd node.session.auth.authmethod CHAP
upd node.session.auth.username {user}
upd node.session.auth.password {secret}
iscsiadm -m node -T $T -p $P --login 2>/tmp/err || fail login
n=0; while [ ! -b /dev/sda ]; do n=$((n+1)); [ $n -gt 300 ] && fail no-disk; sleep 0.1; done
echo "ISCSI-LAB disk $(cat /sys/block/sda/size) sectors"
/usr/local/sbin/mke2fs -q -F -t ext4 -L iscsilab /dev/sda || fail mkfs
sync
/usr/local/sbin/e2fsck -f -n /dev/sda || fail fsck
echo "ISCSI-LAB fsck ok"
iscsiadm -m node -T $T -p $P --logout || fail logout
echo "ISCSI-LAB logout ok"
poweroff -f
"#
    )
}

fn field(text: &str, key: &str) -> Result<String> {
    text.lines()
        .find_map(|l| l.strip_prefix(key)?.strip_prefix('='))
        .map(str::to_owned)
        .with_context(|| format!("no {key} in {text}"))
}

#[test]
fn open_iscsi_discovers_logs_in_makes_and_checks_a_filesystem() -> Result<()> {
    tools::require_root()?;
    let mut lab = Lab::new(LabConfig::default())?;
    let server_ip = lab.config().server_ip;
    let mut strata = Strata::new(Strata::locate_binary()?);
    strata.config = StrataConfig::Template(format!(
        "{LAB_CONFIG_TEMPLATE}\n[iscsi]\nenabled = true\nlisten = \"{{{{server_ip}}}}:3260\"\n"
    ));
    strata.ready.push("iSCSI on".into());
    let bin = strata.binary.clone();
    lab.start_server(&strata)?;
    // The template's `{{data_dir}}`: `<server dir>/data`, the first server of this lab.
    let data_dir = lab.dir().join("servers/strata-0/data");

    // The node becomes known the way a booting node does, by asking for its manifest.
    let addr = std::net::SocketAddr::from((server_ip, 8080));
    lab.http_get(addr, &format!("/api/v1/nodes/by-mac/{MAC}/manifest"))?;
    let creds = run(Command::new(&bin)
        .args(["iscsi", "node", "--mac", MAC, "--data-dir"])
        .arg(&data_dir))?;
    let (target, initiator) = (field(&creds, "target")?, field(&creds, "initiator")?);
    let (user, secret) = (field(&creds, "chap_user")?, field(&creds, "chap_secret")?);
    let store_layers = data_dir.join("store/layers");
    let hashes_before = layer_hashes(&store_layers)?;

    let initrd = lab.dir().join("iscsi-initrd.cpio");
    write_initramfs(
        &initrd,
        &init_script(&server_ip.to_string(), &target, &initiator, &user, &secret),
    )?;
    let mut cfg = VmConfig::new("initiator", Firmware::Bios)
        .mac(MAC)
        .memory_mib(384);
    cfg.no_reboot = true;
    // The step's name comes first, so it is in the log when the wait fails.
    cfg.fail_markers.push(": FAILED".into());
    cfg.extra_args = vec![
        "-kernel".into(),
        fixture::debian_kernel()?.display().to_string(),
        "-initrd".into(),
        initrd.display().to_string(),
        "-append".into(),
        fixture::TEST_CMDLINE.into(),
    ];
    let mut vm = lab.start_vm(cfg)?;
    let found = vm.wait_for_line("ISCSI-LAB discovered", BOOT)?;
    ensure!(
        found.contains(&target),
        "discovery did not list the node's target: {found}"
    );
    vm.wait_for_serial("ISCSI-LAB disk", BOOT)?;
    vm.wait_for_serial("ISCSI-LAB fsck ok", BOOT)?;
    vm.wait_for_serial("ISCSI-LAB logout ok", BOOT)?;
    vm.wait_exit(BOOT)?;

    // The file system the VM made is on the node's LUN: read it back through libiscsi.
    let raw = lab.dir().join("lun.raw");
    let opts = format!(
        "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal={server_ip}:3260,file.target={target},\
         file.lun=0,file.initiator-name={initiator},file.user={user},file.password-secret=sec0"
    );
    run(lab
        .command("qemu-img")
        .args([
            "convert",
            "--object",
            &format!("secret,id=sec0,data={secret}"),
            "--image-opts",
            &opts,
            "-O",
            "raw",
        ])
        .arg(&raw))?;
    run(Command::new("e2fsck").args(["-f", "-n"]).arg(&raw))?;
    let head = run(Command::new("dumpe2fs").arg("-h").arg(&raw))?;
    ensure!(
        head.lines()
            .any(|l| l.starts_with("Filesystem volume name:") && l.ends_with("iscsilab")),
        "{head}"
    );
    std::fs::remove_file(&raw)?;
    unchanged(&store_layers, &hashes_before)?;
    Ok(())
}

/// Every layer hashed in `before` still has its hash (new layers may have been published).
fn unchanged(dir: &Path, before: &[(String, Vec<u8>)]) -> Result<()> {
    let after = layer_hashes(dir)?;
    for b in before {
        ensure!(after.contains(b), "image store layer {} changed", b.0);
    }
    Ok(())
}

fn layer_hashes(dir: &Path) -> Result<Vec<(String, Vec<u8>)>> {
    let mut out = Vec::new();
    for e in std::fs::read_dir(dir)? {
        let p = e?.path();
        let sum = run(Command::new("b2sum").arg(&p))?;
        out.push((p.display().to_string(), sum.into_bytes()));
    }
    out.sort();
    Ok(out)
}

/// The node-init initramfs: `$STRATA_NODE_INITRAMFS`, else the one scripts/build-initramfs.sh
/// writes into the Strata cache (scripts/test.sh builds it).
fn node_initramfs() -> Result<PathBuf> {
    let path = match std::env::var_os("STRATA_NODE_INITRAMFS") {
        Some(p) => PathBuf::from(p),
        None => fixture::cache_dir().join("initramfs/node-init.cpio.gz"),
    };
    ensure!(
        path.is_file(),
        "{} missing: run scripts/build-initramfs.sh",
        path.display()
    );
    // An initramfs built before diskless iSCSI boot lacks iscsistart: say so, not "attach failed".
    let listing = run(Command::new("sh")
        .arg("-c")
        .arg("gzip -dc \"$1\" | cpio -t --quiet")
        .arg("sh")
        .arg(&path))?;
    ensure!(
        listing.lines().any(|l| l == "sbin/iscsistart"),
        "{} has no sbin/iscsistart: rebuild it with scripts/build-initramfs.sh (open-iscsi installed)",
        path.display()
    );
    Ok(path)
}

/// The whole diskless path: the VM PXE boots from `strata serve` (QEMU's iPXE ROM), whose
/// boot script for a node configured `diskless` carries `strata.iscsi` and the node's CHAP
/// secret; node-init logs in with iscsistart, mounts the LUN and switch_roots into the image,
/// which runs from the node's own writable layer on the server.
#[test]
fn node_init_boots_a_diskless_vm_over_iscsi_to_the_image() -> Result<()> {
    tools::require_root()?;
    const NODE: &str = "52:54:00:42:15:02";
    // IPv6 on the bridge: Strata's router advertisement ends iPXE's IPv6 wait.
    let mut lab = Lab::new(LabConfig {
        ipv6: true,
        ..LabConfig::default()
    })?;
    let mut strata = Strata::new(Strata::locate_binary()?);
    strata.config = StrataConfig::Template(format!(
        "{LAB_CONFIG_TEMPLATE}\n[iscsi]\nenabled = true\nlisten = \"{{{{server_ip}}}}:3260\"\n\
         [[iscsi.nodes]]\nmac = \"{NODE}\"\ndiskless = true\n"
    ));
    strata.boot = Some(strata_lab::BootFiles {
        kernel: fixture::debian_kernel()?,
        initrd: node_initramfs()?,
        cmdline: "no_timer_check".into(),
    });
    strata.ready.push("iSCSI on".into());
    if let Ok(v) = std::env::var("STRATA_ISCSI_LOG") {
        strata.env.push(("RUST_LOG".into(), v));
    }
    lab.start_server(&strata)?;
    let data_dir = lab.dir().join("servers/strata-0/data");
    let store_layers = data_dir.join("store/layers");
    let hashes_before = layer_hashes(&store_layers)?;

    let mut cfg = VmConfig::new("diskless", Firmware::Bios)
        .mac(NODE)
        .memory_mib(512);
    cfg.no_reboot = true;
    cfg.fail_markers = vec![
        "STRATA panic".into(),
        "Kernel panic".into(),
        "STRATA error=".into(),
    ];
    let mut vm = lab.start_vm(cfg)?;
    vm.wait_for_serial("STRATA stage=manifest", BOOT)?;
    let attach = vm.wait_for_line("STRATA stage=attach", BOOT)?;
    ensure!(
        attach.contains("via=iscsi") && attach.contains("device=/dev/sd"),
        "{attach}"
    );
    vm.wait_for_serial("STRATA stage=switch_root", BOOT)?;
    vm.wait_for_serial(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    let serial = std::fs::read_to_string(vm.serial_path())?;
    ensure!(
        !serial.contains("STRATA stage=fetch"),
        "a diskless iSCSI boot downloaded layers:\n{serial}"
    );
    vm.stop();

    // The image ran from the node's own writable layer on the server; the store is untouched.
    let own = data_dir.join(format!("iscsi/nodes/{}", NODE.replace(':', "")));
    ensure!(
        std::fs::read_dir(&own).map(|d| d.count()).unwrap_or(0) == 1,
        "no writable layer in {}",
        own.display()
    );
    unchanged(&store_layers, &hashes_before)?;
    Ok(())
}

/// The marker the sanboot image's own initramfs prints.
const SANBOOT_MARKER: &str = "STRATA image=extlinux-disk stage=running";

/// Unmounts on drop, so a failed step never leaves a loop mount behind.
struct Mounted(PathBuf);

impl Drop for Mounted {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

/// A raw disk that carries its own bootloader: one whole-disk ext4 file system with extlinux
/// in its boot sector (sector 0), Debian's kernel and an initramfs printing
/// [`SANBOOT_MARKER`].
fn bootable_disk(dir: &Path) -> Result<PathBuf> {
    tools::require(&["extlinux", "mkfs.ext4", "mount", "umount"], &[])
        .context("extlinux is needed: apt-get install extlinux (scripts/setup.sh)")?;
    let disk = dir.join("disk.raw");
    std::fs::File::create(&disk)?.set_len(64 << 20)?;
    // extlinux reads neither 64-bit block numbers nor metadata checksums.
    run(Command::new("mkfs.ext4")
        .args([
            "-q",
            "-F",
            "-O",
            "^64bit,^metadata_csum",
            "-L",
            "strataboot",
        ])
        .arg(&disk))?;
    let mnt = dir.join("mnt");
    std::fs::create_dir_all(&mnt)?;
    run(Command::new("mount")
        .arg("-o")
        .arg("loop")
        .arg(&disk)
        .arg(&mnt))?;
    let mounted = Mounted(mnt.clone());
    let boot = mnt.join("boot/extlinux");
    std::fs::create_dir_all(&boot)?;
    std::fs::copy(fixture::debian_kernel()?, mnt.join("boot/vmlinuz"))?;
    fixture::write_marker_initramfs(
        &mnt.join("boot/initrd.img"),
        &format!("echo '{SANBOOT_MARKER}'"),
    )?;
    std::fs::write(
        boot.join("extlinux.conf"),
        format!(
            "DEFAULT linux\nSERIAL 0 115200\nPROMPT 0\nTIMEOUT 0\nLABEL linux\n  KERNEL /boot/vmlinuz\n  \
             INITRD /boot/initrd.img\n  APPEND {}\n",
            fixture::TEST_CMDLINE
        ),
    )?;
    run(Command::new("extlinux").arg("--install").arg(&boot))?;
    drop(mounted);
    Ok(disk)
}

/// iPXE `sanboot` of an image that carries its own bootloader: a base VHDX made from a raw
/// disk with extlinux, a node layer on it, served by `strata iscsi serve` in the lab; the
/// lab's DHCP server (dnsmasq) hands out only a root path `iscsi:...`, so QEMU's iPXE ROM
/// sanboots the LUN, the BIOS runs extlinux from it through iPXE's INT 13h, and the image's
/// kernel and initramfs print its marker. The base layer is unchanged afterwards.
#[test]
fn ipxe_sanboots_an_image_with_its_own_bootloader() -> Result<()> {
    tools::require_root()?;
    const IQN: &str = "iqn.2026-11.io.strata:node.sanboot";
    let mut lab = Lab::new(LabConfig {
        ipv6: true,
        ..LabConfig::default()
    })?;
    let server_ip = lab.config().server_ip;
    let bin = Strata::locate_binary()?;
    let dir = lab.dir().join("sanboot-disk");
    std::fs::create_dir_all(&dir)?;
    let disk = bootable_disk(&dir)?;
    let (base, node) = (dir.join("base.vhdx"), dir.join("node.vhdx"));
    run(Command::new(&bin)
        .args(["vhdx", "from-raw", "--block-size", "1M"])
        .arg(&disk)
        .arg(&base))?;
    run(Command::new(&bin)
        .args(["vhdx", "from-raw", "--parent"])
        .arg(&base)
        .arg(&disk)
        .arg(&node))?;
    std::fs::remove_file(&disk)?;
    let base_hash = run(Command::new("b2sum").arg(&base))?;

    let mut cmd = lab.command(&bin.to_string_lossy());
    cmd.args([
        "iscsi",
        "serve",
        "--listen",
        &format!("{server_ip}:3260"),
        "--lun",
    ])
    .arg(format!("{IQN}={},{}", base.display(), node.display()));
    let (mut target, log) =
        strata_lab::process::Proc::spawn_logged("iscsi", cmd, &dir.join("iscsi.log"), None)?;
    log.expect(0, "listening on", &[], Duration::from_secs(30))?;

    let mut dhcp = strata_lab::Dnsmasq::site_dhcp();
    dhcp.router_advert = true;
    dhcp.extra_args = vec![format!("--dhcp-option=17,iscsi:{server_ip}::::{IQN}")];
    lab.start_server(&dhcp)?;
    let mut cfg = VmConfig::new("sanboot", Firmware::Bios).memory_mib(256);
    cfg.no_reboot = true;
    let mut vm = lab.start_vm(cfg)?;
    vm.wait_for_serial(SANBOOT_MARKER, BOOT)?;
    let serial = std::fs::read_to_string(vm.serial_path())?;
    vm.stop();
    // The bootloader that ran is the LUN's own (SeaBIOS mirrors iPXE and extlinux to ttyS0).
    ensure!(
        serial.contains("SYSLINUX"),
        "extlinux did not run from the LUN:\n{serial}"
    );
    target.stop();
    ensure!(
        run(Command::new("b2sum").arg(&base))? == base_hash,
        "the base layer changed"
    );
    Ok(())
}

/// `sanboot` through `strata serve`: an image built from a raw disk that carries extlinux
/// (`source = "disk"`), a role on it, a node assigned that role and configured `sanboot`.
/// The node PXE boots, its iPXE script sanboots its own target (CHAP with its own secret),
/// whose LUN is its manifest's chain (base, role and node layer from the store, its writable
/// layer on top), and the image's own bootloader, kernel and initramfs print its marker.
#[test]
fn strata_serve_sanboots_a_node_whose_image_carries_its_bootloader() -> Result<()> {
    tools::require_root()?;
    const NODE: &str = "52:54:00:42:15:03";
    let mut lab = Lab::new(LabConfig {
        ipv6: true,
        ..LabConfig::default()
    })?;
    let server_ip = lab.config().server_ip;
    let bin = Strata::locate_binary()?;
    let dir = lab.dir().join("bootdisk");
    std::fs::create_dir_all(dir.join("images/bootdisk"))?;
    std::fs::create_dir_all(dir.join("images/roles/boot"))?;
    let disk = bootable_disk(&dir)?;
    let kernel_root = fixture::debian_kernel()?
        .parent()
        .and_then(Path::parent)
        .context("kernel tree")?
        .to_path_buf();
    std::fs::write(
        dir.join("images/bootdisk/recipe.toml"),
        format!(
            "[image]\nname = \"bootdisk\"\n[base]\nsource = \"disk\"\npath = {:?}\n[kernel]\ndir = {:?}\nmodules = []\n",
            disk.display().to_string(),
            kernel_root.display().to_string()
        ),
    )?;
    std::fs::write(
        dir.join("images/roles/boot/recipe.toml"),
        "[role]\nname = \"boot\"\nimage = \"bootdisk\"\ndescription = \"a disk with its own bootloader\"\n",
    )?;
    let mut strata = Strata::new(bin.clone());
    strata.config = StrataConfig::Template(format!(
        "{LAB_CONFIG_TEMPLATE}\n[iscsi]\nenabled = true\nlisten = \"{{{{server_ip}}}}:3260\"\n\
         [[iscsi.nodes]]\nmac = \"{NODE}\"\nsanboot = true\n"
    ));
    strata.ready.push("iSCSI on".into());
    lab.start_server(&strata)?;
    let data_dir = lab.dir().join("servers/strata-0/data");
    run(Command::new(&bin)
        .args(["image", "build", "--store"])
        .arg(data_dir.join("store"))
        .arg(dir.join("images/bootdisk")))?;
    std::fs::remove_file(&disk)?;
    let url = format!("http://{server_ip}:8080");
    lab.http_get(
        std::net::SocketAddr::from((server_ip, 8080)),
        &format!("/boot/node.ipxe?mac={NODE}"),
    )?;
    let token = std::fs::read_to_string(data_dir.join("admin.token"))?;
    run(lab.command(&bin.to_string_lossy()).args([
        "nodes",
        "set",
        NODE,
        "--role",
        "boot",
        "--url",
        &url,
        "--token",
        token.trim(),
    ]))?;
    let store_layers = data_dir.join("store/layers");
    let hashes_before = layer_hashes(&store_layers)?;

    let mut cfg = VmConfig::new("sanbooted", Firmware::Bios)
        .mac(NODE)
        .memory_mib(256);
    cfg.no_reboot = true;
    let mut vm = lab.start_vm(cfg)?;
    vm.wait_for_serial(SANBOOT_MARKER, BOOT)?;
    let serial = std::fs::read_to_string(vm.serial_path())?;
    vm.stop();
    ensure!(
        serial.contains("sanboot iqn.2026-11.io.strata:node.525400421503"),
        "{serial}"
    );
    ensure!(
        serial.contains("SYSLINUX"),
        "extlinux did not run from the LUN:\n{serial}"
    );
    unchanged(&store_layers, &hashes_before)?;
    Ok(())
}
