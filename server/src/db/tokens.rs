//! API bearer tokens. A token is `stk_` followed by 64 hex digits (256 bits); only its blake3
//! hash is stored (a fast hash is right for secrets of this length: there is nothing to
//! brute-force). Scopes: `admin` (changes anything), `viewer` (reads), `node` (one node: reads
//! its own assignment, reports its own state).
//!
//! Node tokens come two ways. An operator may issue one ([`create`], random, shown once). And
//! every node has a *layer token* ([`layer_token`]): the one its node layer carries in
//! `/etc/strata/token`. Its secret is derived from the server key, the MAC and a generation
//! number (`keys::node_token`), so the server can write the same token into every rebuild of
//! the node's layer while the database still holds only its hash. A generation lives until it
//! is revoked or superseded: [`rotate`] adds the next generation, and the first request
//! authenticated with the new one revokes the older ones ([`first_use`]). A node whose layer
//! token was revoked gets the next generation in its next node layer.
//!
//! Anonymous node calls: a node "must authenticate" for good once one of its node tokens has
//! authenticated a request ([`enrolled_nodes`]); revoking or rotating its tokens does not
//! reopen anonymous reports. docs/api.md has the rules.

use rand::RngCore;
use rusqlite::{params, Connection, OptionalExtension, TransactionBehavior};
use serde::{Deserialize, Serialize};

use super::events::NewEvent;
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
    /// The generation of a node's layer token (the one its node layer carries); `None` for
    /// tokens an operator created.
    pub layer_gen: Option<u64>,
    /// Unix ms of the first request it authenticated, if any (node tokens).
    pub used_ms: Option<u64>,
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
pub fn create(
    conn: &Connection,
    scope: Scope,
    node: Option<&str>,
    name: &str,
) -> Result<(TokenInfo, String), DbError> {
    let secret = generate();
    let now = super::now_ms();
    conn.execute(
        "INSERT INTO tokens (hash, scope, node, name, created_ms) VALUES (?1, ?2, ?3, ?4, ?5)",
        params![
            hash(&secret).to_vec(),
            scope.as_str(),
            node,
            name,
            i64_of(now)
        ],
    )?;
    let id = u64_of(conn.last_insert_rowid());
    let info = TokenInfo {
        id,
        scope,
        node: node.map(str::to_owned),
        name: name.to_owned(),
        created_ms: now,
        layer_gen: None,
        used_ms: None,
    };
    Ok((info, secret))
}

const COLUMNS: &str = "id, scope, node, name, created_ms, layer_gen, used_ms";

type Raw = (
    i64,
    String,
    Option<String>,
    String,
    i64,
    Option<i64>,
    Option<i64>,
);

fn row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Raw> {
    Ok((
        r.get(0)?,
        r.get(1)?,
        r.get(2)?,
        r.get(3)?,
        r.get(4)?,
        r.get(5)?,
        r.get(6)?,
    ))
}

fn info((id, scope, node, name, created, gen, used): Raw) -> Result<TokenInfo, DbError> {
    let scope =
        Scope::parse(&scope).ok_or_else(|| DbError::Corrupt(format!("token scope {scope:?}")))?;
    Ok(TokenInfo {
        id: u64_of(id),
        scope,
        node,
        name,
        created_ms: u64_of(created),
        layer_gen: gen.map(u64_of),
        used_ms: used.map(u64_of),
    })
}

/// The live token with this secret.
pub fn lookup(conn: &Connection, secret: &str) -> Result<Option<TokenInfo>, DbError> {
    let found = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM tokens WHERE hash = ?1 AND revoked = 0"
        ))?
        .query_row([hash(secret).to_vec()], row)
        .optional()?;
    found.map(info).transpose()
}

/// Live tokens.
pub fn list(conn: &Connection) -> Result<Vec<TokenInfo>, DbError> {
    let mut stmt = conn.prepare(&format!(
        "SELECT {COLUMNS} FROM tokens WHERE revoked = 0 ORDER BY id"
    ))?;
    let rows = stmt.query_map([], row)?.collect::<Result<Vec<_>, _>>()?;
    rows.into_iter().map(info).collect()
}

