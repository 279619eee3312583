//! iSCSI text key=value pairs (RFC 7143 §6.1 "Text Format", §6.2 negotiation, §13 keys).
//!
//! A text data segment is a list of `key=value` strings, each ended by a NUL. Keys are at
//! most 63 bytes of `a-z A-Z 0-9 . - + @ _`; values use UTF-8 and are at most 8192 bytes
//! (the longest, CHAP challenges, may legitimately be long). A key given twice in one
//! segment is a protocol error (§6.2).

use thiserror::Error;

/// Longest key name (RFC 7143 §6.1).
pub const MAX_KEY_LEN: usize = 63;
/// Longest value we accept (RFC 7143 §6.1 allows 255 for most, 8192 for binary values).
pub const MAX_VALUE_LEN: usize = 8192;
/// Most pairs in one negotiation we keep before calling it abuse.
pub const MAX_PAIRS: usize = 256;

/// Errors decoding text.
#[derive(Debug, Error, PartialEq, Eq)]
pub enum TextError {
    /// A string without `=`.
    #[error("text item {index} has no '='")]
    MissingEquals {
        /// Position in the list.
        index: usize,
    },
    /// A key with a character RFC 7143 §6.1 does not allow, empty or too long.
    #[error("invalid key {key:?}")]
    InvalidKey {
        /// The key (lossy).
        key: String,
    },
    /// A value that is not UTF-8 or too long.
    #[error("invalid value for {key}")]
    InvalidValue {
        /// The key.
        key: String,
    },
    /// The same key twice.
    #[error("key {key} given twice")]
    Duplicate {
        /// The key.
        key: String,
    },
    /// More than [`MAX_PAIRS`] pairs.
    #[error("more than {MAX_PAIRS} keys")]
    TooMany,
}

/// An ordered list of key=value pairs.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct TextPairs(pub Vec<(String, String)>);

fn valid_key(k: &[u8]) -> bool {
    !k.is_empty()
        && k.len() <= MAX_KEY_LEN
        && k.iter()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, b'.' | b'-' | b'+' | b'@' | b'_'))
}

impl TextPairs {
    /// Parses a text data segment. Empty strings between NULs (padding or a final NUL)
    /// are skipped; a last item without its NUL is accepted, as initiators send it.
    pub fn parse(data: &[u8]) -> Result<TextPairs, TextError> {
        let mut out: Vec<(String, String)> = Vec::new();
        for (index, item) in data
            .split(|&b| b == 0)
            .filter(|s| !s.is_empty())
            .enumerate()
        {
            let Some(eq) = item.iter().position(|&b| b == b'=') else {
                return Err(TextError::MissingEquals { index });
            };
            let (k, v) = (
                item.get(..eq).unwrap_or_default(),
                item.get(eq + 1..).unwrap_or_default(),
            );
            if !valid_key(k) {
                return Err(TextError::InvalidKey {
                    key: String::from_utf8_lossy(k).into_owned(),
                });
            }
            let key = String::from_utf8_lossy(k).into_owned();
            let value = match std::str::from_utf8(v) {
                Ok(v) if v.len() <= MAX_VALUE_LEN => v.to_owned(),
                _ => return Err(TextError::InvalidValue { key }),
            };
            if out.iter().any(|(k, _)| *k == key) {
                return Err(TextError::Duplicate { key });
            }
            if out.len() >= MAX_PAIRS {
                return Err(TextError::TooMany);
            }
            out.push((key, value));
        }
        Ok(TextPairs(out))
    }

    /// The data segment: each pair as `key=value\0`.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut v = Vec::new();
        for (k, val) in &self.0 {
            v.extend_from_slice(k.as_bytes());
            v.push(b'=');
            v.extend_from_slice(val.as_bytes());
            v.push(0);
        }
        v
    }

    /// The value of `key`.
    pub fn get(&self, key: &str) -> Option<&str> {
        self.0
            .iter()
            .find(|(k, _)| k == key)
            .map(|(_, v)| v.as_str())
    }

    /// Appends a pair.
    pub fn push(&mut self, key: impl Into<String>, value: impl Into<String>) {
        self.0.push((key.into(), value.into()));
    }

    /// Whether there are no pairs.
    pub fn is_empty(&self) -> bool {
        self.0.is_empty()
    }
}

