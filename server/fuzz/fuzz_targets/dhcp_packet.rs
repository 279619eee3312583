//! DHCP packet parser: parse → serialise → parse must give the same packet, and nothing
//! panics (STYLE #9).
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::dhcp::DhcpPacket;

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = DhcpPacket::parse(data) {
        let bytes = p.to_bytes();
        let q = DhcpPacket::parse(&bytes).expect("a serialised packet parses");
        assert_eq!(p, q);
        // Accessors on any parsed packet are total.
        let _ = (p.mac(), p.options.client_arch(), p.options.vendor_class(), p.reply_skeleton());
    }
});
