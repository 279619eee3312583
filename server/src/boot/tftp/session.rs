//! One read transfer as a sans-IO state machine: RFC 1350 lock-step, RFC 2347 OACK
//! handshake, and RFC 7440 windows. Time is passed in; the caller sends what the
//! [`Action`]s say and calls [`Session::on_timeout`] at [`Session::deadline`].
//!
//! Blocks are numbered from 1 internally with a `u64`, so files past 65535 blocks work: the
//! 16-bit wire number wraps to 0 (as tftp-hpa, atftp and iPXE expect). An ACK is matched to
//! the outstanding window; ACKs older than the window are ignored, which prevents the
//! Sorcerer's Apprentice syndrome (RFC 1123 §4.2.3.1). An ACK inside the window moves it
//! forward and the next window starts after the acknowledged block (go-back-N, RFC 7440 §4).
//! Retransmission timeouts double after each timeout up to [`MAX_BACKOFF`], and the transfer
//! fails after `max_retries` timeouts in a row.

use std::time::{Duration, Instant};

use super::packet::{ErrorCode, Packet};

/// Longest retransmission interval after backoff.
pub const MAX_BACKOFF: Duration = Duration::from_secs(8);

/// Negotiated parameters of a transfer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Params {
    /// Bytes per block.
    pub blksize: u16,
    /// Blocks per window.
    pub windowsize: u16,
    /// First retransmission timeout, and the most an adaptive timeout grows to before
    /// backoff.
    pub timeout: Duration,
    /// Floor of the adaptive timeout. Once the client has acknowledged windows, the timeout
    /// follows 4 × the smoothed round-trip time (Karn's rule: only windows sent once give
    /// samples), clamped to `min_timeout..=timeout`. Equal to `timeout`: fixed timeout (what
    /// a client asking for RFC 2349 `timeout` gets).
    pub min_timeout: Duration,
    /// Timeouts in a row before giving up.
    pub max_retries: u32,
}

/// What the caller must do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Send the OACK (the bytes the session was created with).
    SendOack,
    /// Send DATA for this block (1-based): bytes `(block-1)*blksize ..` of the file, at most
    /// `blksize` of them; the wire number is `block as u16`.
    SendData {
        /// Internal block number.
        block: u64,
    },
    /// Send an ERROR and end the transfer.
    SendError {
        /// Code.
        code: ErrorCode,
        /// Message.
        message: &'static str,
    },
    /// The client acknowledged the last block.
    Done,
    /// The transfer ended without success.
    Failed(FailReason),
}

/// Why a transfer failed.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum FailReason {
    /// The client stopped acknowledging.
    TimedOut {
        /// Highest block acknowledged.
        acked: u64,
    },
    /// The client sent an ERROR.
    ClientError {
        /// Its code.
        code: u16,
        /// Its message.
        message: String,
    },
    /// The client sent something other than ACK or ERROR.
    Protocol,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum State {
    /// OACK sent, waiting for ACK 0.
    Oack,
    /// Sending data.
    Data,
    /// Finished (done or failed).
    Closed,
}

/// A read transfer.
#[derive(Debug, Clone)]
pub struct Session {
    params: Params,
    total_blocks: u64,
    /// Highest block the client acknowledged (0: none).
    acked: u64,
    /// Highest block sent in the current window.
    sent: u64,
    state: State,
    deadline: Instant,
    rto: Duration,
    retries: u32,
    /// When the current window went out, and whether any of it was a retransmission.
    window_sent: Instant,
    retransmitted: bool,
    srtt: Option<Duration>,
}

impl Session {
    /// Starts a transfer of `size` bytes. With `oack`, the session first sends the OACK and
    /// waits for ACK 0; otherwise it sends the first window at once.
    pub fn start(params: Params, size: u64, oack: bool, now: Instant) -> (Session, Vec<Action>) {
        let blksize = u64::from(params.blksize.max(1));
        let mut s = Session {
            params: Params {
                windowsize: params.windowsize.max(1),
                ..params
            },
            total_blocks: size / blksize + 1,
            acked: 0,
            sent: 0,
            state: if oack { State::Oack } else { State::Data },
            deadline: now + params.timeout,
            rto: params.timeout,
            retries: 0,
            window_sent: now,
            retransmitted: false,
            srtt: None,
        };
        let actions = if oack {
            vec![Action::SendOack]
        } else {
            s.send_window(now)
        };
        (s, actions)
    }

    /// Total number of DATA blocks (the last one is shorter than blksize, possibly empty).
    pub fn total_blocks(&self) -> u64 {
        self.total_blocks
    }

    /// Highest block acknowledged.
    pub fn acked(&self) -> u64 {
        self.acked
    }

