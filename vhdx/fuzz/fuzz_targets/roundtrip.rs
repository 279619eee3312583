//! Parse → serialise → parse for every structure the engine both reads and writes.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    assert!(vhdx::fuzzing::roundtrip(data), "a structure changed in a round trip");
});
