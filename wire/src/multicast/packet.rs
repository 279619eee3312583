//! Packet formats of Strata's layer multicast (docs/multicast.md, "Packets").
//!
//! Every datagram starts with the same 4 bytes: magic `"SM"`, version 1, packet type. All
//! integers are big-endian. [`Packet::parse`] validates every count and length once; the rest
//! of the code works with the typed values. Data packets borrow their payload from the
//! datagram (no copy). Every control packet fits a 1472-byte UDP payload (a 1500-byte MTU).

use std::ops::Range;

use crate::chunk::{chunk_count, Digest, LayerId, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE};
use crate::manifest::MAX_LAYER_SIZE;

/// First two bytes of every datagram.
pub const MAGIC: [u8; 2] = *b"SM";
/// Protocol version carried in byte 2.
pub const VERSION: u8 = 1;
/// Bytes of a data packet before its payload.
pub const DATA_HEADER: usize = 16;
/// Largest control datagram (a 1500-byte MTU minus IPv4 and UDP headers).
pub const MAX_CONTROL: usize = 1472;
/// Smallest symbol (data payload) size.
pub const MIN_SYMBOL_SIZE: u16 = 256;
/// Largest symbol size (a 9000-byte jumbo frame minus IPv4, UDP and data headers).
pub const MAX_SYMBOL_SIZE: u16 = 9000 - 28 - DATA_HEADER as u16;
/// Default symbol size: a 1500-byte MTU minus IPv4 (20), UDP (8) and data (16) headers.
pub const DEFAULT_SYMBOL_SIZE: u16 = 1500 - 28 - DATA_HEADER as u16;
/// Most chunk hashes in one [`Hashes`] packet.
pub const MAX_HASHES_PER_PACKET: usize = 40;
/// Most ranges in one [`Nack`] packet.
pub const MAX_NACK_RANGES: usize = 180;

const T_ANNOUNCE: u8 = 1;
const T_HASHES: u8 = 2;
const T_DATA: u8 = 3;
const T_REPAIR: u8 = 4;
const T_STATUS: u8 = 5;
const T_NACK: u8 = 6;
const T_EVICT: u8 = 7;

const ANNOUNCE_LEN: usize = 4 + 4 + 1 + 1 + 2 + 32 + 8 + 4 + 32 + 4 + 2 + 4;
const STATUS_LEN: usize = 4 + 4 + 8 + 1 + 1 + 2 + 4 + 4;
const EVICT_LEN: usize = 4 + 4 + 8;

/// A datagram that is not a valid packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Fewer bytes than the packet type needs.
    #[error("truncated packet: {need} bytes needed, {got} present")]
    Truncated {
        /// Bytes the packet needs.
        need: usize,
        /// Bytes present.
        got: usize,
    },
    /// Not our magic.
    #[error("not a Strata multicast packet")]
    BadMagic,
    /// Another protocol version.
    #[error("unsupported protocol version {0}")]
    Version(u8),
    /// Unknown packet type.
    #[error("unknown packet type {0}")]
    UnknownType(u8),
    /// Bytes after a fixed-size packet.
    #[error("{extra} bytes after the end of a packet")]
    Trailing {
        /// How many.
        extra: usize,
    },
    /// A field out of its range.
    #[error("invalid {field}: {value}")]
    Invalid {
        /// Field name.
        field: &'static str,
        /// Its value.
        value: u64,
    },
    /// A layout (size, chunk size, symbol size) outside the protocol's bounds.
    #[error(transparent)]
    Layout(#[from] LayoutError),
}

