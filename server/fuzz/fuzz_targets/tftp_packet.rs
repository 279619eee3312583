//! TFTP packet parser: parse → serialise → parse must give the same packet, and nothing
//! panics (STYLE #9).
#![no_main]

use libfuzzer_sys::fuzz_target;

#[allow(dead_code)]
#[path = "../../src/boot/tftp/packet.rs"]
mod packet;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = packet::Packet::parse(data) {
        let q = packet::Packet::parse(&p.to_bytes()).expect("a serialised packet parses");
        assert_eq!(p, q);
    }
});
