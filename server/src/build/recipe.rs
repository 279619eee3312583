//! Recipes: the TOML files in `images/` that say how to build a base, an update of a base, or
//! a role. The format is documented in `docs/images.md`; unknown keys are rejected.

use std::collections::BTreeMap;
use std::fmt;
use std::path::{Component, Path, PathBuf};

use serde::Deserialize;

/// The file name of a recipe inside its directory.
pub const RECIPE_FILE: &str = "recipe.toml";

/// A recipe, as parsed (paths still relative to its directory).
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Recipe {
    /// A base image: name, size, timestamps.
    pub image: Option<ImageSection>,
    /// Where a base's root file system comes from.
    pub base: Option<BaseSection>,
    /// An update: a new version of an existing image from its latest version.
    pub update: Option<UpdateSection>,
    /// A role on an image.
    pub role: Option<RoleSection>,
    /// The kernel a base boots with.
    pub kernel: Option<KernelSection>,
    /// Debian packages an update removes and installs (before its entries).
    pub packages: Option<PackagesSection>,
    /// Template variables.
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
    /// Per-site overrides (roles).
    #[serde(default)]
    pub sites: BTreeMap<String, SiteSection>,
    /// Deletions (applied first).
    #[serde(default)]
    pub delete: Vec<DeleteOp>,
    /// Directories (applied second).
    #[serde(default)]
    pub dir: Vec<DirOp>,
    /// Trees copied in (third).
    #[serde(default)]
    pub tree: Vec<TreeOp>,
    /// Single files, literal or templated (fourth).
    #[serde(default)]
    pub file: Vec<FileOp>,
    /// Symbolic links (fifth).
    #[serde(default)]
    pub symlink: Vec<SymlinkOp>,
    /// Modes and owners of existing paths (last).
    #[serde(default)]
    pub attr: Vec<AttrOp>,
}

/// `[image]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ImageSection {
    /// Image name: `[a-z0-9][a-z0-9-]*`.
    pub name: String,
    /// What it is, for people.
    #[serde(default)]
    pub description: String,
    /// File-system size in MiB (not for `source = "disk"`, which keeps the disk's size).
    pub size_mib: Option<u64>,
    /// Every timestamp in the image (Unix seconds). Default 1700000000.
    pub epoch: Option<u64>,
    /// Inode count (default: mke2fs's).
    pub inodes: Option<u64>,
}

/// `[base]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct BaseSection {
    /// empty, dir, tar, oci or disk.
    pub source: SourceKind,
    /// The directory, archive or disk image (relative to the recipe's directory, or absolute,
    /// `~/` expanded). Not for `empty`.
    pub path: Option<String>,
    /// Disk image format for `disk`: raw, qcow2 or vhdx (default: from the file).
    pub format: Option<String>,
}

/// Kinds of base source.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum SourceKind {
    /// An empty file system (the recipe's own entries fill it).
    Empty,
    /// A root directory.
    Dir,
    /// A tarball (.tar, .tar.gz).
    Tar,
    /// An OCI image archive (`docker save`, or an OCI layout as tar).
    Oci,
    /// An existing ext4 disk image (raw, qcow2, VHDX).
    Disk,
}

/// `[update]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct UpdateSection {
    /// The image updated (its latest version is the starting point).
    pub image: String,
    /// Why, for people.
    #[serde(default)]
    pub description: String,
}

/// `[role]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleSection {
    /// Role name: `[a-z0-9][a-z0-9-]*`.
    pub name: String,
    /// The image it is built on.
    pub image: String,
    /// What it is, for people.
    #[serde(default)]
    pub description: String,
}

/// `[kernel]`: where the kernel comes from.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct KernelSection {
    /// A directory holding `boot/vmlinuz-<release>` (and `lib/modules/<release>`); `~/`
    /// expanded. Without it the kernel is taken from the image's own `/boot`.
    pub dir: Option<String>,
    /// Modules (names without `.ko`) copied into the image with their dependencies.
    #[serde(default)]
    pub modules: Vec<String>,
}

