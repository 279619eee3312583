//! The signed node manifest: what a node must boot (its chain of layers with sizes, blake3
//! identities and per-chunk hashes, the image version and role), signed by the server with
//! ed25519 (RFC 8032). node-init trusts the server key baked into its initramfs.
//!
//! Wire form: [`SignedManifest`] JSON, `{"manifest": "<exact JSON text>", "signature": "<hex>"}`.
//! The signature covers [`SIGNING_CONTEXT`] followed by the bytes of the `manifest` string, so
//! the verifier never depends on re-serialising JSON. [`SignedManifest::verify`] checks the
//! signature first, then parses the text and checks that the manifest is internally
//! consistent ([`Manifest::validate`]); a caller only ever sees a checked [`Manifest`].

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use serde::{Deserialize, Serialize};

use crate::chunk::{chunk_count, ChunkHash, LayerId, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};

/// Bytes prepended to the manifest text before signing (domain separation: a signature made
/// for a manifest is never valid for any other message the server signs).
pub const SIGNING_CONTEXT: &[u8] = b"strata manifest v1\n";
/// Largest signed-manifest document accepted (bytes of JSON).
pub const MAX_MANIFEST_BYTES: usize = 4 << 20;
/// Most layers in one chain.
pub const MAX_LAYERS: usize = 16;
/// Largest layer (4 TiB).
pub const MAX_LAYER_SIZE: u64 = 4 << 40;
/// Most chunks in one manifest, all layers together (a 16 TiB image at 64 MiB chunks, or
/// 64 GiB at the default 1 MiB).
pub const MAX_TOTAL_CHUNKS: usize = 1 << 16;
/// Longest text field (node, role, image, url).
pub const MAX_TEXT: usize = 256;
/// Most boot tries a manifest may grant a new version.
pub const MAX_BOOT_TRIES: u32 = 100;

/// Most multicast offers in one manifest (one per layer at most).
pub const MAX_MULTICAST_OFFERS: usize = MAX_LAYERS;
/// Longest a manifest may tell a node to wait for a multicast session (seconds).
pub const MAX_MULTICAST_WAIT: u32 = 3600;

/// A multicast session the server runs (or will start) for one layer of the chain
/// (docs/multicast.md, "Sessions scheduled by the server"). Signed with the rest of the
/// manifest: a node joins only the group its server named, and still checks every chunk
/// against the layer's hashes in this manifest.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MulticastOffer {
    /// The layer (one of the chain's).
    pub layer: LayerId,
    /// IPv4 multicast group and UDP port of the session.
    pub group: std::net::SocketAddrV4,
    /// Seconds the node waits for the session to deliver before it fetches what is still
    /// missing over HTTP (1..=[`MAX_MULTICAST_WAIT`]).
    pub wait_secs: u32,
}

/// The role a layer plays in a chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum LayerKind {
    /// Immutable base image (OS or app), shared by every role.
    Base,
    /// Differencing layer of one role.
    Role,
    /// Differencing layer of one node.
    Node,
}

/// One layer of the chain.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LayerRef {
    /// blake3 of the whole layer file.
    pub id: LayerId,
    /// Size of the layer file in bytes.
    pub size: u64,
    /// What the layer is.
    pub kind: LayerKind,
    /// Chunk size of `chunks`, bytes.
    pub chunk_size: u32,
    /// blake3 of each chunk, in order ([`crate::chunk`] layout).
    pub chunks: Vec<ChunkHash>,
    /// Path on the server, e.g. `/layers/<id>` (absolute path, no scheme or host).
    pub url: String,
}

