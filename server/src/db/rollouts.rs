//! Rollouts (spec, plan, digest, progress, state), their leases, and the fenced step write:
//! [`apply_step`] checks the worker's fencing token, checks that every operation is in the
//! plan, performs the operations, stores the progress and records the events, all in one
//! `BEGIN IMMEDIATE` transaction.

use std::collections::HashMap;

use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::Serialize;

use super::events::NewEvent;
use super::nodes::{self, NodeRow};
use super::{i64_of, u64_of, DbError};
use crate::orchestrator::lease::{self, Lease};
use crate::orchestrator::plan::{Op, Plan, RolloutSpec};
use crate::orchestrator::rollout::{NodeObs, Progress, RolloutState, World};
use crate::orchestrator::VersionRef;

/// A rollout as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Rollout {
    /// Id.
    pub id: u64,
    /// State.
    pub state: RolloutState,
    /// What was asked.
    pub spec: RolloutSpec,
    /// The plan.
    pub plan: Plan,
    /// The plan's digest (what approval quotes).
    pub digest: String,
    /// Where it is.
    pub progress: Progress,
    /// An abort was requested.
    pub abort_requested: bool,
    /// Why it halted or was aborted.
    pub reason: Option<String>,
    /// Who planned it.
    pub created_by: String,
    /// Who approved it.
    pub approved_by: Option<String>,
    /// Unix ms.
    pub created_ms: u64,
    /// Unix ms.
    pub updated_ms: u64,
    /// Its lease, if any.
    pub lease: Option<Lease>,
}

const SELECT: &str =
    "SELECT r.id, r.state, r.spec, r.plan, r.digest, r.progress, r.abort, r.reason, r.created_by,
    r.approved_by, r.created_ms, r.updated_ms, l.holder, l.token, l.expires_ms
    FROM rollouts r LEFT JOIN leases l ON l.rollout = r.id";

fn corrupt(what: &str) -> impl Fn(serde_json::Error) -> DbError + '_ {
    move |e| DbError::Corrupt(format!("rollout {what}: {e}"))
}

type Raw = (
    i64,
    String,
    String,
    String,
    String,
    String,
    i64,
    Option<String>,
    String,
    Option<String>,
    i64,
    i64,
    Option<String>,
    Option<i64>,
    Option<i64>,
);

fn raw(r: &rusqlite::Row<'_>) -> rusqlite::Result<Raw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
        r.get(7)?,
        r.get(8)?,
        r.get(9)?,
        r.get(10)?,
        r.get(11)?,
        r.get(12)?,
        r.get(13)?,
        r.get(14)?,
    ))
}

fn decode(x: Raw) -> Result<Rollout, DbError> {
    let (
        id,
        state,
        spec,
        plan,
        digest,
        progress,
        abort,
        reason,
        created_by,
        approved_by,
        created,
        updated,
        holder,
        token,
        exp,
    ) = x;
    Ok(Rollout {
        id: u64_of(id),
        state: RolloutState::parse(&state)
            .ok_or_else(|| DbError::Corrupt(format!("rollout state {state:?}")))?,
        spec: serde_json::from_str(&spec).map_err(corrupt("spec"))?,
        plan: serde_json::from_str(&plan).map_err(corrupt("plan"))?,
        digest,
        progress: serde_json::from_str(&progress).map_err(corrupt("progress"))?,
        abort_requested: abort != 0,
        reason,
        created_by,
        approved_by,
        created_ms: u64_of(created),
        updated_ms: u64_of(updated),
        lease: match (holder, token, exp) {
            (Some(holder), Some(t), Some(e)) => Some(Lease {
                holder,
                token: u64_of(t),
                expires_ms: u64_of(e),
            }),
            _ => None,
        },
    })
}

/// One rollout.
pub fn get(conn: &Connection, id: u64) -> Result<Rollout, DbError> {
    let x = conn
        .prepare_cached(&format!("{SELECT} WHERE r.id = ?1"))?
        .query_row([i64_of(id)], raw)
        .optional()?
        .ok_or_else(|| DbError::NotFound {
            kind: "rollout",
            id: id.to_string(),
        })?;
    decode(x)
}

/// Rollouts, newest first; `active` keeps running and paused ones.
pub fn list(conn: &Connection, active: bool) -> Result<Vec<Rollout>, DbError> {
    let filter = if active {
        "WHERE r.state IN ('running', 'paused')"
    } else {
        ""
    };
    let mut stmt = conn.prepare_cached(&format!("{SELECT} {filter} ORDER BY r.id DESC"))?;
    let rows = stmt.query_map([], raw)?.collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(decode).collect()
}

