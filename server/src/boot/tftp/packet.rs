//! TFTP packets (RFC 1350 §5) and options (RFC 2347 option extension, RFC 2348 blksize,
//! RFC 2349 timeout and tsize, RFC 7440 windowsize).
//!
//! [`Packet::parse`] validates a datagram once into typed values. Option values are checked
//! here: a known option with a value outside its RFC range is kept as
//! [`TftpOption::Unknown`], which the server ignores (RFC 2347: an option the server does not
//! accept is left out of the OACK); a blksize above 65464 is clamped to 65464 (RFC 2348 lets
//! the server answer with a smaller value). At most [`MAX_OPTIONS`] options are read.
#![cfg_attr(
    not(test),
    deny(
        clippy::unwrap_used,
        clippy::expect_used,
        clippy::panic,
        clippy::indexing_slicing
    )
)]

use std::fmt;

/// Smallest blksize (RFC 2348).
pub const MIN_BLKSIZE: u16 = 8;
/// Largest blksize (RFC 2348).
pub const MAX_BLKSIZE: u16 = 65464;
/// The RFC 1350 block size.
pub const DEFAULT_BLKSIZE: u16 = 512;
/// At most this many options are read from a request.
pub const MAX_OPTIONS: usize = 32;

/// Why a datagram is not a TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PacketError {
    /// Shorter than an opcode.
    #[error("packet of {len} bytes is too short")]
    TooShort {
        /// Datagram length.
        len: usize,
    },
    /// Unknown opcode.
    #[error("unknown opcode {opcode}")]
    BadOpcode {
        /// The opcode.
        opcode: u16,
    },
    /// A string field has no terminating NUL.
    #[error("unterminated {field}")]
    Unterminated {
        /// Which field.
        field: &'static str,
    },
    /// A string field is not UTF-8.
    #[error("{field} is not UTF-8")]
    NotUtf8 {
        /// Which field.
        field: &'static str,
    },
    /// The transfer mode is not netascii, octet or mail.
    #[error("unknown transfer mode {mode:?}")]
    BadMode {
        /// The mode sent.
        mode: String,
    },
    /// An empty file name.
    #[error("empty file name")]
    EmptyFilename,
    /// More than [`MAX_OPTIONS`] options.
    #[error("more than {MAX_OPTIONS} options")]
    TooManyOptions,
    /// An option name without a value.
    #[error("option {name:?} has no value")]
    MissingValue {
        /// The option name.
        name: String,
    },
    /// A DATA payload larger than the largest block size.
    #[error("DATA payload of {len} bytes exceeds 65464")]
    DataTooLong {
        /// Payload length.
        len: usize,
    },
}

/// Transfer mode (RFC 1350 §5).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    /// Bytes as they are.
    Octet,
    /// Text with CR LF line ends (RFC 764).
    NetAscii,
    /// Obsolete mail mode (refused by the server).
    Mail,
}

impl Mode {
    fn as_str(self) -> &'static str {
        match self {
            Mode::Octet => "octet",
            Mode::NetAscii => "netascii",
            Mode::Mail => "mail",
        }
    }
}

impl fmt::Display for Mode {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

/// One option of a request or OACK.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TftpOption {
    /// `blksize`, 8..=65464 (RFC 2348).
    BlkSize(u16),
    /// `tsize`: 0 in a read request, the file size in an OACK (RFC 2349).
    TSize(u64),
    /// `timeout` in seconds, 1..=255 (RFC 2349).
    Timeout(u8),
    /// `windowsize`, 1..=65535 (RFC 7440).
    WindowSize(u16),
    /// Anything else, or a known option with a value out of range: ignored by the server.
    Unknown {
        /// Name as sent.
        name: String,
        /// Value as sent.
        value: String,
    },
}

impl TftpOption {
    fn from_pair(name: &str, value: &str) -> TftpOption {
        let num = || -> Option<u64> {
            if value.is_empty() || value.len() > 20 || !value.bytes().all(|b| b.is_ascii_digit()) {
                return None;
            }
            value.parse().ok()
        };
        let typed = match name.to_ascii_lowercase().as_str() {
            "blksize" => num().filter(|v| *v >= u64::from(MIN_BLKSIZE)).map(|v| {
                TftpOption::BlkSize(
                    u16::try_from(v.min(u64::from(MAX_BLKSIZE))).unwrap_or(MAX_BLKSIZE),
                )
            }),
            "tsize" => num().map(TftpOption::TSize),
            "timeout" => num()
                .and_then(|v| u8::try_from(v).ok())
                .filter(|v| *v >= 1)
                .map(TftpOption::Timeout),
            "windowsize" => num()
                .and_then(|v| u16::try_from(v).ok())
                .filter(|v| *v >= 1)
                .map(TftpOption::WindowSize),
            _ => None,
        };
        typed.unwrap_or_else(|| TftpOption::Unknown {
            name: name.to_owned(),
            value: value.to_owned(),
        })
    }

