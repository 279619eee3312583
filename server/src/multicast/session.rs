//! The sender's protocol core (docs/multicast.md, "Sender"), sans-IO: fed receivers' packets
//! and the time, it says what to send next ([`Poll`]). Scheduling (wait for receivers, a
//! deadline or an operator), the first pass, NACK-driven repair with suppression, rate
//! control, eviction of slow receivers and completion all live here; the socket loop is in
//! [`super::sender`].

use std::collections::{BTreeSet, HashMap, VecDeque};
use std::net::SocketAddr;
use std::time::{Duration, Instant};

use wire::chunk::{ChunkHash, LayerId};
use wire::multicast::packet::{
    hash_list_digest, Announce, Evict, Hashes, Layout, Nack, Packet, ReceiverPhase, SessionId,
    SessionPhase, Status, DATA_HEADER, DEFAULT_SYMBOL_SIZE, MAX_HASHES_PER_PACKET,
};

/// Ethernet (14), IPv4 (20) and UDP (8) bytes around each datagram, for pacing.
pub const FRAME_OVERHEAD: usize = 42;

/// Sender settings.
#[derive(Debug, Clone)]
pub struct SenderConfig {
    /// Rate ceiling, bits per second on the wire (Ethernet frames).
    pub rate_bps: u64,
    /// Start as soon as this many receivers wait (0: start at once).
    pub min_receivers: usize,
    /// Start after this long even with fewer receivers (None: wait for them or an operator).
    pub max_wait: Option<Duration>,
    /// When `max_wait` passes with no receiver at all, end the session instead of sending
    /// to nobody (the server's scheduled sessions; `strata mcast send` sends anyway, as
    /// udp-sender does).
    pub skip_if_nobody: bool,
    /// Send the chunk-hash carousel (HASHES packets) for receivers without a signed manifest.
    /// The server's scheduled sessions turn it off: their nodes hold the hashes.
    pub hash_carousel: bool,
    /// Payload bytes per data packet.
    pub symbol_size: u16,
    /// Announcement period.
    pub announce_interval: Duration,
    /// A symbol repaired less than this long ago is not repaired again for a NACK (the NACK
    /// probably crossed the repair).
    pub repair_holdoff: Duration,
    /// A receiver silent this long is forgotten.
    pub receiver_timeout: Duration,
    /// A receiver still incomplete this long after the first pass ends is evicted (it
    /// fetches the rest by unicast); None: `max(10 s, first pass duration)`.
    pub slow_bound: Option<Duration>,
    /// Reported loss (per mille) above which a receiver counts as struggling; one above it
    /// for 10 ticks in a row is lagging and no longer steers the rate.
    pub loss_threshold_permille: u16,
    /// Loss (per mille) above a receiver's learned floor that means congestion: the rate
    /// backs off when any steering receiver exceeds its floor by this much, and climbs back
    /// while every one stays within half of it.
    pub congestion_permille: u16,
    /// After the first pass, with no receiver known, end after this much silence.
    pub idle_end: Duration,
    /// How long the end is announced.
    pub end_linger: Duration,
}

impl Default for SenderConfig {
    fn default() -> Self {
        Self {
            rate_bps: 1_000_000_000,
            min_receivers: 1,
            max_wait: None,
            skip_if_nobody: false,
            hash_carousel: true,
            symbol_size: DEFAULT_SYMBOL_SIZE,
            announce_interval: Duration::from_millis(200),
            repair_holdoff: Duration::from_millis(100),
            receiver_timeout: Duration::from_secs(3),
            slow_bound: None,
            loss_threshold_permille: 150,
            congestion_permille: 20,
            idle_end: Duration::from_secs(2),
            end_linger: Duration::from_millis(600),
        }
    }
}

/// The layer a session sends.
#[derive(Debug, Clone)]
pub struct LayerInfo {
    /// blake3 of the file.
    pub id: LayerId,
    /// Size, chunk size, symbol size.
    pub layout: Layout,
    /// Chunk hashes ([`wire::chunk`] layout).
    pub chunks: Vec<ChunkHash>,
}

/// Where a control packet goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Dest {
    /// The group.
    Group,
    /// One receiver.
    To(SocketAddr),
}

