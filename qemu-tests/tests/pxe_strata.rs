//! Network boot in the lab from Strata (`strata serve` of this workspace) — issue 4's
//! "must show": BIOS and UEFI VMs boot in full DHCP mode; proxyDHCP beside dnsmasq acting as
//! the site's plain DHCP server (addresses from dnsmasq, boot from Strata); OVMF's plain PXE
//! client chainloading iPXE (snponly.efi) over Strata's TFTP; UEFI HTTP boot.
//!
//! The `strata` binary comes from `$STRATA_BIN`, else next to this test's target directory
//! (`cargo build -p strata-server --bin strata` puts it there; scripts/test.sh builds it).

use std::time::Duration;

use anyhow::{bail, Result};
use strata_lab::server::LAB_CONFIG_TEMPLATE;
use strata_lab::{
    fixture, BootFiles, Dnsmasq, Firmware, Lab, LabConfig, NetBoot, Strata, StrataConfig, VmConfig,
};

const BOOT: Duration = Duration::from_secs(300);

fn files() -> Result<BootFiles> {
    fixture::marker_boot_files(&fixture::cache_dir().join("lab"))
}

fn lab() -> Result<Lab> {
    // IPv6 on the bridge: Strata answers router solicitations itself.
    Lab::new(LabConfig {
        ipv6: true,
        ..LabConfig::default()
    })
}

fn strata() -> Result<Strata> {
    let mut s = Strata::new(Strata::locate_binary()?);
    s.boot = Some(files()?);
    Ok(s)
}

/// Full DHCP: a BIOS VM and a UEFI VM boot at once through the NIC's iPXE ROM.
#[test]
fn full_dhcp_bios_and_uefi() -> Result<()> {
    let mut lab = lab()?;
    lab.start_server(&strata()?)?;
    let mut bios = lab.start_vm(VmConfig::new("bios", Firmware::Bios))?;
    let mut uefi = lab.start_vm(VmConfig::new("uefi", Firmware::Uefi))?;
    bios.wait_for_serial(fixture::BOOT_MARKER, BOOT)?;
    uefi.wait_for_serial(fixture::BOOT_MARKER, BOOT)?;
    Ok(())
}

/// proxyDHCP: dnsmasq hands out the address (no boot options), Strata the boot information.
#[test]
fn proxy_dhcp_beside_dnsmasq() -> Result<()> {
    let mut lab = lab()?;
    lab.start_server(&Dnsmasq::site_dhcp())?;
    let mut s = strata()?;
    s.config = StrataConfig::Template(
        LAB_CONFIG_TEMPLATE
            .replace("mode = \"full\"", "mode = \"proxy\"")
            .replace(
                "pool_start = \"{{range_start}}\"\npool_end = \"{{range_end}}\"\n",
                "",
            ),
    );
    lab.start_server(&s)?;
    let mut bios = lab.start_vm(VmConfig::new("bios", Firmware::Bios))?;
    let mut uefi = lab.start_vm(VmConfig::new("uefi", Firmware::Uefi))?;
    bios.wait_for_serial(fixture::BOOT_MARKER, BOOT)?;
    uefi.wait_for_serial(fixture::BOOT_MARKER, BOOT)?;
    // The addresses came from dnsmasq.
    let site = lab.server(0)?;
    let Some(log) = site.log() else {
        bail!("dnsmasq has no log")
    };
    let text = String::from_utf8_lossy(&log.contents()).into_owned();
    for vm in [&bios, &uefi] {
        let ack = "DHCPACK(br0) 10.42.0.";
        if !text
            .lines()
            .any(|l| l.contains(ack) && l.contains(vm.mac()))
        {
            bail!(
                "dnsmasq never acknowledged an address for {} ({})",
                vm.name(),
                vm.mac()
            );
        }
    }
    Ok(())
}

/// The plain PXE ROM path: OVMF's own PXE client (no iPXE ROM) chainloads snponly.efi over
/// Strata's TFTP, and that iPXE gets its script over HTTP.
#[test]
fn uefi_pxe_chainloads_ipxe_over_tftp() -> Result<()> {
    let mut lab = lab()?;
    lab.start_server(&strata()?)?;
    let mut vm = lab.start_vm(VmConfig::new("vm0", Firmware::Uefi).net_boot(NetBoot::UefiPxe))?;
    vm.wait_for_serial("NBP file downloaded successfully.", BOOT)?;
    vm.wait_for_serial("using SNP", BOOT)?;
    vm.wait_for_serial(fixture::BOOT_MARKER, BOOT)?;
    Ok(())
}

/// UEFI HTTP boot from Strata.
#[test]
fn uefi_http_boot() -> Result<()> {
    let mut lab = lab()?;
    lab.start_server(&strata()?)?;
    let mut vm = lab.start_vm(VmConfig::new("vm0", Firmware::Uefi).net_boot(NetBoot::UefiHttp))?;
    vm.wait_for_serial("URI:", BOOT)?;
    vm.wait_for_serial(fixture::BOOT_MARKER, BOOT)?;
    Ok(())
}
