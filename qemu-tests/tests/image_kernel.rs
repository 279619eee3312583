//! A node boots the kernel recorded with ITS image, not the server's configured one. A copy of
//! the busybox image, `cloudbox`, is built with Debian's *cloud* kernel (`[kernel] dir` =
//! `$STRATA_CACHE/kernel-cloud/root`, unpacked by scripts/setup.sh; virtio as modules, ext4
//! built in, no e1000), with a role `cloud` on it. `strata serve` is configured with Debian's
//! generic kernel. A node placed in role `cloud` PXE boots (BIOS, QEMU's iPXE ROM): its script
//! names the cloud kernel's blob and an initramfs composed of node-init's archive and the cloud
//! kernel's module archive; node-init loads the modules from the cloud kernel's own list, and
//! the image's init prints `uname -r`, which must be the cloud release.

use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Duration;

use anyhow::{bail, ensure, Context, Result};
use serde_json::Value;
use strata_lab::server::{StrataConfig, LAB_CONFIG_TEMPLATE};
use strata_lab::{fixture, tools, Disk, Firmware, Lab, LabConfig, Strata, VmConfig};

const BOOT: Duration = Duration::from_secs(300);
const MAC: &str = "52:54:00:42:07:01";

fn field<'a>(line: &'a str, key: &str) -> Option<&'a str> {
    line.split_whitespace()
        .find_map(|w| w.strip_prefix(key)?.strip_prefix('='))
}

