//! The receiver's protocol core (docs/multicast.md, "Receiver"), sans-IO: it is fed datagrams
//! and the time, and answers with [`Action`]s (packets to send, verified chunks to write). The
//! socket loop around it lives in [`super::net`].
//!
//! Rules it enforces: only one session is followed at a time (the first announcement that
//! matches the [`Expect`]); every other session's packets are dropped and counted; a chunk is
//! handed out for writing only after its bytes hash to the chunk hash (from the signed manifest
//! or from an announced hash list whose digest matched the announcement); a chunk that fails is
//! thrown away, counted and asked for again. Memory is bounded: at most `max_buffered` chunks
//! are assembled at once.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use crate::chunk::{ChunkHash, Digest, LayerId};

use super::packet::{
    hash_list_digest, Announce, Data, Evict, Layout, Nack, Packet, ReceiverPhase, SessionId,
    SessionPhase, Status, SymbolRange, MAX_NACK_RANGES,
};

/// How often a receiver reports its state while a session runs.
pub const STATUS_INTERVAL: Duration = Duration::from_millis(200);
/// How often the receiver looks for gaps to ask for.
pub const NACK_TICK: Duration = Duration::from_millis(20);
/// Symbols a receiver waits past a gap before asking for it (reordering slack).
pub const NACK_LAG: u32 = 64;
/// A chunk already asked for is not asked for again before this.
pub const RENACK: Duration = Duration::from_millis(250);
/// Most NACK packets per tick.
pub const NACKS_PER_TICK: usize = 8;

/// What the receiver accepts.
#[derive(Debug, Clone)]
pub enum Expect {
    /// The first session on the group, whatever its layer (chunk hashes come from the
    /// announced list, checked against the announced digest; the whole file is checked against
    /// the announced layer id at the end).
    Any,
    /// A session for this layer id (hashes from the announced list).
    Layer(LayerId),
    /// A session for this layer, with sizes and chunk hashes known from a signed manifest:
    /// announced hashes are never used.
    Known {
        /// Layer id.
        id: LayerId,
        /// Size in bytes.
        size: u64,
        /// Chunk size.
        chunk_size: u32,
        /// Chunk hashes.
        chunks: Vec<ChunkHash>,
    },
}

impl Expect {
    fn layer(&self) -> Option<LayerId> {
        match self {
            Expect::Any => None,
            Expect::Layer(id) | Expect::Known { id, .. } => Some(*id),
        }
    }
}

/// Counters a receiver keeps (reported by the CLI and node-init).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct RecvStats {
    /// Datagrams seen.
    pub packets: u64,
    /// Datagram bytes seen.
    pub bytes: u64,
    /// Data packets of the followed session.
    pub data_packets: u64,
    /// Data packets for symbols already held (duplicates, repairs meant for others).
    pub duplicates: u64,
    /// Datagrams that did not parse.
    pub malformed: u64,
    /// Packets of another session.
    pub foreign: u64,
    /// Data packets whose length or index does not fit the layout.
    pub bad_symbols: u64,
    /// Assembled chunks that did not match their hash (thrown away, asked for again).
    pub bad_chunks: u64,
    /// Data packets dropped because the chunk buffer limit was reached (asked for later).
    pub deferred: u64,
    /// NACK packets sent.
    pub nacks: u64,
    /// Chunks found already present and valid when the session started (resume).
    pub resumed_chunks: u64,
    /// Chunks received and verified.
    pub chunks_written: u64,
}

/// What the driver must do.
#[derive(Debug, PartialEq, Eq)]
pub enum Action {
    /// Send `bytes` to `to` (the sender, by unicast).
    Send {
        /// Destination.
        to: SocketAddr,
        /// Datagram.
        bytes: Vec<u8>,
    },
    /// The session's layout and hashes are known: the driver should check which chunks the
    /// output already holds and call [`ReceiverCore::mark_present`] (resume).
    Joined {
        /// The layer.
        layer: LayerId,
        /// Its layout.
        layout: Layout,
    },
    /// Write a verified chunk at `offset`.
    Write {
        /// Chunk index.
        chunk: u32,
        /// Byte offset in the layer.
        offset: u64,
        /// The chunk's bytes (verified against its hash).
        data: Vec<u8>,
    },
    /// The sender evicted this receiver: fetch the rest another way.
    Evicted,
    /// The session ended without this receiver complete.
    SessionEnded,
}

