//! An HTTP/1.1 response from an untrusted server: the head parser and the body framings
//! (Content-Length, chunked, close) never panic and never read past their bounds.
#![no_main]

use std::io::Read;

use libfuzzer_sys::fuzz_target;
use node_init::http::parse_response;

fuzz_target!(|data: &[u8]| {
    if let Ok(mut r) = parse_response(data) {
        let mut body = Vec::new();
        let ok = r.by_ref().take(1 << 20).read_to_end(&mut body).is_ok();
        // A Content-Length body (not chunked) never yields more than it announced.
        if let (true, Some(cl), false) = (ok, r.content_length, r.is_chunked()) {
            assert!(body.len() as u64 <= cl);
        }
    }
});
