//! Boot servers the lab runs inside its namespace: [`Strata`] (this workspace's `strata serve`)
//! and [`Dnsmasq`] (dnsmasq's DHCP and TFTP, with busybox httpd for HTTP), the peer that
//! boot times are compared against and the site's plain DHCP server in proxyDHCP tests.

use std::fmt::Write as _;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::thread;
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};

use crate::log::LogStream;
use crate::netns::Netns;
use crate::process::Proc;
use crate::tools;

/// What the lab tells a server about the network it serves.
#[derive(Debug)]
pub struct ServerContext<'a> {
    /// The lab's namespace; the server runs inside it.
    pub netns: &'a Netns,
    /// The bridge the VMs' taps are attached to (`br0`).
    pub bridge: &'a str,
    /// The server's address on the bridge.
    pub server_ip: Ipv4Addr,
    /// The bridge subnet's prefix length.
    pub prefix_len: u8,
    /// First and last address a DHCP server may hand out.
    pub dhcp_range: (Ipv4Addr, Ipv4Addr),
    /// The bridge's IPv6 ULA address when the lab has IPv6 on the bridge.
    pub ipv6: Option<&'a str>,
    /// A fresh directory for this server's files and logs.
    pub dir: PathBuf,
    /// Echo server logs to stderr with this prefix (`strata-lab up --follow`).
    pub echo: bool,
}

/// A server process (or several) started by a [`BootServer`].
#[derive(Debug)]
pub struct RunningServer {
    name: String,
    procs: Vec<Proc>,
    logs: Vec<LogStream>,
}

impl RunningServer {
    /// Wraps processes already started, with their logs.
    pub fn new(name: &str, procs: Vec<Proc>, logs: Vec<LogStream>) -> Self {
        Self {
            name: name.to_owned(),
            procs,
            logs,
        }
    }

    /// The server's name.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// The server's logs (the main log first).
    pub fn logs(&self) -> &[LogStream] {
        &self.logs
    }

    /// The main log (for `listening` lines and request records).
    pub fn log(&self) -> Option<&LogStream> {
        self.logs.first()
    }

    /// Fails if a process of the server has exited.
    pub fn check_alive(&mut self) -> Result<()> {
        for p in &mut self.procs {
            if let Some(status) = p.try_wait()? {
                bail!("{} exited ({status})", p.name());
            }
        }
        Ok(())
    }

    /// Stops every process (SIGTERM, then SIGKILL).
    pub fn stop(&mut self) {
        for p in &mut self.procs {
            p.stop();
        }
    }

    /// Kills every process at once (SIGKILL): a server that dies mid-transfer.
    pub fn kill(&mut self) {
        for p in &mut self.procs {
            p.kill();
        }
    }
}

/// A boot server the lab can start inside its namespace (and start again after a stop).
pub trait BootServer {
    /// A short name for logs (`dnsmasq`, `strata`).
    fn name(&self) -> String;
    /// Starts the server and returns once it is ready to answer.
    fn start(&self, ctx: &ServerContext<'_>) -> Result<RunningServer>;
}

/// A kernel, an initramfs and the kernel command line to boot them with.
#[derive(Debug, Clone)]
pub struct BootFiles {
    /// The kernel image (bzImage).
    pub kernel: PathBuf,
    /// The initramfs (cpio, optionally compressed).
    pub initrd: PathBuf,
    /// The kernel command line (`console=ttyS0` is what makes the serial log useful).
    pub cmdline: String,
}

/// How the boot files reach iPXE from the dnsmasq peer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Transport {
    /// busybox httpd serves them (the iPXE script names `http://` URLs).
    Http,
    /// dnsmasq's TFTP serves them (`tftp://` URLs).
    Tftp,
}

