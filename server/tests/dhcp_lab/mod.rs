//! Network-namespace fixtures for the boot-service tests (DHCP, proxyDHCP, router
//! advertisements): namespaces joined by veth pairs, sockets created inside a namespace from
//! a helper thread (a socket stays in the namespace it was created in), and commands run in a
//! namespace with `ip netns exec`. Needs root and iproute2; a missing tool fails the test with
//! an install hint.
#![allow(dead_code)]

use std::os::fd::AsFd;
use std::process::Command;
use std::sync::atomic::{AtomicU32, Ordering};

use anyhow::{bail, Context, Result};

static NEXT: AtomicU32 = AtomicU32::new(0);

/// Runs a command, failing with its stderr.
pub fn run(cmd: &str, args: &[&str]) -> Result<String> {
    let out = Command::new(cmd).args(args).output().with_context(|| {
        format!(
            "cannot run {cmd}: install it (apt-get install iproute2 busybox-static dnsmasq-base)"
        )
    })?;
    if !out.status.success() {
        bail!(
            "{cmd} {}: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Fails with an install hint when a peer tool is missing.
pub fn require(tool: &str, package: &str) -> Result<()> {
    let found = std::env::var_os("PATH")
        .map(|p| std::env::split_paths(&p).any(|d| d.join(tool).is_file()))
        .unwrap_or(false);
    if !found {
        bail!("{tool} not found: install it with `apt-get install {package}` (scripts/setup.sh)");
    }
    Ok(())
}

/// A network namespace, deleted on drop.
pub struct Netns {
    pub name: String,
}

impl Netns {
    pub fn new(tag: &str) -> Result<Netns> {
        require("ip", "iproute2")?;
        let name = format!(
            "strata-{tag}-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        );
        run("ip", &["netns", "add", &name])?;
        let ns = Netns { name };
        ns.ip(&["link", "set", "lo", "up"])?;
        // IPv6 off unless a test wants it: no router solicitations or DAD in the way.
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.all.disable_ipv6=1"])?;
        ns.exec("sysctl", &["-qw", "net.ipv6.conf.default.disable_ipv6=1"])?;
        Ok(ns)
    }

    /// `ip -n NS ...`
    pub fn ip(&self, args: &[&str]) -> Result<String> {
        let mut a = vec!["-n", self.name.as_str()];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// Runs `cmd` inside the namespace and waits for it.
    pub fn exec(&self, cmd: &str, args: &[&str]) -> Result<String> {
        let mut a = vec!["netns", "exec", self.name.as_str(), cmd];
        a.extend_from_slice(args);
        run("ip", &a)
    }

    /// A command to spawn inside the namespace.
    pub fn command(&self, cmd: &str) -> tokio::process::Command {
        let mut c = tokio::process::Command::new("ip");
        c.args(["netns", "exec", &self.name, cmd])
            .kill_on_drop(true);
        c
    }

    /// Runs `f` on a thread that has entered this namespace (sockets it creates live there).
    pub fn within<T: Send + 'static>(
        &self,
        f: impl FnOnce() -> Result<T> + Send + 'static,
    ) -> Result<T> {
        let path = format!("/run/netns/{}", self.name);
        std::thread::spawn(move || -> Result<T> {
            let file = std::fs::File::open(&path).with_context(|| format!("open {path}"))?;
            rustix::thread::move_into_link_name_space(
                file.as_fd(),
                Some(rustix::thread::LinkNameSpaceType::Network),
            )
            .context("setns")?;
            f()
        })
        .join()
        .map_err(|_| anyhow::anyhow!("namespace thread panicked"))?
    }

    /// A UDP socket bound inside the namespace, with SO_BROADCAST, SO_REUSEADDR and, if
    /// given, SO_BINDTODEVICE (what `strata serve` sets for DHCP).
    pub fn udp(&self, addr: &str, device: Option<&str>) -> Result<tokio::net::UdpSocket> {
        let addr: std::net::SocketAddr = addr.parse()?;
        let device = device.map(str::to_owned);
        let std = self.within(move || {
            let s = socket2::Socket::new(
                socket2::Domain::IPV4,
                socket2::Type::DGRAM,
                Some(socket2::Protocol::UDP),
            )?;
            s.set_reuse_address(true)?;
            s.set_broadcast(true)?;
            if let Some(d) = device {
                s.bind_device(Some(d.as_bytes()))?;
            }
            s.set_nonblocking(true)?;
            s.bind(&addr.into())?;
            Ok(std::net::UdpSocket::from(s))
        })?;
        Ok(tokio::net::UdpSocket::from_std(std)?)
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        let _ = Command::new("ip")
            .args(["netns", "del", &self.name])
            .status();
    }
}

/// Two namespaces joined by a veth pair: `server` has `srv0` with `server_cidr`, `client` has
/// `cli0` up and unconfigured.
pub struct Link {
    pub server: Netns,
    pub client: Netns,
}

impl Link {
    pub fn new(tag: &str, server_cidr: &str) -> Result<Link> {
        let server = Netns::new(&format!("{tag}-s"))?;
        let client = Netns::new(&format!("{tag}-c"))?;
        run(
            "ip",
            &[
                "link",
                "add",
                "srv0",
                "netns",
                &server.name,
                "type",
                "veth",
                "peer",
                "name",
                "cli0",
                "netns",
                &client.name,
            ],
        )?;
        server.ip(&["addr", "add", server_cidr, "dev", "srv0"])?;
        server.ip(&["link", "set", "srv0", "up"])?;
        client.ip(&["link", "set", "cli0", "up"])?;
        Ok(Link { server, client })
    }
}

/// Writes an executable udhcpc script that appends `$1` and the lease variables to `log`
/// and configures the address on bound/renew.
pub fn udhcpc_script(dir: &std::path::Path) -> Result<(std::path::PathBuf, std::path::PathBuf)> {
    use std::os::unix::fs::PermissionsExt;
    let log = dir.join("udhcpc.log");
    let script = dir.join("udhcpc.sh");
    std::fs::write(
        &script,
        format!(
            "#!/bin/sh\n\
             echo \"$1 ip=$ip mask=$mask router=$router dns=$dns lease=$lease siaddr=$siaddr \
             boot_file=$boot_file serverid=$serverid hostname=$hostname\" >> {log}\n\
             case \"$1\" in bound|renew) busybox ip addr flush dev \"$interface\"; \
             busybox ip addr add \"$ip/$mask\" dev \"$interface\";; esac\n",
            log = log.display()
        ),
    )?;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755))?;
    Ok((script, log))
}

/// The value of `key=` in a udhcpc log line.
pub fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}
