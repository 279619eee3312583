//! The iSCSI target's TCP server: one task per connection, at most
//! [`TargetOptions::max_connections`] at once (a `Semaphore`), each a
//! [`Connection`](super::session::Connection) state machine fed from the socket. A
//! connection's failure is logged with its peer and ends only that connection.
//!
//! LUN I/O runs on the blocking pool (`spawn_blocking`), never on a runtime worker.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU16, Ordering};
use std::sync::Arc;
use std::time::Duration;

use tokio::io::{AsyncBufRead, AsyncReadExt, AsyncWriteExt, BufReader, BufWriter};
use tokio::net::tcp::OwnedReadHalf;
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::Semaphore;
use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use super::lun::LunProvider;
use super::pdu::{Bhs, Digests, Framing, Pdu, BHS_LEN};
use super::session::{Action, Connection};

/// Settings of the server.
#[derive(Debug, Clone)]
pub struct TargetOptions {
    /// Most connections served at once; more wait for a free slot.
    pub max_connections: usize,
    /// A login that has not reached the full feature phase by then is dropped.
    pub login_timeout: Duration,
}

impl Default for TargetOptions {
    fn default() -> Self {
        TargetOptions {
            max_connections: 256,
            login_timeout: Duration::from_secs(30),
        }
    }
}

/// The iSCSI target service.
pub struct IscsiTarget {
    listener: TcpListener,
    luns: Arc<dyn LunProvider>,
    opts: TargetOptions,
}

impl std::fmt::Debug for IscsiTarget {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("IscsiTarget")
            .field("listener", &self.listener.local_addr().ok())
            .finish_non_exhaustive()
    }
}

impl IscsiTarget {
    /// A target answering on `listener` for the targets `luns` knows.
    pub fn new(
        listener: TcpListener,
        luns: Arc<dyn LunProvider>,
        opts: TargetOptions,
    ) -> IscsiTarget {
        IscsiTarget {
            listener,
            luns,
            opts,
        }
    }

    /// The address listened on.
    pub fn local_addr(&self) -> std::io::Result<SocketAddr> {
        self.listener.local_addr()
    }

    /// Serves until `cancel` fires, then closes every connection and returns.
    pub async fn run(self, cancel: CancellationToken) -> std::io::Result<()> {
        let slots = Arc::new(Semaphore::new(self.opts.max_connections.max(1)));
        let tsih = Arc::new(AtomicU16::new(1));
        let mut tasks = JoinSet::new();
        tracing::info!(addr = ?self.listener.local_addr().ok(), "iSCSI target listening");
        loop {
            let permit = tokio::select! {
                _ = cancel.cancelled() => break,
                p = slots.clone().acquire_owned() => match p {
                    Ok(p) => p,
                    Err(_) => break,
                },
            };
            let (stream, peer) = tokio::select! {
                _ = cancel.cancelled() => break,
                r = self.listener.accept() => match r {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!(error = %e, "accept failed");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                },
            };
            while tasks.try_join_next().is_some() {}
            let luns = self.luns.clone();
            let token = cancel.child_token();
            let mut handle = tsih.fetch_add(1, Ordering::Relaxed);
            if handle == 0 {
                handle = tsih.fetch_add(1, Ordering::Relaxed);
            }
            let login_timeout = self.opts.login_timeout;
            let span = tracing::info_span!("iscsi", %peer);
            tasks.spawn(
                async move {
                    let _permit = permit;
                    if let Err(e) = serve(stream, luns, handle, login_timeout, token).await {
                        tracing::warn!(error = %e, "connection ended");
                    }
                }
                .instrument(span),
            );
        }
        tasks.shutdown().await;
        Ok(())
    }
}

/// Whether the PDU makes the connection touch the LUN (run it on the blocking pool).
fn does_io(pdu: &Pdu) -> bool {
    matches!(
        pdu.bhs,
        Bhs::ScsiCommand(_) | Bhs::DataOut(_) | Bhs::LoginRequest(_)
    )
}

/// Most PDUs handed to the blocking pool at once.
const MAX_BATCH: usize = 64;

/// Moves every complete, well-formed PDU at the head of `rd`'s buffer into `batch` (up to
/// [`MAX_BATCH`]). Stops at the first incomplete or malformed one, which the normal read
/// path then reads and answers.
fn take_buffered(
    rd: &mut BufReader<OwnedReadHalf>,
    c: &Connection,
    digests: Digests,
    batch: &mut Vec<Pdu>,
) {
    while batch.len() < MAX_BATCH {
        let buf = rd.buffer();
        let Some(head) = buf
            .get(..BHS_LEN)
            .and_then(|h| <&[u8; BHS_LEN]>::try_from(h).ok())
        else {
            break;
        };
        let Ok(f) = Framing::of(head, c.max_recv()) else {
            break;
        };
        let total = BHS_LEN + f.rest_len(digests);
        let Some(rest) = buf.get(BHS_LEN..total) else {
            break;
        };
        match Pdu::decode(head, f, rest, digests) {
            Ok(p) => {
                batch.push(p);
                std::pin::Pin::new(&mut *rd).consume(total);
            }
            Err(_) => break,
        }
    }
}