    fn pair(&self) -> (String, String) {
        match self {
            TftpOption::BlkSize(v) => ("blksize".into(), v.to_string()),
            TftpOption::TSize(v) => ("tsize".into(), v.to_string()),
            TftpOption::Timeout(v) => ("timeout".into(), v.to_string()),
            TftpOption::WindowSize(v) => ("windowsize".into(), v.to_string()),
            TftpOption::Unknown { name, value } => (name.clone(), value.clone()),
        }
    }
}

/// A read or write request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Request {
    /// File name as sent (not yet checked against the root).
    pub filename: String,
    /// Transfer mode.
    pub mode: Mode,
    /// Options in the order sent.
    pub options: Vec<TftpOption>,
}

/// TFTP error codes (RFC 1350 §5, RFC 2347).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ErrorCode {
    /// 0: see the message.
    NotDefined,
    /// 1
    FileNotFound,
    /// 2
    AccessViolation,
    /// 3
    DiskFull,
    /// 4
    IllegalOperation,
    /// 5
    UnknownTransferId,
    /// 6
    FileExists,
    /// 7
    NoSuchUser,
    /// 8: option negotiation refused (RFC 2347).
    OptionRefused,
    /// Any other value.
    Other(u16),
}

impl ErrorCode {
    /// Wire value.
    pub fn to_u16(self) -> u16 {
        match self {
            ErrorCode::NotDefined => 0,
            ErrorCode::FileNotFound => 1,
            ErrorCode::AccessViolation => 2,
            ErrorCode::DiskFull => 3,
            ErrorCode::IllegalOperation => 4,
            ErrorCode::UnknownTransferId => 5,
            ErrorCode::FileExists => 6,
            ErrorCode::NoSuchUser => 7,
            ErrorCode::OptionRefused => 8,
            ErrorCode::Other(v) => v,
        }
    }

    /// From the wire value.
    pub fn from_u16(v: u16) -> Self {
        match v {
            0 => ErrorCode::NotDefined,
            1 => ErrorCode::FileNotFound,
            2 => ErrorCode::AccessViolation,
            3 => ErrorCode::DiskFull,
            4 => ErrorCode::IllegalOperation,
            5 => ErrorCode::UnknownTransferId,
            6 => ErrorCode::FileExists,
            7 => ErrorCode::NoSuchUser,
            8 => ErrorCode::OptionRefused,
            v => ErrorCode::Other(v),
        }
    }
}

/// A TFTP packet.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Packet {
    /// 1: read request.
    Rrq(Request),
    /// 2: write request.
    Wrq(Request),
    /// 3: data block.
    Data {
        /// Block number (wraps).
        block: u16,
        /// Payload, at most 65464 bytes.
        data: Vec<u8>,
    },
    /// 4: acknowledgement.
    Ack {
        /// Block number.
        block: u16,
    },
    /// 5: error.
    Error {
        /// Code.
        code: ErrorCode,
        /// Message (no NUL).
        message: String,
    },
    /// 6: option acknowledgement (RFC 2347).
    Oack {
        /// Accepted options.
        options: Vec<TftpOption>,
    },
}

/// Splits off a NUL-terminated string.
fn take_str<'a>(b: &'a [u8], field: &'static str) -> Result<(&'a str, &'a [u8]), PacketError> {
    let nul = b
        .iter()
        .position(|&c| c == 0)
        .ok_or(PacketError::Unterminated { field })?;
    let s = std::str::from_utf8(b.get(..nul).unwrap_or_default())
        .map_err(|_| PacketError::NotUtf8 { field })?;
    Ok((s, b.get(nul + 1..).unwrap_or_default()))
}

fn parse_options(mut rest: &[u8]) -> Result<Vec<TftpOption>, PacketError> {
    let mut out = Vec::new();
    // Some PXE ROMs pad requests with NULs: trailing NULs end the list.
    while rest.iter().any(|&b| b != 0) {
        if out.len() == MAX_OPTIONS {
            return Err(PacketError::TooManyOptions);
        }
        let (name, r) = take_str(rest, "option name")?;
        if r.is_empty() {
            return Err(PacketError::MissingValue {
                name: name.to_owned(),
            });
        }
        let (value, r) = take_str(r, "option value")?;
        // An option with an empty name means nothing; skip it.
        if !name.is_empty() {
            out.push(TftpOption::from_pair(name, value));
        }
        rest = r;
    }
    Ok(out)
}

