//! node-init: PID 1 of the Strata boot initramfs, and the agent inside booted images.
//!
//! The boot flow ([`boot::run`]): early mounts, modules, network from the kernel command line
//! ([`cmdline`]), the signed manifest ([`wire::manifest`]), the cache on the local disk
//! ([`cache`]), the boot decision ([`bootcount`]), resumable verified downloads and chunk
//! repair ([`fetch`]), attach without unpacking ([`attach`]: device-mapper over loop devices),
//! [`switch_root`]. docs/node-init.md describes it all.

pub mod agent;
pub mod attach;
pub mod boot;
pub mod bootcount;
pub mod cache;
pub mod cmdline;
pub mod dhcp;
pub mod fetch;
pub mod http;
pub mod iscsi;
pub mod marker;
pub mod mcast;
pub mod net;
pub mod report;
pub mod switch_root;
pub mod sys;