/// What to do next.
#[derive(Debug, PartialEq, Eq)]
pub enum Poll {
    /// Send a control packet.
    Control {
        /// Destination.
        dest: Dest,
        /// Datagram.
        bytes: Vec<u8>,
    },
    /// Send data symbol `symbol` to the group with this header.
    Data {
        /// Symbol index.
        symbol: u32,
        /// Sequence number.
        seq: u32,
        /// Repair or first pass.
        repair: bool,
    },
    /// Nothing before this time (unless a packet arrives).
    Wait(Instant),
    /// The session is over.
    Finished,
}

/// A receiver as the sender sees it.
#[derive(Debug, Clone)]
struct Rx {
    addr: SocketAddr,
    phase: ReceiverPhase,
    last_seen: Instant,
    loss: u16,
    /// Highest loss reported since the last tick (None: no report).
    window: Option<u16>,
    /// Learned random-loss floor (per mille): follows the loss down at once and up slowly,
    /// so a steady loss (a bad link, or injected) is learnt and bursts (queue overflow) are not.
    floor: Option<u16>,
    missing: u32,
    high_loss_streak: u32,
    lagging: bool,
    evicted: bool,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Phase {
    Waiting,
    Sending,
    Ending(Instant),
    Finished,
}

/// Counters and outcome of a session.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct SendStats {
    /// First-pass data packets.
    pub data_packets: u64,
    /// Repair data packets.
    pub repair_packets: u64,
    /// Control packets (announce, hashes, evict).
    pub control_packets: u64,
    /// UDP payload bytes sent, all packets.
    pub udp_bytes: u64,
    /// Ethernet frame bytes those make (`udp_bytes` + 42 per datagram).
    pub frame_bytes: u64,
    /// NACK packets received.
    pub nacks: u64,
    /// Symbols queued for repair (after suppression).
    pub repairs_queued: u64,
    /// NACKed symbols not queued (already queued or just repaired).
    pub repairs_suppressed: u64,
    /// Packets that did not parse or belong to another session.
    pub ignored: u64,
    /// Receivers that reported completion.
    pub receivers_done: u64,
    /// Receivers evicted as too slow.
    pub receivers_evicted: u64,
    /// Receivers that went silent or left before completing.
    pub receivers_lost: u64,
    /// Time from the start of sending to the end.
    pub send_time: Duration,
    /// Lowest rate the controller reached, bits/s.
    pub min_rate_bps: u64,
}

/// The sender state machine for one session.
pub struct SenderSession {
    cfg: SenderConfig,
    info: LayerInfo,
    id: SessionId,
    hash_list: wire::chunk::Digest,
    phase: Phase,
    start_requested: bool,
    created: Instant,
    pass_start: Option<Instant>,
    pass_end: Option<Instant>,
    next_symbol: u32,
    pending: BTreeSet<u32>,
    recent: HashMap<u32, Instant>,
    receivers: HashMap<u64, Rx>,
    seq: u32,
    rate: f64,
    tokens: f64,
    last_refill: Instant,
    next_announce: Instant,
    next_hash: u32,
    queue: VecDeque<(Dest, Vec<u8>)>,
    last_activity: Instant,
    stats: SendStats,
}

impl SenderSession {
    /// A session with id `id` for `info`, created at `now`.
    pub fn new(info: LayerInfo, cfg: SenderConfig, id: SessionId, now: Instant) -> Self {
        let hash_list = hash_list_digest(&info.chunks);
        let rate = cfg.rate_bps.max(8_000) as f64 / 8.0;
        let stats = SendStats {
            min_rate_bps: cfg.rate_bps,
            ..SendStats::default()
        };
        Self {
            info,
            id,
            hash_list,
            phase: Phase::Waiting,
            start_requested: false,
            created: now,
            pass_start: None,
            pass_end: None,
            next_symbol: 0,
            pending: BTreeSet::new(),
            recent: HashMap::new(),
            receivers: HashMap::new(),
            seq: 0,
            rate,
            tokens: 0.0,
            last_refill: now,
            next_announce: now,
            next_hash: 0,
            queue: VecDeque::new(),
            last_activity: now,
            stats,
            cfg,
        }
    }

    /// The session id.
    pub fn id(&self) -> SessionId {
        self.id
    }

    /// The layer.
    pub fn layer(&self) -> &LayerInfo {
        &self.info
    }

    /// Counters so far.
    pub fn stats(&self) -> &SendStats {
        &self.stats
    }

    /// Receivers currently counted (not evicted, not gone).
    pub fn live_receivers(&self) -> usize {
        self.receivers
            .values()
            .filter(|r| !r.evicted && r.phase != ReceiverPhase::Left)
            .count()
    }

