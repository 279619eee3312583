//! `strata-lab`: the QEMU lab from the command line.
//!
//! - `strata-lab up`: a lab with a boot server and VMs that PXE boot from it, until Ctrl-C.
//! - `strata-lab boot-test`: one VM booting to a serial marker; prints the time.
//! - `strata-lab bench`: QEMU start → marker for each server and firmware, medians and ratios.
//!
//! See docs/lab.md.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::mpsc;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::{Args, Parser, Subcommand, ValueEnum};
use strata_lab::{
    fixture, BootFiles, BootServer, Dnsmasq, Firmware, Lab, LabConfig, NetBoot, Strata,
    StrataConfig, VmConfig,
};

#[derive(Parser, Debug)]
#[command(
    name = "strata-lab",
    version,
    about = "The Strata QEMU lab: a namespace, a boot server and PXE-booting VMs (needs root)"
)]
struct Cli {
    #[command(subcommand)]
    command: Cmd,
}

#[derive(Subcommand, Debug)]
enum Cmd {
    /// Build a lab, start the boot server and VMs, follow their consoles until Ctrl-C.
    Up(UpArgs),
    /// Boot one VM to a serial marker and print the time from QEMU start.
    BootTest(BootTestArgs),
    /// Boot-time benchmark: QEMU start to marker per server and firmware, medians and ratios.
    Bench(BenchArgs),
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum ServerKind {
    /// This workspace's `strata serve` (needs --strata).
    Strata,
    /// dnsmasq (DHCP, TFTP) with busybox httpd.
    Dnsmasq,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Fw {
    Bios,
    Uefi,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, ValueEnum)]
enum Boot {
    /// The NIC's iPXE ROM (BIOS or UEFI).
    IpxeRom,
    /// BIOS: the NIC's PXE ROM chainloads undionly.kpxe over TFTP (dnsmasq only here).
    Undionly,
    /// UEFI: OVMF's own PXE client chainloads snponly.efi over TFTP.
    UefiPxe,
    /// UEFI: OVMF's HTTP boot client loads snponly.efi over HTTP.
    UefiHttp,
}

#[derive(Args, Debug, Clone)]
struct ServerArgs {
    /// The boot server (default: strata when --strata is given, else dnsmasq).
    #[arg(long, value_enum)]
    server: Option<ServerKind>,
    /// Path to the `strata` binary.
    #[arg(long, value_name = "PATH")]
    strata: Option<PathBuf>,
    /// A config file passed to `strata serve --config` as is.
    #[arg(long, value_name = "FILE", conflicts_with = "strata_template")]
    strata_config: Option<PathBuf>,
    /// A config template: {{bridge}} {{server_ip}} {{prefix_len}} {{netmask}} {{range_start}}
    /// {{range_end}} {{dir}} {{data_dir}} {{kernel}} {{initrd}} {{cmdline}} are filled in.
    #[arg(long, value_name = "FILE")]
    strata_template: Option<PathBuf>,
    /// Let `strata serve` boot its own kernel and initramfs (node-init) instead of the
    /// lab's test initramfs (`up` does this unless --kernel/--initrd are given).
    #[arg(long)]
    strata_own_boot: bool,
    /// `strata serve --data-dir`.
    #[arg(long, value_name = "DIR")]
    strata_data_dir: Option<PathBuf>,
    /// A log substring that marks `strata serve` ready (repeatable; default "listening").
    #[arg(long, value_name = "TEXT")]
    strata_ready: Vec<String>,
    /// IPv6 router advertisements (router lifetime 0) from dnsmasq, ending iPXE's IPv6 wait.
    #[arg(long)]
    ra: bool,
    /// An extra dnsmasq argument (repeatable), e.g. `--dnsmasq-arg=--dhcp-option-force=tag:ipxe,175,b0:01:01`.
    #[arg(long, value_name = "ARG", allow_hyphen_values = true)]
    dnsmasq_arg: Vec<String>,
    /// IPv6 on the lab's bridge (implied by --ra; Strata sends its own advertisements).
    #[arg(long)]
    ipv6: bool,
    /// Kernel to boot (default: Debian's, from the cache).
    #[arg(long, value_name = "PATH")]
    kernel: Option<PathBuf>,
    /// Initramfs to boot (default: a test initramfs printing "STRATA lab-init ok").
    #[arg(long, value_name = "PATH")]
    initrd: Option<PathBuf>,
    /// Kernel command line (default: "console=ttyS0 quiet panic=-1 no_timer_check").
    #[arg(long)]
    cmdline: Option<String>,
    /// The lab's directory (logs, VM files); a temporary one when unset.
    #[arg(long, value_name = "DIR")]
    work_dir: Option<PathBuf>,
    /// Extra arguments for `strata serve`.
    #[arg(last = true)]
    strata_args: Vec<String>,
}

#[derive(Args, Debug)]
struct UpArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Number of VMs.
    #[arg(long, default_value_t = 2)]
    vms: u32,
    /// Firmware of each VM, cycled over the VMs (bios,uefi: the first BIOS, the second UEFI).
    #[arg(long, value_enum, value_delimiter = ',', default_value = "bios,uefi")]
    firmware: Vec<Fw>,
    /// Network boot path (ipxe-rom for BIOS; uefi-pxe and uefi-http need UEFI).
    #[arg(long, value_enum, default_value = "ipxe-rom")]
    boot: Boot,
    /// RAM per VM in MiB.
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Give each VM an empty disk of this size (qemu-img syntax: 1G, 512M).
    #[arg(long)]
    disk_size: Option<String>,
    /// Do not echo serial consoles and server logs (they are still written to files).
    #[arg(long)]
    quiet: bool,
}

