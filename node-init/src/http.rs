//! A small blocking HTTP/1.1 client (RFC 9112) on std's `TcpStream`: GET with an optional
//! `Range` (RFC 9110 §14), POST of a JSON body, one request per connection
//! (`Connection: close`). Bodies framed by `Content-Length`, `chunked`, or connection close.
//! Everything received is bounded: status line and headers (16 KiB), chunk-size lines.
//!
//! Hand-written rather than `ureq`: node-init needs only this much, it adds about 30 KiB to the
//! static binary instead of several hundred, and it exposes `Content-Range` exactly.

use std::io::{self, BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::time::Duration;

const MAX_HEAD: usize = 16 * 1024;

/// An HTTP failure.
#[derive(Debug, thiserror::Error)]
pub enum HttpError {
    /// TCP connect failed (server down or unreachable).
    #[error("connect to {addr}")]
    Connect {
        /// Server address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// The connection failed before any byte of a response arrived (refused or reset by a
    /// proxy such as QEMU's user network, or timed out): the server is not there.
    #[error("no response from {addr}")]
    NoResponse {
        /// Server address.
        addr: SocketAddr,
        /// Cause.
        #[source]
        source: io::Error,
    },
    /// Reading or writing the connection failed (including time-outs).
    #[error("HTTP I/O")]
    Io(#[from] io::Error),
    /// The server answered with an unexpected status.
    #[error("GET/POST {path}: HTTP status {status}")]
    Status {
        /// Request path.
        path: String,
        /// Status code.
        status: u16,
    },
    /// The response does not follow HTTP/1.1.
    #[error("malformed HTTP response: {0}")]
    Malformed(&'static str),
    /// A body larger than the caller allows.
    #[error("response body exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
}

impl HttpError {
    /// True if the server could not be reached at all (as opposed to answering badly).
    pub fn is_unreachable(&self) -> bool {
        matches!(
            self,
            HttpError::Connect { .. } | HttpError::NoResponse { .. }
        )
    }
}

/// A client for one server.
#[derive(Clone)]
pub struct Client {
    addr: SocketAddr,
    connect_timeout: Duration,
    io_timeout: Duration,
    token: Option<String>,
    /// Shared by clones: the server refused the token (401/403) and took the call without it,
    /// so API calls go without it until it refuses that too.
    anonymous: std::sync::Arc<std::sync::atomic::AtomicBool>,
}

impl std::fmt::Debug for Client {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        // Never the token itself.
        f.debug_struct("Client")
            .field("addr", &self.addr)
            .field("token", &self.token.as_ref().map(|_| "<set>"))
            .finish()
    }
}

/// Longest bearer token sent (the server's node tokens are far shorter).
pub const MAX_TOKEN: usize = 4096;

/// A bearer token from a token file's text: trimmed, 1..=[`MAX_TOKEN`] visible ASCII
/// characters (anything else could break the request head), else `None`.
pub fn parse_token(text: &str) -> Option<String> {
    let t = text.trim();
    let ok = !t.is_empty() && t.len() <= MAX_TOKEN && t.bytes().all(|b| b.is_ascii_graphic());
    ok.then(|| t.to_owned())
}

/// `Content-Range: bytes first-last/total`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct ContentRange {
    /// First byte.
    pub first: u64,
    /// Last byte (inclusive).
    pub last: u64,
    /// Full length, if known.
    pub total: Option<u64>,
}

enum Framing {
    Length(u64),
    Chunked { left: u64, done: bool },
    Close,
}

/// A response whose body is read through `Read` (from a connection, or any `BufRead` for
/// [`parse_response`]).
pub struct Response<R: BufRead = BufReader<TcpStream>> {
    /// Status code.
    pub status: u16,
    /// `Content-Length`, if sent.
    pub content_length: Option<u64>,
    /// `Content-Range`, if sent.
    pub content_range: Option<ContentRange>,
    reader: R,
    framing: Framing,
}

impl Client {
    /// A client for `addr` with default time-outs (3 s connect, 15 s per read).
    pub fn new(addr: SocketAddr) -> Self {
        Self {
            addr,
            connect_timeout: Duration::from_secs(3),
            io_timeout: Duration::from_secs(15),
            token: None,
            anonymous: Default::default(),
        }
    }

    /// This client sending `Authorization: Bearer <token>` on every API call (paths under
    /// `/api/`); layer downloads carry none. An unusable token (see [`parse_token`]) is
    /// dropped. When the server answers 401/403 to a call that carried the token, the call is
    /// made once more without it (a booting node may always ask for its manifest without
    /// one, and a server that does not know the token yet may take reports without it), and
    /// later calls follow whichever way the server took last.
    pub fn with_token(mut self, token: Option<&str>) -> Self {
        self.token = token.and_then(parse_token);
        self
    }

    /// The same client without a token.
    pub fn without_token(&self) -> Self {
        Self {
            token: None,
            anonymous: Default::default(),
            ..self.clone()
        }
    }

    /// Whether the client holds a token (it may currently call without it, see
    /// [`Client::with_token`]).
    pub fn has_token(&self) -> bool {
        self.token.is_some()
    }

    /// The `Authorization` line for `path`, if this call carries the token.
    fn auth_header(&self, path: &str, anonymous: bool) -> String {
        match &self.token {
            Some(t) if path.starts_with("/api/") && !anonymous => {
                format!("Authorization: Bearer {t}\r\n")
            }
            _ => String::new(),
        }
    }

    /// Sends `head(auth line) + body`; on 401/403 to an API call, tries once more the other
    /// way (with or without the token) and remembers the way that worked.
    fn request(
        &self,
        path: &str,
        head: impl Fn(&str) -> String,
        body: &[u8],
    ) -> Result<Response, HttpError> {
        use std::sync::atomic::Ordering;
        let anonymous = self.anonymous.load(Ordering::Relaxed);
        let resp = self.send(head(&self.auth_header(path, anonymous)).as_bytes(), body)?;
        let api = self.token.is_some() && path.starts_with("/api/");
        if !(api && matches!(resp.status, 401 | 403)) {
            return Ok(resp);
        }
        let other = !anonymous;
        let retry = self.send(head(&self.auth_header(path, other)).as_bytes(), body)?;
        if !matches!(retry.status, 401 | 403) {
            self.anonymous.store(other, Ordering::Relaxed);
            if other {
                crate::info!(
                    "the server refused this node's token (HTTP {}) and took the call without it; calling without it",
                    resp.status
                );
            } else {
                crate::info!("the server wants this node's token again; sending it");
            }
        }
        Ok(retry)
    }

    /// The server address.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    fn connect(&self) -> Result<TcpStream, HttpError> {
        let s = TcpStream::connect_timeout(&self.addr, self.connect_timeout).map_err(|source| {
            HttpError::Connect {
                addr: self.addr,
                source,
            }
        })?;
        s.set_read_timeout(Some(self.io_timeout))?;
        s.set_write_timeout(Some(self.io_timeout))?;
        s.set_nodelay(true)?;
        Ok(s)
    }

    /// `GET path`, from byte `from` on if given (`Range: bytes=from-` or `from-to`).
    /// Returns 200 and 206 responses; any other status is an error.
    pub fn get(
        &self,
        path: &str,
        range: Option<(u64, Option<u64>)>,
    ) -> Result<Response, HttpError> {
        let range = match range {
            Some((from, Some(to))) => format!("Range: bytes={from}-{to}\r\n"),
            Some((from, None)) => format!("Range: bytes={from}-\r\n"),
            None => String::new(),
        };
        let head = |auth: &str| {
            format!(
                "GET {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{auth}{range}\r\n",
                self.addr
            )
        };
        let resp = self.request(path, head, &[])?;
        if resp.status != 200 && resp.status != 206 {
            return Err(HttpError::Status {
                path: path.to_owned(),
                status: resp.status,
            });
        }
        Ok(resp)
    }

    /// `GET path` into memory, refusing bodies over `limit` bytes.
    pub fn get_bytes(&self, path: &str, limit: usize) -> Result<Vec<u8>, HttpError> {
        let mut resp = self.get(path, None)?;
        read_limited(&mut resp, limit)
    }

    /// `POST path` with a JSON body; returns the status and up to `limit` bytes of body.
    pub fn post_json(
        &self,
        path: &str,
        body: &[u8],
        limit: usize,
    ) -> Result<(u16, Vec<u8>), HttpError> {
        let head = |auth: &str| {
            format!(
                "POST {path} HTTP/1.1\r\nHost: {}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
                self.addr,
                body.len()
            )
        };
        let mut resp = self.request(path, head, body)?;
        let data = read_limited(&mut resp, limit)?;
        Ok((resp.status, data))
    }

    fn send(&self, head: &[u8], body: &[u8]) -> Result<Response, HttpError> {
        let addr = self.addr;
        let no_response = |source| HttpError::NoResponse { addr, source };
        let mut s = self.connect()?;
        s.write_all(head).map_err(no_response)?;
        s.write_all(body).map_err(no_response)?;
        s.flush().map_err(no_response)?;
        let mut reader = BufReader::with_capacity(64 * 1024, s);
        // Nothing at all back (not even a status line byte) means no server.
        match reader.fill_buf() {
            Ok([]) => {
                return Err(no_response(io::Error::new(
                    io::ErrorKind::UnexpectedEof,
                    "connection closed without a response",
                )))
            }
            Ok(_) => {}
            Err(e) => return Err(no_response(e)),
        }
        read_head(reader)
    }
}

fn read_limited(r: &mut impl Read, limit: usize) -> Result<Vec<u8>, HttpError> {
    let mut out = Vec::new();
    let n = r.take(limit as u64 + 1).read_to_end(&mut out)?;
    if n > limit {
        return Err(HttpError::TooLarge { limit });
    }
    Ok(out)
}

fn read_line<R: BufRead>(r: &mut R, budget: &mut usize) -> Result<String, HttpError> {
    let mut line = Vec::new();
    let n = r
        .by_ref()
        .take(*budget as u64)
        .read_until(b'\n', &mut line)?;
    if n == 0 {
        return Err(HttpError::Malformed(
            "connection closed in the response head",
        ));
    }
    *budget = budget.saturating_sub(n);
    if line.last() != Some(&b'\n') {
        return Err(HttpError::Malformed("response head too long"));
    }
    line.pop();
    if line.last() == Some(&b'\r') {
        line.pop();
    }
    String::from_utf8(line).map_err(|_| HttpError::Malformed("non-UTF-8 header"))
}

/// Parses a response head from `reader`; the body is then read from the returned value.
pub fn parse_response<R: BufRead>(reader: R) -> Result<Response<R>, HttpError> {
    read_head(reader)
}

fn read_head<R: BufRead>(mut reader: R) -> Result<Response<R>, HttpError> {
    let mut budget = MAX_HEAD;
    let status_line = read_line(&mut reader, &mut budget)?;
    let mut parts = status_line.splitn(3, ' ');
    let version = parts.next().unwrap_or("");
    if !version.starts_with("HTTP/1.") {
        return Err(HttpError::Malformed("status line"));
    }
    let status: u16 = parts
        .next()
        .and_then(|s| s.parse().ok())
        .filter(|s| (100..=599).contains(s))
        .ok_or(HttpError::Malformed("status code"))?;
    let mut content_length = None;
    let mut content_range = None;
    let mut chunked = false;
    loop {
        let line = read_line(&mut reader, &mut budget)?;
        if line.is_empty() {
            break;
        }
        let (name, value) = line
            .split_once(':')
            .ok_or(HttpError::Malformed("header line"))?;
        let value = value.trim();
        if name.eq_ignore_ascii_case("content-length") {
            content_length = Some(
                value
                    .parse::<u64>()
                    .map_err(|_| HttpError::Malformed("Content-Length"))?,
            );
        } else if name.eq_ignore_ascii_case("transfer-encoding") {
            chunked = value.eq_ignore_ascii_case("chunked");
            if !chunked && !value.eq_ignore_ascii_case("identity") {
                return Err(HttpError::Malformed("unsupported Transfer-Encoding"));
            }
        } else if name.eq_ignore_ascii_case("content-range") {
            // `bytes */N` (416) carries no range; only a 206 needs a valid one.
            content_range = parse_content_range(value);
            if content_range.is_none() && status == 206 {
                return Err(HttpError::Malformed("Content-Range"));
            }
        }
    }
    let framing = if chunked {
        Framing::Chunked {
            left: 0,
            done: false,
        }
    } else if let Some(n) = content_length {
        Framing::Length(n)
    } else if status == 204 || status == 304 {
        Framing::Length(0)
    } else {
        Framing::Close
    };
    Ok(Response {
        status,
        content_length,
        content_range,
        reader,
        framing,
    })
}

/// Parses `bytes first-last/total` (total may be `*`).
pub fn parse_content_range(v: &str) -> Option<ContentRange> {
    let rest = v.strip_prefix("bytes ")?;
    let (range, total) = rest.split_once('/')?;
    let (a, b) = range.split_once('-')?;
    let first: u64 = a.trim().parse().ok()?;
    let last: u64 = b.trim().parse().ok()?;
    let total = if total.trim() == "*" {
        None
    } else {
        Some(total.trim().parse().ok()?)
    };
    if last < first || total.is_some_and(|t| last >= t) {
        return None;
    }
    Some(ContentRange { first, last, total })
}

impl<R: BufRead> Response<R> {
    /// True if the body is `Transfer-Encoding: chunked`.
    pub fn is_chunked(&self) -> bool {
        matches!(self.framing, Framing::Chunked { .. })
    }
}

impl<R: BufRead> Read for Response<R> {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match &mut self.framing {
            Framing::Length(left) => {
                if *left == 0 || buf.is_empty() {
                    return Ok(0);
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.reader.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "body cut short",
                    ));
                }
                *left -= n as u64;
                Ok(n)
            }
            Framing::Close => self.reader.read(buf),
            Framing::Chunked { left, done } => {
                if *done || buf.is_empty() {
                    return Ok(0);
                }
                if *left == 0 {
                    let mut budget = 1024;
                    let line = read_line(&mut self.reader, &mut budget).map_err(to_io)?;
                    let size = line.split(';').next().unwrap_or("").trim();
                    let size = u64::from_str_radix(size, 16)
                        .map_err(|_| io::Error::new(io::ErrorKind::InvalidData, "chunk size"))?;
                    if size == 0 {
                        // Trailers end with an empty line.
                        loop {
                            let mut budget = 4096;
                            if read_line(&mut self.reader, &mut budget)
                                .map_err(to_io)?
                                .is_empty()
                            {
                                break;
                            }
                        }
                        *done = true;
                        return Ok(0);
                    }
                    *left = size;
                }
                let want = buf.len().min(usize::try_from(*left).unwrap_or(usize::MAX));
                let n = self.reader.read(&mut buf[..want])?;
                if n == 0 {
                    return Err(io::Error::new(
                        io::ErrorKind::UnexpectedEof,
                        "chunk cut short",
                    ));
                }
                *left -= n as u64;
                if *left == 0 {
                    let mut crlf = [0u8; 2];
                    self.reader.read_exact(&mut crlf)?;
                    if &crlf != b"\r\n" {
                        return Err(io::Error::new(io::ErrorKind::InvalidData, "chunk end"));
                    }
                }
                Ok(n)
            }
        }
    }
}

