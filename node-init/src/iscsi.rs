//! Diskless boot over iSCSI (RFC 7143): the node's chain is not fetched into the cache but
//! attached from the server's iSCSI target, where the node's writes land in its own layer.
//!
//! Selected by the kernel command line, which the server's boot script writes for a diskless
//! node: `strata.iscsi=IP[:PORT]` (the portal; port 3260 by default) and, when the target
//! asks for CHAP, `strata.iscsi_secret=SECRET`. The names follow from the node's MAC, as on
//! the server (`server/src/iscsi/nodes.rs`): target `iqn.2026-11.io.strata:node.<mac hex>`,
//! initiator and CHAP user `iqn.2026-11.io.strata:init.<mac hex>`.
//!
//! The login is open-iscsi's `iscsistart` (in the initramfs with its libraries;
//! scripts/build-initramfs.sh): it negotiates the session in user space and hands the TCP
//! connection to the kernel's `iscsi_tcp`, then exits; the kernel keeps the session and
//! presents the LUN as a SCSI disk, which node-init mounts as the root. Chosen over an
//! initiator of our own in node-init because the kernel has to own the connection for the
//! disk to outlive node-init's exec of the image's init, and handing a logged-in socket to
//! `iscsi_tcp` is the iSCSI netlink protocol (`ISCSI_UEVENT_*`), which `iscsistart` already
//! implements and is tested against every target; a second implementation would only add risk.
//! Limit: no iscsid runs after switch_root, so a dropped connection is not re-established.

use std::net::{Ipv4Addr, SocketAddrV4};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::attach::AttachError;

/// open-iscsi's boot-time login tool in the initramfs.
pub const ISCSISTART: &str = "/sbin/iscsistart";
/// The naming authority of Strata's iSCSI names (the server's `IQN_PREFIX`).
pub const IQN_PREFIX: &str = "iqn.2026-11.io.strata";
/// The iSCSI port (RFC 7143 §13.1 well-known port).
pub const DEFAULT_PORT: u16 = 3260;

/// How to reach the node's target.
#[derive(Clone, PartialEq, Eq)]
pub struct IscsiBoot {
    /// The portal.
    pub portal: SocketAddrV4,
    /// The node's CHAP secret, if the target asks for CHAP.
    pub secret: Option<String>,
}

