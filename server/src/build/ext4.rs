//! ext4 images through e2fsprogs' userspace tools: `mke2fs -d` makes a file system from a
//! directory, `debugfs -w` edits one in place (write, mkdir, rm, symlink, mknod,
//! set_inode_field), all without mounting and without root.
//!
//! Reproducibility: mke2fs gets a fixed UUID and directory hash seed (`-U`, `-E hash_seed=`)
//! and `E2FSPROGS_FAKE_TIME`; every debugfs session starts with `set_current_time`, so inodes
//! it creates or touches get the recipe's epoch. `mke2fs -d` copies atime/mtime/ctime from the
//! source tree, so the builder resets them (see `super::ops::normalize_times`). `LC_ALL=C`
//! keeps mke2fs's directory scan order byte-wise.
//!
//! debugfs exits 0 even when a command fails; a session is checked by its stderr, where every
//! failure is reported (the version banner is the only other stderr line).

use std::fmt::Write as _;
use std::io;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

/// Errors of the e2fsprogs wrappers.
#[derive(Debug, thiserror::Error)]
pub enum Ext4Error {
    /// The tool is not installed.
    #[error("{tool} not found: install e2fsprogs (apt-get install e2fsprogs)")]
    ToolMissing {
        /// Tool name.
        tool: &'static str,
    },
    /// Running the tool failed.
    #[error("running {tool}")]
    Spawn {
        /// Tool name.
        tool: &'static str,
        /// The cause.
        #[source]
        source: io::Error,
    },
    /// The tool reported failure.
    #[error("{tool} failed on {image}: {message}")]
    Failed {
        /// Tool name.
        tool: &'static str,
        /// The image it worked on.
        image: PathBuf,
        /// Its complaint (stderr, trimmed).
        message: String,
    },
    /// A path cannot be passed to debugfs.
    #[error(
        "path {path:?} cannot be handled by debugfs (quotes, control characters or non-UTF-8)"
    )]
    UnsupportedName {
        /// The path.
        path: String,
    },
    /// Writing the command script failed.
    #[error("writing debugfs script {path}")]
    Script {
        /// Script path.
        path: PathBuf,
        /// The cause.
        #[source]
        source: io::Error,
    },
}

/// Parameters that make `mke2fs` deterministic.
#[derive(Debug, Clone)]
pub struct MkfsOptions {
    /// File-system size in bytes (a multiple of 4096).
    pub size: u64,
    /// File-system UUID (canonical text form).
    pub uuid: String,
    /// Directory hash seed (a UUID, canonical text form).
    pub hash_seed: String,
    /// Every timestamp, Unix seconds.
    pub epoch: u64,
    /// Volume label (at most 16 bytes).
    pub label: String,
    /// Inode count, if the default is not enough (trees with many small files).
    pub inodes: Option<u64>,
}

/// Where a system tool is: the first of `/usr/sbin`, `/sbin`, `/usr/bin`, `/bin` holding it
/// (the builder does not depend on the caller's `PATH`).
pub(crate) fn find_tool(name: &str) -> Option<std::path::PathBuf> {
    ["/usr/sbin", "/sbin", "/usr/bin", "/bin"]
        .iter()
        .map(|d| Path::new(d).join(name))
        .find(|p| p.is_file())
}

fn tool(name: &'static str) -> Result<Command, Ext4Error> {
    let p = find_tool(name).ok_or(Ext4Error::ToolMissing { tool: name })?;
    let mut c = Command::new(p);
    c.env("LC_ALL", "C")
        .env_remove("MKE2FS_CONFIG")
        .env_remove("E2FSPROGS_FAKE_TIME");
    Ok(c)
}

