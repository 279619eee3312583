//! The only place node-init talks to the kernel directly: mounts, reboot, module loading,
//! loop and device-mapper ioctls, network interface ioctls. Each `unsafe` block says why it is
//! sound. Everything here is a thin, typed wrapper returning `io::Result`.

pub mod dm;
pub mod loopdev;
pub mod module;
pub mod mount;
pub mod netif;
pub mod process;

use std::ffi::CString;
use std::io;
use std::path::Path;

/// A path as a C string (paths with an interior NUL are refused).
pub(crate) fn cpath(p: &Path) -> io::Result<CString> {
    use std::os::unix::ffi::OsStrExt;
    CString::new(p.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte"))
}

/// A string as a C string.
pub(crate) fn cstr(s: &str) -> io::Result<CString> {
    CString::new(s).map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "string holds a NUL"))
}

/// Maps a libc `-1` return to the thread's `errno`.
pub(crate) fn check(ret: libc::c_int) -> io::Result<libc::c_int> {
    if ret < 0 {
        Err(io::Error::last_os_error())
    } else {
        Ok(ret)
    }
}

/// Three quarters of the size of the file system holding `path`: the cache's size limit.
pub fn fs_limit(path: &Path) -> Option<u64> {
    let p = cpath(path).ok()?;
    // SAFETY: statvfs is plain data; all-zero is a valid value to be overwritten.
    let mut st: libc::statvfs = unsafe { std::mem::zeroed() };
    // SAFETY: valid path and a valid out pointer living across the call.
    check(unsafe { libc::statvfs(p.as_ptr(), &mut st) }).ok()?;
    let total = st.f_blocks.checked_mul(st.f_frsize)?;
    Some(total / 4 * 3)
}