    /// True once sending has begun.
    pub fn started(&self) -> bool {
        self.phase != Phase::Waiting
    }

    /// An operator's "start now".
    pub fn start_now(&mut self) {
        self.start_requested = true;
    }

    /// Ends the session at once (announces the end, then finishes).
    pub fn cancel(&mut self, now: Instant) {
        if !matches!(self.phase, Phase::Ending(_) | Phase::Finished) {
            self.end(now);
        }
    }

    fn end(&mut self, now: Instant) {
        if let Some(start) = self.pass_start {
            self.stats.send_time = now.duration_since(start);
        }
        for r in self.receivers.values() {
            if !r.evicted && r.phase != ReceiverPhase::Done {
                self.stats.receivers_lost += 1;
            }
        }
        self.phase = Phase::Ending(now + self.cfg.end_linger);
        self.next_announce = now;
    }

    /// Feeds a datagram from `from`.
    pub fn on_packet(&mut self, buf: &[u8], from: SocketAddr, now: Instant) {
        let pkt = match Packet::parse(buf) {
            Ok(p) if p.session() == self.id => p,
            _ => {
                self.stats.ignored += 1;
                return;
            }
        };
        match pkt {
            Packet::Status(s) => self.on_status(s, from, now),
            Packet::Nack(n) => self.on_nack(n, from, now),
            // Our own group traffic looped back, or nonsense: nothing to do.
            _ => {}
        }
    }

    fn rx(receivers: &mut HashMap<u64, Rx>, id: u64, from: SocketAddr, now: Instant) -> &mut Rx {
        receivers.entry(id).or_insert_with(|| Rx {
            addr: from,
            phase: ReceiverPhase::Waiting,
            last_seen: now,
            loss: 0,
            window: None,
            floor: None,
            missing: u32::MAX,
            high_loss_streak: 0,
            lagging: false,
            evicted: false,
        })
    }

    fn on_status(&mut self, s: Status, from: SocketAddr, now: Instant) {
        self.last_activity = now;
        let r = Self::rx(&mut self.receivers, s.receiver, from, now);
        r.addr = from;
        r.last_seen = now;
        if r.phase != ReceiverPhase::Done && s.phase == ReceiverPhase::Done {
            self.stats.receivers_done += 1;
        }
        if r.phase != ReceiverPhase::Done {
            r.phase = s.phase;
        }
        r.loss = s.loss_permille;
        r.missing = s.missing_symbols;
        // Loss means something only from a receiver taking data while data flows.
        if s.phase == ReceiverPhase::Receiving && self.phase == Phase::Sending {
            r.window = Some(r.window.map_or(s.loss_permille, |w| w.max(s.loss_permille)));
        }
    }

    fn on_nack(&mut self, n: Nack, from: SocketAddr, now: Instant) {
        self.stats.nacks += 1;
        self.last_activity = now;
        let r = Self::rx(&mut self.receivers, n.receiver, from, now);
        r.addr = from;
        r.last_seen = now;
        if r.evicted || !matches!(self.phase, Phase::Sending) {
            return;
        }
        if r.phase == ReceiverPhase::Waiting {
            r.phase = ReceiverPhase::Receiving;
        }
        let layout = self.info.layout;
        let horizon = self.next_symbol;
        for range in &n.ranges {
            let r = range.range();
            // Symbols the first pass has not reached yet will come anyway.
            let end = r.end.min(horizon);
            for s in r.start..end {
                if layout.symbol_in_chunk(s).is_none() {
                    continue;
                }
                if self.pending.contains(&s)
                    || self
                        .recent
                        .get(&s)
                        .is_some_and(|t| now.duration_since(*t) < self.cfg.repair_holdoff)
                {
                    self.stats.repairs_suppressed += 1;
                    continue;
                }
                self.pending.insert(s);
                self.stats.repairs_queued += 1;
            }
        }
    }

    fn announce(&self) -> Vec<u8> {
        let phase = match self.phase {
            Phase::Waiting => SessionPhase::Waiting,
            Phase::Sending => SessionPhase::Sending,
            Phase::Ending(_) | Phase::Finished => SessionPhase::Ending,
        };
        Packet::Announce(Announce {
            session: self.id,
            phase,
            layer: self.info.id,
            layout: self.info.layout,
            hash_list: self.hash_list,
            horizon: self.next_symbol,
            receivers: u16::try_from(self.live_receivers()).unwrap_or(u16::MAX),
            rate_kbps: u32::try_from((self.rate * 8.0 / 1000.0) as u64).unwrap_or(u32::MAX),
        })
        .to_bytes()
    }