    /// The blocks of the next window if the client acknowledges everything sent so far (the
    /// common case), so a caller can read them while it waits; `None` when the last block is
    /// out, or before the data starts.
    pub fn next_window(&self) -> Option<(u64, u64)> {
        if self.state != State::Data || self.sent >= self.total_blocks {
            return None;
        }
        let first = self.sent + 1;
        let last = (self.sent + u64::from(self.params.windowsize)).min(self.total_blocks);
        Some((first, last))
    }

    /// When [`Session::on_timeout`] must be called.
    pub fn deadline(&self) -> Instant {
        self.deadline
    }

    /// True once done or failed.
    pub fn is_closed(&self) -> bool {
        self.state == State::Closed
    }

    /// The negotiated parameters.
    pub fn params(&self) -> Params {
        self.params
    }

    fn send_window(&mut self, now: Instant) -> Vec<Action> {
        let first = self.acked + 1;
        let last = (self.acked + u64::from(self.params.windowsize)).min(self.total_blocks);
        // A window that resends blocks already sent gives no clean RTT sample (Karn).
        self.retransmitted = first <= self.sent;
        self.window_sent = now;
        self.sent = last;
        self.deadline = now + self.rto;
        (first..=last)
            .map(|block| Action::SendData { block })
            .collect()
    }

    /// Handles a packet from the client.
    pub fn on_packet(&mut self, pkt: &Packet, now: Instant) -> Vec<Action> {
        if self.state == State::Closed {
            return Vec::new();
        }
        match pkt {
            Packet::Ack { block } => self.on_ack(*block, now),
            Packet::Error { code, message } => {
                self.state = State::Closed;
                vec![Action::Failed(FailReason::ClientError {
                    code: code.to_u16(),
                    message: message.clone(),
                })]
            }
            _ => {
                self.state = State::Closed;
                vec![
                    Action::SendError {
                        code: ErrorCode::IllegalOperation,
                        message: "expected ACK",
                    },
                    Action::Failed(FailReason::Protocol),
                ]
            }
        }
    }

    fn on_ack(&mut self, wire: u16, now: Instant) -> Vec<Action> {
        if self.state == State::Oack {
            if wire != 0 {
                return Vec::new();
            }
            self.state = State::Data;
            self.retries = 0;
            self.rto = self.params.timeout;
            let out = self.send_window(now);
            self.retransmitted = false;
            return out;
        }
        // The block in [acked, sent] whose low 16 bits are `wire` (the span is at most a
        // window, far less than 65536, so there is at most one).
        let Some(k) = (self.acked..=self.sent)
            .rev()
            .find(|k| (*k & 0xffff) as u16 == wire)
        else {
            return Vec::new(); // older than the window: ignore
        };
        if k == self.acked {
            // A repeated ACK. In lock-step it is ignored (Sorcerer's Apprentice); with a
            // window it reports a gap after `k`, so the window is sent again from `k + 1`.
            if self.params.windowsize > 1 && self.sent > self.acked {
                return self.send_window(now);
            }
            return Vec::new();
        }
        self.acked = k;
        self.retries = 0;
        self.rto = self.adapt(now);
        if k == self.total_blocks {
            self.state = State::Closed;
            return vec![Action::Done];
        }
        // The whole window, or part of it, arrived: the next window starts right after `k`.
        self.send_window(now)
    }

    /// The retransmission timeout after progress at `now`: 4 × smoothed RTT, clamped.
    fn adapt(&mut self, now: Instant) -> Duration {
        if self.params.min_timeout >= self.params.timeout {
            return self.params.timeout;
        }
        if !self.retransmitted {
            let sample = now.saturating_duration_since(self.window_sent);
            self.srtt = Some(match self.srtt {
                Some(s) => (s * 7 + sample) / 8,
                None => sample,
            });
        }
        match self.srtt {
            Some(s) => (s * 4).clamp(self.params.min_timeout, self.params.timeout),
            None => self.params.timeout,
        }
    }

    /// The current retransmission timeout.
    pub fn rto(&self) -> Duration {
        self.rto
    }

