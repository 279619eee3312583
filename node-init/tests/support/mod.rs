//! Shared fixtures for node-init's tests: a busybox test image as a VHDX chain (base + role
//! layer per version), a fixture HTTP server speaking the server's node endpoints (manifest by
//! MAC, layers with Range, reports) with fault injection, the server-key cpio, and a QEMU
//! runner that waits on serial markers.
#![allow(dead_code)]

pub mod server;

use std::collections::VecDeque;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc::{self, Receiver, RecvTimeoutError};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use anyhow::{bail, ensure, Context, Result};
use ed25519_dalek::SigningKey;
use wire::chunk::{chunk_hashes, CHUNK_SIZE};
use wire::manifest::{LayerKind, LayerRef, Manifest};

pub const MAC: &str = "52:54:00:12:34:56";

/// Tool or fail with an install hint.
pub fn need(tool: &str, package: &str) -> Result<()> {
    let found = Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()?
        .success();
    ensure!(
        found,
        "{tool} not found: apt-get install {package} (or run scripts/setup.sh)"
    );
    Ok(())
}

fn run(cmd: &mut Command) -> Result<()> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    ensure!(
        out.status.success(),
        "{cmd:?} failed: {}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// The image's init: prints the image marker, optionally confirms health and stages the
/// next version with the agent node-init left in /run/strata, then powers off.
const INIT: &str = r#"#!/bin/busybox sh
export PATH=/bin
role=$(busybox cat /etc/strata-role 2>/dev/null || echo none)
version=$(busybox cat /etc/strata-version 2>/dev/null || echo 0)
echo "STRATA image=busybox role=$role version=$version stage=running"
if [ -e /etc/strata-confirm ]; then /run/strata/node-init agent confirm; fi
/run/strata/node-init agent stage
busybox sync
echo "STRATA image=busybox stage=poweroff"
busybox poweroff -f
"#;

/// A built test image: raw ext4 base and VHDX layers.
pub struct ImageSet {
    pub dir: PathBuf,
    pub base_raw: PathBuf,
    pub base_vhdx: PathBuf,
}

impl ImageSet {
    /// Builds the busybox base (16 MiB ext4 as a dynamic VHDX with 1 MiB blocks).
    pub fn new(dir: &Path) -> Result<Self> {
        need("mke2fs", "e2fsprogs")?;
        need("debugfs", "e2fsprogs")?;
        let busybox = Path::new("/bin/busybox");
        ensure!(
            busybox.exists(),
            "/bin/busybox missing: apt-get install busybox-static"
        );
        let root = dir.join("rootfs");
        for d in ["bin", "sbin", "etc", "proc", "sys", "dev", "run", "tmp"] {
            std::fs::create_dir_all(root.join(d))?;
        }
        std::fs::copy(busybox, root.join("bin/busybox"))?;
        std::fs::write(root.join("sbin/init"), INIT)?;
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(
            root.join("sbin/init"),
            std::fs::Permissions::from_mode(0o755),
        )?;
        let base_raw = dir.join("base.raw");
        run(Command::new("mke2fs")
            .args([
                "-q", "-F", "-t", "ext4", "-b", "4096", "-L", "busybox", "-d",
            ])
            .arg(&root)
            .arg(&base_raw)
            .arg("16M"))?;
        let base_vhdx = dir.join("base.vhdx");
        vhdx::from_raw(&base_raw, &base_vhdx, None, &opts())?;
        Ok(Self {
            dir: dir.to_owned(),
            base_raw,
            base_vhdx,
        })
    }

    /// A role layer (differencing VHDX on the base) writing /etc/strata-role, -version and,
    /// if `confirm`, /etc/strata-confirm.
    pub fn role_layer(&self, role: &str, version: u64, confirm: bool) -> Result<PathBuf> {
        let name = format!(
            "{role}-v{version}{}",
            if confirm { "" } else { "-noconfirm" }
        );
        let raw = self.dir.join(format!("{name}.raw"));
        std::fs::copy(&self.base_raw, &raw)?;
        let files = self.dir.join(format!("{name}.files"));
        std::fs::create_dir_all(&files)?;
        std::fs::write(files.join("role"), role)?;
        std::fs::write(files.join("version"), version.to_string())?;
        let mut cmds = format!(
            "cd /etc\nwrite {} strata-role\nwrite {} strata-version\n",
            files.join("role").display(),
            files.join("version").display()
        );
        if confirm {
            std::fs::write(files.join("confirm"), "yes")?;
            cmds.push_str(&format!(
                "write {} strata-confirm\n",
                files.join("confirm").display()
            ));
        }
        let script = self.dir.join(format!("{name}.debugfs"));
        std::fs::write(&script, cmds)?;
        run(Command::new("debugfs")
            .arg("-w")
            .arg("-f")
            .arg(&script)
            .arg(&raw))?;
        let out = self.dir.join(format!("{name}.vhdx"));
        let parent = vhdx::Chain::from_paths(std::slice::from_ref(&self.base_vhdx))?;
        vhdx::from_raw(&raw, &out, Some(&parent), &opts())?;
        Ok(out)
    }
}

fn opts() -> vhdx::CreateOptions {
    vhdx::CreateOptions {
        block_size: 1 << 20,
        ..vhdx::CreateOptions::default()
    }
}

/// A layer reference for `path` as the server would publish it.
pub fn layer_ref(path: &Path, kind: LayerKind) -> Result<(LayerRef, Vec<u8>)> {
    let bytes = std::fs::read(path)?;
    let (id, size, chunks) = chunk_hashes(&bytes[..], CHUNK_SIZE)?;
    Ok((
        LayerRef {
            id,
            size,
            kind,
            chunk_size: CHUNK_SIZE,
            chunks,
            url: format!("/layers/{id}"),
        },
        bytes,
    ))
}

/// A manifest for base + role layer.
pub fn manifest(role: &str, version: u64, tries: u32, layers: Vec<LayerRef>) -> Manifest {
    Manifest {
        node: "node-1".into(),
        mac: MAC.into(),
        role: role.into(),
        image: "busybox".into(),
        version,
        issued_at: 1_700_000_000 + version,
        boot_tries: tries,
        layers,
        multicast: Vec::new(),
    }
}

/// One newc archive holding /etc/strata/server.pub (what the server appends).
pub fn key_cpio(key: &SigningKey) -> Vec<u8> {
    let hexkey = format!("{}\n", hex::encode(key.verifying_key().as_bytes()));
    let entries: [(&str, u32, &[u8]); 3] = [
        ("etc", 0o040755, b""),
        ("etc/strata", 0o040755, b""),
        ("etc/strata/server.pub", 0o100644, hexkey.as_bytes()),
    ];
    let mut out = Vec::new();
    let mut ino = 1u32;
    let mut push = |out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            0, 0, 1, 0, data.len(), 0, 0, 0, 0, name.len() + 1, 0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        while out.len() & 3 != 0 {
            out.push(0);
        }
        out.extend_from_slice(data);
        while out.len() & 3 != 0 {
            out.push(0);
        }
        ino += 1;
    };
    for (n, m, d) in entries {
        push(&mut out, n, m, d);
    }
    push(&mut out, "TRAILER!!!", 0, b"");
    out
}

