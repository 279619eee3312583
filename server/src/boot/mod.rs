//! Network boot services: DHCP and proxyDHCP, TFTP, router advertisements, HTTP boot.

pub mod dhcp;
pub mod initramfs;
pub mod ipxe;
pub mod ra;
pub mod tftp;
