//! API bearer tokens. A token is `stk_` followed by 64 hex digits (256 random bits); only its
//! blake3 hash is stored (a fast hash is right for random secrets of this length: there is
//! nothing to brute-force). Scopes: `admin` (changes anything), `viewer` (reads), `node`
//! (one node: reads its own assignment, reports its own state).

use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{i64_of, u64_of, DbError};

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Scope {
    /// Everything.
    Admin,
    /// Read everything operators see.
    Viewer,
    /// One node's own routes.
    Node,
}

impl Scope {
    fn as_str(self) -> &'static str {
        match self {
            Scope::Admin => "admin",
            Scope::Viewer => "viewer",
            Scope::Node => "node",
        }
    }
    fn parse(s: &str) -> Option<Scope> {
        match s {
            "admin" => Some(Scope::Admin),
            "viewer" => Some(Scope::Viewer),
            "node" => Some(Scope::Node),
            _ => None,
        }
    }
}

/// A token's record (never the secret).
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct TokenInfo {
    /// Id.
    pub id: u64,
    /// Scope.
    pub scope: Scope,
    /// The node (node scope).
    pub node: Option<String>,
    /// Label.
    pub name: String,
    /// Unix ms.
    pub created_ms: u64,
}

/// The stored hash of a token.
pub fn hash(token: &str) -> [u8; 32] {
    *blake3::hash(token.as_bytes()).as_bytes()
}

/// A fresh random token.
pub fn generate() -> String {
    let mut bytes = [0u8; 32];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!("stk_{}", hex::encode(bytes))
}

/// Creates a token; returns its record and the secret (shown once).
pub fn create(conn: &Connection, scope: Scope, node: Option<&str>, name: &str) -> Result<(TokenInfo, String), DbError> {
    let secret = generate();
    let now = super::now_ms();
    conn.execute(
        "INSERT INTO tokens (hash, scope, node, name, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![hash(&secret).to_vec(), scope.as_str(), node, name, i64_of(now)],
    )?;
    let id = u64_of(conn.last_insert_rowid());
    Ok((TokenInfo { id, scope, node: node.map(str::to_owned), name: name.to_owned(), created_ms: now }, secret))
}

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<(i64, String, Option<String>, String, i64)> {
    Ok((r.get(0)?, r.get(1)?, r.get(2)?, r.get(3)?, r.get(4)?))
}

fn info((id, scope, node, name, created): (i64, String, Option<String>, String, i64)) -> Result<TokenInfo, DbError> {
    let scope = Scope::parse(&scope).ok_or_else(|| DbError::Corrupt(format!("token scope {scope:?}")))?;
    Ok(TokenInfo { id: u64_of(id), scope, node, name, created_ms: u64_of(created) })
}

/// The live token with this secret.
pub fn lookup(conn: &Connection, secret: &str) -> Result<Option<TokenInfo>, DbError> {
    let found = conn
        .prepare_cached("SELECT id, scope, node, name, created_ms FROM tokens WHERE hash = ?1 AND revoked = 0")?
        .query_row([hash(secret).to_vec()], row)
        .optional()?;
    found.map(info).transpose()
}

/// Live tokens.
pub fn list(conn: &Connection) -> Result<Vec<TokenInfo>, DbError> {
    let mut stmt = conn.prepare("SELECT id, scope, node, name, created_ms FROM tokens WHERE revoked = 0 ORDER BY id")?;
    let rows = stmt.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(info).collect()
}

/// Revokes a token. Returns its record.
pub fn revoke(conn: &Connection, id: u64) -> Result<TokenInfo, DbError> {
    let found = conn
        .query_row("SELECT id, scope, node, name, created_ms FROM tokens WHERE id = ?1 AND revoked = 0", [i64_of(id)], row)
        .optional()?
        .ok_or_else(|| DbError::NotFound { kind: "token", id: id.to_string() })?;
    conn.execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [i64_of(id)])?;
    info(found)
}

/// Nodes that hold at least one live node token (they must authenticate).
pub fn enrolled_nodes(conn: &Connection) -> Result<Vec<String>, DbError> {
    let mut stmt = conn.prepare("SELECT DISTINCT node FROM tokens WHERE scope = 'node' AND revoked = 0 AND node IS NOT NULL")?;
    let rows = stmt.query_map([], |r| r.get(0))?.collect::<Result<Vec<String>, _>>()?;
    Ok(rows)
}

/// Whether any admin token exists.
pub fn has_admin(conn: &Connection) -> Result<bool, DbError> {
    Ok(conn.query_row("SELECT EXISTS (SELECT 1 FROM tokens WHERE scope = 'admin' AND revoked = 0)", [], |r| r.get(0))?)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tokens_are_stored_hashed_and_revocable() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::Db::open(&dir.path().join("t.db")).unwrap();
        db.call_blocking(|c| {
            let (t, secret) = create(c, Scope::Node, Some("52:54:00:00:00:01"), "n1")?;
            assert!(secret.starts_with("stk_") && secret.len() == 68);
            let stored: Vec<u8> = c.query_row("SELECT hash FROM tokens WHERE id = ?1", [t.id as i64], |r| r.get(0))?;
            assert_eq!(stored, hash(&secret).to_vec());
            let all: String = c.query_row("SELECT group_concat(quote(hash) || name) FROM tokens", [], |r| r.get(0))?;
            assert!(!all.contains(&secret[4..]), "the secret is not stored");
            assert_eq!(lookup(c, &secret)?.map(|i| i.id), Some(t.id));
            assert_eq!(lookup(c, "stk_00")?, None);
            assert_eq!(enrolled_nodes(c)?, vec!["52:54:00:00:00:01".to_owned()]);
            revoke(c, t.id)?;
            assert_eq!(lookup(c, &secret)?, None);
            assert!(matches!(revoke(c, t.id), Err(DbError::NotFound { .. })));
            Ok(())
        })
        .unwrap();
    }
}