fn parse_request(b: &[u8]) -> Result<Request, PacketError> {
    let (filename, rest) = take_str(b, "file name")?;
    if filename.is_empty() {
        return Err(PacketError::EmptyFilename);
    }
    let (mode, rest) = take_str(rest, "mode")?;
    let mode = match mode.to_ascii_lowercase().as_str() {
        "octet" => Mode::Octet,
        "netascii" => Mode::NetAscii,
        "mail" => Mode::Mail,
        _ => {
            return Err(PacketError::BadMode {
                mode: mode.to_owned(),
            })
        }
    };
    Ok(Request {
        filename: filename.to_owned(),
        mode,
        options: parse_options(rest)?,
    })
}

fn u16_at(b: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes([*b.get(at)?, *b.get(at + 1)?]))
}

impl Packet {
    /// Parses and validates a datagram.
    pub fn parse(b: &[u8]) -> Result<Packet, PacketError> {
        let opcode = u16_at(b, 0).ok_or(PacketError::TooShort { len: b.len() })?;
        let body = b.get(2..).unwrap_or_default();
        let short = || PacketError::TooShort { len: b.len() };
        Ok(match opcode {
            1 => Packet::Rrq(parse_request(body)?),
            2 => Packet::Wrq(parse_request(body)?),
            3 => {
                let block = u16_at(b, 2).ok_or_else(short)?;
                let data = b.get(4..).unwrap_or_default();
                if data.len() > usize::from(MAX_BLKSIZE) {
                    return Err(PacketError::DataTooLong { len: data.len() });
                }
                Packet::Data {
                    block,
                    data: data.to_vec(),
                }
            }
            // Extra bytes after an ACK are ignored (some clients pad).
            4 => Packet::Ack {
                block: u16_at(b, 2).ok_or_else(short)?,
            },
            5 => {
                let code = ErrorCode::from_u16(u16_at(b, 2).ok_or_else(short)?);
                let msg = b.get(4..).unwrap_or_default();
                // Lenient: a missing NUL or invalid UTF-8 in an error message is tolerated.
                let end = msg.iter().position(|&c| c == 0).unwrap_or(msg.len());
                let message =
                    String::from_utf8_lossy(msg.get(..end).unwrap_or_default()).replace('\0', "");
                Packet::Error { code, message }
            }
            6 => Packet::Oack {
                options: parse_options(body)?,
            },
            opcode => return Err(PacketError::BadOpcode { opcode }),
        })
    }

    /// Serialises the packet.
    pub fn to_bytes(&self) -> Vec<u8> {
        let mut out = Vec::new();
        let put_str = |out: &mut Vec<u8>, s: &str| {
            out.extend(s.bytes().filter(|&b| b != 0));
            out.push(0);
        };
        let put_opts = |out: &mut Vec<u8>, opts: &[TftpOption]| {
            for o in opts {
                let (n, v) = o.pair();
                put_str(out, &n);
                put_str(out, &v);
            }
        };
        match self {
            Packet::Rrq(r) | Packet::Wrq(r) => {
                out.extend_from_slice(&[0, if matches!(self, Packet::Rrq(_)) { 1 } else { 2 }]);
                put_str(&mut out, &r.filename);
                put_str(&mut out, r.mode.as_str());
                put_opts(&mut out, &r.options);
            }
            Packet::Data { block, data } => {
                out.extend_from_slice(&[0, 3]);
                out.extend_from_slice(&block.to_be_bytes());
                out.extend_from_slice(data);
            }
            Packet::Ack { block } => {
                out.extend_from_slice(&[0, 4]);
                out.extend_from_slice(&block.to_be_bytes());
            }
            Packet::Error { code, message } => {
                out.extend_from_slice(&[0, 5]);
                out.extend_from_slice(&code.to_u16().to_be_bytes());
                put_str(&mut out, message);
            }
            Packet::Oack { options } => {
                out.extend_from_slice(&[0, 6]);
                put_opts(&mut out, options);
            }
        }
        out
    }

