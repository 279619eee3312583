//! The boot flow of PID 1: early mounts, modules, network, assignment, cache, decision,
//! fetch, verify, attach, switch_root. Each step prints a `STRATA stage=...` marker; any
//! failure is an [`InitError`] that `main` turns into a [`Fallback`] decision.

use std::fs;
use std::io;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use ed25519_dalek::VerifyingKey;
use wire::chunk::VerifyError;
use wire::manifest::{Manifest, ManifestError, SignedManifest, MAX_MANIFEST_BYTES};
use wire::report::{NodeState, NodeStatus};

use crate::attach::{self, AttachError};
use crate::bootcount::{self, Choice, Entry, Offer, State, Why};
use crate::cache::{self, Cache, CacheError};
use crate::cmdline::{Cmdline, CmdlineError};
use crate::fetch::{self, chain, FetchError};
use crate::http::{Client, HttpError};
use crate::net::{self, NetError};
use crate::report::Reporter;
use crate::sys::{module, mount, process};
use crate::{info, marker};

/// Where the server's public key is in the initramfs.
pub const KEY_PATH: &str = "/etc/strata/server.pub";
/// The module list written by scripts/build-initramfs.sh (paths, dependency order).
pub const MODULE_LIST: &str = "/lib/modules/strata-modules.list";

/// The module list for the running kernel: `/lib/modules/<release>/strata-modules.list`, from
/// the module archive the server appends for an image's own kernel (docs/node-init.md).
pub fn release_module_list(release: &str) -> String {
    format!("/lib/modules/{release}/strata-modules.list")
}

/// The list to load: the running kernel's if the initramfs has one, else [`MODULE_LIST`]
/// (`scripts/build-initramfs.sh`'s, for the kernel it was built for). `exists` is the file
/// system check, passed in for tests.
pub fn pick_module_list(release: Option<&str>, exists: impl Fn(&str) -> bool) -> String {
    match release
        .map(str::trim)
        .filter(|r| !r.is_empty() && !r.contains('/'))
    {
        Some(r) if exists(&release_module_list(r)) => release_module_list(r),
        _ => MODULE_LIST.to_owned(),
    }
}
/// Runtime directory carried into the image (moved with /run).
pub const RUN_DIR: &str = "/run/strata";
/// Where the cache disk is mounted (inside /run, so the agent finds it after switch_root).
pub const CACHE_MOUNT: &str = "/run/strata/cache";
/// Where the image's root is mounted before switch_root.
pub const NEW_ROOT: &str = "/newroot";
/// The image's init.
pub const IMAGE_INIT: &str = "/sbin/init";