/// A node's assignment.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Manifest {
    /// Node name.
    pub node: String,
    /// The node's boot MAC, lower-case, colon separated.
    pub mac: String,
    /// Role name.
    pub role: String,
    /// Image name.
    pub image: String,
    /// Image version (monotonic per image).
    pub version: u64,
    /// Unix seconds when the server issued this manifest.
    pub issued_at: u64,
    /// Boots a newly activated version gets before the node rolls back by itself.
    pub boot_tries: u32,
    /// The chain: base first, top last.
    pub layers: Vec<LayerRef>,
    /// Multicast sessions offered for layers of the chain (absent in older manifests; a node
    /// that ignores them fetches everything over HTTP).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub multicast: Vec<MulticastOffer>,
}

/// The wire form: the exact signed text and its signature.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SignedManifest {
    /// The exact JSON text of a [`Manifest`] that was signed.
    pub manifest: String,
    /// ed25519 signature over `SIGNING_CONTEXT || manifest`, 128 lower-case hex digits.
    pub signature: String,
}

/// Why a manifest was refused.
#[derive(Debug, thiserror::Error)]
pub enum ManifestError {
    /// The document is larger than [`MAX_MANIFEST_BYTES`].
    #[error("manifest document of {len} bytes exceeds {MAX_MANIFEST_BYTES}")]
    TooLarge {
        /// Its length.
        len: usize,
    },
    /// Not valid JSON of the expected shape.
    #[error("manifest JSON")]
    Json(#[source] serde_json::Error),
    /// The signature field is not 64 bytes of hex.
    #[error("signature is not 128 hex digits")]
    SignatureEncoding,
    /// The signature does not verify with the trusted key.
    #[error("bad manifest signature")]
    BadSignature,
    /// Signed, but internally inconsistent.
    #[error("invalid manifest: {0}")]
    Invalid(#[from] InvalidManifest),
}

/// An internal inconsistency in a manifest.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum InvalidManifest {
    /// A text field is empty, too long, or holds control characters.
    #[error("field {field} is empty, longer than {MAX_TEXT} bytes or holds control characters")]
    Text {
        /// Field name.
        field: &'static str,
    },
    /// `mac` is not six lower-case hex pairs separated by colons.
    #[error("mac {mac:?} is not lower-case aa:bb:cc:dd:ee:ff")]
    Mac {
        /// The value.
        mac: String,
    },
    /// No layers, or more than [`MAX_LAYERS`].
    #[error("{count} layers (must be 1..={MAX_LAYERS})")]
    LayerCount {
        /// Layer count.
        count: usize,
    },
    /// The first layer is not a base, or a later layer is.
    #[error(
        "layer {index} has kind {kind:?}: the chain is one base followed by differencing layers"
    )]
    LayerKindOrder {
        /// Layer index.
        index: usize,
        /// Its kind.
        kind: LayerKind,
    },
    /// Size 0 or over [`MAX_LAYER_SIZE`].
    #[error("layer {index} size {size} out of range")]
    LayerSize {
        /// Layer index.
        index: usize,
        /// Its size.
        size: u64,
    },
    /// Chunk size not a power of two in [`MIN_CHUNK_SIZE`]..=[`MAX_CHUNK_SIZE`].
    #[error("layer {index} chunk size {chunk_size} is not a power of two in {MIN_CHUNK_SIZE}..={MAX_CHUNK_SIZE}")]
    ChunkSize {
        /// Layer index.
        index: usize,
        /// The value.
        chunk_size: u32,
    },
    /// Chunk list length does not match size / chunk size.
    #[error("layer {index} lists {listed} chunks, size and chunk size give {expected}")]
    ChunkCount {
        /// Layer index.
        index: usize,
        /// Chunks listed.
        listed: usize,
        /// Chunks expected.
        expected: u64,
    },
    /// More than [`MAX_TOTAL_CHUNKS`] chunks overall.
    #[error("{total} chunks in all exceeds {MAX_TOTAL_CHUNKS}")]
    TooManyChunks {
        /// Total.
        total: usize,
    },
    /// The same layer twice in one chain.
    #[error("layer {id} appears twice in the chain")]
    DuplicateLayer {
        /// The layer.
        id: LayerId,
    },
    /// `url` is not an absolute path.
    #[error("layer {index} url {url:?} is not an absolute path")]
    Url {
        /// Layer index.
        index: usize,
        /// The value.
        url: String,
    },
    /// `boot_tries` is 0 or over [`MAX_BOOT_TRIES`].
    #[error("boot_tries {0} out of range 1..={MAX_BOOT_TRIES}")]
    BootTries(u32),
    /// A multicast offer names a layer not in the chain (or one already offered), a group
    /// that is not IPv4 multicast, port 0, or a wait out of range; or there are too many.
    #[error("multicast offer {index} is invalid: {why}")]
    MulticastOffer {
        /// Offer index.
        index: usize,
        /// What is wrong.
        why: &'static str,
    },
}