    /// Periodic work: announcement and hash carousel, rate control, time-outs, eviction.
    fn tick(&mut self, now: Instant) {
        self.next_announce = now + self.cfg.announce_interval;
        self.queue.push_back((Dest::Group, self.announce()));
        if matches!(self.phase, Phase::Ending(_)) {
            return;
        }
        // Hash carousel: a few packets per tick (more while waiting), for receivers without a
        // signed manifest.
        let total = self.info.chunks.len() as u32;
        let per_tick = match (self.cfg.hash_carousel, self.phase == Phase::Waiting) {
            (false, _) => 0,
            (true, true) => 64,
            (true, false) => 8,
        };
        for _ in 0..per_tick.min(total.div_ceil(MAX_HASHES_PER_PACKET as u32)) {
            let first = self.next_hash;
            let n = (total - first).min(MAX_HASHES_PER_PACKET as u32);
            let hashes = self
                .info
                .chunks
                .get(first as usize..(first + n) as usize)
                .unwrap_or_default()
                .to_vec();
            self.queue.push_back((
                Dest::Group,
                Packet::Hashes(Hashes {
                    session: self.id,
                    first,
                    hashes,
                })
                .to_bytes(),
            ));
            self.next_hash = if first + n >= total { 0 } else { first + n };
        }
        // Forget silent receivers.
        let timeout = self.cfg.receiver_timeout;
        let mut lost = 0;
        self.receivers.retain(|_, r| {
            let keep = r.phase == ReceiverPhase::Done
                || r.evicted
                || now.duration_since(r.last_seen) < timeout;
            if !keep {
                lost += 1;
            }
            keep
        });
        self.stats.receivers_lost += lost;
        // Rate control (docs/multicast.md, "Rate control"): each receiver's loss is judged
        // against its own learned floor, so steady random loss does not slow the group and
        // loss that comes with the rate (queues overflowing) does. A receiver above the
        // absolute threshold for 10 ticks in a row is lagging: it no longer steers the rate
        // (it will be evicted if it cannot keep up).
        let ceiling = self.cfg.rate_bps as f64 / 8.0;
        let threshold = self.cfg.loss_threshold_permille;
        let congestion = self.cfg.congestion_permille;
        let mut excess: u16 = 0;
        for r in self.receivers.values_mut() {
            let Some(w) = r.window.take() else { continue };
            if w > threshold {
                r.high_loss_streak += 1;
                if r.high_loss_streak >= 10 {
                    r.lagging = true;
                }
            } else {
                r.high_loss_streak = 0;
            }
            let floor = match r.floor {
                None => w,
                Some(f) if w <= f => w,
                Some(f) => f + (w - f).div_ceil(16),
            };
            r.floor = Some(floor);
            if !r.lagging && !r.evicted {
                excess = excess.max(w.saturating_sub(floor));
            }
        }
        if self.phase == Phase::Sending {
            if excess > congestion {
                self.rate = (self.rate * 0.75).max(ceiling / 16.0);
            } else if excess <= congestion / 2 {
                self.rate = (self.rate + ceiling / 10.0).min(ceiling);
            }
            self.stats.min_rate_bps = self.stats.min_rate_bps.min((self.rate * 8.0) as u64);
        }
        self.recent
            .retain(|_, t| now.duration_since(*t) < self.cfg.repair_holdoff);
        // Slow receivers: evicted a bound after the first pass ends.
        if let Some(end) = self.pass_end {
            let bound = self.cfg.slow_bound.unwrap_or_else(|| {
                let pass = end.duration_since(self.pass_start.unwrap_or(end));
                pass.max(Duration::from_secs(10))
            });
            if now.duration_since(end) > bound {
                for (id, r) in self.receivers.iter_mut() {
                    if !r.evicted
                        && r.phase != ReceiverPhase::Done
                        && r.phase != ReceiverPhase::Left
                    {
                        r.evicted = true;
                        self.stats.receivers_evicted += 1;
                        let bytes = Packet::Evict(Evict {
                            session: self.id,
                            receiver: *id,
                        })
                        .to_bytes();
                        for _ in 0..3 {
                            self.queue.push_back((Dest::To(r.addr), bytes.clone()));
                        }
                    }
                }
            }
        }
    }

