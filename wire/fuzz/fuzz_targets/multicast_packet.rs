//! Multicast packets on arbitrary bytes: `Packet::parse` never panics, and anything that
//! parses re-serialises to bytes that parse to the same packet. The input is also cut into
//! datagrams (2-byte length prefixes) and fed to a receiver core, which must not panic and
//! must never hand out a chunk that does not hash to its announced hash.
#![no_main]

use std::net::{Ipv4Addr, SocketAddr, SocketAddrV4};
use std::time::{Duration, Instant};

use libfuzzer_sys::fuzz_target;
use wire::chunk::Digest;
use wire::multicast::packet::Packet;
use wire::multicast::receiver::{Action, Expect, ReceiverCore};

fuzz_target!(|data: &[u8]| {
    if let Ok(p) = Packet::parse(data) {
        let bytes = p.to_bytes();
        assert_eq!(Packet::parse(&bytes).expect("re-parse"), p);
    }
    let from = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 9000));
    let mut core = ReceiverCore::new(Expect::Any, 1, 4);
    let t0 = Instant::now();
    let mut rest = data;
    let mut i = 0u64;
    while rest.len() >= 2 {
        let n = usize::from(u16::from_be_bytes([rest[0], rest[1]])).min(rest.len() - 2);
        let (dgram, tail) = rest[2..].split_at(n);
        rest = tail;
        i += 1;
        let now = t0 + Duration::from_millis(i * 7);
        let mut acts = core.on_packet(dgram, from, now);
        acts.extend(core.on_timeout(now));
        for a in acts {
            if let Action::Write { chunk, data, .. } = a {
                assert_eq!(Some(Digest::of(&data)), core.chunk_hash(chunk));
            }
        }
    }
});
