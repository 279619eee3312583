//! Boot benchmark of node-init against `strata serve` in the lab, with dnsmasq as the peer.
//!
//! For each run, QEMU start (TCG, BIOS, QEMU's iPXE ROM, 512 MiB) to a serial marker:
//!
//! - `dnsmasq`: a plain PXE boot of the same kernel and node-init initramfs, served by
//!   dnsmasq (DHCP) and busybox httpd, with router advertisements as Strata sends them, to
//!   node-init's first marker `STRATA stage=init`;
//! - `strata init`: the same marker when `strata serve` is the PXE server (first boot);
//! - `first`: a blank cache disk, to the image's `stage=running` marker (3 layers fetched);
//! - `cached`: the same disk again, nothing to fetch;
//! - `activate`: v2 (built by `strata image build` and staged by the agent while v1 ran) on
//!   its first boot;
//! - `rollback`: the operator pins v1 again: its first boot.
//!
//! It also prints what verifying the chain before boot costs (`stage=verify ... ms=`) against
//! the cached boot's time. Run as root (network namespaces):
//!
//! ```text
//! cargo build -p strata-server --bin strata
//! cargo run -p qemu-tests --example node_boot_bench -- [runs]
//! ```
//!
//! `STRATA_BIN` names the strata binary (default: next to this example's target dir),
//! `STRATA_INITRAMFS` the node-init initramfs (default: scripts/build-initramfs.sh's output).

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use strata_lab::server::LAB_CONFIG_TEMPLATE;
use strata_lab::{
    fixture, process::run, BootFiles, Disk, Dnsmasq, Firmware, Lab, LabConfig, Strata,
    StrataConfig, TestVm, VmConfig,
};

const T: Duration = Duration::from_secs(300);
const MAC: &str = "52:54:00:42:05:02";

fn strata_bin() -> Result<PathBuf> {
    if let Some(p) = std::env::var_os("STRATA_BIN") {
        return Ok(PathBuf::from(p));
    }
    let exe = std::env::current_exe()?;
    // target/<profile>/examples/node_boot_bench → target/<profile>/strata
    let p = exe
        .parent()
        .and_then(Path::parent)
        .map(|d| d.join("strata"))
        .context("no target dir")?;
    ensure!(
        p.is_file(),
        "{} not built: cargo build -p strata-server --bin strata, or set STRATA_BIN",
        p.display()
    );
    Ok(p)
}

fn initramfs() -> PathBuf {
    std::env::var_os("STRATA_INITRAMFS")
        .map(PathBuf::from)
        .unwrap_or_else(|| fixture::cache_dir().join("initramfs/node-init.cpio.gz"))
}

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn vm_config(name: &str, disk: &Path) -> VmConfig {
    let mut cfg = VmConfig::new(name, Firmware::Bios);
    cfg.memory_mib = 512;
    cfg.mac = Some(MAC.into());
    cfg.disk = Some(Disk {
        path: disk.to_owned(),
        format: "raw".into(),
    });
    cfg.no_reboot = true;
    cfg.fail_markers = vec!["STRATA panic".into(), "Kernel panic".into()];
    cfg
}

fn secs(d: Duration) -> f64 {
    d.as_secs_f64()
}

/// dnsmasq's plain PXE boot of the same kernel and initramfs, to node-init's first marker.
fn dnsmasq_boot() -> Result<f64> {
    let mut lab = Lab::new(LabConfig {
        ipv6: true,
        ..LabConfig::default()
    })?;
    let files = BootFiles {
        kernel: fixture::debian_kernel()?,
        initrd: initramfs(),
        cmdline: "console=ttyS0 panic=10 no_timer_check".into(),
    };
    let mut d = Dnsmasq::pxe(files);
    d.router_advert = true;
    lab.start_server(&d)?;
    let disk = lab.dir().join("d.raw");
    fixture::create_disk(&disk, "raw", "64M")?;
    let mut vm = lab.start_vm(vm_config("dnsmasq", &disk))?;
    Ok(secs(vm.wait_for_serial("STRATA stage=init", T)?))
}

struct Run {
    dnsmasq: f64,
    strata_init: f64,
    first: f64,
    cached: f64,
    activate: f64,
    rollback: f64,
    verify_ms: f64,
}

fn cli(lab: &Lab, bin: &Path, data: &Path, args: &[&str]) -> Result<String> {
    let token = std::fs::read_to_string(data.join("admin.token"))?;
    let mut cmd = lab.command(&bin.to_string_lossy());
    cmd.args(args)
        .env(
            "STRATA_URL",
            format!("http://{}:8080", lab.config().server_ip),
        )
        .env("STRATA_TOKEN", token.trim());
    run(&mut cmd)
}

/// Boots a fresh QEMU on `disk` to the running marker of `version`, then waits for the
/// agent's confirmation and pulls the plug. Returns the time to the marker and the verify ms.
fn boot_to(lab: &mut Lab, name: &str, disk: &Path, version: u64) -> Result<(f64, f64, TestVm)> {
    let mut vm = lab.start_vm(vm_config(name, disk))?;
    let v = vm.wait_for_line("STRATA stage=verify", T)?;
    let ms: f64 = field(&v, "ms")
        .and_then(|m| m.parse().ok())
        .with_context(|| v.clone())?;
    let t = vm.wait_for_serial(
        &format!("STRATA image=busybox role=web version={version} stage=running"),
        T,
    )?;
    vm.wait_for_serial(&format!("STRATA agent=confirmed version={version}"), T)?;
    Ok((secs(t), ms, vm))
}

