//! Layer identity and chunk hashing shared by the server (which publishes a layer's hashes in
//! the manifest) and node-init (which verifies a layer while it arrives and repairs only the
//! damaged chunks of a cached layer).
//!
//! Layout: a layer of `size` bytes is cut into `ceil(size / chunk_size)` chunks; chunk `i`
//! covers bytes `[i * chunk_size, min((i + 1) * chunk_size, size))`. A chunk's hash is the
//! plain blake3 of its bytes. A layer's identity ([`LayerId`]) is the blake3 of the whole file.
//! An empty layer has no chunks.

use std::fmt;
use std::io::{self, Read};
use std::ops::Range;
use std::str::FromStr;

use serde::{Deserialize, Deserializer, Serialize, Serializer};

/// Default chunk size: 1 MiB.
pub const CHUNK_SIZE: u32 = 1 << 20;
/// Smallest chunk size a manifest may use (one 4 KiB page).
pub const MIN_CHUNK_SIZE: u32 = 4096;
/// Largest chunk size a manifest may use (64 MiB): a node buffers at most one chunk.
pub const MAX_CHUNK_SIZE: u32 = 64 << 20;

/// A 32-byte blake3 digest, written as 64 lower-case hex digits.
#[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct Digest(pub [u8; 32]);

/// A layer's identity: the blake3 of the whole layer file.
pub type LayerId = Digest;
/// The blake3 of one chunk of a layer.
pub type ChunkHash = Digest;

/// A hex digest that did not parse.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("not a blake3 digest (64 hex digits): {text:?}")]
pub struct DigestParseError {
    /// The offending text, cut to 80 characters.
    pub text: String,
}

impl Digest {
    /// The digest of `bytes`.
    pub fn of(bytes: &[u8]) -> Self {
        Self(*blake3::hash(bytes).as_bytes())
    }

    /// The raw 32 bytes.
    pub fn as_bytes(&self) -> &[u8; 32] {
        &self.0
    }

    /// 64 lower-case hex digits.
    pub fn to_hex(&self) -> String {
        hex::encode(self.0)
    }
}

impl From<blake3::Hash> for Digest {
    fn from(h: blake3::Hash) -> Self {
        Self(*h.as_bytes())
    }
}

impl fmt::Display for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for b in &self.0 {
            write!(f, "{b:02x}")?;
        }
        Ok(())
    }
}

impl fmt::Debug for Digest {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Digest({self})")
    }
}

impl FromStr for Digest {
    type Err = DigestParseError;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let err = || DigestParseError {
            text: s.chars().take(80).collect(),
        };
        // Lower-case only: one digest has exactly one spelling (it names files and URLs).
        if s.len() != 64
            || !s
                .bytes()
                .all(|b| b.is_ascii_digit() || (b'a'..=b'f').contains(&b))
        {
            return Err(err());
        }
        let mut out = [0u8; 32];
        hex::decode_to_slice(s, &mut out).map_err(|_| err())?;
        Ok(Self(out))
    }
}

impl Serialize for Digest {
    fn serialize<S: Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&self.to_hex())
    }
}

impl<'de> Deserialize<'de> for Digest {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        let s = <std::borrow::Cow<'de, str>>::deserialize(d)?;
        s.parse().map_err(serde::de::Error::custom)
    }
}

/// Number of chunks of a layer of `size` bytes. `chunk_size` must not be 0.
pub fn chunk_count(size: u64, chunk_size: u32) -> u64 {
    if chunk_size == 0 {
        return 0;
    }
    size.div_ceil(u64::from(chunk_size))
}

/// Byte range of chunk `index` in a layer of `size` bytes (empty if `index` is past the end).
pub fn chunk_range(index: u64, size: u64, chunk_size: u32) -> Range<u64> {
    let cs = u64::from(chunk_size);
    let start = index.saturating_mul(cs).min(size);
    let end = start.saturating_add(cs).min(size);
    start..end
}

