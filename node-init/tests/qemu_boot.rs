//! End-to-end boots under QEMU (TCG): Debian's kernel, our initramfs (scripts/
//! build-initramfs.sh + the server key archive), a blank virtio disk as the cache, and the
//! fixture server on the host's loopback (10.0.2.2 from inside QEMU's user network). Every
//! assertion is on exact serial markers and on the server's byte counters.

mod support;

use std::time::Duration;

use anyhow::{ensure, Result};
use ed25519_dalek::SigningKey;
use support::server::Server;
use support::{field, layer_ref, manifest, ImageSet, Vm, MAC};
use wire::manifest::{LayerKind, SignedManifest};

const BOOT: Duration = Duration::from_secs(300);

#[test]
fn first_boot_fetches_verifies_attaches_and_runs_the_image() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let images = ImageSet::new(dir.path())?;
    let role = images.role_layer("web", 1, true)?;
    let (base_ref, base_bytes) = layer_ref(&images.base_vhdx, LayerKind::Base)?;
    let (role_ref, role_bytes) = layer_ref(&role, LayerKind::Role)?;
    let srv = Server::start()?;
    srv.add_layer(base_ref.id, base_bytes);
    srv.add_layer(role_ref.id, role_bytes);
    let m = manifest("web", 1, 3, vec![base_ref.clone(), role_ref.clone()]);
    srv.set_manifest(MAC, SignedManifest::sign(&m, &key)?.to_json());
    let initrd = support::initramfs(dir.path(), &key)?;
    let disk = dir.path().join("disk.raw");
    support::blank_disk(&disk, 256 << 20)?;

    let mut vm = Vm::boot(&initrd, &disk, srv.port, "")?;
    vm.wait_for("STRATA stage=init", BOOT)?;
    let net = vm.wait_for("STRATA stage=net", BOOT)?;
    ensure!(field(&net, "ip") == Some("10.0.2.15"), "{net}");
    let cache = vm.wait_for("STRATA stage=cache", BOOT)?;
    ensure!(field(&cache, "formatted") == Some("true"), "{cache}");
    let man = vm.wait_for("STRATA stage=manifest", BOOT)?;
    ensure!(field(&man, "version") == Some("1") && field(&man, "role") == Some("web"), "{man}");
    let f1 = vm.wait_for("STRATA stage=fetch", BOOT)?;
    ensure!(field(&f1, "layer") == Some(&base_ref.id.to_string()), "{f1}");
    ensure!(field(&f1, "bytes") == Some(&base_ref.size.to_string()), "{f1}");
    vm.wait_for("STRATA stage=fetch", BOOT)?;
    vm.wait_for("STRATA stage=verify", BOOT)?;
    vm.wait_for("STRATA stage=attach", BOOT)?;
    vm.wait_for("STRATA stage=switch_root version=1 role=web", BOOT)?;
    vm.wait_for("STRATA image=busybox role=web version=1 stage=running", BOOT)?;
    vm.wait_for("STRATA agent=confirmed version=1 role=web", BOOT)?;
    vm.wait_exit(BOOT)?;
    ensure!(srv.sent(&base_ref.id) == base_ref.size);
    ensure!(srv.sent(&role_ref.id) == role_ref.size);
    Ok(())
}
