//! The HTTP boot surface of a real `strata serve`: iPXE scripts, the keyed initramfs, signed
//! manifests, and layers served whole and by `Range` (what node-init's resume and chunk repair
//! rely on).

mod support;

use anyhow::{ensure, Context, Result};
use ed25519_dalek::SigningKey;
use support::TestServer;
use wire::manifest::SignedManifest;

fn server_key(s: &TestServer) -> Result<SigningKey> {
    let text = std::fs::read_to_string(s.data_dir.join("keys/server.key"))?;
    let mut secret = [0u8; 32];
    hex::decode_to_slice(text.trim(), &mut secret)?;
    Ok(SigningKey::from_bytes(&secret))
}

fn boot_files(dir: &std::path::Path) -> Result<String> {
    let kernel = dir.join("vmlinuz");
    let initramfs = dir.join("initramfs.img");
    std::fs::write(
        &kernel,
        (0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>(),
    )?;
    std::fs::write(&initramfs, b"07070100000000")?;
    Ok(format!(
        "[boot]\nkernel = {:?}\ninitramfs = {:?}\n",
        kernel, initramfs
    ))
}

#[tokio::test]
async fn ipxe_scripts_kernel_and_keyed_initramfs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = TestServer::start(&boot_files(tmp.path())?)?;
    let http = reqwest::Client::new();

    let chain = http.get(s.url("/boot/ipxe")).send().await?.text().await?;
    ensure!(chain.starts_with("#!ipxe\nchain "), "{chain}");
    ensure!(chain.contains("/boot/node.ipxe?mac=${netX/mac}"), "{chain}");

    let script = http
        .get(s.url("/boot/node.ipxe?mac=52-54-00-12-34-56"))
        .send()
        .await?;
    ensure!(script.status() == 200);
    let script = script.text().await?;
    ensure!(
        script.contains("strata.server=http://127.0.0.1:"),
        "{script}"
    );
    ensure!(script.contains("initrd --name initramfs"), "{script}");

    let bad = http
        .get(s.url("/boot/node.ipxe?mac=not-a-mac"))
        .send()
        .await?;
    ensure!(bad.status() == 400, "bad MAC gave {}", bad.status());
    let body: serde_json::Value = bad.json().await?;
    ensure!(body["error"]["code"] == "invalid_request", "{body}");

    // The kernel, whole and by range.
    let kernel = http
        .get(s.url("/boot/kernel"))
        .send()
        .await?
        .bytes()
        .await?;
    ensure!(kernel.len() == 200_000);
    let part = http
        .get(s.url("/boot/kernel"))
        .header("Range", "bytes=1000-1999")
        .send()
        .await?;
    ensure!(part.status() == 206);
    ensure!(part.bytes().await?.as_ref() == &kernel[1000..2000]);

    // The initramfs ends with a cpio archive carrying the server's public key.
    let initramfs = http
        .get(s.url("/boot/initramfs"))
        .send()
        .await?
        .bytes()
        .await?;
    let public = hex::encode(server_key(&s)?.verifying_key().to_bytes());
    let expected = strata_server::boot::initramfs::key_archive(&public);
    ensure!(initramfs.starts_with(b"07070100000000"));
    ensure!(
        initramfs.ends_with(&expected),
        "initramfs does not end with the key archive"
    );
    Ok(())
}

