//! Kernel module loading with finit_module(2).

use std::fs::File;
use std::io;
use std::os::fd::AsRawFd;
use std::path::Path;

/// Outcome of loading one module.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Loaded {
    /// Inserted now.
    Inserted,
    /// Already loaded (or built in).
    AlreadyPresent,
}

/// Loads the module file at `path` with no parameters.
pub fn load_module(path: &Path) -> io::Result<Loaded> {
    let f = File::open(path)?;
    let params = c"";
    // SAFETY: the fd is open for the duration of the call; params is a valid empty C string.
    let r = unsafe {
        libc::syscall(
            libc::SYS_finit_module,
            f.as_raw_fd(),
            params.as_ptr(),
            0 as libc::c_int,
        )
    };
    if r == 0 {
        return Ok(Loaded::Inserted);
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::EEXIST) {
        return Ok(Loaded::AlreadyPresent);
    }
    Err(e)
}
