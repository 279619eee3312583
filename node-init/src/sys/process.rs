//! Process-level calls of PID 1: reaping, chroot, exec, reboot, sync.

use std::ffi::CString;
use std::io;
use std::path::Path;

use super::{check, cpath};

/// Reaps every exited child without blocking; returns how many.
pub fn reap_zombies() -> usize {
    let mut n = 0;
    loop {
        let mut status = 0;
        // SAFETY: waitpid writes one int through the valid pointer; WNOHANG never blocks.
        let pid = unsafe { libc::waitpid(-1, &mut status, libc::WNOHANG) };
        if pid <= 0 {
            return n;
        }
        n += 1;
    }
}

/// chroot(2).
pub fn chroot(path: &Path) -> io::Result<()> {
    let p = cpath(path)?;
    // SAFETY: valid NUL-terminated path.
    check(unsafe { libc::chroot(p.as_ptr()) })?;
    Ok(())
}

/// Replaces this process with `path` (argv[0] = path). Returns only on failure.
pub fn exec(path: &Path, args: &[&str]) -> io::Error {
    let Ok(p) = cpath(path) else {
        return io::Error::new(io::ErrorKind::InvalidInput, "path holds a NUL byte");
    };
    let mut owned: Vec<CString> = vec![p.clone()];
    for a in args {
        match CString::new(*a) {
            Ok(c) => owned.push(c),
            Err(_) => return io::Error::new(io::ErrorKind::InvalidInput, "arg holds a NUL"),
        }
    }
    let mut argv: Vec<*const libc::c_char> = owned.iter().map(|c| c.as_ptr()).collect();
    argv.push(std::ptr::null());
    // SAFETY: argv is a NULL-terminated array of valid C strings kept alive by `owned`;
    // execv only returns on error. The environment is inherited (environ is valid).
    unsafe { libc::execv(p.as_ptr(), argv.as_ptr()) };
    io::Error::last_os_error()
}

/// Flushes file system buffers.
pub fn sync() {
    // SAFETY: sync(2) takes no arguments and cannot fail.
    unsafe { libc::sync() };
}

/// Syncs and reboots the machine. Returns only if the kernel refused.
pub fn reboot() -> io::Error {
    sync();
    // SAFETY: reboot(2) with a valid command; only PID 1 / CAP_SYS_BOOT succeeds.
    unsafe { libc::reboot(libc::RB_AUTOBOOT) };
    io::Error::last_os_error()
}

/// This process's id.
pub fn getpid() -> u32 {
    std::process::id()
}
