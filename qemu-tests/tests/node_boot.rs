//! The whole boot path, end to end, from Strata alone: a BIOS VM with a blank disk PXE boots
//! through QEMU's iPXE ROM (DHCP, router advertisement and HTTP from `strata serve`), gets
//! Debian's kernel and the node-init initramfs carrying the server's key, and node-init
//! fetches its signed manifest and the layers of the built-in busybox image (base, `web` role,
//! its own node layer), verifies them, attaches the chain with device-mapper and switch_roots
//! into the image, whose init prints its marker. A second boot of the same VM runs from its
//! cache after the plug was pulled, downloading nothing. Asserts on exact serial markers and on what the server sent.

use std::time::Duration;

use anyhow::{ensure, Result};
use strata_lab::{fixture, Disk, Firmware, Lab, LabConfig, Strata, VmConfig};

const BOOT: Duration = Duration::from_secs(300);

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

#[test]
fn pxe_boot_layered_image_through_node_init() -> Result<()> {
    let mut lab = Lab::new(LabConfig {
        ipv6: true,
        ..LabConfig::default()
    })?;
    // No [boot] section: the server's defaults, Debian's kernel and node-init's initramfs.
    lab.start_server(&Strata::new(Strata::locate_binary()?))?;
    let disk = lab.dir().join("node0.raw");
    fixture::create_disk(&disk, "raw", "256M")?;
    let mut cfg = VmConfig::new("node0", Firmware::Bios);
    cfg.memory_mib = 512;
    cfg.mac = Some("52:54:00:42:00:10".into());
    cfg.disk = Some(Disk {
        path: disk.clone(),
        format: "raw".into(),
    });
    cfg.no_reboot = true;
    cfg.fail_markers = vec!["STRATA panic".into(), "Kernel panic".into()];

    let mut vm = lab.start_vm(cfg.clone())?;
    vm.wait_for_serial("STRATA stage=init", BOOT)?;
    let man = vm.wait_for_line("STRATA stage=manifest", BOOT)?;
    ensure!(field(&man, "role") == Some("web"), "{man}");
    let mut fetched = 0;
    while fetched < 3 {
        let f = vm.wait_for_line("STRATA stage=fetch", BOOT)?;
        ensure!(
            field(&f, "bytes").is_some_and(|b| b != "0"),
            "first boot must download: {f}"
        );
        fetched += 1;
    }
    vm.wait_for_serial("STRATA stage=attach", BOOT)?;
    vm.wait_for_serial("STRATA stage=switch_root", BOOT)?;
    vm.wait_for_serial(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    // The image starts node-init's agent, which confirms the version healthy.
    vm.wait_for_serial("STRATA agent=confirmed", BOOT)?;
    // Pull the plug (no clean shutdown): the cache must survive it.
    vm.stop();

    // Second boot: everything is cached, nothing is downloaded.
    let mut cfg2 = cfg;
    cfg2.name = "node0-again".into();
    let mut vm = lab.start_vm(cfg2)?;
    vm.wait_for_serial("STRATA stage=manifest", BOOT)?;
    vm.wait_for_serial("STRATA stage=decide version=1 role=web why=confirmed", BOOT)?;
    vm.wait_for_serial("STRATA stage=verify", BOOT)?;
    vm.wait_for_serial(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    let serial = std::fs::read_to_string(vm.serial_path())?;
    ensure!(
        !serial.contains("STRATA stage=fetch"),
        "the cached boot downloaded a layer:\n{serial}"
    );
    Ok(())
}