/// `[packages]` (update recipes): Debian packages purged from and installed into the copy of
/// the previous version, before the recipe's entries (`build::packages`). Needs root.
#[derive(Debug, Clone, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct PackagesSection {
    /// Package names purged first (`dpkg --purge`).
    #[serde(default)]
    pub remove: Vec<String>,
    /// Local `.deb` files (host paths, relative to the recipe), installed with `dpkg --root`.
    #[serde(default)]
    pub debs: Vec<String>,
    /// Package names installed last with the image's own `apt-get` (needs apt in the image and
    /// a reachable mirror); `name` or `name=version`.
    #[serde(default)]
    pub install: Vec<String>,
}

/// `[sites.<name>]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SiteSection {
    /// Variables this site sets (over the generic `[vars]`).
    #[serde(default)]
    pub vars: BTreeMap<String, String>,
}

/// A mode: `"0644"` or an integer (TOML `0o644`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Mode(pub u32);

impl<'de> Deserialize<'de> for Mode {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        #[derive(Deserialize)]
        #[serde(untagged)]
        enum Raw {
            Int(u32),
            Text(String),
        }
        let v = match Raw::deserialize(d)? {
            Raw::Int(i) => i,
            Raw::Text(s) => u32::from_str_radix(s.trim_start_matches("0o"), 8)
                .map_err(|_| serde::de::Error::custom(format!("mode {s:?} is not octal")))?,
        };
        if v > 0o7777 {
            return Err(serde::de::Error::custom(format!(
                "mode {v:o} has bits beyond 07777"
            )));
        }
        Ok(Mode(v))
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{:04o}", self.0)
    }
}

/// `[[delete]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DeleteOp {
    /// Paths removed (directories with their contents).
    pub paths: Vec<String>,
    /// Do not fail if a path is absent.
    #[serde(default)]
    pub missing_ok: bool,
}

/// `[[dir]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DirOp {
    /// Directory (parents made as needed, 0755 root).
    pub path: String,
    /// Mode (default 0755).
    pub mode: Option<Mode>,
    /// Owner (default 0).
    #[serde(default)]
    pub uid: u32,
    /// Group (default 0).
    #[serde(default)]
    pub gid: u32,
}

/// `[[tree]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TreeOp {
    /// Host directory copied (its contents, recursively).
    pub from: String,
    /// Where in the image (default `/`).
    #[serde(default = "root")]
    pub to: String,
    /// Owner of everything copied (default 0).
    #[serde(default)]
    pub uid: u32,
    /// Group of everything copied (default 0).
    #[serde(default)]
    pub gid: u32,
}

fn root() -> String {
    "/".to_owned()
}

/// `[[file]]`: exactly one of `source`, `content`, `template`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct FileOp {
    /// Path in the image.
    pub path: String,
    /// Host file copied.
    pub source: Option<String>,
    /// Literal content.
    pub content: Option<String>,
    /// Host file rendered as a template with the variables.
    pub template: Option<String>,
    /// Mode (default: the source's permission bits, or 0644).
    pub mode: Option<Mode>,
    /// Owner (default 0).
    #[serde(default)]
    pub uid: u32,
    /// Group (default 0).
    #[serde(default)]
    pub gid: u32,
}

/// `[[symlink]]`.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SymlinkOp {
    /// What the links point to (stored as written).
    pub target: String,
    /// The links made.
    pub paths: Vec<String>,
}

/// `[[attr]]`: set the mode and/or owner of paths that exist by then.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AttrOp {
    /// The paths.
    pub paths: Vec<String>,
    /// New permission bits.
    pub mode: Option<Mode>,
    /// New owner.
    pub uid: Option<u32>,
    /// New group.
    pub gid: Option<u32>,
}

/// What kind of recipe a file is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum RecipeKind {
    /// `[image]` + `[base]`.
    Base,
    /// `[update]`.
    Update,
    /// `[role]`.
    Role,
}

