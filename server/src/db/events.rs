//! The event log: every change, who made it, and every rejected report.

use rusqlite::{params, Connection};
use serde::Serialize;

use super::{i64_of, u64_of, DbError};

/// One recorded event.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Event {
    /// Increasing id.
    pub id: u64,
    /// Unix ms.
    pub at_ms: u64,
    /// Who: `token:<id>:<name>`, `node:<mac>`, `worker:<id>#<fencing token>`, `server`.
    pub actor: String,
    /// What, e.g. `node.transition`, `node.illegal_transition`, `rollout.op`.
    pub kind: String,
    /// On what: `node/<mac>`, `role/<name>`, `rollout/<id>`, ...
    pub subject: String,
    /// Details.
    pub detail: serde_json::Value,
}

/// An event not yet written.
#[derive(Debug, Clone)]
pub struct NewEvent {
    /// Unix ms.
    pub at_ms: u64,
    /// Who.
    pub actor: String,
    /// What.
    pub kind: &'static str,
    /// On what.
    pub subject: String,
    /// Details.
    pub detail: serde_json::Value,
}

impl NewEvent {
    /// An event now.
    pub fn now(
        actor: impl Into<String>,
        kind: &'static str,
        subject: impl Into<String>,
        detail: serde_json::Value,
    ) -> Self {
        NewEvent {
            at_ms: super::now_ms(),
            actor: actor.into(),
            kind,
            subject: subject.into(),
            detail,
        }
    }
}

/// Writes one event.
pub fn record(conn: &Connection, e: &NewEvent) -> Result<(), DbError> {
    conn.prepare_cached(
        "INSERT INTO events (at_ms, actor, kind, subject, detail) VALUES (?1, ?2, ?3, ?4, ?5)",
    )?
    .execute(params![
        i64_of(e.at_ms),
        e.actor,
        e.kind,
        e.subject,
        e.detail.to_string()
    ])?;
    Ok(())
}

/// Events with id above `after`, oldest first, optionally for one subject or kind prefix.
pub fn list(
    conn: &Connection,
    after: u64,
    limit: u32,
    subject: Option<&str>,
    kind: Option<&str>,
) -> Result<Vec<Event>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT id, at_ms, actor, kind, subject, detail FROM events
         WHERE id > ?1 AND (?2 IS NULL OR subject = ?2) AND (?3 IS NULL OR kind LIKE ?3 || '%')
         ORDER BY id LIMIT ?4",
    )?;
    let rows = stmt.query_map(params![i64_of(after), subject, kind, limit], |r| {
        Ok((
            r.get::<_, i64>(0)?,
            r.get::<_, i64>(1)?,
            r.get(2)?,
            r.get(3)?,
            r.get(4)?,
            r.get::<_, String>(5)?,
        ))
    })?;
    let mut out = Vec::new();
    for row in rows {
        let (id, at, actor, kind, subject, detail) = row?;
        out.push(Event {
            id: u64_of(id),
            at_ms: u64_of(at),
            actor,
            kind,
            subject,
            detail: serde_json::from_str(&detail).unwrap_or(serde_json::Value::Null),
        });
    }
    Ok(out)
}
