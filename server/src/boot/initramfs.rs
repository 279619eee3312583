//! The initramfs nodes get: node-init's archive from `scripts/build-initramfs.sh`, followed by
//! a second newc cpio archive holding this server's public key at `/etc/strata/server.pub`.
//! Linux unpacks concatenated archives in order, so node-init trusts exactly this server
//! without rebuilding the initramfs per key.
//!
//! A node whose image records its own kernel gets a [`Composer`]'s initramfs instead: the same
//! base archive, then the module archive recorded with that kernel (`build::modules`:
//! `/lib/modules/<release>/...` and its `strata-modules.list`), then the key archive. Each is
//! composed once per module archive, written atomically into the data directory, and named by
//! the blake3 of its bytes, so `/boot/initramfs/<blake3>` is content-addressed and cacheable.

use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

use wire::chunk::Digest;

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
    while !out.len().is_multiple_of(4) {
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

fn pad_to(bytes: &mut Vec<u8>, align: usize) {
    while !bytes.len().is_multiple_of(align) {
        bytes.push(0);
    }
}

/// Writes `bytes` to `dest` through a temp file in `dir` renamed into place (never a
/// half-written file under `dest`'s name).
fn write_atomic(dir: &Path, dest: &Path, bytes: &[u8]) -> Result<(), InitramfsError> {
    let io = |path: &Path| {
        let path = path.to_owned();
        move |source| InitramfsError::Io { path, source }
    };
    std::fs::create_dir_all(dir).map_err(io(dir))?;
    let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io(dir))?;
    tmp.write_all(bytes).map_err(io(dest))?;
    tmp.as_file().sync_all().map_err(io(dest))?;
    tmp.persist(dest).map_err(|e| InitramfsError::Io {
        path: dest.to_owned(),
        source: e.error,
    })?;
    Ok(())
}

/// Composes node-init's initramfs for image kernels: base archive, module archive, key
/// archive, each starting on a 512-byte boundary. Results are remembered per module archive.
#[derive(Debug)]
pub struct Composer {
    base: PathBuf,
    public_key_hex: String,
    out_dir: PathBuf,
    done: Mutex<HashMap<Digest, Digest>>,
}

impl Composer {
    /// A composer over node-init's base archive `base`, for the server key `public_key_hex`,
    /// writing into `out_dir`.
    pub fn new(base: &Path, public_key_hex: &str, out_dir: &Path) -> Composer {
        Composer {
            base: base.to_owned(),
            public_key_hex: public_key_hex.to_owned(),
            out_dir: out_dir.to_owned(),
            done: Mutex::new(HashMap::new()),
        }
    }

    /// Where the composed initramfs with blake3 `id` lives (whether or not it exists).
    pub fn path_of(&self, id: &Digest) -> PathBuf {
        self.out_dir.join(format!("initramfs-{}.img", id.to_hex()))
    }

    /// The composed initramfs for module archive `modules_id` (its file `modules`): its
    /// blake3 and path. Composed and written on first use; blocking I/O.
    pub fn compose(
        &self,
        modules_id: &Digest,
        modules: &Path,
    ) -> Result<(Digest, PathBuf), InitramfsError> {
        // Held while composing: nodes booting together compose each initramfs once.
        let mut done = self.done.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(id) = done.get(modules_id).copied() {
            let path = self.path_of(&id);
            if path.is_file() {
                return Ok((id, path));
            }
        }
        let io = |path: &Path| {
            let path = path.to_owned();
            move |source| InitramfsError::Io { path, source }
        };
        let mut bytes = std::fs::read(&self.base).map_err(io(&self.base))?;
        pad_to(&mut bytes, 512);
        bytes.extend_from_slice(&std::fs::read(modules).map_err(io(modules))?);
        pad_to(&mut bytes, 512);
        bytes.extend_from_slice(&key_archive(&self.public_key_hex));
        let id = Digest::from(blake3::hash(&bytes));
        let dest = self.path_of(&id);
        if !dest.is_file() {
            write_atomic(&self.out_dir, &dest, &bytes)?;
        }
        done.insert(*modules_id, id);
        Ok((id, dest))
    }
}

/// Writes `<out_dir>/initramfs-<blake3>.img`: `base`, zero padding to a 512-byte boundary,
/// then the key archive. Returns its path. Written to a temp file and renamed into place, so
/// a half-written initramfs is never served.
pub fn with_public_key(
    base: &Path,
    public_key_hex: &str,
    out_dir: &Path,
) -> Result<PathBuf, InitramfsError> {
    let mut bytes = std::fs::read(base).map_err(|source| InitramfsError::Io {
        path: base.to_owned(),
        source,
    })?;
    pad_to(&mut bytes, 512);
    bytes.extend_from_slice(&key_archive(public_key_hex));
    let name = format!("initramfs-{}.img", &blake3::hash(&bytes).to_hex()[..16]);
    let dest = out_dir.join(name);
    if dest.exists() {
        return Ok(dest);
    }
    write_atomic(out_dir, &dest, &bytes)?;
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

    /// The composed initramfs is base, modules, key, each on a 512-byte boundary; named by its
    /// blake3; made once; GNU cpio reads the module archive inside it.
    #[test]
    fn composed_with_modules_and_key() {
        let dir = tempfile::tempdir().unwrap();
        let base = dir.path().join("base.img");
        std::fs::write(&base, b"0707").unwrap();
        let modules = newc_archive(&[
            ("lib", 0o040755, b""),
            ("lib/modules", 0o040755, b""),
            ("lib/modules/9.9", 0o040755, b""),
            ("lib/modules/9.9/strata-modules.list", 0o100644, b"# none\n"),
        ]);
        let mpath = dir.path().join("modules.cpio");
        std::fs::write(&mpath, &modules).unwrap();
        let mid = Digest::from(blake3::hash(&modules));
        let out = dir.path().join("out");
        let c = Composer::new(&base, &"ef".repeat(32), &out);
        let (id, path) = c.compose(&mid, &mpath).unwrap();
        let bytes = std::fs::read(&path).unwrap();
        assert_eq!(Digest::from(blake3::hash(&bytes)), id);
        assert_eq!(path, c.path_of(&id));
        assert_eq!(&bytes[..4], b"0707");
        assert!(bytes[4..512].iter().all(|b| *b == 0));
        assert_eq!(&bytes[512..512 + modules.len()], &modules[..]);
        let key_at = (512 + modules.len()).div_ceil(512) * 512;
        assert_eq!(&bytes[key_at..], &key_archive(&"ef".repeat(32))[..]);
        let out_cpio = std::process::Command::new("cpio")
            .args(["-t", "--quiet"])
            .stdin(std::fs::File::open(&mpath).unwrap())
            .output()
            .expect("cpio missing: run scripts/setup.sh (Debian package cpio)");
        assert_eq!(
            String::from_utf8_lossy(&out_cpio.stdout)
                .lines()
                .collect::<Vec<_>>(),
            [
                "lib",
                "lib/modules",
                "lib/modules/9.9",
                "lib/modules/9.9/strata-modules.list"
            ]
        );
        // Again: the same file, not rewritten; no temp files left.
        let mtime = std::fs::metadata(&path).unwrap().modified().unwrap();
        assert_eq!(c.compose(&mid, &mpath).unwrap(), (id, path.clone()));
        assert_eq!(std::fs::metadata(&path).unwrap().modified().unwrap(), mtime);
        assert_eq!(std::fs::read_dir(&out).unwrap().count(), 1);
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
