//! The boot interface: found by its MAC in /sys/class/net, addressed from the kernel command
//! line (`strata.ip`, `strata.netmask`, `strata.gw`), brought up with `lo`.

use std::fs;
use std::net::Ipv4Addr;
use std::time::{Duration, Instant};

use crate::sys::netif;

/// A network set-up failure.
#[derive(Debug, thiserror::Error)]
pub enum NetError {
    /// No interface with the boot MAC appeared.
    #[error("no network interface with MAC {mac} (found: {found})")]
    NoInterface {
        /// The MAC.
        mac: String,
        /// Interfaces seen.
        found: String,
    },
    /// No DHCP lease within the time allowed.
    #[error("no DHCP lease on {iface} after {secs} s")]
    NoLease {
        /// Interface.
        iface: String,
        /// Seconds waited.
        secs: u64,
    },
    /// An ioctl failed.
    #[error("configuring {iface}")]
    Configure {
        /// Interface.
        iface: String,
        /// Cause.
        #[source]
        source: std::io::Error,
    },
}

/// Lists (name, mac) of every interface.
pub fn interfaces() -> Vec<(String, String)> {
    let mut out = Vec::new();
    if let Ok(rd) = fs::read_dir("/sys/class/net") {
        for e in rd.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let mac = fs::read_to_string(e.path().join("address")).unwrap_or_default();
            out.push((name, mac.trim().to_ascii_lowercase()));
        }
    }
    out.sort();
    out
}

/// Finds the interface with `mac` (waiting up to `wait` for it to appear); with no MAC, the
/// first interface that is not loopback.
pub fn find_interface(mac: Option<&str>, wait: Duration) -> Result<String, NetError> {
    let deadline = Instant::now() + wait;
    loop {
        let all = interfaces();
        let hit = all.iter().find(|(name, m)| match mac {
            Some(mac) => m == mac,
            None => name != "lo" && m != "00:00:00:00:00:00",
        });
        if let Some((name, _)) = hit {
            return Ok(name.clone());
        }
        if Instant::now() >= deadline {
            let found = all
                .iter()
                .map(|(n, m)| format!("{n}={m}"))
                .collect::<Vec<_>>()
                .join(" ");
            return Err(NetError::NoInterface {
                mac: mac.unwrap_or("any").into(),
                found,
            });
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Brings up `lo` and `iface` with a static address.
pub fn configure_static(
    iface: &str,
    ip: Ipv4Addr,
    netmask: Ipv4Addr,
    gw: Option<Ipv4Addr>,
) -> Result<(), NetError> {
    let err = |iface: &str| {
        let iface = iface.to_owned();
        move |source| NetError::Configure { iface, source }
    };
    netif::configure("lo", Ipv4Addr::LOCALHOST, Ipv4Addr::new(255, 0, 0, 0)).map_err(err("lo"))?;
    netif::configure(iface, ip, netmask).map_err(err(iface))?;
    if let Some(gw) = gw {
        netif::add_default_route(gw).map_err(err(iface))?;
    }
    Ok(())
}

/// Gets an address for `iface` by DHCP (broadcast, retransmitting with back-off from 1 s up to
/// 8 s, for at most `limit`) and configures it.
pub fn configure_dhcp(
    iface: &str,
    mac: &str,
    limit: Duration,
) -> Result<crate::dhcp::Lease, NetError> {
    use crate::dhcp::{DhcpClient, Step};
    let err = |source| NetError::Configure {
        iface: iface.to_owned(),
        source,
    };
    let mut hw = [0u8; 6];
    for (i, p) in mac.split(':').take(6).enumerate() {
        hw[i] = u8::from_str_radix(p, 16).unwrap_or(0);
    }
    netif::configure("lo", Ipv4Addr::LOCALHOST, Ipv4Addr::new(255, 0, 0, 0)).map_err(err)?;
    netif::set_up(iface).map_err(err)?;
    let sock = netif::dhcp_socket(iface).map_err(err)?;
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| d.subsec_nanos())
        .unwrap_or(0);
    let xid = u32::from_be_bytes([hw[2], hw[3], hw[4], hw[5]]) ^ nanos;
    let mut client = DhcpClient::new(hw, xid);
    let start = Instant::now();
    let mut wait = Duration::from_secs(1);
    let mut buf = vec![0u8; 1500];
    let dest = std::net::SocketAddrV4::new(Ipv4Addr::BROADCAST, 67);
    let mut next = client.current();
    while start.elapsed() < limit {
        if let Some(p) = next.take() {
            sock.send_to(&p.to_bytes(), dest).map_err(err)?;
        }
        let until = Instant::now() + wait;
        loop {
            let left = until.saturating_duration_since(Instant::now());
            if left.is_zero() {
                break;
            }
            sock.set_read_timeout(Some(left)).map_err(err)?;
            let n = match sock.recv(&mut buf) {
                Ok(n) => n,
                Err(e)
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) =>
                {
                    break
                }
                Err(e) => return Err(err(e)),
            };
            match client.on_datagram(buf.get(..n).unwrap_or_default()) {
                Step::Bound(lease) => {
                    netif::configure(iface, lease.ip, lease.netmask).map_err(err)?;
                    if let Some(gw) = lease.router {
                        netif::add_default_route(gw).map_err(err)?;
                    }
                    return Ok(lease);
                }
                Step::Send(p) => {
                    sock.send_to(&p.to_bytes(), dest).map_err(err)?;
                    wait = Duration::from_secs(1);
                    break;
                }
                Step::Ignore => {}
            }
        }
        next = client.current();
        wait = (wait * 2).min(Duration::from_secs(8));
    }
    Err(NetError::NoLease {
        iface: iface.to_owned(),
        secs: limit.as_secs(),
    })
}
