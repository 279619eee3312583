//! Loop devices (loop(4)): one per layer file, attached with LOOP_CONFIGURE (Linux 5.8+).

use std::fs::{File, OpenOptions};
use std::io;
use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};

use super::check;

const LOOP_CTL_GET_FREE: libc::c_ulong = 0x4C82;
const LOOP_CONFIGURE: libc::c_ulong = 0x4C0A;
const LO_FLAGS_READ_ONLY: u32 = 1;
const LO_NAME_SIZE: usize = 64;

/// `struct loop_info64` (linux/loop.h).
#[repr(C)]
struct LoopInfo64 {
    lo_device: u64,
    lo_inode: u64,
    lo_rdevice: u64,
    lo_offset: u64,
    lo_sizelimit: u64,
    lo_number: u32,
    lo_encrypt_type: u32,
    lo_encrypt_key_size: u32,
    lo_flags: u32,
    lo_file_name: [u8; LO_NAME_SIZE],
    lo_crypt_name: [u8; LO_NAME_SIZE],
    lo_encrypt_key: [u8; 32],
    lo_init: [u64; 2],
}

/// `struct loop_config` (linux/loop.h).
#[repr(C)]
struct LoopConfig {
    fd: u32,
    block_size: u32,
    info: LoopInfo64,
    reserved: [u64; 8],
}

const _: () = assert!(std::mem::size_of::<LoopInfo64>() == 232);
const _: () = assert!(std::mem::size_of::<LoopConfig>() == 304);

/// An attached loop device. Dropping it closes node-init's handle; the device stays bound to
/// its file (no autoclear) so device-mapper tables built on it keep working after exec.
#[derive(Debug)]
pub struct LoopDevice {
    /// `/dev/loopN`.
    pub path: PathBuf,
    /// Device number (major, minor) for device-mapper tables.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    _dev: File,
}

/// Attaches `file` to a free loop device, read-only unless `writable`.
pub fn attach(file: &Path, writable: bool) -> io::Result<LoopDevice> {
    let backing = OpenOptions::new().read(true).write(writable).open(file)?;
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/loop-control")?;
    // SAFETY: LOOP_CTL_GET_FREE takes no argument and returns a device number or -1.
    let n = check(unsafe { libc::ioctl(ctl.as_raw_fd(), LOOP_CTL_GET_FREE) })?;
    let path = PathBuf::from(format!("/dev/loop{n}"));
    let dev = OpenOptions::new().read(true).write(writable).open(&path)?;
    let mut name = [0u8; LO_NAME_SIZE];
    use std::os::unix::ffi::OsStrExt;
    let src = file.as_os_str().as_bytes();
    let len = src.len().min(LO_NAME_SIZE - 1);
    name[..len].copy_from_slice(&src[..len]);
    let cfg = LoopConfig {
        fd: u32::try_from(backing.as_raw_fd())
            .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "negative fd"))?,
        block_size: 0,
        info: LoopInfo64 {
            lo_device: 0,
            lo_inode: 0,
            lo_rdevice: 0,
            lo_offset: 0,
            lo_sizelimit: 0,
            lo_number: 0,
            lo_encrypt_type: 0,
            lo_encrypt_key_size: 0,
            lo_flags: if writable { 0 } else { LO_FLAGS_READ_ONLY },
            lo_file_name: name,
            lo_crypt_name: [0; LO_NAME_SIZE],
            lo_encrypt_key: [0; 32],
            lo_init: [0; 2],
        },
        reserved: [0; 8],
    };
    // SAFETY: cfg is a fully initialised `struct loop_config` that lives across the call; the
    // kernel only reads it. The backing fd is open; the kernel takes its own reference.
    check(unsafe { libc::ioctl(dev.as_raw_fd(), LOOP_CONFIGURE, &cfg as *const LoopConfig) })?;
    let (major, minor) = rdev_of(&path)?;
    Ok(LoopDevice {
        path,
        major,
        minor,
        _dev: dev,
    })
}

/// The (major, minor) of a device node.
pub fn rdev_of(path: &Path) -> io::Result<(u32, u32)> {
    use std::os::unix::fs::MetadataExt;
    let rdev = std::fs::metadata(path)?.rdev();
    Ok((libc::major(rdev), libc::minor(rdev)))
}