struct ChunkBuf {
    data: Vec<u8>,
    have: Vec<u64>,
    count: u32,
    last_nack: Option<Instant>,
}

struct Session {
    id: SessionId,
    sender: SocketAddr,
    layer: LayerId,
    layout: Layout,
    hashes: Vec<Option<ChunkHash>>,
    hash_list: Digest,
    hashes_known: u32,
    horizon: u32,
    phase: SessionPhase,
    last_heard: Instant,
}

/// The receiver state machine.
pub struct ReceiverCore {
    expect: Expect,
    receiver: u64,
    max_buffered: usize,
    session: Option<Session>,
    /// Verified chunks (per chunk, once a layout is known).
    have: Vec<bool>,
    have_count: u32,
    /// Last time each never-buffered chunk was asked for.
    nacked: HashMap<u32, Instant>,
    bufs: HashMap<u32, ChunkBuf>,
    spare: Vec<Vec<u8>>,
    /// The layout a previous session of the same layer used (resume across sessions).
    joined_once: bool,
    complete: bool,
    next_status: Option<Instant>,
    next_nack: Option<Instant>,
    // Loss measurement over one status interval.
    seq_first: Option<u32>,
    seq_last: u32,
    seq_got: u32,
    stats: RecvStats,
}

impl ReceiverCore {
    /// A receiver with a random id `receiver` that assembles at most `max_buffered` chunks
    /// at once (at least 1).
    pub fn new(expect: Expect, receiver: u64, max_buffered: usize) -> Self {
        Self {
            expect,
            receiver,
            max_buffered: max_buffered.max(1),
            session: None,
            have: Vec::new(),
            have_count: 0,
            nacked: HashMap::new(),
            bufs: HashMap::new(),
            spare: Vec::new(),
            joined_once: false,
            complete: false,
            next_status: None,
            next_nack: None,
            seq_first: None,
            seq_last: 0,
            seq_got: 0,
            stats: RecvStats::default(),
        }
    }

    /// Counters so far.
    pub fn stats(&self) -> RecvStats {
        self.stats
    }

    /// True once every chunk is verified and handed out.
    pub fn is_complete(&self) -> bool {
        self.complete
    }

    /// The followed session's layer, layout and chunk hashes (the hashes only once all are
    /// known).
    pub fn layer(&self) -> Option<(LayerId, Layout, Option<Vec<ChunkHash>>)> {
        let s = self.session.as_ref()?;
        let hashes = s.hashes.iter().copied().collect::<Option<Vec<_>>>();
        Some((s.layer, s.layout, hashes))
    }

    /// Chunk indices not yet verified (all of them before a session is joined).
    pub fn missing_chunks(&self) -> Vec<u32> {
        (0..self.have.len() as u32)
            .filter(|c| !self.have.get(*c as usize).copied().unwrap_or(false))
            .collect()
    }

    /// The hash chunk `c` must have, if known.
    pub fn chunk_hash(&self, c: u32) -> Option<ChunkHash> {
        self.session
            .as_ref()?
            .hashes
            .get(c as usize)
            .copied()
            .flatten()
    }

    /// Tells the core that chunk `c` is already present and valid in the output (the driver
    /// checked it against [`Self::chunk_hash`]).
    pub fn mark_present(&mut self, c: u32) {
        if let Some(h) = self.have.get_mut(c as usize) {
            if !*h {
                *h = true;
                self.have_count += 1;
                self.stats.resumed_chunks += 1;
                if let Some(b) = self.bufs.remove(&c) {
                    self.spare.push(b.data);
                }
            }
        }
        self.check_complete();
    }

    /// When [`Self::on_timeout`] wants to run next.
    pub fn next_deadline(&self) -> Option<Instant> {
        match (self.next_status, self.next_nack) {
            (Some(a), Some(b)) => Some(a.min(b)),
            (a, b) => a.or(b),
        }
    }

    fn check_complete(&mut self) {
        if !self.have.is_empty()
            || self
                .session
                .as_ref()
                .is_some_and(|s| s.layout.chunks() == 0)
        {
            self.complete = self.have_count as usize == self.have.len()
                && self
                    .session
                    .as_ref()
                    .is_some_and(|s| s.hashes_known as usize == s.hashes.len());
        }
    }