fn check_text(field: &'static str, s: &str) -> Result<(), InvalidManifest> {
    if s.is_empty() || s.len() > MAX_TEXT || s.chars().any(char::is_control) {
        return Err(InvalidManifest::Text { field });
    }
    Ok(())
}

/// True if `mac` is lower-case `aa:bb:cc:dd:ee:ff`.
pub fn is_canonical_mac(mac: &str) -> bool {
    let b = mac.as_bytes();
    b.len() == 17
        && b.iter().enumerate().all(|(i, &c)| {
            if i % 3 == 2 {
                c == b':'
            } else {
                c.is_ascii_digit() || (b'a'..=b'f').contains(&c)
            }
        })
}

impl Manifest {
    /// Checks internal consistency: text fields, MAC form, chain shape, sizes, chunk layout,
    /// bounded counts.
    pub fn validate(&self) -> Result<(), InvalidManifest> {
        check_text("node", &self.node)?;
        check_text("role", &self.role)?;
        check_text("image", &self.image)?;
        if !is_canonical_mac(&self.mac) {
            return Err(InvalidManifest::Mac {
                mac: self.mac.chars().take(40).collect(),
            });
        }
        if self.boot_tries == 0 || self.boot_tries > MAX_BOOT_TRIES {
            return Err(InvalidManifest::BootTries(self.boot_tries));
        }
        let count = self.layers.len();
        if count == 0 || count > MAX_LAYERS {
            return Err(InvalidManifest::LayerCount { count });
        }
        let mut total = 0usize;
        for (index, l) in self.layers.iter().enumerate() {
            let base_expected = index == 0;
            if (l.kind == LayerKind::Base) != base_expected {
                return Err(InvalidManifest::LayerKindOrder {
                    index,
                    kind: l.kind,
                });
            }
            if l.size == 0 || l.size > MAX_LAYER_SIZE {
                return Err(InvalidManifest::LayerSize {
                    index,
                    size: l.size,
                });
            }
            if !l.chunk_size.is_power_of_two()
                || l.chunk_size < MIN_CHUNK_SIZE
                || l.chunk_size > MAX_CHUNK_SIZE
            {
                return Err(InvalidManifest::ChunkSize {
                    index,
                    chunk_size: l.chunk_size,
                });
            }
            let expected = chunk_count(l.size, l.chunk_size);
            if l.chunks.len() as u64 != expected {
                return Err(InvalidManifest::ChunkCount {
                    index,
                    listed: l.chunks.len(),
                    expected,
                });
            }
            total = total.saturating_add(l.chunks.len());
            if total > MAX_TOTAL_CHUNKS {
                return Err(InvalidManifest::TooManyChunks { total });
            }
            if !l.url.starts_with('/')
                || l.url.starts_with("//")
                || l.url.len() > MAX_TEXT
                || l.url.bytes().any(|b| b <= b' ' || b >= 0x7f)
            {
                return Err(InvalidManifest::Url {
                    index,
                    url: l.url.chars().take(80).collect(),
                });
            }
            if self.layers.iter().take(index).any(|p| p.id == l.id) {
                return Err(InvalidManifest::DuplicateLayer { id: l.id });
            }
        }
        if self.multicast.len() > MAX_MULTICAST_OFFERS {
            return Err(InvalidManifest::MulticastOffer {
                index: MAX_MULTICAST_OFFERS,
                why: "more offers than layers allowed",
            });
        }
        for (index, o) in self.multicast.iter().enumerate() {
            let why = if !self.layers.iter().any(|l| l.id == o.layer) {
                Some("layer not in the chain")
            } else if self
                .multicast
                .iter()
                .take(index)
                .any(|p| p.layer == o.layer)
            {
                Some("layer offered twice")
            } else if !o.group.ip().is_multicast() {
                Some("group is not an IPv4 multicast address")
            } else if o.group.port() == 0 {
                Some("port 0")
            } else if o.wait_secs == 0 || o.wait_secs > MAX_MULTICAST_WAIT {
                Some("wait_secs out of range")
            } else {
                None
            };
            if let Some(why) = why {
                return Err(InvalidManifest::MulticastOffer { index, why });
            }
        }
        Ok(())
    }

