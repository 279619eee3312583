//! Handing the machine to the image: move the pseudo file systems into the new root, free the
//! initramfs, make the new root `/`, and exec its init (what busybox's and util-linux's
//! switch_root do).

use std::fs;
use std::io;
use std::os::unix::fs::MetadataExt;
use std::path::Path;

use crate::sys::{mount, process};

/// Mounts moved into the new root.
pub const MOVED: [&str; 4] = ["/dev", "/proc", "/sys", "/run"];

/// Switches to `new_root` and execs `init` there. Returns only on failure; failures before
/// anything was moved leave the initramfs intact.
pub fn switch_root(new_root: &Path, init: &str) -> io::Error {
    let rel = init.trim_start_matches('/');
    let init_path = new_root.join(rel);
    // `init` may be a symlink (busybox): resolve it inside the new root by hand.
    if fs::symlink_metadata(&init_path).is_err() {
        return io::Error::new(
            io::ErrorKind::NotFound,
            format!("{init} not found in the image"),
        );
    }
    let root_dev = match fs::metadata("/") {
        Ok(m) => m.dev(),
        Err(e) => return e,
    };
    for m in MOVED {
        let target = new_root.join(m.trim_start_matches('/'));
        if !target.is_dir() {
            if let Err(e) = fs::create_dir_all(&target) {
                return e;
            }
        }
        if let Err(e) = mount::move_mount(Path::new(m), &target) {
            return e;
        }
    }
    // Free the initramfs (files on the root device only; the new root is another device).
    remove_same_dev(Path::new("/"), root_dev, new_root);
    if let Err(e) = std::env::set_current_dir(new_root) {
        return e;
    }
    if let Err(e) = mount::move_mount(new_root, Path::new("/")) {
        return e;
    }
    if let Err(e) = process::chroot(Path::new(".")) {
        return e;
    }
    if let Err(e) = std::env::set_current_dir("/") {
        return e;
    }
    process::exec(Path::new(init), &[])
}

fn remove_same_dev(dir: &Path, dev: u64, skip: &Path) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    for ent in entries.flatten() {
        let path = ent.path();
        if path == skip {
            continue;
        }
        let Ok(meta) = fs::symlink_metadata(&path) else {
            continue;
        };
        if meta.dev() != dev {
            continue;
        }
        if meta.is_dir() {
            remove_same_dev(&path, dev, skip);
            let _ = fs::remove_dir(&path);
        } else {
            let _ = fs::remove_file(&path);
        }
    }
}