fn run(tool_name: &'static str, mut cmd: Command, image: &Path) -> Result<String, Ext4Error> {
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Ext4Error::Spawn {
            tool: tool_name,
            source,
        })?;
    if !out.status.success() {
        let mut message = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        if message.is_empty() {
            message = String::from_utf8_lossy(&out.stdout).trim().to_owned();
        }
        return Err(Ext4Error::Failed {
            tool: tool_name,
            image: image.to_owned(),
            message,
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Makes an ext4 file system in `image` (created or truncated to `opts.size`), populated from
/// `root` if given.
pub fn mkfs(image: &Path, root: Option<&Path>, opts: &MkfsOptions) -> Result<(), Ext4Error> {
    let mut cmd = tool("mke2fs")?;
    cmd.env("E2FSPROGS_FAKE_TIME", opts.epoch.to_string())
        .args(["-q", "-F", "-t", "ext4", "-b", "4096", "-m", "0"])
        .arg("-U")
        .arg(&opts.uuid)
        .arg("-E")
        .arg(format!(
            "hash_seed={},root_owner=0:0,lazy_itable_init=0,nodiscard",
            opts.hash_seed
        ))
        .arg("-L")
        .arg(&opts.label)
        // Features: a journal, no metadata_csum_seed surprises, no resize inode growth.
        .args(["-O", "^resize_inode"]);
    if let Some(n) = opts.inodes {
        cmd.arg("-N").arg(n.to_string());
    }
    if let Some(root) = root {
        cmd.arg("-d").arg(root);
    }
    cmd.arg(image).arg(format!("{}k", opts.size / 1024));
    run("mke2fs", cmd, image)?;
    Ok(())
}

/// Checks a file system with `e2fsck -fn`; returns its report on failure.
pub fn fsck(image: &Path) -> Result<(), Ext4Error> {
    let mut cmd = tool("e2fsck")?;
    cmd.args(["-f", "-n"]).arg(image);
    run("e2fsck", cmd, image).map(|_| ())
}

/// Quotes one debugfs argument.
pub fn quote(arg: &str) -> Result<String, Ext4Error> {
    if arg.is_empty() || arg.chars().any(|c| c == '"' || c.is_control()) {
        return Err(Ext4Error::UnsupportedName {
            path: arg.to_owned(),
        });
    }
    Ok(format!("\"{arg}\""))
}

/// A debugfs command script.
#[derive(Debug, Default, Clone)]
pub struct Script {
    text: String,
    count: usize,
}

impl Script {
    /// A script whose changes are stamped with `epoch`.
    pub fn new(epoch: u64) -> Script {
        let mut s = Script::default();
        s.line(format!("set_current_time @{epoch}"));
        s
    }

    /// Appends a raw command line.
    pub fn line(&mut self, l: String) {
        self.text.push_str(&l);
        self.text.push('\n');
        self.count += 1;
    }

    /// Number of commands.
    pub fn len(&self) -> usize {
        self.count
    }

    /// True if there are no commands besides the time stamp.
    pub fn is_empty(&self) -> bool {
        self.count <= 1
    }

    /// `mkdir path`.
    pub fn mkdir(&mut self, path: &str) -> Result<(), Ext4Error> {
        let l = format!("mkdir {}", quote(path)?);
        self.line(l);
        Ok(())
    }

    /// `write host_file path`.
    pub fn write(&mut self, host: &Path, path: &str) -> Result<(), Ext4Error> {
        let h = host.to_str().ok_or_else(|| Ext4Error::UnsupportedName {
            path: host.display().to_string(),
        })?;
        let l = format!("write {} {}", quote(h)?, quote(path)?);
        self.line(l);
        Ok(())
    }

    /// `symlink path target`.
    pub fn symlink(&mut self, path: &str, target: &str) -> Result<(), Ext4Error> {
        let l = format!("symlink {} {}", quote(path)?, quote(target)?);
        self.line(l);
        Ok(())
    }

    /// `rm path` (a non-directory).
    pub fn rm(&mut self, path: &str) -> Result<(), Ext4Error> {
        let l = format!("rm {}", quote(path)?);
        self.line(l);
        Ok(())
    }

    /// `rmdir path` (an empty directory).
    pub fn rmdir(&mut self, path: &str) -> Result<(), Ext4Error> {
        let l = format!("rmdir {}", quote(path)?);
        self.line(l);
        Ok(())
    }

    /// `ln target path` (a hard link; the caller fixes the link count with `sif links`).
    pub fn link(&mut self, target: &str, path: &str) -> Result<(), Ext4Error> {
        let l = format!("ln {} {}", quote(target)?, quote(path)?);
        self.line(l);
        Ok(())
    }

    /// `mknod path p|c|b [major minor]`. debugfs's mknod links the name into its current
    /// directory without resolving a path, so the command runs after a `cd` to the parent.
    pub fn mknod(
        &mut self,
        path: &str,
        kind: char,
        major: u32,
        minor: u32,
    ) -> Result<(), Ext4Error> {
        let (dir, name) = match path.rfind('/') {
            Some(0) => ("/", &path[1..]),
            Some(i) => (&path[..i], &path[i + 1..]),
            None => ("/", path),
        };
        let (d, n) = (quote(dir)?, quote(name)?);
        let l = if kind == 'p' {
            format!("cd {d}\nmknod {n} p\ncd /")
        } else {
            format!("cd {d}\nmknod {n} {kind} {major} {minor}\ncd /")
        };
        self.line(l);
        Ok(())
    }

    /// `set_inode_field path field value`.
    pub fn sif(&mut self, path: &str, field: &str, value: &str) -> Result<(), Ext4Error> {
        let l = format!("sif {} {field} {value}", quote(path)?);
        self.line(l);
        Ok(())
    }

    /// Sets type+mode, owner and all four timestamps of `path`.
    pub fn set_meta(
        &mut self,
        path: &str,
        mode: u32,
        uid: u32,
        gid: u32,
        epoch: u64,
    ) -> Result<(), Ext4Error> {
        let q = quote(path)?;
        let mut l = String::new();
        let _ = write!(
            l,
            "sif {q} mode 0{mode:o}\nsif {q} uid {uid}\nsif {q} gid {gid}"
        );
        for f in ["atime", "mtime", "ctime", "crtime"] {
            let _ = write!(l, "\nsif {q} {f} @{epoch}");
        }
        self.text.push_str(&l);
        self.text.push('\n');
        self.count += 7;
        Ok(())
    }

    /// Sets the four timestamps of `path`.
    pub fn set_times(&mut self, path: &str, epoch: u64) -> Result<(), Ext4Error> {
        let q = quote(path)?;
        for f in ["atime", "mtime", "ctime", "crtime"] {
            self.line(format!("sif {q} {f} @{epoch}"));
        }
        Ok(())
    }

    /// The script text.
    pub fn text(&self) -> &str {
        &self.text
    }
}

/// Runs a debugfs script against `image` (writable if `write`), in scratch dir `dir`. Returns
/// stdout. Any stderr line other than the version banner is a failure.
pub fn debugfs(
    image: &Path,
    write: bool,
    script: &Script,
    dir: &Path,
) -> Result<String, Ext4Error> {
    let path = dir.join("debugfs.cmds");
    std::fs::write(&path, script.text()).map_err(|source| Ext4Error::Script {
        path: path.clone(),
        source,
    })?;
    let mut cmd = tool("debugfs")?;
    if write {
        cmd.arg("-w");
    }
    cmd.arg("-f").arg(&path).arg(image);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Ext4Error::Spawn {
            tool: "debugfs",
            source,
        })?;
    let stderr = String::from_utf8_lossy(&out.stderr);
    let errors: Vec<&str> = stderr
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with("debugfs 1.") && !l.starts_with("debugfs "))
        .collect();
    if !out.status.success() || !errors.is_empty() {
        return Err(Ext4Error::Failed {
            tool: "debugfs",
            image: image.to_owned(),
            message: if errors.is_empty() {
                stderr.trim().to_owned()
            } else {
                errors.join("; ")
            },
        });
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// One directory entry as `ls -p` shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Entry {
    /// Inode number.
    pub ino: u64,
    /// Type and permission bits.
    pub mode: u32,
    /// Owner.
    pub uid: u32,
    /// Group.
    pub gid: u32,
    /// Name.
    pub name: String,
}

impl Entry {
    /// True for a directory.
    pub fn is_dir(&self) -> bool {
        self.mode & 0o170000 == 0o040000
    }
}

/// Lists many directories in one read-only debugfs session. A path that is not an existing
/// directory maps to `None`. `.` and `..` are left out.
pub fn list_dirs(
    image: &Path,
    dirs: &[String],
    scratch: &Path,
) -> Result<Vec<Option<Vec<Entry>>>, Ext4Error> {
    let mut script = Script::default();
    for d in dirs {
        script.line(format!("ls -p {}", quote(d)?));
    }
    let path = scratch.join("debugfs-ls.cmds");
    std::fs::write(&path, script.text()).map_err(|source| Ext4Error::Script {
        path: path.clone(),
        source,
    })?;
    let mut cmd = tool("debugfs")?;
    cmd.arg("-f").arg(&path).arg(image);
    let out = cmd
        .stdin(Stdio::null())
        .output()
        .map_err(|source| Ext4Error::Spawn {
            tool: "debugfs",
            source,
        })?;
    if !out.status.success() {
        return Err(Ext4Error::Failed {
            tool: "debugfs",
            image: image.to_owned(),
            message: String::from_utf8_lossy(&out.stderr).trim().to_owned(),
        });
    }
    let stdout = String::from_utf8_lossy(&out.stdout);
    let mut result: Vec<Option<Vec<Entry>>> = Vec::with_capacity(dirs.len());
    let mut current: Option<(bool, Vec<Entry>)> = None;
    for line in stdout.lines() {
        if line.starts_with("debugfs: ") {
            if let Some((has_dot, entries)) = current.take() {
                result.push(has_dot.then_some(entries));
            }
            current = Some((false, Vec::new()));
            continue;
        }
        let Some((has_dot, entries)) = current.as_mut() else {
            continue;
        };
        if let Some(e) = parse_ls_p(line) {
            match e.name.as_str() {
                "." => *has_dot = true,
                ".." => {}
                _ => entries.push(e),
            }
        }
    }
    if let Some((has_dot, entries)) = current.take() {
        result.push(has_dot.then_some(entries));
    }
    if result.len() != dirs.len() {
        return Err(Ext4Error::Failed {
            tool: "debugfs",
            image: image.to_owned(),
            message: format!("listed {} of {} directories", result.len(), dirs.len()),
        });
    }
    Ok(result)
}

/// Parses one `ls -p` line: `/ino/mode/uid/gid/name/size/`.
fn parse_ls_p(line: &str) -> Option<Entry> {
    let rest = line.strip_prefix('/')?;
    let mut it = rest.splitn(5, '/');
    let ino = it.next()?.parse().ok()?;
    let mode = u32::from_str_radix(it.next()?, 8).ok()?;
    let uid = it.next()?.parse().ok()?;
    let gid = it.next()?.parse().ok()?;
    let tail = it.next()?; // name/size/
    let tail = tail.strip_suffix('/')?;
    let (name, _size) = tail.rsplit_once('/')?;
    Some(Entry {
        ino,
        mode,
        uid,
        gid,
        name: name.to_owned(),
    })
}

/// Reads one file out of an image (`debugfs dump`) into `dest`.
pub fn dump(image: &Path, path: &str, dest: &Path, scratch: &Path) -> Result<(), Ext4Error> {
    let mut script = Script::default();
    let d = dest.to_str().ok_or_else(|| Ext4Error::UnsupportedName {
        path: dest.display().to_string(),
    })?;
    script.line(format!("dump {} {}", quote(path)?, quote(d)?));
    debugfs(image, false, &script, scratch)?;
    Ok(())
}

/// True if the bytes at offset 1024 of `image` hold an ext2/3/4 superblock.
pub fn has_ext_superblock(image: &Path) -> io::Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let mut f = std::fs::File::open(image)?;
    let mut sb = [0u8; 2];
    f.seek(SeekFrom::Start(1024 + 56))?;
    match f.read_exact(&mut sb) {
        Ok(()) => Ok(sb == [0x53, 0xEF]),
        Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => Ok(false),
        Err(e) => Err(e),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ls_p_lines_parse() {
        let e = parse_ls_p("/20/040755/0/0/a b//").unwrap();
        assert_eq!(
            e,
            Entry {
                ino: 20,
                mode: 0o40755,
                uid: 0,
                gid: 0,
                name: "a b".into()
            }
        );
        assert!(e.is_dir());
        let e = parse_ls_p("/12/100644/5/6/s/2/").unwrap();
        assert_eq!((e.uid, e.gid, e.name.as_str()), (5, 6, "s"));
        assert!(parse_ls_p("garbage").is_none());
    }

    #[test]
    fn quoting_rejects_what_debugfs_cannot_take() {
        assert_eq!(quote("/a b").unwrap(), "\"/a b\"");
        assert!(quote("/a\"b").is_err());
        assert!(quote("/a\nb").is_err());
        assert!(quote("").is_err());
    }
}