/// Builds the initramfs once per test process (scripts/build-initramfs.sh) and appends the
/// key archive; returns the path of the result.
pub fn initramfs(dir: &Path, key: &SigningKey) -> Result<PathBuf> {
    static BASE: Mutex<Option<PathBuf>> = Mutex::new(None);
    let base = {
        let mut g = BASE.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        if g.is_none() {
            need("cpio", "cpio")?;
            need("depmod", "kmod")?;
            let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("..");
            let out_dir = tempfile::Builder::new()
                .prefix("strata-initramfs")
                .tempdir()?
                .keep();
            let out = out_dir.join("node-init.cpio.gz");
            let o = Command::new("bash")
                .arg(root.join("scripts/build-initramfs.sh"))
                .arg("--out")
                .arg(&out)
                .stderr(Stdio::inherit())
                .output()?;
            ensure!(o.status.success(), "scripts/build-initramfs.sh failed");
            *g = Some(out);
        }
        g.clone().unwrap_or_default()
    };
    let mut bytes = std::fs::read(&base)?;
    while bytes.len() % 512 != 0 {
        bytes.push(0);
    }
    bytes.extend_from_slice(&key_cpio(key));
    let out = dir.join("initramfs.img");
    std::fs::write(&out, bytes)?;
    Ok(out)
}

