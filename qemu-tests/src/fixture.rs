//! Boot fixtures: Debian's kernel from the cache (scripts/setup.sh unpacks it) and a tiny
//! test initramfs whose `/init` (busybox-static) prints a marker and powers off.
//!
//! The initramfs is written as a `newc` cpio archive (the format the kernel unpacks,
//! Documentation/driver-api/early-userspace/buffer-format.rst) directly, so its device
//! node `/dev/console` needs neither root nor `mknod`.

use std::io::Write;
use std::path::{Path, PathBuf};

use anyhow::{bail, Context, Result};

use crate::server::BootFiles;
use crate::tools;

/// The marker the test initramfs prints once its `/init` runs.
pub const BOOT_MARKER: &str = "STRATA lab-init ok";

/// The kernel command line for the test initramfs: serial console, quiet kernel, and a panic
/// that stops (no reboot loop) the VM; `no_timer_check` because under TCG on a loaded host the
/// kernel's IO-APIC timer check can fail and panic.
pub const TEST_CMDLINE: &str = "console=ttyS0 quiet panic=-1 no_timer_check";

/// The strata cache directory (`$STRATA_CACHE`, else `$XDG_CACHE_HOME/strata`, else
/// `~/.cache/strata`), as in scripts/common.sh.
pub fn cache_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("STRATA_CACHE") {
        return PathBuf::from(d);
    }
    let base = std::env::var_os("XDG_CACHE_HOME")
        .map(PathBuf::from)
        .or_else(|| std::env::var_os("HOME").map(|h| PathBuf::from(h).join(".cache")))
        .unwrap_or_else(|| PathBuf::from("/root/.cache"));
    base.join("strata")
}

/// Debian's kernel image unpacked by scripts/setup.sh (`<cache>/kernel/root/boot/vmlinuz-*`).
pub fn debian_kernel() -> Result<PathBuf> {
    let boot = cache_dir().join("kernel/root/boot");
    let mut found: Vec<PathBuf> = std::fs::read_dir(&boot)
        .with_context(|| {
            format!(
                "reading {}: run scripts/setup.sh to unpack Debian's kernel",
                boot.display()
            )
        })?
        .filter_map(|e| e.ok().map(|e| e.path()))
        .filter(|p| {
            p.file_name()
                .and_then(|n| n.to_str())
                .is_some_and(|n| n.starts_with("vmlinuz-"))
        })
        .collect();
    found.sort();
    match found.pop() {
        Some(k) => Ok(k),
        None => bail!(
            "no vmlinuz-* in {}: run scripts/setup.sh to unpack Debian's kernel",
            boot.display()
        ),
    }
}

/// Creates an empty disk image (`qemu-img create`), `format` `raw` or `qcow2`, `size` in
/// qemu-img syntax (`256M`, `1G`).
pub fn create_disk(path: &Path, format: &str, size: &str) -> Result<()> {
    crate::process::run(
        std::process::Command::new("qemu-img")
            .args(["create", "-q", "-f", format])
            .arg(path)
            .arg(size),
    )
    .with_context(|| format!("creating disk image {}", path.display()))?;
    Ok(())
}

/// A `newc` cpio archive writer (uncompressed).
#[derive(Debug)]
pub struct Cpio<W: Write> {
    out: W,
    ino: u32,
    written: u64,
}

impl<W: Write> Cpio<W> {
    /// Starts an archive.
    pub fn new(out: W) -> Self {
        Self {
            out,
            ino: 1,
            written: 0,
        }
    }

    fn entry(&mut self, name: &str, mode: u32, rdev: (u32, u32), data: &[u8]) -> Result<()> {
        let namesize = u32::try_from(name.len() + 1).context("cpio name too long")?;
        let filesize = u32::try_from(data.len()).context("cpio member over 4 GiB")?;
        let header = format!(
            "070701{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}",
            self.ino, mode, 0, 0, 1, 0, filesize, 0, 0, rdev.0, rdev.1, namesize, 0
        );
        self.ino += 1;
        self.write(header.as_bytes())?;
        self.write(name.as_bytes())?;
        self.write(&[0])?;
        self.pad()?;
        self.write(data)?;
        self.pad()
    }

    fn write(&mut self, b: &[u8]) -> Result<()> {
        self.out.write_all(b).context("writing the cpio archive")?;
        self.written += b.len() as u64;
        Ok(())
    }

    fn pad(&mut self) -> Result<()> {
        let n = usize::try_from((4 - self.written % 4) % 4).unwrap_or(0);
        self.write(&[0u8; 3][..n])
    }