    /// Handles the deadline passing: retransmits the outstanding window (or OACK) with a
    /// doubled timeout, or fails after too many tries.
    pub fn on_timeout(&mut self, now: Instant) -> Vec<Action> {
        if self.state == State::Closed || now < self.deadline {
            return Vec::new();
        }
        self.retries += 1;
        if self.retries > self.params.max_retries {
            self.state = State::Closed;
            return vec![Action::Failed(FailReason::TimedOut { acked: self.acked })];
        }
        self.rto = (self.rto * 2).min(MAX_BACKOFF.max(self.params.timeout));
        match self.state {
            State::Oack => {
                self.deadline = now + self.rto;
                vec![Action::SendOack]
            }
            _ => {
                let out = self.send_window(now);
                self.retransmitted = true;
                out
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn params(blksize: u16, windowsize: u16) -> Params {
        Params {
            blksize,
            windowsize,
            timeout: Duration::from_secs(1),
            min_timeout: Duration::from_secs(1),
            max_retries: 5,
        }
    }

    fn blocks(a: &[Action]) -> Vec<u64> {
        a.iter()
            .filter_map(|x| {
                if let Action::SendData { block } = x {
                    Some(*block)
                } else {
                    None
                }
            })
            .collect()
    }

    fn ack(b: u64) -> Packet {
        Packet::Ack {
            block: (b & 0xffff) as u16,
        }
    }

    #[test]
    fn lockstep_transfer() {
        let t0 = Instant::now();
        let (mut s, a) = Session::start(params(512, 1), 1024, false, t0);
        assert_eq!(s.total_blocks(), 3, "two full blocks and an empty one");
        assert_eq!(blocks(&a), vec![1]);
        assert_eq!(blocks(&s.on_packet(&ack(1), t0)), vec![2]);
        // Duplicate ACK 1 in lock-step: ignored (no Sorcerer's Apprentice).
        assert!(s.on_packet(&ack(1), t0).is_empty());
        assert_eq!(blocks(&s.on_packet(&ack(2), t0)), vec![3]);
        assert_eq!(s.on_packet(&ack(3), t0), vec![Action::Done]);
        assert!(s.is_closed());
    }

    #[test]
    fn oack_handshake_then_window() {
        let t0 = Instant::now();
        let (mut s, a) = Session::start(params(1000, 4), 10_000, true, t0);
        assert_eq!(a, vec![Action::SendOack]);
        assert_eq!(s.next_window(), None, "no data before ACK 0");
        assert!(
            s.on_packet(&ack(5), t0).is_empty(),
            "only ACK 0 answers an OACK"
        );
        assert_eq!(blocks(&s.on_packet(&ack(0), t0)), vec![1, 2, 3, 4]);
        assert_eq!(s.next_window(), Some((5, 8)));
        // Partial window: go back to 3.
        assert_eq!(blocks(&s.on_packet(&ack(2), t0)), vec![3, 4, 5, 6]);
        assert_eq!(s.next_window(), Some((7, 10)));
        assert_eq!(blocks(&s.on_packet(&ack(6), t0)), vec![7, 8, 9, 10]);
        assert_eq!(s.next_window(), Some((11, 11)));
        assert_eq!(blocks(&s.on_packet(&ack(10), t0)), vec![11]);
        assert_eq!(s.next_window(), None, "the last block is out");
        assert_eq!(s.on_packet(&ack(11), t0), vec![Action::Done]);
    }

    #[test]
    fn timeouts_back_off_then_fail() {
        let t0 = Instant::now();
        let (mut s, _) = Session::start(params(512, 1), 100, false, t0);
        let mut t = t0;
        let mut gaps = Vec::new();
        loop {
            let d = s.deadline();
            assert!(
                s.on_timeout(d - Duration::from_millis(1)).is_empty(),
                "not before the deadline"
            );
            gaps.push(d - t);
            t = d;
            let a = s.on_timeout(d);
            if let Some(Action::Failed(r)) = a.last() {
                assert_eq!(*r, FailReason::TimedOut { acked: 0 });
                break;
            }
            assert_eq!(blocks(&a), vec![1]);
        }
        let secs: Vec<u64> = gaps.iter().map(|g| g.as_secs()).collect();
        assert_eq!(secs, vec![1, 2, 4, 8, 8, 8]);
    }

    #[test]
    fn timeout_adapts_to_round_trip_time() {
        let t0 = Instant::now();
        let p = Params {
            min_timeout: Duration::from_millis(50),
            ..params(512, 4)
        };
        let (mut s, _) = Session::start(p, 100_000, false, t0);
        assert_eq!(s.rto(), Duration::from_secs(1), "no sample yet");
        // Windows acknowledged 2 ms after they went out: 4 x 2 ms is below the floor.
        let mut t = t0;
        for k in [4u64, 8, 12] {
            t += Duration::from_millis(2);
            s.on_packet(&ack(k), t);
        }
        assert_eq!(s.rto(), Duration::from_millis(50));
        assert_eq!(s.deadline(), t + Duration::from_millis(50));
        // Slow acknowledgements raise it again, up to `timeout`.
        for k in [16u64, 20, 24, 28, 32, 36, 40] {
            t += Duration::from_millis(400);
            s.on_packet(&ack(k), t);
        }
        assert!(s.rto() > Duration::from_millis(900), "{:?}", s.rto());
        for k in [44u64, 48, 52, 56, 60, 64, 68, 72, 76, 80] {
            t += Duration::from_millis(400);
            s.on_packet(&ack(k), t);
        }
        assert_eq!(s.rto(), Duration::from_secs(1), "clamped to timeout");
        // A fixed timeout (min == timeout) never adapts.
        let (mut f, _) = Session::start(params(512, 4), 100_000, false, t0);
        f.on_packet(&ack(4), t0 + Duration::from_millis(1));
        assert_eq!(f.rto(), Duration::from_secs(1));
    }

    #[test]
    fn block_numbers_wrap() {
        let t0 = Instant::now();
        let (mut s, _) = Session::start(params(8, 16), 8 * 70_000, false, t0);
        let mut acked = 0u64;
        while acked + 16 < 65_540 {
            acked += 16;
            s.on_packet(&ack(acked), t0);
        }
        assert_eq!(s.acked(), acked);
        assert!(acked > 65_535, "passed the wrap: {acked}");
    }

    #[test]
    fn client_error_ends_transfer() {
        let t0 = Instant::now();
        let (mut s, _) = Session::start(params(512, 1), 100, true, t0);
        let a = s.on_packet(&Packet::error(ErrorCode::OptionRefused, "no"), t0);
        assert!(matches!(
            a[..],
            [Action::Failed(FailReason::ClientError { code: 8, .. })]
        ));
        assert!(s.on_timeout(t0 + Duration::from_secs(100)).is_empty());
    }

    /// A simulated RFC 7440 receiver over a lossy, duplicating network. It keeps the next
    /// block it expects, acknowledges at window ends, and on its own timeout re-acknowledges
    /// the last in-order block.
    #[derive(Debug, Clone)]
    enum Net {
        Deliver,
        Drop,
        Duplicate,
    }

    proptest! {
        #[test]
        fn delivers_every_byte_in_order_despite_loss(
            size in 0u64..20_000,
            blksize in prop_oneof![Just(8u16), Just(512), Just(1468)],
            window in 1u16..8,
            fate in proptest::collection::vec(prop_oneof![6 => Just(Net::Deliver), 2 => Just(Net::Drop), 1 => Just(Net::Duplicate)], 0..4000),
        ) {
            let mut now = Instant::now();
            let p = Params { blksize, windowsize: window, timeout: Duration::from_secs(1), min_timeout: Duration::from_millis(20), max_retries: 1000 };
            let (mut s, mut actions) = Session::start(p, size, true, now);
            let mut fate = fate.into_iter().chain(std::iter::repeat(Net::Deliver));
            let mut expected = 1u64; // receiver's next block
            let mut received = 0u64; // bytes received in order
            let mut since_ack = 0u16;
            let mut done = false;
            for _ in 0..200_000 {
                let mut acks = Vec::new();
                for a in actions.drain(..) {
                    match a {
                        Action::SendOack => match fate.next() {
                            Some(Net::Drop) => {}
                            _ => acks.push(0u64),
                        },
                        Action::SendData { block } => {
                            let copies = match fate.next() { Some(Net::Drop) => 0, Some(Net::Duplicate) => 2, _ => 1 };
                            for _ in 0..copies {
                                if block == expected {
                                    let off = (block - 1) * u64::from(blksize);
                                    let len = (size - off).min(u64::from(blksize));
                                    received += len;
                                    expected += 1;
                                    since_ack += 1;
                                    if len < u64::from(blksize) || since_ack == window {
                                        acks.push(block);
                                        since_ack = 0;
                                    }
                                }
                            }
                        }
                        Action::Done => done = true,
                        Action::Failed(r) => prop_assert!(false, "failed: {:?}", r),
                        Action::SendError { .. } => prop_assert!(false, "error sent"),
                    }
                }
                if done { break; }
                let mut next = Vec::new();
                for b in acks {
                    if !matches!(fate.next(), Some(Net::Drop)) {
                        // An ACK of everything sent starts the window `next_window` named.
                        let predicted = s.next_window();
                        let acks_all = predicted.is_some_and(|(first, _)| b + 1 == first);
                        let out = s.on_packet(&ack(b), now);
                        if acks_all {
                            prop_assert_eq!(blocks(&out).first().copied(), predicted.map(|p| p.0));
                            prop_assert_eq!(blocks(&out).last().copied(), predicted.map(|p| p.1));
                        }
                        next.extend(out);
                    }
                }
                if next.is_empty() {
                    // Both sides time out: the receiver re-acks its last in-order block.
                    now = s.deadline();
                    since_ack = 0;
                    if expected > 1 {
                        next.extend(s.on_packet(&ack(expected - 1), now));
                    }
                    next.extend(s.on_timeout(now));
                }
                actions = next;
            }
            prop_assert!(done, "transfer did not finish");
            prop_assert_eq!(received, size);
        }
    }
}