    fn missing_symbols(&self) -> u32 {
        let Some(s) = &self.session else { return 0 };
        let mut n: u64 = 0;
        for (c, have) in self.have.iter().enumerate() {
            if *have {
                continue;
            }
            let c = c as u32;
            n += u64::from(match self.bufs.get(&c) {
                Some(b) => s.layout.symbols_in(c) - b.count,
                None => s.layout.symbols_in(c),
            });
        }
        u32::try_from(n).unwrap_or(u32::MAX)
    }

    fn status(&mut self, phase: ReceiverPhase) -> Option<Action> {
        let s = self.session.as_ref()?;
        let loss = match self.seq_first {
            Some(first) => {
                let span = u64::from(self.seq_last.wrapping_sub(first)) + 1;
                let got = u64::from(self.seq_got).min(span);
                ((span - got) * 1000 / span) as u16
            }
            None => 0,
        };
        self.seq_first = None;
        self.seq_got = 0;
        let bytes = Packet::Status(Status {
            session: s.id,
            receiver: self.receiver,
            phase,
            loss_permille: loss,
            have_chunks: self.have_count,
            missing_symbols: self.missing_symbols(),
        })
        .to_bytes();
        Some(Action::Send {
            to: s.sender,
            bytes,
        })
    }

    /// The report a receiver sends when it stops (complete or not); the driver sends it a few
    /// times before returning.
    pub fn farewell(&mut self) -> Option<Action> {
        let phase = if self.complete {
            ReceiverPhase::Done
        } else {
            ReceiverPhase::Left
        };
        self.status(phase)
    }

    /// Feeds one datagram from `from`.
    pub fn on_packet(&mut self, buf: &[u8], from: SocketAddr, now: Instant) -> Vec<Action> {
        self.stats.packets += 1;
        self.stats.bytes += buf.len() as u64;
        let pkt = match Packet::parse(buf) {
            Ok(p) => p,
            Err(_) => {
                self.stats.malformed += 1;
                return Vec::new();
            }
        };
        let mut out = Vec::new();
        match pkt {
            Packet::Announce(a) => self.on_announce(a, from, now, &mut out),
            other => {
                let Some(s) = &mut self.session else {
                    self.stats.foreign += 1;
                    return out;
                };
                if other.session() != s.id {
                    self.stats.foreign += 1;
                    return out;
                }
                s.last_heard = now;
                match other {
                    Packet::Data(d) => self.on_data(d, now, &mut out),
                    Packet::Hashes(h) => {
                        for (i, d) in h.hashes.iter().enumerate() {
                            let c = h.first as usize + i;
                            if let Some(slot) = s.hashes.get_mut(c) {
                                if slot.is_none() {
                                    *slot = Some(*d);
                                    s.hashes_known += 1;
                                }
                            }
                        }
                        if s.hashes_known as usize == s.hashes.len() {
                            let all: Vec<Digest> = s.hashes.iter().flatten().copied().collect();
                            if hash_list_digest(&all) != s.hash_list {
                                // A forged or mixed-up hash packet: forget them all and relearn.
                                s.hashes.iter_mut().for_each(|h| *h = None);
                                s.hashes_known = 0;
                                self.stats.bad_chunks += 1;
                            } else {
                                out.push(Action::Joined {
                                    layer: s.layer,
                                    layout: s.layout,
                                });
                                // Chunks assembled while hashes were missing can be checked now.
                                let ready: Vec<u32> = self
                                    .bufs
                                    .iter()
                                    .filter(|(c, b)| b.count == s.layout.symbols_in(**c))
                                    .map(|(c, _)| *c)
                                    .collect();
                                for c in ready {
                                    self.finish_chunk(c, &mut out);
                                }
                            }
                        }
                    }
                    Packet::Evict(Evict { receiver, .. }) if receiver == self.receiver => {
                        out.push(Action::Evicted);
                    }
                    // Other receivers' reports and unrelated evictions (multicast loopback).
                    _ => {}
                }
            }
        }
        self.check_complete();
        out
    }

