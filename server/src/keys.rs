//! The server's ed25519 signing key. Node manifests are signed with it; node-init trusts the
//! public half, which the server appends to the initramfs it serves. The tokens node layers
//! carry are derived from it too ([`node_token`]). Generated on first start
//! and kept in `<data_dir>/keys/server.key` (hex, mode 0600).

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use ed25519_dalek::{SigningKey, VerifyingKey};

/// Errors loading or creating the key.
#[derive(Debug, thiserror::Error)]
pub enum KeyError {
    /// Reading or writing the key file failed.
    #[error("{path}")]
    Io {
        /// The key file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
    /// The key file holds something other than 64 hex digits.
    #[error("{path}: not an ed25519 secret key (expected 64 hex digits)")]
    Malformed {
        /// The key file.
        path: PathBuf,
    },
}

/// Loads `<dir>/server.key`, creating it (atomically, mode 0600) if absent.
pub fn load_or_create(dir: &Path) -> Result<SigningKey, KeyError> {
    let path = dir.join("server.key");
    let io = |source| KeyError::Io {
        path: path.clone(),
        source,
    };
    match std::fs::read_to_string(&path) {
        Ok(text) => {
            let mut secret = [0u8; 32];
            hex::decode_to_slice(text.trim(), &mut secret)
                .map_err(|_| KeyError::Malformed { path: path.clone() })?;
            Ok(SigningKey::from_bytes(&secret))
        }
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            std::fs::create_dir_all(dir).map_err(io)?;
            let key = SigningKey::generate(&mut rand::rngs::OsRng);
            let mut tmp = tempfile::NamedTempFile::new_in(dir).map_err(io)?;
            tmp.as_file()
                .set_permissions(std::fs::Permissions::from_mode(0o600))
                .map_err(io)?;
            writeln!(tmp, "{}", hex::encode(key.to_bytes())).map_err(io)?;
            tmp.as_file().sync_all().map_err(io)?;
            tmp.persist_noclobber(&path).map_err(|e| io(e.error))?;
            std::fs::File::open(dir)
                .and_then(|d| d.sync_all())
                .map_err(io)?;
            tracing::info!(path = %path.display(), "generated server signing key");
            Ok(key)
        }
        Err(e) => Err(io(e)),
    }
}

/// The public key as node-init reads it: 64 hex digits.
pub fn public_hex(key: &VerifyingKey) -> String {
    hex::encode(key.to_bytes())
}

/// The secret of generation `generation` of a node's layer token (`db::tokens::layer_token`):
/// an API bearer token (`stk_` and 64 hex digits) derived with blake3 from the server's secret
/// key, the MAC and the generation. The server can recompute it whenever it rebuilds the
/// node's layer, so the database stores only its hash; it is unguessable without the key.
pub fn node_token(key: &SigningKey, mac: &str, generation: u64) -> String {
    let mut hasher = blake3::Hasher::new_derive_key("strata 2026 node layer token v2");
    hasher.update(&key.to_bytes());
    hasher.update(&generation.to_le_bytes());
    hasher.update(mac.as_bytes());
    format!("stk_{}", hasher.finalize().to_hex())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn created_once_then_reloaded() {
        let dir = tempfile::tempdir().unwrap();
        let a = load_or_create(dir.path()).unwrap();
        let b = load_or_create(dir.path()).unwrap();
        assert_eq!(a.to_bytes(), b.to_bytes());
        let mode = std::fs::metadata(dir.path().join("server.key"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600);
    }

    #[test]
    fn node_tokens_differ_per_node_generation_and_key() {
        let a = SigningKey::from_bytes(&[1; 32]);
        let b = SigningKey::from_bytes(&[2; 32]);
        let t = node_token(&a, "52:54:00:00:00:01", 1);
        assert!(t.starts_with("stk_") && t.len() == 68, "an API token: {t}");
        assert_eq!(t, node_token(&a, "52:54:00:00:00:01", 1));
        assert_ne!(t, node_token(&a, "52:54:00:00:00:02", 1));
        assert_ne!(t, node_token(&a, "52:54:00:00:00:01", 2));
        assert_ne!(t, node_token(&b, "52:54:00:00:00:01", 1));
    }

    #[test]
    fn garbage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        std::fs::write(dir.path().join("server.key"), "not hex").unwrap();
        assert!(matches!(
            load_or_create(dir.path()),
            Err(KeyError::Malformed { .. })
        ));
    }
}
