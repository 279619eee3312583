//! The lab: a network namespace holding a bridge (`br0`, multicast snooping off) with the boot
//! server's address, the boot servers, and the VMs' tap devices.
//!
//! Everything is torn down when the [`Lab`] and its [`TestVm`]s are dropped, on success and on
//! failure alike. After a failure (a failed wait, or a panic while a lab object is alive) the
//! tails of every serial and server log are printed to stderr and the lab's directory is kept.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use anyhow::{bail, Context, Result};

use crate::log::LogStream;
use crate::netns::Netns;
use crate::server::{BootServer, RunningServer, ServerContext};
use crate::tools;
use crate::vm::{TestVm, VmConfig};

/// The bridge's name inside the namespace.
pub const BRIDGE: &str = "br0";

/// How to build a lab.
#[derive(Debug, Clone)]
pub struct LabConfig {
    /// The boot server's address on the bridge.
    pub server_ip: Ipv4Addr,
    /// The bridge subnet's prefix length.
    pub prefix_len: u8,
    /// The addresses a DHCP server in the lab may hand out.
    pub dhcp_range: (Ipv4Addr, Ipv4Addr),
    /// IPv6 on the bridge (link-local plus [`LabConfig::ipv6_address`]), for servers that send
    /// router advertisements. Off by default: it only adds noise (router solicitations, MLD).
    /// The VMs' taps never have IPv6; the bridge forwards their IPv6 frames either way.
    pub ipv6: bool,
    /// The bridge's IPv6 address when [`LabConfig::ipv6`] is on.
    pub ipv6_address: String,
    /// Where logs, VM files and server files go; a fresh temporary directory when unset.
    pub work_dir: Option<PathBuf>,
    /// Echo serial consoles and server logs to stderr, prefixed by their names.
    pub echo: bool,
}

impl Default for LabConfig {
    fn default() -> Self {
        Self {
            server_ip: Ipv4Addr::new(10, 42, 0, 1),
            prefix_len: 24,
            dhcp_range: (Ipv4Addr::new(10, 42, 0, 100), Ipv4Addr::new(10, 42, 0, 199)),
            ipv6: false,
            ipv6_address: "fd42:42::1/64".into(),
            work_dir: None,
            echo: false,
        }
    }
}

/// State shared by the lab and its VMs: the namespace lives until the last of them drops.
#[derive(Debug)]
pub(crate) struct LabShared {
    netns: Netns,
    dir: PathBuf,
    temp: Mutex<Option<tempfile::TempDir>>,
    failed: AtomicBool,
    logs: Mutex<Vec<LogStream>>,
}

impl LabShared {
    pub(crate) fn netns(&self) -> &Netns {
        &self.netns
    }

    pub(crate) fn dir(&self) -> &Path {
        &self.dir
    }

    pub(crate) fn bridge(&self) -> &str {
        BRIDGE
    }

    pub(crate) fn mark_failed(&self) {
        self.failed.store(true, Ordering::Relaxed);
    }

    fn logs(&self) -> MutexGuard<'_, Vec<LogStream>> {
        self.logs
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    pub(crate) fn register_log(&self, log: LogStream) {
        self.logs().push(log);
    }

    /// The tails of the server logs (for a VM's wait error).
    pub(crate) fn server_tails(&self, lines: usize) -> String {
        let logs = self.logs();
        let mut out = String::new();
        for l in logs.iter().filter(|l| {
            l.path()
                .parent()
                .is_some_and(|p| p.starts_with(self.dir.join("servers")))
        }) {
            out.push_str(&format!(
                "--- last lines of {} ({}) ---\n{}\n",
                l.name(),
                l.path().display(),
                l.tail(lines)
            ));
        }
        out
    }
}