/// Stores a new plan (state `planned`) and returns the rollout. The plan is serialised once
/// (stored and digested from the same bytes) and not read back: over 10,000 nodes it is about
/// 3.4 MiB of JSON, and each extra pass cost 10-40 ms (orch_load's plan breakdown).
pub fn create(conn: &Connection, plan: &Plan, actor: &str) -> Result<Rollout, DbError> {
    let now = super::now_ms();
    let enc = |v: &dyn erased::Ser| v.json();
    let plan_json =
        serde_json::to_string(plan).map_err(|e| DbError::Corrupt(format!("plan to JSON: {e}")))?;
    let digest = Plan::digest_of_json(plan_json.as_bytes());
    let progress = Progress::default();
    conn.execute(
        "INSERT INTO rollouts (state, spec, plan, digest, progress, created_by, created_ms, updated_ms)
         VALUES ('planned', ?1, ?2, ?3, ?4, ?5, ?6, ?6)",
        params![enc(&plan.spec), plan_json, digest, enc(&progress), actor, i64_of(now)],
    )?;
    let id = u64_of(conn.last_insert_rowid());
    super::events::record(
        conn,
        &NewEvent::now(
            actor,
            "rollout.planned",
            format!("rollout/{id}"),
            serde_json::json!({ "digest": digest, "waves": plan.waves.len(), "nodes": plan.node_count() }),
        ),
    )?;
    Ok(Rollout {
        id,
        state: RolloutState::Planned,
        spec: plan.spec.clone(),
        plan: plan.clone(),
        digest,
        progress,
        abort_requested: false,
        reason: None,
        created_by: actor.to_owned(),
        approved_by: None,
        created_ms: now,
        updated_ms: now,
        lease: None,
    })
}

mod erased {
    pub trait Ser {
        fn json(&self) -> String;
    }
    impl<T: serde::Serialize> Ser for T {
        fn json(&self) -> String {
            serde_json::to_string(self).unwrap_or_default()
        }
    }
}

/// An operator's action on a rollout.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    /// Approve the plan with this digest.
    Approve(String),
    /// Start driving it.
    Apply,
    /// Pause.
    Pause,
    /// Resume.
    Resume,
    /// Abort (the current wave rolls back).
    Abort,
}

/// Performs an operator's action, checking the rollout's state allows it.
pub fn act(
    conn: &mut Connection,
    id: u64,
    action: &Action,
    actor: &str,
) -> Result<Rollout, DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let r = get(&tx, id)?;
    let now = i64_of(super::now_ms());
    use RolloutState::*;
    let (kind, sql): (&'static str, &str) = match (action, r.state) {
        (Action::Approve(d), Planned) => {
            if *d != r.digest {
                return Err(DbError::Conflict(format!("plan digest is {}, not {d}: re-read the plan", r.digest)));
            }
            ("rollout.approved", "UPDATE rollouts SET state = 'approved', approved_by = ?2, updated_ms = ?3 WHERE id = ?1")
        }
        (Action::Apply, Approved) => {
            for role in r.plan.roles.iter().map(|p| p.role.as_str()) {
                if role_busy(&tx, role)? {
                    return Err(DbError::Conflict(format!("another rollout of role {role:?} is active")));
                }
            }
            ("rollout.applied", "UPDATE rollouts SET state = 'running', updated_ms = ?3 WHERE id = ?1 AND ?2 IS NOT NULL")
        }
        (Action::Pause, Running) => ("rollout.paused", "UPDATE rollouts SET state = 'paused', updated_ms = ?3 WHERE id = ?1 AND ?2 IS NOT NULL"),
        (Action::Resume, Paused) => ("rollout.resumed", "UPDATE rollouts SET state = 'running', updated_ms = ?3 WHERE id = ?1 AND ?2 IS NOT NULL"),
        (Action::Abort, Running | Paused) => (
            "rollout.abort_requested",
            "UPDATE rollouts SET abort = 1, state = 'running', updated_ms = ?3 WHERE id = ?1 AND ?2 IS NOT NULL",
        ),
        (Action::Abort, Planned | Approved) => (
            "rollout.aborted",
            "UPDATE rollouts SET state = 'aborted', reason = 'aborted before apply', updated_ms = ?3 WHERE id = ?1 AND ?2 IS NOT NULL",
        ),
        (a, s) => return Err(DbError::Conflict(format!("cannot {a:?} a rollout that is {}", s.as_str()).to_lowercase())),
    };
    tx.execute(sql, params![i64_of(id), actor, now])?;
    super::events::record(
        &tx,
        &NewEvent::now(actor, kind, format!("rollout/{id}"), serde_json::json!({})),
    )?;
    tx.commit()?;
    get(conn, id)
}