/// A recipe loaded from disk, validated.
#[derive(Debug, Clone)]
pub struct Loaded {
    /// The recipe file.
    pub file: PathBuf,
    /// Its directory (relative sources are resolved against it).
    pub dir: PathBuf,
    /// Its text, as read (recorded in the catalog).
    pub text: String,
    /// Parsed.
    pub recipe: Recipe,
    /// Kind.
    pub kind: RecipeKind,
}

/// A recipe problem, naming the file and the place in it.
#[derive(Debug, Clone, thiserror::Error)]
#[error("{file}: {message}")]
pub struct RecipeError {
    /// The recipe file.
    pub file: PathBuf,
    /// What is wrong and where.
    pub message: String,
}

/// Checks an image or role name.
pub fn valid_name(n: &str) -> bool {
    let b = n.as_bytes();
    !b.is_empty()
        && b.len() <= 63
        && b.first()
            .is_some_and(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'-')
}

/// Checks a path inside the image: absolute, no `.`/`..`/empty components, no trailing `/`.
pub fn check_image_path(p: &str) -> Result<(), String> {
    if !p.starts_with('/') {
        return Err(format!("path {p:?} must be absolute"));
    }
    if p == "/" {
        return Ok(());
    }
    for c in p[1..].split('/') {
        if c.is_empty() || c == "." || c == ".." {
            return Err(format!(
                "path {p:?} must be normalised (no empty, . or .. components)"
            ));
        }
        if c.len() > 255 {
            return Err(format!("path {p:?} has a component longer than 255 bytes"));
        }
        if c.chars().any(|ch| ch == '"' || ch.is_control()) {
            return Err(format!("path {p:?} has quotes or control characters"));
        }
    }
    Ok(())
}

/// Resolves a host path written in a recipe: `~/` is the home directory, a relative path is
/// relative to the recipe's directory.
pub fn host_path(dir: &Path, p: &str) -> PathBuf {
    if let Some(rest) = p.strip_prefix("~/") {
        if let Some(home) = std::env::var_os("HOME") {
            return PathBuf::from(home).join(rest);
        }
    }
    let path = Path::new(p);
    if path.is_absolute() {
        path.to_owned()
    } else {
        dir.join(path)
    }
}

/// Loads `path` (a recipe file, or a directory holding `recipe.toml`).
pub fn load(path: &Path) -> Result<Loaded, RecipeError> {
    let file = if path.is_dir() {
        path.join(RECIPE_FILE)
    } else {
        path.to_owned()
    };
    let err = |message: String| RecipeError {
        file: file.clone(),
        message,
    };
    let text = std::fs::read_to_string(&file).map_err(|e| err(format!("cannot read: {e}")))?;
    let (recipe, kind) = parse(&file, &text)?;
    let dir = file
        .parent()
        .map(Path::to_owned)
        .unwrap_or_else(|| PathBuf::from("."));
    Ok(Loaded {
        file,
        dir,
        text,
        recipe,
        kind,
    })
}

/// Parses and validates the text of a recipe (`file` names it in errors). Validation covers
/// what the text alone decides: kind, names, sizes, image paths, entry shapes; host files are
/// checked when the recipe is built.
pub fn parse(file: &Path, text: &str) -> Result<(Recipe, RecipeKind), RecipeError> {
    let err = |message: String| RecipeError {
        file: file.to_owned(),
        message,
    };
    let recipe: Recipe =
        toml::from_str(text).map_err(|e| err(e.to_string().trim_end().to_owned()))?;
    let kind = match (&recipe.image, &recipe.update, &recipe.role) {
        (Some(_), None, None) => RecipeKind::Base,
        (None, Some(_), None) => RecipeKind::Update,
        (None, None, Some(_)) => RecipeKind::Role,
        _ => {
            return Err(err(
                "needs exactly one of [image], [update] or [role]".into()
            ))
        }
    };
    validate(&recipe, kind).map_err(err)?;
    Ok((recipe, kind))
}