impl Drop for LabShared {
    fn drop(&mut self) {
        if std::thread::panicking() {
            self.mark_failed();
        }
        if !self.failed.load(Ordering::Relaxed) {
            return;
        }
        let logs = self.logs();
        for l in logs.iter() {
            eprintln!(
                "--- {} ({}): last lines ---\n{}",
                l.name(),
                l.path().display(),
                l.tail(60)
            );
        }
        drop(logs);
        let temp = self
            .temp
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .take();
        if let Some(t) = temp {
            let kept = t.keep();
            eprintln!(
                "--- the lab failed: its files are kept in {}",
                kept.display()
            );
        } else {
            eprintln!(
                "--- the lab failed: its files are in {}",
                self.dir.display()
            );
        }
    }
}

/// A lab: namespace, bridge, servers. VMs started from it are [`TestVm`]s.
#[derive(Debug)]
pub struct Lab {
    shared: Arc<LabShared>,
    config: LabConfig,
    servers: Vec<RunningServer>,
    server_starts: u32,
    next_vm: u32,
}

impl Lab {
    /// Creates the namespace and the bridge with the server's address.
    pub fn new(config: LabConfig) -> Result<Self> {
        tools::require_root()?;
        tools::require(&["ip", "ss"], &[])?;
        let (dir, temp) = match &config.work_dir {
            Some(d) => {
                std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
                (d.clone(), None)
            }
            None => {
                let t = tempfile::Builder::new()
                    .prefix("strata-lab-")
                    .tempdir()
                    .context("creating the lab directory")?;
                (t.path().to_owned(), Some(t))
            }
        };
        let netns = Netns::create()?;
        let shared = Arc::new(LabShared {
            netns,
            dir,
            temp: Mutex::new(temp),
            failed: AtomicBool::new(false),
            logs: Mutex::new(Vec::new()),
        });
        let lab = Self {
            shared,
            config,
            servers: Vec::new(),
            server_starts: 0,
            next_vm: 0,
        };
        lab.setup_network()
            .inspect_err(|_| lab.shared.mark_failed())?;
        Ok(lab)
    }

    fn setup_network(&self) -> Result<()> {
        let ns = &self.shared.netns;
        // New interfaces inherit `default`: the taps never get IPv6.
        ns.sysctl("net.ipv6.conf.all.disable_ipv6", "1")?;
        ns.sysctl("net.ipv6.conf.default.disable_ipv6", "1")?;
        ns.ip(&[
            "link",
            "add",
            BRIDGE,
            "type",
            "bridge",
            "mcast_snooping",
            "0",
            "forward_delay",
            "0",
        ])?;
        if self.config.ipv6 {
            ns.sysctl("net.ipv6.conf.all.disable_ipv6", "0")?;
            ns.sysctl(&format!("net.ipv6.conf.{BRIDGE}.disable_ipv6"), "0")?;
            ns.sysctl(&format!("net.ipv6.conf.{BRIDGE}.accept_dad"), "0")?;
        }
        let addr = format!("{}/{}", self.config.server_ip, self.config.prefix_len);
        ns.ip(&["addr", "add", &addr, "dev", BRIDGE])?;
        ns.ip(&["link", "set", BRIDGE, "up"])?;
        if self.config.ipv6 {
            ns.ip(&[
                "-6",
                "addr",
                "add",
                &self.config.ipv6_address,
                "dev",
                BRIDGE,
                "nodad",
            ])?;
        }
        Ok(())
    }

    /// The lab's configuration.
    pub fn config(&self) -> &LabConfig {
        &self.config
    }

    /// The lab's namespace name (`ip netns exec <name> ...`).
    pub fn netns_name(&self) -> &str {
        self.shared.netns.name()
    }

    /// A command running `program` inside the lab's namespace.
    pub fn command(&self, program: &str) -> Command {
        self.shared.netns.command(program)
    }

    /// Runs `f` with the calling context moved into the lab's network (see [`Netns::run`]):
    /// `lab.in_netns(|| TcpStream::connect("10.42.0.1:8080"))??`.
    pub fn in_netns<R: Send>(&self, f: impl FnOnce() -> R + Send) -> Result<R> {
        self.shared.netns.run(f)
    }