/// Revokes a token. Returns its record.
pub fn revoke(conn: &Connection, id: u64) -> Result<TokenInfo, DbError> {
    let found = conn
        .query_row(
            &format!("SELECT {COLUMNS} FROM tokens WHERE id = ?1 AND revoked = 0"),
            [i64_of(id)],
            row,
        )
        .optional()?
        .ok_or_else(|| DbError::NotFound {
            kind: "token",
            id: id.to_string(),
        })?;
    conn.execute("UPDATE tokens SET revoked = 1 WHERE id = ?1", [i64_of(id)])?;
    info(found)
}

/// The newest live layer token of `mac`, if any.
fn newest_layer_token(conn: &Connection, mac: &str) -> Result<Option<TokenInfo>, DbError> {
    let found = conn
        .prepare_cached(&format!(
            "SELECT {COLUMNS} FROM tokens WHERE node = ?1 AND scope = 'node' AND layer_gen IS NOT NULL AND revoked = 0
             ORDER BY layer_gen DESC LIMIT 1"
        ))?
        .query_row([mac], row)
        .optional()?;
    found.map(info).transpose()
}

/// Inserts the next layer-token generation of `mac` (its secret is `derive(generation)`).
fn next_layer_token(
    conn: &Connection,
    mac: &str,
    derive: &dyn Fn(u64) -> String,
    actor: &str,
) -> Result<(TokenInfo, String), DbError> {
    let last: i64 = conn.query_row(
        "SELECT COALESCE(MAX(layer_gen), 0) FROM tokens WHERE node = ?1",
        [mac],
        |r| r.get(0),
    )?;
    let gen = u64_of(last) + 1;
    let secret = derive(gen);
    let now = super::now_ms();
    let name = format!("node layer {mac} #{gen}");
    conn.execute(
        "INSERT INTO tokens (hash, scope, node, name, created_ms, layer_gen) VALUES (?1, 'node', ?2, ?3, ?4, ?5)",
        params![hash(&secret).to_vec(), mac, name, i64_of(now), i64_of(gen)],
    )?;
    let id = u64_of(conn.last_insert_rowid());
    super::events::record(
        conn,
        &NewEvent::now(
            actor,
            "token.created",
            format!("node/{mac}"),
            serde_json::json!({ "id": id, "layer_gen": gen }),
        ),
    )?;
    let info = TokenInfo {
        id,
        scope: Scope::Node,
        node: Some(mac.to_owned()),
        name,
        created_ms: now,
        layer_gen: Some(gen),
        used_ms: None,
    };
    Ok((info, secret))
}

/// The token `mac`'s node layer carries: the newest live generation, or a new one if the node
/// has none (first build, or its token was revoked). `derive` gives a generation's secret
/// (`keys::node_token` under the server key). A stored generation whose hash no longer matches
/// (the server key was replaced) is revoked and replaced.
pub fn layer_token(
    conn: &mut Connection,
    mac: &str,
    derive: &dyn Fn(u64) -> String,
) -> Result<(TokenInfo, String), DbError> {
    if let Some(t) = newest_layer_token(conn, mac)? {
        let secret = derive(t.layer_gen.unwrap_or(0));
        if lookup(conn, &secret)?.is_some_and(|found| found.id == t.id) {
            return Ok((t, secret));
        }
    }
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    // Another process may have issued it meanwhile.
    if let Some(t) = newest_layer_token(&tx, mac)? {
        let secret = derive(t.layer_gen.unwrap_or(0));
        if lookup(&tx, &secret)?.is_some_and(|found| found.id == t.id) {
            return Ok((t, secret));
        }
        tracing::warn!(%mac, id = t.id, "node layer token does not match the server key: replacing it");
        tx.execute(
            "UPDATE tokens SET revoked = 1 WHERE id = ?1",
            [i64_of(t.id)],
        )?;
    }
    let out = next_layer_token(&tx, mac, derive, "server")?;
    tx.commit()?;
    Ok(out)
}

