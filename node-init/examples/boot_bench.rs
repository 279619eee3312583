//! Boot-time benchmark under QEMU (TCG), printing figures and ratios measured in one run:
//!
//! - `init`: QEMU start → `STRATA stage=init` (kernel + our initramfs reach PID 1; the floor)
//! - `first`: QEMU start → image marker on a blank disk (format, fetch, verify, attach, boot)
//! - `cached`: the same version again (verify from cache, no download)
//! - `rollback`: back to the previous cached version (no download)
//! - `pxe-init`: network boot (QEMU's iPXE ROM, DHCP + TFTP from QEMU's user network, kernel
//!   and initramfs over HTTP) → `STRATA stage=init`: a plain PXE boot of the same kernel and
//!   initramfs
//! - `pxe-first`, `pxe-cached`: the same network boot carried on to the image marker
//! - `verify`: the ms node-init reports for hashing the chain before boot
//!
//! Run: `cargo run --release -p node-init --example boot_bench [-- REPEATS]` (default 3).

#[path = "../tests/support/mod.rs"]
mod support;

use std::path::Path;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use ed25519_dalek::SigningKey;
use support::server::Server;
use support::{field, layer_ref, manifest, ImageSet, Vm, MAC};
use wire::manifest::{LayerKind, SignedManifest};

const LIMIT: Duration = Duration::from_secs(300);
const IMAGE: &str = "STRATA image=busybox role=web version=";

struct Boot {
    init: f64,
    image: f64,
    verify_ms: f64,
}