    fn waiting_receivers(&self) -> usize {
        self.live_receivers()
    }

    /// What to send next at `now`.
    pub fn poll(&mut self, now: Instant) -> Poll {
        if let Some((dest, bytes)) = self.queue.pop_front() {
            self.stats.control_packets += 1;
            self.count(bytes.len());
            return Poll::Control { dest, bytes };
        }
        if now >= self.next_announce && self.phase != Phase::Finished {
            self.tick(now);
            if let Some((dest, bytes)) = self.queue.pop_front() {
                self.stats.control_packets += 1;
                self.count(bytes.len());
                return Poll::Control { dest, bytes };
            }
        }
        match self.phase {
            Phase::Finished => Poll::Finished,
            Phase::Ending(until) => {
                if now >= until {
                    self.phase = Phase::Finished;
                    Poll::Finished
                } else {
                    Poll::Wait(self.next_announce.min(until))
                }
            }
            Phase::Waiting => {
                let waited = now.duration_since(self.created);
                let enough = self.cfg.min_receivers == 0
                    || self.waiting_receivers() >= self.cfg.min_receivers;
                let timed_out = self.cfg.max_wait.is_some_and(|w| waited >= w);
                if timed_out
                    && !enough
                    && !self.start_requested
                    && self.cfg.skip_if_nobody
                    && self.waiting_receivers() == 0
                {
                    self.end(now);
                    return Poll::Wait(now);
                }
                if enough || timed_out || self.start_requested {
                    self.phase = Phase::Sending;
                    self.pass_start = Some(now);
                    self.last_refill = now;
                    self.tokens = 0.0;
                    self.next_announce = now;
                    return self.poll(now);
                }
                Poll::Wait(self.next_announce)
            }
            Phase::Sending => self.poll_sending(now),
        }
    }

    fn count(&mut self, udp: usize) {
        self.stats.udp_bytes += udp as u64;
        self.stats.frame_bytes += (udp + FRAME_OVERHEAD) as u64;
    }

    fn poll_sending(&mut self, now: Instant) -> Poll {
        let layout = self.info.layout;
        // Next symbol: repairs first (they free receivers' buffers), then the first pass.
        let next = if let Some(s) = self.pending.first().copied() {
            Some((s, true))
        } else {
            // Skip the unused slots of a short last chunk.
            while self.next_symbol < layout.symbol_slots()
                && layout.symbol_in_chunk(self.next_symbol).is_none()
            {
                self.next_symbol += 1;
            }
            (self.next_symbol < layout.symbol_slots()).then_some((self.next_symbol, false))
        };
        let Some((symbol, repair)) = next else {
            if self.pass_end.is_none() {
                self.pass_end = Some(now);
                self.last_activity = now;
                self.next_announce = now;
            }
            return self.maybe_end(now);
        };
        let len = layout.symbol_in_chunk(symbol).map(|r| r.len()).unwrap_or(0);
        let cost = (DATA_HEADER + len + FRAME_OVERHEAD) as f64;
        // Token bucket at the current rate, bursts of at most 10 ms.
        let dt = now.duration_since(self.last_refill).as_secs_f64();
        self.last_refill = now;
        let burst = (self.rate * 0.010).max(cost * 4.0);
        self.tokens = (self.tokens + dt * self.rate).min(burst);
        if self.tokens < cost {
            let wait = (cost - self.tokens) / self.rate;
            return Poll::Wait((now + Duration::from_secs_f64(wait)).min(self.next_announce));
        }
        self.tokens -= cost;
        if repair {
            self.pending.remove(&symbol);
            self.recent.insert(symbol, now);
            self.stats.repair_packets += 1;
        } else {
            self.next_symbol += 1;
            self.stats.data_packets += 1;
        }
        self.count(DATA_HEADER + len);
        let seq = self.seq;
        self.seq = self.seq.wrapping_add(1);
        Poll::Data {
            symbol,
            seq,
            repair,
        }
    }

