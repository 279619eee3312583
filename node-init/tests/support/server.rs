//! A fixture HTTP/1.1 server with the node endpoints of `strata serve`:
//! `GET /api/v1/nodes/by-mac/{mac}/manifest`, `GET /layers/{id}` (with `Range`),
//! `GET /layers/{id}/extents` (only for layers given a document: 404 otherwise, as an older
//! server answers),
//! `POST /api/v1/nodes/by-mac/{mac}/report`. It counts layer bytes sent and can cut a layer
//! transfer after N bytes (a server killed mid-transfer) or refuse connections (server gone).

use std::collections::HashMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use wire::report::StateReport;
use wire::LayerId;

#[derive(Default)]
pub struct State {
    /// mac → SignedManifest JSON.
    pub manifests: HashMap<String, String>,
    pub layers: HashMap<LayerId, Arc<Vec<u8>>>,
    /// Extents documents served at `/layers/{id}/extents`.
    pub extents: HashMap<LayerId, Vec<u8>>,
    /// `Range` headers of layer requests, in order (`None`: no header).
    pub ranges: Vec<Option<(u64, Option<u64>)>>,
    /// Layer bytes sent, per layer.
    pub sent: HashMap<LayerId, u64>,
    /// Cut the next transfer of this layer after this many bytes.
    pub cut: Option<(LayerId, u64)>,
    pub reports: Vec<StateReport>,
    pub requests: Vec<String>,
    /// Plain files by path (kernels, initramfs, iPXE scripts).
    pub files: HashMap<String, Arc<Vec<u8>>>,
    /// JSON body answering reports (default: `{"applied_seq": <seq>}`).
    pub ack: Option<String>,
}

pub struct Server {
    pub port: u16,
    pub state: Arc<Mutex<State>>,
    down: Arc<AtomicBool>,
}

impl Server {
    pub fn start() -> anyhow::Result<Server> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        let port = listener.local_addr()?.port();
        let state = Arc::new(Mutex::new(State::default()));
        let down = Arc::new(AtomicBool::new(false));
        let (st, dn) = (state.clone(), down.clone());
        std::thread::spawn(move || {
            for conn in listener.incoming() {
                let Ok(conn) = conn else { continue };
                if dn.load(Ordering::SeqCst) {
                    // Server "gone": reset the connection without answering.
                    let _ = conn.set_linger_zero();
                    drop(conn);
                    continue;
                }
                let st = st.clone();
                std::thread::spawn(move || {
                    let _ = handle(conn, &st);
                });
            }
        });
        Ok(Server { port, state, down })
    }

    pub fn set_down(&self, down: bool) {
        self.down.store(down, Ordering::SeqCst);
    }

    pub fn add_layer(&self, id: LayerId, bytes: Vec<u8>) {
        self.state
            .lock()
            .unwrap()
            .layers
            .insert(id, Arc::new(bytes));
    }

    pub fn set_manifest(&self, mac: &str, json: String) {
        self.state
            .lock()
            .unwrap()
            .manifests
            .insert(mac.to_owned(), json);
    }

    pub fn sent(&self, id: &LayerId) -> u64 {
        self.state
            .lock()
            .unwrap()
            .sent
            .get(id)
            .copied()
            .unwrap_or(0)
    }

    pub fn total_sent(&self) -> u64 {
        self.state.lock().unwrap().sent.values().sum()
    }

    pub fn reset_counters(&self) {
        self.state.lock().unwrap().sent.clear();
    }
}

trait Linger {
    fn set_linger_zero(&self) -> std::io::Result<()>;
}
impl Linger for TcpStream {
    fn set_linger_zero(&self) -> std::io::Result<()> {
        use std::os::fd::AsRawFd;
        let l = libc::linger {
            l_onoff: 1,
            l_linger: 0,
        };
        // SAFETY: valid socket fd and a valid linger struct of the size passed.
        let r = unsafe {
            libc::setsockopt(
                self.as_raw_fd(),
                libc::SOL_SOCKET,
                libc::SO_LINGER,
                &l as *const _ as *const libc::c_void,
                std::mem::size_of::<libc::linger>() as libc::socklen_t,
            )
        };
        if r == 0 {
            Ok(())
        } else {
            Err(std::io::Error::last_os_error())
        }
    }
}

fn respond(s: &mut TcpStream, status: &str, headers: &str, body: &[u8]) -> std::io::Result<()> {
    write!(
        s,
        "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{headers}\r\n",
        body.len()
    )?;
    s.write_all(body)
}