/// Hashes a whole layer: returns its identity (blake3 of all bytes), its size, and the hash of
/// each `chunk_size` chunk. Reads the stream once.
pub fn chunk_hashes(
    mut reader: impl Read,
    chunk_size: u32,
) -> io::Result<(LayerId, u64, Vec<ChunkHash>)> {
    if chunk_size == 0 {
        return Err(io::Error::new(io::ErrorKind::InvalidInput, "chunk size 0"));
    }
    let mut whole = blake3::Hasher::new();
    let mut chunk = blake3::Hasher::new();
    let mut in_chunk: u64 = 0;
    let mut size: u64 = 0;
    let mut chunks = Vec::new();
    let mut buf = vec![0u8; 256 * 1024];
    loop {
        let n = match reader.read(&mut buf) {
            Ok(0) => break,
            Ok(n) => n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        let mut data = buf.get(..n).unwrap_or_default();
        whole.update(data);
        size += n as u64;
        while !data.is_empty() {
            let room = u64::from(chunk_size) - in_chunk;
            let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let (head, tail) = data.split_at(take);
            chunk.update(head);
            in_chunk += take as u64;
            data = tail;
            if in_chunk == u64::from(chunk_size) {
                chunks.push(Digest::from(chunk.finalize()));
                chunk.reset();
                in_chunk = 0;
            }
        }
    }
    if in_chunk > 0 {
        chunks.push(Digest::from(chunk.finalize()));
    }
    Ok((Digest::from(whole.finalize()), size, chunks))
}

/// Where a [`LayerVerifier`] found a mismatch.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A chunk's bytes do not hash to the published chunk hash.
    #[error("chunk {index} (bytes {}..{}) does not match its hash", range.start, range.end)]
    ChunkMismatch {
        /// Chunk index.
        index: u64,
        /// Its byte range in the layer.
        range: Range<u64>,
    },
    /// More bytes were fed than the layer's size.
    #[error("layer longer than its size {size}")]
    TooLong {
        /// The expected size.
        size: u64,
    },
    /// All chunks matched but the whole-file hash does not (the chunk list and id disagree).
    #[error("layer hash {actual} is not the expected {expected}")]
    LayerMismatch {
        /// Expected identity.
        expected: LayerId,
        /// Hash of the bytes received.
        actual: LayerId,
    },
    /// `finish` was called before all bytes arrived.
    #[error("layer incomplete: {received} of {size} bytes")]
    Incomplete {
        /// Bytes fed.
        received: u64,
        /// The expected size.
        size: u64,
    },
}

/// Verifies a layer as its bytes arrive in order, chunk by chunk: a receiver calls
/// [`LayerVerifier::update`] with each buffer and learns of a bad chunk as soon as the chunk is
/// complete, then [`LayerVerifier::finish`] checks the whole-file identity.
pub struct LayerVerifier<'a> {
    id: LayerId,
    size: u64,
    chunk_size: u32,
    chunks: &'a [ChunkHash],
    whole: blake3::Hasher,
    chunk: blake3::Hasher,
    received: u64,
}

impl<'a> LayerVerifier<'a> {
    /// A verifier for a layer with identity `id`, `size` bytes and the given chunk hashes.
    /// The caller has checked (as [`crate::manifest`] does) that `chunks.len()` equals
    /// `chunk_count(size, chunk_size)` and `chunk_size` is not 0.
    pub fn new(id: LayerId, size: u64, chunk_size: u32, chunks: &'a [ChunkHash]) -> Self {
        Self {
            id,
            size,
            chunk_size: chunk_size.max(1),
            chunks,
            whole: blake3::Hasher::new(),
            chunk: blake3::Hasher::new(),
            received: 0,
        }
    }

    /// Bytes fed so far.
    pub fn received(&self) -> u64 {
        self.received
    }

    /// Feeds the next bytes of the layer. On a mismatch the verifier is left at the start of
    /// the bad chunk's data (`received()` is where that chunk began plus what was fed of it).
    pub fn update(&mut self, mut data: &[u8]) -> Result<(), VerifyError> {
        if (data.len() as u64) > self.size - self.received {
            return Err(VerifyError::TooLong { size: self.size });
        }
        let cs = u64::from(self.chunk_size);
        while !data.is_empty() {
            let in_chunk = self.received % cs;
            let room = cs - in_chunk;
            let take = data.len().min(usize::try_from(room).unwrap_or(usize::MAX));
            let (head, tail) = data.split_at(take);
            self.chunk.update(head);
            self.whole.update(head);
            self.received += take as u64;
            data = tail;
            if in_chunk + take as u64 == cs || self.received == self.size {
                let index = (self.received - 1) / cs;
                let got = Digest::from(self.chunk.finalize());
                self.chunk.reset();
                let expected = usize::try_from(index).ok().and_then(|i| self.chunks.get(i));
                if expected != Some(&got) {
                    return Err(VerifyError::ChunkMismatch {
                        index,
                        range: chunk_range(index, self.size, self.chunk_size),
                    });
                }
            }
        }
        Ok(())
    }