    fn on_announce(&mut self, a: Announce, from: SocketAddr, now: Instant, out: &mut Vec<Action>) {
        if let Some(s) = &mut self.session {
            if s.id == a.session {
                if from != s.sender {
                    // Same session id from another address: a forger, not our sender.
                    self.stats.foreign += 1;
                    return;
                }
                s.horizon = s.horizon.max(a.horizon);
                s.phase = a.phase;
                s.last_heard = now;
                if a.phase == SessionPhase::Ending && !self.complete {
                    out.push(Action::SessionEnded);
                }
                return;
            }
            // Another session. Switch only if ours ended and the new one carries our layer.
            let ours_over = s.phase == SessionPhase::Ending;
            if !(ours_over && a.layer == s.layer && a.layout == s.layout) {
                self.stats.foreign += 1;
                return;
            }
        }
        if let Some(want) = self.expect.layer() {
            if want != a.layer {
                self.stats.foreign += 1;
                return;
            }
        }
        let chunks = a.layout.chunks() as usize;
        let mut hashes: Vec<Option<ChunkHash>> = vec![None; 0];
        let mut known = 0;
        if let Expect::Known {
            size,
            chunk_size,
            chunks: list,
            ..
        } = &self.expect
        {
            if *size != a.layout.size()
                || *chunk_size != a.layout.chunk_size()
                || list.len() != chunks
                || hash_list_digest(list) != a.hash_list
            {
                // Same id, different layout or hash list: not a session we can use.
                self.stats.foreign += 1;
                return;
            }
            hashes = list.iter().copied().map(Some).collect();
            known = chunks as u32;
        } else {
            hashes.resize(chunks, None);
        }
        // A new session of the same layer keeps what we already have.
        let keep = self.joined_once && self.have.len() == chunks;
        if !keep {
            self.have = vec![false; chunks];
            self.have_count = 0;
            for (_, b) in self.bufs.drain() {
                self.spare.push(b.data);
            }
        }
        self.nacked.clear();
        for b in self.bufs.values_mut() {
            b.last_nack = None;
        }
        self.session = Some(Session {
            id: a.session,
            sender: from,
            layer: a.layer,
            layout: a.layout,
            hashes,
            hash_list: a.hash_list,
            hashes_known: known,
            horizon: a.horizon,
            phase: a.phase,
            last_heard: now,
        });
        self.joined_once = true;
        if known as usize == chunks {
            out.push(Action::Joined {
                layer: a.layer,
                layout: a.layout,
            });
        }
        self.next_status = Some(now);
        self.next_nack = Some(now + NACK_TICK);
        if a.phase == SessionPhase::Ending {
            out.push(Action::SessionEnded);
        }
    }

    fn on_data(&mut self, d: Data<'_>, _now: Instant, out: &mut Vec<Action>) {
        let Some(s) = &mut self.session else { return };
        let layout = s.layout;
        let Some(range) = layout.symbol_in_chunk(d.symbol) else {
            self.stats.bad_symbols += 1;
            return;
        };
        if range.len() != d.payload.len() {
            self.stats.bad_symbols += 1;
            return;
        }
        self.stats.data_packets += 1;
        match self.seq_first {
            None => {
                self.seq_first = Some(d.seq);
                self.seq_last = d.seq;
            }
            Some(first) => {
                if d.seq.wrapping_sub(first) > self.seq_last.wrapping_sub(first)
                    && d.seq.wrapping_sub(first) < 1 << 30
                {
                    self.seq_last = d.seq;
                }
            }
        }
        self.seq_got = self.seq_got.saturating_add(1);
        if !d.repair {
            s.horizon = s.horizon.max(d.symbol.saturating_add(1));
        }
        let (c, j) = layout.locate(d.symbol);
        if self.have.get(c as usize).copied().unwrap_or(true) {
            self.stats.duplicates += 1;
            return;
        }
        if !self.bufs.contains_key(&c) {
            if self.bufs.len() >= self.max_buffered {
                self.stats.deferred += 1;
                return;
            }
            let len = layout.chunk_len(c) as usize;
            let mut data = self.spare.pop().unwrap_or_default();
            data.clear();
            data.resize(len, 0);
            let words = layout.per_chunk().div_ceil(64) as usize;
            self.bufs.insert(
                c,
                ChunkBuf {
                    data,
                    have: vec![0; words],
                    count: 0,
                    last_nack: self.nacked.remove(&c),
                },
            );
        }
        let Some(b) = self.bufs.get_mut(&c) else {
            return;
        };
        let (w, bit) = ((j / 64) as usize, 1u64 << (j % 64));
        let Some(word) = b.have.get_mut(w) else {
            return;
        };
        if *word & bit != 0 {
            self.stats.duplicates += 1;
            return;
        }
        let Some(dst) = b.data.get_mut(range.start as usize..range.end as usize) else {
            return;
        };
        dst.copy_from_slice(d.payload);
        *word |= bit;
        b.count += 1;
        if b.count == layout.symbols_in(c) {
            self.finish_chunk(c, out);
        }
    }

