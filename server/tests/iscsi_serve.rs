//! The iSCSI target inside `strata serve`: a node the fleet knows gets its own target, named
//! from its MAC, whose LUN is its manifest's chain (base, role and node layer from the image
//! store, read-only) under a writable layer of its own in the data directory. Peers:
//! libiscsi's tools and QEMU's libiscsi driver (qemu-img, qemu-io), with the node's
//! initiator name and CHAP secret as `strata iscsi node` prints them.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;

use anyhow::{bail, ensure, Context, Result};
use support::TestServer;
use wire::manifest::{Manifest, SignedManifest};

const NODE_A: &str = "52:54:00:1a:00:01";
const NODE_B: &str = "52:54:00:1a:00:02";

fn tool(cmd: &str, args: &[&str]) -> Result<std::process::Output> {
    Command::new(cmd).args(args).output().map_err(|e| {
        if e.kind() == std::io::ErrorKind::NotFound {
            let pkg = if cmd.starts_with("qemu") {
                "qemu-utils qemu-block-extra"
            } else {
                "libiscsi-bin"
            };
            anyhow::anyhow!("{cmd} not found: apt-get install {pkg} (scripts/setup.sh)")
        } else {
            anyhow::anyhow!("running {cmd}: {e}")
        }
    })
}

fn tool_ok(cmd: &str, args: &[&str]) -> Result<String> {
    let out = tool(cmd, args)?;
    if !out.status.success() {
        bail!(
            "{cmd} {args:?} failed: {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// What `strata iscsi node` prints for a node.
#[derive(Debug)]
struct Creds {
    target: String,
    initiator: String,
    user: String,
    secret: String,
}

fn creds(s: &TestServer, mac: &str) -> Result<Creds> {
    let out = tool_ok(
        env!("CARGO_BIN_EXE_strata"),
        &[
            "iscsi",
            "node",
            "--mac",
            mac,
            "--data-dir",
            s.data_dir.to_str().context("path")?,
        ],
    )?;
    let get = |k: &str| {
        out.lines()
            .find_map(|l| l.strip_prefix(k)?.strip_prefix('='))
            .map(str::to_owned)
            .with_context(|| format!("no {k} in {out}"))
    };
    Ok(Creds {
        target: get("target")?,
        initiator: get("initiator")?,
        user: get("chap_user")?,
        secret: get("chap_secret")?,
    })
}

/// The iSCSI address from the server's `iSCSI on` log line.
fn iscsi_addr(s: &TestServer) -> Result<String> {
    let log = s.log();
    let line = log
        .lines()
        .find(|l| l.contains("iSCSI on"))
        .with_context(|| format!("no `iSCSI on` line:\n{log}"))?;
    let addr = line
        .split_whitespace()
        .find_map(|w| w.strip_prefix("iscsi="))
        .with_context(|| format!("no iscsi= in {line}"))?;
    Ok(addr.to_owned())
}

/// qemu-img/qemu-io options for `target` logging in as `initiator` with `user`/`secret`.
fn image_opts(addr: &str, target: &str, initiator: &str, user: &str) -> String {
    format!(
        "driver=raw,file.driver=iscsi,file.transport=tcp,file.portal={addr},file.target={target},file.lun=0,\
         file.initiator-name={initiator},file.user={user},file.password-secret=sec0"
    )
}

/// A qemu-io pattern read that may fail verification (qemu-io then exits non-zero): the
/// read itself must have gone through.
fn pattern_read(secret: &str, opts: &str, cmd: &str) -> Result<String> {
    let out = tool(
        "qemu-io",
        &["--object", secret, "--image-opts", opts, "-c", cmd],
    )?;
    let text = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    ensure!(
        text.contains("read ") && text.contains(" bytes at offset"),
        "qemu-io {cmd:?} did not read: {text}"
    );
    Ok(text)
}

async fn boot_script(s: &TestServer, mac: &str) -> Result<String> {
    Ok(reqwest::get(s.url(&format!("/boot/node.ipxe?mac={mac}")))
        .await?
        .error_for_status()?
        .text()
        .await?)
}

async fn manifest(s: &TestServer, mac: &str) -> Result<Manifest> {
    let body = reqwest::get(s.url(&format!("/api/v1/nodes/by-mac/{mac}/manifest")))
        .await?
        .error_for_status()?
        .bytes()
        .await?;
    let text = std::fs::read_to_string(s.data_dir.join("keys/server.key"))?;
    let mut secret = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut secret)?;
    let key = ed25519_dalek::SigningKey::from_bytes(&secret).verifying_key();
    Ok(SignedManifest::from_json(&body)?.verify(&key)?)
}

fn layer_files(s: &TestServer, man: &Manifest) -> Result<Vec<PathBuf>> {
    Ok(man
        .layers
        .iter()
        .map(|l| {
            s.data_dir
                .join("store/layers")
                .join(format!("{}.vhdx", l.id))
        })
        .collect())
}

fn b3(p: &Path) -> Result<String> {
    Ok(blake3::hash(&std::fs::read(p)?).to_hex().to_string())
}

#[tokio::test(flavor = "multi_thread")]
async fn serve_exports_each_node_chain_to_that_node_only() -> Result<()> {
    let s = TestServer::start(&format!(
        "[iscsi]\nenabled = true\nlisten = \"127.0.0.1:0\"\n[[iscsi.nodes]]\nmac = \"{NODE_B}\"\ndiskless = true\n"
    ))?;
    let addr = iscsi_addr(&s)?;
    // The nodes become known the way they do in production: by asking for their manifest.
    let ma = manifest(&s, NODE_A).await?;
    manifest(&s, NODE_B).await?;
    let (a, b) = (creds(&s, NODE_A)?, creds(&s, NODE_B)?);
    ensure!(
        a.target == "iqn.2026-11.io.strata:node.5254001a0001",
        "{a:?}"
    );
    ensure!(a.secret != b.secret && a.secret.len() >= 12, "{a:?} {b:?}");
    // A diskless node's boot script tells node-init where its chain is; the others' do not.
    let sb = boot_script(&s, NODE_B).await?;
    ensure!(
        sb.contains(&format!(
            "strata.disk=ram strata.iscsi={addr} strata.iscsi_secret={}",
            b.secret
        )),
        "{sb}"
    );
    let sa = boot_script(&s, NODE_A).await?;
    ensure!(!sa.contains("strata.iscsi"), "{sa}");
    let files = layer_files(&s, &ma)?;
    let before: Vec<String> = files.iter().map(|f| b3(f)).collect::<Result<_>>()?;

    // Discovery as node A lists A's target only; an unknown initiator sees none.
    let ls = tool_ok(
        "iscsi-ls",
        &["-i", &a.initiator, &format!("iscsi://{addr}")],
    )?;
    ensure!(ls.contains(&a.target) && !ls.contains(&b.target), "{ls}");
    let ls = tool_ok(
        "iscsi-ls",
        &[
            "-i",
            "iqn.2026-11.org.example:someone",
            &format!("iscsi://{addr}"),
        ],
    )?;
    ensure!(!ls.contains("iqn.2026-11.io.strata:node"), "{ls}");

    // Node A's credentials open A's target; B's, wrong ones or none do not.
    let url = |c: &Creds, user: &str, secret: &str| {
        format!("iscsi://{user}%{secret}@{addr}/{}/0", c.target)
    };
    tool_ok(
        "iscsi-inq",
        &["-i", &a.initiator, &url(&a, &a.user, &a.secret)],
    )?;
    ensure!(!tool(
        "iscsi-inq",
        &["-i", &a.initiator, &url(&a, &a.user, "wrong-secret-123")]
    )?
    .status
    .success());
    ensure!(!tool(
        "iscsi-inq",
        &["-i", &b.initiator, &url(&a, &b.user, &b.secret)]
    )?
    .status
    .success());
    ensure!(!tool(
        "iscsi-inq",
        &[
            "-i",
            &a.initiator,
            &format!("iscsi://{addr}/{}/0", a.target)
        ]
    )?
    .status
    .success());
    ensure!(
        !tool(
            "iscsi-inq",
            &[
                "-i",
                &a.initiator,
                &format!("iscsi://{addr}/iqn.2026-11.io.strata:node.5254001a00ff/0")
            ]
        )?
        .status
        .success(),
        "an unknown node's target answered"
    );

    // The LUN is the manifest's chain: qemu-img reads the same bytes the layers hold.
    let tmp = tempfile::tempdir()?;
    let out = tmp.path().join("a.raw");
    let secret_a = format!("secret,id=sec0,data={}", a.secret);
    let opts_a = image_opts(&addr, &a.target, &a.initiator, &a.user);
    tool_ok(
        "qemu-img",
        &[
            "convert",
            "--object",
            &secret_a,
            "--image-opts",
            &opts_a,
            "-O",
            "raw",
            out.to_str().context("path")?,
        ],
    )?;
    let chain = vhdx::Chain::from_paths(&files)?;
    let mut want = vec![0u8; usize::try_from(chain.virtual_size())?];
    chain.read_at(&mut want, 0)?;
    ensure!(
        std::fs::read(&out)? == want,
        "the LUN differs from the manifest's chain"
    );

    // A writes; a new session reads it back; B's LUN does not see it.
    tool_ok(
        "qemu-io",
        &[
            "--object",
            &secret_a,
            "--image-opts",
            &opts_a,
            "-c",
            "write -P 0x5c 1M 192k",
            "-c",
            "flush",
        ],
    )?;
    let r = tool_ok(
        "qemu-io",
        &[
            "--object",
            &secret_a,
            "--image-opts",
            &opts_a,
            "-c",
            "read -P 0x5c 1M 192k",
        ],
    )?;
    ensure!(!r.contains("Pattern verification failed"), "{r}");
    let secret_b = format!("secret,id=sec0,data={}", b.secret);
    let opts_b = image_opts(&addr, &b.target, &b.initiator, &b.user);
    let r = pattern_read(&secret_b, &opts_b, "read -P 0x5c 1M 192k")?;
    ensure!(
        r.contains("Pattern verification failed"),
        "node B sees node A's writes: {r}"
    );

    // The store's layers are untouched; A's writes are in A's own layer under the data dir.
    let after: Vec<String> = files.iter().map(|f| b3(f)).collect::<Result<_>>()?;
    ensure!(before == after, "a store layer changed");
    let top = layer_files(&s, &ma)?.pop().context("empty chain")?;
    let own = s
        .data_dir
        .join("iscsi/nodes/5254001a0001")
        .join(top.file_name().context("name")?);
    ensure!(own.is_file(), "no writable layer at {}", own.display());
    // qemu-io's flush (SYNCHRONIZE CACHE) made the writes durable: read the files directly.
    let mut all = files.clone();
    all.push(own);
    let mut got = vec![0u8; 192 * 1024];
    vhdx::Chain::from_paths(&all)?.read_at(&mut got, 1 << 20)?;
    ensure!(
        got.iter().all(|&x| x == 0x5c),
        "A's writes are not in its layer"
    );
    Ok(())
}

#[tokio::test(flavor = "multi_thread")]
async fn stateless_node_writes_are_gone_after_logout() -> Result<()> {
    let s = TestServer::start(&format!(
        "[iscsi]\nenabled = true\nlisten = \"127.0.0.1:0\"\n[[iscsi.nodes]]\nmac = \"{NODE_A}\"\nstateless = true\n"
    ))?;
    let addr = iscsi_addr(&s)?;
    manifest(&s, NODE_A).await?;
    let a = creds(&s, NODE_A)?;
    let secret = format!("secret,id=sec0,data={}", a.secret);
    let opts = image_opts(&addr, &a.target, &a.initiator, &a.user);
    let r = tool_ok(
        "qemu-io",
        &[
            "--object",
            &secret,
            "--image-opts",
            &opts,
            "-c",
            "write -P 0x77 0 64k",
            "-c",
            "read -P 0x77 0 64k",
        ],
    )?;
    ensure!(!r.contains("Pattern verification failed"), "{r}");
    let r = pattern_read(&secret, &opts, "read -P 0x77 0 64k")?;
    ensure!(
        r.contains("Pattern verification failed"),
        "a stateless write survived logout: {r}"
    );
    ensure!(
        !s.data_dir.join("iscsi/nodes").exists(),
        "a stateless node got a persistent layer"
    );
    let scratch = s.data_dir.join("iscsi/scratch");
    ensure!(
        std::fs::read_dir(&scratch)?.count() == 0,
        "scratch layers left behind"
    );
    Ok(())
}