    /// Checks that the whole layer arrived and hashes to its identity.
    pub fn finish(self) -> Result<(), VerifyError> {
        if self.received != self.size {
            return Err(VerifyError::Incomplete {
                received: self.received,
                size: self.size,
            });
        }
        let actual = Digest::from(self.whole.finalize());
        if actual != self.id {
            return Err(VerifyError::LayerMismatch {
                expected: self.id,
                actual,
            });
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[test]
    fn empty_layer_has_no_chunks() {
        let (id, size, chunks) = chunk_hashes(&[][..], CHUNK_SIZE).unwrap();
        assert_eq!(size, 0);
        assert!(chunks.is_empty());
        assert_eq!(id, Digest::of(b""));
    }

    #[test]
    fn zero_chunk_size_is_an_error() {
        assert!(chunk_hashes(&b"x"[..], 0).is_err());
    }

    #[test]
    fn digest_rejects_upper_case_and_bad_length() {
        let d = Digest::of(b"abc");
        assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        assert!(d.to_string().to_uppercase().parse::<Digest>().is_err());
        assert!("abc".parse::<Digest>().is_err());
        assert!("zz".repeat(32).parse::<Digest>().is_err());
    }

    #[test]
    fn serde_is_a_hex_string() {
        let d = Digest::of(b"abc");
        let json = serde_json::to_string(&d).unwrap();
        assert_eq!(json, format!("\"{d}\""));
        assert_eq!(serde_json::from_str::<Digest>(&json).unwrap(), d);
    }

    #[test]
    fn verifier_names_the_flipped_chunk() {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7) as u8).collect();
        let (id, size, chunks) = chunk_hashes(&data[..], 4096).unwrap();
        let mut bad = data.clone();
        bad[5000] ^= 1;
        let mut v = LayerVerifier::new(id, size, 4096, &chunks);
        v.update(&bad[..4096]).unwrap();
        let err = v.update(&bad[4096..]).unwrap_err();
        assert_eq!(
            err,
            VerifyError::ChunkMismatch {
                index: 1,
                range: 4096..8192
            }
        );
    }

    proptest! {
        #[test]
        fn chunks_match_direct_hashes(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            cs in 1u32..5000,
        ) {
            let (id, size, chunks) = chunk_hashes(&data[..], cs).unwrap();
            prop_assert_eq!(size, data.len() as u64);
            prop_assert_eq!(id, Digest::of(&data));
            prop_assert_eq!(chunks.len() as u64, chunk_count(size, cs));
            for (i, c) in chunks.iter().enumerate() {
                let r = chunk_range(i as u64, size, cs);
                prop_assert_eq!(*c, Digest::of(&data[r.start as usize..r.end as usize]));
            }
        }

        #[test]
        fn verifier_accepts_any_split(
            data in proptest::collection::vec(any::<u8>(), 0..20_000),
            cs in 1u32..5000,
            cuts in proptest::collection::vec(any::<prop::sample::Index>(), 0..8),
        ) {
            let (id, size, chunks) = chunk_hashes(&data[..], cs).unwrap();
            let mut points: Vec<usize> = cuts.iter().map(|c| c.index(data.len() + 1)).collect();
            points.push(0);
            points.push(data.len());
            points.sort_unstable();
            let mut v = LayerVerifier::new(id, size, cs, &chunks);
            for w in points.windows(2) {
                v.update(&data[w[0]..w[1]]).unwrap();
            }
            v.finish().unwrap();
        }

        #[test]
        fn digest_text_round_trips(bytes in any::<[u8; 32]>()) {
            let d = Digest(bytes);
            prop_assert_eq!(d.to_string().parse::<Digest>().unwrap(), d);
        }
    }
}