/// A layer layout the protocol cannot carry.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LayoutError {
    /// Layer larger than [`MAX_LAYER_SIZE`].
    #[error("layer size {0} exceeds the limit")]
    Size(u64),
    /// Chunk size outside `MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE`.
    #[error("chunk size {0} out of range")]
    ChunkSize(u32),
    /// Symbol size outside `MIN_SYMBOL_SIZE..=MAX_SYMBOL_SIZE`.
    #[error("symbol size {0} out of range")]
    SymbolSize(u16),
    /// More chunks than a manifest may list ([`crate::manifest::MAX_TOTAL_CHUNKS`]): receivers
    /// size per-chunk state from an announcement, so this bounds what one can make them
    /// allocate.
    #[error("layer has {0} chunks, more than the limit")]
    TooManyChunks(u64),
    /// More symbols than a 32-bit index can name.
    #[error("layer needs {0} symbols, more than 2^32 - 1")]
    TooManySymbols(u64),
}

/// A session identifier, chosen at random by the sender; never 0.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SessionId(u32);

impl SessionId {
    /// `Some` unless `v` is 0.
    pub fn new(v: u32) -> Option<Self> {
        (v != 0).then_some(Self(v))
    }

    /// The raw value.
    pub fn get(self) -> u32 {
        self.0
    }
}

impl std::fmt::Display for SessionId {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{:08x}", self.0)
    }
}

/// How a layer is cut: chunks (the unit of verification, [`crate::chunk`]) and, inside each
/// chunk, symbols (the payload of one data packet). Symbols never straddle chunks: chunk `c`
/// holds symbols `c * per_chunk ..` and its last symbol may be short. Checked on creation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Layout {
    size: u64,
    chunk_size: u32,
    symbol_size: u16,
}

impl Layout {
    /// A checked layout.
    pub fn new(size: u64, chunk_size: u32, symbol_size: u16) -> Result<Self, LayoutError> {
        if size > MAX_LAYER_SIZE {
            return Err(LayoutError::Size(size));
        }
        if !(MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE).contains(&chunk_size) {
            return Err(LayoutError::ChunkSize(chunk_size));
        }
        if !(MIN_SYMBOL_SIZE..=MAX_SYMBOL_SIZE).contains(&symbol_size) {
            return Err(LayoutError::SymbolSize(symbol_size));
        }
        let l = Self {
            size,
            chunk_size,
            symbol_size,
        };
        if l.chunks() > crate::manifest::MAX_TOTAL_CHUNKS as u64 {
            return Err(LayoutError::TooManyChunks(l.chunks()));
        }
        let total = l.chunks() * u64::from(l.per_chunk());
        if total >= u64::from(u32::MAX) {
            return Err(LayoutError::TooManySymbols(total));
        }
        Ok(l)
    }

    /// Layer size in bytes.
    pub fn size(&self) -> u64 {
        self.size
    }

    /// Chunk size in bytes.
    pub fn chunk_size(&self) -> u32 {
        self.chunk_size
    }

    /// Symbol size in bytes.
    pub fn symbol_size(&self) -> u16 {
        self.symbol_size
    }

    /// Number of chunks.
    pub fn chunks(&self) -> u64 {
        chunk_count(self.size, self.chunk_size)
    }

    /// Symbol slots per chunk (the last chunk may use fewer).
    pub fn per_chunk(&self) -> u32 {
        self.chunk_size.div_ceil(u32::from(self.symbol_size))
    }

    /// One past the highest symbol index (slot count, including the unused slots of a short
    /// last chunk).
    pub fn symbol_slots(&self) -> u32 {
        // Bounded by `new`.
        u32::try_from(self.chunks() * u64::from(self.per_chunk())).unwrap_or(u32::MAX)
    }

    /// Byte length of chunk `c` (0 past the end).
    pub fn chunk_len(&self, c: u32) -> u32 {
        let r = crate::chunk::chunk_range(u64::from(c), self.size, self.chunk_size);
        u32::try_from(r.end - r.start).unwrap_or(0)
    }

    /// Number of symbols chunk `c` really has.
    pub fn symbols_in(&self, c: u32) -> u32 {
        self.chunk_len(c).div_ceil(u32::from(self.symbol_size))
    }

    /// `(chunk, index in chunk)` of a symbol.
    pub fn locate(&self, symbol: u32) -> (u32, u32) {
        let pc = self.per_chunk();
        (symbol / pc, symbol % pc)
    }