impl std::fmt::Debug for IscsiBoot {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiBoot")
            .field("portal", &self.portal)
            .field("secret", &self.secret.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Parses a `strata.iscsi` value, `IP` or `IP:PORT`.
pub fn parse_portal(v: &str) -> Option<SocketAddrV4> {
    if let Ok(sa) = v.parse::<SocketAddrV4>() {
        return (sa.port() != 0).then_some(sa);
    }
    v.parse::<Ipv4Addr>()
        .ok()
        .map(|ip| SocketAddrV4::new(ip, DEFAULT_PORT))
}

/// Checks a `strata.iscsi_secret` value: 12 to 255 printable ASCII characters (RFC 7143
/// §12.1.3 asks for at least 12 bytes), so it passes through iscsistart's argv unchanged.
pub fn valid_secret(v: &str) -> bool {
    (12..=255).contains(&v.len()) && v.bytes().all(|b| b.is_ascii_graphic())
}

/// The node's target and initiator names from its MAC (`aa:bb:cc:dd:ee:ff`).
pub fn names(mac: &str) -> (String, String) {
    let hex: String = mac
        .chars()
        .filter(char::is_ascii_hexdigit)
        .map(|c| c.to_ascii_lowercase())
        .collect();
    (
        format!("{IQN_PREFIX}:node.{hex}"),
        format!("{IQN_PREFIX}:init.{hex}"),
    )
}

/// An iSCSI attach failure.
#[derive(Debug, thiserror::Error)]
pub enum IscsiError {
    /// iscsistart could not be run.
    #[error("running {ISCSISTART}")]
    Spawn(#[source] std::io::Error),
    /// iscsistart failed (login refused, target unreachable).
    #[error("iscsistart login to {target} at {portal} failed ({status}): {output}")]
    Login {
        /// The target.
        target: String,
        /// The portal.
        portal: SocketAddrV4,
        /// Its exit status.
        status: String,
        /// Its output (the last lines).
        output: String,
    },
    /// The session is up but no disk appeared.
    #[error("no SCSI disk of an iSCSI session appeared within {0:?}")]
    NoDisk(Duration),
}

impl From<IscsiError> for AttachError {
    fn from(e: IscsiError) -> AttachError {
        let what = e.to_string();
        AttachError::Sys {
            what: format!("iSCSI attach: {what}"),
            source: std::io::Error::other(e),
        }
    }
}

/// The `iscsistart` arguments for `boot` and the node `mac` (they carry the secret: never
/// log them).
pub fn iscsistart_args(boot: &IscsiBoot, mac: &str) -> Vec<String> {
    let (target, initiator) = names(mac);
    let mut args = vec![
        "-i".to_owned(),
        initiator.clone(),
        "-t".to_owned(),
        target,
        "-g".to_owned(),
        "1".to_owned(),
        "-a".to_owned(),
        boot.portal.ip().to_string(),
        "-p".to_owned(),
        boot.portal.port().to_string(),
    ];
    if let Some(secret) = &boot.secret {
        args.extend(["-u".to_owned(), initiator, "-w".to_owned(), secret.clone()]);
    }
    args
}

/// The disk (`/dev/sdX`) of an iSCSI session, if one is there: a `/sys/block` entry whose
/// device path runs through a `session<N>` directory.
pub fn find_session_disk(sys_block: &Path) -> Option<PathBuf> {
    let mut found: Vec<String> = std::fs::read_dir(sys_block)
        .ok()?
        .filter_map(Result::ok)
        .filter_map(|e| {
            let name = e.file_name().to_str()?.to_owned();
            let link = std::fs::read_link(e.path()).ok()?;
            let via_session = link.iter().any(|c| {
                c.to_str()
                    .and_then(|s| s.strip_prefix("session"))
                    .is_some_and(|n| !n.is_empty() && n.bytes().all(|b| b.is_ascii_digit()))
            });
            via_session.then_some(name)
        })
        .collect();
    found.sort();
    found.first().map(|n| Path::new("/dev").join(n))
}

/// Logs in to the node's target and returns the LUN's block device.
pub fn attach(boot: &IscsiBoot, mac: &str, wait: Duration) -> Result<PathBuf, IscsiError> {
    let (target, _) = names(mac);
    crate::info!("iSCSI login to {target} at {}", boot.portal);
    let out = std::process::Command::new(ISCSISTART)
        .args(iscsistart_args(boot, mac))
        .output()
        .map_err(IscsiError::Spawn)?;
    if !out.status.success() {
        let text = format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
        let tail: Vec<&str> = text.lines().rev().take(6).collect();
        return Err(IscsiError::Login {
            target,
            portal: boot.portal,
            status: out.status.to_string(),
            output: tail.into_iter().rev().collect::<Vec<_>>().join(" | "),
        });
    }
    let deadline = Instant::now() + wait;
    loop {
        if let Some(dev) = find_session_disk(Path::new("/sys/block")) {
            if dev.exists() {
                return Ok(dev);
            }
        }
        if Instant::now() >= deadline {
            return Err(IscsiError::NoDisk(wait));
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn names_match_the_server() {
        assert_eq!(
            names("52:54:00:AB:cd:0f"),
            (
                "iqn.2026-11.io.strata:node.525400abcd0f".to_owned(),
                "iqn.2026-11.io.strata:init.525400abcd0f".to_owned()
            )
        );
    }

    #[test]
    fn portals_and_secrets() {
        assert_eq!(
            parse_portal("10.0.0.1"),
            Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 3260))
        );
        assert_eq!(
            parse_portal("10.0.0.1:3261"),
            Some(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 3261))
        );
        assert_eq!(parse_portal("10.0.0.1:0"), None);
        assert_eq!(parse_portal("host:3260"), None);
        assert!(valid_secret("0123456789abcdef"));
        assert!(!valid_secret("short"));
        assert!(!valid_secret("has a space in it"));
    }

    #[test]
    fn iscsistart_gets_names_and_chap() {
        let boot = IscsiBoot {
            portal: SocketAddrV4::new(Ipv4Addr::new(10, 42, 0, 1), 3260),
            secret: Some("0123456789abcdef".into()),
        };
        let a = iscsistart_args(&boot, "52:54:00:00:00:01");
        assert_eq!(
            a.join(" "),
            "-i iqn.2026-11.io.strata:init.525400000001 -t iqn.2026-11.io.strata:node.525400000001 \
             -g 1 -a 10.42.0.1 -p 3260 -u iqn.2026-11.io.strata:init.525400000001 -w 0123456789abcdef"
        );
        assert!(!format!("{boot:?}").contains("0123456789abcdef"));
    }

    proptest::proptest! {
        /// Every IPv4 portal prints and parses back; the default port is 3260.
        #[test]
        fn portals_round_trip(ip in proptest::prelude::any::<[u8; 4]>(), port in 1u16..) {
            let sa = SocketAddrV4::new(Ipv4Addr::from(ip), port);
            proptest::prop_assert_eq!(parse_portal(&sa.to_string()), Some(sa));
            proptest::prop_assert_eq!(
                parse_portal(&Ipv4Addr::from(ip).to_string()),
                Some(SocketAddrV4::new(Ipv4Addr::from(ip), DEFAULT_PORT))
            );
        }

        /// Arbitrary text never panics the parsers, and an accepted secret is one token
        /// of the kernel command line.
        #[test]
        fn arbitrary_values_never_panic(v in ".{0,300}") {
            let _ = parse_portal(&v);
            if valid_secret(&v) {
                proptest::prop_assert_eq!(v.split_ascii_whitespace().count(), 1);
            }
        }
    }

    #[test]
    fn session_disks_are_found_by_their_sysfs_path() {
        let dir = tempfile::tempdir().unwrap();
        let sys = dir.path();
        std::os::unix::fs::symlink(
            "../devices/pci0000:00/0000:00:04.0/virtio1/block/vda",
            sys.join("vda"),
        )
        .unwrap();
        assert_eq!(find_session_disk(sys), None);
        std::os::unix::fs::symlink(
            "../devices/platform/host0/session1/target0:0:0/0:0:0:0/block/sdb",
            sys.join("sdb"),
        )
        .unwrap();
        assert_eq!(find_session_disk(sys), Some(PathBuf::from("/dev/sdb")));
    }
}