/// A failure of the boot flow.
#[derive(Debug, thiserror::Error)]
pub enum InitError {
    /// Early mounts failed.
    #[error("early mount of {target}")]
    EarlyMount {
        /// Mount point.
        target: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Bad kernel command line.
    #[error(transparent)]
    Cmdline(#[from] CmdlineError),
    /// No `strata.server` on the command line.
    #[error("no strata.server on the kernel command line")]
    NoServer,
    /// The server key is missing or malformed.
    #[error("server key {KEY_PATH}: {0}")]
    Key(String),
    /// Network set-up failed.
    #[error(transparent)]
    Net(#[from] NetError),
    /// The cache disk failed.
    #[error(transparent)]
    Cache(#[from] CacheError),
    /// The manifest could not be fetched (server answered badly).
    #[error("fetching the manifest")]
    ManifestFetch(#[source] HttpError),
    /// The manifest did not verify.
    #[error("manifest refused")]
    Manifest(#[source] ManifestError),
    /// The manifest is for another node.
    #[error("manifest is for MAC {got}, not {want}")]
    ManifestMac {
        /// In the manifest.
        got: String,
        /// Ours.
        want: String,
    },
    /// A staging manifest names another version than the one asked for.
    #[error("asked for version {want}, the server's manifest is version {got}")]
    ManifestVersion {
        /// In the manifest.
        got: u64,
        /// Asked for.
        want: u64,
    },
    /// Nothing to boot.
    #[error("nothing bootable: the server's version cannot be had or booted, and no known good version is cached")]
    NothingToBoot,
    /// A layer is missing and cannot be fetched.
    #[error("layer {id} is not cached and the server is unreachable")]
    LayerMissing {
        /// The layer.
        id: wire::LayerId,
    },
    /// Download failed.
    #[error(transparent)]
    Fetch(#[from] FetchError),
    /// A cached layer is damaged and was not repaired.
    #[error("layer {id} has {bad} damaged chunks that could not be repaired")]
    Corrupt {
        /// The layer.
        id: wire::LayerId,
        /// Damaged chunks.
        bad: usize,
    },
    /// Attach failed.
    #[error(transparent)]
    Attach(#[from] AttachError),
    /// Mounting the image failed.
    #[error("mounting the image root {device}")]
    MountRoot {
        /// The device.
        device: String,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The image has no /sbin/init.
    #[error("image version {version} has no {IMAGE_INIT}")]
    NoInit {
        /// The version.
        version: u64,
    },
    /// switch_root failed.
    #[error("switch_root")]
    SwitchRoot(#[source] io::Error),
}

impl InitError {
    /// A short stable kind for the `STRATA error=<kind>` marker.
    pub fn kind(&self) -> &'static str {
        match self {
            InitError::EarlyMount { .. } => "early_mount",
            InitError::Cmdline(_) => "cmdline",
            InitError::NoServer => "no_server",
            InitError::Key(_) => "key",
            InitError::Net(_) => "net",
            InitError::Cache(_) => "cache",
            InitError::ManifestFetch(_) => "manifest_fetch",
            InitError::Manifest(ManifestError::BadSignature) => "bad_signature",
            InitError::Manifest(_) => "manifest",
            InitError::ManifestMac { .. } => "manifest_mac",
            InitError::ManifestVersion { .. } => "manifest_version",
            InitError::NothingToBoot => "nothing_to_boot",
            InitError::LayerMissing { .. } => "layer_missing",
            InitError::Fetch(FetchError::Verify {
                source: VerifyError::Incomplete { .. } | VerifyError::TooLong { .. },
                ..
            })
            | InitError::Fetch(FetchError::ServerShorter { .. }) => "size_mismatch",
            InitError::Fetch(FetchError::Verify { .. }) => "hash_mismatch",
            InitError::Fetch(FetchError::Cache { .. }) => "cache_write",
            InitError::Fetch(_) => "fetch",
            InitError::Corrupt { .. } => "corrupt",
            InitError::Attach(_) => "attach",
            InitError::MountRoot { .. } => "mount_root",
            InitError::NoInit { .. } => "no_init",
            InitError::SwitchRoot(_) => "switch_root",
        }
    }
}

/// What PID 1 does after a failed attempt.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Fallback {
    /// Try again booting the last known good cached version without asking the server.
    BootLastKnownGood,
    /// Wait, then run the whole flow again.
    RetryAfter(Duration),
    /// Wait, then reboot.
    RebootAfter(Duration),
}

impl std::fmt::Display for Fallback {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Fallback::BootLastKnownGood => write!(f, "boot_last_known_good"),
            Fallback::RetryAfter(d) => write!(f, "retry_after secs={}", d.as_secs()),
            Fallback::RebootAfter(d) => write!(f, "reboot_after secs={}", d.as_secs()),
        }
    }
}

impl From<&InitError> for Fallback {
    fn from(e: &InitError) -> Self {
        match e {
            // Nothing on this boot will fix these: reboot (the server may fix the cmdline).
            InitError::EarlyMount { .. } | InitError::Cmdline(_) | InitError::Key(_) => {
                Fallback::RebootAfter(Duration::from_secs(30))
            }
            // No cache at all: nothing known good to fall back on.
            InitError::Cache(_) | InitError::NothingToBoot => {
                Fallback::RetryAfter(Duration::from_secs(10))
            }
            // The pseudo file systems may already be moved: start clean.
            InitError::SwitchRoot(_) => Fallback::RebootAfter(Duration::from_secs(10)),
            // The new assignment cannot be had or trusted, or its chain does not boot:
            // the cached known good version can.
            _ => Fallback::BootLastKnownGood,
        }
    }
}

/// How this attempt runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Ask the server.
    Normal,
    /// Do not ask the server: boot the last known good cached version.
    LastKnownGood,
}

/// What stays set up across attempts (PID 1 does these once).
#[derive(Default)]
pub struct Env {
    early_done: bool,
    modules_done: bool,
    cmdline: Option<Cmdline>,
    iface: Option<String>,
    cache: Option<Cache>,
    reporter: Option<Reporter>,
    /// Consecutive attempts that failed on a damaged cache file system.
    cache_damage: u32,
}

/// Mounts /proc, /sys, /dev (devtmpfs), /run (tmpfs).
pub fn early_mounts() -> Result<(), InitError> {
    let m = |src: &str, target: &str, fs: &str, flags, data| {
        let t = Path::new(target);
        let _ = fs::create_dir_all(t);
        if mount::is_mount_point(t) {
            return Ok(());
        }
        mount::mount(src, t, fs, flags, data).map_err(|source| InitError::EarlyMount {
            target: target.into(),
            source,
        })
    };
    let nosuid = mount::MS_NOSUID | mount::MS_NODEV | mount::MS_NOEXEC;
    m("proc", "/proc", "proc", nosuid, None)?;
    m("sysfs", "/sys", "sysfs", nosuid, None)?;
    m(
        "devtmpfs",
        "/dev",
        "devtmpfs",
        mount::MS_NOSUID,
        Some("mode=0755"),
    )?;
    m(
        "tmpfs",
        "/run",
        "tmpfs",
        mount::MS_NOSUID | mount::MS_NODEV,
        Some("mode=0755"),
    )?;
    Ok(())
}

/// Loads the modules listed in the running kernel's list ([`pick_module_list`]), in order.
/// Returns the list's path and how many loaded and failed. Failures are printed, not fatal (a
/// module may be built in, or not needed on this machine).
pub fn load_modules() -> (String, usize, usize) {
    let release = fs::read_to_string("/proc/sys/kernel/osrelease").ok();
    let path = pick_module_list(release.as_deref(), |p| Path::new(p).is_file());
    let Ok(list) = fs::read_to_string(&path) else {
        info!("no module list at {path}");
        return (path, 0, 0);
    };
    let (mut ok, mut failed) = (0, 0);
    for line in list
        .lines()
        .map(str::trim)
        .filter(|l| !l.is_empty() && !l.starts_with('#'))
    {
        match module::load_module(Path::new(line)) {
            Ok(_) => ok += 1,
            Err(e) => {
                failed += 1;
                info!("module {line}: {e}");
            }
        }
    }
    (path, ok, failed)
}

fn read_key() -> Result<VerifyingKey, InitError> {
    let text = fs::read_to_string(KEY_PATH).map_err(|e| InitError::Key(e.to_string()))?;
    wire::manifest::parse_verifying_key(&text).map_err(|e| InitError::Key(e.to_string()))
}

fn why_text(w: &Why) -> String {
    match w {
        Why::New => "new".into(),
        Why::Confirmed => "confirmed".into(),
        Why::Trying { attempt, of } => format!("try attempt={attempt} tries={of}"),
        Why::Rollback { from } => format!("rollback from={}", from.version),
        Why::Offline => "offline".into(),
        Why::KnownGood => "known_good".into(),
    }
}

/// Fetches and verifies this node's manifest. `Ok(None)`: the server is unreachable.
pub fn fetch_manifest(
    client: &Client,
    mac: &str,
    key: &VerifyingKey,
) -> Result<Option<(SignedManifest, Manifest)>, InitError> {
    get_manifest(
        client,
        mac,
        key,
        format!("/api/v1/nodes/by-mac/{mac}/manifest"),
    )
}

/// Fetches and verifies version `version` of this node's image (`?version=`, for staging).
pub fn fetch_manifest_version(
    client: &Client,
    mac: &str,
    key: &VerifyingKey,
    version: u64,
) -> Result<Option<(SignedManifest, Manifest)>, InitError> {
    let path = format!("/api/v1/nodes/by-mac/{mac}/manifest?version={version}");
    let got = get_manifest(client, mac, key, path)?;
    if let Some((_, m)) = &got {
        if m.version != version {
            return Err(InitError::ManifestVersion {
                got: m.version,
                want: version,
            });
        }
    }
    Ok(got)
}

fn get_manifest(
    client: &Client,
    mac: &str,
    key: &VerifyingKey,
    path: String,
) -> Result<Option<(SignedManifest, Manifest)>, InitError> {
    let mut last = None;
    for _ in 0..3 {
        match client.get_bytes(&path, MAX_MANIFEST_BYTES) {
            Ok(bytes) => {
                let signed = SignedManifest::from_json(&bytes).map_err(InitError::Manifest)?;
                let m = signed.verify(key).map_err(InitError::Manifest)?;
                if m.mac != mac {
                    return Err(InitError::ManifestMac {
                        got: m.mac,
                        want: mac.into(),
                    });
                }
                return Ok(Some((signed, m)));
            }
            Err(e) if e.is_unreachable() => {
                info!("server {}: {}", client.addr(), chain(&e));
                last = Some(e);
                std::thread::sleep(Duration::from_secs(1));
            }
            Err(e) => return Err(InitError::ManifestFetch(e)),
        }
    }
    drop(last);
    Ok(None)
}

/// Makes sure every layer of `m` is cached and intact: downloads what is missing, verifies
/// every chunk, re-fetches damaged chunks. Never leaves an unverified layer to boot.
pub fn ensure_layers(
    cache: &Cache,
    client: Option<&Client>,
    m: &Manifest,
) -> Result<(u64, u64), InitError> {
    let mut fetched = 0;
    for l in &m.layers {
        if cache.has_layer(l) {
            continue;
        }
        let Some(client) = client else {
            return Err(InitError::LayerMissing { id: l.id });
        };
        // A multicast session offered for the layer first; HTTP for whatever it left.
        if let Some(offer) = m.multicast_offer(&l.id) {
            match crate::mcast::fetch_layer(client, cache, l, offer) {
                Ok(_) => continue,
                Err(e) => info!(
                    "layer {}: multicast: {}; HTTP for the rest",
                    l.id,
                    fetch::chain(&e)
                ),
            }
        }
        let stats = fetch::fetch_layer(client, cache, l, |_| {})?;
        marker!(
            "stage=fetch layer={} bytes={} resumed_from={} size={}",
            l.id,
            stats.received,
            stats.resumed_from,
            l.size
        );
        fetched += stats.received;
    }
    let t0 = Instant::now();
    let mut total = 0;
    let mut repaired = 0;
    for l in &m.layers {
        let bad = cache.verify_layer(l)?;
        total += l.size;
        if bad.is_empty() {
            continue;
        }
        marker!(
            "error=corrupt layer={} chunks={} first={}",
            l.id,
            bad.len(),
            bad[0]
        );
        let Some(client) = client else {
            return Err(InitError::Corrupt {
                id: l.id,
                bad: bad.len(),
            });
        };
        let bytes = fetch::repair_chunks(client, cache, l, &bad)?;
        let still = cache.verify_layer(l)?;
        if !still.is_empty() {
            return Err(InitError::Corrupt {
                id: l.id,
                bad: still.len(),
            });
        }
        marker!(
            "stage=repair layer={} chunks={} bytes={}",
            l.id,
            bad.len(),
            bytes
        );
        repaired += bytes;
    }
    marker!(
        "stage=verify layers={} bytes={} ms={}",
        m.layers.len(),
        total,
        t0.elapsed().as_millis()
    );
    Ok((fetched, repaired))
}

/// Files the agent needs after switch_root, in /run/strata (moved into the image).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct BootInfo {
    /// Server address, if known.
    pub server: Option<SocketAddr>,
    /// Boot MAC.
    pub mac: String,
    /// The entry booted.
    pub entry: Entry,
    /// The agent's report interval in seconds (`strata.agent=`), if set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agent_interval: Option<u64>,
}

/// The reporter's state handed to the agent (`/run/strata/reporter.json`): the agent goes on
/// with deltas from this boot's last acknowledged report instead of opening a new report
/// session, which the server would take for a new boot (and so for a reboot done).
pub const REPORTER_FILE: &str = "reporter.json";

fn write_run_files(info: &BootInfo, reporter: &Reporter) -> io::Result<()> {
    let dir = Path::new(RUN_DIR);
    fs::create_dir_all(dir)?;
    cache::write_atomic(
        dir,
        "boot.json",
        &serde_json::to_vec_pretty(info).map_err(io::Error::other)?,
    )?;
    cache::write_atomic(
        dir,
        REPORTER_FILE,
        &serde_json::to_vec(reporter).map_err(io::Error::other)?,
    )?;
    fs::copy(KEY_PATH, dir.join("server.pub"))?;
    // The agent is this binary; the initramfs is freed by switch_root, so keep a copy.
    fs::copy("/proc/self/exe", dir.join("node-init"))?;
    Ok(())
}

fn status_now(
    state: &State,
    s: NodeState,
    cache_layers: Vec<wire::LayerId>,
    msg: Option<String>,
) -> NodeStatus {
    NodeStatus {
        state: s,
        role: state.current.as_ref().map(|e| e.role.clone()),
        version: state.current.as_ref().map(|e| e.version),
        last_known_good: state.last_known_good.as_ref().map(|e| e.version),
        boot_count: state.boot_count,
        cached_layers: cache_layers,
        drift: Vec::new(),
        message: msg,
    }
}

/// Where a node layer keeps the node's bearer token (inside the image).
pub const NODE_TOKEN: &str = "etc/strata/token";

/// Copies the node's token from the mounted image (`<root>/etc/strata/token`) into the cache
/// (0600), so the next boot's reports before switch_root carry it. Best effort.
fn keep_token(cache: &Cache, root: &Path) {
    let Ok(text) = fs::read_to_string(root.join(NODE_TOKEN)) else {
        return;
    };
    match crate::http::parse_token(&text) {
        Some(t) => match cache.save_token(&t) {
            Ok(true) => info!("node token kept in the cache for early reports"),
            Ok(false) => {}
            Err(e) => info!("node token not kept: {}", chain(&e)),
        },
        None => info!("{NODE_TOKEN} in the image is not a usable token; ignored"),
    }
}

/// One attempt of the boot flow. Returns only on failure (success execs the image's init).
/// Counts consecutive failures on a damaged cache file system (the second one reformats it).
pub fn run(env: &mut Env, mode: Mode) -> Result<std::convert::Infallible, InitError> {
    let r = run_once(env, mode);
    if let Err(e) = &r {
        let damaged = match e {
            InitError::Cache(c) => cache::is_damage(c),
            InitError::Fetch(FetchError::Cache { source, .. }) => cache::is_damage(source),
            _ => false,
        };
        env.cache_damage = if damaged { env.cache_damage + 1 } else { 0 };
    }
    r
}

fn run_once(env: &mut Env, mode: Mode) -> Result<std::convert::Infallible, InitError> {
    if !env.early_done {
        early_mounts()?;
        env.early_done = true;
        marker!("stage=init pid={}", process::getpid());
    }
    if !env.modules_done {
        let (list, ok, failed) = load_modules();
        env.modules_done = true;
        marker!("stage=modules list={list} loaded={ok} failed={failed}");
    }
    let cmd = match &env.cmdline {
        Some(c) => c.clone(),
        None => {
            let text = fs::read_to_string("/proc/cmdline").unwrap_or_default();
            let c = Cmdline::parse(&text)?;
            env.cmdline = Some(c.clone());
            c
        }
    };
    let key = read_key()?;
    let server = cmd.server.ok_or(InitError::NoServer)?;
    if env.iface.is_none() {
        let iface = net::find_interface(cmd.mac.as_deref(), Duration::from_secs(10))?;
        match cmd.ip {
            Some(ip) => {
                let mask = cmd.netmask.unwrap_or(Ipv4Addr::new(255, 255, 255, 0));
                net::configure_static(&iface, ip, mask, cmd.gw)?;
                marker!(
                    "stage=net iface={iface} ip={ip} netmask={mask} server={server} via=static"
                );
            }
            None => {
                let hw = net::interfaces()
                    .into_iter()
                    .find(|(n, _)| *n == iface)
                    .map(|(_, m)| m);
                let lease =
                    net::configure_dhcp(&iface, &hw.unwrap_or_default(), Duration::from_secs(60))?;
                marker!(
                    "stage=net iface={iface} ip={} netmask={} server={server} via=dhcp dhcp_server={}",
                    lease.ip,
                    lease.netmask,
                    lease.server
                );
            }
        }
        env.iface = Some(iface);
    }
    let mac = match &cmd.mac {
        Some(m) => m.clone(),
        None => {
            let iface = env.iface.clone().unwrap_or_default();
            net::interfaces()
                .into_iter()
                .find(|(n, _)| *n == iface)
                .map(|(_, m)| m)
                .unwrap_or_default()
        }
    };
    // A cache whose file system keeps failing with I/O errors is made again (only a cache).
    let reformat = env.cache_damage >= 2;
    if reformat {
        if let Some(_old) = env.cache.take() {
            let _ = mount::umount(Path::new(CACHE_MOUNT));
        }
        env.cache_damage = 0;
    }
    let cache = match &env.cache {
        Some(c) => c.clone(),
        None => {
            let mnt = Path::new(CACHE_MOUNT);
            let (device, formatted) = cache::prepare_disk(cmd.disk.as_deref(), mnt, reformat)?;
            let c = Cache::open(mnt)?;
            marker!("stage=cache device={device} formatted={formatted}");
            env.cache = Some(c.clone());
            c
        }
    };
    // The token a previous boot kept from the node layer: early reports are authenticated.
    let client = Client::new(SocketAddr::V4(server)).with_token(cache.load_token().as_deref());
    let reporter = env.reporter.get_or_insert_with(|| Reporter::new(&mac));
    let state = cache.load_state();

    // The server's word, unless told to boot last known good.
    let mut offered = None;
    let offer = if mode == Mode::LastKnownGood || cmd.lkg_only {
        Offer::Unreachable
    } else {
        match fetch_manifest(&client, &mac, &key)? {
            Some((signed, m)) => {
                marker!(
                    "stage=manifest version={} role={} image={} layers={}",
                    m.version,
                    m.role,
                    m.image,
                    m.layers.len()
                );
                let entry = Entry::of(&m);
                cache.store_manifest(&entry, &signed)?;
                let tries = m.boot_tries;
                offered = Some(m);
                Offer::Assigned { entry, tries }
            }
            None => {
                marker!("error=unreachable server={server}");
                Offer::Unreachable
            }
        }
    };
    let online = matches!(offer, Offer::Assigned { .. });
    let (choice, next_state) = bootcount::decide(&state, &offer, |e| cache.has_entry(e, &key));
    let Choice::Boot { entry, why } = choice else {
        return Err(InitError::NothingToBoot);
    };
    marker!(
        "stage=decide version={} role={} why={}",
        entry.version,
        entry.role,
        why_text(&why)
    );
    if matches!(why, Why::Offline) {
        info!(
            "server unreachable: booting cached version {} of role {}",
            entry.version, entry.role
        );
    }
    let manifest = match offered.filter(|m| Entry::of(m) == entry) {
        Some(m) => m,
        None => cache.load_manifest(&entry, &key)?,
    };
    let c = online.then_some(&client);
    if online {
        let _ = reporter.send(
            &client,
            &status_now(&next_state, NodeState::Fetching, Vec::new(), None),
        );
    }
    // Diskless over iSCSI: the server serves the chain; nothing is fetched.
    if cmd.iscsi.is_none() {
        ensure_layers(&cache, c, &manifest)?;
    }
    cache.save_state(&next_state)?;
    // Keep the layers of the versions the node may return to.
    let mut keep: Vec<wire::LayerId> = manifest.layers.iter().map(|l| l.id).collect();
    for e in [&next_state.previous, &next_state.last_known_good]
        .into_iter()
        .flatten()
    {
        if let Ok(m) = cache.load_manifest(e, &key) {
            keep.extend(m.layers.iter().map(|l| l.id));
        }
    }
    if let Some(limit) = crate::sys::fs_limit(cache.root()) {
        if let Ok(freed) = cache.evict(&keep, limit) {
            if freed > 0 {
                info!("evicted {freed} bytes from the cache");
            }
        }
    }
    let state_kind = match why {
        Why::Offline => NodeState::Offline,
        Why::Rollback { .. } => NodeState::RolledBack,
        _ => NodeState::Booted,
    };
    let layers: Vec<wire::LayerId> = manifest.layers.iter().map(|l| l.id).collect();
    if online {
        let _ = reporter.send(&client, &status_now(&next_state, state_kind, layers, None));
    }
    let handed = reporter.clone();
    write_run_files(
        &BootInfo {
            server: Some(SocketAddr::V4(server)),
            mac: mac.clone(),
            entry: entry.clone(),
            agent_interval: cmd.agent_interval,
        },
        &handed,
    )
    .map_err(|source| InitError::EarlyMount {
        target: RUN_DIR.into(),
        source,
    })?;

    // The cache as this boot leaves it is on the disk before the image runs.
    process::sync();
    // A previous attempt of this boot may have left the image mounted.
    let _ = mount::umount(Path::new(NEW_ROOT));
    let paths: Vec<PathBuf> = manifest
        .layers
        .iter()
        .map(|l| cache.layer_path(&l.id))
        .collect();
    // `_attached` keeps the loop devices of a local attach until switch_root.
    let (_attached, dev) = match cmd.iscsi {
        Some(portal) => {
            let boot = crate::iscsi::IscsiBoot {
                portal,
                secret: cmd.iscsi_secret.clone(),
            };
            let dev = crate::iscsi::attach(&boot, &mac, Duration::from_secs(30))
                .map_err(AttachError::from)?;
            marker!(
                "stage=attach device={} via=iscsi portal={portal}",
                dev.display()
            );
            (None, dev.to_string_lossy().into_owned())
        }
        None => {
            let attached = attach::attach(&paths, &cache.root().join("cow"))?;
            marker!(
                "stage=attach device={} size={} targets={}",
                attached.root.display(),
                attached.size,
                attached.targets
            );
            let dev = attached.root.to_string_lossy().into_owned();
            (Some(attached), dev)
        }
    };
    let new_root = Path::new(NEW_ROOT);
    let _ = fs::create_dir_all(new_root);
    mount::mount(&dev, new_root, "ext4", 0, None).map_err(|source| InitError::MountRoot {
        device: dev.clone(),
        source,
    })?;
    keep_token(&cache, new_root);
    // A chain without an init is a bad image, not a reason to reboot: check before moving
    // anything (after the moves there is no way back).
    if fs::symlink_metadata(new_root.join(IMAGE_INIT.trim_start_matches('/'))).is_err() {
        return Err(InitError::NoInit {
            version: entry.version,
        });
    }
    marker!(
        "stage=switch_root version={} role={} image={}",
        entry.version,
        entry.role,
        entry.image
    );
    let err = crate::switch_root::switch_root(new_root, IMAGE_INIT);
    Err(InitError::SwitchRoot(err))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_running_kernels_module_list_wins_when_present() {
        let have = |p: &str| p == "/lib/modules/6.1.0-56-cloud-amd64/strata-modules.list";
        assert_eq!(
            pick_module_list(Some("6.1.0-56-cloud-amd64\n"), have),
            "/lib/modules/6.1.0-56-cloud-amd64/strata-modules.list"
        );
        // Another kernel, no release, or a hostile one: the initramfs's own list.
        assert_eq!(pick_module_list(Some("6.1.0-56-amd64"), have), MODULE_LIST);
        assert_eq!(pick_module_list(None, have), MODULE_LIST);
        assert_eq!(pick_module_list(Some(""), |_| true), MODULE_LIST);
        assert_eq!(pick_module_list(Some("../../x"), |_| true), MODULE_LIST);
    }
}