/// dnsmasq (from `dnsmasq-base`) inside the lab.
///
/// With `boot` set it is a complete PXE server: DHCP (no ping), TFTP for the iPXE binaries
/// (`undionly.kpxe` for BIOS PXE ROMs, `snponly.efi` for UEFI PXE and UEFI HTTP boot
/// clients), and an iPXE script plus the kernel and initramfs over HTTP (busybox httpd) or
/// TFTP. iPXE is recognised by its user class `iPXE` and gets the script. Without `boot` it
/// is the site's plain DHCP server, answering no boot options (for proxyDHCP tests).
#[derive(Debug, Clone)]
pub struct Dnsmasq {
    /// What to boot; `None` for a plain DHCP server.
    pub boot: Option<BootFiles>,
    /// How iPXE fetches the kernel and initramfs.
    pub transport: Transport,
    /// TCP port of the HTTP server on the lab's address.
    pub http_port: u16,
    /// Send IPv6 router advertisements (router lifetime 0) so iPXE's IPv6 autoconfiguration
    /// ends at once instead of waiting out its timeout. Needs the lab's IPv6 on the bridge.
    pub router_advert: bool,
    /// For BIOS: make the NIC ROM's iPXE chainload `undionly.kpxe` over TFTP before the
    /// script (the plain PXE ROM path: what a non-iPXE BIOS PXE ROM does). The chainloaded
    /// iPXE is told apart by a first-stage iPXE script that looks at its driver.
    pub chain_undionly: bool,
    /// Extra dnsmasq arguments, appended last.
    pub extra_args: Vec<String>,
}

impl Dnsmasq {
    /// A PXE server booting `boot` over HTTP, without router advertisements.
    pub fn pxe(boot: BootFiles) -> Self {
        Self {
            boot: Some(boot),
            transport: Transport::Http,
            http_port: 8080,
            router_advert: false,
            chain_undionly: false,
            extra_args: Vec::new(),
        }
    }

    /// A plain DHCP server (no boot options), as a site's existing DHCP server.
    pub fn site_dhcp() -> Self {
        Self {
            boot: None,
            transport: Transport::Http,
            http_port: 8080,
            router_advert: false,
            chain_undionly: false,
            extra_args: Vec::new(),
        }
    }

    fn ipxe_script(&self, ctx: &ServerContext<'_>, boot: &BootFiles) -> String {
        let base = match self.transport {
            Transport::Http => format!("http://{}:{}", ctx.server_ip, self.http_port),
            Transport::Tftp => format!("tftp://{}", ctx.server_ip),
        };
        // `initrd=` lets the kernel's EFI stub find the initramfs under iPXE for UEFI.
        format!(
            "#!ipxe\necho STRATA lab ipxe script\nkernel {base}/vmlinuz initrd=initrd.img {}\ninitrd {base}/initrd.img\nboot\n",
            boot.cmdline
        )
    }
}

impl BootServer for Dnsmasq {
    fn name(&self) -> String {
        "dnsmasq".into()
    }