fn measure(mut vm: Vm, t0: Instant, version: u64) -> Result<Boot> {
    vm.wait_for("STRATA stage=init", LIMIT)?;
    let init = t0.elapsed().as_secs_f64();
    let v = vm.wait_for("STRATA stage=verify", LIMIT)?;
    let verify_ms = field(&v, "ms")
        .and_then(|s| s.parse().ok())
        .unwrap_or(f64::NAN);
    vm.wait_for(&format!("{IMAGE}{version} stage=running"), LIMIT)?;
    let image = t0.elapsed().as_secs_f64();
    vm.wait_exit(LIMIT)?;
    Ok(Boot {
        init,
        image,
        verify_ms,
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(|a, b| a.total_cmp(b));
    v.get(v.len() / 2).copied().unwrap_or(f64::NAN)
}

fn main() -> Result<()> {
    let repeats: usize = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(3);
    let dir = tempfile::tempdir()?;
    let key = SigningKey::from_bytes(&[42u8; 32]);
    let images = ImageSet::new(dir.path())?;
    let (base, base_bytes) = layer_ref(&images.base_vhdx, LayerKind::Base)?;
    let srv = Server::start()?;
    srv.add_layer(base.id, base_bytes);
    let mut tops = Vec::new();
    for v in [1u64, 2] {
        let (r, bytes) = layer_ref(&images.role_layer("web", v, true)?, LayerKind::Role)?;
        srv.add_layer(r.id, bytes);
        tops.push(r);
    }
    let sign = |v: u64| -> Result<String> {
        let top = tops.get(v as usize - 1).context("version")?.clone();
        Ok(SignedManifest::sign(&manifest("web", v, 3, vec![base.clone(), top]), &key)?.to_json())
    };
    let initrd = support::initramfs(dir.path(), &key)?;
    // Network boot files: iPXE script over TFTP, kernel and initramfs over HTTP.
    let tftp = dir.path().join("tftp");
    std::fs::create_dir_all(&tftp)?;
    std::fs::write(
        tftp.join("boot.ipxe"),
        format!(
            "#!ipxe\nkernel http://10.0.2.2:{p}/vmlinuz {}\ninitrd http://10.0.2.2:{p}/initrd.img\nboot\n",
            support::cmdline(srv.port),
            p = srv.port
        ),
    )?;
    {
        let mut st = srv.state.lock().map_err(|_| anyhow::anyhow!("poisoned"))?;
        st.files.insert(
            "/vmlinuz".into(),
            std::sync::Arc::new(std::fs::read(support::kernel()?)?),
        );
        st.files.insert(
            "/initrd.img".into(),
            std::sync::Arc::new(std::fs::read(&initrd)?),
        );
    }

    let (mut init, mut first, mut cached, mut rollback, mut verify) =
        (vec![], vec![], vec![], vec![], vec![]);
    // Per boot, PID 1 start → image marker: node-init's own share, free of kernel-boot noise.
    let (mut d_first, mut d_cached, mut d_rollback) = (vec![], vec![], vec![]);
    let (mut pxe_init, mut pxe_first, mut pxe_cached) = (vec![], vec![], vec![]);
    let direct = |disk: &Path, v: u64| -> Result<Boot> {
        srv.set_manifest(MAC, sign(v)?);
        let t0 = Instant::now();
        measure(Vm::boot(&initrd, disk, srv.port, "")?, t0, v)
    };
    let pxe = |disk: &Path, v: u64| -> Result<Boot> {
        srv.set_manifest(MAC, sign(v)?);
        let t0 = Instant::now();
        measure(Vm::pxe(&tftp, disk)?, t0, v)
    };
    for r in 0..repeats {
        let disk = dir.path().join(format!("disk{r}.raw"));
        support::blank_disk(&disk, 256 << 20)?;
        let b = direct(&disk, 1)?;
        init.push(b.init);
        first.push(b.image);
        d_first.push(b.image - b.init);
        let b = direct(&disk, 1)?;
        init.push(b.init);
        cached.push(b.image);
        d_cached.push(b.image - b.init);
        verify.push(b.verify_ms);
        direct(&disk, 2)?;
        let b = direct(&disk, 1)?;
        init.push(b.init);
        rollback.push(b.image);
        d_rollback.push(b.image - b.init);

        let disk = dir.path().join(format!("pxe{r}.raw"));
        support::blank_disk(&disk, 256 << 20)?;
        let b = pxe(&disk, 1)?;
        pxe_init.push(b.init);
        pxe_first.push(b.image);
        let b = pxe(&disk, 1)?;
        pxe_init.push(b.init);
        pxe_cached.push(b.image);
        eprintln!("repeat {} of {repeats} done", r + 1);
    }
    let (i, f, c, rb, v) = (
        median(init),
        median(first),
        median(cached),
        median(rollback),
        median(verify),
    );
    let (pi, pf, pc) = (median(pxe_init), median(pxe_first), median(pxe_cached));
    let chain = base.size + tops.first().map_or(0, |t| t.size);
    println!("node-init boot benchmark, QEMU TCG, medians of {repeats} (seconds from QEMU start)");
    println!("{:<44} {:>8} {:>10}", "what", "seconds", "ratio");
    println!(
        "{:<44} {:>8.2} {:>10}",
        "direct kernel boot to node-init (stage=init)", i, "1.00"
    );
    println!(
        "{:<44} {:>8.2} {:>9.2}x",
        "direct, first boot to image marker",
        f,
        f / i
    );
    println!(
        "{:<44} {:>8.2} {:>9.2}x",
        "direct, cached boot to image marker",
        c,
        c / i
    );
    println!(
        "{:<44} {:>8.2} {:>9.2}x",
        "direct, rollback boot to image marker",
        rb,
        rb / i
    );
    println!(
        "{:<44} {:>8.2} {:>10}",
        "plain PXE boot to node-init (stage=init)", pi, "1.00 (pxe)"
    );
    println!(
        "{:<44} {:>8.2} {:>9.2}x",
        "PXE, first boot to image marker",
        pf,
        pf / pi
    );
    println!(
        "{:<44} {:>8.2} {:>9.2}x",
        "PXE, cached boot to image marker",
        pc,
        pc / pi
    );
    println!(
        "node-init's share (stage=init → image marker, per boot): first {:.2} s, cached {:.2} s, rollback {:.2} s",
        median(d_first),
        median(d_cached),
        median(d_rollback)
    );
    println!(
        "verification before boot: {v:.0} ms for {:.1} MiB ({:.1} MiB/s under TCG), {:.1}% of a cached boot",
        chain as f64 / 1048576.0,
        chain as f64 / 1048576.0 / (v / 1000.0),
        v / 10.0 / c
    );
    Ok(())
}
