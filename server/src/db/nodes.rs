//! Nodes: identity (MAC, name), placement (role, site), desired state (an explicit version
//! pin, a version to stage, a reboot request) and the facts nodes report (state, status,
//! report cursor, times, layer bytes). Facts arrive in batches from the fleet's flusher;
//! desired-state changes bump the node's `rev`, so other server processes sharing the file
//! pick them up (`changed_since`).

use rusqlite::{params, Connection, OptionalExtension, Row};
use serde::Serialize;
use wire::report::{NodeState, NodeStatus};

use super::events::NewEvent;
use super::{i64_of, u64_of, DbError};
use crate::orchestrator::state::Cursor;
use crate::orchestrator::VersionRef;

/// A node as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct NodeRow {
    /// Canonical MAC.
    pub mac: String,
    /// Name.
    pub name: String,
    /// Role.
    pub role: String,
    /// Site.
    pub site: Option<String>,
    /// Explicit version, overriding site and role.
    pub pin: Option<VersionRef>,
    /// The version it runs by its pin, site or role (none: the store's newest for the role).
    pub effective: Option<VersionRef>,
    /// Version to download in the background.
    pub stage: Option<VersionRef>,
    /// Version found complete in its cache.
    pub staged: Option<VersionRef>,
    /// Unix ms of a pending reboot request.
    pub reboot_ms: Option<u64>,
    /// Reported state.
    pub state: NodeState,
    /// Reported status.
    pub status: NodeStatus,
    /// Report cursor.
    #[serde(skip)]
    pub cursor: Cursor,
    /// Unix ms of the last full report (a boot).
    pub session_ms: u64,
    /// Unix ms of the last report.
    pub report_ms: u64,
    /// Unix ms first seen.
    pub first_seen_ms: u64,
    /// Unix ms last seen (any request).
    pub last_seen_ms: u64,
    /// Layer bytes sent to it.
    pub layer_bytes: u64,
    /// A cached layer no longer matches its hash.
    pub drifted: bool,
    /// Desired-state revision.
    #[serde(skip)]
    pub rev: u64,
}

/// The SELECT every node query uses; `effective` resolves pin, site override and role.
pub(crate) const SELECT: &str = "SELECT n.mac, n.name, n.role, n.site, n.pin_image, n.pin_version,
    COALESCE(n.pin_image, o.image, r.image), COALESCE(n.pin_version, o.version, r.version),
    n.stage_image, n.stage_version, n.staged_image, n.staged_version, n.reboot_ms, n.state, n.status,
    n.applied_seq, n.digest, n.session_ms, n.report_ms, n.first_seen_ms, n.last_seen_ms, n.layer_bytes,
    n.drifted, n.rev
    FROM nodes n LEFT JOIN roles r ON r.name = n.role
    LEFT JOIN site_overrides o ON o.site = n.site AND o.role = n.role";

/// The columns planning and rollout steps read, without parsing the status JSON (SQLite's
/// `json_extract` takes the one field they need): for a rollout over 10,000 nodes the full
/// rows cost 30-50 ms per read.
pub(crate) const SELECT_ASSIGNMENT: &str = "SELECT n.mac, n.role, n.pin_image, n.pin_version,
    COALESCE(n.pin_image, o.image, r.image), COALESCE(n.pin_version, o.version, r.version),
    n.state, json_extract(n.status, '$.version'), n.staged_image, n.staged_version, n.session_ms, n.report_ms
    FROM nodes n LEFT JOIN roles r ON r.name = n.role
    LEFT JOIN site_overrides o ON o.site = n.site AND o.role = n.role";

pub(crate) fn vref(image: Option<String>, version: Option<i64>) -> Option<VersionRef> {
    match (image, version) {
        (Some(image), Some(v)) => Some(VersionRef {
            image,
            version: u64_of(v),
        }),
        _ => None,
    }
}

