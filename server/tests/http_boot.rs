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
    std::fs::write(&kernel, (0..200_000u32).map(|i| (i % 251) as u8).collect::<Vec<_>>())?;
    std::fs::write(&initramfs, b"07070100000000")?;
    Ok(format!("[boot]\nkernel = {:?}\ninitramfs = {:?}\n", kernel, initramfs))
}

#[tokio::test]
async fn ipxe_scripts_kernel_and_keyed_initramfs() -> Result<()> {
    let tmp = tempfile::tempdir()?;
    let s = TestServer::start(&boot_files(tmp.path())?)?;
    let http = reqwest::Client::new();

    let chain = http.get(s.url("/boot/ipxe")).send().await?.text().await?;
    ensure!(chain.starts_with("#!ipxe\nchain "), "{chain}");
    ensure!(chain.contains("/boot/node.ipxe?mac=${netX/mac}"), "{chain}");

    let script = http.get(s.url("/boot/node.ipxe?mac=52-54-00-12-34-56")).send().await?;
    ensure!(script.status() == 200);
    let script = script.text().await?;
    ensure!(script.contains("strata.server=http://127.0.0.1:"), "{script}");
    ensure!(script.contains("initrd --name initramfs"), "{script}");

    let bad = http.get(s.url("/boot/node.ipxe?mac=not-a-mac")).send().await?;
    ensure!(bad.status() == 400, "bad MAC gave {}", bad.status());
    let body: serde_json::Value = bad.json().await?;
    ensure!(body["error"]["code"] == "invalid_request", "{body}");

    // The kernel, whole and by range.
    let kernel = http.get(s.url("/boot/kernel")).send().await?.bytes().await?;
    ensure!(kernel.len() == 200_000);
    let part = http
        .get(s.url("/boot/kernel"))
        .header("Range", "bytes=1000-1999")
        .send()
        .await?;
    ensure!(part.status() == 206);
    ensure!(part.bytes().await?.as_ref() == &kernel[1000..2000]);

    // The initramfs ends with a cpio archive carrying the server's public key.
    let initramfs = http.get(s.url("/boot/initramfs")).send().await?.bytes().await?;
    let public = hex::encode(server_key(&s)?.verifying_key().to_bytes());
    let expected = strata_server::boot::initramfs::key_archive(&public);
    ensure!(initramfs.starts_with(b"07070100000000"));
    ensure!(initramfs.ends_with(&expected), "initramfs does not end with the key archive");
    Ok(())
}

#[tokio::test]
async fn signed_manifest_and_layers_by_range() -> Result<()> {
    let s = TestServer::start("")?;
    let http = reqwest::Client::new();
    let mac = "52:54:00:aa:bb:01";
    let resp = http.get(s.url(&format!("/api/v1/nodes/by-mac/{mac}/manifest"))).send().await?;
    ensure!(resp.status() == 200, "manifest: {} {}", resp.status(), resp.text().await?);
    let signed: SignedManifest = resp.json().await?;
    let manifest = signed.verify(&server_key(&s)?.verifying_key()).context("signature")?;
    ensure!(manifest.mac == mac);
    ensure!(manifest.layers.len() >= 2, "base, role and node layers expected: {:?}", manifest.layers.len());

    // Another key must not verify it.
    ensure!(signed.verify(&SigningKey::from_bytes(&[7; 32]).verifying_key()).is_err());

    for layer in &manifest.layers {
        let body = http.get(s.url(&layer.url)).send().await?.bytes().await?;
        ensure!(body.len() as u64 == layer.size, "layer {} size", layer.id);
        ensure!(wire::Digest::of(&body) == layer.id, "layer {} hash", layer.id);
        let n = layer.size.min(5000);
        let part = http
            .get(s.url(&layer.url))
            .header("Range", format!("bytes={}-{}", layer.size - n, layer.size - 1))
            .send()
            .await?;
        ensure!(part.status() == 206);
        ensure!(part.bytes().await?.as_ref() == &body[(layer.size - n) as usize..]);
    }

    let unknown = http.get(s.url(&format!("/layers/{}", "ab".repeat(32)))).send().await?;
    ensure!(unknown.status() == 404);
    let bad = http.get(s.url("/layers/..%2f..%2fetc%2fpasswd")).send().await?;
    ensure!(bad.status() == 400, "{}", bad.status());
    Ok(())
}
