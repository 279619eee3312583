//! The `strata.*` kernel command line parameters (written by the server's iPXE script):
//!
//! | key | value |
//! | --- | --- |
//! | `strata.server` | `http://IP[:PORT]` (an IPv4 literal; no DNS in the initramfs) |
//! | `strata.mac` | boot interface MAC, any case, `:` or `-` separated |
//! | `strata.ip`, `strata.netmask`, `strata.gw` | static IPv4 configuration (gw may be empty) |
//! | `strata.disk` | cache block device (default: the first of `/dev/vda`, `/dev/sda`, `/dev/nvme0n1`), or `ram` (diskless: the cache is a tmpfs) |
//! | `strata.mode` | `normal` (default) or `lkg` (boot the last known good version without asking the server) |
//! | `strata.iscsi` | `IP[:PORT]`: diskless, the chain is attached from this iSCSI portal (node-init's `iscsi` module) |
//! | `strata.iscsi_secret` | the node's CHAP secret for `strata.iscsi` (12 to 255 printable characters) |
//! | `strata.agent` | the agent's report interval in seconds (1-86400; default 60), handed to `node-init agent run` through `boot.json` |
//!
//! Unknown `strata.*` keys are refused, so a typo never silently changes behaviour.

use std::net::{Ipv4Addr, SocketAddrV4};

/// `strata.disk=ram`: keep the cache in memory (diskless nodes without iSCSI).
pub const RAM_DISK: &str = "ram";

/// Parsed parameters.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct Cmdline {
    /// The server's HTTP address.
    pub server: Option<SocketAddrV4>,
    /// Boot MAC, canonical lower-case colon form.
    pub mac: Option<String>,
    /// Static address.
    pub ip: Option<Ipv4Addr>,
    /// Static netmask (default 255.255.255.0 when `ip` is set).
    pub netmask: Option<Ipv4Addr>,
    /// Default gateway.
    pub gw: Option<Ipv4Addr>,
    /// Cache device path.
    pub disk: Option<String>,
    /// Skip the server and boot the last known good version.
    pub lkg_only: bool,
    /// The agent's report interval (seconds).
    pub agent_interval: Option<u64>,
    /// Diskless over iSCSI: the portal (`strata.iscsi`).
    pub iscsi: Option<SocketAddrV4>,
    /// The node's CHAP secret for `strata.iscsi`.
    pub iscsi_secret: Option<String>,
}

/// A bad parameter.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum CmdlineError {
    /// A value that does not parse.
    #[error("kernel parameter {key}={value:?}: {why}")]
    Value {
        /// The key.
        key: String,
        /// The value.
        value: String,
        /// What is wrong.
        why: &'static str,
    },
    /// An unknown `strata.` key.
    #[error("unknown kernel parameter {key}")]
    UnknownKey {
        /// The key.
        key: String,
    },
}

/// Normalises a MAC to lower-case colon form.
pub fn canonical_mac(s: &str) -> Option<String> {
    let parts: Vec<&str> = s.split([':', '-']).collect();
    if parts.len() != 6 || parts.iter().any(|p| p.len() != 2) {
        return None;
    }
    let mut out = Vec::with_capacity(6);
    for p in parts {
        out.push(format!("{:02x}", u8::from_str_radix(p, 16).ok()?));
    }
    Some(out.join(":"))
}

fn parse_server(v: &str) -> Option<SocketAddrV4> {
    let rest = v.strip_prefix("http://")?;
    let rest = rest.strip_suffix('/').unwrap_or(rest);
    if let Ok(sa) = rest.parse::<SocketAddrV4>() {
        return Some(sa);
    }
    rest.parse::<Ipv4Addr>()
        .ok()
        .map(|ip| SocketAddrV4::new(ip, 80))
}