pub(crate) fn state_name(s: NodeState) -> String {
    serde_json::to_value(s)
        .ok()
        .and_then(|v| v.as_str().map(str::to_owned))
        .unwrap_or_default()
}

pub(crate) fn parse_state(s: &str) -> NodeState {
    serde_json::from_value(serde_json::Value::String(s.to_owned())).unwrap_or_default()
}

pub(crate) fn row(r: &Row<'_>) -> rusqlite::Result<NodeRow> {
    let digest: Option<Vec<u8>> = r.get(16)?;
    let status: String = r.get(14)?;
    Ok(NodeRow {
        mac: r.get(0)?,
        name: r.get(1)?,
        role: r.get(2)?,
        site: r.get(3)?,
        pin: vref(r.get(4)?, r.get(5)?),
        effective: vref(r.get(6)?, r.get(7)?),
        stage: vref(r.get(8)?, r.get(9)?),
        staged: vref(r.get(10)?, r.get(11)?),
        reboot_ms: r.get::<_, Option<i64>>(12)?.map(u64_of),
        state: parse_state(&r.get::<_, String>(13)?),
        status: serde_json::from_str(&status).unwrap_or_default(),
        cursor: Cursor {
            applied_seq: u64_of(r.get(15)?),
            digest: digest
                .and_then(|d| <[u8; 32]>::try_from(d.as_slice()).ok())
                .unwrap_or([0; 32]),
        },
        session_ms: u64_of(r.get(17)?),
        report_ms: u64_of(r.get(18)?),
        first_seen_ms: u64_of(r.get(19)?),
        last_seen_ms: u64_of(r.get(20)?),
        layer_bytes: u64_of(r.get(21)?),
        drifted: r.get::<_, i64>(22)? != 0,
        rev: u64_of(r.get(23)?),
    })
}

/// One node.
pub fn get(conn: &Connection, mac: &str) -> Result<Option<NodeRow>, DbError> {
    Ok(conn
        .prepare_cached(&format!("{SELECT} WHERE n.mac = ?1"))?
        .query_row([mac], row)
        .optional()?)
}

/// One node, or `NotFound` naming it.
pub fn require(conn: &Connection, mac: &str) -> Result<NodeRow, DbError> {
    get(conn, mac)?.ok_or_else(|| DbError::NotFound {
        kind: "node",
        id: mac.to_owned(),
    })
}

