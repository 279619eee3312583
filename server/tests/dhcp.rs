//! The full DHCP server against a real client: busybox `udhcpc` in a network namespace,
//! joined to the server's namespace by a veth pair. Checks pool addresses, reservations,
//! renewal, PXE/iPXE boot answers, discovery reports, persistence in SQLite, and that
//! malformed packets and floods leave the server serving.

mod dhcp_lab;

use std::net::Ipv4Addr;
use std::path::Path;
use std::time::Duration;

use anyhow::{bail, Context, Result};
use dhcp_lab::{field, udhcpc_script, Link};
use strata_server::boot::dhcp::{
    BootConfig, DhcpServer, Discovered, LeaseStore, PoolConfig, Reservation, Subnet,
};
use tokio::sync::mpsc;
use tokio_util::sync::CancellationToken;
use wire::dhcp::MacAddr;

const SERVER: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 1);
const RESERVED_MAC: &str = "02:5e:00:00:00:aa";
const RESERVED_IP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 42);

/// Every log line of the servers in this test binary (tests run in parallel, so assertions
/// look for their own peer).
fn logs() -> &'static std::sync::Mutex<Vec<u8>> {
    static LOGS: std::sync::OnceLock<std::sync::Mutex<Vec<u8>>> = std::sync::OnceLock::new();
    LOGS.get_or_init(Default::default)
}

struct LogWriter;

impl std::io::Write for LogWriter {
    fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
        logs()
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend_from_slice(buf);
        // Also to the test's output, shown when a test fails.
        eprint!("{}", String::from_utf8_lossy(buf));
        Ok(buf.len())
    }

    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn init_logs() {
    let _ = tracing_subscriber::fmt()
        .with_env_filter("strata_server=debug")
        .with_ansi(false)
        .with_writer(|| LogWriter)
        .try_init();
}

/// Asserts that a WARN line holding every one of `parts` was logged.
fn assert_warned(parts: &[&str]) {
    let text =
        String::from_utf8_lossy(&logs().lock().unwrap_or_else(|p| p.into_inner())).into_owned();
    assert!(
        text.lines()
            .any(|l| l.contains(" WARN ") && parts.iter().all(|p| l.contains(p))),
        "no WARN line with {parts:?} in the server's log"
    );
}

struct Lab {
    link: Link,
    dir: tempfile::TempDir,
    db: std::path::PathBuf,
    discovered: mpsc::Receiver<Discovered>,
    cancel: CancellationToken,
    task: tokio::task::JoinHandle<Result<(), strata_server::boot::dhcp::DhcpServerError>>,
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.cancel.cancel();
    }
}

async fn lab(tag: &str) -> Result<Lab> {
    init_logs();
    dhcp_lab::require("busybox", "busybox-static")?;
    let link = Link::new(tag, "10.77.0.1/24")?;
    let socket = link.server.udp("0.0.0.0:67", Some("srv0"))?;
    let dir = tempfile::tempdir()?;
    let db = dir.path().join("leases.db");
    let store = LeaseStore::open(&db).await?;
    let mut pool = PoolConfig::new(
        Subnet {
            addr: Ipv4Addr::new(10, 77, 0, 0),
            prefix_len: 24,
        },
        Ipv4Addr::new(10, 77, 0, 100),
        Ipv4Addr::new(10, 77, 0, 109),
    );
    pool.router = Some(SERVER);
    pool.dns = vec![SERVER];
    pool.reservations.push(Reservation {
        mac: RESERVED_MAC.parse()?,
        ip: RESERVED_IP,
        hostname: Some("node-aa".into()),
    });
    let boot = BootConfig::new(SERVER, "http://10.77.0.1:8080/boot/ipxe");
    let (tx, discovered) = mpsc::channel(16);
    let server = DhcpServer::new(socket, pool, boot, store, Some(tx)).await?;
    let cancel = CancellationToken::new();
    let task = tokio::spawn(server.run(cancel.child_token()));
    Ok(Lab {
        link,
        dir,
        db,
        discovered,
        cancel,
        task,
    })
}

impl Lab {
    fn set_mac(&self, mac: &str) -> Result<()> {
        self.link
            .client
            .ip(&["link", "set", "cli0", "address", mac])?;
        Ok(())
    }

