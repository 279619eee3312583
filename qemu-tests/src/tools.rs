//! The host tools and files the lab needs, each with the Debian package that provides it, so
//! a missing one fails with an install hint (never a silent skip).

use std::path::{Path, PathBuf};

use anyhow::{bail, Result};

/// Where QEMU finds the NIC option ROMs (iPXE) and SeaBIOS.
pub const QEMU_ROM_DIRS: [&str; 2] = ["/usr/lib/ipxe/qemu", "/usr/share/seabios"];
/// OVMF code (read-only pflash) and the template of its variable store.
pub const OVMF_CODE: &str = "/usr/share/OVMF/OVMF_CODE_4M.fd";
/// Template of OVMF's variable store; each VM gets a copy.
pub const OVMF_VARS: &str = "/usr/share/OVMF/OVMF_VARS_4M.fd";
/// iPXE for BIOS PXE ROMs to chainload over TFTP.
pub const UNDIONLY_KPXE: &str = "/usr/lib/ipxe/undionly.kpxe";
/// iPXE for UEFI, using the firmware's network stack (SNP).
pub const SNPONLY_EFI: &str = "/usr/lib/ipxe/snponly.efi";
/// iPXE for UEFI with its own drivers.
pub const IPXE_EFI: &str = "/usr/lib/ipxe/ipxe.efi";
/// A static busybox, for test initramfs images.
pub const BUSYBOX: &str = "/bin/busybox";

/// The install hint for a program or file the lab uses.
pub fn hint(what: &str) -> String {
    let name = Path::new(what)
        .file_name()
        .and_then(|n| n.to_str())
        .unwrap_or(what);
    let pkg = match name {
        "qemu-system-x86_64" => "qemu-system-x86",
        "qemu-img" => "qemu-utils",
        "ip" | "bridge" => "iproute2",
        "dnsmasq" => "dnsmasq-base",
        "busybox" => "busybox-static",
        "OVMF_CODE_4M.fd" | "OVMF_VARS_4M.fd" => "ovmf",
        "undionly.kpxe" | "snponly.efi" | "ipxe.efi" => "ipxe",
        "efi-virtio.rom" | "pxe-virtio.rom" | "efi-e1000.rom" => "ipxe-qemu",
        "bios-256k.bin" => "seabios",
        "tftp" => "tftp-hpa",
        "atftp" => "atftp",
        _ => return format!("install {name} (scripts/setup.sh installs everything the lab needs)"),
    };
    format!("install it with `apt-get install {pkg}` (or run scripts/setup.sh)")
}

/// Finds `program` in PATH (and the sbin directories, which a non-login root shell may lack).
pub fn which(program: &str) -> Option<PathBuf> {
    let path = std::env::var_os("PATH").unwrap_or_default();
    std::env::split_paths(&path)
        .chain(["/usr/sbin", "/sbin", "/usr/bin", "/bin"].map(PathBuf::from))
        .map(|d| d.join(program))
        .find(|p| p.is_file())
}

/// Fails with install hints unless every program and file is present.
pub fn require(programs: &[&str], files: &[&str]) -> Result<()> {
    let mut missing = Vec::new();
    for p in programs {
        if which(p).is_none() {
            missing.push(format!("{p}: {}", hint(p)));
        }
    }
    for f in files {
        if !Path::new(f).is_file() {
            missing.push(format!("{f}: {}", hint(f)));
        }
    }
    if !missing.is_empty() {
        bail!("the lab is missing:\n  {}", missing.join("\n  "));
    }
    Ok(())
}

/// Fails unless running as root (network namespaces and tap devices need it).
pub fn require_root() -> Result<()> {
    if !rustix::process::geteuid().is_root() {
        bail!("the lab needs root (network namespaces, bridges and tap devices): run it as root or with sudo");
    }
    Ok(())
}
