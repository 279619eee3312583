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
    /// No static address on the command line (DHCP is not implemented in node-init yet).
    #[error("no strata.ip on the kernel command line")]
    NoAddress,
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