    /// A directory.
    pub fn dir(&mut self, name: &str) -> Result<()> {
        self.entry(name, 0o040_755, (0, 0), &[])
    }

    /// A regular file with permission bits `perm`.
    pub fn file(&mut self, name: &str, perm: u32, data: &[u8]) -> Result<()> {
        self.entry(name, 0o100_000 | (perm & 0o7777), (0, 0), data)
    }

    /// A symbolic link to `target`.
    pub fn symlink(&mut self, name: &str, target: &str) -> Result<()> {
        self.entry(name, 0o120_777, (0, 0), target.as_bytes())
    }

    /// A character device node.
    pub fn char_dev(&mut self, name: &str, perm: u32, major: u32, minor: u32) -> Result<()> {
        self.entry(name, 0o020_000 | (perm & 0o7777), (major, minor), &[])
    }

    /// Writes the trailer and returns the writer.
    pub fn finish(mut self) -> Result<W> {
        self.entry("TRAILER!!!", 0, (0, 0), &[])?;
        self.out.flush().context("writing the cpio archive")?;
        Ok(self.out)
    }
}

/// Writes the test initramfs to `out`: busybox-static as `/bin/busybox` and an `/init` that
/// prints [`BOOT_MARKER`] (plus `extra` shell lines run before it) and then `poweroff -f`.
pub fn write_marker_initramfs(out: &Path, extra: &str) -> Result<()> {
    let busybox = std::fs::read(tools::BUSYBOX)
        .with_context(|| format!("reading {}: {}", tools::BUSYBOX, tools::hint("busybox")))?;
    let init = format!(
        "#!/bin/busybox sh\n\
         /bin/busybox mount -t proc proc /proc\n\
         /bin/busybox mount -t sysfs sysfs /sys\n\
         {extra}\n\
         echo \"{BOOT_MARKER}\"\n\
         /bin/busybox poweroff -f\n"
    );
    // Unique per process and call: several labs may write the same fixture at once.
    static SEQ: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let seq = SEQ.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let tmp = out.with_extension(format!("tmp.{}.{seq}", std::process::id()));
    let file =
        std::fs::File::create(&tmp).with_context(|| format!("creating {}", tmp.display()))?;
    let mut cpio = Cpio::new(std::io::BufWriter::new(file));
    for d in ["bin", "dev", "proc", "sys", "tmp"] {
        cpio.dir(d)?;
    }
    cpio.char_dev("dev/console", 0o600, 5, 1)?;
    cpio.char_dev("dev/null", 0o666, 1, 3)?;
    cpio.file("bin/busybox", 0o755, &busybox)?;
    cpio.symlink("bin/sh", "busybox")?;
    cpio.file("init", 0o755, init.as_bytes())?;
    let w = cpio.finish()?;
    let file = w
        .into_inner()
        .map_err(|e| e.into_error())
        .context("writing the initramfs")?;
    file.sync_all().context("syncing the initramfs")?;
    drop(file);
    std::fs::rename(&tmp, out)
        .with_context(|| format!("renaming {} to {}", tmp.display(), out.display()))?;
    Ok(())
}

/// Debian's kernel with the test initramfs (written into `dir`) and [`TEST_CMDLINE`].
pub fn marker_boot_files(dir: &Path) -> Result<BootFiles> {
    let kernel = debian_kernel()?;
    let initrd = dir.join("lab-initrd.cpio");
    write_marker_initramfs(&initrd, "")?;
    Ok(BootFiles {
        kernel,
        initrd,
        cmdline: TEST_CMDLINE.into(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cpio_is_read_back_by_busybox_cpio() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("a.cpio");
        let mut c = Cpio::new(std::fs::File::create(&path).unwrap());
        c.dir("d").unwrap();
        c.file("d/f", 0o644, b"hello").unwrap();
        c.symlink("l", "d/f").unwrap();
        c.finish().unwrap();
        let out = Command::new(tools::BUSYBOX)
            .args(["cpio", "-t"])
            .stdin(std::fs::File::open(&path).unwrap())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8_lossy(&out.stdout)
                .lines()
                .collect::<Vec<_>>(),
            ["d", "d/f", "l"]
        );
        let x = dir.path().join("x");
        std::fs::create_dir(&x).unwrap();
        let st = Command::new(tools::BUSYBOX)
            .args(["cpio", "-id"])
            .current_dir(&x)
            .stdin(std::fs::File::open(&path).unwrap())
            .status()
            .unwrap();
        assert!(st.success());
        assert_eq!(std::fs::read(x.join("d/f")).unwrap(), b"hello");
        assert_eq!(std::fs::read_link(x.join("l")).unwrap(), Path::new("d/f"));
    }

    use std::process::Command;
}
