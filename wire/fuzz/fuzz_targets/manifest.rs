//! Manifest parse + verify on arbitrary bytes: never panics; anything that parses as a
//! manifest and validates re-serialises, re-signs and verifies to the same value.
#![no_main]

use ed25519_dalek::SigningKey;
use libfuzzer_sys::fuzz_target;
use wire::manifest::{Manifest, SignedManifest};

fuzz_target!(|data: &[u8]| {
    let key = SigningKey::from_bytes(&[7u8; 32]);
    if let Ok(s) = SignedManifest::from_json(data) {
        let _ = s.verify(&key.verifying_key());
    }
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(m) = Manifest::from_json_unverified(text) {
            let signed = SignedManifest::sign(&m, &key).expect("a validated manifest signs");
            let back = SignedManifest::from_json(signed.to_json().as_bytes()).expect("parse");
            assert_eq!(back.verify(&key.verifying_key()).expect("verify"), m);
        }
    }
});