impl Cmdline {
    /// Parses `/proc/cmdline` text.
    pub fn parse(text: &str) -> Result<Self, CmdlineError> {
        let mut c = Cmdline::default();
        for word in text.split_ascii_whitespace() {
            let Some(rest) = word.strip_prefix("strata.") else {
                continue;
            };
            let (key, value) = rest.split_once('=').unwrap_or((rest, ""));
            let bad = |why| CmdlineError::Value {
                key: format!("strata.{key}"),
                value: value.to_owned(),
                why,
            };
            let ip = |v: &str| {
                v.parse::<Ipv4Addr>()
                    .map_err(|_| bad("not an IPv4 address"))
            };
            match key {
                "server" => {
                    c.server =
                        Some(parse_server(value).ok_or_else(|| bad("not http://IPv4[:port]"))?)
                }
                "mac" => {
                    c.mac = Some(canonical_mac(value).ok_or_else(|| bad("not a MAC address"))?)
                }
                "ip" if !value.is_empty() => c.ip = Some(ip(value)?),
                "netmask" if !value.is_empty() => c.netmask = Some(ip(value)?),
                "gw" if !value.is_empty() => c.gw = Some(ip(value)?),
                "ip" | "netmask" | "gw" => {}
                "disk" => {
                    if value != RAM_DISK && (!value.starts_with("/dev/") || value.contains("..")) {
                        return Err(bad("not a /dev/ path or `ram`"));
                    }
                    c.disk = Some(value.to_owned());
                }
                "agent" => {
                    c.agent_interval = Some(
                        value
                            .parse::<u64>()
                            .ok()
                            .filter(|s| (1..=86_400).contains(s))
                            .ok_or_else(|| bad("not a number of seconds in 1..=86400"))?,
                    )
                }
                "iscsi" => {
                    c.iscsi = Some(
                        crate::iscsi::parse_portal(value).ok_or_else(|| bad("not IPv4[:port]"))?,
                    )
                }
                "iscsi_secret" => {
                    if !crate::iscsi::valid_secret(value) {
                        return Err(bad("not 12 to 255 printable characters"));
                    }
                    c.iscsi_secret = Some(value.to_owned());
                }
                "mode" => match value {
                    "normal" => c.lkg_only = false,
                    "lkg" => c.lkg_only = true,
                    _ => return Err(bad("not normal or lkg")),
                },
                _ => {
                    return Err(CmdlineError::UnknownKey {
                        key: format!("strata.{key}"),
                    })
                }
            }
        }
        Ok(c)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn full_line() {
        let c = Cmdline::parse(
            "console=ttyS0 panic=10 strata.server=http://10.0.2.2:8080 strata.mac=52-54-00-AB-CD-EF \
             strata.ip=10.0.2.15 strata.netmask=255.255.255.0 strata.gw= quiet",
        )
        .unwrap();
        assert_eq!(c.server, Some("10.0.2.2:8080".parse().unwrap()));
        assert_eq!(c.mac.as_deref(), Some("52:54:00:ab:cd:ef"));
        assert_eq!(c.ip, Some(Ipv4Addr::new(10, 0, 2, 15)));
        assert_eq!(c.gw, None);
        assert!(!c.lkg_only);
    }

    #[test]
    fn server_without_port_is_80() {
        let c = Cmdline::parse("strata.server=http://192.168.1.1/").unwrap();
        assert_eq!(c.server, Some("192.168.1.1:80".parse().unwrap()));
    }

    #[test]
    fn bad_values_are_named() {
        assert!(matches!(
            Cmdline::parse("strata.server=https://x"),
            Err(CmdlineError::Value { ref key, .. }) if key == "strata.server"
        ));
        assert!(matches!(
            Cmdline::parse("strata.mac=zz"),
            Err(CmdlineError::Value { .. })
        ));
        assert!(matches!(
            Cmdline::parse("strata.bogus=1"),
            Err(CmdlineError::UnknownKey { .. })
        ));
        assert!(matches!(
            Cmdline::parse("strata.agent=0"),
            Err(CmdlineError::Value { ref key, .. }) if key == "strata.agent"
        ));
        assert_eq!(
            Cmdline::parse("strata.agent=2").unwrap().agent_interval,
            Some(2)
        );
        assert!(matches!(
            Cmdline::parse("strata.disk=/etc/x/../y"),
            Err(CmdlineError::Value { .. })
        ));
    }
}
