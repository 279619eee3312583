//! A QEMU VM of the lab (`-accel tcg`), on a tap device attached to the lab's bridge, with
//! its serial console captured and waited on.
//!
//! Firmware: SeaBIOS with the NIC's iPXE option ROM, or Debian's OVMF (code read-only, a
//! per-VM copy of the variable store) booting the ROM's iPXE, its own PXE client
//! (`romfile=` empty) or its HTTP boot client (OVMF's PXE switched off through fw_cfg).
//! SeaBIOS and iPXE print to VGA only; `etc/sercon-port` makes SeaBIOS mirror them to the
//! serial port, so the serial log shows the whole boot.

use std::io::{BufRead, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::process::{ChildStdin, ExitStatus, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::lab::LabShared;
use crate::log::{LogStream, Match};
use crate::process::Proc;
use crate::tools;

/// The VM's firmware.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Firmware {
    /// SeaBIOS.
    Bios,
    /// OVMF (x86-64 UEFI).
    Uefi,
}

/// How the firmware boots from the network.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum NetBoot {
    /// The NIC's iPXE option ROM (BIOS, or UEFI with the ROM's EFI driver).
    IpxeRom,
    /// UEFI only: OVMF's own PXE client (the NIC gets no option ROM).
    UefiPxe,
    /// UEFI only: OVMF's HTTP boot client (PXE switched off so it is tried first).
    UefiHttp,
}

/// A disk image attached as a virtio block device.
#[derive(Debug, Clone)]
pub struct Disk {
    /// The image file (kept after the VM stops).
    pub path: PathBuf,
    /// `raw` or `qcow2`.
    pub format: String,
}

/// What a VM is made of.
#[derive(Debug, Clone)]
pub struct VmConfig {
    /// A name for logs and files (`vm0`); must be unique in its lab.
    pub name: String,
    /// BIOS or UEFI.
    pub firmware: Firmware,
    /// Which network boot client runs.
    pub net_boot: NetBoot,
    /// QEMU's NIC model (`virtio-net-pci`, `e1000`).
    pub nic: String,
    /// The NIC's MAC address; the lab picks `52:54:00:42:xx:yy` when unset.
    pub mac: Option<String>,
    /// RAM in MiB.
    pub memory_mib: u32,
    /// Virtual CPUs.
    pub cpus: u32,
    /// An optional disk.
    pub disk: Option<Disk>,
    /// Exit QEMU instead of rebooting when the guest reboots.
    pub no_reboot: bool,
    /// Serial-log substrings that make any wait fail at once.
    pub fail_markers: Vec<String>,
    /// Extra QEMU arguments.
    pub extra_args: Vec<String>,
}

impl VmConfig {
    /// A 256 MiB, one-CPU VM booting through the NIC's iPXE ROM.
    pub fn new(name: &str, firmware: Firmware) -> Self {
        Self {
            name: name.to_owned(),
            firmware,
            net_boot: NetBoot::IpxeRom,
            nic: "virtio-net-pci".into(),
            mac: None,
            memory_mib: 256,
            cpus: 1,
            disk: None,
            no_reboot: false,
            fail_markers: vec!["Kernel panic - not syncing".into(), "STRATA panic".into()],
            extra_args: Vec::new(),
        }
    }

    /// Sets the network boot client.
    #[must_use]
    pub fn net_boot(mut self, net_boot: NetBoot) -> Self {
        self.net_boot = net_boot;
        self
    }

    /// Sets the MAC address.
    #[must_use]
    pub fn mac(mut self, mac: &str) -> Self {
        self.mac = Some(mac.to_owned());
        self
    }

    /// Attaches a disk image.
    #[must_use]
    pub fn disk(mut self, path: impl Into<PathBuf>, format: &str) -> Self {
        self.disk = Some(Disk {
            path: path.into(),
            format: format.to_owned(),
        });
        self
    }