    /// One `udhcpc -q` run; returns its "bound" line.
    async fn udhcpc(&self, extra: &[&str]) -> Result<String> {
        let (script, log) = udhcpc_script(self.dir.path())?;
        let _ = std::fs::remove_file(&log);
        let mut cmd = self.link.client.command("busybox");
        cmd.args([
            "udhcpc", "-i", "cli0", "-f", "-q", "-n", "-t", "6", "-T", "1", "-s",
        ])
        .arg(&script)
        .args(extra);
        let out = tokio::time::timeout(Duration::from_secs(60), cmd.output())
            .await
            .context("udhcpc hung")??;
        if !out.status.success() {
            bail!("udhcpc failed: {}", String::from_utf8_lossy(&out.stderr));
        }
        let text = std::fs::read_to_string(&log)?;
        text.lines()
            .find(|l| l.starts_with("bound"))
            .map(str::to_owned)
            .context(format!("no lease: {text}"))
    }
}

async fn wait_for_line(log: &Path, prefix: &str, count: usize) -> Result<String> {
    for _ in 0..1200 {
        if let Ok(text) = std::fs::read_to_string(log) {
            let lines: Vec<_> = text.lines().filter(|l| l.starts_with(prefix)).collect();
            if lines.len() >= count {
                return Ok(lines[count - 1].to_owned());
            }
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    bail!("no {prefix:?} line in {}", log.display())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn udhcpc_pool_reservation_renewal_and_persistence() -> Result<()> {
    let mut lab = lab("dhcp").await?;

    // A pool address, with the subnet's settings.
    lab.set_mac("02:5e:00:00:00:01")?;
    let bound = lab.udhcpc(&[]).await?;
    assert_eq!(field(&bound, "ip"), Some("10.77.0.100"), "{bound}");
    assert_eq!(field(&bound, "mask"), Some("24"), "{bound}");
    assert_eq!(field(&bound, "router"), Some("10.77.0.1"), "{bound}");
    assert_eq!(field(&bound, "lease"), Some("3600"), "{bound}");
    assert_eq!(field(&bound, "serverid"), Some("10.77.0.1"), "{bound}");
    assert_eq!(
        field(&bound, "boot_file"),
        Some(""),
        "plain clients get no boot file: {bound}"
    );
    let d = lab.discovered.recv().await.context("discovery report")?;
    assert_eq!(d.mac, "02:5e:00:00:00:01".parse::<MacAddr>()?);

    // The same client asking again gets the same address.
    let bound = lab.udhcpc(&[]).await?;
    assert_eq!(field(&bound, "ip"), Some("10.77.0.100"), "{bound}");

    // A reservation gets its fixed address and host name, and is not "discovered".
    lab.set_mac(RESERVED_MAC)?;
    let bound = lab.udhcpc(&[]).await?;
    assert_eq!(field(&bound, "ip"), Some("10.77.0.42"), "{bound}");
    assert_eq!(field(&bound, "hostname"), Some("node-aa"), "{bound}");

    // A second dynamic client gets the next address.
    lab.set_mac("02:5e:00:00:00:02")?;
    let bound = lab.udhcpc(&[]).await?;
    assert_eq!(field(&bound, "ip"), Some("10.77.0.101"), "{bound}");

    // Renewal: a long-running udhcpc renews on SIGUSR1 (unicast REQUEST from its address).
    let store = LeaseStore::open(&lab.db).await?;
    let before = store
        .load()
        .await?
        .into_iter()
        .find(|l| l.ip == Ipv4Addr::new(10, 77, 0, 101))
        .context("lease persisted")?;
    let (script, log) = udhcpc_script(lab.dir.path())?;
    let _ = std::fs::remove_file(&log);
    let mut child = lab
        .link
        .client
        .command("busybox")
        .args(["udhcpc", "-i", "cli0", "-f", "-t", "6", "-T", "1", "-s"])
        .arg(&script)
        .spawn()?;
    wait_for_line(&log, "bound", 1).await?;
    tokio::time::sleep(Duration::from_millis(1100)).await; // lease expiry has 1 s resolution
    let pid = child.id().context("udhcpc pid")?;
    // `ip netns exec` execs udhcpc, so the pid is udhcpc's.
    dhcp_lab::run("kill", &["-USR1", &pid.to_string()])?;
    let renew = wait_for_line(&log, "renew", 1).await?;
    assert_eq!(field(&renew, "ip"), Some("10.77.0.101"), "{renew}");
    let after = store
        .load()
        .await?
        .into_iter()
        .find(|l| l.ip == Ipv4Addr::new(10, 77, 0, 101))
        .context("lease persisted")?;
    assert!(
        after.expires > before.expires,
        "renewal extends the lease: {before:?} -> {after:?}"
    );
    child.kill().await?;

    assert!(!lab.task.is_finished(), "server still running");
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn boot_answers_by_architecture_and_user_class() -> Result<()> {
    let lab = lab("dhcpboot").await?;
    lab.set_mac("02:5e:00:00:00:10")?;
    let bios = lab
        .udhcpc(&["-V", "PXEClient:Arch:00000:UNDI:002001", "-x", "0x5d:0000"])
        .await?;
    assert_eq!(field(&bios, "boot_file"), Some("undionly.kpxe"), "{bios}");
    assert_eq!(field(&bios, "siaddr"), Some("10.77.0.1"), "{bios}");

    let uefi = lab
        .udhcpc(&["-V", "PXEClient:Arch:00007:UNDI:003016", "-x", "0x5d:0007"])
        .await?;
    assert_eq!(field(&uefi, "boot_file"), Some("snponly.efi"), "{uefi}");

    // iPXE (user class "iPXE") gets the script URL, not iPXE again.
    let ipxe = lab
        .udhcpc(&[
            "-V",
            "PXEClient:Arch:00000:UNDI:002001",
            "-x",
            "0x4d:69505845",
        ])
        .await?;
    assert_eq!(
        field(&ipxe, "boot_file"),
        Some("http://10.77.0.1:8080/boot/ipxe"),
        "{ipxe}"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_packets_and_floods_leave_clients_served() -> Result<()> {
    let lab = lab("dhcpbad").await?;
    lab.link
        .client
        .ip(&["addr", "add", "10.77.0.250/24", "dev", "cli0"])?;
    let flood = lab.link.client.udp("10.77.0.250:68", Some("cli0"))?;
    let to = "255.255.255.255:67";
    let valid = {
        let mut b = vec![0u8; 240];
        b[0] = 1;
        b[1] = 1;
        b[2] = 6;
        b[28..34].copy_from_slice(&[2, 0x5e, 0, 0, 0, 0x77]);
        b[236..240].copy_from_slice(&wire::dhcp::MAGIC_COOKIE);
        b
    };
    let mut bad: Vec<Vec<u8>> = vec![
        vec![],
        vec![0xff; 10],
        vec![1; 239],
        {
            let mut b = valid.clone();
            b[236] = 0;
            b
        }, // no cookie
        {
            let mut b = valid.clone();
            b[2] = 200;
            b
        }, // hlen overflow
        {
            let mut b = valid.clone();
            b.extend_from_slice(&[12, 250, b'x']);
            b
        }, // option overrun
        {
            let mut b = valid.clone();
            b.extend_from_slice(&[53, 4, 1, 1, 1, 1, 255]);
            b
        }, // bad length
        {
            let mut b = valid.clone();
            b.extend_from_slice(&[52, 1, 3, 255]);
            b[108] = 52;
            b[109] = 1;
            b[110] = 3;
            b
        }, // nested overload
        {
            let mut b = valid.clone();
            b.extend(std::iter::repeat_n(0u8, 8000));
            b
        }, // all padding, no type
    ];
    // A flood of well-formed DISCOVERs from many MACs with a long option.
    for i in 0..200u32 {
        let mut b = valid.clone();
        b[30..34].copy_from_slice(&i.to_be_bytes());
        b.extend_from_slice(&[53, 1, 1, 43, 255]);
        b.extend(std::iter::repeat_n(7u8, 255));
        b.push(255);
        bad.push(b);
    }
    for _ in 0..10 {
        for b in &bad {
            flood.send_to(b, to).await?;
        }
    }
    lab.link.client.ip(&["addr", "flush", "dev", "cli0"])?;
    // Real clients are still served: the reservation, and a dynamic client although the
    // flood's 200 MACs hold offers for every one of the 10 pool addresses (the oldest offer is
    // taken back when the pool is full).
    lab.set_mac(RESERVED_MAC)?;
    let bound = lab.udhcpc(&[]).await?;
    assert_eq!(field(&bound, "ip"), Some("10.77.0.42"), "{bound}");
    lab.set_mac("02:5e:00:00:00:05")?;
    let bound = lab.udhcpc(&[]).await?;
    let ip: Ipv4Addr = field(&bound, "ip").context("ip")?.parse()?;
    assert!((100..=109).contains(&ip.octets()[3]), "{bound}");
    assert!(!lab.task.is_finished(), "server survived");
    // The malformed packets were logged clearly, naming the sender (the first of them: past
    // 20 warnings a second the server counts instead of logging).
    assert_warned(&["peer=10.77.0.250:68", "dropping malformed DHCP packet"]);
    Ok(())
}