fn strata_runs(bin: &Path) -> Result<Run> {
    let mut lab = Lab::new(LabConfig {
        ipv6: true,
        ..LabConfig::default()
    })?;
    let data = lab.dir().join("strata-data");
    let mut s = Strata::new(bin);
    s.data_dir = Some(data.clone());
    s.ready_timeout = Duration::from_secs(120);
    let boot = format!(
        "\n[boot]\ncmdline = \"no_timer_check strata.agent=2\"\ninitramfs = {:?}\n",
        initramfs().display().to_string()
    );
    s.config = StrataConfig::Template(LAB_CONFIG_TEMPLATE.replace("{{boot}}", &boot));
    lab.start_server(&s)?;
    let disk = lab.dir().join("node.raw");
    fixture::create_disk(&disk, "raw", "256M")?;

    // First boot (and the PXE part alone, to compare with dnsmasq).
    let mut vm = lab.start_vm(vm_config("first", &disk))?;
    let strata_init = secs(vm.wait_for_serial("STRATA stage=init", T)?);
    let first =
        secs(vm.wait_for_serial("STRATA image=busybox role=web version=1 stage=running", T)?);
    vm.wait_for_serial("STRATA agent=confirmed version=1", T)?;
    // v2, built while v1 runs, staged by the agent.
    let images = lab.dir().join("images-v2");
    run(Command::new("cp")
        .arg("-a")
        .arg(Path::new(env!("CARGO_MANIFEST_DIR")).join("../images"))
        .arg(&images))?;
    let recipe = images.join("roles/web/recipe.toml");
    let text = std::fs::read_to_string(&recipe)?;
    std::fs::write(
        &recipe,
        text.replacen("Hello from a Strata web node", "Hello from version 2", 1),
    )?;
    run(Command::new(bin)
        .args(["image", "build", "--json", "--store"])
        .arg(data.join("store"))
        .arg(images.join("busybox"))
        .arg("--roles")
        .arg(images.join("roles")))?;
    vm.wait_for_serial("STRATA agent=staged version=2", T)?;
    vm.stop();
    drop(vm);

    let (activate, _, mut vm) = boot_to(&mut lab, "activate", &disk, 2)?;
    vm.stop();
    drop(vm);
    let (cached, verify_ms, mut vm) = boot_to(&mut lab, "cached", &disk, 2)?;
    vm.stop();
    drop(vm);
    cli(
        &lab,
        bin,
        &data,
        &["nodes", "set", MAC, "--pin", "busybox@1"],
    )?;
    let (rollback, _, mut vm) = boot_to(&mut lab, "rollback", &disk, 1)?;
    vm.stop();
    Ok(Run {
        dnsmasq: 0.0,
        strata_init,
        first,
        cached,
        activate,
        rollback,
        verify_ms,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    match v.len() {
        0 => 0.0,
        n if n % 2 == 1 => v[n / 2],
        n => (v[n / 2 - 1] + v[n / 2]) / 2.0,
    }
}

fn main() -> Result<()> {
    let runs: usize = std::env::args()
        .nth(1)
        .map(|a| a.parse())
        .transpose()
        .context("runs: a number")?
        .unwrap_or(3);
    if runs == 0 {
        bail!("runs must be at least 1");
    }
    let bin = strata_bin()?;
    let mut all = Vec::new();
    for i in 0..runs {
        // dnsmasq first, then Strata, in every run: a load change falls on both alike.
        let dnsmasq = dnsmasq_boot().with_context(|| format!("dnsmasq, run {}", i + 1))?;
        let mut r = strata_runs(&bin).with_context(|| format!("strata, run {}", i + 1))?;
        r.dnsmasq = dnsmasq;
        eprintln!(
            "run {}: dnsmasq {:.2} s, strata init {:.2} s, first {:.2} s, cached {:.2} s, activate {:.2} s, rollback {:.2} s, verify {:.0} ms",
            i + 1, r.dnsmasq, r.strata_init, r.first, r.cached, r.activate, r.rollback, r.verify_ms
        );
        all.push(r);
    }
    let col = |f: fn(&Run) -> f64| median(all.iter().map(f).collect());
    let base = col(|r| r.dnsmasq);
    println!(
        "node boot, QEMU start to marker (TCG, BIOS, iPXE ROM, 512 MiB), median of {runs} runs"
    );
    println!("{:<50} {:>8} {:>12}", "boot", "median", "vs dnsmasq");
    type Column = (&'static str, fn(&Run) -> f64);
    let rows: [Column; 6] = [
        ("dnsmasq PXE, same kernel+initramfs → stage=init", |r| {
            r.dnsmasq
        }),
        ("strata PXE → stage=init", |r| r.strata_init),
        ("first boot (3 layers fetched) → running", |r| r.first),
        ("activation of a staged v2 → running", |r| r.activate),
        ("cached boot → running", |r| r.cached),
        ("rollback to v1 → running", |r| r.rollback),
    ];
    for (name, f) in rows {
        let m = col(f);
        println!("{name:<50} {m:>7.2}s {:>11.2}x", m / base);
    }
    let v = col(|r| r.verify_ms);
    println!(
        "verify before boot (24 MiB chain): {v:.0} ms, {:.1}% of a cached boot",
        v / 10.0 / col(|r| r.cached)
    );
    Ok(())
}