    /// First symbol index of chunk `c`.
    pub fn first_symbol(&self, c: u32) -> u32 {
        c.saturating_mul(self.per_chunk())
    }

    /// Byte range of a symbol within its chunk, or `None` if the symbol does not exist.
    pub fn symbol_in_chunk(&self, symbol: u32) -> Option<Range<u32>> {
        let (c, j) = self.locate(symbol);
        let len = self.chunk_len(c);
        let start = j.checked_mul(u32::from(self.symbol_size))?;
        if start >= len {
            return None;
        }
        Some(start..(start + u32::from(self.symbol_size)).min(len))
    }

    /// Byte range of a symbol in the layer, or `None` if the symbol does not exist.
    pub fn symbol_range(&self, symbol: u32) -> Option<Range<u64>> {
        let r = self.symbol_in_chunk(symbol)?;
        let base = u64::from(self.locate(symbol).0) * u64::from(self.chunk_size);
        Some(base + u64::from(r.start)..base + u64::from(r.end))
    }
}

/// Where a session is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SessionPhase {
    /// Announced, waiting for receivers (or a deadline, or an operator) before sending.
    Waiting,
    /// Sending data and repairs.
    Sending,
    /// Finished: no more data or repairs will be sent.
    Ending,
}

/// Session announcement, sent to the group periodically.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Announce {
    /// Session.
    pub session: SessionId,
    /// Phase.
    pub phase: SessionPhase,
    /// The layer's blake3.
    pub layer: LayerId,
    /// Size, chunk size, symbol size.
    pub layout: Layout,
    /// blake3 of the concatenated chunk hashes (32 bytes each, in order).
    pub hash_list: Digest,
    /// Symbols of the first pass sent so far (a receiver may ask for anything below it).
    pub horizon: u32,
    /// Receivers the sender currently counts.
    pub receivers: u16,
    /// Current send rate in kbit/s (informative).
    pub rate_kbps: u32,
}

/// A run of chunk hashes, for receivers that do not have them from a signed manifest.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Hashes {
    /// Session.
    pub session: SessionId,
    /// Index of the first chunk.
    pub first: u32,
    /// 1..=[`MAX_HASHES_PER_PACKET`] hashes.
    pub hashes: Vec<Digest>,
}

/// One symbol of layer data.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Data<'a> {
    /// Session.
    pub session: SessionId,
    /// Sender's packet sequence number (counts every data packet; receivers measure loss).
    pub seq: u32,
    /// Symbol index ([`Layout`]).
    pub symbol: u32,
    /// A repair (resent) symbol rather than the first pass.
    pub repair: bool,
    /// The symbol's bytes.
    pub payload: &'a [u8],
}

/// A receiver's state as it reports it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReceiverPhase {
    /// Joined, waiting for data.
    Waiting,
    /// Receiving.
    Receiving,
    /// Has the whole layer, verified.
    Done,
    /// Stopped before the end (deadline, eviction); will fetch the rest elsewhere.
    Left,
}

/// Periodic receiver report, sent by unicast to the sender.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Status {
    /// Session.
    pub session: SessionId,
    /// Random receiver id, new for each run of a receiver.
    pub receiver: u64,
    /// Phase.
    pub phase: ReceiverPhase,
    /// Data packets lost since the last report, per mille (from sequence gaps).
    pub loss_permille: u16,
    /// Chunks the receiver has, verified.
    pub have_chunks: u32,
    /// Symbols it still misses.
    pub missing_symbols: u32,
}

/// A run of symbols `start .. start + count`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct SymbolRange {
    /// First symbol.
    pub start: u32,
    /// How many (at least 1).
    pub count: u32,
}

impl SymbolRange {
    /// As a range of indices.
    pub fn range(&self) -> Range<u32> {
        // `parse` checks that start + count does not overflow.
        self.start..self.start.saturating_add(self.count)
    }
}

