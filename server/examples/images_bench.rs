//! Image builder benchmark: prints the time to build the busybox base and its roles, the time
//! and size of 1,000 node layers, and a role layer built on a 1 GiB base (and what a node's
//! download of it moves), each with the figure of a peer measured in the same run (see
//! docs/benchmarks.md).
//!
//! `cargo run --release -p strata-server --example images_bench [-- NODES [WORKDIR [nodes]]]`
//! (`nodes`: stop after the node layers, for profiling them).

use std::fs;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::Instant;

use std::sync::Arc;

use anyhow::{bail, Context, Result};
use strata_server::build::{self, BuildOptions, NodeFacts};
use strata_server::fleet::{FleetError, ImageChain, ImageSource, NodeRecord};
use strata_server::orchestrator::{Options, Orchestrator};
use strata_server::store::Store;
use wire::LayerId;

fn run(cmd: &mut Command) -> Result<()> {
    let o = cmd.output().with_context(|| format!("{cmd:?}"))?;
    if !o.status.success() {
        bail!("{cmd:?}: {}", String::from_utf8_lossy(&o.stderr));
    }
    Ok(())
}

fn du(path: &Path) -> Result<u64> {
    let o = Command::new("du").args(["-s", "-B1"]).arg(path).output()?;
    Ok(String::from_utf8_lossy(&o.stdout)
        .split_whitespace()
        .next()
        .unwrap_or("0")
        .parse()?)
}

/// Records when each build stage starts.
#[derive(Default)]
struct Stages(std::sync::Mutex<Vec<(String, Instant)>>);

impl build::Progress for Stages {
    fn stage(&self, what: &str) {
        self.0
            .lock()
            .unwrap()
            .push((what.to_owned(), Instant::now()));
    }
}

impl Stages {
    /// Seconds from the start of stage `a` to the start of stage `b`.
    fn between(&self, a: &str, b: &str) -> Option<f64> {
        let v = self.0.lock().unwrap();
        let t = |n: &str| v.iter().find(|s| s.0 == n).map(|s| s.1);
        Some(t(b)?.duration_since(t(a)?).as_secs_f64())
    }
}

fn mib(b: u64) -> f64 {
    b as f64 / (1 << 20) as f64
}