/// A Debian package name (policy 5.6.1: lower case, digits, `+`, `-`, `.`; two characters at
/// least, starting alphanumeric), optionally `=version` (policy 5.6.12's characters).
fn valid_package(spec: &str) -> bool {
    let (name, version) = match spec.split_once('=') {
        Some((n, v)) => (n, Some(v)),
        None => (spec, None),
    };
    let name_ok = name.len() >= 2
        && name.len() <= 128
        && name.starts_with(|c: char| c.is_ascii_lowercase() || c.is_ascii_digit())
        && name
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || "+-.".contains(c));
    let version_ok = version.is_none_or(|v| {
        !v.is_empty()
            && v.len() <= 128
            && v.starts_with(|c: char| c.is_ascii_digit())
            && v.chars()
                .all(|c| c.is_ascii_alphanumeric() || ".+~:-".contains(c))
    });
    name_ok && version_ok
}

fn validate_packages(p: &PackagesSection) -> Result<(), String> {
    if p.remove.is_empty() && p.debs.is_empty() && p.install.is_empty() {
        return Err("[packages] is empty: give remove, debs or install".into());
    }
    for (key, list) in [("remove", &p.remove), ("install", &p.install)] {
        for n in list.iter() {
            if !valid_package(n) || (key == "remove" && n.contains('=')) {
                return Err(format!(
                    "[packages] {key}: {n:?} is not a Debian package name"
                ));
            }
        }
    }
    for d in &p.debs {
        if !d.ends_with(".deb") || d.chars().any(char::is_control) {
            return Err(format!("[packages] debs: {d:?} is not a .deb file"));
        }
    }
    Ok(())
}

fn validate(r: &Recipe, kind: RecipeKind) -> Result<(), String> {
    if r.packages.is_some() && kind != RecipeKind::Update {
        return Err("[packages] is for update recipes (a new version of an image)".into());
    }
    match kind {
        RecipeKind::Base => {
            let img = r.image.as_ref().ok_or("missing [image]")?;
            if !valid_name(&img.name) {
                return Err(format!("[image] name {:?}: use a-z, 0-9 and -", img.name));
            }
            let base = r
                .base
                .as_ref()
                .ok_or("a base recipe needs a [base] section")?;
            match (img.size_mib, base.source) {
                (Some(_), SourceKind::Disk) => return Err("[image] size_mib does not apply to source = \"disk\" (the disk keeps its size)".into()),
                (None, SourceKind::Disk) => {}
                (None, _) => return Err("[image] needs size_mib".into()),
                (Some(n), _) if n == 0 || n > 1 << 20 => return Err(format!("[image] size_mib {n} out of range 1..=1048576")),
                (Some(_), _) => {}
            }
            match (base.source, &base.path) {
                (SourceKind::Empty, Some(_)) => {
                    return Err("[base] source = \"empty\" takes no path".into())
                }
                (SourceKind::Empty, None) => {}
                (_, None) => return Err("[base] needs a path".into()),
                _ => {}
            }
            if base.format.is_some() && base.source != SourceKind::Disk {
                return Err("[base] format is only for source = \"disk\"".into());
            }
            if !r.sites.is_empty() {
                return Err("[sites] are for role recipes".into());
            }
        }
        RecipeKind::Update => {
            if r.base.is_some() || r.kernel.is_some() {
                return Err("an [update] recipe takes no [base] or [kernel]".into());
            }
            if let Some(p) = &r.packages {
                validate_packages(p)?;
            }
            if !r.sites.is_empty() {
                return Err("[sites] are for role recipes".into());
            }
        }
        RecipeKind::Role => {
            let role = r.role.as_ref().ok_or("missing [role]")?;
            if !valid_name(&role.name) {
                return Err(format!("[role] name {:?}: use a-z, 0-9 and -", role.name));
            }
            if r.base.is_some() || r.kernel.is_some() {
                return Err("a [role] recipe takes no [base] or [kernel]".into());
            }
            for s in r.sites.keys() {
                if !valid_name(s) {
                    return Err(format!("[sites.{s}]: use a-z, 0-9 and - in site names"));
                }
            }
        }
    }
    for (i, d) in r.delete.iter().enumerate() {
        for p in &d.paths {
            check_image_path(p).map_err(|e| format!("[[delete]] #{}: {e}", i + 1))?;
            if p == "/" {
                return Err(format!("[[delete]] #{}: cannot delete /", i + 1));
            }
        }
    }
    for (i, d) in r.dir.iter().enumerate() {
        check_image_path(&d.path).map_err(|e| format!("[[dir]] #{}: {e}", i + 1))?;
    }
    for (i, t) in r.tree.iter().enumerate() {
        check_image_path(&t.to).map_err(|e| format!("[[tree]] #{}: {e}", i + 1))?;
    }
    for (i, f) in r.file.iter().enumerate() {
        check_image_path(&f.path).map_err(|e| format!("[[file]] #{}: {e}", i + 1))?;
        let n = usize::from(f.source.is_some())
            + usize::from(f.content.is_some())
            + usize::from(f.template.is_some());
        if n != 1 {
            return Err(format!(
                "[[file]] #{} ({}): needs exactly one of source, content, template",
                i + 1,
                f.path
            ));
        }
    }
    for (i, s) in r.symlink.iter().enumerate() {
        if s.target.is_empty()
            || s.target.len() > 4095
            || s.target.chars().any(|c| c == '"' || c.is_control())
        {
            return Err(format!("[[symlink]] #{}: bad target {:?}", i + 1, s.target));
        }
        for p in &s.paths {
            check_image_path(p).map_err(|e| format!("[[symlink]] #{}: {e}", i + 1))?;
        }
    }
    for (i, a) in r.attr.iter().enumerate() {
        if a.mode.is_none() && a.uid.is_none() && a.gid.is_none() {
            return Err(format!(
                "[[attr]] #{}: set at least one of mode, uid, gid",
                i + 1
            ));
        }
        for p in &a.paths {
            check_image_path(p).map_err(|e| format!("[[attr]] #{}: {e}", i + 1))?;
        }
    }
    Ok(())
}

