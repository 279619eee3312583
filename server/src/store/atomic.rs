//! Atomic publication of files: a half-written file is never visible under its final name.
//!
//! [`TempFile`] is created in the destination's own directory (so the final `rename` is atomic
//! on POSIX file systems), `persist` fsyncs the file, renames it over the destination and
//! fsyncs the directory, so after a crash the name points either nowhere or at the complete
//! file. A `TempFile` that is dropped without being persisted deletes itself. Temp files are
//! named `.tmp-<pid>-<n>-<tag>` so that [`clean_stale`] can remove those of dead processes
//! (a builder killed mid-write) without touching a live process's work.

use std::fs::{self, File, OpenOptions};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};

static COUNTER: AtomicU64 = AtomicU64::new(0);

/// Prefix of every temp file name.
pub const TEMP_PREFIX: &str = ".tmp-";

/// A file being written; deleted on drop unless persisted.
#[derive(Debug)]
pub struct TempFile {
    path: PathBuf,
    file: File,
}

impl TempFile {
    /// Creates an empty temp file in `dir`; `tag` is a readable hint kept in the name.
    pub fn new_in(dir: &Path, tag: &str) -> io::Result<TempFile> {
        let tag: String = tag
            .chars()
            .filter(|c| c.is_ascii_alphanumeric() || *c == '-')
            .take(40)
            .collect();
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("{TEMP_PREFIX}{}-{n}-{tag}", std::process::id()));
            match OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&path)
            {
                Ok(file) => return Ok(TempFile { path, file }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// The temp file's path (for tools that write it by name).
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// The open file.
    pub fn file(&mut self) -> &mut File {
        &mut self.file
    }

    /// Reopens the file by name (after an external tool replaced it).
    pub fn reopen(&mut self) -> io::Result<()> {
        self.file = OpenOptions::new().read(true).write(true).open(&self.path)?;
        Ok(())
    }

    /// Fsyncs the file, renames it to `dest` and fsyncs `dest`'s directory.
    pub fn persist(mut self, dest: &Path) -> io::Result<()> {
        self.file.sync_all()?;
        rename(&self.path, dest)?;
        // From here the temp name no longer exists: do not delete anything on drop.
        self.path = PathBuf::new();
        fsync_dir(dest.parent().unwrap_or(Path::new(".")))
    }
}

impl Drop for TempFile {
    fn drop(&mut self) {
        if !self.path.as_os_str().is_empty() {
            let _ = fs::remove_file(&self.path);
        }
    }
}

/// The one rename of the store: atomic replacement of `dest` by `src` (same file system).
fn rename(src: &Path, dest: &Path) -> io::Result<()> {
    fs::rename(src, dest)
}

/// Publishes a finished file `src` (in a scratch directory on the same file system) as
/// `dest`: fsync, rename, fsync both directories.
pub fn persist_path(src: &Path, dest: &Path) -> io::Result<()> {
    File::open(src)?.sync_all()?;
    rename(src, dest)?;
    fsync_dir(dest.parent().unwrap_or(Path::new(".")))?;
    fsync_dir(src.parent().unwrap_or(Path::new(".")))
}

/// [`persist_path`] for many files going into one directory: each file is fsynced and
/// renamed to its destination, then `dest_dir` is fsynced once. A destination that already
/// exists is left as it is (content-addressed names: it holds the same bytes) and its
/// source removed.
pub fn persist_many(items: &[(PathBuf, PathBuf)], dest_dir: &Path) -> io::Result<()> {
    for (src, dest) in items {
        if dest.is_file() {
            let _ = fs::remove_file(src);
            continue;
        }
        File::open(src)?.sync_all()?;
        rename(src, dest)?;
    }
    fsync_dir(dest_dir)
}

/// Fsyncs a directory so a rename or unlink in it is durable.
pub fn fsync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Writes `bytes` to `dest` atomically.
pub fn write(dest: &Path, bytes: &[u8]) -> io::Result<()> {
    let dir = dest.parent().unwrap_or(Path::new("."));
    let mut tmp = TempFile::new_in(dir, "write")?;
    io::Write::write_all(tmp.file(), bytes)?;
    tmp.persist(dest)
}

/// Removes temp files (and temp directories) in `dir` left by processes that no longer run.
/// Returns how many entries were removed.
pub fn clean_stale(dir: &Path) -> io::Result<usize> {
    let mut removed = 0;
    let entries = match fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(e),
    };
    for entry in entries {
        let entry = entry?;
        let name = entry.file_name();
        let Some(rest) = name.to_str().and_then(|n| n.strip_prefix(TEMP_PREFIX)) else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if pid == std::process::id() || Path::new("/proc").join(pid.to_string()).exists() {
            continue;
        }
        let path = entry.path();
        let res = if entry.file_type()?.is_dir() {
            fs::remove_dir_all(&path)
        } else {
            fs::remove_file(&path)
        };
        match res {
            Ok(()) => removed += 1,
            Err(e) if e.kind() == io::ErrorKind::NotFound => {}
            Err(e) => return Err(e),
        }
    }
    Ok(removed)
}

/// A scratch directory removed (recursively) on drop, named like a temp file.
#[derive(Debug)]
pub struct TempDir {
    path: PathBuf,
}

impl TempDir {
    /// Creates an empty scratch directory in `dir`.
    pub fn new_in(dir: &Path, tag: &str) -> io::Result<TempDir> {
        loop {
            let n = COUNTER.fetch_add(1, Ordering::Relaxed);
            let path = dir.join(format!("{TEMP_PREFIX}{}-{n}-{tag}", std::process::id()));
            match fs::create_dir(&path) {
                Ok(()) => return Ok(TempDir { path }),
                Err(e) if e.kind() == io::ErrorKind::AlreadyExists => continue,
                Err(e) => return Err(e),
            }
        }
    }

    /// Its path.
    pub fn path(&self) -> &Path {
        &self.path
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.path);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn dropped_temp_file_disappears_and_persisted_one_appears() {
        let dir = tempfile::tempdir().unwrap();
        let t = TempFile::new_in(dir.path(), "x").unwrap();
        let p = t.path().to_owned();
        assert!(p.exists());
        drop(t);
        assert!(!p.exists());
        let mut t = TempFile::new_in(dir.path(), "y").unwrap();
        io::Write::write_all(t.file(), b"hello").unwrap();
        t.persist(&dir.path().join("final")).unwrap();
        assert_eq!(fs::read(dir.path().join("final")).unwrap(), b"hello");
        assert_eq!(fs::read_dir(dir.path()).unwrap().count(), 1);
    }

    #[test]
    fn clean_stale_spares_live_processes() {
        let dir = tempfile::tempdir().unwrap();
        // pid 1 is alive; a huge pid is not.
        fs::write(dir.path().join(".tmp-1-0-live"), b"").unwrap();
        fs::write(dir.path().join(".tmp-4000000000-0-dead"), b"").unwrap();
        fs::create_dir(dir.path().join(".tmp-4000000001-0-deaddir")).unwrap();
        fs::write(dir.path().join("keep"), b"").unwrap();
        assert_eq!(clean_stale(dir.path()).unwrap(), 2);
        assert!(dir.path().join(".tmp-1-0-live").exists());
        assert!(dir.path().join("keep").exists());
    }
}