    fn maybe_end(&mut self, now: Instant) -> Poll {
        let mut live = self
            .receivers
            .values()
            .filter(|r| !r.evicted && r.phase != ReceiverPhase::Left);
        let all_done = live.all(|r| r.phase == ReceiverPhase::Done);
        let any = self
            .receivers
            .values()
            .any(|r| r.phase == ReceiverPhase::Done);
        let quiet = now.duration_since(self.last_activity) >= self.cfg.idle_end;
        if all_done && (any || quiet) {
            self.end(now);
            return Poll::Wait(now);
        }
        Poll::Wait(self.next_announce)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::net::{Ipv4Addr, SocketAddrV4};
    use wire::multicast::packet::DEFAULT_SYMBOL_SIZE;
    use wire::multicast::receiver::{Action, Expect, ReceiverCore};

    /// A model network: one sender core, receivers' cores, per-receiver seeded loss, time
    /// advanced by the simulation. Checks that every receiver gets every chunk verified and
    /// that the session ends.
    fn simulate(data: &[u8], losses: &[u32], seed: u64) -> (SendStats, Vec<Vec<u8>>) {
        let chunk = 64 * 1024;
        let (id, size, chunks) = wire::chunk::chunk_hashes(data, chunk).unwrap();
        let layout = Layout::new(size, chunk, DEFAULT_SYMBOL_SIZE).unwrap();
        let info = LayerInfo {
            id,
            layout,
            chunks: chunks.clone(),
        };
        let cfg = SenderConfig {
            rate_bps: 400_000_000,
            min_receivers: losses.len(),
            ..SenderConfig::default()
        };
        let t0 = Instant::now();
        let mut now = t0;
        let mut tx = SenderSession::new(info, cfg, SessionId::new(77).unwrap(), now);
        let sender_addr = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 1), 4000));
        let mut rxs: Vec<(ReceiverCore, Vec<u8>, SocketAddr)> = losses
            .iter()
            .enumerate()
            .map(|(i, _)| {
                let exp = if i % 2 == 0 {
                    Expect::Any
                } else {
                    Expect::Known {
                        id,
                        size,
                        chunk_size: chunk,
                        chunks: chunks.clone(),
                    }
                };
                (
                    ReceiverCore::new(exp, 1000 + i as u64, 32),
                    vec![0u8; data.len()],
                    SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 1, i as u8), 5000)),
                )
            })
            .collect();
        let mut rng = seed;
        let mut rand = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        for _ in 0..5_000_000 {
            let mut to_group: Option<Vec<u8>> = None;
            let mut to_one: Option<(SocketAddr, Vec<u8>)> = None;
            match tx.poll(now) {
                Poll::Finished => break,
                Poll::Wait(t) => now = now.max(t).max(now + Duration::from_micros(50)),
                Poll::Control {
                    dest: Dest::Group,
                    bytes,
                } => to_group = Some(bytes),
                Poll::Control {
                    dest: Dest::To(a),
                    bytes,
                } => to_one = Some((a, bytes)),
                Poll::Data {
                    symbol,
                    seq,
                    repair,
                } => {
                    let r = layout.symbol_range(symbol).unwrap();
                    let p = wire::multicast::packet::Data {
                        session: tx.id(),
                        seq,
                        symbol,
                        repair,
                        payload: &data[r.start as usize..r.end as usize],
                    };
                    to_group = Some(Packet::Data(p).to_bytes());
                }
            }
            let mut replies = Vec::new();
            for (i, (core, out, addr)) in rxs.iter_mut().enumerate() {
                let mut acts = Vec::new();
                if let Some(b) = &to_group {
                    if (rand() % 1000) as u32 >= losses[i] * 10 {
                        acts.extend(core.on_packet(b, sender_addr, now));
                    }
                }
                if let Some((a, b)) = &to_one {
                    if a == addr {
                        acts.extend(core.on_packet(b, sender_addr, now));
                    }
                }
                acts.extend(core.on_timeout(now));
                for a in acts {
                    match a {
                        Action::Send { bytes, .. } => replies.push((*addr, bytes)),
                        Action::Write {
                            offset, data: d, ..
                        } => {
                            out[offset as usize..offset as usize + d.len()].copy_from_slice(&d);
                        }
                        Action::Evicted => panic!(
                            "receiver {i} evicted: {:?} missing {:?} layer {:?}",
                            core.stats(),
                            core.missing_chunks(),
                            core.layer().map(|l| l.2.is_some())
                        ),
                        _ => {}
                    }
                }
                if core.is_complete() {
                    if let Some(Action::Send { bytes, .. }) = core.farewell() {
                        replies.push((*addr, bytes));
                    }
                }
            }
            for (a, b) in replies {
                tx.on_packet(&b, a, now);
            }
        }
        for (i, (core, _, _)) in rxs.iter().enumerate() {
            assert!(
                core.is_complete(),
                "receiver {i} incomplete: {:?}",
                core.stats()
            );
        }
        (tx.stats().clone(), rxs.into_iter().map(|r| r.1).collect())
    }

    #[test]
    fn lossless_session_is_one_pass() {
        let data: Vec<u8> = (0..1_000_000u32).map(|i| (i * 31 % 251) as u8).collect();
        let (stats, outs) = simulate(&data, &[0, 0, 0], 1);
        for o in outs {
            assert!(o == data);
        }
        assert_eq!(stats.repair_packets, 0);
        assert_eq!(stats.receivers_done, 3);
    }

    #[test]
    fn lossy_receivers_complete_with_shared_repairs() {
        let data: Vec<u8> = (0..2_000_000u32).map(|i| (i * 17 % 253) as u8).collect();
        let (stats, outs) = simulate(&data, &[5, 5, 5, 5, 1], 7);
        for o in outs {
            assert!(o == data);
        }
        assert_eq!(stats.receivers_done, 5);
        // Repairs are shared: far fewer than the sum of every receiver's losses would need.
        eprintln!("{stats:?}");
        let symbols = stats.data_packets as f64;
        assert!((stats.repair_packets as f64) < symbols * 0.30, "{stats:?}");
    }

    /// Drives a started session through `reports.len()` ticks; at each, receiver `i` reports
    /// `reports[t][i]` per mille of loss. Returns the lowest rate reached.
    fn rate_under(reports: &[Vec<u16>]) -> u64 {
        let data = vec![7u8; 64 << 20];
        let (id, size, chunks) = wire::chunk::chunk_hashes(&data[..], 1 << 20).unwrap();
        let layout = Layout::new(size, 1 << 20, DEFAULT_SYMBOL_SIZE).unwrap();
        let cfg = SenderConfig {
            rate_bps: 1_000_000_000,
            min_receivers: 0,
            ..SenderConfig::default()
        };
        let t0 = Instant::now();
        let mut tx = SenderSession::new(
            LayerInfo { id, layout, chunks },
            cfg,
            SessionId::new(9).unwrap(),
            t0,
        );
        let from = SocketAddr::V4(SocketAddrV4::new(Ipv4Addr::new(10, 0, 0, 2), 9));
        let mut now = t0;
        let _ = tx.poll(now);
        for row in reports {
            for (i, loss) in row.iter().enumerate() {
                let st = Packet::Status(Status {
                    session: tx.id(),
                    receiver: i as u64 + 1,
                    phase: ReceiverPhase::Receiving,
                    loss_permille: *loss,
                    have_chunks: 0,
                    missing_symbols: 1,
                });
                tx.on_packet(&st.to_bytes(), from, now);
            }
            now += Duration::from_millis(200);
            // Run the tick (and drain what it queued).
            while !matches!(tx.poll(now), Poll::Wait(_) | Poll::Data { .. }) {}
        }
        tx.stats().min_rate_bps
    }

    #[test]
    fn steady_random_loss_does_not_slow_the_group() {
        // 5% and 1% random loss (a bad cable, or injected), with jitter: learnt as the floor.
        let rows: Vec<Vec<u16>> = (0..40)
            .map(|t| vec![48 + (t % 5) as u16, 10 + (t % 3) as u16])
            .collect();
        assert_eq!(rate_under(&rows), 1_000_000_000);
    }

    #[test]
    fn bursts_of_loss_above_the_floor_back_off() {
        // A starved receiver: no loss most of the time, bursts of 8% (its buffer overflowing).
        let rows: Vec<Vec<u16>> = (0..40)
            .map(|t| vec![0, if t % 4 == 3 { 80 } else { 0 }])
            .collect();
        assert!(rate_under(&rows) < 800_000_000);
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(12))]
        /// Any loss pattern up to 20% per receiver: every receiver ends with the exact file.
        #[test]
        fn any_loss_pattern_completes(
            losses in proptest::collection::vec(0u32..=20, 1..4),
            seed in 1u64..,
            len in 1usize..400_000,
        ) {
            let data: Vec<u8> = (0..len as u32).map(|i| (i.wrapping_mul(2654435761) >> 13) as u8).collect();
            let (stats, outs) = simulate(&data, &losses, seed);
            for o in outs {
                proptest::prop_assert!(o == data);
            }
            proptest::prop_assert_eq!(stats.receivers_done, losses.len() as u64);
        }
    }
}
