//! The text the module archive builder reads out of an image (server/src/build/modules.rs):
//! `modinfo` output (its fields come from the module file) and `modules.builtin`. Arbitrary
//! text never panics; names come back non-empty with `-` read as `_`: dependencies trimmed and
//! without `,`, soft dependencies without whitespace or the `pre:`/`post:` keywords, built-in
//! names without `/`.
#![no_main]

use libfuzzer_sys::fuzz_target;
use strata_server::build::modules::{builtin_names, parse_modinfo};

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let (deps, pre) = parse_modinfo(&text);
    for d in &deps {
        assert!(
            !d.is_empty() && !d.contains(',') && !d.contains('-') && d.trim() == d,
            "dependency {d:?}"
        );
    }
    for p in &pre {
        assert!(
            !p.is_empty() && !p.contains('-') && !p.chars().any(char::is_whitespace),
            "soft dependency {p:?}"
        );
        assert!(p != "pre:" && p != "post:", "keyword taken as a name: {p:?}");
    }
    for b in builtin_names(&text) {
        assert!(!b.is_empty() && !b.contains('-') && !b.contains('/'), "builtin {b:?}");
    }
});