    /// A chunk has all its symbols: verify and hand it out, or throw it away.
    fn finish_chunk(&mut self, c: u32, out: &mut Vec<Action>) {
        let Some(s) = &self.session else { return };
        let Some(Some(expected)) = s.hashes.get(c as usize).copied() else {
            // Hash not known yet (announced list still arriving): keep the buffer.
            return;
        };
        let Some(b) = self.bufs.remove(&c) else {
            return;
        };
        if Digest::of(&b.data) != expected {
            self.stats.bad_chunks += 1;
            self.spare.push(b.data);
            return;
        }
        if let Some(h) = self.have.get_mut(c as usize) {
            *h = true;
            self.have_count += 1;
        }
        self.stats.chunks_written += 1;
        out.push(Action::Write {
            chunk: c,
            offset: u64::from(c) * u64::from(s.layout.chunk_size()),
            data: b.data,
        });
    }

    /// Gives a buffer back after a [`Action::Write`] (saves page faults on the next chunk).
    pub fn recycle(&mut self, data: Vec<u8>) {
        if self.spare.len() < 4 {
            self.spare.push(data);
        }
    }

    /// Runs timers: status reports and NACKs.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Action> {
        let mut out = Vec::new();
        if self.session.is_none() || self.complete {
            return out;
        }
        if self.next_status.is_some_and(|t| t <= now) {
            let phase = if self.have_count == 0 && self.bufs.is_empty() {
                ReceiverPhase::Waiting
            } else {
                ReceiverPhase::Receiving
            };
            out.extend(self.status(phase));
            self.next_status = Some(now + STATUS_INTERVAL);
        }
        if self.next_nack.is_some_and(|t| t <= now) {
            self.nacks(now, &mut out);
            self.next_nack = Some(now + NACK_TICK);
        }
        out
    }

    fn nacks(&mut self, now: Instant, out: &mut Vec<Action>) {
        let Some(s) = &self.session else { return };
        if s.phase == SessionPhase::Waiting {
            return;
        }
        let layout = s.layout;
        // Once the first pass is over (the announced horizon is the end), everything missing
        // may be asked for; before, gaps just behind the newest symbol get reordering slack.
        let limit = if s.phase == SessionPhase::Ending || s.horizon >= layout.symbol_slots() {
            s.horizon
        } else {
            s.horizon.saturating_sub(NACK_LAG)
        };
        let (sid, sender) = (s.id, s.sender);
        let mut ranges: Vec<SymbolRange> = Vec::new();
        let budget = NACKS_PER_TICK * MAX_NACK_RANGES;
        // Chunks we may ask for: those being assembled, plus as many new ones as free buffers.
        let mut free = self.max_buffered.saturating_sub(self.bufs.len());
        let push = |ranges: &mut Vec<SymbolRange>, start: u32, end: u32| {
            if let Some(last) = ranges.last_mut() {
                if last.start.saturating_add(last.count) == start {
                    last.count += end - start;
                    return;
                }
            }
            ranges.push(SymbolRange {
                start,
                count: end - start,
            });
        };
        for c in 0..self.have.len() as u32 {
            if ranges.len() >= budget {
                break;
            }
            if self.have.get(c as usize).copied().unwrap_or(true) {
                continue;
            }
            let first = layout.first_symbol(c);
            if first >= limit {
                break;
            }
            let end = (first + layout.symbols_in(c)).min(limit);
            match self.bufs.get_mut(&c) {
                Some(b) => {
                    if b.last_nack.is_some_and(|t| now.duration_since(t) < RENACK) {
                        continue;
                    }
                    let have = &b.have;
                    let got = |j: u32| {
                        have.get((j / 64) as usize)
                            .is_some_and(|w| w & (1 << (j % 64)) != 0)
                    };
                    let mut j = 0;
                    while first + j < end {
                        if got(j) {
                            j += 1;
                            continue;
                        }
                        let start = j;
                        while first + j < end && !got(j) {
                            j += 1;
                        }
                        push(&mut ranges, first + start, first + j);
                    }
                    b.last_nack = Some(now);
                }
                None => {
                    if free == 0 {
                        continue;
                    }
                    free -= 1;
                    if self
                        .nacked
                        .get(&c)
                        .is_some_and(|t| now.duration_since(*t) < RENACK)
                    {
                        continue;
                    }
                    push(&mut ranges, first, end);
                    self.nacked.insert(c, now);
                }
            }
        }
        for part in ranges.chunks(MAX_NACK_RANGES) {
            out.push(nack(sid, self.receiver, sender, part.to_vec()));
            self.stats.nacks += 1;
        }
    }

    /// True if the sender has not been heard from for `timeout`.
    pub fn sender_silent(&self, now: Instant, timeout: Duration) -> bool {
        self.session
            .as_ref()
            .is_some_and(|s| now.duration_since(s.last_heard) > timeout)
    }
}

