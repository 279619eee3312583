//! Roles (desired state: the image version a role runs, and its rollout order) and sites
//! (overrides on generic roles: a site may pin a role to another version).

use rusqlite::{params, Connection, OptionalExtension};
use serde::{Deserialize, Serialize};

use super::{i64_of, u64_of, DbError};
use crate::orchestrator::VersionRef;

/// A role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Role {
    /// Name.
    pub name: String,
    /// The version its nodes run (none: the newest image the store has for the role).
    pub version: Option<VersionRef>,
    /// Rollout order: lower goes first.
    pub order: i64,
    /// Unix ms.
    pub created_ms: u64,
    /// Unix ms.
    pub updated_ms: u64,
}

fn version_of(image: Option<String>, version: Option<i64>) -> Option<VersionRef> {
    match (image, version) {
        (Some(image), Some(v)) => Some(VersionRef {
            image,
            version: u64_of(v),
        }),
        _ => None,
    }
}

fn role_row(r: &rusqlite::Row<'_>) -> rusqlite::Result<Role> {
    Ok(Role {
        name: r.get(0)?,
        version: version_of(r.get(1)?, r.get(2)?),
        order: r.get(3)?,
        created_ms: u64_of(r.get(4)?),
        updated_ms: u64_of(r.get(5)?),
    })
}

/// All roles, in rollout order.
pub fn list(conn: &Connection) -> Result<Vec<Role>, DbError> {
    let mut stmt = conn.prepare_cached(
        "SELECT name, image, version, rollout_order, created_ms, updated_ms FROM roles ORDER BY rollout_order, name",
    )?;
    let rows = stmt
        .query_map([], role_row)?
        .collect::<Result<Vec<_>, _>>()?;
    Ok(rows)
}

/// One role.
pub fn get(conn: &Connection, name: &str) -> Result<Option<Role>, DbError> {
    Ok(conn
        .prepare_cached("SELECT name, image, version, rollout_order, created_ms, updated_ms FROM roles WHERE name = ?1")?
        .query_row([name], role_row)
        .optional()?)
}

/// Creates or replaces a role's definition. Refused while a rollout of the role is active.
pub fn put(
    conn: &Connection,
    name: &str,
    version: Option<&VersionRef>,
    order: i64,
) -> Result<Role, DbError> {
    if super::rollouts::role_busy(conn, name)? {
        return Err(DbError::Conflict(format!(
            "role {name:?} is being rolled out; pause or abort the rollout first"
        )));
    }
    let now = i64_of(super::now_ms());
    conn.execute(
        "INSERT INTO roles (name, image, version, rollout_order, created_ms, updated_ms) VALUES (?1, ?2, ?3, ?4, ?5, ?5)
         ON CONFLICT (name) DO UPDATE SET image = ?2, version = ?3, rollout_order = ?4, updated_ms = ?5",
        params![name, version.map(|v| &v.image), version.map(|v| i64_of(v.version)), order, now],
    )?;
    super::nodes::bump_role(conn, name)?;
    get(conn, name)?.ok_or_else(|| DbError::NotFound {
        kind: "role",
        id: name.to_owned(),
    })
}

/// Deletes a role no node uses.
pub fn delete(conn: &Connection, name: &str) -> Result<(), DbError> {
    let used: i64 = conn.query_row("SELECT COUNT(*) FROM nodes WHERE role = ?1", [name], |r| {
        r.get(0)
    })?;
    if used > 0 {
        return Err(DbError::Conflict(format!(
            "role {name:?} has {used} node(s)"
        )));
    }
    if conn.execute("DELETE FROM roles WHERE name = ?1", [name])? == 0 {
        return Err(DbError::NotFound {
            kind: "role",
            id: name.to_owned(),
        });
    }
    Ok(())
}

/// A site's override of one role.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Override {
    /// Role.
    pub role: String,
    /// The version the role runs at this site.
    pub version: VersionRef,
}

/// A site.
#[derive(Debug, Clone, PartialEq, Eq, Serialize)]
pub struct Site {
    /// Name.
    pub name: String,
    /// Free text.
    pub description: String,
    /// Overrides on generic roles.
    pub overrides: Vec<Override>,
}

/// All sites.
pub fn sites(conn: &Connection) -> Result<Vec<Site>, DbError> {
    let names: Vec<(String, String)> = conn
        .prepare("SELECT name, description FROM sites ORDER BY name")?
        .query_map([], |r| Ok((r.get(0)?, r.get(1)?)))?
        .collect::<Result<_, _>>()?;
    names
        .into_iter()
        .map(|(name, description)| {
            Ok(Site {
                overrides: overrides(conn, &name)?,
                name,
                description,
            })
        })
        .collect()
}

fn overrides(conn: &Connection, site: &str) -> Result<Vec<Override>, DbError> {
    let rows = conn
        .prepare_cached(
            "SELECT role, image, version FROM site_overrides WHERE site = ?1 ORDER BY role",
        )?
        .query_map([site], |r| {
            Ok(Override {
                role: r.get(0)?,
                version: VersionRef {
                    image: r.get(1)?,
                    version: u64_of(r.get(2)?),
                },
            })
        })?
        .collect::<Result<_, _>>()?;
    Ok(rows)
}

/// One site.
pub fn site(conn: &Connection, name: &str) -> Result<Option<Site>, DbError> {
    let desc: Option<String> = conn
        .query_row(
            "SELECT description FROM sites WHERE name = ?1",
            [name],
            |r| r.get(0),
        )
        .optional()?;
    desc.map(|description| {
        Ok(Site {
            name: name.to_owned(),
            description,
            overrides: overrides(conn, name)?,
        })
    })
    .transpose()
}

/// Creates or replaces a site and its overrides (one transaction).
pub fn put_site(
    conn: &mut Connection,
    name: &str,
    description: &str,
    ovr: &[Override],
) -> Result<Site, DbError> {
    let tx = conn.transaction()?;
    for o in ovr {
        if super::rollouts::role_busy(&tx, &o.role)? {
            return Err(DbError::Conflict(format!(
                "role {:?} is being rolled out",
                o.role
            )));
        }
    }
    tx.execute(
        "INSERT INTO sites (name, description) VALUES (?1, ?2) ON CONFLICT (name) DO UPDATE SET description = ?2",
        params![name, description],
    )?;
    tx.execute("DELETE FROM site_overrides WHERE site = ?1", [name])?;
    for o in ovr {
        tx.execute(
            "INSERT INTO site_overrides (site, role, image, version) VALUES (?1, ?2, ?3, ?4)",
            params![name, o.role, o.version.image, i64_of(o.version.version)],
        )?;
    }
    tx.execute(
        "UPDATE nodes SET rev = (SELECT COALESCE(MAX(rev), 0) + 1 FROM nodes) WHERE site = ?1",
        [name],
    )?;
    tx.commit()?;
    site(conn, name)?.ok_or_else(|| DbError::NotFound {
        kind: "site",
        id: name.to_owned(),
    })
}

/// Deletes a site no node is in.
pub fn delete_site(conn: &Connection, name: &str) -> Result<(), DbError> {
    let used: i64 = conn.query_row("SELECT COUNT(*) FROM nodes WHERE site = ?1", [name], |r| {
        r.get(0)
    })?;
    if used > 0 {
        return Err(DbError::Conflict(format!(
            "site {name:?} has {used} node(s)"
        )));
    }
    if conn.execute("DELETE FROM sites WHERE name = ?1", [name])? == 0 {
        return Err(DbError::NotFound {
            kind: "site",
            id: name.to_owned(),
        });
    }
    Ok(())
}