    /// Sets the RAM size.
    #[must_use]
    pub fn memory_mib(mut self, mib: u32) -> Self {
        self.memory_mib = mib;
        self
    }
}

/// A running VM. Dropping it stops QEMU and removes its tap device.
#[derive(Debug)]
pub struct TestVm {
    name: String,
    mac: String,
    tap: String,
    proc: Proc,
    stdin: Option<ChildStdin>,
    serial: LogStream,
    qmp_path: PathBuf,
    started: Instant,
    cursor: usize,
    fail_markers: Vec<String>,
    lab: Arc<LabShared>,
}

impl TestVm {
    pub(crate) fn start(
        lab: Arc<LabShared>,
        cfg: VmConfig,
        index: u32,
        echo: bool,
    ) -> Result<Self> {
        tools::require(&["qemu-system-x86_64"], &[])?;
        if cfg.name.is_empty()
            || !cfg
                .name
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            bail!(
                "VM name {:?} must be non-empty ASCII letters, digits, '-' or '_'",
                cfg.name
            );
        }
        if cfg.firmware == Firmware::Bios && cfg.net_boot != NetBoot::IpxeRom {
            bail!("{}: {:?} needs UEFI firmware", cfg.name, cfg.net_boot);
        }
        if cfg.firmware == Firmware::Uefi {
            tools::require(&[], &[tools::OVMF_CODE, tools::OVMF_VARS])?;
        }
        let dir = lab.dir().join(&cfg.name);
        std::fs::create_dir(&dir)
            .with_context(|| format!("creating {} (VM names must be unique)", dir.display()))?;
        let mac = cfg.mac.clone().unwrap_or_else(|| {
            format!(
                "52:54:00:42:{:02x}:{:02x}",
                (index >> 8) & 0xff,
                index & 0xff
            )
        });
        let tap = format!("tap{index}");
        let ns = lab.netns();
        ns.ip(&["tuntap", "add", "dev", &tap, "mode", "tap"])?;
        ns.ip(&["link", "set", &tap, "master", lab.bridge(), "up"])?;

        let sercon = dir.join("sercon-port");
        std::fs::write(&sercon, [0xf8, 0x03]).context("writing the sercon-port fw_cfg file")?;
        let qmp_path = dir.join("qmp.sock");
        let mut args: Vec<String> = vec![
            "-name".into(),
            cfg.name.clone(),
            "-accel".into(),
            "tcg".into(),
            "-nodefaults".into(),
            "-no-user-config".into(),
            "-display".into(),
            "none".into(),
            "-serial".into(),
            "stdio".into(),
            "-monitor".into(),
            "none".into(),
            "-qmp".into(),
            format!("unix:{},server=on,wait=off", qmp_path.display()),
            "-m".into(),
            cfg.memory_mib.to_string(),
            "-smp".into(),
            cfg.cpus.to_string(),
        ];
        for d in tools::QEMU_ROM_DIRS {
            args.extend(["-L".into(), d.into()]);
        }
        if cfg.no_reboot {
            args.push("-no-reboot".into());
        }
        match cfg.firmware {
            Firmware::Bios => {
                args.extend(["-machine".into(), "pc".into()]);
                args.extend([
                    "-fw_cfg".into(),
                    format!("name=etc/sercon-port,file={}", sercon.display()),
                ]);
            }
            Firmware::Uefi => {
                let vars = dir.join("OVMF_VARS.fd");
                std::fs::copy(tools::OVMF_VARS, &vars)
                    .with_context(|| format!("copying {}", tools::OVMF_VARS))?;
                args.extend([
                    "-machine".into(),
                    "q35".into(),
                    "-drive".into(),
                    format!(
                        "if=pflash,format=raw,unit=0,readonly=on,file={}",
                        tools::OVMF_CODE
                    ),
                    "-drive".into(),
                    format!("if=pflash,format=raw,unit=1,file={}", vars.display()),
                    // OVMF's IPv6 PXE would run after a failed IPv4 attempt: noise here.
                    "-fw_cfg".into(),
                    "name=opt/org.tianocore/IPv6PXESupport,string=n".into(),
                ]);
                if cfg.net_boot == NetBoot::UefiHttp {
                    args.extend([
                        "-fw_cfg".into(),
                        "name=opt/org.tianocore/IPv4PXESupport,string=n".into(),
                    ]);
                }
            }
        }
        let rom = match cfg.net_boot {
            NetBoot::IpxeRom => String::new(),
            NetBoot::UefiPxe | NetBoot::UefiHttp => ",romfile=".into(),
        };
        args.extend([
            "-netdev".into(),
            format!("tap,id=net0,ifname={tap},script=no,downscript=no"),
            "-device".into(),
            format!("{},netdev=net0,mac={mac},bootindex=1{rom}", cfg.nic),
        ]);
        if let Some(disk) = &cfg.disk {
            if !disk.path.is_file() {
                bail!(
                    "{}: disk image {} does not exist",
                    cfg.name,
                    disk.path.display()
                );
            }
            args.extend([
                "-drive".into(),
                format!(
                    "if=none,id=disk0,format={},file={},cache=writeback",
                    disk.format,
                    disk.path.display()
                ),
                "-device".into(),
                "virtio-blk-pci,drive=disk0".into(),
            ]);
        }
        args.extend(cfg.extra_args.iter().cloned());

