//! The kernel command line: any text parses or is refused with an error, never a panic, and
//! whatever parses has a canonical MAC.
#![no_main]

use libfuzzer_sys::fuzz_target;
use node_init::cmdline::Cmdline;

fuzz_target!(|data: &[u8]| {
    if let Ok(text) = std::str::from_utf8(data) {
        if let Ok(c) = Cmdline::parse(text) {
            if let Some(mac) = &c.mac {
                assert_eq!(mac.len(), 17);
                assert_eq!(mac, &mac.to_ascii_lowercase());
            }
        }
    }
});