#[derive(Args, Debug)]
struct BootTestArgs {
    #[command(flatten)]
    server: ServerArgs,
    #[arg(long, value_enum, default_value = "bios")]
    firmware: Fw,
    #[arg(long, value_enum, default_value = "ipxe-rom")]
    boot: Boot,
    /// The serial marker that ends the boot.
    #[arg(long, default_value = fixture::BOOT_MARKER)]
    marker: String,
    /// Seconds to wait for the marker.
    #[arg(long, default_value_t = 240)]
    timeout: u64,
    #[arg(long, default_value_t = 256)]
    memory: u32,
    /// Echo the serial console and server logs.
    #[arg(long)]
    follow: bool,
}

#[derive(Args, Debug)]
struct BenchArgs {
    #[command(flatten)]
    server: ServerArgs,
    /// Boots per configuration (the median is reported).
    #[arg(long, default_value_t = 3)]
    runs: u32,
    /// Firmware to measure.
    #[arg(long, value_enum, value_delimiter = ',', default_value = "bios,uefi")]
    firmware: Vec<Fw>,
    /// Servers to measure: dnsmasq (no router advertisement), dnsmasq-ra, dnsmasq-tuned
    /// (dnsmasq-ra plus option 175.176 for iPXE, as Strata sends), strata (needs --strata),
    /// direct (no network boot: QEMU's -kernel/-initrd, the floor).
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "direct,dnsmasq,dnsmasq-ra"
    )]
    servers: Vec<String>,
    #[arg(long, default_value_t = 240)]
    timeout: u64,
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let result = match cli.command {
        Cmd::Up(a) => up(a),
        Cmd::BootTest(a) => boot_test(a).map(|_| ()),
        Cmd::Bench(a) => bench(a),
    };
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("strata-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// The lab configuration, the boot files and the server to run, from the common arguments.
struct Setup {
    lab: LabConfig,
    files: BootFiles,
    /// None for `direct`: QEMU loads the kernel itself (`-kernel`), no network boot.
    server: Option<Box<dyn BootServer>>,
    label: String,
    /// The server boots its own kernel and initramfs (node-init), not `files`.
    own_boot: bool,
}

fn setup(a: &ServerArgs, kind: Option<&str>, boot: Boot, echo: bool, up: bool) -> Result<Setup> {
    let kind = match kind {
        Some(k) => k.to_owned(),
        None => match a.server {
            Some(ServerKind::Strata) => "strata".into(),
            Some(ServerKind::Dnsmasq) => {
                if a.ra {
                    "dnsmasq-ra".into()
                } else {
                    "dnsmasq".into()
                }
            }
            None if a.strata.is_some() => "strata".into(),
            None => {
                if a.ra {
                    "dnsmasq-ra".into()
                } else {
                    "dnsmasq".into()
                }
            }
        },
    };
    let mut lab = LabConfig {
        work_dir: a.work_dir.clone(),
        echo,
        ipv6: a.ipv6 || kind == "dnsmasq-ra" || kind == "dnsmasq-tuned" || kind == "strata",
        ..LabConfig::default()
    };
    // The boot files live outside the lab's directory so one set serves many labs.
    let fixtures = fixture::cache_dir().join("lab");
    std::fs::create_dir_all(&fixtures)
        .with_context(|| format!("creating {}", fixtures.display()))?;
    let mut files = match (&a.kernel, &a.initrd) {
        (None, None) => fixture::marker_boot_files(&fixtures)?,
        _ => BootFiles {
            kernel: match &a.kernel {
                Some(k) => k.clone(),
                None => fixture::debian_kernel()?,
            },
            initrd: match &a.initrd {
                Some(i) => i.clone(),
                None => bail!("--kernel without --initrd: give both or neither"),
            },
            cmdline: fixture::TEST_CMDLINE.into(),
        },
    };
    if let Some(c) = &a.cmdline {
        files.cmdline.clone_from(c);
    }
    let mut own_boot = false;
    let server: Option<Box<dyn BootServer>> = match kind.as_str() {
        "direct" => None,
        "dnsmasq" | "dnsmasq-ra" | "dnsmasq-tuned" => {
            let mut d = Dnsmasq::pxe(files.clone());
            d.router_advert = kind != "dnsmasq";
            d.chain_undionly = boot == Boot::Undionly;
            d.extra_args.clone_from(&a.dnsmasq_arg);
            if kind == "dnsmasq-tuned" {
                // What Strata sends iPXE too: option 175 sub-option 176 (no ProxyDHCP wait).
                d.extra_args
                    .push("--dhcp-option-force=tag:ipxe,175,b0:01:01".into());
            }
            Some(Box::new(d))
        }
        "strata" => {
            let Some(bin) = &a.strata else {
                bail!("the strata server needs --strata <path to the strata binary>")
            };
            if boot == Boot::Undionly {
                bail!("--boot undionly is a dnsmasq lab path; Strata chainloads iPXE by itself");
            }
            let mut s = Strata::new(bin);
            // The lab's marker initramfs unless the server is to boot its own (node-init).
            let own = a.strata_own_boot || (up && a.kernel.is_none() && a.initrd.is_none());
            s.boot = (!own).then(|| files.clone());
            own_boot = own;
            s.config = match (&a.strata_config, &a.strata_template) {
                (Some(f), _) => StrataConfig::File(f.clone()),
                (None, Some(t)) => StrataConfig::Template(
                    std::fs::read_to_string(t)
                        .with_context(|| format!("reading {}", t.display()))?,
                ),
                (None, None) => StrataConfig::Lab,
            };
            s.data_dir.clone_from(&a.strata_data_dir);
            s.args.clone_from(&a.strata_args);
            if !a.strata_ready.is_empty() {
                s.ready.clone_from(&a.strata_ready);
            }
            Some(Box::new(s))
        }
        other => {
            bail!("unknown server {other:?} (dnsmasq, dnsmasq-ra, dnsmasq-tuned, strata, direct)")
        }
    };
    if kind == "dnsmasq" && a.ra {
        lab.ipv6 = true;
    }
    Ok(Setup {
        lab,
        files,
        server,
        label: kind,
        own_boot,
    })
}

fn vm_config(name: &str, fw: Fw, boot: Boot, memory: u32) -> Result<VmConfig> {
    let (firmware, net_boot) = match (fw, boot) {
        (Fw::Bios, Boot::IpxeRom | Boot::Undionly) => (Firmware::Bios, NetBoot::IpxeRom),
        (Fw::Uefi, Boot::IpxeRom) => (Firmware::Uefi, NetBoot::IpxeRom),
        (Fw::Uefi, Boot::UefiPxe) => (Firmware::Uefi, NetBoot::UefiPxe),
        (Fw::Uefi, Boot::UefiHttp) => (Firmware::Uefi, NetBoot::UefiHttp),
        (fw, boot) => bail!("--boot {boot:?} does not work with --firmware {fw:?}"),
    };
    Ok(VmConfig::new(name, firmware)
        .net_boot(net_boot)
        .memory_mib(memory))
}

fn up(a: UpArgs) -> Result<()> {
    let s = setup(&a.server, None, a.boot, !a.quiet, true)?;
    let mut lab = Lab::new(s.lab)?;
    let Some(server) = &s.server else {
        bail!("`up` needs a boot server (dnsmasq or strata)")
    };
    lab.start_server(server.as_ref())?;
    let (tx, rx) = mpsc::channel();
    ctrlc::set_handler(move || {
        let _ = tx.send(());
    })
    .context("installing the Ctrl-C handler")?;
    let mut vms = Vec::new();
    for i in 0..a.vms {
        let fw = a
            .firmware
            .get(i as usize % a.firmware.len().max(1))
            .copied()
            .unwrap_or(Fw::Bios);
        let mut cfg = vm_config(&format!("vm{i}"), fw, a.boot, a.memory)?;
        if let Some(size) = &a.disk_size {
            let path = lab.dir().join(format!("vm{i}.qcow2"));
            strata_lab::process::run(
                std::process::Command::new("qemu-img")
                    .args(["create", "-q", "-f", "qcow2"])
                    .arg(&path)
                    .arg(size),
            )?;
            cfg = cfg.disk(path, "qcow2");
        }
        vms.push(lab.start_vm(cfg)?);
    }
    println!(
        "lab up: namespace {} (enter it with `ip netns exec {} bash`)",
        lab.netns_name(),
        lab.netns_name()
    );
    println!(
        "  server: {} at {} on br0; files in {}",
        s.label,
        lab.config().server_ip,
        lab.dir().display()
    );
    if s.own_boot {
        println!("  boot files: the server's own kernel and node-init initramfs (the built-in busybox image)");
    } else {
        println!(
            "  boot files: kernel {} initrd {}",
            s.files.kernel.display(),
            s.files.initrd.display()
        );
    }
    for vm in &vms {
        println!(
            "  {} ({}): serial log {}",
            vm.name(),
            vm.mac(),
            vm.serial_path().display()
        );
    }
    println!("Ctrl-C stops the VMs and the server and removes the namespace.");
    loop {
        match rx.recv_timeout(Duration::from_millis(500)) {
            Ok(()) => break,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
            Err(mpsc::RecvTimeoutError::Timeout) => {}
        }
        if vms.iter_mut().all(|vm| !vm.is_running()) {
            println!("every VM has stopped; Ctrl-C to tear the lab down");
            let _ = rx.recv();
            break;
        }
    }
    println!("tearing down the lab");
    drop(vms);
    drop(lab);
    Ok(())
}

/// One boot; returns seconds from QEMU start to the marker.
fn boot_once(s: Setup, fw: Fw, boot: Boot, memory: u32, marker: &str, timeout: u64) -> Result<f64> {
    let mut lab = Lab::new(s.lab)?;
    let mut cfg = vm_config("vm0", fw, boot, memory)?;
    match &s.server {
        Some(server) => {
            lab.start_server(server.as_ref())?;
        }
        None => {
            cfg.extra_args.extend([
                "-kernel".into(),
                s.files.kernel.display().to_string(),
                "-initrd".into(),
                s.files.initrd.display().to_string(),
                "-append".into(),
                s.files.cmdline.clone(),
            ]);
        }
    }
    let mut vm = lab.start_vm(cfg)?;
    let t = vm.wait_for_serial(marker, Duration::from_secs(timeout))?;
    Ok(t.as_secs_f64())
}

fn boot_test(a: BootTestArgs) -> Result<f64> {
    let s = setup(&a.server, None, a.boot, a.follow, false)?;
    let label = s.label.clone();
    let t = boot_once(s, a.firmware, a.boot, a.memory, &a.marker, a.timeout)?;
    println!(
        "{:?} {:?} from {label}: QEMU start to {:?} in {t:.2} s",
        a.firmware, a.boot, a.marker
    );
    Ok(t)
}

fn bench(a: BenchArgs) -> Result<()> {
    if a.runs == 0 {
        bail!("--runs must be at least 1");
    }
    let mut rows: Vec<(Fw, String, Vec<f64>)> = Vec::new();
    for &fw in &a.firmware {
        for server in &a.servers {
            rows.push((fw, server.clone(), Vec::new()));
        }
    }
    // Round robin (run 1 of every configuration, then run 2...), so a load change on the
    // machine falls on every column alike.
    for run in 0..a.runs {
        for (fw, server, times) in &mut rows {
            let s = setup(&a.server, Some(server), Boot::IpxeRom, false, false)?;
            let t = boot_once(s, *fw, Boot::IpxeRom, 256, fixture::BOOT_MARKER, a.timeout)
                .with_context(|| format!("{fw:?} from {server}, run {}", run + 1))?;
            eprintln!("  {fw:?} {server} run {}: {t:.2} s", run + 1);
            times.push(t);
        }
    }
    println!("boot time, QEMU start to \"{}\" (TCG, 256 MiB, iPXE ROM, Debian kernel + busybox initramfs), {} runs", fixture::BOOT_MARKER, a.runs);
    println!(
        "{:<6} {:<12} {:>8} {:>8} {:>8} {:>10}",
        "fw", "server", "median", "min", "max", "vs dnsmasq"
    );
    for (fw, server, times) in &rows {
        let med = median(times);
        let base = rows
            .iter()
            .find(|(f, s, _)| f == fw && s == "dnsmasq")
            .map(|(_, _, t)| median(t));
        let ratio = base.map(|b| format!("{:.2}x", med / b)).unwrap_or_default();
        let min = times.iter().copied().fold(f64::INFINITY, f64::min);
        let max = times.iter().copied().fold(0.0, f64::max);
        println!(
            "{:<6} {:<12} {:>7.2}s {:>7.2}s {:>7.2}s {:>10}",
            format!("{fw:?}").to_lowercase(),
            server,
            med,
            min,
            max,
            ratio
        );
    }
    Ok(())
}

fn median(v: &[f64]) -> f64 {
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    match s.len() {
        0 => 0.0,
        n if n % 2 == 1 => s.get(n / 2).copied().unwrap_or(0.0),
        n => {
            (s.get(n / 2 - 1).copied().unwrap_or(0.0) + s.get(n / 2).copied().unwrap_or(0.0)) / 2.0
        }
    }
}
