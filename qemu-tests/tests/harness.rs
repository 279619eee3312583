//! The lab harness itself: teardown leaves no namespace, tap or process behind; a VM that
//! dies fails a wait at once (no timeout); a disk image is attached and stays after the VM.

use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Result};
use strata_lab::{process::run, Firmware, Lab, LabConfig, VmConfig};

fn namespaces() -> Result<String> {
    run(Command::new("ip").args(["netns", "list"]))
}

/// Dropping a lab with a running VM and server stops QEMU and removes the namespace.
#[test]
fn teardown_removes_everything() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let disk = dir.path().join("disk.qcow2");
    strata_lab::fixture::create_disk(&disk, "qcow2", "64M")?;
    let mut lab = Lab::new(LabConfig::default())?;
    lab.start_server(&strata_lab::Dnsmasq::site_dhcp())?;
    let name = lab.netns_name().to_owned();
    ensure!(namespaces()?.contains(&name), "namespace {name} missing");
    let mut vm = lab.start_vm(VmConfig::new("vm0", Firmware::Bios).disk(&disk, "qcow2"))?;
    // iPXE's banner: the firmware ran and its output reached the serial log.
    vm.wait_for_serial("iPXE", Duration::from_secs(120))?;
    let pids = run(Command::new("ip").args(["netns", "pids", &name]))?;
    ensure!(
        pids.split_whitespace().count() >= 2,
        "expected QEMU and dnsmasq in {name}: {pids:?}"
    );
    drop(vm);
    drop(lab);
    ensure!(
        !namespaces()?.contains(&name),
        "namespace {name} left behind"
    );
    for pid in pids.split_whitespace() {
        ensure!(
            !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "process {pid} left behind"
        );
    }
    ensure!(disk.is_file(), "the disk image must stay after the VM");
    Ok(())
}

/// A VM that exits ends a wait at once with a clear error instead of running into the
/// timeout.
#[test]
fn a_dead_vm_fails_the_wait_at_once() -> Result<()> {
    let mut lab = Lab::new(LabConfig::default())?;
    let mut cfg = VmConfig::new("vm0", Firmware::Bios);
    cfg.extra_args = vec!["-no-such-qemu-option".into()];
    let mut vm = lab.start_vm(cfg)?;
    let err = vm
        .wait_for_serial("never printed", Duration::from_secs(3600))
        .unwrap_err();
    ensure!(
        format!("{err:#}").contains("stream closed"),
        "unexpected error: {err:#}"
    );
    ensure!(
        format!("{err:#}").contains("no-such-qemu-option") || vm.serial().is_empty(),
        "{err:#}"
    );
    lab.clear_failed();
    Ok(())
}

/// Code on the host reaches the lab's servers through `in_netns` (here: the dnsmasq peer's
/// HTTP server and its iPXE script).
#[test]
fn host_code_reaches_the_lab_network() -> Result<()> {
    let mut lab = Lab::new(LabConfig::default())?;
    let files =
        strata_lab::fixture::marker_boot_files(&strata_lab::fixture::cache_dir().join("lab"))?;
    lab.start_server(&strata_lab::Dnsmasq::pxe(files))?;
    let addr = "10.42.0.1:8080".parse()?;
    let script = String::from_utf8(lab.http_get(addr, "/boot.ipxe")?)?;
    ensure!(
        script.starts_with("#!ipxe\n") && script.contains("initrd=initrd.img"),
        "{script}"
    );
    let err = lab.http_get(addr, "/no-such-file").unwrap_err();
    ensure!(format!("{err:#}").contains("404"), "{err:#}");
    Ok(())
}
