//! iSCSI text key=value parser (RFC 7143 §6.1): whatever parses must serialise and parse
//! back to the same pairs; numbers and binary values never panic (STYLE #9).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/iscsi/text.rs"]
mod text;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = text::TextPairs::parse(data) {
        let q = text::TextPairs::parse(&p.to_bytes()).expect("serialised text parses");
        assert_eq!(p, q);
        for (_, v) in &p.0 {
            let _ = text::parse_number(v);
            let _ = text::parse_binary(v);
        }
    }
});
