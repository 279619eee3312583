//! The Strata lab: a network namespace with a bridge, boot servers inside it (Strata's own
//! `strata serve`, or dnsmasq as the peer), and QEMU VMs (TCG) on tap devices whose serial
//! consoles are captured and waited on for exact markers.
//!
//! ```no_run
//! use std::time::Duration;
//! use strata_lab::{fixture, Dnsmasq, Firmware, Lab, LabConfig, VmConfig};
//! # fn main() -> anyhow::Result<()> {
//! let mut lab = Lab::new(LabConfig::default())?;
//! let files = fixture::marker_boot_files(lab.dir())?;
//! lab.start_server(&Dnsmasq::pxe(files))?;
//! let mut vm = lab.start_vm(VmConfig::new("vm0", Firmware::Bios))?;
//! let t = vm.wait_for_serial(fixture::BOOT_MARKER, Duration::from_secs(180))?;
//! println!("booted in {t:?}");
//! # Ok(()) }
//! ```
//!
//! See docs/lab.md for the design and the `strata-lab` command.

pub mod fixture;
pub mod lab;
pub mod log;
pub mod netns;
pub mod process;
pub mod server;
pub mod tools;
pub mod vm;

pub use lab::{Lab, LabConfig};
pub use log::LogStream;
pub use server::{BootFiles, BootServer, Dnsmasq, RunningServer, Strata, StrataConfig, Transport};
pub use vm::{Disk, Firmware, NetBoot, TestVm, VmConfig};