/// Negative acknowledgement: symbols a receiver misses, by unicast to the sender.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Nack {
    /// Session.
    pub session: SessionId,
    /// Receiver id.
    pub receiver: u64,
    /// 1..=[`MAX_NACK_RANGES`] ranges.
    pub ranges: Vec<SymbolRange>,
}

/// The sender stops serving a receiver (it is too slow); it must fetch the rest by unicast.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Evict {
    /// Session.
    pub session: SessionId,
    /// Receiver id.
    pub receiver: u64,
}

/// Any packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet<'a> {
    /// Session announcement.
    Announce(Announce),
    /// Chunk hashes.
    Hashes(Hashes),
    /// Layer data.
    Data(Data<'a>),
    /// Receiver report.
    Status(Status),
    /// Repair request.
    Nack(Nack),
    /// Sender gives up on a receiver.
    Evict(Evict),
}

impl Packet<'_> {
    /// The session the packet belongs to.
    pub fn session(&self) -> SessionId {
        match self {
            Packet::Announce(p) => p.session,
            Packet::Hashes(p) => p.session,
            Packet::Data(p) => p.session,
            Packet::Status(p) => p.session,
            Packet::Nack(p) => p.session,
            Packet::Evict(p) => p.session,
        }
    }
}

/// Bounds-checked big-endian reader.
struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    total: usize,
}

impl<'a> Reader<'a> {
    fn take(&mut self, n: usize) -> Result<&'a [u8], PacketError> {
        let need = self.pos.saturating_add(n);
        let out = self.buf.get(self.pos..need).ok_or(PacketError::Truncated {
            need,
            got: self.total,
        })?;
        self.pos = need;
        Ok(out)
    }

    fn array<const N: usize>(&mut self) -> Result<[u8; N], PacketError> {
        let mut a = [0u8; N];
        a.copy_from_slice(self.take(N)?);
        Ok(a)
    }

    fn u8(&mut self) -> Result<u8, PacketError> {
        Ok(self.array::<1>()?[0])
    }

    fn u16(&mut self) -> Result<u16, PacketError> {
        Ok(u16::from_be_bytes(self.array()?))
    }

    fn u32(&mut self) -> Result<u32, PacketError> {
        Ok(u32::from_be_bytes(self.array()?))
    }

    fn u64(&mut self) -> Result<u64, PacketError> {
        Ok(u64::from_be_bytes(self.array()?))
    }

    fn digest(&mut self) -> Result<Digest, PacketError> {
        Ok(Digest(self.array()?))
    }

    fn session(&mut self) -> Result<SessionId, PacketError> {
        let v = self.u32()?;
        SessionId::new(v).ok_or(PacketError::Invalid {
            field: "session",
            value: 0,
        })
    }

    fn rest(&mut self) -> &'a [u8] {
        let out = self.buf.get(self.pos..).unwrap_or_default();
        self.pos = self.buf.len();
        out
    }

    fn end(&self) -> Result<(), PacketError> {
        match self.buf.len() - self.pos.min(self.buf.len()) {
            0 => Ok(()),
            extra => Err(PacketError::Trailing { extra }),
        }
    }
}

fn header(out: &mut Vec<u8>, ty: u8) {
    out.extend_from_slice(&MAGIC);
    out.push(VERSION);
    out.push(ty);
}

/// Writes a data packet header into the first [`DATA_HEADER`] bytes of `buf` (the payload
/// follows). The sender uses this to build data packets in place without copying the payload.
pub fn write_data_header(
    buf: &mut [u8; DATA_HEADER],
    session: SessionId,
    seq: u32,
    symbol: u32,
    repair: bool,
) {
    let ty = if repair { T_REPAIR } else { T_DATA };
    let mut h = [0u8; DATA_HEADER];
    h[..2].copy_from_slice(&MAGIC);
    h[2] = VERSION;
    h[3] = ty;
    h[4..8].copy_from_slice(&session.get().to_be_bytes());
    h[8..12].copy_from_slice(&seq.to_be_bytes());
    h[12..16].copy_from_slice(&symbol.to_be_bytes());
    *buf = h;
}

