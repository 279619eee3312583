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
use wire::report::NodeState;

const BOOT: Duration = Duration::from_secs(300);

#[test]
fn first_boot_then_a_cached_boot_after_power_loss() -> Result<()> {
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
    ensure!(
        field(&man, "version") == Some("1") && field(&man, "role") == Some("web"),
        "{man}"
    );
    let f1 = vm.wait_for("STRATA stage=fetch", BOOT)?;
    ensure!(
        field(&f1, "layer") == Some(&base_ref.id.to_string()),
        "{f1}"
    );
    ensure!(
        field(&f1, "bytes") == Some(&base_ref.size.to_string()),
        "{f1}"
    );
    vm.wait_for("STRATA stage=fetch", BOOT)?;
    vm.wait_for("STRATA stage=verify", BOOT)?;
    vm.wait_for("STRATA stage=attach", BOOT)?;
    vm.wait_for("STRATA stage=switch_root version=1 role=web", BOOT)?;
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_for("STRATA agent=confirmed version=1 role=web", BOOT)?;
    // Pull the plug: no shutdown, no unmount. The cache must come back intact.
    vm.kill()?;
    ensure!(srv.sent(&base_ref.id) == base_ref.size);
    ensure!(srv.sent(&role_ref.id) == role_ref.size);
    // State reports: a full first report, then a delta on it carrying only what changed.
    let reports = srv
        .state
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .reports
        .clone();
    ensure!(reports.len() == 2, "{reports:?}");
    let (a, b) = (&reports[0], &reports[1]);
    ensure!(a.mac == MAC && a.seq == 1 && a.base_seq == 0, "{a:?}");
    ensure!(
        a.delta.state == Some(NodeState::Fetching) && a.delta.version == Some(Some(1)),
        "{a:?}"
    );
    ensure!(b.seq == 2 && b.base_seq == 1, "{b:?}");
    ensure!(
        b.delta.state == Some(NodeState::Booted) && b.delta.version.is_none(),
        "{b:?}"
    );
    ensure!(
        b.delta.cached_layers == Some(vec![base_ref.id, role_ref.id]),
        "{b:?}"
    );

    // A cached boot after the power loss: confirmed version, nothing downloaded.
    srv.reset_counters();
    let mut vm = Vm::boot(&initrd, &disk, srv.port, "")?;
    let cache = vm.wait_for("STRATA stage=cache", BOOT)?;
    ensure!(field(&cache, "formatted") == Some("false"), "{cache}");
    vm.wait_for("STRATA stage=decide version=1 role=web why=confirmed", BOOT)?;
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;
    ensure!(vm.lines_with("STRATA stage=fetch").is_empty() && srv.total_sent() == 0);
    Ok(())
}

/// Flips one byte of `file` (a path inside the cache file system on `disk`) at `offset`,
/// finding the physical block with debugfs, as a disk error would.
fn flip_byte_in_cache(disk: &std::path::Path, file: &str, offset: u64) -> Result<()> {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("bmap {file} {}", offset / 4096))
        .arg(disk)
        .output()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let block: u64 = text.trim().parse().map_err(|_| {
        anyhow::anyhow!(
            "debugfs bmap: {text:?} {:?}",
            String::from_utf8_lossy(&out.stderr)
        )
    })?;
    ensure!(block > 0, "{file} has a hole at {offset}");
    use std::io::{Read, Seek, SeekFrom, Write};
    let mut f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)?;
    let at = block * 4096 + offset % 4096;
    let mut b = [0u8; 1];
    f.seek(SeekFrom::Start(at))?;
    f.read_exact(&mut b)?;
    b[0] ^= 0x5a;
    f.seek(SeekFrom::Start(at))?;
    f.write_all(&b)?;
    f.sync_all()?;
    Ok(())
}

/// Files in a directory of the cache file system on `disk`.
fn cache_ls(disk: &std::path::Path, dir: &str) -> Result<Vec<String>> {
    let out = std::process::Command::new("debugfs")
        .arg("-R")
        .arg(format!("ls -p {dir}"))
        .arg(disk)
        .output()?;
    // ls -p: /inode/mode/uid/gid/name/size/
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter_map(|l| l.split('/').nth(5).map(str::to_owned))
        .filter(|n| !n.is_empty() && n != "." && n != "..")
        .collect())
}

