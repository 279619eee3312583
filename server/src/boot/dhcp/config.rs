//! Configuration of the DHCP and proxyDHCP services.
//!
//! Plain Rust values: the appliance's TOML configuration (`crate::config`) is mapped into these
//! by `strata serve`, and tests build them directly. [`PoolConfig::validate`] checks that the
//! values fit together before a server starts.

use std::net::Ipv4Addr;
use std::time::Duration;

use wire::dhcp::MacAddr;

/// An IPv4 subnet: network address and prefix length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Subnet {
    /// Any address inside the subnet (host bits are ignored).
    pub addr: Ipv4Addr,
    /// Prefix length, 0..=32.
    pub prefix_len: u8,
}

impl Subnet {
    /// From an address and a dotted netmask (which must be contiguous).
    pub fn from_netmask(addr: Ipv4Addr, mask: Ipv4Addr) -> Option<Subnet> {
        let m = u32::from(mask);
        let len = m.leading_ones();
        if m.checked_shl(len).unwrap_or(0) != 0 {
            return None;
        }
        Some(Subnet {
            addr,
            prefix_len: u8::try_from(len).ok()?,
        })
    }

    /// The netmask.
    pub fn mask(&self) -> Ipv4Addr {
        let len = u32::from(self.prefix_len.min(32));
        Ipv4Addr::from(u32::MAX.checked_shl(32 - len).unwrap_or(0))
    }

    /// The network address.
    pub fn network(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.addr) & u32::from(self.mask()))
    }

    /// The broadcast address.
    pub fn broadcast(&self) -> Ipv4Addr {
        Ipv4Addr::from(u32::from(self.network()) | !u32::from(self.mask()))
    }

    /// True when `ip` is inside the subnet.
    pub fn contains(&self, ip: Ipv4Addr) -> bool {
        u32::from(ip) & u32::from(self.mask()) == u32::from(self.network())
    }
}

/// A fixed address for one MAC.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Reservation {
    /// The client's hardware address.
    pub mac: MacAddr,
    /// The address it always gets.
    pub ip: Ipv4Addr,
    /// Host name handed out as option 12, if any.
    pub hostname: Option<String>,
}

/// Address assignment for the full DHCP server.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PoolConfig {
    /// The subnet served (option 1 is its mask).
    pub subnet: Subnet,
    /// First dynamic address (inclusive).
    pub pool_start: Ipv4Addr,
    /// Last dynamic address (inclusive).
    pub pool_end: Ipv4Addr,
    /// Default router (option 3), if any.
    pub router: Option<Ipv4Addr>,
    /// DNS servers (option 6).
    pub dns: Vec<Ipv4Addr>,
    /// Domain name (option 15), if any.
    pub domain: Option<String>,
    /// Lease time (option 51); T1 and T2 are 1/2 and 7/8 of it (RFC 2131 §4.4.5).
    pub lease_time: Duration,
    /// Fixed addresses per MAC. They may lie inside or outside the pool, but inside the subnet.
    pub reservations: Vec<Reservation>,
    /// How long an offered address is held for the client that was offered it.
    pub offer_hold: Duration,
    /// How long an address a client DECLINEd stays out of use.
    pub decline_hold: Duration,
}

impl PoolConfig {
    /// A pool with the defaults: one hour leases, offers held 60 s, declined addresses held
    /// 10 minutes, no router, DNS, domain or reservations.
    pub fn new(subnet: Subnet, pool_start: Ipv4Addr, pool_end: Ipv4Addr) -> Self {
        PoolConfig {
            subnet,
            pool_start,
            pool_end,
            router: None,
            dns: Vec::new(),
            domain: None,
            lease_time: Duration::from_secs(3600),
            reservations: Vec::new(),
            offer_hold: Duration::from_secs(60),
            decline_hold: Duration::from_secs(600),
        }
    }