    fn start(&self, ctx: &ServerContext<'_>) -> Result<RunningServer> {
        tools::require(&["dnsmasq", "busybox"], &[])?;
        let root = ctx.dir.join("root");
        make_dir(&root)?;
        let ip = ctx.server_ip;
        let mut args: Vec<String> = vec![
            "--keep-in-foreground".into(),
            "--log-facility=-".into(),
            "--conf-file=/dev/null".into(),
            "--no-resolv".into(),
            "--no-hosts".into(),
            "--port=0".into(),
            format!("--interface={}", ctx.bridge),
            "--bind-interfaces".into(),
            "--user=root".into(),
            format!("--pid-file={}", ctx.dir.join("dnsmasq.pid").display()),
            format!(
                "--dhcp-leasefile={}",
                ctx.dir.join("dnsmasq.leases").display()
            ),
            format!(
                "--dhcp-range={},{},{},1h",
                ctx.dhcp_range.0,
                ctx.dhcp_range.1,
                netmask(ctx.prefix_len)
            ),
            "--dhcp-authoritative".into(),
            "--no-ping".into(),
            "--log-dhcp".into(),
        ];
        if self.router_advert {
            let Some(v6) = ctx.ipv6 else {
                bail!("dnsmasq router advertisements need the lab's IPv6 on the bridge (LabConfig::ipv6)");
            };
            let prefix = v6.split('/').next().unwrap_or(v6);
            // ra-only: advertise the prefix, no DHCPv6; router lifetime 0: not a default router.
            args.push("--enable-ra".into());
            args.push(format!("--dhcp-range={prefix},ra-only,64"));
            args.push(format!("--ra-param={},60,0", ctx.bridge));
        }
        let mut procs = Vec::new();
        let mut logs = Vec::new();
        if let Some(boot) = &self.boot {
            tools::require(&[], &[tools::UNDIONLY_KPXE, tools::SNPONLY_EFI])?;
            for (src, name) in [(&boot.kernel, "vmlinuz"), (&boot.initrd, "initrd.img")] {
                copy_public(src, &root.join(name))?;
            }
            for f in [tools::UNDIONLY_KPXE, tools::SNPONLY_EFI, tools::IPXE_EFI] {
                let src = Path::new(f);
                if let Some(name) = src.file_name() {
                    copy_public(src, &root.join(name))?;
                }
            }
            write_public(
                &root.join("boot.ipxe"),
                self.ipxe_script(ctx, boot).as_bytes(),
            )?;
            let http = format!("http://{ip}:{}", self.http_port);
            args.extend([
                "--enable-tftp".into(),
                format!("--tftp-root={}", root.display()),
                "--dhcp-userclass=set:ipxe,iPXE".into(),
                "--dhcp-match=set:efi,option:client-arch,7".into(),
                "--dhcp-match=set:efi,option:client-arch,9".into(),
                "--dhcp-vendorclass=set:http,HTTPClient".into(),
                "--dhcp-option-force=tag:http,60,HTTPClient".into(),
                format!("--dhcp-boot=tag:http,{http}/snponly.efi"),
                "--dhcp-boot=tag:!ipxe,tag:!http,tag:efi,snponly.efi".into(),
                "--dhcp-boot=tag:!ipxe,tag:!http,tag:!efi,undionly.kpxe".into(),
            ]);
            if self.chain_undionly {
                // The NIC ROM's iPXE and the chainloaded undionly.kpxe send the same DHCP
                // options, so dnsmasq cannot tell them apart; both get stage1.ipxe, which
                // looks at the driver: `${netX/chip}` is `undionly` only in the chainloaded
                // iPXE (the ROM's is `virtio-net`, `e1000`...). Lines stay short: SeaBIOS's
                // serial console wraps at 80 columns.
                write_public(
                    &root.join("stage1.ipxe"),
                    format!(
                        "#!ipxe\necho STRATA lab stage1 chip=${{netX/chip}}\n\
                         iseq ${{netX/chip}} undionly && chain {http}/boot.ipxe ||\n\
                         echo STRATA lab chain undionly\n\
                         chain tftp://{ip}/undionly.kpxe\n"
                    )
                    .as_bytes(),
                )?;
                args.push(format!("--dhcp-boot=tag:ipxe,{http}/stage1.ipxe"));
            } else {
                args.push(format!("--dhcp-boot=tag:ipxe,{http}/boot.ipxe"));
            }
            let mut httpd = ctx.netns.command("busybox");
            httpd
                .args([
                    "httpd",
                    "-f",
                    "-vv",
                    "-p",
                    &format!("{ip}:{}", self.http_port),
                    "-h",
                ])
                .arg(&root);
            let (p, l) = Proc::spawn_logged(
                "httpd",
                httpd,
                &ctx.dir.join("httpd.log"),
                echo(ctx, "httpd"),
            )?;
            procs.push(p);
            logs.push(l);
            wait_tcp_listen(ctx.netns, self.http_port, &mut procs)?;
        }
        args.extend(self.extra_args.iter().cloned());
        let mut cmd = ctx.netns.command("dnsmasq");
        cmd.args(&args);
        let (p, log) = Proc::spawn_logged(
            "dnsmasq",
            cmd,
            &ctx.dir.join("dnsmasq.log"),
            echo(ctx, "dnsmasq"),
        )?;
        procs.insert(0, p);
        logs.insert(0, log.clone());
        let mut server = RunningServer::new("dnsmasq", procs, logs);
        // dnsmasq logs its DHCP range once its sockets are bound.
        log.expect(0, "DHCP, IP range", &[], Duration::from_secs(10))
            .and_then(|_| server.check_alive())
            .context("starting dnsmasq")?;
        Ok(server)
    }
}

/// The lab's default `strata serve` configuration (keys of server/src/config.rs): full
/// DHCP on the bridge with the lab's pool, HTTP and TFTP on the lab address, router
/// advertisements on the bridge, data in the server's directory. `{{boot}}` becomes the
/// `[boot]` section naming [`Strata::boot`]'s files, or nothing (the server's defaults:
/// Debian's kernel and the node-init initramfs).
pub const LAB_CONFIG_TEMPLATE: &str = r#"# written by the Strata lab (qemu-tests/src/server.rs)
data_dir = "{{data_dir}}"

