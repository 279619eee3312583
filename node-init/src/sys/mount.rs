//! mount(2), including the move mounts switch_root needs.

use std::io;
use std::path::Path;

use super::{check, cpath, cstr};

/// Mount flags node-init uses.
pub use libc::{MS_MOVE, MS_NODEV, MS_NOEXEC, MS_NOSUID, MS_RDONLY};

/// `mount(source, target, fstype, flags, data)`.
pub fn mount(
    source: &str,
    target: &Path,
    fstype: &str,
    flags: libc::c_ulong,
    data: Option<&str>,
) -> io::Result<()> {
    let src = cstr(source)?;
    let tgt = cpath(target)?;
    let fs = cstr(fstype)?;
    let data = data.map(cstr).transpose()?;
    let data_ptr = data
        .as_ref()
        .map_or(std::ptr::null(), |d| d.as_ptr().cast());
    // SAFETY: every pointer is a valid NUL-terminated string (or null for data) that outlives
    // the call; mount(2) only reads them.
    check(unsafe { libc::mount(src.as_ptr(), tgt.as_ptr(), fs.as_ptr(), flags, data_ptr) })?;
    Ok(())
}

/// Moves the mount at `from` to `to` (`mount --move`).
pub fn move_mount(from: &Path, to: &Path) -> io::Result<()> {
    let src = cpath(from)?;
    let tgt = cpath(to)?;
    // SAFETY: valid NUL-terminated paths; fstype and data may be null with MS_MOVE.
    check(unsafe {
        libc::mount(
            src.as_ptr(),
            tgt.as_ptr(),
            std::ptr::null(),
            MS_MOVE,
            std::ptr::null(),
        )
    })?;
    Ok(())
}

/// Unmounts `target`.
pub fn umount(target: &Path) -> io::Result<()> {
    let tgt = cpath(target)?;
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::umount2(tgt.as_ptr(), 0) })?;
    Ok(())
}

/// True if `path` is a mount point of some file system (its device differs from its parent's).
pub fn is_mount_point(path: &Path) -> bool {
    use std::os::unix::fs::MetadataExt;
    let (Ok(me), Ok(parent)) = (std::fs::metadata(path), std::fs::metadata(path.join(".."))) else {
        return false;
    };
    me.dev() != parent.dev() || me.ino() == parent.ino()
}