    /// Parses manifest JSON text and validates it (no signature check: use
    /// [`SignedManifest::verify`] for anything received).
    pub fn from_json_unverified(text: &str) -> Result<Self, ManifestError> {
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { len: text.len() });
        }
        let m: Manifest = serde_json::from_str(text).map_err(ManifestError::Json)?;
        m.validate()?;
        Ok(m)
    }

    /// The multicast offer for layer `id`, if any.
    pub fn multicast_offer(&self, id: &LayerId) -> Option<&MulticastOffer> {
        self.multicast.iter().find(|o| o.layer == *id)
    }

    /// The base layer (the first one).
    pub fn base(&self) -> Option<&LayerRef> {
        self.layers.first()
    }
}

impl SignedManifest {
    /// Serialises `manifest` and signs the text with the server key. Refuses an invalid
    /// manifest, so the server can never publish one a node would reject.
    pub fn sign(manifest: &Manifest, key: &SigningKey) -> Result<Self, ManifestError> {
        manifest.validate()?;
        let text = serde_json::to_string(manifest).map_err(ManifestError::Json)?;
        if text.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { len: text.len() });
        }
        let sig = key.sign(&signed_bytes(&text));
        Ok(Self {
            manifest: text,
            signature: hex::encode(sig.to_bytes()),
        })
    }

    /// Parses the wire document (bounded in size).
    pub fn from_json(bytes: &[u8]) -> Result<Self, ManifestError> {
        if bytes.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge { len: bytes.len() });
        }
        serde_json::from_slice(bytes).map_err(ManifestError::Json)
    }

    /// The wire document.
    pub fn to_json(&self) -> String {
        // Two plain strings: serialisation cannot fail.
        serde_json::to_string(self).unwrap_or_default()
    }

    /// Checks the signature with the trusted key, then parses and validates the manifest.
    pub fn verify(&self, key: &VerifyingKey) -> Result<Manifest, ManifestError> {
        if self.manifest.len() > MAX_MANIFEST_BYTES {
            return Err(ManifestError::TooLarge {
                len: self.manifest.len(),
            });
        }
        let mut raw = [0u8; 64];
        if self.signature.len() != 128 || hex::decode_to_slice(&self.signature, &mut raw).is_err() {
            return Err(ManifestError::SignatureEncoding);
        }
        let sig = Signature::from_bytes(&raw);
        key.verify_strict(&signed_bytes(&self.manifest), &sig)
            .map_err(|_| ManifestError::BadSignature)?;
        Manifest::from_json_unverified(&self.manifest)
    }
}

fn signed_bytes(text: &str) -> Vec<u8> {
    let mut v = Vec::with_capacity(SIGNING_CONTEXT.len() + text.len());
    v.extend_from_slice(SIGNING_CONTEXT);
    v.extend_from_slice(text.as_bytes());
    v
}