#[tokio::test]
async fn signed_manifest_and_layers_by_range() -> Result<()> {
    let s = TestServer::start("")?;
    let http = reqwest::Client::new();
    let mac = "52:54:00:aa:bb:01";
    let resp = http
        .get(s.url(&format!("/api/v1/nodes/by-mac/{mac}/manifest")))
        .send()
        .await?;
    ensure!(
        resp.status() == 200,
        "manifest: {} {}",
        resp.status(),
        resp.text().await?
    );
    let signed: SignedManifest = resp.json().await?;
    let manifest = signed
        .verify(&server_key(&s)?.verifying_key())
        .context("signature")?;
    ensure!(manifest.mac == mac);
    ensure!(
        manifest.layers.len() >= 2,
        "base, role and node layers expected: {:?}",
        manifest.layers.len()
    );

    // Another key must not verify it.
    ensure!(signed
        .verify(&SigningKey::from_bytes(&[7; 32]).verifying_key())
        .is_err());

    for layer in &manifest.layers {
        let body = http.get(s.url(&layer.url)).send().await?.bytes().await?;
        ensure!(body.len() as u64 == layer.size, "layer {} size", layer.id);
        ensure!(
            wire::Digest::of(&body) == layer.id,
            "layer {} hash",
            layer.id
        );
        let n = layer.size.min(5000);
        let part = http
            .get(s.url(&layer.url))
            .header(
                "Range",
                format!("bytes={}-{}", layer.size - n, layer.size - 1),
            )
            .send()
            .await?;
        ensure!(part.status() == 206);
        ensure!(part.bytes().await?.as_ref() == &body[(layer.size - n) as usize..]);
    }

    let unknown = http
        .get(s.url(&format!("/layers/{}", "ab".repeat(32))))
        .send()
        .await?;
    ensure!(unknown.status() == 404);
    let bad = http
        .get(s.url("/layers/..%2f..%2fetc%2fpasswd"))
        .send()
        .await?;
    ensure!(bad.status() == 400, "{}", bad.status());
    Ok(())
}

/// Files are streamed in 1 MiB positioned reads (server/src/http/file.rs): ranges that start,
/// end or cross a chunk boundary, suffix and open ranges, 416, HEAD and conditional requests
/// must come out exactly as RFC 9110 says, through the real server.
#[tokio::test]
async fn file_ranges_at_chunk_boundaries_head_416_and_conditionals() -> Result<()> {
    const MIB: usize = 1 << 20;
    let tmp = tempfile::tempdir()?;
    let data: Vec<u8> = (0..(2 * MIB + 4321))
        .map(|i| (i * 31 % 253) as u8)
        .collect();
    let kernel = tmp.path().join("vmlinuz");
    std::fs::write(&kernel, &data)?;
    let s = TestServer::start(&format!("[boot]\nkernel = {kernel:?}\n"))?;
    let http = reqwest::Client::new();
    let url = s.url("/boot/kernel");
    let len = data.len();

    let whole = http.get(&url).send().await?;
    ensure!(whole.status() == 200, "{}", whole.status());
    ensure!(whole.headers()["content-length"] == len.to_string().as_str());
    ensure!(whole.headers()["accept-ranges"] == "bytes");
    let last_modified = whole.headers()["last-modified"].clone();
    ensure!(
        whole.bytes().await?.as_ref() == data.as_slice(),
        "whole file differs"
    );

    // (Range header, first byte, last byte)
    let cases = [
        (format!("bytes={}-{}", MIB - 1, MIB), MIB - 1, MIB),
        (format!("bytes={}-{}", MIB, 2 * MIB - 1), MIB, 2 * MIB - 1),
        (format!("bytes=0-{}", MIB - 1), 0, MIB - 1),
        (format!("bytes=7-{}", 2 * MIB + 9), 7, 2 * MIB + 9),
        (format!("bytes={}-", 2 * MIB - 3), 2 * MIB - 3, len - 1),
        ("bytes=-100".to_owned(), len - 100, len - 1),
        (
            format!("bytes={}-{}", len - 1, len + 5000),
            len - 1,
            len - 1,
        ),
        ("bytes=0-0".to_owned(), 0, 0),
    ];
    for (range, first, last) in &cases {
        let part = http.get(&url).header("Range", range).send().await?;
        ensure!(part.status() == 206, "{range}: {}", part.status());
        let want = format!("bytes {first}-{last}/{len}");
        ensure!(
            part.headers()["content-range"] == want.as_str(),
            "{range}: {:?}",
            part.headers()["content-range"]
        );
        ensure!(
            part.headers()["content-length"] == (last - first + 1).to_string().as_str(),
            "{range}"
        );
        ensure!(
            part.bytes().await?.as_ref() == &data[*first..=*last],
            "{range}: bytes differ"
        );

        let head = http.head(&url).header("Range", range).send().await?;
        ensure!(head.status() == 206, "HEAD {range}: {}", head.status());
        ensure!(
            head.headers()["content-range"] == want.as_str(),
            "HEAD {range}"
        );
        ensure!(
            head.headers()["content-length"] == (last - first + 1).to_string().as_str(),
            "HEAD {range}"
        );
        ensure!(head.bytes().await?.is_empty(), "HEAD {range} has a body");
    }

    for range in [
        format!("bytes={len}-"),
        format!("bytes={}-{}", len + 10, len + 20),
    ] {
        let bad = http.get(&url).header("Range", &range).send().await?;
        ensure!(bad.status() == 416, "{range}: {}", bad.status());
        ensure!(
            bad.headers()["content-range"] == format!("bytes */{len}").as_str(),
            "{range}"
        );
    }

    let head = http.head(&url).send().await?;
    ensure!(head.status() == 200);
    ensure!(head.headers()["content-length"] == len.to_string().as_str());
    ensure!(head.bytes().await?.is_empty(), "HEAD has a body");

    let unchanged = http
        .get(&url)
        .header("If-Modified-Since", &last_modified)
        .send()
        .await?;
    ensure!(
        unchanged.status() == 304,
        "If-Modified-Since: {}",
        unchanged.status()
    );
    ensure!(unchanged.bytes().await?.is_empty());
    let stale = http
        .get(&url)
        .header("If-Unmodified-Since", "Mon, 01 Jan 2001 00:00:00 GMT")
        .send()
        .await?;
    ensure!(
        stale.status() == 412,
        "If-Unmodified-Since: {}",
        stale.status()
    );
    let current = http
        .get(&url)
        .header("If-Unmodified-Since", &last_modified)
        .send()
        .await?;
    ensure!(
        current.status() == 200,
        "If-Unmodified-Since now: {}",
        current.status()
    );
    ensure!(current.bytes().await?.len() == len);
    Ok(())
}