    /// Checks the values fit together (and with the server's own address).
    pub fn validate(&self, server_ip: Ipv4Addr) -> Result<(), ConfigError> {
        let s = &self.subnet;
        if s.prefix_len > 30 {
            return Err(ConfigError::SubnetTooSmall {
                prefix_len: s.prefix_len,
            });
        }
        if u32::from(self.pool_start) > u32::from(self.pool_end) {
            return Err(ConfigError::EmptyPool {
                start: self.pool_start,
                end: self.pool_end,
            });
        }
        for ip in [self.pool_start, self.pool_end] {
            if !s.contains(ip) || ip == s.network() || ip == s.broadcast() {
                return Err(ConfigError::OutsideSubnet {
                    ip,
                    what: "pool bound",
                });
            }
        }
        if !s.contains(server_ip) {
            return Err(ConfigError::OutsideSubnet {
                ip: server_ip,
                what: "server_ip",
            });
        }
        if self.lease_time < Duration::from_secs(60) {
            return Err(ConfigError::LeaseTooShort {
                secs: self.lease_time.as_secs(),
            });
        }
        let mut seen_mac = std::collections::HashSet::new();
        let mut seen_ip = std::collections::HashSet::new();
        for r in &self.reservations {
            if !s.contains(r.ip) || r.ip == s.network() || r.ip == s.broadcast() {
                return Err(ConfigError::OutsideSubnet {
                    ip: r.ip,
                    what: "reservation",
                });
            }
            if r.ip == server_ip {
                return Err(ConfigError::ReservationIsServer { ip: r.ip });
            }
            if !seen_mac.insert(r.mac) {
                return Err(ConfigError::DuplicateReservation {
                    what: r.mac.to_string(),
                });
            }
            if !seen_ip.insert(r.ip) {
                return Err(ConfigError::DuplicateReservation {
                    what: r.ip.to_string(),
                });
            }
        }
        Ok(())
    }
}

/// The boot files for PXE ROMs, fetched over TFTP (names relative to the TFTP root).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct TftpFiles {
    /// Legacy BIOS PXE (architecture 0): e.g. `undionly.kpxe`.
    pub bios: Option<String>,
    /// x86-64 UEFI PXE (architectures 7 and 9): e.g. `snponly.efi` or `ipxe.efi`.
    pub uefi_x64: Option<String>,
    /// ARM64 UEFI PXE (architecture 11).
    pub uefi_arm64: Option<String>,
}

impl Default for TftpFiles {
    /// Debian's iPXE binaries: `undionly.kpxe` and `snponly.efi` (the UEFI build that drives
    /// the firmware's own network stack, so it works on every NIC the firmware knows).
    fn default() -> Self {
        TftpFiles {
            bios: Some("undionly.kpxe".into()),
            uefi_x64: Some("snponly.efi".into()),
            uefi_arm64: None,
        }
    }
}

/// URLs for UEFI HTTP boot clients (vendor class `HTTPClient`): an EFI binary to load,
/// typically iPXE (`http://server/…/ipxe.efi`), which then asks DHCP again as iPXE.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HttpBootUrls {
    /// x86-64 UEFI HTTP (architecture 16).
    pub x64: Option<String>,
    /// ARM64 UEFI HTTP (architecture 19).
    pub arm64: Option<String>,
}

/// What to do with clients whose MAC has no reservation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum UnknownPolicy {
    /// Give them an address from the pool and boot information (the default).
    #[default]
    Boot,
    /// Give them an address but no boot information.
    AddressOnly,
    /// Do not answer them (they are still reported as discovered).
    Ignore,
}

/// What booting clients are told: shared by full DHCP and proxyDHCP.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct BootConfig {
    /// This server's address on the boot network: the server identifier (option 54) and,
    /// unless `next_server` is set, `siaddr` and option 66.
    pub server_ip: Ipv4Addr,
    /// The TFTP server for PXE ROMs, when it is not this server.
    pub next_server: Option<Ipv4Addr>,
    /// TFTP boot files per architecture.
    pub tftp_files: TftpFiles,
    /// The iPXE script URL given to iPXE clients (user class "iPXE" or option 175). The text
    /// `{mac}` is replaced by the client's MAC as `aa-bb-cc-dd-ee-ff`.
    pub ipxe_script_url: String,
    /// EFI binaries for UEFI HTTP boot clients.
    pub http_boot: HttpBootUrls,
    /// Clients without a reservation (in proxy mode: every client).
    pub unknown_policy: UnknownPolicy,
}