    /// An ERROR packet.
    pub fn error(code: ErrorCode, message: impl Into<String>) -> Packet {
        Packet::Error {
            code,
            message: message.into(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn text() -> impl Strategy<Value = String> {
        "[a-zA-Z0-9_./ -]{1,40}"
    }

    fn option() -> impl Strategy<Value = TftpOption> {
        prop_oneof![
            (MIN_BLKSIZE..=MAX_BLKSIZE).prop_map(TftpOption::BlkSize),
            any::<u64>().prop_map(TftpOption::TSize),
            (1u8..=255).prop_map(TftpOption::Timeout),
            (1u16..=65535).prop_map(TftpOption::WindowSize),
            ("x[a-z]{0,10}", "[a-z0-9]{0,10}")
                .prop_map(|(name, value)| TftpOption::Unknown { name, value }),
        ]
    }

    fn request() -> impl Strategy<Value = Request> {
        (
            text(),
            prop_oneof![Just(Mode::Octet), Just(Mode::NetAscii), Just(Mode::Mail)],
            proptest::collection::vec(option(), 0..MAX_OPTIONS),
        )
            .prop_map(|(filename, mode, options)| Request {
                filename,
                mode,
                options,
            })
    }

    fn packet() -> impl Strategy<Value = Packet> {
        prop_oneof![
            request().prop_map(Packet::Rrq),
            request().prop_map(Packet::Wrq),
            (
                any::<u16>(),
                proptest::collection::vec(any::<u8>(), 0..2000)
            )
                .prop_map(|(block, data)| Packet::Data { block, data }),
            any::<u16>().prop_map(|block| Packet::Ack { block }),
            (any::<u16>(), "[^\0]{0,40}").prop_map(|(c, message)| Packet::Error {
                code: ErrorCode::from_u16(c),
                message
            }),
            proptest::collection::vec(option(), 0..8).prop_map(|options| Packet::Oack { options }),
        ]
    }

    proptest! {
        #[test]
        fn round_trip(p in packet()) {
            prop_assert_eq!(Packet::parse(&p.to_bytes())?, p);
        }

        #[test]
        fn arbitrary_bytes_never_panic(b in proptest::collection::vec(any::<u8>(), 0..600)) {
            if let Ok(p) = Packet::parse(&b) {
                prop_assert_eq!(Packet::parse(&p.to_bytes())?, p);
            }
        }
    }

    #[test]
    fn rrq_with_options() {
        let b = b"\0\x01pxelinux.0\0OCTET\0BLKSIZE\x001468\0tsize\x000\0windowsize\x0016\0timeout\x005\0";
        let Packet::Rrq(r) = Packet::parse(b).unwrap() else {
            panic!()
        };
        assert_eq!(r.filename, "pxelinux.0");
        assert_eq!(r.mode, Mode::Octet);
        assert_eq!(
            r.options,
            vec![
                TftpOption::BlkSize(1468),
                TftpOption::TSize(0),
                TftpOption::WindowSize(16),
                TftpOption::Timeout(5)
            ]
        );
    }

    #[test]
    fn out_of_range_values_are_ignored_or_clamped() {
        let b = b"\0\x01f\0octet\0blksize\x004\0timeout\x000\0windowsize\x0070000\0tsize\x00-1\0";
        let Packet::Rrq(r) = Packet::parse(b).unwrap() else {
            panic!()
        };
        assert!(
            r.options
                .iter()
                .all(|o| matches!(o, TftpOption::Unknown { .. })),
            "{:?}",
            r.options
        );
        let b = b"\0\x01f\0octet\0blksize\x00100000\0";
        let Packet::Rrq(r) = Packet::parse(b).unwrap() else {
            panic!()
        };
        assert_eq!(r.options, vec![TftpOption::BlkSize(MAX_BLKSIZE)]);
    }

    #[test]
    fn trailing_nul_padding_is_accepted() {
        let b = b"\0\x01undionly.kpxe\0octet\0\0\0\0";
        assert!(matches!(Packet::parse(b), Ok(Packet::Rrq(_))));
    }

    #[test]
    fn errors_name_the_fault() {
        assert_eq!(Packet::parse(b"\0"), Err(PacketError::TooShort { len: 1 }));
        assert_eq!(
            Packet::parse(b"\0\x09"),
            Err(PacketError::BadOpcode { opcode: 9 })
        );
        assert_eq!(
            Packet::parse(b"\0\x01file"),
            Err(PacketError::Unterminated { field: "file name" })
        );
        assert_eq!(
            Packet::parse(b"\0\x01\0octet\0"),
            Err(PacketError::EmptyFilename)
        );
        assert_eq!(
            Packet::parse(b"\0\x01f\0binary\0"),
            Err(PacketError::BadMode {
                mode: "binary".into()
            })
        );
        assert_eq!(
            Packet::parse(b"\0\x01f\xff\0octet\0"),
            Err(PacketError::NotUtf8 { field: "file name" })
        );
        assert_eq!(
            Packet::parse(b"\0\x01f\0octet\0blksize\0"),
            Err(PacketError::MissingValue {
                name: "blksize".into()
            })
        );
        assert_eq!(
            Packet::parse(b"\0\x04\0"),
            Err(PacketError::TooShort { len: 3 })
        );
        let mut many = b"\0\x01f\0octet\0".to_vec();
        for _ in 0..=MAX_OPTIONS {
            many.extend_from_slice(b"a\0b\0");
        }
        assert_eq!(Packet::parse(&many), Err(PacketError::TooManyOptions));
        let mut big = vec![0, 3, 0, 1];
        big.resize(4 + 65465, 0);
        assert_eq!(
            Packet::parse(&big),
            Err(PacketError::DataTooLong { len: 65465 })
        );
    }
}