impl<'a> Packet<'a> {
    /// Parses one datagram. Checks magic, version, every length and count, and field ranges.
    /// A data packet's payload length is checked against the layout by the receiver, which
    /// knows the layout.
    pub fn parse(buf: &'a [u8]) -> Result<Packet<'a>, PacketError> {
        let mut r = Reader {
            buf,
            pos: 0,
            total: buf.len(),
        };
        if r.array::<2>()? != MAGIC {
            return Err(PacketError::BadMagic);
        }
        let version = r.u8()?;
        if version != VERSION {
            return Err(PacketError::Version(version));
        }
        let ty = r.u8()?;
        let pkt = match ty {
            T_DATA | T_REPAIR => {
                let session = r.session()?;
                let seq = r.u32()?;
                let symbol = r.u32()?;
                let payload = r.rest();
                if payload.is_empty() || payload.len() > usize::from(MAX_SYMBOL_SIZE) {
                    return Err(PacketError::Invalid {
                        field: "payload length",
                        value: payload.len() as u64,
                    });
                }
                return Ok(Packet::Data(Data {
                    session,
                    seq,
                    symbol,
                    repair: ty == T_REPAIR,
                    payload,
                }));
            }
            T_ANNOUNCE => {
                if buf.len() < ANNOUNCE_LEN {
                    return Err(PacketError::Truncated {
                        need: ANNOUNCE_LEN,
                        got: buf.len(),
                    });
                }
                let session = r.session()?;
                let phase = match r.u8()? {
                    0 => SessionPhase::Waiting,
                    1 => SessionPhase::Sending,
                    2 => SessionPhase::Ending,
                    v => {
                        return Err(PacketError::Invalid {
                            field: "session phase",
                            value: v.into(),
                        })
                    }
                };
                let flags = r.u8()?;
                if flags != 0 {
                    return Err(PacketError::Invalid {
                        field: "announce flags",
                        value: flags.into(),
                    });
                }
                let symbol_size = r.u16()?;
                let layer = r.digest()?;
                let size = r.u64()?;
                let chunk_size = r.u32()?;
                let hash_list = r.digest()?;
                let horizon = r.u32()?;
                let receivers = r.u16()?;
                let rate_kbps = r.u32()?;
                let layout = Layout::new(size, chunk_size, symbol_size)?;
                if horizon > layout.symbol_slots() {
                    return Err(PacketError::Invalid {
                        field: "horizon",
                        value: horizon.into(),
                    });
                }
                Packet::Announce(Announce {
                    session,
                    phase,
                    layer,
                    layout,
                    hash_list,
                    horizon,
                    receivers,
                    rate_kbps,
                })
            }
            T_HASHES => {
                let session = r.session()?;
                let first = r.u32()?;
                let count = r.u16()?;
                if count == 0 || usize::from(count) > MAX_HASHES_PER_PACKET {
                    return Err(PacketError::Invalid {
                        field: "hash count",
                        value: count.into(),
                    });
                }
                if first.checked_add(u32::from(count)).is_none() {
                    return Err(PacketError::Invalid {
                        field: "first chunk",
                        value: first.into(),
                    });
                }
                let mut hashes = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    hashes.push(r.digest()?);
                }
                Packet::Hashes(Hashes {
                    session,
                    first,
                    hashes,
                })
            }
            T_STATUS => {
                if buf.len() < STATUS_LEN {
                    return Err(PacketError::Truncated {
                        need: STATUS_LEN,
                        got: buf.len(),
                    });
                }
                let session = r.session()?;
                let receiver = r.u64()?;
                let phase = match r.u8()? {
                    0 => ReceiverPhase::Waiting,
                    1 => ReceiverPhase::Receiving,
                    2 => ReceiverPhase::Done,
                    3 => ReceiverPhase::Left,
                    v => {
                        return Err(PacketError::Invalid {
                            field: "receiver phase",
                            value: v.into(),
                        })
                    }
                };
                let reserved = r.u8()?;
                if reserved != 0 {
                    return Err(PacketError::Invalid {
                        field: "status flags",
                        value: reserved.into(),
                    });
                }
                let loss_permille = r.u16()?;
                if loss_permille > 1000 {
                    return Err(PacketError::Invalid {
                        field: "loss",
                        value: loss_permille.into(),
                    });
                }
                let have_chunks = r.u32()?;
                let missing_symbols = r.u32()?;
                Packet::Status(Status {
                    session,
                    receiver,
                    phase,
                    loss_permille,
                    have_chunks,
                    missing_symbols,
                })
            }
            T_NACK => {
                let session = r.session()?;
                let receiver = r.u64()?;
                let count = r.u16()?;
                if count == 0 || usize::from(count) > MAX_NACK_RANGES {
                    return Err(PacketError::Invalid {
                        field: "nack range count",
                        value: count.into(),
                    });
                }
                let mut ranges = Vec::with_capacity(usize::from(count));
                for _ in 0..count {
                    let start = r.u32()?;
                    let n = r.u32()?;
                    if n == 0 || start.checked_add(n).is_none() {
                        return Err(PacketError::Invalid {
                            field: "nack range",
                            value: (u64::from(start) << 32) | u64::from(n),
                        });
                    }
                    ranges.push(SymbolRange { start, count: n });
                }
                Packet::Nack(Nack {
                    session,
                    receiver,
                    ranges,
                })
            }
            T_EVICT => {
                if buf.len() < EVICT_LEN {
                    return Err(PacketError::Truncated {
                        need: EVICT_LEN,
                        got: buf.len(),
                    });
                }
                Packet::Evict(Evict {
                    session: r.session()?,
                    receiver: r.u64()?,
                })
            }
            other => return Err(PacketError::UnknownType(other)),
        };
        r.end()?;
        Ok(pkt)
    }