/// Nodes, by MAC, optionally of one role.
pub fn list(conn: &Connection, role: Option<&str>) -> Result<Vec<NodeRow>, DbError> {
    let mut stmt = conn.prepare_cached(&format!(
        "{SELECT} WHERE ?1 IS NULL OR n.role = ?1 ORDER BY n.mac"
    ))?;
    let rows = stmt
        .query_map([role], row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// Nodes whose desired state changed after revision `rev`.
pub fn changed_since(conn: &Connection, rev: u64) -> Result<Vec<NodeRow>, DbError> {
    let mut stmt = conn.prepare_cached(&format!("{SELECT} WHERE n.rev > ?1"))?;
    let rows = stmt
        .query_map([i64_of(rev)], row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

fn next_rev(conn: &Connection) -> Result<i64, DbError> {
    Ok(conn
        .prepare_cached("SELECT COALESCE(MAX(rev), 0) + 1 FROM nodes")?
        .query_row([], |r| r.get(0))?)
}

/// Marks every node of a role changed (its role definition changed).
pub fn bump_role(conn: &Connection, role: &str) -> Result<(), DbError> {
    let rev = next_rev(conn)?;
    conn.execute(
        "UPDATE nodes SET rev = ?1 WHERE role = ?2",
        params![rev, role],
    )?;
    Ok(())
}

/// Marks one node changed.
pub fn bump(conn: &Connection, mac: &str) -> Result<(), DbError> {
    let rev = next_rev(conn)?;
    conn.prepare_cached("UPDATE nodes SET rev = ?1 WHERE mac = ?2")?
        .execute(params![rev, mac])?;
    Ok(())
}

/// Records a node seen for the first time (no-op if known) and returns it.
pub fn discover(conn: &Connection, mac: &str, role: &str, now_ms: u64) -> Result<NodeRow, DbError> {
    let rev = next_rev(conn)?;
    let inserted = conn.execute(
        "INSERT OR IGNORE INTO nodes (mac, name, role, first_seen_ms, last_seen_ms, rev) VALUES (?1, ?2, ?3, ?4, ?4, ?5)",
        params![mac, format!("node-{}", mac.replace(':', "")), role, i64_of(now_ms), rev],
    )?;
    if inserted > 0 {
        super::events::record(
            conn,
            &NewEvent::now(
                format!("node:{mac}"),
                "node.discovered",
                format!("node/{mac}"),
                serde_json::json!({ "role": role }),
            ),
        )?;
    }
    get(conn, mac)?.ok_or_else(|| DbError::NotFound {
        kind: "node",
        id: mac.to_owned(),
    })
}

/// An operator's change to a node; `None` leaves a field alone.
#[derive(Debug, Clone, Default)]
pub struct NodeChange {
    /// New name.
    pub name: Option<String>,
    /// New role.
    pub role: Option<String>,
    /// New site (`Some(None)` clears it).
    pub site: Option<Option<String>>,
    /// New pin (`Some(None)` clears it).
    pub pin: Option<Option<VersionRef>>,
    /// Ask the node to reboot.
    pub reboot: bool,
}

/// Applies an operator's change (refused for nodes in an active rollout's plan, except a
/// reboot request).
pub fn change(
    conn: &mut Connection,
    mac: &str,
    c: &NodeChange,
    actor: &str,
) -> Result<NodeRow, DbError> {
    let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
    let before = get(&tx, mac)?.ok_or_else(|| DbError::NotFound {
        kind: "node",
        id: mac.to_owned(),
    })?;
    let placement = c.role.is_some() || c.site.is_some() || c.pin.is_some();
    if placement && super::rollouts::node_busy(&tx, mac, &before.role)? {
        return Err(DbError::Conflict(format!(
            "node {mac} is part of an active rollout"
        )));
    }
    if let Some(site) = c.site.as_ref().and_then(|s| s.as_ref()) {
        let exists: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM sites WHERE name = ?1)",
            [site],
            |r| r.get(0),
        )?;
        if !exists {
            return Err(DbError::NotFound {
                kind: "site",
                id: site.clone(),
            });
        }
    }
    if let Some(name) = &c.name {
        let taken: bool = tx.query_row(
            "SELECT EXISTS (SELECT 1 FROM nodes WHERE name = ?1 AND mac != ?2)",
            [name, mac],
            |r| r.get(0),
        )?;
        if taken {
            return Err(DbError::Conflict(format!("name {name:?} is taken")));
        }
        tx.execute(
            "UPDATE nodes SET name = ?1 WHERE mac = ?2",
            params![name, mac],
        )?;
    }
    if let Some(role) = &c.role {
        tx.execute(
            "UPDATE nodes SET role = ?1, stage_image = NULL, stage_version = NULL WHERE mac = ?2",
            params![role, mac],
        )?;
    }
    if let Some(site) = &c.site {
        tx.execute(
            "UPDATE nodes SET site = ?1 WHERE mac = ?2",
            params![site, mac],
        )?;
    }
    if let Some(pin) = &c.pin {
        tx.execute(
            "UPDATE nodes SET pin_image = ?1, pin_version = ?2 WHERE mac = ?3",
            params![
                pin.as_ref().map(|p| &p.image),
                pin.as_ref().map(|p| i64_of(p.version)),
                mac
            ],
        )?;
    }
    if c.reboot {
        tx.execute(
            "UPDATE nodes SET reboot_ms = ?1 WHERE mac = ?2",
            params![i64_of(super::now_ms()), mac],
        )?;
    }
    bump(&tx, mac)?;
    let after = get(&tx, mac)?.ok_or_else(|| DbError::NotFound {
        kind: "node",
        id: mac.to_owned(),
    })?;
    super::events::record(
        &tx,
        &NewEvent::now(
            actor,
            "node.changed",
            format!("node/{mac}"),
            serde_json::json!({
                "name": after.name, "role": after.role, "site": after.site, "pin": after.pin,
                "reboot": c.reboot, "before": { "name": before.name, "role": before.role, "site": before.site, "pin": before.pin },
            }),
        ),
    )?;
    tx.commit()?;
    Ok(after)
}

/// Deletes a node (refused while it is in an active rollout).
pub fn delete(conn: &Connection, mac: &str, actor: &str) -> Result<(), DbError> {
    let Some(n) = get(conn, mac)? else {
        return Err(DbError::NotFound {
            kind: "node",
            id: mac.to_owned(),
        });
    };
    if super::rollouts::node_busy(conn, mac, &n.role)? {
        return Err(DbError::Conflict(format!(
            "node {mac} is part of an active rollout"
        )));
    }
    conn.execute("DELETE FROM nodes WHERE mac = ?1", [mac])?;
    conn.execute("UPDATE tokens SET revoked = 1 WHERE node = ?1", [mac])?;
    super::events::record(
        conn,
        &NewEvent::now(
            actor,
            "node.deleted",
            format!("node/{mac}"),
            serde_json::json!({}),
        ),
    )?;
    Ok(())
}

/// Fast-moving facts of one node, written in batches.
#[derive(Debug, Clone)]
pub struct Facts {
    /// MAC.
    pub mac: String,
    /// Status and cursor, if a report changed them.
    pub report: Option<(NodeStatus, Cursor, u64, u64)>,
    /// Staged version found complete.
    pub staged: Option<Option<VersionRef>>,
    /// Last seen.
    pub last_seen_ms: u64,
    /// Layer bytes to add.
    pub layer_bytes: u64,
}

/// Writes a batch of facts and events in one transaction.
pub fn flush(conn: &mut Connection, facts: &[Facts], events: &[NewEvent]) -> Result<(), DbError> {
    let tx = conn.transaction()?;
    {
        let mut seen = tx.prepare_cached(
            "UPDATE nodes SET last_seen_ms = MAX(last_seen_ms, ?1), layer_bytes = layer_bytes + ?2 WHERE mac = ?3",
        )?;
        let mut rep = tx.prepare_cached(
            "UPDATE nodes SET state = ?1, status = ?2, applied_seq = ?3, digest = ?4, session_ms = ?5, report_ms = ?6,
             drifted = ?7 WHERE mac = ?8",
        )?;
        let mut staged = tx.prepare_cached(
            "UPDATE nodes SET staged_image = ?1, staged_version = ?2 WHERE mac = ?3",
        )?;
        for f in facts {
            seen.execute(params![
                i64_of(f.last_seen_ms),
                i64_of(f.layer_bytes),
                f.mac
            ])?;
            if let Some((status, cursor, session_ms, report_ms)) = &f.report {
                rep.execute(params![
                    state_name(status.state),
                    serde_json::to_string(status).unwrap_or_else(|_| "{}".into()),
                    i64_of(cursor.applied_seq),
                    cursor.digest.to_vec(),
                    i64_of(*session_ms),
                    i64_of(*report_ms),
                    !status.drift.is_empty(),
                    f.mac
                ])?;
            }
            if let Some(s) = &f.staged {
                staged.execute(params![
                    s.as_ref().map(|v| &v.image),
                    s.as_ref().map(|v| i64_of(v.version)),
                    f.mac
                ])?;
            }
        }
    }
    for e in events {
        super::events::record(&tx, e)?;
    }
    tx.commit()?;
    Ok(())
}
