//! Schema and migrations (`PRAGMA user_version`).

use rusqlite::Connection;

use super::DbError;

const MIGRATIONS: &[&str] = &[
    r#"
CREATE TABLE nodes (
    mac TEXT PRIMARY KEY,
    name TEXT NOT NULL UNIQUE,
    role TEXT NOT NULL,
    site TEXT,
    pin_image TEXT,
    pin_version INTEGER,
    stage_image TEXT,
    stage_version INTEGER,
    staged_image TEXT,
    staged_version INTEGER,
    reboot_ms INTEGER,
    state TEXT NOT NULL DEFAULT 'unknown',
    status TEXT NOT NULL DEFAULT '{}',
    applied_seq INTEGER NOT NULL DEFAULT 0,
    digest BLOB,
    session_ms INTEGER NOT NULL DEFAULT 0,
    report_ms INTEGER NOT NULL DEFAULT 0,
    first_seen_ms INTEGER NOT NULL,
    last_seen_ms INTEGER NOT NULL,
    layer_bytes INTEGER NOT NULL DEFAULT 0,
    drifted INTEGER NOT NULL DEFAULT 0,
    rev INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX nodes_role ON nodes(role);
CREATE INDEX nodes_rev ON nodes(rev);
CREATE TABLE roles (
    name TEXT PRIMARY KEY,
    image TEXT,
    version INTEGER,
    rollout_order INTEGER NOT NULL DEFAULT 0,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE sites (
    name TEXT PRIMARY KEY,
    description TEXT NOT NULL DEFAULT ''
);
CREATE TABLE site_overrides (
    site TEXT NOT NULL REFERENCES sites(name) ON DELETE CASCADE,
    role TEXT NOT NULL,
    image TEXT NOT NULL,
    version INTEGER NOT NULL,
    PRIMARY KEY (site, role)
);
CREATE TABLE tokens (
    id INTEGER PRIMARY KEY,
    hash BLOB NOT NULL UNIQUE,
    scope TEXT NOT NULL,
    node TEXT,
    name TEXT NOT NULL,
    created_ms INTEGER NOT NULL,
    revoked INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX tokens_node ON tokens(node);
CREATE TABLE rollouts (
    id INTEGER PRIMARY KEY,
    state TEXT NOT NULL,
    spec TEXT NOT NULL,
    plan TEXT NOT NULL,
    digest TEXT NOT NULL,
    progress TEXT NOT NULL,
    abort INTEGER NOT NULL DEFAULT 0,
    reason TEXT,
    created_by TEXT NOT NULL,
    approved_by TEXT,
    created_ms INTEGER NOT NULL,
    updated_ms INTEGER NOT NULL
);
CREATE TABLE leases (
    rollout INTEGER PRIMARY KEY REFERENCES rollouts(id) ON DELETE CASCADE,
    holder TEXT NOT NULL,
    token INTEGER NOT NULL,
    expires_ms INTEGER NOT NULL
);
CREATE TABLE events (
    id INTEGER PRIMARY KEY,
    at_ms INTEGER NOT NULL,
    actor TEXT NOT NULL,
    kind TEXT NOT NULL,
    subject TEXT NOT NULL,
    detail TEXT NOT NULL
);
CREATE INDEX events_subject ON events(subject);
"#,
    r#"
-- Node layer tokens (db::tokens::layer_token) and first use (anonymous node calls stop).
ALTER TABLE tokens ADD COLUMN layer_gen INTEGER;
ALTER TABLE tokens ADD COLUMN used_ms INTEGER;
CREATE UNIQUE INDEX tokens_layer_gen ON tokens(node, layer_gen) WHERE layer_gen IS NOT NULL;
-- Node tokens issued before: they locked anonymous calls out at once, as they still do.
UPDATE tokens SET used_ms = created_ms WHERE scope = 'node';
"#,
];

/// Brings the schema up to date.
pub(super) fn migrate(conn: &mut Connection) -> Result<(), DbError> {
    let found: i64 = conn.query_row("PRAGMA user_version", [], |r| r.get(0))?;
    let known = MIGRATIONS.len() as i64;
    if found > known {
        return Err(DbError::SchemaTooNew { found, known });
    }
    for (i, sql) in MIGRATIONS
        .iter()
        .enumerate()
        .skip(usize::try_from(found).unwrap_or(0))
    {
        let tx = conn.transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        // Another process may have migrated meanwhile.
        let now: i64 = tx.query_row("PRAGMA user_version", [], |r| r.get(0))?;
        if now > i as i64 {
            continue;
        }
        tx.execute_batch(sql)?;
        tx.pragma_update(None, "user_version", i as i64 + 1)?;
        tx.commit()?;
    }
    Ok(())
}