[http]
listen = "{{server_ip}}:8080"

[tftp]
listen = "{{server_ip}}:69"

[dhcp]
mode = "full"
interface = "{{bridge}}"
server_ip = "{{server_ip}}"
pool_start = "{{range_start}}"
pool_end = "{{range_end}}"
netmask = "{{netmask}}"

[ra]
interface = "{{bridge}}"
{{boot}}"#;

/// How the lab hands `strata serve` its configuration.
#[derive(Debug, Clone)]
pub enum StrataConfig {
    /// [`LAB_CONFIG_TEMPLATE`]: the lab's network, full DHCP, router advertisements.
    Lab,
    /// No `--config`: the binary's embedded defaults.
    None,
    /// A config file passed through as is.
    File(PathBuf),
    /// A TOML template: the lab substitutes (values escaped for a TOML basic string) `{{bridge}}`, `{{server_ip}}`, `{{prefix_len}}`,
    /// `{{netmask}}`, `{{range_start}}`, `{{range_end}}`, `{{dir}}` (the server's fresh
    /// directory), `{{data_dir}}`, and `{{kernel}}`, `{{initrd}}`, `{{cmdline}}` from
    /// [`Strata::boot`], writes it to `<dir>/strata.toml` and passes that.
    Template(String),
}

/// This workspace's `strata serve`, run inside the lab's namespace:
/// `<binary> serve [--config <file>] [--data-dir <dir>] <args...>`, with its stdout and
/// stderr captured, ready once every line in `ready` has appeared in its log.
#[derive(Debug, Clone)]
pub struct Strata {
    /// Path to the `strata` binary.
    pub binary: PathBuf,
    /// Its configuration.
    pub config: StrataConfig,
    /// `--data-dir`, when set.
    pub data_dir: Option<PathBuf>,
    /// Extra arguments after the above.
    pub args: Vec<String>,
    /// Substrings that must all appear in the log before the server counts as ready.
    pub ready: Vec<String>,
    /// How long to wait for them.
    pub ready_timeout: Duration,
    /// Extra environment (`RUST_LOG` is passed through from the lab's own environment).
    pub env: Vec<(String, String)>,
    /// Boot files for the template's `{{kernel}}`, `{{initrd}}` and `{{cmdline}}`.
    pub boot: Option<BootFiles>,
}

impl Strata {
    /// `strata serve` from `binary` with the lab's configuration, ready at `listening`.
    pub fn new(binary: impl Into<PathBuf>) -> Self {
        Self {
            binary: binary.into(),
            config: StrataConfig::Lab,
            data_dir: None,
            args: Vec::new(),
            ready: vec!["listening".into()],
            ready_timeout: Duration::from_secs(30),
            env: Vec::new(),
            boot: None,
        }
    }

    /// The `strata` binary the lab tests run: `$STRATA_BIN`, else [`Strata::sibling_binary`];
    /// an error saying how to build it otherwise.
    pub fn locate_binary() -> Result<PathBuf> {
        if let Some(p) = std::env::var_os("STRATA_BIN") {
            return Ok(PathBuf::from(p));
        }
        Self::sibling_binary().ok_or_else(|| {
            anyhow::anyhow!(
                "the strata binary is not built: run `cargo build -p strata-server --bin strata` or set STRATA_BIN"
            )
        })
    }

    /// The `strata` binary next to the running executable (same target dir), if built.
    pub fn sibling_binary() -> Option<PathBuf> {
        let exe = std::env::current_exe().ok()?;
        let dir = exe.parent()?;
        // Test binaries live in target/<profile>/deps, the binaries one level up.
        [dir.join("strata"), dir.parent()?.join("strata")]
            .into_iter()
            .find(|p| p.is_file())
    }

    fn render(&self, template: &str, ctx: &ServerContext<'_>) -> String {
        self.render_with(
            template,
            ctx.bridge,
            ctx.server_ip,
            ctx.prefix_len,
            ctx.dhcp_range,
            &ctx.dir,
        )
    }