    /// Serialises the packet.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::with_capacity(64);
        match self {
            Packet::Data(d) => {
                let mut h = [0u8; DATA_HEADER];
                write_data_header(&mut h, d.session, d.seq, d.symbol, d.repair);
                out.extend_from_slice(&h);
                out.extend_from_slice(d.payload);
            }
            Packet::Announce(a) => {
                header(&mut out, T_ANNOUNCE);
                out.extend_from_slice(&a.session.get().to_be_bytes());
                out.push(match a.phase {
                    SessionPhase::Waiting => 0,
                    SessionPhase::Sending => 1,
                    SessionPhase::Ending => 2,
                });
                out.push(0);
                out.extend_from_slice(&a.layout.symbol_size().to_be_bytes());
                out.extend_from_slice(a.layer.as_bytes());
                out.extend_from_slice(&a.layout.size().to_be_bytes());
                out.extend_from_slice(&a.layout.chunk_size().to_be_bytes());
                out.extend_from_slice(a.hash_list.as_bytes());
                out.extend_from_slice(&a.horizon.to_be_bytes());
                out.extend_from_slice(&a.receivers.to_be_bytes());
                out.extend_from_slice(&a.rate_kbps.to_be_bytes());
            }
            Packet::Hashes(h) => {
                header(&mut out, T_HASHES);
                out.extend_from_slice(&h.session.get().to_be_bytes());
                out.extend_from_slice(&h.first.to_be_bytes());
                let n = h.hashes.len().min(MAX_HASHES_PER_PACKET);
                out.extend_from_slice(&(n as u16).to_be_bytes());
                for d in h.hashes.iter().take(n) {
                    out.extend_from_slice(d.as_bytes());
                }
            }
            Packet::Status(s) => {
                header(&mut out, T_STATUS);
                out.extend_from_slice(&s.session.get().to_be_bytes());
                out.extend_from_slice(&s.receiver.to_be_bytes());
                out.push(match s.phase {
                    ReceiverPhase::Waiting => 0,
                    ReceiverPhase::Receiving => 1,
                    ReceiverPhase::Done => 2,
                    ReceiverPhase::Left => 3,
                });
                out.push(0);
                out.extend_from_slice(&s.loss_permille.min(1000).to_be_bytes());
                out.extend_from_slice(&s.have_chunks.to_be_bytes());
                out.extend_from_slice(&s.missing_symbols.to_be_bytes());
            }
            Packet::Nack(n) => {
                header(&mut out, T_NACK);
                out.extend_from_slice(&n.session.get().to_be_bytes());
                out.extend_from_slice(&n.receiver.to_be_bytes());
                let k = n.ranges.len().min(MAX_NACK_RANGES);
                out.extend_from_slice(&(k as u16).to_be_bytes());
                for r in n.ranges.iter().take(k) {
                    out.extend_from_slice(&r.start.to_be_bytes());
                    out.extend_from_slice(&r.count.to_be_bytes());
                }
            }
            Packet::Evict(e) => {
                header(&mut out, T_EVICT);
                out.extend_from_slice(&e.session.get().to_be_bytes());
                out.extend_from_slice(&e.receiver.to_be_bytes());
            }
        }
        out
    }
}

