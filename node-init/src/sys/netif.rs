//! IPv4 interface configuration with the classic ioctls (netdevice(7)): address, netmask,
//! flags, and a default route (SIOCADDRT).

use std::io;
use std::net::Ipv4Addr;
use std::os::fd::{AsRawFd, FromRawFd, OwnedFd};

use super::check;

/// `struct ifreq` with the sockaddr / flags union as raw bytes.
#[repr(C)]
struct IfReq {
    name: [u8; libc::IFNAMSIZ],
    ifru: [u8; 24],
}

fn ifreq(name: &str) -> io::Result<IfReq> {
    let b = name.as_bytes();
    if b.is_empty() || b.len() >= libc::IFNAMSIZ {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "bad interface name",
        ));
    }
    let mut r = IfReq {
        name: [0; libc::IFNAMSIZ],
        ifru: [0; 24],
    };
    r.name[..b.len()].copy_from_slice(b);
    Ok(r)
}

fn sockaddr_in_bytes(ip: Ipv4Addr) -> [u8; 16] {
    let mut s = [0u8; 16];
    s[0..2].copy_from_slice(&(libc::AF_INET as u16).to_ne_bytes());
    s[4..8].copy_from_slice(&ip.octets());
    s
}

fn socket() -> io::Result<OwnedFd> {
    // SAFETY: plain socket(2) call; the returned fd is owned below.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is a fresh, valid descriptor nobody else owns.
    Ok(unsafe { OwnedFd::from_raw_fd(fd) })
}

fn ioctl_ifreq(sock: &OwnedFd, cmd: libc::c_ulong, req: &mut IfReq) -> io::Result<()> {
    // SAFETY: req is a valid `struct ifreq` (40 bytes) living across the call.
    check(unsafe { libc::ioctl(sock.as_raw_fd(), cmd, req as *mut IfReq) })?;
    Ok(())
}

/// Sets `name`'s address and netmask and brings it up.
pub fn configure(name: &str, ip: Ipv4Addr, netmask: Ipv4Addr) -> io::Result<()> {
    let sock = socket()?;
    let mut r = ifreq(name)?;
    r.ifru[..16].copy_from_slice(&sockaddr_in_bytes(ip));
    ioctl_ifreq(&sock, libc::SIOCSIFADDR, &mut r)?;
    let mut r = ifreq(name)?;
    r.ifru[..16].copy_from_slice(&sockaddr_in_bytes(netmask));
    ioctl_ifreq(&sock, libc::SIOCSIFNETMASK, &mut r)?;
    set_up(name)
}

/// Takes `name` down (clears IFF_UP): no more receive work for the kernel (before a reboot).
pub fn set_down(name: &str) -> io::Result<()> {
    let sock = socket()?;
    let mut r = ifreq(name)?;
    ioctl_ifreq(&sock, libc::SIOCGIFFLAGS, &mut r)?;
    let flags = i16::from_ne_bytes([r.ifru[0], r.ifru[1]]) & !(libc::IFF_UP as i16);
    r.ifru[0..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl_ifreq(&sock, libc::SIOCSIFFLAGS, &mut r)
}

/// Brings `name` up (IFF_UP).
pub fn set_up(name: &str) -> io::Result<()> {
    let sock = socket()?;
    let mut r = ifreq(name)?;
    ioctl_ifreq(&sock, libc::SIOCGIFFLAGS, &mut r)?;
    let flags = i16::from_ne_bytes([r.ifru[0], r.ifru[1]]) | (libc::IFF_UP as i16);
    r.ifru[0..2].copy_from_slice(&flags.to_ne_bytes());
    ioctl_ifreq(&sock, libc::SIOCSIFFLAGS, &mut r)
}

/// Adds a default route via `gw`.
pub fn add_default_route(gw: Ipv4Addr) -> io::Result<()> {
    let sock = socket()?;
    // SAFETY: rtentry is plain old data; all-zero is a valid initial value.
    let mut rt: libc::rtentry = unsafe { std::mem::zeroed() };
    let to_sockaddr = |ip: Ipv4Addr| {
        let b = sockaddr_in_bytes(ip);
        // SAFETY: sockaddr is 16 bytes of plain data, exactly the length of b.
        unsafe { std::mem::transmute::<[u8; 16], libc::sockaddr>(b) }
    };
    rt.rt_dst = to_sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_genmask = to_sockaddr(Ipv4Addr::UNSPECIFIED);
    rt.rt_gateway = to_sockaddr(gw);
    rt.rt_flags = (libc::RTF_UP | libc::RTF_GATEWAY) as libc::c_ushort;
    // SAFETY: rt is a valid `struct rtentry` living across the call; rt_dev is null.
    let r = check(unsafe { libc::ioctl(sock.as_raw_fd(), libc::SIOCADDRT, &rt as *const _) });
    match r {
        Ok(_) => Ok(()),
        Err(e) if e.raw_os_error() == Some(libc::EEXIST) => Ok(()),
        Err(e) => Err(e),
    }
}

/// A UDP socket on port 68 bound to `iface`, broadcast allowed: a DHCP client's socket on an
/// interface that has no address yet.
pub fn dhcp_socket(iface: &str) -> io::Result<std::net::UdpSocket> {
    // SAFETY: plain socket(2) call; the fd is owned right below.
    let fd =
        check(unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) })?;
    // SAFETY: fd is fresh and owned by nobody else.
    let sock = unsafe { OwnedFd::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    let setopt = |opt: libc::c_int, val: *const libc::c_void, len: usize| {
        // SAFETY: val points to `len` readable bytes living across the call.
        check(unsafe {
            libc::setsockopt(
                sock.as_raw_fd(),
                libc::SOL_SOCKET,
                opt,
                val,
                len as libc::socklen_t,
            )
        })
    };
    setopt(
        libc::SO_BROADCAST,
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>(),
    )?;
    setopt(
        libc::SO_REUSEADDR,
        (&one as *const libc::c_int).cast(),
        std::mem::size_of::<libc::c_int>(),
    )?;
    setopt(libc::SO_BINDTODEVICE, iface.as_ptr().cast(), iface.len())?;
    let mut sa: libc::sockaddr_in = sockaddr_in_zero();
    sa.sin_family = libc::AF_INET as libc::sa_family_t;
    sa.sin_port = 68u16.to_be();
    // SAFETY: sa is a valid sockaddr_in of the length passed.
    check(unsafe {
        libc::bind(
            sock.as_raw_fd(),
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    })?;
    Ok(std::net::UdpSocket::from(sock))
}

fn sockaddr_in_zero() -> libc::sockaddr_in {
    // SAFETY: sockaddr_in is plain old data; all-zero is valid.
    unsafe { std::mem::zeroed() }
}
