//! Extents documents (`GET /layers/{id}/extents`) on arbitrary bytes: never panics; whatever
//! parses is canonical and round-trips (parse → serialise → parse gives the same list), and
//! `within` stays inside both the window and the extents.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::extents::Extents;

fuzz_target!(|data: &[u8]| {
    if let Ok(e) = Extents::parse(data) {
        let back = Extents::parse(&e.to_json()).expect("a parsed list re-parses");
        assert_eq!(back, e);
        let size = e.size();
        let window = size / 3..size - size / 3;
        let mut prev = window.start;
        for r in e.within(window.clone()) {
            assert!(r.start >= prev && r.end <= window.end && r.start < r.end);
            assert!(e.ranges().iter().any(|x| x.start <= r.start && r.end <= x.end));
            prev = r.end;
        }
    }
});