    /// A plain HTTP/1.0 GET from inside the lab's network (a server's API or counters):
    /// returns the body of a 2xx answer, fails with the status line otherwise.
    pub fn http_get(&self, addr: std::net::SocketAddr, path: &str) -> Result<Vec<u8>> {
        use std::io::{Read, Write};
        let mut stream = self
            .in_netns(|| {
                std::net::TcpStream::connect_timeout(&addr, std::time::Duration::from_secs(10))
            })?
            .with_context(|| format!("connecting to {addr} in {}", self.netns_name()))?;
        stream
            .set_read_timeout(Some(std::time::Duration::from_secs(60)))
            .context("setting a timeout")?;
        write!(
            stream,
            "GET {path} HTTP/1.0\r\nHost: {addr}\r\nConnection: close\r\n\r\n"
        )
        .with_context(|| format!("sending GET {path} to {addr}"))?;
        let mut answer = Vec::new();
        stream
            .read_to_end(&mut answer)
            .with_context(|| format!("reading the answer to GET {path}"))?;
        let Some(split) = answer.windows(4).position(|w| w == b"\r\n\r\n") else {
            bail!(
                "GET {path} from {addr}: no HTTP header in {} bytes",
                answer.len()
            );
        };
        let head = String::from_utf8_lossy(answer.get(..split).unwrap_or_default()).into_owned();
        let status = head.lines().next().unwrap_or_default().to_owned();
        let code = status
            .split_whitespace()
            .nth(1)
            .and_then(|c| c.parse::<u16>().ok());
        if !code.is_some_and(|c| (200..300).contains(&c)) {
            bail!("GET {path} from {addr}: {status}");
        }
        Ok(answer.get(split + 4..).unwrap_or_default().to_vec())
    }

    /// The lab's directory (logs, VM files, server files).
    pub fn dir(&self) -> &Path {
        &self.shared.dir
    }

    /// Marks the lab failed: its logs are dumped and its directory kept when it drops.
    pub fn mark_failed(&self) {
        self.shared.mark_failed();
    }

    /// Forgets an expected failure (a test that provoked a failed wait on purpose).
    pub fn clear_failed(&self) {
        self.shared.failed.store(false, Ordering::Relaxed);
    }

    /// Starts a boot server in the namespace and returns its index for [`Lab::server`].
    pub fn start_server(&mut self, server: &dyn BootServer) -> Result<usize> {
        let dir = self.shared.dir.join("servers").join(format!(
            "{}-{}",
            server.name(),
            self.server_starts
        ));
        self.server_starts += 1;
        std::fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let ctx = ServerContext {
            netns: &self.shared.netns,
            bridge: BRIDGE,
            server_ip: self.config.server_ip,
            prefix_len: self.config.prefix_len,
            dhcp_range: self.config.dhcp_range,
            ipv6: self
                .config
                .ipv6
                .then_some(self.config.ipv6_address.as_str()),
            dir,
            echo: self.config.echo,
        };
        let running = server
            .start(&ctx)
            .inspect_err(|_| self.shared.mark_failed())?;
        for l in running.logs() {
            self.shared.register_log(l.clone());
        }
        self.servers.push(running);
        Ok(self.servers.len() - 1)
    }

    /// A started server.
    pub fn server(&self, index: usize) -> Result<&RunningServer> {
        match self.servers.get(index) {
            Some(s) => Ok(s),
            None => bail!("no server {index} in this lab"),
        }
    }

    /// A started server, mutably (to stop or kill it).
    pub fn server_mut(&mut self, index: usize) -> Result<&mut RunningServer> {
        match self.servers.get_mut(index) {
            Some(s) => Ok(s),
            None => bail!("no server {index} in this lab"),
        }
    }

    /// Starts a VM on a new tap device on the bridge.
    pub fn start_vm(&mut self, config: VmConfig) -> Result<TestVm> {
        let index = self.next_vm;
        self.next_vm += 1;
        TestVm::start(Arc::clone(&self.shared), config, index, self.config.echo)
            .inspect_err(|_| self.shared.mark_failed())
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        for s in &mut self.servers {
            s.stop();
        }
    }
}