/// Parses a verifying key written as 64 hex digits (surrounding whitespace allowed), the form
/// of `/etc/strata/server.pub`.
pub fn parse_verifying_key(text: &str) -> Result<VerifyingKey, KeyParseError> {
    let t = text.trim();
    let mut raw = [0u8; 32];
    if t.len() != 64 || hex::decode_to_slice(t, &mut raw).is_err() {
        return Err(KeyParseError::Encoding);
    }
    VerifyingKey::from_bytes(&raw).map_err(|_| KeyParseError::NotAPoint)
}

/// A public key file that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum KeyParseError {
    /// Not 64 hex digits.
    #[error("public key is not 64 hex digits")]
    Encoding,
    /// Not a valid ed25519 point.
    #[error("public key is not a valid ed25519 point")]
    NotAPoint,
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::{chunk_hashes, Digest, CHUNK_SIZE};
    use proptest::prelude::*;

    fn key(seed: u8) -> SigningKey {
        SigningKey::from_bytes(&[seed; 32])
    }

    fn layer(kind: LayerKind, data: &[u8], chunk_size: u32) -> LayerRef {
        let (id, size, chunks) = chunk_hashes(data, chunk_size).unwrap();
        LayerRef {
            id,
            size,
            kind,
            chunk_size,
            chunks,
            url: format!("/layers/{id}"),
        }
    }

    fn sample() -> Manifest {
        Manifest {
            node: "node-1".into(),
            mac: "52:54:00:12:34:56".into(),
            role: "web".into(),
            image: "busybox".into(),
            version: 3,
            issued_at: 1_700_000_000,
            boot_tries: 3,
            layers: vec![
                layer(LayerKind::Base, &[1u8; 10_000], 4096),
                layer(LayerKind::Role, &[2u8; 5000], CHUNK_SIZE),
                layer(LayerKind::Node, &[3u8; 1], 4096),
            ],
            multicast: Vec::new(),
        }
    }

    fn offered() -> Manifest {
        let mut m = sample();
        m.multicast = vec![MulticastOffer {
            layer: m.layers[0].id,
            group: "239.255.77.1:9300".parse().unwrap(),
            wait_secs: 120,
        }];
        m
    }

    #[test]
    fn a_manifest_without_offers_has_no_multicast_field_and_old_ones_parse() {
        let m = sample();
        let text = serde_json::to_string(&m).unwrap();
        assert!(!text.contains("multicast"));
        assert_eq!(Manifest::from_json_unverified(&text).unwrap(), m);
        let o = offered();
        let text = serde_json::to_string(&o).unwrap();
        assert!(text.contains(r#""multicast":[{"layer":"#), "{text}");
        assert!(text.contains(r#""group":"239.255.77.1:9300""#), "{text}");
        assert_eq!(Manifest::from_json_unverified(&text).unwrap(), o);
        assert_eq!(o.multicast_offer(&o.layers[0].id), Some(&o.multicast[0]));
        assert_eq!(o.multicast_offer(&o.layers[1].id), None);
    }

    #[test]
    fn the_signature_covers_the_offer() {
        let s = SignedManifest::sign(&offered(), &key(1)).unwrap();
        let mut forged = s.clone();
        forged.manifest = forged
            .manifest
            .replace("239.255.77.1:9300", "239.255.77.2:9300");
        assert_ne!(forged.manifest, s.manifest);
        assert!(matches!(
            forged.verify(&key(1).verifying_key()),
            Err(ManifestError::BadSignature)
        ));
        assert_eq!(s.verify(&key(1).verifying_key()).unwrap(), offered());
    }

    #[test]
    fn bad_offers_are_refused() {
        type Spoil = fn(&mut MulticastOffer);
        let cases: [(&str, Spoil); 5] = [
            ("layer not in the chain", |o| o.layer = Digest([9; 32])),
            ("group is not an IPv4 multicast address", |o| {
                o.group = "10.0.0.1:9300".parse().unwrap()
            }),
            ("port 0", |o| o.group.set_port(0)),
            ("wait_secs out of range", |o| o.wait_secs = 0),
            ("wait_secs out of range", |o| {
                o.wait_secs = MAX_MULTICAST_WAIT + 1
            }),
        ];
        for (want, f) in cases {
            let mut m = offered();
            f(&mut m.multicast[0]);
            assert_eq!(
                m.validate(),
                Err(InvalidManifest::MulticastOffer {
                    index: 0,
                    why: want
                })
            );
            assert!(SignedManifest::sign(&m, &key(1)).is_err());
        }
        let mut m = offered();
        m.multicast.push(m.multicast[0].clone());
        assert_eq!(
            m.validate(),
            Err(InvalidManifest::MulticastOffer {
                index: 1,
                why: "layer offered twice"
            })
        );
    }

    #[test]
    fn sign_then_verify() {
        let m = sample();
        let s = SignedManifest::sign(&m, &key(1)).unwrap();
        let back = SignedManifest::from_json(s.to_json().as_bytes()).unwrap();
        assert_eq!(back.verify(&key(1).verifying_key()).unwrap(), m);
    }

    #[test]
    fn wrong_key_is_bad_signature() {
        let s = SignedManifest::sign(&sample(), &key(1)).unwrap();
        assert!(matches!(
            s.verify(&key(2).verifying_key()),
            Err(ManifestError::BadSignature)
        ));
    }

    #[test]
    fn edited_text_is_bad_signature() {
        let mut s = SignedManifest::sign(&sample(), &key(1)).unwrap();
        s.manifest = s.manifest.replace("\"version\":3", "\"version\":4");
        assert!(matches!(
            s.verify(&key(1).verifying_key()),
            Err(ManifestError::BadSignature)
        ));
    }

    #[test]
    fn garbage_signature_is_encoding_error() {
        let mut s = SignedManifest::sign(&sample(), &key(1)).unwrap();
        s.signature = "zz".into();
        assert!(matches!(
            s.verify(&key(1).verifying_key()),
            Err(ManifestError::SignatureEncoding)
        ));
    }

    #[test]
    fn chunk_count_mismatch_is_refused() {
        let mut m = sample();
        m.layers[0].chunks.pop();
        assert!(matches!(
            m.validate(),
            Err(InvalidManifest::ChunkCount {
                index: 0,
                listed: 2,
                expected: 3
            })
        ));
        assert!(SignedManifest::sign(&m, &key(1)).is_err());
    }

    #[test]
    fn wrong_size_is_refused() {
        let mut m = sample();
        m.layers[1].size = 0;
        assert_eq!(
            m.validate(),
            Err(InvalidManifest::LayerSize { index: 1, size: 0 })
        );
    }

    #[test]
    fn chain_shape_is_checked() {
        let mut m = sample();
        m.layers[1].kind = LayerKind::Base;
        assert!(matches!(
            m.validate(),
            Err(InvalidManifest::LayerKindOrder { index: 1, .. })
        ));
        let mut m = sample();
        m.layers.clear();
        assert_eq!(m.validate(), Err(InvalidManifest::LayerCount { count: 0 }));
        let mut m = sample();
        m.layers[2] = m.layers[0].clone();
        m.layers[2].kind = LayerKind::Node;
        assert!(matches!(
            m.validate(),
            Err(InvalidManifest::DuplicateLayer { .. })
        ));
    }

    #[test]
    fn mac_and_url_forms() {
        let mut m = sample();
        m.mac = "52:54:00:12:34:5G".into();
        assert!(matches!(m.validate(), Err(InvalidManifest::Mac { .. })));
        let mut m = sample();
        m.mac = "52:54:00:AB:34:56".into();
        assert!(matches!(m.validate(), Err(InvalidManifest::Mac { .. })));
        let mut m = sample();
        m.layers[0].url = "http://evil/x".into();
        assert!(matches!(
            m.validate(),
            Err(InvalidManifest::Url { index: 0, .. })
        ));
    }

    #[test]
    fn unknown_fields_are_refused() {
        let m = sample();
        let mut v = serde_json::to_value(&m).unwrap();
        v["extra"] = serde_json::json!(1);
        assert!(matches!(
            Manifest::from_json_unverified(&v.to_string()),
            Err(ManifestError::Json(_))
        ));
    }

    #[test]
    fn key_file_parses() {
        let k = key(7).verifying_key();
        let text = format!("{}\n", hex::encode(k.as_bytes()));
        assert_eq!(parse_verifying_key(&text).unwrap(), k);
        assert_eq!(parse_verifying_key("abc"), Err(KeyParseError::Encoding));
    }

    fn any_kindless_layer() -> impl Strategy<Value = (u64, u32, String)> {
        (1u64..200_000, 12u32..=16, "/[a-z0-9][a-z0-9/]{0,40}")
            .prop_map(|(size, shift, url)| (size, 1u32 << shift, url))
    }

    prop_compose! {
        fn any_manifest()(
            node in "[a-z][a-z0-9-]{0,20}",
            mac in proptest::array::uniform6(any::<u8>()),
            role in "[a-z]{1,10}",
            image in "[a-z]{1,10}",
            version in any::<u64>(),
            issued_at in any::<u64>(),
            boot_tries in 1u32..=MAX_BOOT_TRIES,
            layers in proptest::collection::vec((any_kindless_layer(), any::<[u8; 32]>()), 1..5),
            offer in proptest::option::of((any::<[u8; 3]>(), 1u16.., 1u32..=MAX_MULTICAST_WAIT)),
        ) -> Manifest {
            let layers = layers.into_iter().enumerate().map(|(i, ((size, cs, url), seed))| {
                let n = chunk_count(size, cs);
                let mut id = seed;
                id[0] = i as u8; // distinct ids
                LayerRef {
                    id: Digest(id),
                    size,
                    kind: match i { 0 => LayerKind::Base, 1 => LayerKind::Role, _ => LayerKind::Node },
                    chunk_size: cs,
                    chunks: (0..n).map(|c| Digest::of(&c.to_le_bytes())).collect(),
                    url,
                }
            }).collect::<Vec<LayerRef>>();
            let multicast = offer.map(|([a, b, c], port, wait_secs)| MulticastOffer {
                layer: layers[0].id,
                group: std::net::SocketAddrV4::new(std::net::Ipv4Addr::new(224 | (a & 15), b, c, 1), port),
                wait_secs,
            }).into_iter().collect();
            Manifest {
                node,
                mac: mac.iter().map(|b| format!("{b:02x}")).collect::<Vec<_>>().join(":"),
                role, image, version, issued_at, boot_tries, layers, multicast,
            }
        }
    }

    proptest! {
        #[test]
        fn signed_round_trip(m in any_manifest()) {
            let s = SignedManifest::sign(&m, &key(9)).unwrap();
            let wire = s.to_json();
            let back = SignedManifest::from_json(wire.as_bytes()).unwrap();
            prop_assert_eq!(&back, &s);
            prop_assert_eq!(back.verify(&key(9).verifying_key()).unwrap(), m);
        }

        #[test]
        fn any_flipped_signature_byte_fails(m in any_manifest(), pos in 0usize..128) {
            let mut s = SignedManifest::sign(&m, &key(9)).unwrap();
            let mut sig = s.signature.into_bytes();
            sig[pos] = if sig[pos] == b'0' { b'1' } else { b'0' };
            s.signature = String::from_utf8(sig).unwrap();
            prop_assert!(s.verify(&key(9).verifying_key()).is_err());
        }

        #[test]
        fn arbitrary_json_never_panics(text in ".{0,200}") {
            let _ = SignedManifest::from_json(text.as_bytes());
            let _ = Manifest::from_json_unverified(&text);
        }
    }
}