/// Parses an RFC 7143 §6.1 numerical value: decimal, `0x` hex (up to 64 bits).
pub fn parse_number(v: &str) -> Option<u64> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        u64::from_str_radix(h, 16).ok()
    } else if !v.is_empty() && v.bytes().all(|b| b.is_ascii_digit()) {
        v.parse().ok()
    } else {
        None
    }
}

/// Parses a binary value (RFC 7143 §6.1 "binary-value"): `0x` hex or `0b` base64.
pub fn parse_binary(v: &str) -> Option<Vec<u8>> {
    if let Some(h) = v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        let h = if h.len() % 2 == 1 {
            format!("0{h}")
        } else {
            h.to_owned()
        };
        hex::decode(h).ok()
    } else if let Some(b) = v.strip_prefix("0b").or_else(|| v.strip_prefix("0B")) {
        base64_decode(b)
    } else {
        None
    }
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    let mut out = Vec::new();
    let mut acc = 0u32;
    let mut bits = 0;
    for c in s.bytes() {
        let v = match c {
            b'A'..=b'Z' => c - b'A',
            b'a'..=b'z' => c - b'a' + 26,
            b'0'..=b'9' => c - b'0' + 52,
            b'+' => 62,
            b'/' => 63,
            b'=' => break,
            _ => return None,
        };
        acc = (acc << 6) | u32::from(v);
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((acc >> bits) as u8);
        }
    }
    Some(out)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use proptest::prelude::*;

    pub(crate) fn any_pairs() -> impl Strategy<Value = TextPairs> {
        proptest::collection::btree_map("[A-Za-z0-9.+@_-]{1,63}", "[^\0]{0,40}", 0..12)
            .prop_map(|m| TextPairs(m.into_iter().collect()))
    }

    proptest! {
        #[test]
        fn text_round_trips(p in any_pairs()) {
            prop_assert_eq!(TextPairs::parse(&p.to_bytes())?, p);
        }

        #[test]
        fn arbitrary_text_never_panics(b in proptest::collection::vec(any::<u8>(), 0..300)) {
            if let Ok(p) = TextPairs::parse(&b) {
                prop_assert_eq!(TextPairs::parse(&p.to_bytes())?, p);
            }
        }
    }

    #[test]
    fn real_login_text() {
        let data = b"InitiatorName=iqn.2007-10.com.github:sahlberg:libiscsi:iscsi-ls\0SessionType=Discovery\0HeaderDigest=None,CRC32C\0\0\0";
        let p = TextPairs::parse(data).unwrap();
        assert_eq!(p.get("SessionType"), Some("Discovery"));
        assert_eq!(p.get("HeaderDigest"), Some("None,CRC32C"));
        assert_eq!(p.0.len(), 3);
    }

    #[test]
    fn errors_are_named() {
        assert_eq!(
            TextPairs::parse(b"Key\0").unwrap_err(),
            TextError::MissingEquals { index: 0 }
        );
        assert_eq!(
            TextPairs::parse(b"A=1\0A=2\0").unwrap_err(),
            TextError::Duplicate { key: "A".into() }
        );
        assert!(matches!(
            TextPairs::parse(b"Bad Key=1\0"),
            Err(TextError::InvalidKey { .. })
        ));
        assert!(matches!(
            TextPairs::parse(b"=1\0"),
            Err(TextError::InvalidKey { .. })
        ));
        assert!(matches!(
            TextPairs::parse(b"K=\xff\0"),
            Err(TextError::InvalidValue { .. })
        ));
    }

    #[test]
    fn numbers_and_binary() {
        assert_eq!(parse_number("262144"), Some(262144));
        assert_eq!(parse_number("0x10"), Some(16));
        assert_eq!(parse_number("-1"), None);
        assert_eq!(parse_number(""), None);
        assert_eq!(parse_binary("0x0a0B"), Some(vec![10, 11]));
        assert_eq!(parse_binary("0xabc"), Some(vec![0x0a, 0xbc]));
        assert_eq!(parse_binary("0bAQID"), Some(vec![1, 2, 3]));
        assert_eq!(parse_binary("12"), None);
    }
}