fn run(cmd: &mut Command) -> Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!(
            "{cmd:?} failed ({}): {}{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The cloud kernel scripts/setup.sh unpacks: (root, release).
fn cloud_kernel() -> Result<(PathBuf, String)> {
    let root = fixture::cache_dir().join("kernel-cloud/root");
    let boot = root.join("boot");
    let rd = std::fs::read_dir(&boot).with_context(|| {
        format!(
            "{}: run scripts/setup.sh (it unpacks Debian's cloud kernel)",
            boot.display()
        )
    })?;
    for e in rd {
        let name = e?.file_name().to_string_lossy().into_owned();
        if let Some(release) = name.strip_prefix("vmlinuz-") {
            return Ok((root.clone(), release.to_owned()));
        }
    }
    bail!(
        "no vmlinuz-* in {}: run scripts/setup.sh (it unpacks Debian's cloud kernel)",
        boot.display()
    )
}

/// `images/busybox` copied as `cloudbox` with the cloud kernel, and a role `cloud` on it.
fn cloudbox_recipes(dir: &Path, kernel_root: &Path) -> Result<()> {
    let from = Path::new(env!("CARGO_MANIFEST_DIR")).join("../images/busybox");
    std::fs::create_dir_all(dir.join("roles/cloud"))?;
    run(Command::new("cp")
        .arg("-a")
        .arg(&from)
        .arg(dir.join("cloudbox")))?;
    let recipe = dir.join("cloudbox/recipe.toml");
    let text = std::fs::read_to_string(&recipe)?;
    let (name, kdir) = (
        "name = \"busybox\"",
        "dir = \"~/.cache/strata/kernel/root\"",
    );
    ensure!(
        text.contains(name) && text.contains(kdir),
        "{} changed: this test edits its name and [kernel] dir",
        recipe.display()
    );
    let text = text.replacen(name, "name = \"cloudbox\"", 1).replacen(
        kdir,
        &format!("dir = {:?}", kernel_root.display().to_string()),
        1,
    );
    std::fs::write(&recipe, text)?;
    std::fs::write(
        dir.join("roles/cloud/recipe.toml"),
        "[role]\nname = \"cloud\"\nimage = \"cloudbox\"\ndescription = \"busybox on Debian's cloud kernel\"\n",
    )?;
    Ok(())
}

#[test]
fn a_node_boots_the_kernel_of_its_image() -> Result<()> {
    let bin = Strata::locate_binary()?;
    let (kernel_root, release) = cloud_kernel()?;
    let mut lab = Lab::new(LabConfig {
        ipv6: true,
        ..LabConfig::default()
    })?;
    let data_dir = lab.dir().join("strata-data");

    // The cloudbox image, built into the server's store as an operator would.
    let recipes = lab.dir().join("images-cloud");
    cloudbox_recipes(&recipes, &kernel_root)?;
    let out = run(Command::new(&bin)
        .args(["image", "build", "--json", "--store"])
        .arg(data_dir.join("store"))
        .arg(recipes.join("cloudbox"))
        .arg("--roles")
        .arg(recipes.join("roles")))?;
    let built: Value = serde_json::from_str(&out).with_context(|| format!("image build: {out}"))?;
    ensure!(built["kernel"]["release"] == release.as_str(), "{built}");
    let kernel_id = built["kernel"]["id"]
        .as_str()
        .context("kernel id")?
        .to_owned();
    ensure!(built["kernel"]["modules"]["id"].is_string(), "{built}");

    // The server boots Debian's generic kernel by default.
    let mut srv = Strata::new(&bin);
    srv.data_dir = Some(data_dir.clone());
    let mut boot = String::from("\n[boot]\ncmdline = \"no_timer_check\"\n");
    if let Some(i) = std::env::var_os("STRATA_INITRAMFS") {
        boot.push_str(&format!(
            "initramfs = {:?}\n",
            PathBuf::from(i).display().to_string()
        ));
    }
    srv.config = StrataConfig::Template(LAB_CONFIG_TEMPLATE.replace("{{boot}}", &boot));
    srv.ready_timeout = Duration::from_secs(120);
    lab.start_server(&srv)?;
    let url = format!("http://{}:8080", lab.config().server_ip);

    // The node is discovered (its script asked for once), then placed in role `cloud`.
    let script_url = format!("{url}/boot/node.ipxe?mac={MAC}");
    let fetch = |lab: &Lab| {
        let mut cmd = lab.command(tools::BUSYBOX);
        cmd.args(["wget", "-q", "-O", "-", &script_url]);
        run(&mut cmd)
    };
    let first = fetch(&lab)?;
    ensure!(!first.contains(&kernel_id), "{first}");
    let token = std::fs::read_to_string(data_dir.join("admin.token"))?;
    let mut cli = lab.command(&bin.to_string_lossy());
    cli.args(["nodes", "set", MAC, "--role", "cloud"])
        .env("STRATA_URL", &url)
        .env("STRATA_TOKEN", token.trim());
    run(&mut cli)?;
    let script = fetch(&lab)?;
    ensure!(
        script.contains(&format!("/boot/kernels/{kernel_id} ")),
        "the script does not boot cloudbox's kernel:\n{script}"
    );
    ensure!(script.contains("/boot/initramfs/"), "{script}");

    let disk = lab.dir().join("node.raw");
    fixture::create_disk(&disk, "raw", "256M")?;
    let mut cfg = VmConfig::new("node", Firmware::Bios);
    cfg.memory_mib = 512;
    cfg.mac = Some(MAC.into());
    cfg.disk = Some(Disk {
        path: disk.clone(),
        format: "raw".into(),
    });
    cfg.no_reboot = true;
    cfg.fail_markers = vec!["STRATA panic".into(), "Kernel panic".into()];
    let mut vm = lab.start_vm(cfg)?;

    // node-init runs on the cloud kernel and loads that kernel's modules from its own list.
    let modules = vm.wait_for_line("STRATA stage=modules", BOOT)?;
    ensure!(
        field(&modules, "list") == Some(&format!("/lib/modules/{release}/strata-modules.list")),
        "{modules}"
    );
    ensure!(
        field(&modules, "loaded").is_some_and(|n| n != "0")
            && field(&modules, "failed") == Some("0"),
        "{modules}"
    );
    let man = vm.wait_for_line("STRATA stage=manifest", BOOT)?;
    ensure!(field(&man, "role") == Some("cloud"), "{man}");
    let running = vm.wait_for_line(
        "STRATA image=cloudbox role=cloud version=1 stage=running",
        BOOT,
    )?;
    eprintln!("{modules}\n{running}");
    ensure!(
        field(&running, "kernel") == Some(release.as_str()),
        "the image runs kernel {:?}, not its own {release}: {running}",
        field(&running, "kernel")
    );
    Ok(())
}