/// Adds the next layer-token generation of `mac` (a deliberate rotation). The older
/// generations keep working until the new one is first used.
pub fn rotate(
    conn: &mut Connection,
    mac: &str,
    derive: &dyn Fn(u64) -> String,
    actor: &str,
) -> Result<TokenInfo, DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let (info, _) = next_layer_token(&tx, mac, derive, actor)?;
    super::nodes::bump(&tx, mac)?;
    tx.commit()?;
    Ok(info)
}

/// What [`first_use`] changed.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct FirstUse {
    /// The token was not marked used before.
    pub marked: bool,
    /// Older layer-token generations revoked because this newer one was used.
    pub superseded: Vec<u64>,
}

/// Records that node token `id` of `mac` authenticated a request (idempotent). Using a layer
/// token revokes the node's older layer-token generations.
pub fn first_use(
    conn: &mut Connection,
    id: u64,
    mac: &str,
    now_ms: u64,
) -> Result<FirstUse, DbError> {
    let tx = conn.transaction_with_behavior(TransactionBehavior::Immediate)?;
    let marked = tx.execute(
        "UPDATE tokens SET used_ms = ?2 WHERE id = ?1 AND node = ?3 AND scope = 'node' AND revoked = 0 AND used_ms IS NULL",
        params![i64_of(id), i64_of(now_ms), mac],
    )? == 1;
    let mut out = FirstUse {
        marked,
        superseded: Vec::new(),
    };
    if !marked {
        return Ok(out);
    }
    let gen: Option<i64> = tx.query_row(
        "SELECT layer_gen FROM tokens WHERE id = ?1",
        [i64_of(id)],
        |r| r.get(0),
    )?;
    if let Some(gen) = gen {
        let mut stmt =
            tx.prepare("SELECT id FROM tokens WHERE node = ?1 AND layer_gen < ?2 AND revoked = 0")?;
        out.superseded = stmt
            .query_map(params![mac, gen], |r| r.get::<_, i64>(0))?
            .map(|r| r.map(u64_of))
            .collect::<Result<_, _>>()?;
        drop(stmt);
        tx.execute(
            "UPDATE tokens SET revoked = 1 WHERE node = ?1 AND layer_gen < ?2 AND revoked = 0",
            params![mac, gen],
        )?;
    }
    super::nodes::bump(&tx, mac)?;
    let actor = format!("node:{mac}");
    super::events::record(
        &tx,
        &NewEvent::now(
            &actor,
            "token.first_use",
            format!("token/{id}"),
            serde_json::json!({ "superseded": out.superseded }),
        ),
    )?;
    tx.commit()?;
    Ok(out)
}

/// Nodes that must authenticate: those a node token has ever authenticated a request for
/// (revoked tokens included: revocation does not reopen anonymous reports).
pub fn enrolled_nodes(conn: &Connection) -> Result<Vec<String>, DbError> {
    let mut stmt =
        conn.prepare("SELECT DISTINCT node FROM tokens WHERE scope = 'node' AND node IS NOT NULL AND used_ms IS NOT NULL")?;
    let rows = stmt
        .query_map([], |r| r.get(0))?
        .collect::<Result<Vec<String>, _>>()?;
    Ok(rows)
}

