//! One node's whole life against the real `strata serve` in the lab (issue 5's must-shows),
//! under QEMU TCG, asserting on serial console markers and on the server's records
//! (`strata nodes show`: the node's status and its per-node layer byte counter).
//!
//! The server runs as the lab runs it (full DHCP, router advertisements, its own kernel and
//! the node-init initramfs, PXE through QEMU's iPXE ROM), with `strata.agent=2` on the kernel
//! command line so the agent in the image reports every 2 s. New versions are made the way an
//! operator makes them (`strata image build` from a copy of `images/`, changed), and activated
//! the way an operator does it (`strata nodes set MAC --reboot`, `--pin`, `--role`): the agent
//! inside the running image hears of it in the answer to its next report.
//!
//! 1. First boot: PXE, three layers fetched and verified, the image's marker, health confirmed.
//! 2. v2 is built while v1 runs; the agent stages it (v1 keeps running); a reboot runs v2 with
//!    nothing downloaded.
//! 4. v3 never confirms its health (its agent reboots the machine): after its three tries the
//!    node returns to v2 by itself.
//! 3. The operator pins v1 and asks for a reboot: v1 runs and the server's byte counter for
//!    the node does not move.
//! 5. A byte flipped in the cached base layer on the powered-off VM's disk is found before boot
//!    and repaired by re-fetching that one chunk (the counter moves by exactly that).
//! 7. Role switch to `db` by reboot: only db's role layer and its node layer are fetched; the
//!    base is stored once on the cache disk.
//! 6. The server dies while the node boots: the node boots its last known good version.
//! 8. A v4 with a 40 MiB base is staged by the agent; the server is killed mid-download and
//!    restarted; the download resumes from where it stopped, is verified, and v4 boots.
//!
//! `STRATA_INITRAMFS` names a node-init initramfs other than the default one
//! (`scripts/build-initramfs.sh`'s output); `STRATA_BIN` the strata binary.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{ensure, Context, Result};
use serde_json::Value;
use strata_lab::server::LAB_CONFIG_TEMPLATE;
use strata_lab::{
    fixture, process::run, Disk, Firmware, Lab, LabConfig, Strata, StrataConfig, TestVm, VmConfig,
};

const BOOT: Duration = Duration::from_secs(300);
const MAC: &str = "52:54:00:42:05:01";

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn num(line: &str, key: &str) -> Result<u64> {
    field(line, key)
        .and_then(|v| v.parse().ok())
        .with_context(|| format!("no number {key}= in {line:?}"))
}

/// The lab's `strata serve`: its data directory survives restarts.
fn server(bin: &Path, data_dir: &Path) -> Strata {
    let mut s = Strata::new(bin);
    s.data_dir = Some(data_dir.to_owned());
    let mut boot = String::from("\n[boot]\ncmdline = \"no_timer_check strata.agent=2\"\n");
    if let Some(i) = std::env::var_os("STRATA_INITRAMFS") {
        boot.push_str(&format!(
            "initramfs = {:?}\n",
            PathBuf::from(i).display().to_string()
        ));
    }
    s.config = StrataConfig::Template(LAB_CONFIG_TEMPLATE.replace("{{boot}}", &boot));
    s.ready_timeout = Duration::from_secs(120);
    s
}

/// An operator at the server: the `strata` CLI inside the lab's network, and image builds
/// into the server's store.
struct Operator {
    bin: PathBuf,
    data_dir: PathBuf,
    url: String,
}

impl Operator {
    fn cli(&self, lab: &Lab, args: &[&str]) -> Result<String> {
        let token = std::fs::read_to_string(self.data_dir.join("admin.token"))
            .context("reading the admin token")?;
        let mut cmd = lab.command(&self.bin.to_string_lossy());
        cmd.args(args)
            .env("STRATA_URL", &self.url)
            .env("STRATA_TOKEN", token.trim());
        run(&mut cmd)
    }

    fn node(&self, lab: &Lab) -> Result<Value> {
        let out = self.cli(lab, &["nodes", "--json", "show", MAC])?;
        serde_json::from_str(&out).with_context(|| format!("strata nodes show: {out}"))
    }

    fn layer_bytes(&self, lab: &Lab) -> Result<u64> {
        let n = self.node(lab)?;
        n["layer_bytes"]
            .as_u64()
            .with_context(|| format!("no layer_bytes in {n}"))
    }

