//! The parent locator (MS-VHDX §2.6.2.6, §2.6.2.6.2 for the VHDX locator type): UTF-16LE
//! key/value pairs naming the parent (`parent_linkage`, `relative_path`, `volume_path`,
//! `absolute_win32_path`), and the resolution of those paths on this host.

use std::io::Cursor;
use std::path::{Component, Path, PathBuf};

use binrw::{binrw, BinRead, BinWrite};
use uuid::Uuid;

use crate::error::{MetadataItem, Result, Structure, VhdxError};
use crate::guid;

/// MS-VHDX §2.6.2.6.2: the VHDX parent locator type.
const LOCATOR_TYPE_VHDX: Uuid = guid::constant((
    0xB04A_EFB7,
    0xD19E,
    0x4A81,
    [0xB7, 0x89, 0x25, 0xB8, 0xE9, 0x44, 0x59, 0x13],
));
const MAX_PAIRS: u16 = 256;

/// MS-VHDX §2.6.2.6.1: parent locator header.
#[binrw]
#[brw(little)]
struct LocatorHeaderRaw {
    locator_type: [u8; 16],
    reserved: u16,
    key_value_count: u16,
}

/// MS-VHDX §2.6.2.6.1: one key/value entry (offsets from the start of the item).
#[binrw]
#[brw(little)]
struct KeyValueRaw {
    key_offset: u32,
    value_offset: u32,
    key_length: u16,
    value_length: u16,
}

/// A validated VHDX parent locator.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ParentLocator {
    /// The parent's DataWriteGuid at the time the child was made.
    pub parent_linkage: Uuid,
    /// An alternative linkage some writers record (`parent_linkage2`).
    pub parent_linkage2: Option<Uuid>,
    /// All key/value pairs in file order (including the above).
    pub entries: Vec<(String, String)>,
}

impl ParentLocator {
    /// A locator with the given linkage and paths.
    pub fn new(
        parent_linkage: Uuid,
        relative_path: Option<String>,
        absolute_win32_path: Option<String>,
    ) -> Self {
        let mut entries = vec![("parent_linkage".to_string(), braced(parent_linkage))];
        if let Some(p) = relative_path {
            entries.push(("relative_path".to_string(), p));
        }
        if let Some(p) = absolute_win32_path {
            entries.push(("absolute_win32_path".to_string(), p));
        }
        Self {
            parent_linkage,
            parent_linkage2: None,
            entries,
        }
    }

    /// The value of `key`, if present.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Candidate parent paths for a child at `child`, in the order they are tried:
    /// `relative_path` (against the child's directory), then `absolute_win32_path` and
    /// `volume_path` when they are host paths, then the bare file name of each next to
    /// the child (the way qemu-img resolves a relative backing file).
    pub fn candidates(&self, child: &Path) -> Vec<PathBuf> {
        let dir = child.parent().unwrap_or(Path::new("."));
        let mut out: Vec<PathBuf> = Vec::new();
        let mut push = |p: PathBuf| {
            if !out.contains(&p) {
                out.push(p);
            }
        };
        let keys = ["relative_path", "absolute_win32_path", "volume_path"];
        for key in keys {
            let Some(v) = self.get(key) else { continue };
            let host = win_to_host(v);
            if key == "relative_path" {
                push(normalize(&dir.join(&host)));
            } else if host.is_absolute() {
                push(host);
            }
        }
        for key in keys {
            let Some(v) = self.get(key) else { continue };
            if let Some(name) = v
                .rsplit(['\\', '/'])
                .next()
                .filter(|n| !n.is_empty() && *n != "." && *n != "..")
            {
                push(dir.join(name));
            }
        }
        out
    }

    /// The item bytes.
    pub(crate) fn to_bytes(&self) -> Vec<u8> {
        let n = self.entries.len();
        let table_len = 20 + 12 * n;
        let mut strings: Vec<u8> = Vec::new();
        let mut kvs = Vec::new();
        for (k, v) in &self.entries {
            let kb: Vec<u8> = k.encode_utf16().flat_map(u16::to_le_bytes).collect();
            let vb: Vec<u8> = v.encode_utf16().flat_map(u16::to_le_bytes).collect();
            let ko = table_len + strings.len();
            strings.extend_from_slice(&kb);
            let vo = table_len + strings.len();
            strings.extend_from_slice(&vb);
            kvs.push(KeyValueRaw {
                key_offset: ko as u32,
                value_offset: vo as u32,
                key_length: kb.len() as u16,
                value_length: vb.len() as u16,
            });
        }
        let mut out = Cursor::new(Vec::with_capacity(table_len + strings.len()));
        let head = LocatorHeaderRaw {
            locator_type: guid::to_disk(LOCATOR_TYPE_VHDX),
            reserved: 0,
            key_value_count: n as u16,
        };
        // Writes into a growing Vec cannot fail.
        let _ = head.write(&mut out);
        for kv in kvs {
            let _ = kv.write(&mut out);
        }
        let mut bytes = out.into_inner();
        bytes.extend_from_slice(&strings);
        bytes
    }
}

/// `{xxxxxxxx-xxxx-...}` as Windows writes GUIDs in locators.
pub(crate) fn braced(id: Uuid) -> String {
    id.braced().to_string()
}

/// Parses a GUID written with or without braces.
fn parse_guid(s: &str) -> Option<Uuid> {
    Uuid::parse_str(s.trim().trim_start_matches('{').trim_end_matches('}')).ok()
}

