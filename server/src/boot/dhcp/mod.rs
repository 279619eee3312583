//! DHCPv4 for network boot (RFC 2131, options RFC 2132, PXE options RFC 4578), in two modes:
//!
//! - [`DhcpServer`]: a full server. Addresses from a pool and per-MAC reservations, leases in
//!   SQLite ([`LeaseStore`]), renewal, rebinding, expiry, DECLINE, RELEASE and INFORM.
//! - [`ProxyDhcpServer`]: proxyDHCP on ports 67 and 4011, beside the site's DHCP server; it
//!   answers boot clients only and never hands out addresses.
//!
//! Both choose the boot answer with [`boot::select`]: iPXE gets its HTTP script URL, UEFI
//! HTTP clients an `http://` URL, PXE ROMs a TFTP file by architecture. Clients without a
//! reservation are reported as [`Discovered`]. The packet codec is [`wire::dhcp`]; the
//! protocol cores ([`core::DhcpCore`], [`proxy::ProxyCore`]) are sans-IO.

pub mod boot;
pub mod config;
pub mod core;
pub mod lease;
pub mod proxy;
pub mod server;
pub mod store;

pub use config::{
    BootConfig, HttpBootUrls, PoolConfig, Reservation, Subnet, TftpFiles, UnknownPolicy,
};
pub use core::Discovered;
pub use proxy::ProxyDhcpServer;
pub use server::{DhcpServer, DhcpServerError};
pub use store::{LeaseStore, StoreError};