        let mut cmd = ns.command("qemu-system-x86_64");
        cmd.args(&args);
        let stderr = std::fs::File::create(dir.join("qemu.stderr"))
            .context("creating the QEMU stderr log")?;
        cmd.stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(stderr);
        std::fs::write(dir.join("qemu.cmdline"), format!("{cmd:?}\n"))
            .context("writing the QEMU command line")?;
        let started = Instant::now();
        let mut proc = Proc::spawn(&cfg.name, cmd)?;
        let stdin = proc.child_mut().stdin.take();
        let Some(stdout) = proc.child_mut().stdout.take() else {
            bail!("{}: QEMU's stdout was not captured", cfg.name);
        };
        let serial = LogStream::capture(
            &cfg.name,
            stdout,
            &dir.join("serial.log"),
            echo.then(|| format!("[{}] ", cfg.name)),
        )?;
        lab.register_log(serial.clone());
        Ok(Self {
            name: cfg.name,
            mac,
            tap,
            proc,
            stdin,
            serial,
            qmp_path,
            started,
            cursor: 0,
            fail_markers: cfg.fail_markers,
            lab,
        })
    }

    /// The VM's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The NIC's MAC address.
    pub fn mac(&self) -> &str {
        &self.mac
    }

    /// When QEMU was started.
    pub fn started(&self) -> Instant {
        self.started
    }

    /// The serial console stream.
    pub fn serial(&self) -> &LogStream {
        &self.serial
    }

    /// The serial log file.
    pub fn serial_path(&self) -> &Path {
        self.serial.path()
    }

    /// Waits for `marker` on the serial console after the previous match (or from the start),
    /// followed by a line end or a space. Returns the time since QEMU started. Fails at once
    /// when QEMU exits or a failure marker appears, with the serial and server logs' tails.
    pub fn wait_for_serial(&mut self, marker: &str, timeout: Duration) -> Result<Duration> {
        let m = self.wait_match(marker, timeout)?;
        Ok(m.at.duration_since(self.started))
    }

    /// Like [`Self::wait_for_serial`], returning the whole serial line holding the marker
    /// (for markers with fields: `STRATA stage=fetch layer=.. bytes=..`).
    pub fn wait_for_line(&mut self, marker: &str, timeout: Duration) -> Result<String> {
        let m = self.wait_match(marker, timeout)?;
        Ok(self.serial.line_of(&m, Duration::from_secs(5)))
    }

    /// Like [`Self::wait_for_serial`], returning where the marker is in the stream.
    pub fn wait_match(&mut self, marker: &str, timeout: Duration) -> Result<Match> {
        match self
            .serial
            .wait_for(self.cursor, marker, &self.fail_markers, timeout)
        {
            Ok(m) => {
                self.cursor = m.end;
                Ok(m)
            }
            Err(why) => {
                self.lab.mark_failed();
                bail!(
                    "{}: waiting {timeout:?} for {marker:?}: {why}\n--- last serial lines ({}) ---\n{}\n{}",
                    self.name,
                    self.serial.path().display(),
                    self.serial.tail(40),
                    self.lab.server_tails(20)
                )
            }
        }
    }

    /// Writes bytes to the serial console's input.
    pub fn send_serial(&mut self, bytes: &[u8]) -> Result<()> {
        let Some(stdin) = self.stdin.as_mut() else {
            bail!("{}: serial input is closed", self.name)
        };
        stdin
            .write_all(bytes)
            .and_then(|()| stdin.flush())
            .with_context(|| format!("{}: writing to the serial console", self.name))
    }

    /// Runs a QMP command (`system_reset`, `system_powerdown`, `quit`, ...) and returns its
    /// `return` value.
    pub fn qmp(
        &self,
        command: &str,
        arguments: Option<serde_json::Value>,
    ) -> Result<serde_json::Value> {
        let stream = UnixStream::connect(&self.qmp_path)
            .with_context(|| format!("{}: connecting to QMP", self.name))?;
        stream
            .set_read_timeout(Some(Duration::from_secs(30)))
            .context("setting a QMP timeout")?;
        let mut writer = stream.try_clone().context("cloning the QMP socket")?;
        let mut reader = BufReader::new(stream);
        let mut read_reply = |reader: &mut BufReader<UnixStream>| -> Result<serde_json::Value> {
            loop {
                let mut line = String::new();
                if reader.read_line(&mut line).context("reading QMP")? == 0 {
                    bail!("QMP closed");
                }
                let v: serde_json::Value =
                    serde_json::from_str(&line).with_context(|| format!("QMP sent {line:?}"))?;
                if let Some(r) = v.get("return") {
                    return Ok(r.clone());
                }
                if let Some(e) = v.get("error") {
                    bail!("QMP error: {e}");
                }
                // Greeting ("QMP") and events: keep reading.
                if v.get("QMP").is_some() {
                    writeln!(
                        writer,
                        "{}",
                        serde_json::json!({"execute": "qmp_capabilities"})
                    )
                    .context("writing QMP")?;
                }
            }
        };
        read_reply(&mut reader).with_context(|| format!("{}: QMP handshake", self.name))?;
        let mut cmd = serde_json::json!({ "execute": command });
        if let Some(a) = arguments {
            cmd["arguments"] = a;
        }
        let mut w = reader
            .get_ref()
            .try_clone()
            .context("cloning the QMP socket")?;
        writeln!(w, "{cmd}").context("writing QMP")?;
        read_reply(&mut reader).with_context(|| format!("{}: QMP {command}", self.name))
    }

    /// Waits for QEMU to exit (after the guest's `poweroff -f`, for instance).
    pub fn wait_exit(&mut self, timeout: Duration) -> Result<ExitStatus> {
        self.proc
            .wait_timeout(timeout)
            .with_context(|| format!("{}: waiting for QEMU to exit", self.name))
    }

    /// True while QEMU runs.
    pub fn is_running(&mut self) -> bool {
        matches!(self.proc.try_wait(), Ok(None))
    }

    /// Stops QEMU (SIGTERM, then SIGKILL): the disk image stays for a later VM.
    pub fn stop(&mut self) -> Option<ExitStatus> {
        self.proc.stop()
    }
}

impl Drop for TestVm {
    fn drop(&mut self) {
        self.proc.stop();
        if std::thread::panicking() {
            self.lab.mark_failed();
        }
        let _ = self.lab.netns().ip(&["link", "del", &self.tap]);
    }
}
