//! Persistent DHCP leases in SQLite. One dedicated thread owns the `rusqlite::Connection`;
//! async callers send commands over a channel and await the answer (STYLE #20), so no SQLite
//! call ever runs on a runtime worker. Every batch of changes is one transaction, committed
//! before the DHCP server sends the ACK that depends on it.

use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};

use tokio::sync::{mpsc, oneshot};
use wire::dhcp::MacAddr;

use super::lease::{Lease, LeaseChange, LeaseState};

/// Errors of the lease store.
#[derive(Debug, thiserror::Error)]
pub enum StoreError {
    /// Opening or creating the database failed.
    #[error("cannot open lease database {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// A query or transaction failed.
    #[error("lease database {op} failed")]
    Sql {
        /// What was being done.
        op: &'static str,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The owner thread is gone (it panicked or could not start).
    #[error("lease database thread is gone")]
    Gone,
}

type Reply<T> = oneshot::Sender<Result<T, StoreError>>;

enum Cmd {
    Load(Reply<Vec<Lease>>),
    Apply(Vec<LeaseChange>, Reply<()>),
}

/// Handle to the lease database; cheap to clone.
#[derive(Debug, Clone)]
pub struct LeaseStore {
    tx: mpsc::Sender<Cmd>,
}

impl std::fmt::Debug for Cmd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Cmd::Load(_) => f.write_str("Load"),
            Cmd::Apply(c, _) => write!(f, "Apply({} changes)", c.len()),
        }
    }
}

const SCHEMA: &str = "CREATE TABLE IF NOT EXISTS dhcp_leases (
    ip TEXT PRIMARY KEY NOT NULL,
    mac TEXT NOT NULL,
    expires INTEGER NOT NULL,
    state TEXT NOT NULL,
    hostname TEXT
)";

impl LeaseStore {
    /// Opens (creating if needed) the lease database at `path` on its own thread.
    pub async fn open(path: &Path) -> Result<LeaseStore, StoreError> {
        let p = path.to_owned();
        Self::start(move || rusqlite::Connection::open(&p), path.to_owned()).await
    }

    /// A store in memory (tests, or leases that need not survive a restart).
    pub async fn in_memory() -> Result<LeaseStore, StoreError> {
        Self::start(
            rusqlite::Connection::open_in_memory,
            PathBuf::from(":memory:"),
        )
        .await
    }

    async fn start(
        open: impl FnOnce() -> rusqlite::Result<rusqlite::Connection> + Send + 'static,
        path: PathBuf,
    ) -> Result<LeaseStore, StoreError> {
        let (tx, rx) = mpsc::channel(64);
        let (ready_tx, ready_rx) = oneshot::channel();
        let spawned = std::thread::Builder::new()
            .name("dhcp-leases".into())
            .spawn(move || {
                let conn = open()
                    .and_then(|c| {
                        c.pragma_update(None, "journal_mode", "WAL")?;
                        c.pragma_update(None, "synchronous", "FULL")?;
                        c.execute(SCHEMA, [])?;
                        Ok(c)
                    })
                    .map_err(|source| StoreError::Open { path, source });
                match conn {
                    Ok(c) => {
                        let _ = ready_tx.send(Ok(()));
                        owner(c, rx);
                    }
                    Err(e) => {
                        let _ = ready_tx.send(Err(e));
                    }
                }
            });
        if spawned.is_err() {
            return Err(StoreError::Gone);
        }
        ready_rx.await.map_err(|_| StoreError::Gone)??;
        Ok(LeaseStore { tx })
    }

    async fn call<T>(&self, make: impl FnOnce(Reply<T>) -> Cmd) -> Result<T, StoreError> {
        let (tx, rx) = oneshot::channel();
        self.tx.send(make(tx)).await.map_err(|_| StoreError::Gone)?;
        rx.await.map_err(|_| StoreError::Gone)?
    }

    /// All stored records. Rows that do not parse are skipped with a warning.
    pub async fn load(&self) -> Result<Vec<Lease>, StoreError> {
        self.call(Cmd::Load).await
    }

    /// Applies changes in one transaction.
    pub async fn apply(&self, changes: Vec<LeaseChange>) -> Result<(), StoreError> {
        if changes.is_empty() {
            return Ok(());
        }
        self.call(|r| Cmd::Apply(changes, r)).await
    }
}