/// True if `p` (a relative path from an archive) stays inside its root lexically.
pub fn relative_stays_inside(p: &Path) -> bool {
    let mut depth: i64 = 0;
    for c in p.components() {
        match c {
            Component::Normal(_) => depth += 1,
            Component::CurDir => {}
            Component::ParentDir => {
                depth -= 1;
                if depth < 0 {
                    return false;
                }
            }
            Component::RootDir | Component::Prefix(_) => return false,
        }
    }
    true
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Recipe, String> {
        toml::from_str(s).map_err(|e| e.to_string())
    }

    #[test]
    fn unknown_keys_are_rejected_with_their_place() {
        let e = parse("[image]\nname = \"x\"\nsize_mib = 8\ncolour = \"red\"\n").unwrap_err();
        assert!(e.contains("colour"), "{e}");
        assert!(e.contains("line 4"), "{e}");
        let e = parse("[[file]]\npath = \"/a\"\ncontent = \"\"\nowner = 1\n").unwrap_err();
        assert!(e.contains("owner"), "{e}");
    }

    #[test]
    fn modes_parse_from_text_and_integers() {
        let r = parse("[[dir]]\npath = \"/a\"\nmode = \"0750\"\n[[file]]\npath = \"/b\"\ncontent = \"\"\nmode = 0o600\n").unwrap();
        assert_eq!(r.dir[0].mode, Some(Mode(0o750)));
        assert_eq!(r.file[0].mode, Some(Mode(0o600)));
        assert!(parse("[[dir]]\npath = \"/a\"\nmode = \"99\"\n").is_err());
        assert!(parse("[[dir]]\npath = \"/a\"\nmode = 0o17777\n").is_err());
    }

    #[test]
    fn image_paths_are_checked() {
        assert!(check_image_path("/etc/motd").is_ok());
        assert!(check_image_path("/").is_ok());
        for bad in ["etc", "/etc/../x", "/etc//x", "/etc/", "/./a", "/a\"b"] {
            assert!(check_image_path(bad).is_err(), "{bad}");
        }
    }

    #[test]
    fn lexical_escape_check() {
        assert!(relative_stays_inside(Path::new("a/b/../c")));
        assert!(!relative_stays_inside(Path::new("a/../../c")));
        assert!(!relative_stays_inside(Path::new("/etc")));
    }
}
