//! iSCSI PDU parser (RFC 7143 §11): whatever parses (any digest setting) must serialise
//! and parse back to the same PDU, and nothing panics (STYLE #9).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/iscsi/pdu.rs"]
mod pdu;

fuzz_target!(|data: &[u8]| {
    for (header, dg) in [(false, false), (true, false), (false, true), (true, true)] {
        let d = pdu::Digests { header, data: dg };
        if let Ok((p, used)) = pdu::Pdu::parse(data, d, 1 << 24) {
            assert!(used <= data.len());
            let wire = p.to_bytes(d);
            let (q, n) = pdu::Pdu::parse(&wire, d, 1 << 24).expect("a serialised PDU parses");
            assert_eq!(n, wire.len());
            assert_eq!(p, q);
        }
    }
    if let Ok(b) = pdu::Bhs::parse(data) {
        assert_eq!(pdu::Bhs::parse(&b.to_bytes(0, 0)).expect("a serialised BHS parses"), b);
    }
});