/// Whether any admin token exists.
pub fn has_admin(conn: &Connection) -> Result<bool, DbError> {
    Ok(conn.query_row(
        "SELECT EXISTS (SELECT 1 FROM tokens WHERE scope = 'admin' AND revoked = 0)",
        [],
        |r| r.get(0),
    )?)
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
            let stored: Vec<u8> = c.query_row(
                "SELECT hash FROM tokens WHERE id = ?1",
                [t.id as i64],
                |r| r.get(0),
            )?;
            assert_eq!(stored, hash(&secret).to_vec());
            let all: String = c.query_row(
                "SELECT group_concat(quote(hash) || name) FROM tokens",
                [],
                |r| r.get(0),
            )?;
            assert!(!all.contains(&secret[4..]), "the secret is not stored");
            assert_eq!(lookup(c, &secret)?.map(|i| i.id), Some(t.id));
            assert_eq!(lookup(c, "stk_00")?, None);
            assert!(enrolled_nodes(c)?.is_empty(), "not before its first use");
            assert!(first_use(c, t.id, "52:54:00:00:00:01", 5)?.marked);
            assert!(
                !first_use(c, t.id, "52:54:00:00:00:01", 6)?.marked,
                "idempotent"
            );
            assert_eq!(lookup(c, &secret)?.and_then(|i| i.used_ms), Some(5));
            assert_eq!(enrolled_nodes(c)?, vec!["52:54:00:00:00:01".to_owned()]);
            revoke(c, t.id)?;
            assert_eq!(
                enrolled_nodes(c)?,
                vec!["52:54:00:00:00:01".to_owned()],
                "revocation does not reopen anonymous calls"
            );
            assert_eq!(lookup(c, &secret)?, None);
            assert!(matches!(revoke(c, t.id), Err(DbError::NotFound { .. })));
            Ok(())
        })
        .unwrap();
    }

    #[test]
    fn layer_tokens_are_stable_rotated_and_replaced_after_revocation() {
        let dir = tempfile::tempdir().unwrap();
        let db = super::super::Db::open(&dir.path().join("t.db")).unwrap();
        db.call_blocking(|c| {
            let mac = "52:54:00:00:00:02";
            super::super::nodes::discover(c, mac, "web", 1)?;
            let derive = |gen: u64| format!("stk_{:064x}", gen + 1000);
            let (t1, s1) = layer_token(c, mac, &derive)?;
            assert_eq!((t1.layer_gen, s1.clone()), (Some(1), derive(1)));
            let stored: Vec<u8> = c.query_row(
                "SELECT hash FROM tokens WHERE id = ?1",
                [t1.id as i64],
                |r| r.get(0),
            )?;
            assert_eq!(stored, hash(&s1).to_vec(), "stored hashed");
            assert_eq!(
                layer_token(c, mac, &derive)?,
                (t1.clone(), s1.clone()),
                "stable: the same token for every rebuild"
            );

            // Rotation: the next generation goes into the layer; the old one works until the
            // new one is used, then it is revoked.
            let t2 = rotate(c, mac, &derive, "admin")?;
            assert_eq!(t2.layer_gen, Some(2));
            assert_eq!(layer_token(c, mac, &derive)?.1, derive(2));
            assert!(lookup(c, &s1)?.is_some());
            let used = first_use(c, t2.id, mac, 9)?;
            assert_eq!(
                used,
                FirstUse {
                    marked: true,
                    superseded: vec![t1.id]
                }
            );
            assert!(lookup(c, &s1)?.is_none());
            assert_eq!(enrolled_nodes(c)?, vec![mac.to_owned()]);

            // Revoked: the next layer carries the next generation.
            revoke(c, t2.id)?;
            assert_eq!(layer_token(c, mac, &derive)?.0.layer_gen, Some(3));

            // A replaced server key: the stored generation no longer matches and is replaced.
            let other = |gen: u64| format!("stk_{:064x}", gen + 5000);
            let (t4, s4) = layer_token(c, mac, &other)?;
            assert_eq!((t4.layer_gen, s4), (Some(4), other(4)));
            assert!(lookup(c, &derive(3))?.is_none());

            // A token of another node is not marked used for this one.
            assert!(!first_use(c, t4.id, "52:54:00:00:00:03", 10)?.marked);
            Ok(())
        })
        .unwrap();
    }

    #[derive(Debug, Clone)]
    enum Step {
        /// A node layer is built (the fleet asks for the token).
        Build,
        Rotate,
        /// The node authenticates with the newest live generation.
        UseNewest,
        /// The node authenticates with the oldest live generation.
        UseOldest,
        /// An operator revokes the n-th live generation.
        Revoke(usize),
    }

    fn any_step() -> impl proptest::strategy::Strategy<Value = Step> {
        use proptest::prelude::*;
        prop_oneof![
            Just(Step::Build),
            Just(Step::Rotate),
            Just(Step::UseNewest),
            Just(Step::UseOldest),
            (0usize..4).prop_map(Step::Revoke)
        ]
    }

    proptest::proptest! {
        #![proptest_config(proptest::prelude::ProptestConfig::with_cases(64))]
        /// Layer tokens against a model: generations only grow and are never reused; the node
        /// layer carries the newest live one; using a generation revokes the older ones; a
        /// revoked generation never authenticates again; once used, the node stays enrolled.
        #[test]
        fn layer_tokens_follow_the_model(steps in proptest::collection::vec(any_step(), 1..24)) {
            let dir = tempfile::tempdir().unwrap();
            let db = super::super::Db::open(&dir.path().join("m.db")).unwrap();
            let mac = "52:54:00:00:00:07";
            let derive = |gen: u64| format!("stk_{:064x}", gen * 7 + 1);
            // Model: (generation, live), and whether any was ever used.
            let mut gens: Vec<(u64, bool)> = Vec::new();
            let mut used = false;
            for step in steps {
                let live: Vec<u64> = gens.iter().filter(|g| g.1).map(|g| g.0).collect();
                let next = gens.last().map_or(1, |g| g.0 + 1);
                let use_gen = |gen: u64, gens: &mut Vec<(u64, bool)>| {
                    for g in gens.iter_mut() {
                        if g.0 < gen { g.1 = false; }
                    }
                };
                match step {
                    Step::Build => {
                        let (t, secret) = db.call_blocking(move |c| layer_token(c, mac, &derive)).unwrap();
                        let want = live.last().copied().unwrap_or(next);
                        proptest::prop_assert_eq!(t.layer_gen, Some(want));
                        proptest::prop_assert_eq!(secret, derive(want));
                        if live.is_empty() { gens.push((next, true)); }
                    }
                    Step::Rotate => {
                        let t = db.call_blocking(move |c| rotate(c, mac, &derive, "op")).unwrap();
                        proptest::prop_assert_eq!(t.layer_gen, Some(next));
                        gens.push((next, true));
                    }
                    Step::UseNewest | Step::UseOldest => {
                        let pick = if matches!(step, Step::UseNewest) { live.last() } else { live.first() };
                        let Some(&gen) = pick else { continue };
                        let info = db.call_blocking(move |c| lookup(c, &derive(gen))).unwrap();
                        proptest::prop_assert!(info.is_some(), "live generation {} authenticates", gen);
                        let id = info.map(|i| i.id).unwrap_or(0);
                        db.call_blocking(move |c| first_use(c, id, mac, 1)).unwrap();
                        use_gen(gen, &mut gens);
                        used = true;
                    }
                    Step::Revoke(n) => {
                        let Some(&gen) = live.get(n % live.len().max(1)) else { continue };
                        let id = db.call_blocking(move |c| lookup(c, &derive(gen))).unwrap().map(|i| i.id).unwrap_or(0);
                        db.call_blocking(move |c| revoke(c, id)).unwrap();
                        for g in gens.iter_mut() {
                            if g.0 == gen { g.1 = false; }
                        }
                    }
                }
                for &(gen, is_live) in &gens {
                    let found = db.call_blocking(move |c| lookup(c, &derive(gen))).unwrap();
                    proptest::prop_assert_eq!(found.is_some(), is_live, "generation {} in {:?}", gen, gens);
                }
                let enrolled = db.call_blocking(|c| enrolled_nodes(c)).unwrap();
                proptest::prop_assert_eq!(!enrolled.is_empty(), used);
            }
        }
    }
}