/// Runs `batch` through the connection in order; stops after a PDU that closes it.
fn run_batch(c: &mut Connection, batch: Vec<Pdu>) -> Vec<Action> {
    let mut out = Vec::new();
    for p in batch {
        let a = c.on_pdu(p);
        let stop = a
            .iter()
            .any(|x| matches!(x, Action::Close | Action::Negotiated { .. }));
        out.extend(a);
        if stop {
            break;
        }
    }
    out
}

async fn serve(
    stream: TcpStream,
    luns: Arc<dyn LunProvider>,
    tsih: u16,
    login_timeout: Duration,
    cancel: CancellationToken,
) -> std::io::Result<()> {
    stream.set_nodelay(true)?;
    let local = stream.local_addr()?;
    let (rd, wr) = stream.into_split();
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let mut wr = BufWriter::with_capacity(256 * 1024, wr);
    let mut conn = Some(Connection::new(luns, local.to_string(), tsih));
    let mut digests = Digests::default();
    let login_deadline = tokio::time::Instant::now() + login_timeout;
    let mut logged_in = false;
    let mut out = Vec::with_capacity(64 * 1024);
    let result = loop {
        let mut raw = [0u8; BHS_LEN];
        let read = async {
            rd.read_exact(&mut raw).await?;
            let Some(c) = conn.as_ref() else {
                return Ok(None);
            };
            match Framing::of(&raw, c.max_recv()) {
                Ok(f) => {
                    let mut rest = vec![0u8; f.rest_len(digests)];
                    rd.read_exact(&mut rest).await?;
                    Ok::<_, std::io::Error>(Some((f, rest)))
                }
                Err(e) => Err(std::io::Error::new(std::io::ErrorKind::InvalidData, e)),
            }
        };
        let got = tokio::select! {
            _ = cancel.cancelled() => break Ok(()),
            _ = tokio::time::sleep_until(login_deadline), if !logged_in => {
                tracing::warn!("login timed out");
                break Ok(());
            }
            r = read => r,
        };
        let Some(mut c) = conn.take() else {
            break Ok(());
        };
        let actions = match got {
            Ok(Some((framing, rest))) => match Pdu::decode(&raw, framing, &rest, digests) {
                Ok(pdu) => {
                    let mut batch = vec![pdu];
                    // In the full feature phase, every complete PDU already buffered joins
                    // this one: one trip to the blocking pool serves them all.
                    if logged_in {
                        take_buffered(&mut rd, &c, digests, &mut batch);
                    }
                    for p in &batch {
                        tracing::trace!(bhs = ?p.bhs, len = p.data.len(), "received");
                    }
                    if batch.iter().any(does_io) {
                        match tokio::task::spawn_blocking(move || {
                            let a = run_batch(&mut c, batch);
                            (c, a)
                        })
                        .await
                        {
                            Ok((back, a)) => {
                                c = back;
                                a
                            }
                            Err(e) => {
                                tracing::error!(error = %e, "connection handler failed");
                                break Ok(());
                            }
                        }
                    } else {
                        run_batch(&mut c, batch)
                    }
                }
                Err(e) => c.on_decode_error(&e, &raw),
            },
            Ok(None) => break Ok(()),
            Err(e) if e.kind() == std::io::ErrorKind::UnexpectedEof => {
                c.on_close();
                tracing::debug!("peer closed the connection");
                break Ok(());
            }
            Err(e) if e.kind() == std::io::ErrorKind::InvalidData => {
                let err = e
                    .into_inner()
                    .and_then(|i| i.downcast::<super::pdu::PduError>().ok());
                match err {
                    Some(pe) => c.on_decode_error(&pe, &raw),
                    None => vec![Action::Close],
                }
            }
            Err(e) => {
                c.on_close();
                break Err(e);
            }
        };
        let mut close = false;
        out.clear();
        for a in actions {
            match a {
                Action::Send(p) => {
                    tracing::trace!(bhs = ?p.bhs, len = p.data.len(), "sending");
                    p.write_to(&mut out, digests)
                }
                Action::Negotiated { digests: d, .. } => {
                    digests = d;
                    logged_in = true;
                }
                Action::Close => close = true,
            }
        }
        wr.write_all(&out).await?;
        if close {
            wr.flush().await?;
            c.on_close();
            break Ok(());
        }
        // Flush unless more requests are already waiting in the buffer.
        if rd.buffer().len() < BHS_LEN {
            wr.flush().await?;
        }
        conn = Some(c);
    };
    if let Some(mut c) = conn {
        c.on_close();
    }
    let _ = wr.shutdown().await;
    result
}
