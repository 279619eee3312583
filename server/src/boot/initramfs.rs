//! The initramfs nodes get: node-init's archive from `scripts/build-initramfs.sh`, followed by
//! a second newc cpio archive holding this server's public key at `/etc/strata/server.pub`.
//! Linux unpacks concatenated archives in order, so node-init trusts exactly this server
//! without rebuilding the initramfs per key.

use std::io::Write;
use std::path::{Path, PathBuf};

/// Errors preparing the served initramfs.
#[derive(Debug, thiserror::Error)]
pub enum InitramfsError {
    /// Reading the base initramfs or writing the result failed.
    #[error("{path}")]
    Io {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// One newc (SVR4, no CRC) archive of `entries` plus its trailer.
/// `entries` are (path without leading slash, mode including the file type, contents).
pub fn newc_archive(entries: &[(&str, u32, &[u8])]) -> Vec<u8> {
    let mut out = Vec::new();
    let mut ino = 1u32;
    let mut push = |out: &mut Vec<u8>, name: &str, mode: u32, data: &[u8]| {
        let namesize = name.len() + 1;
        let nlink = if mode & 0o170000 == 0o040000 { 2 } else { 1 };
        let header = format!(
            "070701{ino:08x}{mode:08x}{:08x}{:08x}{nlink:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{:08x}{namesize:08x}{:08x}",
            0, 0, 0, data.len(), 0, 0, 0, 0, 0
        );
        out.extend_from_slice(header.as_bytes());
        out.extend_from_slice(name.as_bytes());
        out.push(0);
        pad4(out);
        out.extend_from_slice(data);
        pad4(out);
        ino += 1;
    };
    for (name, mode, data) in entries {
        push(&mut out, name, *mode, data);
    }
    push(&mut out, "TRAILER!!!", 0, &[]);
    out
}

fn pad4(out: &mut Vec<u8>) {
    while out.len() % 4 != 0 {
        out.push(0);
    }
}

/// The archive carrying the server key node-init trusts.
pub fn key_archive(public_key_hex: &str) -> Vec<u8> {
    let key = format!("{public_key_hex}\n");
    newc_archive(&[
        ("etc", 0o040755, b""),
        ("etc/strata", 0o040755, b""),
        ("etc/strata/server.pub", 0o100644, key.as_bytes()),
    ])
}

/// Writes `<out_dir>/initramfs-<blake3>.img`: `base`, zero padding to a 512-byte boundary,
/// then the key archive. Returns its path. Written to a temp file and renamed into place, so
/// a half-written initramfs is never served.
pub fn with_public_key(
    base: &Path,
    public_key_hex: &str,
    out_dir: &Path,
) -> Result<PathBuf, InitramfsError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| InitramfsError::Io { path, source }
    };
    let mut bytes = std::fs::read(base).map_err(io(base))?;
    while bytes.len() % 512 != 0 {
        bytes.push(0);
    }
    bytes.extend_from_slice(&key_archive(public_key_hex));
    let name = format!("initramfs-{}.img", &blake3::hash(&bytes).to_hex()[..16]);
    let dest = out_dir.join(name);
    if dest.exists() {
        return Ok(dest);
    }
    std::fs::create_dir_all(out_dir).map_err(io(out_dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(out_dir).map_err(io(out_dir))?;
    tmp.write_all(&bytes).map_err(io(&dest))?;
    tmp.as_file().sync_all().map_err(io(&dest))?;
    tmp.persist(&dest).map_err(|e| InitramfsError::Io {
        path: dest.clone(),
        source: e.error,
    })?;
    Ok(dest)
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `cpio -t` (GNU cpio, a real peer) lists exactly the entries we wrote.
    #[test]
    fn gnu_cpio_reads_the_key_archive() {
        let archive = key_archive(&"ab".repeat(32));
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("k.cpio");
        std::fs::write(&path, &archive).unwrap();
        let out = std::process::Command::new("cpio")
            .args(["-i", "--to-stdout", "etc/strata/server.pub"])
            .stdin(std::fs::File::open(&path).unwrap())
            .output()
            .expect("cpio missing: run scripts/setup.sh (Debian package cpio)");
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        assert_eq!(
            String::from_utf8(out.stdout).unwrap(),
            format!("{}\n", "ab".repeat(32))
        );
    }

    #[test]
    fn appended_after_padding() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, b"0707").unwrap();
        let out = with_public_key(&base, &"cd".repeat(32), dir.path()).unwrap();
        let bytes = std::fs::read(out).unwrap();
        assert_eq!(&bytes[..4], b"0707");
        assert!(bytes[4..512].iter().all(|b| *b == 0));
        assert_eq!(&bytes[512..518], b"070701");
    }
}