fn main() -> Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let nodes: u32 = args.get(1).map(|s| s.parse()).transpose()?.unwrap_or(1000);
    let work = args
        .get(2)
        .map(PathBuf::from)
        .unwrap_or_else(|| PathBuf::from("/var/tmp/strata-images-bench"));
    let _ = fs::remove_dir_all(&work);
    fs::create_dir_all(&work)?;
    let images = build::default_images_dir();

    // 1. The busybox base alone, then base + roles, each in a fresh store.
    let empty_roles = work.join("no-roles");
    fs::create_dir_all(&empty_roles)?;
    let s1 = Store::open(&work.join("s1"))?;
    let t = Instant::now();
    let base = build::build(
        &s1,
        &images.join("busybox"),
        &BuildOptions {
            roles_dir: Some(empty_roles),
            ..Default::default()
        },
    )?;
    let t_base = t.elapsed().as_secs_f64();
    let s2 = Store::open(&work.join("s2"))?;
    let t = Instant::now();
    let all = build::build(
        &s2,
        &images.join("busybox"),
        &BuildOptions {
            roles_dir: Some(images.join("roles")),
            ..Default::default()
        },
    )?;
    let t_all = t.elapsed().as_secs_f64();
    let n_roles = all.roles.len() as f64;
    let t = Instant::now();
    let again = build::ensure_builtin(&s2, &images)?;
    let t_again = t.elapsed().as_secs_f64();
    assert!(again.reused);
    // Peer: mke2fs -d of the same tree + qemu-img convert to VHDX.
    let tree = work.join("tree");
    fs::create_dir_all(&tree)?;
    let raw = s1.cache_path(&base.base.id);
    run(Command::new("debugfs")
        .arg("-R")
        .arg(format!("rdump / {}", tree.display()))
        .arg(&raw))?;
    let t = Instant::now();
    run(Command::new("mke2fs")
        .args(["-q", "-F", "-t", "ext4", "-d"])
        .arg(&tree)
        .arg(work.join("peer.raw"))
        .arg("32M"))?;
    run(Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "vhdx"])
        .arg(work.join("peer.raw"))
        .arg(work.join("peer.vhdx")))?;
    let t_peer = t.elapsed().as_secs_f64();
    println!("busybox base: {t_base:.3} s ({} MiB layer); peer mke2fs -d + qemu-img convert -O vhdx: {t_peer:.3} s; ratio {:.2}", mib(base.base.size), t_base / t_peer);
    println!(
        "busybox base + {} role layers: {t_all:.3} s, {:.3} s per role layer ({:.1} MiB each); rebuild with unchanged inputs: {:.1} ms",
        all.roles.len(),
        (t_all - t_base) / n_roles,
        all.roles.iter().map(|r| mib(r.2.size)).sum::<f64>() / n_roles,
        t_again * 1e3
    );

    // 2. Node layers on the web role: first one call per node (what the server does when a
    // node first asks for its manifest), then a batch.
    let web = s2.image_for_role("web")?.context("web role")?;
    let fact = |n: u32| NodeFacts {
        hostname: format!("node{n}"),
        mac: format!(
            "52:54:00:{:02x}:{:02x}:{:02x}",
            n >> 16,
            (n >> 8) & 0xff,
            n & 0xff
        ),
        ip: Some(format!("10.{}.{}.{}/8", n >> 16, (n >> 8) & 0xff, n & 0xff)),
        gateway: Some("10.0.0.1".into()),
        node_id: format!("node-{n}"),
        token: format!("{:064x}", u128::from(n) * 0x9e37_79b9_7f4a_7c15),
    };
    let single_n = 100.min(nodes);
    let t = Instant::now();
    let first = build::node_layer(&s2, &web, &fact(1_000_000))?;
    let t_first = t.elapsed().as_secs_f64();
    let t = Instant::now();
    for n in 0..single_n {
        build::node_layer(&s2, &web, &fact(2_000_000 + n))?;
    }
    let t_single = t.elapsed().as_secs_f64() / f64::from(single_n);
    println!(
        "node layer: first on the role (makes the node template) {:.1} ms; then one call per node {:.2} ms each (mean of {single_n})",
        t_first * 1e3,
        t_single * 1e3
    );
    let batch: Vec<NodeFacts> = (0..nodes).map(fact).collect();
    let layers_before = du(&s2.root().join("layers"))?;
    let t = Instant::now();
    let recs = build::node_layers(&s2, &web, &batch)?;
    let bytes: u64 = recs.iter().map(|r| r.size).sum();
    let _ = first;
    let t_nodes = t.elapsed().as_secs_f64();
    let alloc = du(&s2.root().join("layers"))? - layers_before;
    // Peer: the naive way without layers, a full copy of the role's image per node (cp of the
    // sparse raw image, then the same files written with debugfs), for 50 nodes.
    let role_raw = s2.cache_path(&web.layers[1].id);
    let peer_n = 50.min(nodes);
    let pdir = work.join("peer-nodes");
    fs::create_dir_all(&pdir)?;
    fs::write(pdir.join("hostname"), "x\n")?;
    let t = Instant::now();
    for n in 0..peer_n {
        let out = pdir.join(format!("node{n}.raw"));
        run(Command::new("cp")
            .arg("--sparse=always")
            .arg(&role_raw)
            .arg(&out))?;
        run(Command::new("debugfs")
            .arg("-w")
            .arg("-R")
            .arg(format!(
                "write {} /etc/hostname",
                pdir.join("hostname").display()
            ))
            .arg(&out))?;
    }
    let t_peer_nodes = t.elapsed().as_secs_f64() / f64::from(peer_n) * f64::from(nodes);
    let peer_alloc = du(&pdir)? / u64::from(peer_n) * u64::from(nodes);
    println!(
        "{nodes} node layers in one node_layers call: {t_nodes:.2} s ({:.1} ms each), {:.0} MiB of layer files ({:.1} MiB each), {:.0} MiB allocated on disk; \
         peer full image copy per node: {t_peer_nodes:.2} s, {:.0} MiB allocated (extrapolated from {peer_n}); time ratio {:.2}",
        t_nodes * 1e3 / f64::from(nodes),
        mib(bytes),
        mib(bytes) / f64::from(nodes),
        mib(alloc),
        mib(peer_alloc),
        t_nodes / t_peer_nodes
    );

    if args.get(3).is_some_and(|a| a == "nodes") {
        let _ = fs::remove_dir_all(&work);
        return Ok(());
    }

    // 3. A role adding 1 MiB of files to a 1 GiB base.
    let big = work.join("big");
    let root = big.join("root");
    fs::create_dir_all(root.join("data"))?;
    let mut x: u64 = 1;
    let mut chunk = vec![0u8; 8 << 20];
    for i in 0..96 {
        for b in chunk.chunks_mut(8) {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            b.copy_from_slice(&x.to_le_bytes());
        }
        fs::write(root.join("data").join(format!("blob{i:03}")), &chunk)?;
    }
    fs::create_dir_all(big.join("base"))?;
    fs::write(
        big.join("base/recipe.toml"),
        "[image]\nname = \"big\"\nsize_mib = 1024\n[base]\nsource = \"dir\"\npath = \"../root\"\n",
    )?;
    let rfiles = big.join("roles/add/files/opt/add");
    fs::create_dir_all(&rfiles)?;
    let mut added = 0;
    for i in 0..16 {
        let part: Vec<u8> = chunk[i * 65536..(i + 1) * 65536]
            .iter()
            .map(|b| b ^ 0x5a)
            .collect();
        added += part.len() as u64;
        fs::write(rfiles.join(format!("f{i:02}")), part)?;
    }
    fs::write(
        big.join("roles/add/recipe.toml"),
        "[role]\nname = \"add\"\nimage = \"big\"\n[[tree]]\nfrom = \"files\"\n",
    )?;
    let s3 = Store::open(&work.join("s3"))?;
    let t = Instant::now();
    let b0 = build::build(
        &s3,
        &big.join("base"),
        &BuildOptions {
            roles_dir: Some(work.join("no-roles")),
            ..Default::default()
        },
    )?;
    let t_bigbase = t.elapsed().as_secs_f64();
    let s4 = Store::open(&work.join("s4"))?;
    let stages = Stages::default();
    let b1 = build::build(
        &s4,
        &big.join("base"),
        &BuildOptions {
            roles_dir: Some(big.join("roles")),
            progress: &stages,
        },
    )?;
    let t_role = stages
        .between("building role add", "publishing")
        .context("role stage times")?;
    let role = &b1.roles.first().context("role add")?.2;
    let t = Instant::now();
    run(Command::new("cp")
        .arg("--sparse=always")
        .arg(s3.cache_path(&b0.base.id))
        .arg(work.join("peer-big.raw")))?;
    let t_copy = t.elapsed().as_secs_f64();
    // Which 1 MiB blocks the role changed, and what a finer-grained differencing format
    // (qcow2, 64 KiB clusters, written by qemu-img against the same base) makes of it.
    let (base_raw, role_raw) = (s4.cache_path(&b1.base.id), s4.cache_path(&role.id));
    let changed = build::layer::changed_blocks(&base_raw, &role_raw)?;
    let qcow = work.join("peer-role.qcow2");
    // An empty overlay on the role image, rebased onto the base: qemu-img writes exactly the
    // clusters in which the two differ.
    let t = Instant::now();
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&role_raw)
        .arg(&qcow))?;
    run(Command::new("qemu-img")
        .args(["rebase", "-q", "-F", "raw", "-b"])
        .arg(&base_raw)
        .arg(&qcow))?;
    let t_qcow = t.elapsed().as_secs_f64();
    let qcow_size = fs::metadata(&qcow)?.len();
    let fetched = fetch_like_a_node(&s4.layer_path(&role.id), role, &work)?;
    println!(
        "1 GiB base ({} MiB data): base {t_bigbase:.2} s ({:.0} MiB layer); role adding {:.2} MiB of files: {:.2} s (copy of the base image, debugfs, e2fsck, layer written and read back), layer {:.2} MiB = {:.1}x what it added \
         ({:.2} MiB allocated: the changed sectors of {} touched 1 MiB blocks {changed:?}; the rest of the file is VHDX structures and holes); peer full copy of the base image: {t_copy:.2} s; \
         peer qcow2 overlay (64 KiB clusters) by qemu-img create + rebase onto the base: {t_qcow:.2} s, {:.2} MiB = {:.1}x",
        96 * 8,
        mib(b0.base.size),
        mib(added),
        t_role,
        mib(role.size),
        role.size as f64 / added as f64,
        mib(du(&s4.layer_path(&role.id))?),
        changed.len(),
        mib(qcow_size),
        qcow_size as f64 / added as f64,
    );
    println!(
        "role layer to a node (node-init's fetch through the server's layer routes): {:.2} MiB file, {:.2} MiB on the server's disk, \
         {:.2} MiB sent ({} data extents, {:.2} MiB) = {:.2}x the {:.2} MiB added, in {:.3} s; the node's cached copy {:.2} MiB on disk; \
         whole-file download (before extents; a server without the route): {:.2} MiB = {:.1}x, in {:.3} s",
        mib(role.size),
        mib(fetched.on_server),
        mib(fetched.sent),
        fetched.extents,
        mib(fetched.data),
        fetched.sent as f64 / added as f64,
        mib(added),
        fetched.secs,
        mib(fetched.on_node),
        mib(fetched.whole),
        fetched.whole as f64 / added as f64,
        fetched.whole_secs,
    );
    let _ = fs::remove_dir_all(&work);
    Ok(())
}