    fn render_with(
        &self,
        template: &str,
        bridge: &str,
        server_ip: Ipv4Addr,
        prefix_len: u8,
        dhcp_range: (Ipv4Addr, Ipv4Addr),
        dir: &Path,
    ) -> String {
        let data_dir = self.data_dir.clone().unwrap_or_else(|| dir.join("data"));
        let pairs = [
            ("bridge", bridge.to_owned()),
            ("server_ip", server_ip.to_string()),
            ("prefix_len", prefix_len.to_string()),
            ("netmask", netmask(prefix_len).to_string()),
            ("range_start", dhcp_range.0.to_string()),
            ("range_end", dhcp_range.1.to_string()),
            ("dir", dir.display().to_string()),
            ("data_dir", data_dir.display().to_string()),
            (
                "kernel",
                self.boot
                    .as_ref()
                    .map(|b| b.kernel.display().to_string())
                    .unwrap_or_default(),
            ),
            (
                "initrd",
                self.boot
                    .as_ref()
                    .map(|b| b.initrd.display().to_string())
                    .unwrap_or_default(),
            ),
            (
                "cmdline",
                self.boot
                    .as_ref()
                    .map(|b| b.cmdline.clone())
                    .unwrap_or_default(),
            ),
        ];
        let mut out = template.to_owned();
        for (k, v) in pairs {
            out = out.replace(&format!("{{{{{k}}}}}"), &toml_escape(&v));
        }
        let boot = match &self.boot {
            Some(b) => format!(
                "\n[boot]\nkernel = \"{}\"\ninitramfs = \"{}\"\ncmdline = \"{}\"\n",
                toml_escape(&b.kernel.display().to_string()),
                toml_escape(&b.initrd.display().to_string()),
                toml_escape(&b.cmdline)
            ),
            // Strata's own kernel and node-init. `no_timer_check`: under TCG on a loaded host
            // the kernel's IO-APIC timer check can fail and panic the boot.
            None => "\n[boot]\ncmdline = \"no_timer_check\"\n".to_owned(),
        };
        out.replace("{{boot}}", &boot)
    }
}

impl BootServer for Strata {
    fn name(&self) -> String {
        "strata".into()
    }

    fn start(&self, ctx: &ServerContext<'_>) -> Result<RunningServer> {
        if !self.binary.is_file() {
            bail!(
                "strata binary {} not found: build it with `cargo build -p strata-server --bin strata`",
                self.binary.display()
            );
        }
        let mut cmd = ctx.netns.command(&self.binary.to_string_lossy());
        cmd.arg("serve");
        match &self.config {
            StrataConfig::None => {}
            StrataConfig::Lab => {
                let path = ctx.dir.join("strata.toml");
                std::fs::write(&path, self.render(LAB_CONFIG_TEMPLATE, ctx))
                    .with_context(|| format!("writing {}", path.display()))?;
                cmd.arg("--config").arg(path);
            }
            StrataConfig::File(p) => {
                cmd.arg("--config").arg(p);
            }
            StrataConfig::Template(t) => {
                let path = ctx.dir.join("strata.toml");
                std::fs::write(&path, self.render(t, ctx))
                    .with_context(|| format!("writing {}", path.display()))?;
                cmd.arg("--config").arg(path);
            }
        }
        if let Some(d) = &self.data_dir {
            cmd.arg("--data-dir").arg(d);
        }
        cmd.args(&self.args);
        if let Some(v) = std::env::var_os("RUST_LOG") {
            cmd.env("RUST_LOG", v);
        }
        cmd.envs(self.env.iter().map(|(k, v)| (k, v)));
        let (p, log) = Proc::spawn_logged(
            "strata",
            cmd,
            &ctx.dir.join("strata.log"),
            echo(ctx, "strata"),
        )?;
        let mut server = RunningServer::new("strata", vec![p], vec![log.clone()]);
        for line in &self.ready {
            log.expect(0, line, &[], self.ready_timeout)
                .and_then(|_| server.check_alive())
                .context("starting strata serve")?;
        }
        Ok(server)
    }
}

/// Escapes a value for a TOML basic string ("...").
fn toml_escape(v: &str) -> String {
    let mut out = String::with_capacity(v.len());
    for c in v.chars() {
        match c {
            '"' => out.push_str("\\\""),
            '\\' => out.push_str("\\\\"),
            c if c.is_control() => out.push_str(&format!("\\u{:04x}", u32::from(c))),
            c => out.push(c),
        }
    }
    out
}

fn echo(ctx: &ServerContext<'_>, name: &str) -> Option<String> {
    ctx.echo.then(|| format!("[{name}] "))
}