fn handle(mut s: TcpStream, st: &Mutex<State>) -> std::io::Result<()> {
    let mut r = BufReader::new(s.try_clone()?);
    let mut line = String::new();
    r.read_line(&mut line)?;
    let mut parts = line.split_whitespace();
    let method = parts.next().unwrap_or("").to_owned();
    let path = parts.next().unwrap_or("").to_owned();
    let mut range = None;
    let mut content_length = 0usize;
    loop {
        let mut h = String::new();
        if r.read_line(&mut h)? == 0 || h.trim().is_empty() {
            break;
        }
        let (k, v) = h.split_once(':').unwrap_or(("", ""));
        let v = v.trim();
        if k.eq_ignore_ascii_case("range") {
            range = v
                .strip_prefix("bytes=")
                .and_then(|x| x.split_once('-'))
                .map(|(a, b)| (a.parse::<u64>().unwrap_or(0), b.parse::<u64>().ok()));
        } else if k.eq_ignore_ascii_case("content-length") {
            content_length = v.parse().unwrap_or(0);
        }
    }
    st.lock().unwrap().requests.push(format!("{method} {path}"));
    // Query strings (`?version=`, `?node=`) are recorded above, then ignored.
    let path = path.split('?').next().unwrap_or("").to_owned();
    if method == "POST" && path.ends_with("/report") {
        let mut body = vec![0u8; content_length.min(1 << 20)];
        r.read_exact(&mut body)?;
        let rep: Result<StateReport, _> = serde_json::from_slice(&body);
        let seq = match rep {
            Ok(rep) => {
                let seq = rep.seq;
                st.lock().unwrap().reports.push(rep);
                seq
            }
            Err(_) => return respond(&mut s, "400 Bad Request", "", b"{}"),
        };
        let ack = st
            .lock()
            .unwrap()
            .ack
            .clone()
            .unwrap_or_else(|| format!("{{\"applied_seq\":{seq}}}"));
        return respond(
            &mut s,
            "200 OK",
            "Content-Type: application/json\r\n",
            ack.as_bytes(),
        );
    }
    if let Some(mac) = path
        .strip_prefix("/api/v1/nodes/by-mac/")
        .and_then(|p| p.strip_suffix("/manifest"))
    {
        let m = st.lock().unwrap().manifests.get(mac).cloned();
        return match m {
            Some(json) => respond(
                &mut s,
                "200 OK",
                "Content-Type: application/json\r\n",
                json.as_bytes(),
            ),
            None => respond(&mut s, "404 Not Found", "", b"no such node"),
        };
    }
    if let Some(id) = path
        .strip_prefix("/layers/")
        .and_then(|x| x.strip_suffix("/extents"))
        .and_then(|x| x.parse::<LayerId>().ok())
    {
        let doc = st.lock().unwrap().extents.get(&id).cloned();
        return match doc {
            Some(doc) => respond(&mut s, "200 OK", "Content-Type: application/json\r\n", &doc),
            None => respond(&mut s, "404 Not Found", "", b"not found"),
        };
    }
    if let Some(id) = path
        .strip_prefix("/layers/")
        .and_then(|x| x.parse::<LayerId>().ok())
    {
        st.lock().unwrap().ranges.push(range);
        let (data, cut) = {
            let mut g = st.lock().unwrap();
            let data = g.layers.get(&id).cloned();
            let cut = match g.cut {
                Some((cid, n)) if cid == id => {
                    g.cut = None;
                    Some(n)
                }
                _ => None,
            };
            (data, cut)
        };
        let Some(data) = data else {
            return respond(&mut s, "404 Not Found", "", b"no such layer");
        };
        let len = data.len() as u64;
        let (status, start, end, extra) = match range {
            Some((a, b)) if a < len => {
                let e = b.map_or(len - 1, |b| b.min(len - 1));
                (
                    "206 Partial Content",
                    a,
                    e + 1,
                    format!("Content-Range: bytes {a}-{e}/{len}\r\n"),
                )
            }
            Some(_) => {
                return respond(
                    &mut s,
                    "416 Range Not Satisfiable",
                    &format!("Content-Range: bytes */{len}\r\n"),
                    b"",
                )
            }
            None => ("200 OK", 0, len, String::new()),
        };
        let body = &data[start as usize..end as usize];
        write!(
            s,
            "HTTP/1.1 {status}\r\nContent-Length: {}\r\nConnection: close\r\n{extra}\r\n",
            body.len()
        )?;
        let send = match cut {
            Some(n) => &body[..(n as usize).min(body.len())],
            None => body,
        };
        let mut sent = 0u64;
        for piece in send.chunks(64 * 1024) {
            if s.write_all(piece).is_err() {
                break;
            }
            sent += piece.len() as u64;
        }
        *st.lock().unwrap().sent.entry(id).or_default() += sent;
        if cut.is_some() {
            let _ = s.flush();
            let _ = s.shutdown(Shutdown::Both);
        }
        return Ok(());
    }
    let file = st.lock().unwrap().files.get(&path).cloned();
    match file {
        Some(f) => respond(&mut s, "200 OK", "", &f),
        None => respond(&mut s, "404 Not Found", "", b"not found"),
    }
}