/// Whether a running or paused rollout covers `role`.
pub fn role_busy(conn: &Connection, role: &str) -> Result<bool, DbError> {
    Ok(list(conn, true)?
        .iter()
        .any(|r| r.plan.roles.iter().any(|p| p.role == role)))
}

/// Whether a running or paused rollout covers the node or its role.
pub fn node_busy(conn: &Connection, mac: &str, role: &str) -> Result<bool, DbError> {
    Ok(list(conn, true)?.iter().any(|r| {
        r.plan
            .roles
            .iter()
            .any(|p| p.role == role || p.members.iter().any(|m| m == mac))
    }))
}

fn read_lease(conn: &Connection, id: u64) -> Result<Option<Lease>, DbError> {
    Ok(conn
        .prepare_cached("SELECT holder, token, expires_ms FROM leases WHERE rollout = ?1")?
        .query_row([i64_of(id)], |r| {
            Ok(Lease {
                holder: r.get(0)?,
                token: u64_of(r.get(1)?),
                expires_ms: u64_of(r.get(2)?),
            })
        })
        .optional()?)
}

fn write_lease(conn: &Connection, id: u64, l: &Lease) -> Result<(), DbError> {
    conn.prepare_cached(
        "INSERT INTO leases (rollout, holder, token, expires_ms) VALUES (?1, ?2, ?3, ?4)
         ON CONFLICT (rollout) DO UPDATE SET holder = ?2, token = ?3, expires_ms = ?4",
    )?
    .execute(params![
        i64_of(id),
        l.holder,
        i64_of(l.token),
        i64_of(l.expires_ms)
    ])?;
    Ok(())
}

/// Takes (or renews) a rollout's lease for `me`.
pub fn acquire(
    conn: &mut Connection,
    id: u64,
    me: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Lease, DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let cur = read_lease(&tx, id)?;
    let l = lease::acquire(cur.as_ref(), me, now_ms, ttl_ms)?;
    write_lease(&tx, id, &l)?;
    if cur.as_ref().map(|c| c.token) != Some(l.token) {
        super::events::record(
            &tx,
            &NewEvent::now(
                format!("worker:{me}#{}", l.token),
                "rollout.lease_taken",
                format!("rollout/{id}"),
                serde_json::json!({ "token": l.token, "previous": cur }),
            ),
        )?;
    }
    tx.commit()?;
    Ok(l)
}

/// Renews `me`'s lease.
pub fn heartbeat(
    conn: &mut Connection,
    id: u64,
    me: &str,
    token: u64,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Lease, DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let l = lease::heartbeat(read_lease(&tx, id)?.as_ref(), me, token, now_ms, ttl_ms)?;
    write_lease(&tx, id, &l)?;
    tx.commit()?;
    Ok(l)
}

/// Gives a lease up.
pub fn release(
    conn: &mut Connection,
    id: u64,
    me: &str,
    token: u64,
    now_ms: u64,
) -> Result<(), DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    if let Some(l) = lease::release(read_lease(&tx, id)?.as_ref(), me, token, now_ms) {
        write_lease(&tx, id, &l)?;
    }
    tx.commit()?;
    Ok(())
}

/// The fleet as a plan's executor sees it.
pub fn world(conn: &Connection, plan: &Plan, wave: usize) -> Result<World, DbError> {
    let mut w = World::default();
    let mut want: Vec<&str> = plan.roles.iter().map(|r| r.role.as_str()).collect();
    want.sort_unstable();
    want.dedup();
    let mut stmt =
        conn.prepare_cached(&format!("{} WHERE n.role = ?1", nodes::SELECT_ASSIGNMENT))?;
    for role in &want {
        w.members.entry((*role).to_owned()).or_default();
        for n in stmt.query_map([role], obs_row)? {
            let (mac, o) = n?;
            w.members
                .entry(o.role.clone())
                .or_default()
                .insert(mac.clone());
            w.nodes.insert(mac, o);
        }
        let cur = super::roles::get(conn, role)?.and_then(|r| r.version);
        w.roles.insert((*role).to_owned(), cur);
    }
    if let Some(wv) = plan.waves.get(wave) {
        for mac in &wv.nodes {
            if !w.nodes.contains_key(mac) {
                if let Some(n) = nodes::get(conn, mac)? {
                    w.nodes.insert(n.mac.clone(), obs(n));
                }
            }
        }
    }
    Ok(w)
}