/// blake3 of the concatenated chunk hashes: what an announcement carries as `hash_list`.
pub fn hash_list_digest(hashes: &[Digest]) -> Digest {
    let mut h = blake3::Hasher::new();
    for d in hashes {
        h.update(d.as_bytes());
    }
    Digest::from(h.finalize())
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn any_digest() -> impl Strategy<Value = Digest> {
        any::<[u8; 32]>().prop_map(Digest)
    }

    fn any_session() -> impl Strategy<Value = SessionId> {
        (1u32..).prop_map(|v| SessionId::new(v).unwrap())
    }

    fn any_layout() -> impl Strategy<Value = Layout> {
        (
            0u64..(1 << 36),
            MIN_CHUNK_SIZE..=MAX_CHUNK_SIZE,
            MIN_SYMBOL_SIZE..=MAX_SYMBOL_SIZE,
        )
            .prop_filter_map("layout", |(s, c, y)| Layout::new(s, c, y).ok())
    }

    fn any_control() -> impl Strategy<Value = Packet<'static>> {
        prop_oneof![
            (
                any_session(),
                0u8..3,
                any_digest(),
                any_layout(),
                any_digest(),
                any::<u32>(),
                any::<u16>(),
                any::<u32>()
            )
                .prop_map(
                    |(session, p, layer, layout, hash_list, h, receivers, rate_kbps)| {
                        Packet::Announce(Announce {
                            session,
                            phase: [
                                SessionPhase::Waiting,
                                SessionPhase::Sending,
                                SessionPhase::Ending,
                            ][p as usize],
                            layer,
                            layout,
                            hash_list,
                            horizon: h % (layout.symbol_slots() + 1),
                            receivers,
                            rate_kbps,
                        })
                    }
                ),
            (
                any_session(),
                0u32..u32::MAX - 64,
                proptest::collection::vec(any_digest(), 1..=MAX_HASHES_PER_PACKET)
            )
                .prop_map(|(session, first, hashes)| Packet::Hashes(Hashes {
                    session,
                    first,
                    hashes
                })),
            (
                any_session(),
                any::<u64>(),
                0u8..4,
                0u16..=1000,
                any::<u32>(),
                any::<u32>()
            )
                .prop_map(
                    |(session, receiver, p, loss_permille, have_chunks, missing_symbols)| {
                        Packet::Status(Status {
                            session,
                            receiver,
                            phase: [
                                ReceiverPhase::Waiting,
                                ReceiverPhase::Receiving,
                                ReceiverPhase::Done,
                                ReceiverPhase::Left,
                            ][p as usize],
                            loss_permille,
                            have_chunks,
                            missing_symbols,
                        })
                    }
                ),
            (
                any_session(),
                any::<u64>(),
                proptest::collection::vec((any::<u32>(), 1u32..1000), 1..=MAX_NACK_RANGES)
            )
                .prop_map(|(session, receiver, rs)| Packet::Nack(Nack {
                    session,
                    receiver,
                    ranges: rs
                        .into_iter()
                        .map(|(s, c)| SymbolRange {
                            start: s.min(u32::MAX - c),
                            count: c
                        })
                        .collect(),
                })),
            (any_session(), any::<u64>())
                .prop_map(|(session, receiver)| Packet::Evict(Evict { session, receiver })),
        ]
    }

    proptest! {
        #[test]
        fn control_round_trips(p in any_control()) {
            let bytes = p.to_bytes();
            prop_assert!(bytes.len() <= MAX_CONTROL, "{} bytes", bytes.len());
            prop_assert_eq!(Packet::parse(&bytes).unwrap(), p);
        }

        #[test]
        fn data_round_trips(
            session in any_session(),
            seq in any::<u32>(),
            symbol in any::<u32>(),
            repair in any::<bool>(),
            payload in proptest::collection::vec(any::<u8>(), 1..=MAX_SYMBOL_SIZE as usize),
        ) {
            let p = Packet::Data(Data { session, seq, symbol, repair, payload: &payload });
            let bytes = p.to_bytes();
            prop_assert_eq!(bytes.len(), DATA_HEADER + payload.len());
            prop_assert_eq!(Packet::parse(&bytes).unwrap(), p);
        }

        #[test]
        fn parse_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..2000)) {
            let _ = Packet::parse(&bytes);
        }

        #[test]
        fn truncation_is_an_error(p in any_control(), cut in any::<prop::sample::Index>()) {
            let bytes = p.to_bytes();
            let n = cut.index(bytes.len());
            prop_assert!(Packet::parse(&bytes[..n]).is_err());
        }

        #[test]
        fn symbols_tile_the_layer(size in 0u64..5_000_000, cs in 4096u32..300_000, sy in MIN_SYMBOL_SIZE..=MAX_SYMBOL_SIZE) {
            let l = Layout::new(size, cs, sy).unwrap();
            let mut next = 0u64;
            for c in 0..l.chunks() as u32 {
                for j in 0..l.per_chunk() {
                    let s = l.first_symbol(c) + j;
                    match l.symbol_range(s) {
                        Some(r) => { prop_assert_eq!(r.start, next); prop_assert!(j < l.symbols_in(c)); next = r.end; }
                        None => prop_assert!(j >= l.symbols_in(c)),
                    }
                }
            }
            prop_assert_eq!(next, size);
        }
    }

    #[test]
    fn corruptions_name_the_error() {
        let a = Packet::Evict(Evict {
            session: SessionId::new(7).unwrap(),
            receiver: 9,
        })
        .to_bytes();
        let mut b = a.clone();
        b[0] = b'X';
        assert_eq!(Packet::parse(&b), Err(PacketError::BadMagic));
        let mut b = a.clone();
        b[2] = 2;
        assert_eq!(Packet::parse(&b), Err(PacketError::Version(2)));
        let mut b = a.clone();
        b[3] = 99;
        assert_eq!(Packet::parse(&b), Err(PacketError::UnknownType(99)));
        let mut b = a.clone();
        b[4..8].copy_from_slice(&[0; 4]);
        assert!(matches!(
            Packet::parse(&b),
            Err(PacketError::Invalid {
                field: "session",
                ..
            })
        ));
        let mut b = a.clone();
        b.push(0);
        assert_eq!(Packet::parse(&b), Err(PacketError::Trailing { extra: 1 }));
        let nack = Packet::Nack(Nack {
            session: SessionId::new(7).unwrap(),
            receiver: 1,
            ranges: vec![SymbolRange {
                start: u32::MAX,
                count: 1,
            }],
        })
        .to_bytes();
        assert!(matches!(
            Packet::parse(&nack),
            Err(PacketError::Invalid {
                field: "nack range",
                ..
            })
        ));
    }

    #[test]
    fn data_header_is_small() {
        // 1514-byte Ethernet frames carry 1456 bytes of layer data: 1.040 wire bytes per byte.
        assert_eq!(usize::from(DEFAULT_SYMBOL_SIZE) + DATA_HEADER + 28, 1500);
    }
}