/// The Debian kernel unpacked by scripts/setup.sh.
pub fn kernel() -> Result<PathBuf> {
    let cache = std::env::var_os("STRATA_CACHE")
        .map(PathBuf::from)
        .unwrap_or_else(|| {
            PathBuf::from(std::env::var_os("HOME").unwrap_or_default()).join(".cache/strata")
        });
    let boot = cache.join("kernel/root/boot");
    let k = std::fs::read_dir(&boot)
        .with_context(|| format!("{}: run scripts/setup.sh", boot.display()))?
        .flatten()
        .map(|e| e.path())
        .find(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        });
    k.with_context(|| format!("no vmlinuz in {}: run scripts/setup.sh", boot.display()))
}

/// A QEMU VM (TCG) booting the kernel + initramfs directly, serial on stdout.
pub struct Vm {
    child: Child,
    lines: Receiver<String>,
    pub log: Arc<Mutex<Vec<String>>>,
    seen: VecDeque<String>,
}

impl Vm {
    pub fn boot(initrd: &Path, disk: &Path, port: u16, extra: &str) -> Result<Vm> {
        Self::boot_cmdline(initrd, disk, &format!("{} {extra}", cmdline(port)))
    }

    /// Direct boot with exactly this kernel command line.
    pub fn boot_cmdline(initrd: &Path, disk: &Path, append: &str) -> Result<Vm> {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.arg("-kernel")
            .arg(kernel()?)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", append]);
        cmd.args(["-netdev", "user,id=n0"]);
        Self::spawn(cmd, disk)
    }

    /// Network boot: QEMU's iPXE ROM gets DHCP and `tftp_dir/boot.ipxe` from QEMU's user
    /// network, the script fetches kernel and initramfs over HTTP.
    pub fn pxe(tftp_dir: &Path, disk: &Path) -> Result<Vm> {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.args([
            "-boot",
            "n",
            "-L",
            "/usr/lib/ipxe/qemu",
            "-L",
            "/usr/share/seabios",
        ]);
        cmd.arg("-netdev").arg(format!(
            "user,id=n0,tftp={},bootfile=boot.ipxe",
            tftp_dir.display()
        ));
        Self::spawn(cmd, disk)
    }

    /// Direct boot with no disk at all (RAM mode).
    pub fn boot_diskless(initrd: &Path, append: &str) -> Result<Vm> {
        let mut cmd = Command::new("qemu-system-x86_64");
        cmd.arg("-kernel")
            .arg(kernel()?)
            .arg("-initrd")
            .arg(initrd)
            .args(["-append", append]);
        cmd.args(["-netdev", "user,id=n0"]);
        Self::spawn_with(cmd, None)
    }

    fn spawn(cmd: Command, disk: &Path) -> Result<Vm> {
        Self::spawn_with(cmd, Some(disk))
    }