fn owner(mut conn: rusqlite::Connection, mut rx: mpsc::Receiver<Cmd>) {
    while let Some(cmd) = rx.blocking_recv() {
        match cmd {
            Cmd::Load(reply) => {
                let _ = reply.send(load(&conn));
            }
            Cmd::Apply(changes, reply) => {
                let _ = reply.send(apply(&mut conn, &changes));
            }
        }
    }
}

fn load(conn: &rusqlite::Connection) -> Result<Vec<Lease>, StoreError> {
    let sql = |source| StoreError::Sql { op: "load", source };
    let mut stmt = conn
        .prepare("SELECT ip, mac, expires, state, hostname FROM dhcp_leases")
        .map_err(sql)?;
    let rows = stmt
        .query_map([], |r| {
            Ok((
                r.get::<_, String>(0)?,
                r.get::<_, String>(1)?,
                r.get::<_, i64>(2)?,
                r.get::<_, String>(3)?,
                r.get::<_, Option<String>>(4)?,
            ))
        })
        .map_err(sql)?;
    let mut out = Vec::new();
    for row in rows {
        let (ip, mac, expires, state, hostname) = row.map_err(sql)?;
        let parsed = (
            ip.parse::<Ipv4Addr>().ok(),
            mac.parse::<MacAddr>().ok(),
            u64::try_from(expires).ok(),
            LeaseState::parse(&state),
        );
        match parsed {
            (Some(ip), Some(mac), Some(expires), Some(state)) => out.push(Lease {
                ip,
                mac,
                expires,
                state,
                hostname,
            }),
            _ => tracing::warn!(%ip, %mac, expires, %state, "skipping unreadable lease row"),
        }
    }
    Ok(out)
}

fn apply(conn: &mut rusqlite::Connection, changes: &[LeaseChange]) -> Result<(), StoreError> {
    let sql = |source| StoreError::Sql {
        op: "write",
        source,
    };
    let tx = conn.transaction().map_err(sql)?;
    for c in changes {
        match c {
            LeaseChange::Upsert(l) => {
                tx.execute(
                    "INSERT INTO dhcp_leases (ip, mac, expires, state, hostname)
                     VALUES (?1, ?2, ?3, ?4, ?5)
                     ON CONFLICT(ip) DO UPDATE SET mac = ?2, expires = ?3, state = ?4, hostname = ?5",
                    rusqlite::params![
                        l.ip.to_string(),
                        l.mac.to_string(),
                        i64::try_from(l.expires).unwrap_or(i64::MAX),
                        l.state.as_str(),
                        l.hostname
                    ],
                )
                .map_err(sql)?;
            }
            LeaseChange::Delete(ip) => {
                tx.execute("DELETE FROM dhcp_leases WHERE ip = ?1", [ip.to_string()])
                    .map_err(sql)?;
            }
        }
    }
    tx.commit().map_err(sql)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn leases_survive_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("leases.db");
        let l = Lease {
            ip: Ipv4Addr::new(10, 0, 0, 9),
            mac: MacAddr([2, 0, 0, 0, 0, 9]),
            expires: 1_000,
            state: LeaseState::Bound,
            hostname: Some("n9".into()),
        };
        {
            let s = LeaseStore::open(&path).await.unwrap();
            s.apply(vec![LeaseChange::Upsert(l.clone())]).await.unwrap();
            let mut l2 = l.clone();
            l2.ip = Ipv4Addr::new(10, 0, 0, 10);
            s.apply(vec![
                LeaseChange::Upsert(l2),
                LeaseChange::Delete(Ipv4Addr::new(10, 0, 0, 10)),
            ])
            .await
            .unwrap();
        }
        let s = LeaseStore::open(&path).await.unwrap();
        assert_eq!(s.load().await.unwrap(), vec![l]);
    }

    #[tokio::test]
    async fn open_failure_names_the_file() {
        let err = LeaseStore::open(Path::new("/nonexistent-dir/x/leases.db"))
            .await
            .unwrap_err();
        assert!(matches!(err, StoreError::Open { .. }), "{err:?}");
    }
}