    /// `strata image build` of a recipe tree; returns the version.
    fn build(&self, images: &Path) -> Result<u64> {
        let out = run(Command::new(&self.bin)
            .args(["image", "build", "--json", "--store"])
            .arg(self.data_dir.join("store"))
            .arg(images.join("busybox"))
            .arg("--roles")
            .arg(images.join("roles")))?;
        let v: Value =
            serde_json::from_str(&out).with_context(|| format!("strata image build: {out}"))?;
        v["version"]
            .as_u64()
            .with_context(|| format!("no version in {v}"))
    }
}

/// A copy of the repository's `images/` to change.
fn copy_images(to: &Path) -> Result<()> {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images");
    run(Command::new("cp").arg("-a").arg(&from).arg(to))?;
    Ok(())
}

fn edit(path: &Path, from: &str, to: &str) -> Result<()> {
    let text =
        std::fs::read_to_string(path).with_context(|| format!("reading {}", path.display()))?;
    ensure!(text.contains(from), "{} has no {from:?}", path.display());
    std::fs::write(path, text.replacen(from, to, 1))
        .with_context(|| format!("writing {}", path.display()))
}

/// Bytes that do not compress or repeat (xorshift), so the layer is as big as the file.
fn blob(path: &Path, len: usize) -> Result<()> {
    let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
    let mut out = Vec::with_capacity(len);
    while out.len() < len {
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        out.extend_from_slice(&x.to_le_bytes());
    }
    out.truncate(len);
    std::fs::write(path, out).with_context(|| format!("writing {}", path.display()))
}

/// Flips one byte of `file` inside the ext4 file system on the raw disk `disk` (the cache
/// node-init made), at byte `offset` of the file. Uses e2fsprogs' debugfs, read-only, to map
/// the file's block.
/// The first offset at or after `offset` that the file `file` on the ext4 image `disk` holds
/// data at (not a hole), from debugfs's extent list; the file's size if none.
fn data_at_or_after(disk: &Path, file: &str, offset: u64) -> Result<u64> {
    let stats = run(Command::new("debugfs").args(["-R", "stats"]).arg(disk))?;
    let bs: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no block size in debugfs stats of {}", disk.display()))?;
    let stat = run(Command::new("debugfs")
        .args(["-R", &format!("stat {file}")])
        .arg(disk))?;
    // `EXTENTS:` then `(0-3):1172-1175, (4132-6183):1176-3227, (9):40` (logical:physical).
    let list = stat
        .lines()
        .skip_while(|l| !l.starts_with("EXTENTS:"))
        .nth(1)
        .with_context(|| format!("no extent list in debugfs stat {file}: {stat}"))?;
    let mut found = u64::MAX;
    for e in list.split(", ") {
        let Some(logical) = e.strip_prefix('(').and_then(|e| e.split(')').next()) else {
            continue;
        };
        if logical.starts_with("ETB") {
            continue;
        }
        let (first, last) = logical.split_once('-').unwrap_or((logical, logical));
        let (first, last): (u64, u64) = (
            first.parse().with_context(|| format!("extent {e:?}"))?,
            last.parse().with_context(|| format!("extent {e:?}"))?,
        );
        if (last + 1) * bs > offset {
            found = found.min((first * bs).max(offset));
        }
    }
    Ok(found)
}

fn flip_byte_in_cache(disk: &Path, file: &str, offset: u64) -> Result<()> {
    use std::os::unix::fs::FileExt;
    let stats = run(Command::new("debugfs").args(["-R", "stats"]).arg(disk))?;
    let bs: u64 = stats
        .lines()
        .find_map(|l| l.strip_prefix("Block size:"))
        .and_then(|v| v.trim().parse().ok())
        .with_context(|| format!("no block size in debugfs stats of {}", disk.display()))?;
    let out = run(Command::new("debugfs")
        .args(["-R", &format!("bmap {file} {}", offset / bs)])
        .arg(disk))?;
    let pblk: u64 = out
        .trim()
        .parse()
        .with_context(|| format!("debugfs bmap {file}: {out:?}"))?;
    ensure!(pblk != 0, "{file} has a hole at {offset}");
    let at = pblk * bs + offset % bs;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(disk)?;
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, at)?;
    b[0] ^= 0x5a;
    f.write_all_at(&b, at)?;
    f.sync_all()?;
    Ok(())
}