    fn spawn_with(mut cmd: Command, disk: Option<&Path>) -> Result<Vm> {
        need("qemu-system-x86_64", "qemu-system-x86")?;
        if let Some(disk) = disk {
            cmd.arg("-drive")
                .arg(format!("file={},if=virtio,format=raw", disk.display()));
        }
        let mut child = cmd
            .args([
                "-accel", "tcg", "-m", "512", "-display", "none", "-monitor", "none",
            ])
            .args(["-serial", "stdio", "-no-reboot"])
            .args(["-device", &format!("virtio-net-pci,netdev=n0,mac={MAC}")])
            .stdin(Stdio::null())
            .stdout(Stdio::piped())
            .stderr(Stdio::inherit())
            .spawn()
            .context("starting qemu-system-x86_64")?;
        let stdout = child.stdout.take().context("qemu stdout")?;
        let (tx, rx) = mpsc::channel();
        let log = Arc::new(Mutex::new(Vec::new()));
        let log2 = log.clone();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines() {
                let Ok(line) = line else { break };
                let line = line.trim_end_matches('\r').to_owned();
                if std::env::var_os("STRATA_SERIAL").is_some() {
                    eprintln!("serial| {line}");
                }
                if let Ok(mut l) = log2.lock() {
                    l.push(line.clone());
                }
                if tx.send(line).is_err() {
                    break;
                }
            }
        });
        Ok(Vm {
            child,
            lines: rx,
            log,
            seen: VecDeque::new(),
        })
    }

    /// Waits for a line starting with `prefix` (any later line: markers are consumed in
    /// order). Fails if QEMU exits first, or after `limit` (a hang guard, not a timing
    /// assertion). Lines passed over are kept for [`Vm::saw`].
    pub fn wait_for(&mut self, prefix: &str, limit: Duration) -> Result<String> {
        let deadline = Instant::now() + limit;
        loop {
            let left = deadline.saturating_duration_since(Instant::now());
            match self.lines.recv_timeout(left) {
                Ok(line) => {
                    self.seen.push_back(line.clone());
                    if line.starts_with(prefix) {
                        return Ok(line);
                    }
                }
                Err(RecvTimeoutError::Disconnected) => {
                    bail!("QEMU exited before {prefix:?}; serial:\n{}", self.tail())
                }
                Err(RecvTimeoutError::Timeout) => {
                    bail!("no {prefix:?} within {limit:?}; serial:\n{}", self.tail())
                }
            }
        }
    }

    /// Waits for QEMU to exit (the image powers off) and returns all serial lines.
    pub fn wait_exit(&mut self, limit: Duration) -> Result<Vec<String>> {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(_status) = self.child.try_wait()? {
                // Drain what is left.
                while let Ok(line) = self.lines.recv_timeout(Duration::from_millis(200)) {
                    self.seen.push_back(line);
                }
                return Ok(self.log.lock().map(|l| l.clone()).unwrap_or_default());
            }
            match self.lines.recv_timeout(Duration::from_millis(100)) {
                Ok(line) => self.seen.push_back(line),
                Err(_) if Instant::now() < deadline => {}
                Err(_) => bail!(
                    "QEMU still running after {limit:?}; serial:\n{}",
                    self.tail()
                ),
            }
        }
    }

    /// Pulls the plug: kills QEMU with no shutdown at all.
    pub fn kill(&mut self) -> Result<()> {
        self.child.kill()?;
        self.child.wait()?;
        Ok(())
    }

    /// All lines so far that start with `prefix`.
    pub fn lines_with(&self, prefix: &str) -> Vec<String> {
        self.log
            .lock()
            .map(|l| {
                l.iter()
                    .filter(|x| x.starts_with(prefix))
                    .cloned()
                    .collect()
            })
            .unwrap_or_default()
    }

    pub fn tail(&self) -> String {
        let l = self.log.lock().map(|l| l.clone()).unwrap_or_default();
        l[l.len().saturating_sub(60)..].join("\n")
    }
}

impl Drop for Vm {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The kernel command line the server's iPXE script would write for this node, plus
/// `no_timer_check` (under TCG on a loaded host the IO-APIC timer check can panic the kernel).
pub fn cmdline(port: u16) -> String {
    format!(
        "console=ttyS0 panic=10 no_timer_check strata.server=http://10.0.2.2:{port} strata.mac={MAC} \
         strata.ip=10.0.2.15 strata.netmask=255.255.255.0 strata.gw=10.0.2.2"
    )
}

/// Value of `key=` in a marker line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key).and_then(|r| r.strip_prefix('=')))
}

/// A blank cache disk.
pub fn blank_disk(path: &Path, size: u64) -> Result<()> {
    std::fs::File::create(path)?.set_len(size)?;
    Ok(())
}