fn nack(session: SessionId, receiver: u64, to: SocketAddr, ranges: Vec<SymbolRange>) -> Action {
    Action::Send {
        to,
        bytes: Packet::Nack(Nack {
            session,
            receiver,
            ranges,
        })
        .to_bytes(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::chunk_hashes;
    use crate::multicast::packet::Hashes;
    use std::net::{Ipv4Addr, SocketAddrV4};

    const CS: u32 = 4096;
    const SY: u16 = 1024;

    fn addr(last: u8) -> SocketAddr {
        SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, last), 9000))
    }

    fn setup() -> (Vec<u8>, LayerId, Vec<ChunkHash>, Layout, Vec<u8>) {
        let data: Vec<u8> = (0..10_000u32).map(|i| (i * 7 + 3) as u8).collect();
        let (id, size, chunks) = chunk_hashes(&data[..], CS).unwrap();
        let layout = Layout::new(size, CS, SY).unwrap();
        let ann = Packet::Announce(Announce {
            session: SessionId::new(5).unwrap(),
            phase: SessionPhase::Sending,
            layer: id,
            layout,
            hash_list: hash_list_digest(&chunks),
            horizon: 0,
            receivers: 1,
            rate_kbps: 0,
        })
        .to_bytes();
        (data, id, chunks, layout, ann)
    }

    fn data_pkt(session: u32, layout: Layout, symbol: u32, bytes: &[u8]) -> Vec<u8> {
        let r = layout.symbol_range(symbol).unwrap();
        Packet::Data(Data {
            session: SessionId::new(session).unwrap(),
            seq: symbol,
            symbol,
            repair: false,
            payload: &bytes[r.start as usize..r.end as usize],
        })
        .to_bytes()
    }

    fn writes(acts: &[Action]) -> Vec<u32> {
        acts.iter()
            .filter_map(|a| match a {
                Action::Write { chunk, .. } => Some(*chunk),
                _ => None,
            })
            .collect()
    }

    fn known(id: LayerId, chunks: &[ChunkHash]) -> Expect {
        Expect::Known {
            id,
            size: 10_000,
            chunk_size: CS,
            chunks: chunks.to_vec(),
        }
    }

    #[test]
    fn forged_payload_is_never_written_and_chunk_is_asked_again() {
        let (data, id, chunks, layout, ann) = setup();
        let now = Instant::now();
        let mut rx = ReceiverCore::new(known(id, &chunks), 1, 4);
        rx.on_packet(&ann, addr(1), now);
        let mut bad = data.clone();
        bad[10] ^= 0xff;
        let mut acts = Vec::new();
        for s in 0..layout.symbols_in(0) {
            let src = if s == 0 { &bad } else { &data };
            acts.extend(rx.on_packet(&data_pkt(5, layout, s, src), addr(1), now));
        }
        assert!(writes(&acts).is_empty());
        assert_eq!(rx.stats().bad_chunks, 1);
        // The real symbols again: now the chunk verifies.
        let mut acts = Vec::new();
        for s in 0..layout.symbols_in(0) {
            acts.extend(rx.on_packet(&data_pkt(5, layout, s, &data), addr(1), now));
        }
        assert_eq!(writes(&acts), vec![0]);
    }

    #[test]
    fn other_sessions_and_wrong_layers_are_dropped_and_counted() {
        let (data, id, chunks, layout, ann) = setup();
        let now = Instant::now();
        let mut rx = ReceiverCore::new(known(id, &chunks), 1, 4);
        rx.on_packet(&ann, addr(1), now);
        for s in 0..layout.symbols_in(0) {
            assert!(rx
                .on_packet(&data_pkt(6, layout, s, &data), addr(1), now)
                .is_empty());
        }
        assert_eq!(rx.stats().foreign, u64::from(layout.symbols_in(0)));
        // An announcement for another layer does not take over.
        let mut other = match Packet::parse(&ann).unwrap() {
            Packet::Announce(a) => a,
            _ => unreachable!(),
        };
        other.session = SessionId::new(9).unwrap();
        other.layer = Digest([1; 32]);
        rx.on_packet(&Packet::Announce(other).to_bytes(), addr(1), now);
        assert_eq!(rx.layer().unwrap().0, id);
        // Nor does a forged announcement of our session from another address.
        let mut end = match Packet::parse(&ann).unwrap() {
            Packet::Announce(a) => a,
            _ => unreachable!(),
        };
        end.phase = SessionPhase::Ending;
        assert!(rx
            .on_packet(&Packet::Announce(end).to_bytes(), addr(66), now)
            .is_empty());
    }

    #[test]
    fn a_session_whose_hashes_differ_from_the_manifest_is_not_followed() {
        let (_, id, mut chunks, _, ann) = setup();
        chunks[1] = Digest([0; 32]);
        let mut rx = ReceiverCore::new(known(id, &chunks), 1, 4);
        rx.on_packet(&ann, addr(1), Instant::now());
        assert!(rx.layer().is_none());
        assert_eq!(rx.stats().foreign, 1);
    }

    #[test]
    fn announced_hashes_must_match_the_announced_digest() {
        let (data, _, chunks, layout, ann) = setup();
        let now = Instant::now();
        let mut rx = ReceiverCore::new(Expect::Any, 1, 4);
        rx.on_packet(&ann, addr(1), now);
        let forged = Hashes {
            session: SessionId::new(5).unwrap(),
            first: 0,
            hashes: vec![Digest([3; 32]); 3],
        };
        rx.on_packet(&Packet::Hashes(forged).to_bytes(), addr(2), now);
        // Chunk 0 assembled while the list is wrong: held, not written.
        let mut acts = Vec::new();
        for s in 0..layout.symbols_in(0) {
            acts.extend(rx.on_packet(&data_pkt(5, layout, s, &data), addr(1), now));
        }
        assert!(writes(&acts).is_empty());
        let real = Hashes {
            session: SessionId::new(5).unwrap(),
            first: 0,
            hashes: chunks.clone(),
        };
        let acts = rx.on_packet(&Packet::Hashes(real).to_bytes(), addr(1), now);
        assert_eq!(writes(&acts), vec![0]);
    }

    #[test]
    fn resume_asks_only_for_missing_chunks() {
        let (_, id, chunks, layout, ann) = setup();
        let t0 = Instant::now();
        let mut rx = ReceiverCore::new(known(id, &chunks), 1, 4);
        rx.on_packet(&ann, addr(1), t0);
        rx.mark_present(0);
        rx.mark_present(2);
        let mut end = match Packet::parse(&ann).unwrap() {
            Packet::Announce(a) => a,
            _ => unreachable!(),
        };
        end.horizon = layout.symbol_slots();
        rx.on_packet(&Packet::Announce(end).to_bytes(), addr(1), t0);
        let acts = rx.on_timeout(t0 + Duration::from_secs(1));
        let nacks: Vec<Nack> = acts
            .iter()
            .filter_map(|a| match a {
                Action::Send { bytes, .. } => match Packet::parse(bytes).ok()? {
                    Packet::Nack(n) => Some(n),
                    _ => None,
                },
                _ => None,
            })
            .collect();
        assert_eq!(nacks.len(), 1);
        let first = layout.first_symbol(1);
        assert_eq!(
            nacks[0].ranges,
            vec![SymbolRange {
                start: first,
                count: layout.symbols_in(1)
            }]
        );
        assert_eq!(rx.missing_chunks(), vec![1]);
    }
}
