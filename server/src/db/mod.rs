//! The orchestrator's SQLite database (rusqlite): nodes, roles, sites and their overrides,
//! rollouts with their plans and progress, leases with fencing tokens, API tokens (stored
//! hashed) and the event log.
//!
//! One thread owns the `rusqlite::Connection` (STYLE #20); async callers send it a command (a
//! closure over the connection) with a oneshot channel for the answer, so no rusqlite call
//! runs on a runtime worker. WAL mode, `synchronous=NORMAL` (a power loss may drop the last
//! commits, never corrupt the file), `busy_timeout` so two server processes can share one file.
//! Every change a rollout worker makes is checked against its lease's fencing token inside the
//! same `BEGIN IMMEDIATE` transaction ([`rollouts::apply_step`]).

pub mod events;
pub mod nodes;
pub mod roles;
pub mod rollouts;
mod schema;
pub mod tokens;

use std::path::{Path, PathBuf};
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::Connection;

use crate::orchestrator::lease::LeaseError;

/// Database errors.
#[derive(Debug, thiserror::Error)]
pub enum DbError {
    /// SQLite failed.
    #[error("database")]
    Sqlite(#[from] rusqlite::Error),
    /// The database thread is gone (server shutting down).
    #[error("database thread stopped")]
    Closed,
    /// Opening the file.
    #[error("opening database {path}")]
    Open {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: rusqlite::Error,
    },
    /// The file was written by a newer Strata.
    #[error("database schema version {found} is newer than this build understands ({known})")]
    SchemaTooNew {
        /// In the file.
        found: i64,
        /// Known here.
        known: i64,
    },
    /// A row holds something unreadable.
    #[error("corrupt row: {0}")]
    Corrupt(String),
    /// No such thing.
    #[error("no {kind} {id:?}")]
    NotFound {
        /// What kind.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The change conflicts with the current state.
    #[error("{0}")]
    Conflict(String),
    /// A lease or fencing check failed.
    #[error("lease: {0}")]
    Lease(#[from] LeaseError),
}

type Job = Box<dyn FnOnce(&mut Connection) + Send>;

/// A handle on the database thread. Cheap to clone; the thread ends when the last handle goes.
#[derive(Clone)]
pub struct Db {
    tx: std::sync::mpsc::Sender<Job>,
    path: PathBuf,
}

/// Unix milliseconds now.
pub fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

pub(crate) fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

pub(crate) fn u64_of(v: i64) -> u64 {
    u64::try_from(v).unwrap_or(0)
}

impl Db {
    /// Opens (creating and migrating) the database at `path` and starts its thread.
    pub fn open(path: &Path) -> Result<Db, DbError> {
        let mut conn = Connection::open(path).map_err(|source| DbError::Open {
            path: path.to_owned(),
            source,
        })?;
        conn.busy_timeout(std::time::Duration::from_secs(10))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "NORMAL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        schema::migrate(&mut conn)?;
        let (tx, rx) = std::sync::mpsc::channel::<Job>();
        std::thread::Builder::new()
            .name("strata-db".into())
            .spawn(move || {
                while let Ok(job) = rx.recv() {
                    job(&mut conn);
                }
            })
            .map_err(|e| DbError::Corrupt(format!("cannot start the database thread: {e}")))?;
        Ok(Db {
            tx,
            path: path.to_owned(),
        })
    }

    /// The database file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Runs `f` on the database thread and returns its result.
    pub async fn call<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (tx, rx) = tokio::sync::oneshot::channel();
        self.tx
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| DbError::Closed)?;
        rx.await.map_err(|_| DbError::Closed)?
    }

    /// [`Db::call`] for synchronous callers (never from a runtime worker).
    pub fn call_blocking<T, F>(&self, f: F) -> Result<T, DbError>
    where
        T: Send + 'static,
        F: FnOnce(&mut Connection) -> Result<T, DbError> + Send + 'static,
    {
        let (tx, rx) = std::sync::mpsc::channel();
        self.tx
            .send(Box::new(move |conn| {
                let _ = tx.send(f(conn));
            }))
            .map_err(|_| DbError::Closed)?;
        rx.recv().map_err(|_| DbError::Closed)?
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn calls_run_on_the_owner_thread() {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open(&dir.path().join("o.db")).unwrap();
        let name = db
            .call(|_| Ok(std::thread::current().name().map(str::to_owned)))
            .await
            .unwrap();
        assert_eq!(name.as_deref(), Some("strata-db"));
        // Reopening migrates nothing and keeps the data.
        db.call(|c| Ok(c.execute("INSERT INTO sites (name, description) VALUES ('x', '')", [])?))
            .await
            .unwrap();
        drop(db);
        let db = Db::open(&dir.path().join("o.db")).unwrap();
        let n: i64 = db
            .call(|c| Ok(c.query_row("SELECT COUNT(*) FROM sites", [], |r| r.get(0))?))
            .await
            .unwrap();
        assert_eq!(n, 1);
    }
}