/// The dotted netmask of a prefix length.
pub fn netmask(prefix_len: u8) -> Ipv4Addr {
    let bits = u32::MAX
        .checked_shl(32 - u32::from(prefix_len.min(32)))
        .unwrap_or(0);
    Ipv4Addr::from(bits)
}

/// Creates a directory that dnsmasq (which may read as `nobody`) can list.
fn make_dir(dir: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o755))
        .with_context(|| format!("setting permissions of {}", dir.display()))
}

fn copy_public(src: &Path, dst: &Path) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::copy(src, dst).with_context(|| {
        format!(
            "copying {} to {}: {}",
            src.display(),
            dst.display(),
            tools::hint(&src.to_string_lossy())
        )
    })?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting permissions of {}", dst.display()))
}

fn write_public(dst: &Path, bytes: &[u8]) -> Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::write(dst, bytes).with_context(|| format!("writing {}", dst.display()))?;
    std::fs::set_permissions(dst, std::fs::Permissions::from_mode(0o644))
        .with_context(|| format!("setting permissions of {}", dst.display()))
}

/// Waits until something listens on TCP `port` inside the namespace (checked with `ss`
/// every 10 ms), failing early if a process exits.
fn wait_tcp_listen(netns: &Netns, port: u16, procs: &mut [Proc]) -> Result<()> {
    let deadline = Instant::now() + Duration::from_secs(10);
    let filter = format!("sport = :{port}");
    loop {
        let out = crate::process::run(netns.command("ss").args(["-Hltn", &filter]))?;
        if !out.trim().is_empty() {
            return Ok(());
        }
        for p in procs.iter_mut() {
            if let Some(status) = p.try_wait()? {
                bail!(
                    "{} exited ({status}) before listening on port {port}",
                    p.name()
                );
            }
        }
        if Instant::now() >= deadline {
            let mut msg = String::new();
            let _ = write!(
                msg,
                "nothing listens on TCP port {port} in {} after 10 s",
                netns.name()
            );
            bail!(msg);
        }
        thread::sleep(Duration::from_millis(10));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn netmask_of_prefix() {
        assert_eq!(netmask(24), Ipv4Addr::new(255, 255, 255, 0));
        assert_eq!(netmask(0), Ipv4Addr::new(0, 0, 0, 0));
        assert_eq!(netmask(32), Ipv4Addr::new(255, 255, 255, 255));
    }

    #[test]
    fn toml_values_are_escaped() {
        assert_eq!(toml_escape(r#"a"b\c"#), r#"a\"b\\c"#);
        assert_eq!(toml_escape("x\ny"), "x\\u000ay");
    }

    #[test]
    fn lab_template_is_filled_in() {
        let ns_dir = std::path::PathBuf::from("/tmp/x");
        let mut s = Strata::new("/bin/true");
        s.boot = Some(BootFiles {
            kernel: "/k".into(),
            initrd: "/i".into(),
            cmdline: "console=ttyS0 x=\"y\"".into(),
        });
        let pairs = s.render_with(
            LAB_CONFIG_TEMPLATE,
            "br0",
            Ipv4Addr::new(10, 42, 0, 1),
            24,
            (Ipv4Addr::new(10, 42, 0, 100), Ipv4Addr::new(10, 42, 0, 199)),
            &ns_dir,
        );
        assert!(!pairs.contains("{{"), "{pairs}");
        assert!(pairs.contains("interface = \"br0\""));
        assert!(pairs.contains("pool_end = \"10.42.0.199\""));
        assert!(pairs.contains("data_dir = \"/tmp/x/data\""));
        assert!(
            pairs.contains("cmdline = \"console=ttyS0 x=\\\"y\\\"\""),
            "{pairs}"
        );
        s.boot = None;
        let text = s.render_with(
            LAB_CONFIG_TEMPLATE,
            "br0",
            Ipv4Addr::new(10, 42, 0, 1),
            24,
            (Ipv4Addr::new(10, 42, 0, 100), Ipv4Addr::new(10, 42, 0, 199)),
            &ns_dir,
        );
        assert!(
            text.contains("[boot]\ncmdline = \"no_timer_check\"\n"),
            "{text}"
        );
        assert!(!text.contains("kernel ="), "{text}");
    }
}