/// A row of [`nodes::SELECT_ASSIGNMENT`].
fn obs_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(String, NodeObs)> {
    Ok((
        r.get(0)?,
        NodeObs {
            role: r.get(1)?,
            pinned: nodes::vref(r.get(2)?, r.get(3)?),
            effective: nodes::vref(r.get(4)?, r.get(5)?),
            state: nodes::parse_state(&r.get::<_, String>(6)?),
            version: r.get::<_, Option<i64>>(7)?.map(u64_of),
            staged: nodes::vref(r.get(8)?, r.get(9)?),
            session_ms: u64_of(r.get(10)?),
            report_ms: u64_of(r.get(11)?),
        },
    ))
}

fn obs(n: NodeRow) -> NodeObs {
    NodeObs {
        role: n.role,
        pinned: n.pin,
        effective: n.effective,
        state: n.state,
        version: n.status.version,
        staged: n.staged,
        session_ms: n.session_ms,
        report_ms: n.report_ms,
    }
}

/// Performs one step of a rollout for the worker `me` holding fencing token `token`: checks
/// the lease, checks each op is in the plan (wave `wave` or the wave before, whose last step
/// may carry its `set_role`), applies the ops, stores `progress` and the final state if any.
#[allow(clippy::too_many_arguments)]
pub fn apply_step(
    conn: &mut Connection,
    id: u64,
    me: &str,
    token: u64,
    now_ms: u64,
    wave: usize,
    ops: &[Op],
    progress: &Progress,
    finish: Option<(RolloutState, Option<String>)>,
) -> Result<(), DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    lease::check(read_lease(&tx, id)?.as_ref(), me, token, now_ms)?;
    let r = get(&tx, id)?;
    if r.state != RolloutState::Running {
        return Err(DbError::Conflict(format!(
            "rollout {id} is {}",
            r.state.as_str()
        )));
    }
    let actor = format!("worker:{me}#{token}");
    for op in ops {
        if !r.plan.permits(wave, op) {
            // Never reached with a correct executor: halting is the safe answer.
            return Err(DbError::Conflict(format!(
                "operation {op:?} is not in wave {wave} of the plan"
            )));
        }
        perform(&tx, op, now_ms)?;
        super::events::record(
            &tx,
            &NewEvent {
                at_ms: now_ms,
                actor: actor.clone(),
                kind: "rollout.op",
                subject: format!("rollout/{id}"),
                detail: serde_json::json!({ "wave": wave, "op": op }),
            },
        )?;
    }
    let (state, reason) = match &finish {
        Some((s, why)) => (*s, why.clone()),
        None => (RolloutState::Running, None),
    };
    tx.execute(
        "UPDATE rollouts SET progress = ?2, state = ?3, reason = COALESCE(?4, reason), updated_ms = ?5 WHERE id = ?1",
        params![i64_of(id), serde_json::to_string(progress).unwrap_or_default(), state.as_str(), reason, i64_of(now_ms)],
    )?;
    if progress.wave != wave || finish.is_some() {
        super::events::record(
            &tx,
            &NewEvent {
                at_ms: now_ms,
                actor: actor.clone(),
                kind: "rollout.progress",
                subject: format!("rollout/{id}"),
                detail: serde_json::json!({ "progress": progress, "state": state, "reason": reason }),
            },
        )?;
    }
    if finish.is_some() {
        tx.execute("DELETE FROM leases WHERE rollout = ?1", [i64_of(id)])?;
    }
    tx.commit()?;
    Ok(())
}

fn set_pin(
    conn: &Connection,
    mac: &str,
    to: Option<&VersionRef>,
    reboot_ms: Option<u64>,
) -> Result<(), DbError> {
    conn.prepare_cached(
        "UPDATE nodes SET pin_image = ?1, pin_version = ?2, stage_image = NULL, stage_version = NULL,
         reboot_ms = COALESCE(?3, reboot_ms) WHERE mac = ?4",
    )?
    .execute(params![to.map(|v| &v.image), to.map(|v| i64_of(v.version)), reboot_ms.map(i64_of), mac])?;
    nodes::bump(conn, mac)
}