impl BootConfig {
    /// Boot configuration with Debian's iPXE TFTP files and no HTTP boot URLs.
    pub fn new(server_ip: Ipv4Addr, ipxe_script_url: impl Into<String>) -> Self {
        BootConfig {
            server_ip,
            next_server: None,
            tftp_files: TftpFiles::default(),
            ipxe_script_url: ipxe_script_url.into(),
            http_boot: HttpBootUrls::default(),
            unknown_policy: UnknownPolicy::Boot,
        }
    }

    /// The TFTP server address (`siaddr`).
    pub fn tftp_server(&self) -> Ipv4Addr {
        self.next_server.unwrap_or(self.server_ip)
    }
}

/// Configuration values that do not fit together.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ConfigError {
    /// The subnet leaves no room for a pool.
    #[error("subnet prefix /{prefix_len} is too small for a DHCP pool (at most /30)")]
    SubnetTooSmall {
        /// Prefix length.
        prefix_len: u8,
    },
    /// `pool_start` is after `pool_end`.
    #[error("pool start {start} is after pool end {end}")]
    EmptyPool {
        /// Start.
        start: Ipv4Addr,
        /// End.
        end: Ipv4Addr,
    },
    /// An address is not a host address of the subnet.
    #[error("{what} {ip} is not a host address of the served subnet")]
    OutsideSubnet {
        /// The address.
        ip: Ipv4Addr,
        /// Which setting.
        what: &'static str,
    },
    /// Leases shorter than a minute.
    #[error("lease time of {secs} s is too short (at least 60 s)")]
    LeaseTooShort {
        /// Seconds.
        secs: u64,
    },
    /// Two reservations share a MAC or an address.
    #[error("two reservations for {what}")]
    DuplicateReservation {
        /// The MAC or address.
        what: String,
    },
    /// A reservation gives away the server's own address.
    #[error("reservation of {ip}, which is the server's own address")]
    ReservationIsServer {
        /// The address.
        ip: Ipv4Addr,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn subnet_arithmetic() {
        let s = Subnet::from_netmask(Ipv4Addr::new(10, 9, 8, 7), Ipv4Addr::new(255, 255, 255, 0))
            .unwrap();
        assert_eq!(s.prefix_len, 24);
        assert_eq!(s.network(), Ipv4Addr::new(10, 9, 8, 0));
        assert_eq!(s.broadcast(), Ipv4Addr::new(10, 9, 8, 255));
        assert!(s.contains(Ipv4Addr::new(10, 9, 8, 200)));
        assert!(!s.contains(Ipv4Addr::new(10, 9, 9, 1)));
        assert!(
            Subnet::from_netmask(Ipv4Addr::UNSPECIFIED, Ipv4Addr::new(255, 0, 255, 0)).is_none()
        );
        let all = Subnet {
            addr: Ipv4Addr::UNSPECIFIED,
            prefix_len: 0,
        };
        assert_eq!(all.mask(), Ipv4Addr::UNSPECIFIED);
    }

    #[test]
    fn validate_names_the_fault() {
        let s = Subnet {
            addr: Ipv4Addr::new(10, 0, 0, 0),
            prefix_len: 24,
        };
        let server = Ipv4Addr::new(10, 0, 0, 1);
        let mut p = PoolConfig::new(s, Ipv4Addr::new(10, 0, 0, 100), Ipv4Addr::new(10, 0, 0, 50));
        assert!(matches!(
            p.validate(server),
            Err(ConfigError::EmptyPool { .. })
        ));
        p.pool_end = Ipv4Addr::new(10, 0, 1, 50);
        assert!(matches!(
            p.validate(server),
            Err(ConfigError::OutsideSubnet { .. })
        ));
        p.pool_end = Ipv4Addr::new(10, 0, 0, 200);
        assert_eq!(p.validate(server), Ok(()));
        let mac = MacAddr([2, 0, 0, 0, 0, 1]);
        p.reservations.push(Reservation {
            mac,
            ip: server,
            hostname: None,
        });
        assert!(matches!(
            p.validate(server),
            Err(ConfigError::ReservationIsServer { .. })
        ));
        p.reservations[0].ip = Ipv4Addr::new(10, 0, 0, 5);
        p.reservations.push(Reservation {
            mac,
            ip: Ipv4Addr::new(10, 0, 0, 6),
            hostname: None,
        });
        assert!(matches!(
            p.validate(server),
            Err(ConfigError::DuplicateReservation { .. })
        ));
    }
}