/// Waits for the running marker of `role`/`version`, then the agent's confirmation.
fn running(vm: &mut TestVm, role: &str, version: u64) -> Result<()> {
    vm.wait_for_serial(
        &format!("STRATA image=busybox role={role} version={version} stage=running"),
        BOOT,
    )?;
    vm.wait_for_serial(
        &format!("STRATA agent=confirmed version={version} role={role}"),
        BOOT,
    )?;
    Ok(())
}

/// The serial text between two byte positions (a boot's lines).
fn serial_since(vm: &TestVm, from: usize) -> Result<String> {
    let all = std::fs::read(vm.serial_path())?;
    Ok(String::from_utf8_lossy(all.get(from..).unwrap_or_default()).into_owned())
}

fn serial_len(vm: &TestVm) -> Result<usize> {
    Ok(usize::try_from(std::fs::metadata(vm.serial_path())?.len())?)
}

#[test]
fn node_life_against_strata_serve() -> Result<()> {
    let bin = Strata::locate_binary()?;
    let mut lab = Lab::new(LabConfig {
        ipv6: true,
        ..LabConfig::default()
    })?;
    let data_dir = lab.dir().join("strata-data");
    let srv = server(&bin, &data_dir);
    let mut current = lab.start_server(&srv)?;
    let op = Operator {
        bin: bin.clone(),
        data_dir: data_dir.clone(),
        url: format!("http://{}:8080", lab.config().server_ip),
    };

    let disk = lab.dir().join("node.raw");
    fixture::create_disk(&disk, "raw", "256M")?;
    let mut cfg = VmConfig::new("node", Firmware::Bios);
    cfg.memory_mib = 512;
    cfg.mac = Some(MAC.into());
    cfg.disk = Some(Disk {
        path: disk.clone(),
        format: "raw".into(),
    });
    cfg.no_reboot = false;
    cfg.fail_markers = vec!["STRATA panic".into(), "Kernel panic".into()];

    // 1. First boot.
    let mut vm = lab.start_vm(cfg.clone())?;
    let man = vm.wait_for_line("STRATA stage=manifest", BOOT)?;
    ensure!(
        field(&man, "version") == Some("1") && field(&man, "role") == Some("web"),
        "{man}"
    );
    let mut base = String::new();
    for i in 0..3 {
        // Each layer by its data extents: every data byte (and the few zeros between extents
        // closer than node-init's coalescing gap), never the file's holes.
        let e = vm.wait_for_line("STRATA stage=extents", BOOT)?;
        let f = vm.wait_for_line("STRATA stage=fetch", BOOT)?;
        ensure!(
            field(&e, "layer") == field(&f, "layer")
                && num(&f, "bytes")? >= num(&e, "data")?
                && num(&f, "bytes")? < num(&f, "size")?,
            "first boot downloads each layer's data extents, not its holes: {e} / {f}"
        );
        if i == 0 {
            base = field(&f, "layer").unwrap_or_default().to_owned();
        }
    }
    vm.wait_for_serial("STRATA stage=verify", BOOT)?;
    running(&mut vm, "web", 1)?;

    // 2. v2 built while v1 runs; the agent stages it in the background.
    let v2 = lab.dir().join("images-v2");
    copy_images(&v2)?;
    edit(
        &v2.join("roles/web/recipe.toml"),
        "Hello from a Strata web node",
        "Hello from version 2",
    )?;
    ensure!(op.build(&v2)? == 2, "the second build is version 2");
    let staged = vm.wait_for_line("STRATA agent=staged version=2 role=web", BOOT)?;
    ensure!(
        num(&staged, "bytes")? > 0,
        "staging downloads v2's new layers: {staged}"
    );
    let before = op.layer_bytes(&lab)?;
    let mark = serial_len(&vm)?;
    op.cli(&lab, &["nodes", "set", MAC, "--reboot"])?;
    vm.wait_for_serial("STRATA agent=reboot version=1", BOOT)?;
    vm.wait_for_serial("STRATA stage=decide version=2 role=web why=new", BOOT)?;
    running(&mut vm, "web", 2)?;
    let boot2 = serial_since(&vm, mark)?;
    ensure!(
        !boot2.contains("STRATA stage=fetch"),
        "activating a staged version downloads nothing:\n{boot2}"
    );
    ensure!(
        op.layer_bytes(&lab)? == before,
        "the server sent layer bytes for the activation"
    );

    // 4. v3 never confirms its health: three tries, then back to v2 by itself.
    let v3 = lab.dir().join("images-v3");
    run(Command::new("cp").arg("-a").arg(&v2).arg(&v3))?;
    let agent = v3.join("roles/web/files/sbin/strata-agent");
    std::fs::create_dir_all(agent.parent().context("agent dir")?)?;
    std::fs::write(
        &agent,
        "#!/bin/sh\necho 'STRATA test=unhealthy version=3'\nsleep 1\nreboot -f\n",
    )?;
    run(Command::new("chmod").arg("0755").arg(&agent))?;
    ensure!(op.build(&v3)? == 3, "the third build is version 3");
    vm.wait_for_serial("STRATA agent=staged version=3 role=web", BOOT)?;
    op.cli(&lab, &["nodes", "set", MAC, "--reboot"])?;
    vm.wait_for_serial("STRATA stage=decide version=3 role=web why=new", BOOT)?;
    vm.wait_for_serial("STRATA test=unhealthy version=3", BOOT)?;
    for attempt in 2..=3 {
        vm.wait_for_serial(
            &format!("STRATA stage=decide version=3 role=web why=try attempt={attempt} tries=3"),
            BOOT,
        )?;
        vm.wait_for_serial("STRATA test=unhealthy version=3", BOOT)?;
    }
    vm.wait_for_serial(
        "STRATA stage=decide version=2 role=web why=rollback from=3",
        BOOT,
    )?;
    running(&mut vm, "web", 2)?;

    // 3. Operator rollback to v1: one reboot, zero layer bytes.
    let before = op.layer_bytes(&lab)?;
    let mark = serial_len(&vm)?;
    op.cli(
        &lab,
        &["nodes", "set", MAC, "--pin", "busybox@1", "--reboot"],
    )?;
    vm.wait_for_serial("STRATA agent=reboot version=2", BOOT)
        .inspect_err(|_| {
            eprintln!(
                "the server's record of the node: {:?}",
                op.node(&lab).map(|n| n.to_string())
            );
        })?;
    vm.wait_for_serial("STRATA stage=decide version=1 role=web", BOOT)?;
    running(&mut vm, "web", 1)?;
    let boot = serial_since(&vm, mark)?;
    ensure!(
        !boot.contains("STRATA stage=fetch"),
        "rollback downloaded a layer:\n{boot}"
    );
    let after = op.layer_bytes(&lab)?;
    ensure!(
        after == before,
        "rollback: the server sent {} layer bytes to the node",
        after - before
    );
    let node = op.node(&lab)?;
    ensure!(
        node["status"]["version"] == 1,
        "the server records version 1 running: {node}"
    );

    // 5. A byte flipped in the cached base layer while the node is off.
    vm.stop();
    drop(vm);
    let size = {
        let out = run(Command::new("debugfs")
            .args(["-R", &format!("stat /layers/{base}.vhdx")])
            .arg(&disk))?;
        out.split_whitespace()
            .skip_while(|w| *w != "Size:")
            .nth(1)
            .and_then(|s| s.parse::<u64>().ok())
            .with_context(|| format!("no size for the base layer in {out}"))?
    };
    // The cached copy is sparse like the server's: damage a byte that is data, at or after
    // the middle.
    let at = data_at_or_after(&disk, &format!("/layers/{base}.vhdx"), size / 2)?;
    ensure!(at < size, "no data in the base's second half");
    flip_byte_in_cache(&disk, &format!("/layers/{base}.vhdx"), at)?;
    let before = op.layer_bytes(&lab)?;
    let mut cfg2 = cfg.clone();
    cfg2.name = "node-b".into();
    let mut vm = lab.start_vm(cfg2)?;
    let bad = vm.wait_for_line(&format!("STRATA error=corrupt layer={base}"), BOOT)?;
    ensure!(
        field(&bad, "chunks") == Some("1"),
        "one damaged chunk: {bad}"
    );
    let rep = vm.wait_for_line(&format!("STRATA stage=repair layer={base}"), BOOT)?;
    let repaired = num(&rep, "bytes")?;
    ensure!(
        repaired > 0 && repaired < size,
        "only the damaged chunk is fetched again: {rep}"
    );
    running(&mut vm, "web", 1)?;
    let after = op.layer_bytes(&lab)?;
    ensure!(
        after - before == repaired,
        "the server sent {} bytes for a {repaired}-byte repair",
        after - before
    );

    // 7. Role switch by reboot: the base is shared and stored once.
    let mark = serial_len(&vm)?;
    op.cli(&lab, &["nodes", "set", MAC, "--role", "db", "--reboot"])?;
    let man = vm.wait_for_line("STRATA stage=manifest version=1 role=db", BOOT)?;
    ensure!(field(&man, "layers") == Some("3"), "{man}");
    running(&mut vm, "db", 1)?;
    let boot = serial_since(&vm, mark)?;
    let fetched: Vec<&str> = boot
        .lines()
        .filter(|l| l.contains("STRATA stage=fetch"))
        .collect();
    ensure!(
        fetched.len() == 2,
        "db's role layer and node layer only: {fetched:?}"
    );
    ensure!(
        !boot.contains(&format!("STRATA stage=fetch layer={base}")),
        "the base was fetched again:\n{boot}"
    );
    // Not powered off: the cache disk is read as the running node left it (synced at boot).
    let ls = run(Command::new("debugfs")
        .args(["-R", "ls -l /layers"])
        .arg(&disk))?;
    ensure!(
        ls.matches(&format!("{base}.vhdx")).count() == 1,
        "the base is stored once:\n{ls}"
    );

    // 6. The server dies while the node boots: last known good (db v1).
    op.cli(&lab, &["nodes", "set", MAC, "--reboot"])?;
    vm.wait_for_serial("STRATA agent=reboot version=1", BOOT)?;
    vm.wait_for_serial("STRATA stage=init", BOOT)?;
    lab.server_mut(current)?.kill();
    vm.wait_for_serial("STRATA error=unreachable", BOOT)?;
    vm.wait_for_serial("STRATA stage=decide version=1 role=db why=offline", BOOT)?;
    current = lab.start_server(&srv)?;
    running(&mut vm, "db", 1)?;

    // 8. v4 (a 40 MiB base): the server is killed mid-download and restarted; it resumes.
    let v4 = lab.dir().join("images-v4");
    run(Command::new("cp").arg("-a").arg(&v3).arg(&v4))?;
    std::fs::remove_file(v4.join("roles/web/files/sbin/strata-agent"))?;
    let blob_path = v4.join("busybox/blob.bin");
    blob(&blob_path, 40 << 20)?;
    edit(
        &v4.join("busybox/recipe.toml"),
        "size_mib = 32",
        "size_mib = 96",
    )?;
    let recipe = v4.join("busybox/recipe.toml");
    let mut text = std::fs::read_to_string(&recipe)?;
    text.push_str(&format!(
        "\n[[file]]\npath = \"/srv/blob\"\nsource = {:?}\nmode = \"0644\"\n",
        blob_path.display().to_string()
    ));
    std::fs::write(&recipe, text)?;
    ensure!(op.build(&v4)? == 4, "the fourth build is version 4");
    std::fs::remove_file(&blob_path)?;
    op.cli(&lab, &["nodes", "set", MAC, "--unpin"])?;
    let p = vm.wait_for_line("STRATA stage=progress", BOOT)?;
    let big = field(&p, "layer").unwrap_or_default().to_owned();
    lab.server_mut(current)?.kill();
    vm.wait_for_serial("staging failed:", BOOT)?;
    let _ = lab.start_server(&srv)?;
    let resume = vm.wait_for_line(&format!("STRATA stage=resume layer={big}"), BOOT)?;
    let from = num(&resume, "from")?;
    ensure!(
        from > 0 && from < num(&resume, "size")?,
        "resumed mid-layer: {resume}"
    );
    vm.wait_for_serial("STRATA agent=staged version=4 role=db", BOOT)?;
    let mark = serial_len(&vm)?;
    op.cli(&lab, &["nodes", "set", MAC, "--reboot"])?;
    vm.wait_for_serial("STRATA stage=decide version=4 role=db why=new", BOOT)?;
    vm.wait_for_serial("STRATA stage=verify", BOOT)?;
    running(&mut vm, "db", 4)?;
    let boot = serial_since(&vm, mark)?;
    ensure!(
        !boot.contains("STRATA stage=fetch") && !boot.contains("error=corrupt"),
        "v4 boots from the resumed, verified download:\n{boot}"
    );
    Ok(())
}