fn utf16(bytes: &[u8]) -> Option<String> {
    if !bytes.len().is_multiple_of(2) {
        return None;
    }
    let units: Vec<u16> = bytes
        .chunks_exact(2)
        .map(|c| {
            u16::from_le_bytes([
                c.first().copied().unwrap_or(0),
                c.get(1).copied().unwrap_or(0),
            ])
        })
        .collect();
    String::from_utf16(&units).ok()
}

/// Parses the parent locator item.
pub(crate) fn parse(file: &Path, item: &[u8]) -> Result<ParentLocator> {
    let structure = Structure::MetadataItem(MetadataItem::ParentLocator);
    let invalid = |reason: String| VhdxError::InvalidField {
        file: file.to_path_buf(),
        structure,
        reason,
    };
    let mut cur = Cursor::new(item);
    let head = LocatorHeaderRaw::read(&mut cur).map_err(|e| invalid(e.to_string()))?;
    let ty = guid::from_disk(head.locator_type);
    if ty != LOCATOR_TYPE_VHDX {
        return Err(VhdxError::Unsupported {
            file: file.to_path_buf(),
            what: format!("parent locator type {ty}"),
        });
    }
    if head.key_value_count > MAX_PAIRS {
        return Err(invalid(format!(
            "{} key/value pairs (at most {MAX_PAIRS})",
            head.key_value_count
        )));
    }
    let mut entries = Vec::new();
    for i in 0..head.key_value_count {
        let kv = KeyValueRaw::read(&mut cur).map_err(|e| invalid(e.to_string()))?;
        let field = |off: u32, len: u16, what: &str| -> Result<String> {
            let (s, l) = (off as usize, usize::from(len));
            let bytes = item
                .get(s..s.saturating_add(l))
                .filter(|_| l > 0)
                .ok_or_else(|| invalid(format!("pair {i}: {what} [{s}, +{l}) outside the item")))?;
            utf16(bytes).ok_or_else(|| invalid(format!("pair {i}: {what} is not UTF-16")))
        };
        let k = field(kv.key_offset, kv.key_length, "key")?;
        let v = field(kv.value_offset, kv.value_length, "value")?;
        if entries.iter().any(|(ek, _): &(String, String)| *ek == k) {
            return Err(invalid(format!("key {k} repeated")));
        }
        entries.push((k, v));
    }
    let linkage_of = |key: &str| {
        entries
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.clone())
    };
    let linkage =
        linkage_of("parent_linkage").ok_or_else(|| invalid("no parent_linkage key".into()))?;
    let parent_linkage = parse_guid(&linkage)
        .ok_or_else(|| invalid(format!("parent_linkage {linkage:?} is not a GUID")))?;
    let parent_linkage2 = linkage_of("parent_linkage2").and_then(|v| parse_guid(&v));
    Ok(ParentLocator {
        parent_linkage,
        parent_linkage2,
        entries,
    })
}

/// A Windows path (`..\base.vhdx`, `.\x`) as a host path.
fn win_to_host(p: &str) -> PathBuf {
    PathBuf::from(p.replace('\\', "/"))
}

/// A host path in the Win32 form the locator's path values use (`\` separators), so readers
/// that take the file name after the last `\` (libvhdi's vhdimount does) find it.
pub(crate) fn host_to_win(p: &Path) -> String {
    p.to_string_lossy().replace('/', "\\")
}

/// Removes `.` components and folds `..` lexically (as Windows does for relative_path).
fn normalize(p: &Path) -> PathBuf {
    let mut out = PathBuf::new();
    for c in p.components() {
        match c {
            Component::CurDir => {}
            Component::ParentDir => {
                if !out.pop() {
                    out.push("..");
                }
            }
            other => out.push(other.as_os_str()),
        }
    }
    out
}

/// The relative path from directory `from` to `to`, Windows style (`.\x`, `..\d\x`).
pub(crate) fn relative_win_path(from_dir: &Path, to: &Path) -> Option<String> {
    let from: Vec<Component> = from_dir.components().collect();
    let to_c: Vec<Component> = to.components().collect();
    let common = from
        .iter()
        .zip(to_c.iter())
        .take_while(|(a, b)| a == b)
        .count();
    let mut parts: Vec<String> = Vec::new();
    for _ in common..from.len() {
        parts.push("..".into());
    }
    if parts.is_empty() {
        parts.push(".".into());
    }
    for c in to_c.get(common..)? {
        parts.push(c.as_os_str().to_str()?.to_string());
    }
    Some(parts.join("\\"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trips() {
        let loc = ParentLocator::new(
            Uuid::from_u128(77),
            Some(".\\base.vhdx".into()),
            Some("/srv/base.vhdx".into()),
        );
        let back = parse(Path::new("x"), &loc.to_bytes()).map_err(|e| e.to_string());
        assert_eq!(back, Ok(loc));
    }

    #[test]
    fn relative_paths() {
        assert_eq!(
            relative_win_path(Path::new("/a/b"), Path::new("/a/b/c.vhdx")).as_deref(),
            Some(".\\c.vhdx")
        );
        assert_eq!(
            relative_win_path(Path::new("/a/b"), Path::new("/a/d/c.vhdx")).as_deref(),
            Some("..\\d\\c.vhdx")
        );
        let loc = ParentLocator::new(Uuid::nil(), Some("..\\d\\c.vhdx".into()), None);
        assert_eq!(
            loc.candidates(Path::new("/a/b/child.vhdx")).first(),
            Some(&PathBuf::from("/a/d/c.vhdx"))
        );
    }
}