fn to_io(e: HttpError) -> io::Error {
    match e {
        HttpError::Io(e) => e,
        other => io::Error::new(io::ErrorKind::InvalidData, other.to_string()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Serves one request on loopback and returns its head.
    fn one_request_head(call: impl FnOnce(Client) + Send + 'static) -> String {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || call(Client::new(addr).with_token(Some("stk_abc\n"))));
        let (s, _) = l.accept().unwrap();
        let mut r = BufReader::new(s);
        let mut head = String::new();
        while !head.ends_with("\r\n\r\n") {
            if r.read_line(&mut head).unwrap() == 0 {
                break;
            }
        }
        r.get_mut()
            .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}")
            .unwrap();
        t.join().unwrap();
        head
    }

    #[test]
    fn api_calls_carry_the_token_and_layer_downloads_do_not() {
        let head = one_request_head(|c| {
            c.post_json("/api/v1/nodes/by-mac/x/report", b"{}", 16)
                .unwrap();
        });
        assert!(
            head.contains("\r\nAuthorization: Bearer stk_abc\r\n"),
            "{head}"
        );
        let head = one_request_head(|c| {
            c.get_bytes("/api/v1/nodes/by-mac/x/manifest", 16).unwrap();
        });
        assert!(head.contains("Authorization: Bearer stk_abc\r\n"), "{head}");
        let head = one_request_head(|c| {
            c.get_bytes("/layers/abc", 16).unwrap();
        });
        assert!(!head.contains("Authorization"), "{head}");
        let head = one_request_head(|c| {
            c.without_token()
                .get_bytes("/api/v1/nodes/by-mac/x/manifest", 16)
                .unwrap();
        });
        assert!(!head.contains("Authorization"), "{head}");
    }

    /// A server answering `n` requests: 401 to any carrying `Authorization` when `refuse`,
    /// else 200; returns the heads it saw.
    fn refusing_server(
        n: usize,
        refuse: bool,
    ) -> (SocketAddr, std::thread::JoinHandle<Vec<String>>) {
        let l = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let t = std::thread::spawn(move || {
            let mut heads = Vec::new();
            for _ in 0..n {
                let (s, _) = l.accept().unwrap();
                let mut r = BufReader::new(s);
                let mut head = String::new();
                while !head.ends_with("\r\n\r\n") {
                    if r.read_line(&mut head).unwrap() == 0 {
                        break;
                    }
                }
                let answer: &[u8] = if refuse && head.contains("Authorization") {
                    b"HTTP/1.1 401 Unauthorized\r\nContent-Length: 0\r\n\r\n"
                } else {
                    b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}"
                };
                r.get_mut().write_all(answer).unwrap();
                heads.push(head);
            }
            heads
        });
        (addr, t)
    }

    #[test]
    fn a_refused_token_is_dropped_for_later_calls() {
        let (addr, t) = refusing_server(3, true);
        let c = Client::new(addr).with_token(Some("stk_unknown"));
        // Refused with the token, taken without it.
        let (status, _) = c
            .post_json("/api/v1/nodes/by-mac/x/report", b"{}", 16)
            .unwrap();
        assert_eq!(status, 200);
        // A clone (the agent's next interval) goes without it at once.
        c.clone()
            .get_bytes("/api/v1/nodes/by-mac/x/manifest", 16)
            .unwrap();
        let heads = t.join().unwrap();
        assert!(heads[0].contains("Authorization"));
        assert!(!heads[1].contains("Authorization") && heads[1].starts_with("POST"));
        assert!(!heads[2].contains("Authorization") && heads[2].starts_with("GET"));
        // A server that takes the token never sees a second request.
        let (addr, t) = refusing_server(1, false);
        let c = Client::new(addr).with_token(Some("stk_known"));
        c.get_bytes("/api/v1/x", 16).unwrap();
        assert!(t.join().unwrap()[0].contains("Authorization: Bearer stk_known\r\n"));
    }

    #[test]
    fn tokens_that_could_break_the_head_are_refused() {
        assert_eq!(parse_token(" stk_1\n").as_deref(), Some("stk_1"));
        assert_eq!(parse_token(""), None);
        assert_eq!(parse_token("a\r\nX-Evil: 1"), None);
        assert_eq!(parse_token("a b"), None);
        assert_eq!(parse_token(&"a".repeat(MAX_TOKEN + 1)), None);
        let c = Client::new("127.0.0.1:1".parse().unwrap()).with_token(Some("stk_secret"));
        assert!(!format!("{c:?}").contains("stk_secret"));
    }

    fn encode(body: &[u8], framing: u8, cuts: &[usize]) -> Vec<u8> {
        let mut out = b"HTTP/1.1 200 OK\r\nServer: t\r\n".to_vec();
        match framing {
            0 => {
                out.extend_from_slice(format!("Content-Length: {}\r\n\r\n", body.len()).as_bytes());
                out.extend_from_slice(body);
            }
            1 => {
                out.extend_from_slice(b"Transfer-Encoding: chunked\r\n\r\n");
                let mut points: Vec<usize> = cuts.iter().map(|c| c % (body.len() + 1)).collect();
                points.push(0);
                points.push(body.len());
                points.sort_unstable();
                points.dedup();
                for w in points.windows(2) {
                    out.extend_from_slice(format!("{:x};ext=1\r\n", w[1] - w[0]).as_bytes());
                    out.extend_from_slice(&body[w[0]..w[1]]);
                    out.extend_from_slice(b"\r\n");
                }
                out.extend_from_slice(b"0\r\nTrailer: x\r\n\r\n");
            }
            _ => {
                out.extend_from_slice(b"\r\n");
                out.extend_from_slice(body);
            }
        }
        out
    }

    proptest! {
        #[test]
        fn every_framing_gives_back_the_body(
            body in proptest::collection::vec(any::<u8>(), 0..3000),
            framing in 0u8..3,
            cuts in proptest::collection::vec(any::<usize>(), 0..6),
        ) {
            let wire = encode(&body, framing, &cuts);
            let mut r = parse_response(&wire[..]).unwrap();
            prop_assert_eq!(r.status, 200);
            let mut got = Vec::new();
            r.read_to_end(&mut got).unwrap();
            prop_assert_eq!(got, body);
        }

        #[test]
        fn cut_bodies_are_errors_not_short_reads(
            body in proptest::collection::vec(any::<u8>(), 1..3000),
            framing in 0u8..2,
            keep in any::<prop::sample::Index>(),
        ) {
            let wire = encode(&body, framing, &[body.len() / 2]);
            let head_end = wire.windows(4).position(|w| w == b"\r\n\r\n").unwrap() + 4;
            let cut = head_end + keep.index(wire.len() - head_end);
            let mut r = parse_response(&wire[..cut]).unwrap();
            let mut got = Vec::new();
            prop_assert!(r.read_to_end(&mut got).is_err());
        }

        #[test]
        fn garbage_never_panics(bytes in proptest::collection::vec(any::<u8>(), 0..400)) {
            if let Ok(mut r) = parse_response(&bytes[..]) {
                let mut sink = Vec::new();
                let _ = r.by_ref().take(1 << 16).read_to_end(&mut sink);
            }
        }
    }

    #[test]
    fn oversized_head_is_refused() {
        let mut wire = b"HTTP/1.1 200 OK\r\n".to_vec();
        wire.extend(std::iter::repeat_n(b'a', MAX_HEAD + 10));
        assert!(matches!(
            parse_response(&wire[..]),
            Err(HttpError::Malformed(_))
        ));
    }

    #[test]
    fn content_range_forms() {
        assert_eq!(
            parse_content_range("bytes 10-19/100"),
            Some(ContentRange {
                first: 10,
                last: 19,
                total: Some(100)
            })
        );
        assert_eq!(
            parse_content_range("bytes 0-0/*"),
            Some(ContentRange {
                first: 0,
                last: 0,
                total: None
            })
        );
        assert_eq!(parse_content_range("bytes 20-10/100"), None);
        assert_eq!(parse_content_range("bytes 0-100/100"), None);
        assert_eq!(parse_content_range("items 0-1/2"), None);
    }
}
