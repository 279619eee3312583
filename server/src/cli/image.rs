//! `strata image ...`: build images from recipes, list and inspect them, diff two versions,
//! remove versions, collect unreferenced layers, and make node layers. `--json` prints
//! machine-readable output for scripts.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use anyhow::{bail, Context};

use crate::build::{self, ext4, BuildOptions, NodeFacts, Progress};
use crate::store::{ImageVersion, Store};

/// `strata image` subcommands.
#[derive(Debug, clap::Subcommand)]
pub enum ImageCmd {
    /// Build a base (or update) recipe and the roles on it; prints the version.
    Build {
        /// Recipe directory (or recipe.toml).
        recipe: PathBuf,
        /// Where role recipes are (default: `roles/` beside the recipe's directory).
        #[arg(long)]
        roles: Option<PathBuf>,
        #[command(flatten)]
        common: Common,
    },
    /// List images and versions.
    List {
        #[command(flatten)]
        common: Common,
    },
    /// Show one version: chain, sizes, hashes, kernel and its module archive, recipe.
    Inspect {
        /// `image` (newest version) or `image:version`.
        image: String,
        /// A role's chain instead of the base.
        #[arg(long)]
        role: Option<String>,
        /// The role's site.
        #[arg(long)]
        site: Option<String>,
        /// Also print the recipes.
        #[arg(long)]
        recipe: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Files changed between two versions (or roles): `image:1 image:2`.
    Diff {
        /// Old `image:version`.
        old: String,
        /// New `image:version`.
        new: String,
        /// Compare this role's chains.
        #[arg(long)]
        role: Option<String>,
        #[command(flatten)]
        common: Common,
    },
    /// Remove a version from the catalog (its layers go at the next gc).
    Rm {
        /// `image:version`.
        image: String,
        #[command(flatten)]
        common: Common,
    },
    /// Delete layers, kernels and caches nothing references.
    Gc {
        /// Only report what would go.
        #[arg(long)]
        dry_run: bool,
        #[command(flatten)]
        common: Common,
    },
    /// Build (or find) the node layer of one node on a role.
    Node {
        /// `image` or `image:version`.
        image: String,
        /// Role.
        #[arg(long)]
        role: String,
        /// Host name.
        #[arg(long)]
        hostname: String,
        /// MAC address.
        #[arg(long)]
        mac: String,
        /// Static address (CIDR); DHCP without.
        #[arg(long)]
        ip: Option<String>,
        /// Gateway for the static address.
        #[arg(long)]
        gateway: Option<String>,
        /// Node id (default: the MAC).
        #[arg(long)]
        node_id: Option<String>,
        /// Identity token.
        #[arg(long, default_value = "none")]
        token: String,
        #[command(flatten)]
        common: Common,
    },
}

/// Options every subcommand takes.
#[derive(Debug, clap::Args)]
pub struct Common {
    /// The store directory.
    #[arg(long, env = "STRATA_STORE", default_value = "strata-data/store")]
    pub store: PathBuf,
    /// Print JSON.
    #[arg(long)]
    pub json: bool,
}

struct Bar(indicatif::ProgressBar);

impl Progress for Bar {
    fn stage(&self, what: &str) {
        self.0.set_message(what.to_owned());
        self.0.tick();
    }
}

fn open(c: &Common) -> anyhow::Result<Store> {
    Store::open(&c.store).with_context(|| format!("opening the store at {}", c.store.display()))
}

/// What a layer costs on the server's disk and on the wire (`inspect`).
#[derive(Debug, serde::Serialize)]
struct LayerTransfer {
    /// The layer.
    id: wire::LayerId,
    /// File size.
    size: u64,
    /// Bytes allocated on disk (the store writes layers sparse).
    allocated: u64,
    /// Bytes a node fetches for a fresh copy: the sum of the layer's data extents
    /// (`GET /layers/{id}/extents`).
    transfer: u64,
    /// How many extents.
    extents: usize,
}

fn layer_transfers(store: &Store, iv: &ImageVersion) -> anyhow::Result<Vec<LayerTransfer>> {
    iv.layers
        .iter()
        .map(|l| {
            let path = store.layer_path(&l.id);
            let (ext, allocated) = crate::http::layers::layer_extents(&path, l.id)
                .with_context(|| format!("reading the extents of {}", path.display()))?;
            Ok(LayerTransfer {
                id: l.id,
                size: ext.size(),
                allocated,
                transfer: ext.data_bytes(),
                extents: ext.ranges().len(),
            })
        })
        .collect()
}

fn parse_ref(store: &Store, s: &str) -> anyhow::Result<(String, u64)> {
    match s.split_once(':') {
        Some((i, v)) => Ok((
            i.to_owned(),
            v.parse()
                .with_context(|| format!("version {v:?} is not a number"))?,
        )),
        None => {
            let v = store
                .catalog()
                .latest_version(s)?
                .with_context(|| format!("image {s:?} has no versions"))?;
            Ok((s.to_owned(), v))
        }
    }
}

fn human(n: u64) -> String {
    const U: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut f = n as f64;
    let mut i = 0;
    while f >= 1024.0 && i + 1 < U.len() {
        f /= 1024.0;
        i += 1;
    }
    if i == 0 {
        format!("{n} B")
    } else {
        format!("{f:.1} {}", U[i])
    }
}

fn print_json(v: &impl serde::Serialize) -> anyhow::Result<()> {
    println!("{}", serde_json::to_string_pretty(v)?);
    Ok(())
}

/// Runs a `strata image` subcommand.
pub fn run(cmd: ImageCmd) -> anyhow::Result<ExitCode> {
    match cmd {
        ImageCmd::Build {
            recipe,
            roles,
            common,
        } => {
            let store = open(&common)?;
            let bar = indicatif::ProgressBar::new_spinner();
            if common.json || !std::io::IsTerminal::is_terminal(&std::io::stderr()) {
                bar.set_draw_target(indicatif::ProgressDrawTarget::hidden());
            }
            bar.enable_steady_tick(std::time::Duration::from_millis(120));
            let progress = Bar(bar.clone());
            let t = std::time::Instant::now();
            let built = build::build(
                &store,
                &recipe,
                &BuildOptions {
                    roles_dir: roles,
                    progress: &progress,
                },
            );
            bar.finish_and_clear();
            let built = built?;
            for note in &built.notes {
                eprintln!("note: {note}");
            }
            if common.json {
                print_json(&built)?;
            } else {
                println!(
                    "{} version {} {} in {:.2}s",
                    built.image,
                    built.version,
                    if built.reused {
                        "already built"
                    } else {
                        "built"
                    },
                    t.elapsed().as_secs_f64()
                );
                println!("  base   {}  {:>10}", built.base.id, human(built.base.size));
                for (role, site, l) in &built.roles {
                    let name = if site.is_empty() {
                        role.clone()
                    } else {
                        format!("{role}@{site}")
                    };
                    println!("  {name:<6} {}  {:>10}", l.id, human(l.size));
                }
                if let Some(k) = &built.kernel {
                    println!("  kernel {} ({})", k.id, k.release);
                    if let Some(m) = &k.modules {
                        println!("  modules {}  {:>10}", m.id, human(m.size));
                    }
                }
            }
        }
        ImageCmd::List { common } => {
            let store = open(&common)?;
            let versions = store.catalog().versions(None)?;
            if common.json {
                print_json(&versions)?;
            } else {
                println!(
                    "{:<16} {:>7}  {:<16} {:<20} created",
                    "IMAGE", "VERSION", "BASE", "ROLES"
                );
                for v in versions {
                    let roles: Vec<String> = v
                        .roles
                        .iter()
                        .map(|r| {
                            if r.site.is_empty() {
                                r.role.clone()
                            } else {
                                format!("{}@{}", r.role, r.site)
                            }
                        })
                        .collect();
                    println!(
                        "{:<16} {:>7}  {:<16} {:<20} {}",
                        v.image,
                        v.version,
                        &v.base.to_hex()[..16],
                        roles.join(","),
                        v.created
                    );
                }
            }
        }
        ImageCmd::Inspect {
            image,
            role,
            site,
            recipe,
            common,
        } => {
            let store = open(&common)?;
            let (name, version) = parse_ref(&store, &image)?;
            let iv = store
                .image_version(&name, version, role.as_deref(), site.as_deref())?
                .with_context(|| {
                    format!(
                        "{name}:{version}{} not found",
                        role.as_deref()
                            .map(|r| format!(" role {r}"))
                            .unwrap_or_default()
                    )
                })?;
            let info = store
                .catalog()
                .version(&name, version)?
                .context("version vanished")?;
            let transfer = layer_transfers(&store, &iv)?;
            if common.json {
                #[derive(serde::Serialize)]
                struct Out<'a> {
                    #[serde(flatten)]
                    iv: &'a ImageVersion,
                    transfer: &'a [LayerTransfer],
                    roles: &'a [crate::store::RoleInfo],
                    inputs: &'a str,
                    recipe: &'a str,
                }
                print_json(&Out {
                    iv: &iv,
                    transfer: &transfer,
                    roles: &info.roles,
                    inputs: &info.inputs,
                    recipe: &info.recipe,
                })?;
            } else {
                println!(
                    "{}:{} {}",
                    iv.image,
                    iv.version,
                    iv.role
                        .as_deref()
                        .map(|r| format!("role {r}"))
                        .unwrap_or_else(|| "base".into())
                );
                println!("chain (base first):");
                for (l, t) in iv.layers.iter().zip(&transfer) {
                    println!(
                        "  {:<5} {}  {:>10} file, {:>10} on disk, {:>10} sent to a node \
                         ({} extents), {:>10} virtual, {} chunks",
                        format!("{:?}", l.kind).to_lowercase(),
                        l.id,
                        human(l.size),
                        human(t.allocated),
                        human(t.transfer),
                        t.extents,
                        human(l.virtual_size),
                        l.chunks.len()
                    );
                }
                if let Some(k) = &iv.kernel {
                    println!(
                        "kernel: {} {} ({}) at {}",
                        k.release,
                        k.id,
                        human(k.size),
                        k.path.display()
                    );
                    match &k.modules {
                        Some(m) => println!(
                            "modules for node-init: {} ({}) at {}",
                            m.id,
                            human(m.size),
                            m.path.display()
                        ),
                        None => println!(
                            "modules for node-init: none recorded (built before Strata recorded \
                             them: nodes boot the configured kernel and initramfs)"
                        ),
                    }
                }
                println!("roles of this version:");
                for r in &info.roles {
                    println!(
                        "  {:<12} {:<8} {}",
                        r.role,
                        if r.site.is_empty() { "-" } else { &r.site },
                        r.layer
                    );
                }
                println!("inputs: {}", info.inputs);
                if recipe {
                    println!("--- base recipe ---\n{}", info.recipe);
                    for r in &info.roles {
                        if role.as_deref().is_none_or(|x| x == r.role) && r.site.is_empty() {
                            println!("--- role {} ---\n{}", r.role, r.recipe);
                        }
                    }
                }
            }
        }
        ImageCmd::Diff {
            old,
            new,
            role,
            common,
        } => {
            let store = open(&common)?;
            let (a_name, a_v) = parse_ref(&store, &old)?;
            let (b_name, b_v) = parse_ref(&store, &new)?;
            let a = store
                .image_version(&a_name, a_v, role.as_deref(), None)?
                .with_context(|| format!("{old} not found"))?;
            let b = store
                .image_version(&b_name, b_v, role.as_deref(), None)?
                .with_context(|| format!("{new} not found"))?;
            let changes = diff(&store, &a, &b)?;
            if common.json {
                print_json(&changes)?;
            } else {
                for (p, c) in &changes {
                    println!("{c} {p}");
                }
                eprintln!("{} paths changed", changes.len());
            }
        }
        ImageCmd::Rm { image, common } => {
            let store = open(&common)?;
            let Some((name, v)) = image.split_once(':') else {
                bail!("give image:version")
            };
            let v: u64 = v.parse().context("version")?;
            if !store.catalog().remove_version(name, v)? {
                bail!("{image} not found");
            }
            if common.json {
                print_json(&serde_json::json!({ "removed": image }))?;
            } else {
                println!("removed {image}; run `strata image gc` to delete its layers");
            }
        }
        ImageCmd::Gc { dry_run, common } => {
            let store = open(&common)?;
            let r = store.gc(dry_run)?;
            if common.json {
                print_json(&r)?;
            } else {
                let verb = if dry_run { "would remove" } else { "removed" };
                for l in &r.layers {
                    println!("{verb} layer {l}");
                }
                for b in &r.blobs {
                    println!("{verb} blob {b}");
                }
                println!(
                    "{verb} {} layers, {} blobs, {} cache files: {}",
                    r.layers.len(),
                    r.blobs.len(),
                    r.cache_files,
                    human(r.bytes)
                );
            }
        }
        ImageCmd::Node {
            image,
            role,
            hostname,
            mac,
            ip,
            gateway,
            node_id,
            token,
            common,
        } => {
            let store = open(&common)?;
            let (name, v) = parse_ref(&store, &image)?;
            let iv = store
                .image_version(&name, v, Some(&role), None)?
                .with_context(|| format!("{name}:{v} has no role {role}"))?;
            let facts = NodeFacts {
                hostname,
                node_id: node_id.unwrap_or_else(|| mac.clone()),
                mac,
                ip,
                gateway,
                token,
            };
            let rec = build::node_layer(&store, &iv, &facts)?;
            if common.json {
                print_json(&rec)?;
            } else {
                println!(
                    "node layer {} ({}) on {}",
                    rec.id,
                    human(rec.size),
                    rec.parent.map(|p| p.to_hex()).unwrap_or_default()
                );
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

/// One file's state in a version: type+mode, owner, and content digest or link target.
type FileState = (u32, u32, u32, String);

/// Paths that differ between two versions: `A` added, `D` deleted, `M` content changed,
/// `m` mode or owner changed.
pub fn diff(
    store: &Store,
    a: &ImageVersion,
    b: &ImageVersion,
) -> anyhow::Result<BTreeMap<String, char>> {
    let scratch = store.scratch("diff")?;
    let ta = tree_state(store, a, &scratch.path().join("a"))?;
    let tb = tree_state(store, b, &scratch.path().join("b"))?;
    let mut out = BTreeMap::new();
    for (p, sa) in &ta {
        match tb.get(p) {
            None => {
                out.insert(p.clone(), 'D');
            }
            Some(sb) if sa.3 != sb.3 || (sa.0 & 0o170000) != (sb.0 & 0o170000) => {
                out.insert(p.clone(), 'M');
            }
            Some(sb) if sa != sb => {
                out.insert(p.clone(), 'm');
            }
            Some(_) => {}
        }
    }
    for p in tb.keys() {
        if !ta.contains_key(p) {
            out.insert(p.clone(), 'A');
        }
    }
    Ok(out)
}

fn tree_state(
    store: &Store,
    v: &ImageVersion,
    dir: &Path,
) -> anyhow::Result<BTreeMap<String, FileState>> {
    std::fs::create_dir_all(dir)?;
    let raw = build::layer::cached_raw(store, &v.layers, dir)?;
    let mut out = BTreeMap::new();
    let mut todo = vec!["/".to_owned()];
    while !todo.is_empty() {
        let dirs: Vec<String> = std::mem::take(&mut todo);
        let listed = ext4::list_dirs(&raw, &dirs, dir)?;
        let mut files = Vec::new();
        for (d, entries) in dirs.iter().zip(listed) {
            for e in entries.unwrap_or_default() {
                if d == "/" && e.name == "lost+found" {
                    continue;
                }
                let p = build::ops::join(d, &e.name);
                if e.is_dir() {
                    todo.push(p.clone());
                } else {
                    files.push(p.clone());
                }
                out.insert(p, (e.mode, e.uid, e.gid, String::new()));
            }
        }
        // Content digests: dump the regular files and symlinks of this level in one session.
        let mut script = ext4::Script::default();
        let mut dumped = Vec::new();
        for (i, p) in files.iter().enumerate() {
            let host = dir.join(format!("f{i}"));
            script.line(format!(
                "dump {} {}",
                ext4::quote(p)?,
                ext4::quote(&host.display().to_string())?
            ));
            dumped.push((p.clone(), host));
        }
        if !dumped.is_empty() {
            // Symlinks and device nodes fail to dump; they compare by mode and `stat`.
            let _ = ext4::debugfs(&raw, false, &script, dir);
        }
        for (p, host) in dumped {
            if let Ok(bytes) = std::fs::read(&host) {
                if let Some(s) = out.get_mut(&p) {
                    s.3 = blake3::hash(&bytes).to_hex().to_string();
                }
                let _ = std::fs::remove_file(&host);
            }
        }
    }
    Ok(out)
}
