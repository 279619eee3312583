//! Network boot in the lab from the dnsmasq peer (DHCP + TFTP, busybox httpd for HTTP): real
//! firmware (SeaBIOS with QEMU's iPXE ROM, Debian's OVMF) reaches Debian's kernel and the
//! test initramfs, whose `/init` prints `STRATA lab-init ok` and powers off. These prove the
//! harness against a known-good server; `pxe_strata.rs` runs the same boots from Strata.
//!
//! Root is needed (network namespaces, taps); each test builds its own lab, so they run in
//! parallel. Router advertisements are on (dnsmasq `--enable-ra`) so iPXE does not wait out
//! IPv6 autoconfiguration; `strata-lab bench` also measures without.

use std::time::Duration;

use anyhow::Result;
use strata_lab::{fixture, Dnsmasq, Firmware, Lab, LabConfig, NetBoot, VmConfig};

/// Generous: under TCG on 2 shared cores a boot takes 10-25 s alone, more when tests share.
const BOOT: Duration = Duration::from_secs(300);

fn lab_with_dnsmasq(chain_undionly: bool) -> Result<Lab> {
    let mut lab = Lab::new(LabConfig {
        ipv6: true,
        ..LabConfig::default()
    })?;
    let files = fixture::marker_boot_files(&fixture::cache_dir().join("lab"))?;
    let mut dnsmasq = Dnsmasq::pxe(files);
    dnsmasq.router_advert = true;
    dnsmasq.chain_undionly = chain_undionly;
    lab.start_server(&dnsmasq)?;
    Ok(lab)
}

/// A BIOS VM and a UEFI VM boot at the same time through the NIC's iPXE ROM, each to the
/// marker, and power off.
#[test]
fn bios_and_uefi_boot_through_the_ipxe_rom_at_once() -> Result<()> {
    let mut lab = lab_with_dnsmasq(false)?;
    let mut bios = lab.start_vm(VmConfig::new("bios", Firmware::Bios))?;
    let mut uefi = lab.start_vm(VmConfig::new("uefi", Firmware::Uefi))?;
    for vm in [&mut bios, &mut uefi] {
        vm.wait_for_serial("STRATA lab ipxe script", BOOT)?;
        vm.wait_for_serial(fixture::BOOT_MARKER, BOOT)?;
        vm.wait_exit(Duration::from_secs(60))?;
    }
    // SeaBIOS's output reached the serial log through sercon-port.
    assert!(String::from_utf8_lossy(&bios.serial().contents()).contains("SeaBIOS"));
    Ok(())
}

/// The plain PXE ROM path for BIOS: the ROM chainloads undionly.kpxe over TFTP, and that
/// iPXE (driver `undionly`) fetches the script.
#[test]
fn bios_chainloads_undionly_over_tftp() -> Result<()> {
    let mut lab = lab_with_dnsmasq(true)?;
    let mut vm = lab.start_vm(VmConfig::new("vm0", Firmware::Bios))?;
    vm.wait_for_serial("STRATA lab chain undionly", BOOT)?;
    vm.wait_for_serial("undionly.kpxe... ok", BOOT)?;
    vm.wait_for_serial("STRATA lab stage1 chip=undionly", BOOT)?;
    vm.wait_for_serial("STRATA lab ipxe script", BOOT)?;
    vm.wait_for_serial(fixture::BOOT_MARKER, BOOT)?;
    Ok(())
}

/// UEFI's own PXE client (no iPXE ROM) loads snponly.efi over TFTP, which boots the script.
#[test]
fn uefi_pxe_chainloads_snponly_over_tftp() -> Result<()> {
    let mut lab = lab_with_dnsmasq(false)?;
    let mut vm = lab.start_vm(VmConfig::new("vm0", Firmware::Uefi).net_boot(NetBoot::UefiPxe))?;
    vm.wait_for_serial("NBP filename is snponly.efi", BOOT)?;
    vm.wait_for_serial("using SNP", BOOT)?;
    vm.wait_for_serial("STRATA lab ipxe script", BOOT)?;
    vm.wait_for_serial(fixture::BOOT_MARKER, BOOT)?;
    Ok(())
}

/// UEFI HTTP boot: OVMF's HTTP client (vendor class HTTPClient) gets a URL, loads
/// snponly.efi over HTTP, which boots the script.
#[test]
fn uefi_http_boot() -> Result<()> {
    let mut lab = lab_with_dnsmasq(false)?;
    let mut vm = lab.start_vm(VmConfig::new("vm0", Firmware::Uefi).net_boot(NetBoot::UefiHttp))?;
    vm.wait_for_serial("URI: http://10.42.0.1:8080/snponly.efi", BOOT)?;
    vm.wait_for_serial("STRATA lab ipxe script", BOOT)?;
    vm.wait_for_serial(fixture::BOOT_MARKER, BOOT)?;
    Ok(())
}