/// `strata image inspect --json` of a version in the server's store.
fn inspect(s: &TestServer, image: &str) -> Result<serde_json::Value> {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["image", "inspect", "--json", "--store"])
        .arg(s.data_dir.join("store"))
        .arg(image)
        .output()?;
    ensure!(
        out.status.success(),
        "strata image inspect: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(serde_json::from_slice(&out.stdout)?)
}

/// The word of `script` that follows `prefix` (a URL path's last component).
fn after<'a>(script: &'a str, prefix: &str) -> Option<&'a str> {
    let at = script.find(prefix)? + prefix.len();
    script[at..].split([' ', '\n']).next()
}

/// A node's script names the kernel recorded with the version its manifest names (the
/// built-in busybox image records Debian's kernel) and an initramfs composed for it: node-init's
/// archive, that kernel's module archive, the key archive. Both are served content-addressed
/// (bytes hash to their name; Range; HEAD; cacheable for good). A node whose version records no
/// kernel gets the configured kernel and initramfs.
#[tokio::test]
async fn node_scripts_name_the_kernel_of_their_image() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = TestServer::start(&boot_files(tmp.path())?)?;
    let http = reqwest::Client::new();
    let mac = "52:54:00:12:34:01";

    let v = inspect(&s, "busybox")?;
    let kernel_id = v["kernel"]["id"].as_str().context("kernel id")?.to_owned();
    let release = v["kernel"]["release"]
        .as_str()
        .context("release")?
        .to_owned();
    let kernel_file = v["kernel"]["path"]
        .as_str()
        .context("kernel path")?
        .to_owned();
    let modules_file = v["kernel"]["modules"]["path"]
        .as_str()
        .context("modules path")?
        .to_owned();
    let modules_id = v["kernel"]["modules"]["id"]
        .as_str()
        .context("modules id")?;

    let script = http
        .get(s.url(&format!("/boot/node.ipxe?mac={mac}")))
        .send()
        .await?
        .text()
        .await?;
    ensure!(
        after(&script, "/boot/kernels/") == Some(kernel_id.as_str()),
        "{script}"
    );
    ensure!(script.contains(&format!("kernel {release}\n")), "{script}");
    let initramfs_id = after(&script, "/boot/initramfs/")
        .with_context(|| format!("no composed initramfs in {script}"))?
        .to_owned();

    // The kernel: exactly the recorded blob, whole, by range, HEAD; cacheable for good.
    let resp = http
        .get(s.url(&format!("/boot/kernels/{kernel_id}")))
        .send()
        .await?;
    ensure!(resp.status() == 200, "{}", resp.status());
    let cache = resp
        .headers()
        .get("cache-control")
        .and_then(|v| v.to_str().ok())
        .unwrap_or_default()
        .to_owned();
    ensure!(cache.contains("immutable"), "cache-control {cache:?}");
    let kernel = resp.bytes().await?;
    ensure!(kernel.as_ref() == std::fs::read(&kernel_file)?.as_slice());
    ensure!(blake3::hash(&kernel).to_hex().as_str() == kernel_id);
    let part = http
        .get(s.url(&format!("/boot/kernels/{kernel_id}")))
        .header("Range", "bytes=4096-8191")
        .send()
        .await?;
    ensure!(part.status() == 206);
    ensure!(part.bytes().await?.as_ref() == &kernel[4096..8192]);
    let head = http
        .head(s.url(&format!("/boot/kernels/{kernel_id}")))
        .send()
        .await?;
    ensure!(head.status() == 200);
    ensure!(
        head.headers()
            .get("content-length")
            .and_then(|v| v.to_str().ok())
            == Some(kernel.len().to_string().as_str())
    );

    // The initramfs: hashes to its name; base, then the module archive, then the key archive,
    // each from a 512-byte boundary.
    let resp = http
        .get(s.url(&format!("/boot/initramfs/{initramfs_id}")))
        .send()
        .await?;
    ensure!(resp.status() == 200, "{}", resp.status());
    let initramfs = resp.bytes().await?;
    ensure!(blake3::hash(&initramfs).to_hex().as_str() == initramfs_id);
    let modules = std::fs::read(&modules_file)?;
    ensure!(blake3::hash(&modules).to_hex().as_str() == modules_id);
    ensure!(initramfs.starts_with(b"07070100000000"));
    ensure!(initramfs[14..512].iter().all(|b| *b == 0));
    ensure!(&initramfs[512..512 + modules.len()] == modules.as_slice());
    let public = hex::encode(server_key(&s)?.verifying_key().to_bytes());
    ensure!(initramfs.ends_with(&strata_server::boot::initramfs::key_archive(&public)));
    // A second script names the same files (composed once).
    let again = http
        .get(s.url(&format!("/boot/node.ipxe?mac={mac}")))
        .send()
        .await?
        .text()
        .await?;
    ensure!(after(&again, "/boot/initramfs/") == Some(initramfs_id.as_str()));

    // Bad and unknown ids; a module archive is not a kernel.
    for (path, status) in [
        ("/boot/kernels/not-hex".to_owned(), 400),
        (format!("/boot/kernels/{}", "0".repeat(64)), 404),
        (format!("/boot/kernels/{modules_id}"), 404),
        ("/boot/initramfs/xyz".to_owned(), 400),
        (format!("/boot/initramfs/{}", "0".repeat(64)), 404),
    ] {
        let r = http.get(s.url(&path)).send().await?;
        ensure!(r.status() == status, "{path}: {}", r.status());
    }

    // A version without a kernel: the configured kernel and initramfs.
    let recipes = tmp.path().join("plain");
    std::fs::create_dir_all(recipes.join("base"))?;
    std::fs::create_dir_all(recipes.join("roles/plain"))?;
    std::fs::write(
        recipes.join("base/recipe.toml"),
        "[image]\nname = \"plain\"\nsize_mib = 8\n[base]\nsource = \"empty\"\n",
    )?;
    std::fs::write(
        recipes.join("roles/plain/recipe.toml"),
        "[role]\nname = \"plain\"\nimage = \"plain\"\n",
    )?;
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_strata"))
        .args(["image", "build", "--store"])
        .arg(s.data_dir.join("store"))
        .arg(recipes.join("base"))
        .arg("--roles")
        .arg(recipes.join("roles"))
        .output()?;
    ensure!(
        out.status.success(),
        "strata image build: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let admin = std::fs::read_to_string(s.data_dir.join("admin.token"))?;
    let r = http
        .patch(s.url(&format!("/api/v1/nodes/{mac}")))
        .bearer_auth(admin.trim())
        .json(&serde_json::json!({ "role": "plain" }))
        .send()
        .await?;
    ensure!(r.status().is_success(), "PATCH node: {}", r.status());
    let script = http
        .get(s.url(&format!("/boot/node.ipxe?mac={mac}")))
        .send()
        .await?
        .text()
        .await?;
    ensure!(script.contains("/boot/kernel initrd=initramfs"), "{script}");
    ensure!(script.contains("/boot/initramfs\n"), "{script}");
    ensure!(!script.contains("/boot/kernels/"), "{script}");
    Ok(())
}