fn perform(conn: &Connection, op: &Op, now_ms: u64) -> Result<(), DbError> {
    match op {
        Op::Stage { node, to } => {
            conn.prepare_cached(
                "UPDATE nodes SET stage_image = ?1, stage_version = ?2 WHERE mac = ?3",
            )?
            .execute(params![to.image, i64_of(to.version), node])?;
            nodes::bump(conn, node)
        }
        Op::Activate { node, to } => set_pin(conn, node, Some(to), Some(now_ms)),
        Op::Rollback { node, to } => {
            set_pin(conn, node, to.as_ref(), None)?;
            // Reboot only a node not already running what it goes back to.
            if let Some(n) = nodes::get(conn, node)? {
                if n.effective.as_ref().map(|e| e.version) != n.status.version {
                    conn.execute(
                        "UPDATE nodes SET reboot_ms = ?1 WHERE mac = ?2",
                        params![i64_of(now_ms), node],
                    )?;
                }
            }
            Ok(())
        }
        Op::SetRole { role, to } => {
            conn.execute(
                "UPDATE roles SET image = ?1, version = ?2, updated_ms = ?3 WHERE name = ?4",
                params![to.image, i64_of(to.version), i64_of(now_ms), role],
            )?;
            // Nodes pinned to the role's new version follow the role again.
            conn.execute(
                "UPDATE nodes SET pin_image = NULL, pin_version = NULL WHERE role = ?1 AND pin_image = ?2 AND pin_version = ?3",
                params![role, to.image, i64_of(to.version)],
            )?;
            nodes::bump_role(conn, role)
        }
        Op::AwaitHealthy { .. } => Ok(()),
    }
}

/// Plans `spec` against the database's current fleet.
pub fn plan(
    conn: &Connection,
    spec: &RolloutSpec,
) -> Result<Result<Plan, crate::orchestrator::plan::PlanError>, DbError> {
    use crate::orchestrator::plan::{NodeFact, RoleFact};
    let roles: Vec<RoleFact> = super::roles::list(conn)?
        .into_iter()
        .map(|r| RoleFact {
            name: r.name,
            order: r.order,
            current: r.version,
        })
        .collect();
    let mut facts = Vec::new();
    let mut stmt =
        conn.prepare_cached(&format!("{} WHERE n.role = ?1", nodes::SELECT_ASSIGNMENT))?;
    let mut seen = HashMap::new();
    for t in &spec.roles {
        if seen.insert(t.role.clone(), ()).is_some() {
            continue;
        }
        for n in stmt.query_map([&t.role], obs_row)? {
            let (mac, o) = n?;
            facts.push(NodeFact {
                mac,
                role: o.role,
                pinned: o.pinned,
                effective: o.effective,
            });
        }
    }
    Ok(crate::orchestrator::plan::plan(spec, &roles, &facts))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_created_rollout_is_what_is_stored() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::Db::open(&dir.path().join("r.db")).unwrap();
        db.call_blocking(|c| {
            c.execute("INSERT INTO roles (name, image, version, rollout_order, created_ms, updated_ms) VALUES ('web', 'img', 1, 0, 0, 0)", [])?;
            for i in 0..5 {
                nodes::discover(c, &format!("52:54:00:00:00:0{i}"), "web", 1)?;
            }
            let spec: RolloutSpec = serde_json::from_value(serde_json::json!({ "roles": [{ "role": "web", "to": { "image": "img", "version": 2 } }], "batch_size": 2 })).unwrap();
            let p = plan(c, &spec)?.unwrap();
            let made = create(c, &p, "tester")?;
            assert_eq!(made.digest, p.digest(), "digested from the stored bytes");
            assert_eq!(made, get(c, made.id)?, "the returned rollout is the stored one");

            // The light rows the executor reads match the full ones.
            let status = wire::report::NodeStatus { state: wire::report::NodeState::Healthy, version: Some(3), ..Default::default() };
            let staged = Some(VersionRef { image: "img".into(), version: 2 });
            let facts = nodes::Facts { mac: "52:54:00:00:00:01".into(), report: Some((status, Default::default(), 7, 8)), staged: Some(staged), last_seen_ms: 9, layer_bytes: 0 };
            nodes::flush(c, &[facts], &[])?;
            c.execute("UPDATE nodes SET pin_image = 'img', pin_version = 2 WHERE mac = '52:54:00:00:00:02'", [])?;
            let w = world(c, &made.plan, 0)?;
            assert_eq!(w.nodes.len(), 5);
            for (mac, o) in &w.nodes {
                let full = obs(nodes::get(c, mac)?.unwrap());
                assert_eq!(format!("{o:?}"), format!("{full:?}"), "{mac}");
            }
            assert_eq!(w.nodes["52:54:00:00:00:01"].version, Some(3));
            Ok(())
        })
        .unwrap();
    }
}
