//! Device-mapper control ioctls (linux/dm-ioctl.h, interface version 4): create a device,
//! load its table, resume it. The buffers are serialised by hand at the header's fixed
//! offsets, so no struct layout or alignment is assumed on our side.

use std::fs::OpenOptions;
use std::io;
use std::os::fd::AsRawFd;
use std::path::PathBuf;

use super::check;

const DM_IOCTL_SIZE: usize = 312;
const DM_NAME_LEN: usize = 128;
const DM_UUID_LEN: usize = 129;
const SPEC_SIZE: usize = 40;
const DM_READONLY_FLAG: u32 = 1 << 0;

const fn dm_iowr(nr: u8) -> libc::c_ulong {
    // _IOWR(0xfd, nr, struct dm_ioctl): dir 3 << 30 | size << 16 | type << 8 | nr.
    (3 << 30) | ((DM_IOCTL_SIZE as libc::c_ulong) << 16) | (0xfd << 8) | nr as libc::c_ulong
}
const DM_DEV_CREATE: libc::c_ulong = dm_iowr(3);
const DM_DEV_REMOVE: libc::c_ulong = dm_iowr(4);
const DM_DEV_SUSPEND: libc::c_ulong = dm_iowr(6);
const DM_TABLE_LOAD: libc::c_ulong = dm_iowr(9);

/// One line of a device-mapper table.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Target {
    /// First sector (512 bytes) of the device this target covers.
    pub start: u64,
    /// Sectors covered.
    pub len: u64,
    /// Target type: `linear`, `zero`, `snapshot`...
    pub kind: &'static str,
    /// Target parameters, e.g. `7:0 2048`.
    pub params: String,
}

/// A created device-mapper device.
#[derive(Debug, Clone)]
pub struct DmDevice {
    /// Its name.
    pub name: String,
    /// Major number.
    pub major: u32,
    /// Minor number.
    pub minor: u32,
    /// A block device node for it (`/dev/mapper/<name>`).
    pub path: PathBuf,
}

fn header(name: &str, data_size: usize, target_count: u32, flags: u32) -> io::Result<Vec<u8>> {
    if name.is_empty() || name.len() >= DM_NAME_LEN || name.contains('/') {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad device-mapper name",
        ));
    }
    let size = u32::try_from(data_size)
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "table too large"))?;
    let mut b = vec![0u8; data_size.max(DM_IOCTL_SIZE)];
    let put = |b: &mut Vec<u8>, off: usize, v: u32| {
        b[off..off + 4].copy_from_slice(&v.to_ne_bytes());
    };
    put(&mut b, 0, 4); // version 4.0.0
    put(&mut b, 12, size);
    put(&mut b, 16, DM_IOCTL_SIZE as u32);
    put(&mut b, 20, target_count);
    put(&mut b, 28, flags);
    b[48..48 + name.len()].copy_from_slice(name.as_bytes());
    Ok(b)
}

fn ioctl(cmd: libc::c_ulong, buf: &mut [u8]) -> io::Result<()> {
    let ctl = OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/mapper/control")?;
    // SAFETY: buf is at least DM_IOCTL_SIZE bytes and its data_size field equals its length,
    // so the kernel reads and writes only inside it.
    check(unsafe { libc::ioctl(ctl.as_raw_fd(), cmd, buf.as_mut_ptr()) })?;
    Ok(())
}

/// Creates an empty device named `name` and makes `/dev/mapper/<name>`.
pub fn create(name: &str) -> io::Result<DmDevice> {
    let mut b = header(name, DM_IOCTL_SIZE, 0, 0)?;
    let uuid = format!("STRATA-{name}");
    let n = uuid.len().min(DM_UUID_LEN - 1);
    b[176..176 + n].copy_from_slice(&uuid.as_bytes()[..n]);
    ioctl(DM_DEV_CREATE, &mut b)?;
    let mut raw = [0u8; 8];
    raw.copy_from_slice(&b[40..48]);
    let dev = u64::from_ne_bytes(raw);
    // huge_encode_dev: minor low 8 bits | major << 8 | (minor >> 8) << 20.
    let major = ((dev & 0xfff00) >> 8) as u32;
    let minor = ((dev & 0xff) | ((dev >> 12) & 0xfff00)) as u32;
    let path = PathBuf::from(format!("/dev/mapper/{name}"));
    mknod_block(&path, major, minor)?;
    Ok(DmDevice {
        name: name.to_owned(),
        major,
        minor,
        path,
    })
}

/// Loads `targets` as the inactive table of `name`.
pub fn load_table(name: &str, targets: &[Target], read_only: bool) -> io::Result<()> {
    let mut specs = Vec::new();
    for t in targets {
        let kind = t.kind.as_bytes();
        if kind.len() >= 16 || t.params.contains('\0') {
            return Err(io::Error::new(io::ErrorKind::InvalidInput, "bad target"));
        }
        let params_len = t.params.len() + 1;
        let spec_len = (SPEC_SIZE + params_len).next_multiple_of(8);
        let mut s = vec![0u8; spec_len];
        s[0..8].copy_from_slice(&t.start.to_ne_bytes());
        s[8..16].copy_from_slice(&t.len.to_ne_bytes());
        s[20..24].copy_from_slice(&(spec_len as u32).to_ne_bytes());
        s[24..24 + kind.len()].copy_from_slice(kind);
        s[SPEC_SIZE..SPEC_SIZE + t.params.len()].copy_from_slice(t.params.as_bytes());
        specs.extend_from_slice(&s);
    }
    let count = u32::try_from(targets.len())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, "too many targets"))?;
    let flags = if read_only { DM_READONLY_FLAG } else { 0 };
    let mut b = header(name, DM_IOCTL_SIZE + specs.len(), count, flags)?;
    b[DM_IOCTL_SIZE..].copy_from_slice(&specs);
    ioctl(DM_TABLE_LOAD, &mut b)
}

/// Activates the loaded table (`DM_DEV_SUSPEND` without the suspend flag = resume).
pub fn resume(name: &str) -> io::Result<()> {
    let mut b = header(name, DM_IOCTL_SIZE, 0, 0)?;
    ioctl(DM_DEV_SUSPEND, &mut b)
}

/// Removes device `name`.
pub fn remove(name: &str) -> io::Result<()> {
    let mut b = header(name, DM_IOCTL_SIZE, 0, 0)?;
    ioctl(DM_DEV_REMOVE, &mut b)?;
    let _ = std::fs::remove_file(format!("/dev/mapper/{name}"));
    Ok(())
}

/// Makes a block device node (replacing a stale one).
pub fn mknod_block(path: &std::path::Path, major: u32, minor: u32) -> io::Result<()> {
    if let Some(parent) = path.parent() {
        std::fs::create_dir_all(parent)?;
    }
    let _ = std::fs::remove_file(path);
    let p = super::cpath(path)?;
    // SAFETY: valid NUL-terminated path; mknod only reads it.
    check(unsafe {
        libc::mknod(
            p.as_ptr(),
            libc::S_IFBLK | 0o600,
            libc::makedev(major, minor),
        )
    })?;
    Ok(())
}