/// Serves a store's layer files (and nothing else) to the orchestrator's HTTP routes.
struct StoreLayers(PathBuf);

impl ImageSource for StoreLayers {
    fn chain_for(&self, _role: &str, _n: &NodeRecord) -> Result<Option<ImageChain>, FleetError> {
        Ok(None)
    }
    fn layer_path(&self, id: &LayerId) -> Option<PathBuf> {
        let p = self.0.join(format!("{id}.vhdx"));
        p.is_file().then_some(p)
    }
}

/// What one node's download of a layer moved.
struct Fetched {
    /// Bytes allocated to the layer file on the server.
    on_server: u64,
    /// Bytes node-init's fetch received.
    sent: u64,
    /// Extents in the server's list, and the bytes in them.
    extents: usize,
    data: u64,
    secs: f64,
    /// Bytes allocated to the node's cached copy.
    on_node: u64,
    /// A plain whole-file GET of the same layer.
    whole: u64,
    whole_secs: f64,
}

/// Downloads `rec` (stored at `path`) the way a node does: the server's real layer routes
/// (`Orchestrator::serve`: `/layers/{id}/extents`, then ranges of `/layers/{id}`) on loopback,
/// and node-init's `fetch_layer` into a node cache; then the whole file with one plain GET.
fn fetch_like_a_node(
    path: &Path,
    rec: &strata_server::store::LayerRecord,
    work: &Path,
) -> Result<Fetched> {
    use std::os::unix::fs::MetadataExt;
    let rt = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()?;
    let dir = work.join("serve");
    fs::create_dir_all(&dir)?;
    let layers = path.parent().context("layer dir")?.to_owned();
    let orch = rt.block_on(Orchestrator::open(
        &dir,
        ed25519_dalek::SigningKey::from_bytes(&[7; 32]),
        Arc::new(StoreLayers(layers)),
        Options::new("add"),
    ))?;
    let listener = rt.block_on(tokio::net::TcpListener::bind("127.0.0.1:0"))?;
    let addr = listener.local_addr()?;
    let shutdown = tokio_util::sync::CancellationToken::new();
    let server = rt.spawn(orch.serve(listener, shutdown.clone()));

    let client = node_init::http::Client::new(addr);
    let cache = node_init::cache::Cache::open(&work.join("node-cache"))?;
    let l = wire::manifest::LayerRef {
        id: rec.id,
        size: rec.size,
        kind: rec.kind,
        chunk_size: rec.chunk_size,
        chunks: rec.chunks.clone(),
        url: format!("/layers/{}", rec.id),
    };
    let ext = node_init::fetch::layer_extents(&client, &l)?
        .context("the server sent no usable extents")?;
    let t = Instant::now();
    let st = node_init::fetch::fetch_layer(&client, &cache, &l, |_| {})?;
    let secs = t.elapsed().as_secs_f64();
    let on_node = fs::metadata(cache.layer_path(&l.id))?.blocks() * 512;
    let t = Instant::now();
    let mut resp = client.get(&l.url, None)?;
    let whole = std::io::copy(&mut resp, &mut std::io::sink())?;
    let whole_secs = t.elapsed().as_secs_f64();
    shutdown.cancel();
    rt.block_on(server)??;
    Ok(Fetched {
        on_server: fs::metadata(path)?.blocks() * 512,
        sent: st.received,
        extents: ext.ranges().len(),
        data: ext.data_bytes(),
        secs,
        on_node,
        whole,
        whole_secs,
    })
}