/// The whole life of one node on one disk: staging while running, activation by reboot,
/// operator rollback with no download, automatic rollback of a version never confirmed,
/// a corrupted cached chunk repaired alone, the server gone, a role switch sharing the base,
/// an interrupted download resumed, a manifest with a bad signature refused.
#[test]
fn node_lifecycle_on_one_disk() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let images = ImageSet::new(dir.path())?;
    let (base, base_bytes) = layer_ref(&images.base_vhdx, LayerKind::Base)?;
    let srv = Server::start()?;
    srv.add_layer(base.id, base_bytes);
    let role_layer = |role: &str, v: u64, confirm: bool| -> Result<wire::manifest::LayerRef> {
        let p = images.role_layer(role, v, confirm)?;
        let (r, bytes) = layer_ref(&p, LayerKind::Role)?;
        srv.add_layer(r.id, bytes);
        Ok(r)
    };
    let web1 = role_layer("web", 1, true)?;
    let web2 = role_layer("web", 2, true)?;
    let web3 = role_layer("web", 3, false)?;
    let db1 = role_layer("db", 1, true)?;
    let web4 = role_layer("web", 4, true)?;
    let sign = |role: &str, v: u64, tries: u32, top: &wire::manifest::LayerRef| -> Result<String> {
        Ok(SignedManifest::sign(
            &manifest(role, v, tries, vec![base.clone(), top.clone()]),
            &key,
        )?
        .to_json())
    };
    let initrd = support::initramfs(dir.path(), &key)?;
    let disk = dir.path().join("disk.raw");
    support::blank_disk(&disk, 256 << 20)?;
    let boot = || Vm::boot(&initrd, &disk, srv.port, "");

    // 1. First boot of v1; v2 is published while v1 runs and the agent stages it.
    srv.set_manifest(MAC, sign("web", 1, 3, &web1)?);
    let mut vm = boot()?;
    vm.wait_for("STRATA stage=switch_root version=1 role=web", BOOT)?;
    srv.set_manifest(MAC, sign("web", 2, 3, &web2)?);
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_for("STRATA agent=confirmed version=1", BOOT)?;
    let staged = vm.wait_for("STRATA agent=staged version=2 role=web", BOOT)?;
    ensure!(
        field(&staged, "bytes") == Some(&web2.size.to_string()),
        "{staged}"
    );
    vm.wait_exit(BOOT)?;

    // 2. Activation: the reboot runs v2 with nothing downloaded.
    srv.reset_counters();
    let mut vm = boot()?;
    vm.wait_for("STRATA stage=decide version=2 role=web why=new", BOOT)?;
    vm.wait_for(
        "STRATA image=busybox role=web version=2 stage=running",
        BOOT,
    )?;
    vm.wait_for("STRATA agent=confirmed version=2", BOOT)?;
    vm.wait_exit(BOOT)?;
    ensure!(
        vm.lines_with("STRATA stage=fetch").is_empty(),
        "v2 was staged, not fetched at boot"
    );
    ensure!(srv.total_sent() == 0, "bytes sent: {}", srv.total_sent());

    // 3. Operator rollback to v1: one reboot, zero layer bytes.
    srv.set_manifest(MAC, sign("web", 1, 3, &web1)?);
    let mut vm = boot()?;
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_for("STRATA agent=confirmed version=1", BOOT)?;
    vm.wait_exit(BOOT)?;
    ensure!(
        srv.total_sent() == 0,
        "rollback sent {} layer bytes",
        srv.total_sent()
    );

    // 4. v3 never confirms health: two tries, then back to v1 by itself.
    srv.set_manifest(MAC, sign("web", 3, 2, &web3)?);
    let mut vm = boot()?;
    vm.wait_for("STRATA stage=decide version=3 role=web why=new", BOOT)?;
    vm.wait_for(
        "STRATA image=busybox role=web version=3 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;
    let mut vm = boot()?;
    vm.wait_for(
        "STRATA stage=decide version=3 role=web why=try attempt=2 tries=2",
        BOOT,
    )?;
    vm.wait_for(
        "STRATA image=busybox role=web version=3 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;
    let mut vm = boot()?;
    vm.wait_for(
        "STRATA stage=decide version=1 role=web why=rollback from=3",
        BOOT,
    )?;
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;

    // 5. A flipped byte in the cached base is found before boot; only its chunk is fetched.
    flip_byte_in_cache(&disk, &format!("/layers/{}.vhdx", base.id), (4 << 20) + 123)?;
    srv.reset_counters();
    let mut vm = boot()?;
    let bad = vm.wait_for("STRATA error=corrupt", BOOT)?;
    ensure!(
        field(&bad, "layer") == Some(&base.id.to_string()) && field(&bad, "chunks") == Some("1"),
        "{bad}"
    );
    ensure!(field(&bad, "first") == Some("4"), "{bad}");
    let rep = vm.wait_for("STRATA stage=repair", BOOT)?;
    ensure!(field(&rep, "bytes") == Some("1048576"), "{rep}");
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;
    ensure!(
        srv.sent(&base.id) == 1 << 20,
        "base bytes sent {}",
        srv.sent(&base.id)
    );

    // 6. Server gone: the last known good version boots, and says so.
    srv.set_down(true);
    let mut vm = boot()?;
    vm.wait_for("STRATA error=unreachable", BOOT)?;
    vm.wait_for("STRATA stage=decide version=1 role=web why=offline", BOOT)?;
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;
    srv.set_down(false);

    // 7. Role switch to db on the same base: only the db layer travels.
    srv.reset_counters();
    srv.set_manifest(MAC, sign("db", 1, 3, &db1)?);
    let mut vm = boot()?;
    vm.wait_for("STRATA image=busybox role=db version=1 stage=running", BOOT)?;
    vm.wait_exit(BOOT)?;
    ensure!(srv.sent(&base.id) == 0 && srv.sent(&db1.id) == db1.size);
    let layers = cache_ls(&disk, "/layers")?;
    ensure!(
        layers
            .iter()
            .filter(|n| n.starts_with(&base.id.to_string()))
            .count()
            == 1,
        "{layers:?}"
    );

    // 8. The server dies mid-transfer: the download resumes from the last whole chunk.
    srv.reset_counters();
    let cut = (2 << 20) + (512 << 10);
    srv.state
        .lock()
        .map_err(|_| anyhow::anyhow!("poisoned"))?
        .cut = Some((web4.id, cut));
    srv.set_manifest(MAC, sign("web", 4, 3, &web4)?);
    let mut vm = boot()?;
    let resume = vm.wait_for("STRATA stage=resume", BOOT)?;
    ensure!(field(&resume, "from") == Some("2097152"), "{resume}");
    vm.wait_for(
        "STRATA image=busybox role=web version=4 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;
    ensure!(
        srv.sent(&web4.id) == cut + web4.size - (2 << 20),
        "sent {}",
        srv.sent(&web4.id)
    );

    // 9. A manifest signed by another key is refused; the node boots its known good version.
    let other = SigningKey::from_bytes(&[7u8; 32]);
    let forged = manifest("web", 5, 3, vec![base.clone(), web1.clone()]);
    srv.set_manifest(MAC, SignedManifest::sign(&forged, &other)?.to_json());
    let mut vm = boot()?;
    vm.wait_for("STRATA error=bad_signature", BOOT)?;
    vm.wait_for("STRATA fallback=boot_last_known_good", BOOT)?;
    vm.wait_for(
        "STRATA image=busybox role=web version=4 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;
    Ok(())
}

/// Bad input never boots: an unknown layer, then a layer whose manifest size is wrong, each
/// refused with a clear marker and a retry; once the server is fixed the node boots. A cache
/// disk too small for the chain is reported as such and nothing boots.
#[test]
fn bad_input_is_refused_and_retried() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let images = ImageSet::new(dir.path())?;
    let role = images.role_layer("web", 1, true)?;
    let (base, base_bytes) = layer_ref(&images.base_vhdx, LayerKind::Base)?;
    let (top, top_bytes) = layer_ref(&role, LayerKind::Role)?;
    let srv = Server::start()?;
    srv.add_layer(base.id, base_bytes);
    let initrd = support::initramfs(dir.path(), &key)?;
    let good = SignedManifest::sign(
        &manifest("web", 1, 3, vec![base.clone(), top.clone()]),
        &key,
    )?;

    // The role layer is unknown to the server (404).
    srv.set_manifest(MAC, good.to_json());
    let disk = dir.path().join("disk.raw");
    support::blank_disk(&disk, 256 << 20)?;
    let mut vm = Vm::boot(&initrd, &disk, srv.port, "")?;
    let e = vm.wait_for("STRATA error=", BOOT)?;
    ensure!(
        e.starts_with("STRATA error=fetch") && e.contains("404"),
        "{e}"
    );
    vm.wait_for("STRATA fallback=boot_last_known_good", BOOT)?;
    vm.wait_for("STRATA error=nothing_to_boot", BOOT)?;
    vm.wait_for("STRATA fallback=retry_after secs=10", BOOT)?;

    // Next try: the layer exists, but the manifest claims one more chunk than it has.
    srv.add_layer(top.id, top_bytes);
    let mut long = top.clone();
    long.size += 1 << 20;
    long.chunks.push(wire::Digest::of(&[0u8; 1 << 20]));
    let wrong = manifest("web", 1, 3, vec![base.clone(), long]);
    srv.set_manifest(MAC, SignedManifest::sign(&wrong, &key)?.to_json());
    let e = vm.wait_for("STRATA error=", BOOT)?;
    ensure!(e.starts_with("STRATA error=size_mismatch"), "{e}");
    vm.wait_for("STRATA fallback=boot_last_known_good", BOOT)?;
    vm.wait_for("STRATA fallback=retry_after", BOOT)?;
    ensure!(vm.lines_with("STRATA stage=switch_root").is_empty());

    // Fixed: the next try boots.
    srv.set_manifest(MAC, good.to_json());
    vm.wait_for("STRATA stage=switch_root version=1 role=web", BOOT)?;
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;

    // A 12 MiB cache disk cannot hold the 15 MiB chain.
    let small = dir.path().join("small.raw");
    support::blank_disk(&small, 12 << 20)?;
    let mut vm = Vm::boot(&initrd, &small, srv.port, "")?;
    let e = vm.wait_for("STRATA error=", BOOT)?;
    ensure!(
        e.starts_with("STRATA error=cache_write") && e.contains("No space left"),
        "{e}"
    );
    vm.wait_for("STRATA error=nothing_to_boot", BOOT)?;
    vm.wait_for("STRATA fallback=retry_after", BOOT)?;
    ensure!(vm.lines_with("STRATA stage=switch_root").is_empty());
    Ok(())
}

/// Without `strata.ip` the boot interface gets its address by DHCP (QEMU's user network
/// serves it) and the boot proceeds as usual. With `strata.disk=ram` and no disk, the cache
/// is in memory and the same chain boots.
#[test]
fn dhcp_without_an_address_and_ram_mode_without_a_disk() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let images = ImageSet::new(dir.path())?;
    let role = images.role_layer("web", 1, true)?;
    let (base, base_bytes) = layer_ref(&images.base_vhdx, LayerKind::Base)?;
    let (top, top_bytes) = layer_ref(&role, LayerKind::Role)?;
    let srv = Server::start()?;
    srv.add_layer(base.id, base_bytes);
    srv.add_layer(top.id, top_bytes);
    srv.set_manifest(
        MAC,
        SignedManifest::sign(&manifest("web", 1, 3, vec![base, top]), &key)?.to_json(),
    );
    let initrd = support::initramfs(dir.path(), &key)?;
    let disk = dir.path().join("disk.raw");
    support::blank_disk(&disk, 256 << 20)?;
    let append = format!(
        "console=ttyS0 panic=10 no_timer_check strata.server=http://10.0.2.2:{} strata.mac={MAC}",
        srv.port
    );
    let mut vm = Vm::boot_cmdline(&initrd, &disk, &append)?;
    let net = vm.wait_for("STRATA stage=net", BOOT)?;
    ensure!(
        field(&net, "via") == Some("dhcp") && field(&net, "ip") == Some("10.0.2.15"),
        "{net}"
    );
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;

    // RAM mode: no disk at all, the layers are fetched into memory, same attach path.
    let append = format!("{} strata.disk=ram", support::cmdline(srv.port));
    let mut vm = Vm::boot_diskless(&initrd, &append)?;
    let cache = vm.wait_for("STRATA stage=cache", BOOT)?;
    ensure!(field(&cache, "device") == Some("ram"), "{cache}");
    vm.wait_for("STRATA stage=fetch", BOOT)?;
    vm.wait_for("STRATA stage=attach", BOOT)?;
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;
    Ok(())
}

/// A cache disk whose file system no longer mounts (here: a garbled superblock, label intact)
/// is formatted again, and the node boots from the server as on a first boot.
#[test]
fn damaged_cache_file_system_is_formatted_again() -> Result<()> {
    let dir = tempfile::tempdir()?;
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let images = ImageSet::new(dir.path())?;
    let role = images.role_layer("web", 1, true)?;
    let (base, base_bytes) = layer_ref(&images.base_vhdx, LayerKind::Base)?;
    let (top, top_bytes) = layer_ref(&role, LayerKind::Role)?;
    let srv = Server::start()?;
    srv.add_layer(base.id, base_bytes);
    srv.add_layer(top.id, top_bytes);
    srv.set_manifest(
        MAC,
        SignedManifest::sign(&manifest("web", 1, 3, vec![base, top]), &key)?.to_json(),
    );
    let initrd = support::initramfs(dir.path(), &key)?;
    let disk = dir.path().join("disk.raw");
    support::blank_disk(&disk, 256 << 20)?;
    let st = std::process::Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-L", node_init::cache::LABEL])
        .arg(&disk)
        .status()?;
    ensure!(st.success(), "mke2fs");
    {
        use std::io::{Seek, SeekFrom, Write};
        let mut f = std::fs::OpenOptions::new().write(true).open(&disk)?;
        // s_log_block_size (superblock offset 24) = 20: no kernel mounts that.
        f.seek(SeekFrom::Start(1024 + 24))?;
        f.write_all(&20u32.to_le_bytes())?;
        f.sync_all()?;
    }
    let mut vm = Vm::boot(&initrd, &disk, srv.port, "")?;
    let cache = vm.wait_for("STRATA stage=cache", BOOT)?;
    ensure!(field(&cache, "formatted") == Some("true"), "{cache}");
    vm.wait_for(
        "STRATA image=busybox role=web version=1 stage=running",
        BOOT,
    )?;
    vm.wait_exit(BOOT)?;
    Ok(())
}
