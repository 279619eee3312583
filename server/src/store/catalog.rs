//! The image catalog: a SQLite database (rusqlite) of layers, their parents, blobs (kernels),
//! images, versions, roles and node layers.
//!
//! Every change that publishes something the server may hand to a node (a new version with
//! its role layers, a node layer) is one transaction, committed after the layer files it names
//! were published: a builder killed at any point leaves either the old catalog or the new one,
//! and at worst unreferenced layer files that `gc` removes. The database runs in WAL mode with
//! `synchronous=FULL`.
//!
//! A [`Catalog`] owns its `rusqlite::Connection` and is synchronous: the [`super::Store`] keeps
//! it behind a mutex, and async callers reach it through `tokio::task::spawn_blocking` (no
//! rusqlite call on a runtime worker).

use std::collections::{BTreeSet, HashMap};
use std::path::Path;
use std::time::{SystemTime, UNIX_EPOCH};

use rusqlite::{params, Connection, OptionalExtension};
use wire::chunk::{ChunkHash, Digest, LayerId};
use wire::manifest::LayerKind;

/// Catalog errors.
#[derive(Debug, thiserror::Error)]
pub enum CatalogError {
    /// SQLite failed.
    #[error("catalog database")]
    Sqlite(#[from] rusqlite::Error),
    /// A row holds something this version of Strata cannot read.
    #[error("catalog row is corrupt: {what}")]
    Corrupt {
        /// What was wrong.
        what: String,
    },
    /// Someone else committed a version of the same image meanwhile.
    #[error("image {image}: version {version} was committed by another build meanwhile")]
    VersionRace {
        /// Image name.
        image: String,
        /// The version both builds wanted.
        version: u64,
    },
    /// The database was written by a newer Strata.
    #[error("catalog schema version {found} is newer than this build understands ({known})")]
    SchemaTooNew {
        /// Version in the file.
        found: i64,
        /// Newest version known here.
        known: i64,
    },
}

/// One published layer as the catalog records it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct LayerRecord {
    /// blake3 of the whole layer file.
    pub id: LayerId,
    /// Size of the layer file, bytes.
    pub size: u64,
    /// Virtual size of the disk the layer describes, bytes.
    pub virtual_size: u64,
    /// The layer it differences against (None for a base).
    pub parent: Option<LayerId>,
    /// Base, role or node.
    pub kind: LayerKind,
    /// Chunk size of `chunks`.
    pub chunk_size: u32,
    /// blake3 of each chunk (`wire::chunk` layout).
    pub chunks: Vec<ChunkHash>,
}

/// A kernel (or other boot file) extracted from a base and stored as a blob.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct KernelRef {
    /// blake3 of the file.
    pub id: Digest,
    /// Kernel release (`uname -r`), from the file name `vmlinuz-<release>`.
    pub release: String,
    /// Where the store keeps it.
    pub path: std::path::PathBuf,
    /// Size in bytes.
    pub size: u64,
    /// The modules node-init needs for this kernel (`build::modules`), a newc cpio blob; `None`
    /// for versions built before Strata recorded them (their nodes boot the configured
    /// kernel and initramfs).
    pub modules: Option<BlobRef>,
}

/// A stored blob.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct BlobRef {
    /// blake3 of the file.
    pub id: Digest,
    /// Where the store keeps it.
    pub path: std::path::PathBuf,
    /// Size in bytes.
    pub size: u64,
}

/// One bootable thing: an image version, optionally with one role (and site) on it.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct ImageVersion {
    /// Image name (the base recipe's `image.name`).
    pub image: String,
    /// Version number (1, 2, ...), per image.
    pub version: u64,
    /// Role, if this is a role's chain.
    pub role: Option<String>,
    /// Site the role's values came from, if any.
    pub site: Option<String>,
    /// The chain, base first.
    pub layers: Vec<LayerRecord>,
    /// The kernel the image boots with.
    pub kernel: Option<KernelRef>,
    /// Unix seconds the version was committed.
    pub created: u64,
}

/// A version's row, for listings.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct VersionInfo {
    /// Image name.
    pub image: String,
    /// Version.
    pub version: u64,
    /// Base layer.
    pub base: LayerId,
    /// Roles built on it: (role, site or "", layer).
    pub roles: Vec<RoleInfo>,
    /// Kernel blob and release.
    pub kernel: Option<(Digest, String)>,
    /// The kernel's module archive blob (node-init's modules for that release).
    pub modules: Option<Digest>,
    /// Digest of the build inputs (recipes and sources).
    pub inputs: String,
    /// The recipes, as built (TOML text, base first).
    pub recipe: String,
    /// Unix seconds.
    pub created: u64,
}

/// One role of a version.
#[derive(Debug, Clone, PartialEq, Eq, serde::Serialize)]
pub struct RoleInfo {
    /// Role name.
    pub role: String,
    /// Site ("" for the generic definition).
    pub site: String,
    /// Its layer.
    pub layer: LayerId,
    /// The role recipe as built.
    pub recipe: String,
}

/// What a build commits: one new version of an image.
#[derive(Debug, Clone)]
pub struct NewVersion {
    /// Image name.
    pub image: String,
    /// The version number the build used (latest + 1 when it started).
    pub version: u64,
    /// Base layer (already published and recorded).
    pub base: LayerId,
    /// Kernel blob and release.
    pub kernel: Option<(Digest, String)>,
    /// The kernel's module archive blob.
    pub modules: Option<Digest>,
    /// Digest of all build inputs.
    pub inputs: String,
    /// Base recipe text.
    pub recipe: String,
    /// Role layers (already published and recorded).
    pub roles: Vec<RoleInfo>,
}

/// The schema version [`SCHEMA`] plus every [`MIGRATIONS`] step gives.
const SCHEMA_VERSION: i64 = 2;

/// Steps from schema version `n` to `n + 1` (index `n - 1`), applied in order at open, each in
/// the transaction that bumps `user_version`.
const MIGRATIONS: &[&str] = &[
    // 1 → 2: the module archive recorded next to a version's kernel.
    "ALTER TABLE versions ADD COLUMN modules TEXT REFERENCES blobs(id);",
];

const SCHEMA: &str = "
CREATE TABLE layers (
    id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    virtual_size INTEGER NOT NULL,
    parent TEXT REFERENCES layers(id),
    kind TEXT NOT NULL CHECK (kind IN ('base', 'role', 'node')),
    chunk_size INTEGER NOT NULL,
    chunks BLOB NOT NULL,
    created INTEGER NOT NULL
);
CREATE TABLE blobs (
    id TEXT PRIMARY KEY,
    size INTEGER NOT NULL,
    kind TEXT NOT NULL,
    name TEXT NOT NULL
);
CREATE TABLE versions (
    image TEXT NOT NULL,
    version INTEGER NOT NULL,
    base_layer TEXT NOT NULL REFERENCES layers(id),
    kernel TEXT REFERENCES blobs(id),
    kernel_release TEXT,
    inputs TEXT NOT NULL,
    recipe TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (image, version)
);
CREATE TABLE roles (
    image TEXT NOT NULL,
    version INTEGER NOT NULL,
    role TEXT NOT NULL,
    site TEXT NOT NULL DEFAULT '',
    layer TEXT NOT NULL REFERENCES layers(id),
    recipe TEXT NOT NULL,
    PRIMARY KEY (image, version, role, site),
    FOREIGN KEY (image, version) REFERENCES versions(image, version) ON DELETE CASCADE
);
CREATE TABLE node_layers (
    node_id TEXT NOT NULL,
    role_layer TEXT NOT NULL REFERENCES layers(id),
    layer TEXT NOT NULL REFERENCES layers(id),
    facts TEXT NOT NULL,
    created INTEGER NOT NULL,
    PRIMARY KEY (node_id, role_layer)
);
CREATE INDEX roles_by_role ON roles(role, site);
";

fn now() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

fn kind_str(k: LayerKind) -> &'static str {
    match k {
        LayerKind::Base => "base",
        LayerKind::Role => "role",
        LayerKind::Node => "node",
    }
}

fn parse_kind(s: &str) -> Result<LayerKind, CatalogError> {
    match s {
        "base" => Ok(LayerKind::Base),
        "role" => Ok(LayerKind::Role),
        "node" => Ok(LayerKind::Node),
        _ => Err(CatalogError::Corrupt {
            what: format!("layer kind {s:?}"),
        }),
    }
}

fn parse_digest(s: &str) -> Result<Digest, CatalogError> {
    s.parse().map_err(|_| CatalogError::Corrupt {
        what: format!("digest {s:?}"),
    })
}

fn u64_of(v: i64, what: &str) -> Result<u64, CatalogError> {
    u64::try_from(v).map_err(|_| CatalogError::Corrupt {
        what: format!("{what} {v}"),
    })
}

fn i64_of(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

/// A `layers` row as SQLite returns it: id, size, virtual size, parent, kind, chunk size, chunks.
type LayerRow = (String, i64, i64, Option<String>, String, u32, Vec<u8>);

/// The catalog database.
#[derive(Debug)]
pub struct Catalog {
    conn: Connection,
}

impl Catalog {
    /// Opens (creating or migrating) the catalog at `path`.
    pub fn open(path: &Path) -> Result<Catalog, CatalogError> {
        let conn = Connection::open(path)?;
        conn.busy_timeout(std::time::Duration::from_secs(30))?;
        conn.pragma_update(None, "journal_mode", "WAL")?;
        conn.pragma_update(None, "synchronous", "FULL")?;
        conn.pragma_update(None, "foreign_keys", "ON")?;
        let found: i64 = conn.pragma_query_value(None, "user_version", |r| r.get(0))?;
        if found > SCHEMA_VERSION {
            return Err(CatalogError::SchemaTooNew {
                found,
                known: SCHEMA_VERSION,
            });
        }
        let mut at = found;
        if at == 0 {
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(SCHEMA)?;
            tx.pragma_update(None, "user_version", 1)?;
            tx.commit()?;
            at = 1;
        }
        while at < SCHEMA_VERSION {
            let step = usize::try_from(at - 1)
                .ok()
                .and_then(|i| MIGRATIONS.get(i))
                .ok_or_else(|| CatalogError::Corrupt {
                    what: format!("no migration from schema version {at}"),
                })?;
            let tx = conn.unchecked_transaction()?;
            tx.execute_batch(step)?;
            tx.pragma_update(None, "user_version", at + 1)?;
            tx.commit()?;
            at += 1;
        }
        Ok(Catalog { conn })
    }

    /// Checks the database file's integrity (`PRAGMA integrity_check` and foreign keys).
    pub fn check(&self) -> Result<(), CatalogError> {
        let res: String = self
            .conn
            .query_row("PRAGMA integrity_check", [], |r| r.get(0))?;
        if res != "ok" {
            return Err(CatalogError::Corrupt {
                what: format!("integrity_check: {res}"),
            });
        }
        let mut stmt = self.conn.prepare("PRAGMA foreign_key_check")?;
        let bad = stmt.query_map([], |r| r.get::<_, String>(0))?.count();
        if bad > 0 {
            return Err(CatalogError::Corrupt {
                what: format!("{bad} foreign key violations"),
            });
        }
        Ok(())
    }

    /// Records a published layer (no-op if already recorded).
    pub fn insert_layer(&self, rec: &LayerRecord) -> Result<(), CatalogError> {
        let chunks: Vec<u8> = rec.chunks.iter().flat_map(|c| c.0).collect();
        self.conn.execute(
            "INSERT OR IGNORE INTO layers (id, size, virtual_size, parent, kind, chunk_size, chunks, created)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8)",
            params![
                rec.id.to_hex(),
                i64_of(rec.size),
                i64_of(rec.virtual_size),
                rec.parent.map(|p| p.to_hex()),
                kind_str(rec.kind),
                rec.chunk_size,
                chunks,
                i64_of(now()),
            ],
        )?;
        Ok(())
    }

    fn layer_from_row(row: &rusqlite::Row<'_>) -> rusqlite::Result<LayerRow> {
        Ok((
            row.get(0)?,
            row.get(1)?,
            row.get(2)?,
            row.get(3)?,
            row.get(4)?,
            row.get(5)?,
            row.get(6)?,
        ))
    }

    fn layer_decode(raw: LayerRow) -> Result<LayerRecord, CatalogError> {
        let (id, size, vsize, parent, kind, chunk_size, chunks) = raw;
        if chunks.len() % 32 != 0 {
            return Err(CatalogError::Corrupt {
                what: format!("chunk list of layer {id}"),
            });
        }
        let chunks = chunks
            .chunks_exact(32)
            .map(|c| {
                let mut d = [0u8; 32];
                d.copy_from_slice(c);
                Digest(d)
            })
            .collect();
        Ok(LayerRecord {
            id: parse_digest(&id)?,
            size: u64_of(size, "layer size")?,
            virtual_size: u64_of(vsize, "virtual size")?,
            parent: parent.as_deref().map(parse_digest).transpose()?,
            kind: parse_kind(&kind)?,
            chunk_size,
            chunks,
        })
    }

    /// A layer's record.
    pub fn layer(&self, id: &LayerId) -> Result<Option<LayerRecord>, CatalogError> {
        let raw = self
            .conn
            .query_row(
                "SELECT id, size, virtual_size, parent, kind, chunk_size, chunks FROM layers WHERE id = ?1",
                [id.to_hex()],
                Self::layer_from_row,
            )
            .optional()?;
        raw.map(Self::layer_decode).transpose()
    }

    /// Every recorded layer.
    pub fn layers(&self) -> Result<Vec<LayerRecord>, CatalogError> {
        let mut stmt = self
            .conn
            .prepare("SELECT id, size, virtual_size, parent, kind, chunk_size, chunks FROM layers ORDER BY id")?;
        let rows = stmt
            .query_map([], Self::layer_from_row)?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter().map(Self::layer_decode).collect()
    }

    /// The chain ending at `top`, base first (follows recorded parents; depth-capped).
    pub fn chain(&self, top: &LayerId) -> Result<Vec<LayerRecord>, CatalogError> {
        let mut out = Vec::new();
        let mut next = Some(*top);
        while let Some(id) = next {
            if out.len() >= 16 {
                return Err(CatalogError::Corrupt {
                    what: format!("parent chain of {top} deeper than 16"),
                });
            }
            let rec = self.layer(&id)?.ok_or_else(|| CatalogError::Corrupt {
                what: format!("missing layer {id} in chain of {top}"),
            })?;
            next = rec.parent;
            out.push(rec);
        }
        out.reverse();
        Ok(out)
    }

    /// Records a blob (kernel, initramfs).
    pub fn insert_blob(
        &self,
        id: &Digest,
        size: u64,
        kind: &str,
        name: &str,
    ) -> Result<(), CatalogError> {
        self.conn.execute(
            "INSERT OR IGNORE INTO blobs (id, size, kind, name) VALUES (?1, ?2, ?3, ?4)",
            params![id.to_hex(), i64_of(size), kind, name],
        )?;
        Ok(())
    }

    /// A blob's kind (`kernel`, `modules`), if recorded.
    pub fn blob_kind(&self, id: &Digest) -> Result<Option<String>, CatalogError> {
        Ok(self
            .conn
            .query_row("SELECT kind FROM blobs WHERE id = ?1", [id.to_hex()], |r| {
                r.get(0)
            })
            .optional()?)
    }

    /// A blob's size, if recorded.
    pub fn blob_size(&self, id: &Digest) -> Result<Option<u64>, CatalogError> {
        let v: Option<i64> = self
            .conn
            .query_row("SELECT size FROM blobs WHERE id = ?1", [id.to_hex()], |r| {
                r.get(0)
            })
            .optional()?;
        v.map(|s| u64_of(s, "blob size")).transpose()
    }

    /// The newest version number of `image`.
    pub fn latest_version(&self, image: &str) -> Result<Option<u64>, CatalogError> {
        let v: Option<i64> = self.conn.query_row(
            "SELECT MAX(version) FROM versions WHERE image = ?1",
            [image],
            |r| r.get(0),
        )?;
        v.map(|v| u64_of(v, "version")).transpose()
    }

    /// The newest version of `image` built from exactly these inputs.
    pub fn version_by_inputs(
        &self,
        image: &str,
        inputs: &str,
    ) -> Result<Option<u64>, CatalogError> {
        let v: Option<i64> = self.conn.query_row(
            "SELECT MAX(version) FROM versions WHERE image = ?1 AND inputs = ?2",
            [image, inputs],
            |r| r.get(0),
        )?;
        v.map(|v| u64_of(v, "version")).transpose()
    }

    /// Commits a new version and its roles in one transaction. Fails with `VersionRace` if
    /// `new.version` is not the image's latest + 1 any more.
    pub fn commit_version(&mut self, new: &NewVersion) -> Result<(), CatalogError> {
        let tx = self
            .conn
            .transaction_with_behavior(rusqlite::TransactionBehavior::Immediate)?;
        let latest: Option<i64> = tx.query_row(
            "SELECT MAX(version) FROM versions WHERE image = ?1",
            [&new.image],
            |r| r.get(0),
        )?;
        let expected = latest.map_or(1, |l| l.saturating_add(1));
        if expected != i64_of(new.version) {
            return Err(CatalogError::VersionRace {
                image: new.image.clone(),
                version: new.version,
            });
        }
        tx.execute(
            "INSERT INTO versions (image, version, base_layer, kernel, kernel_release, inputs, recipe, created, modules)
             VALUES (?1, ?2, ?3, ?4, ?5, ?6, ?7, ?8, ?9)",
            params![
                new.image,
                i64_of(new.version),
                new.base.to_hex(),
                new.kernel.as_ref().map(|k| k.0.to_hex()),
                new.kernel.as_ref().map(|k| k.1.clone()),
                new.inputs,
                new.recipe,
                i64_of(now()),
                new.modules.as_ref().map(|m| m.to_hex()),
            ],
        )?;
        for r in &new.roles {
            tx.execute(
                "INSERT INTO roles (image, version, role, site, layer, recipe) VALUES (?1, ?2, ?3, ?4, ?5, ?6)",
                params![new.image, i64_of(new.version), r.role, r.site, r.layer.to_hex(), r.recipe],
            )?;
        }
        tx.commit()?;
        Ok(())
    }

    /// All versions, newest first within each image (images by name).
    pub fn versions(&self, image: Option<&str>) -> Result<Vec<VersionInfo>, CatalogError> {
        let mut stmt = self.conn.prepare(
            "SELECT image, version, base_layer, kernel, kernel_release, inputs, recipe, created, modules FROM versions
             WHERE (?1 IS NULL OR image = ?1) ORDER BY image, version DESC",
        )?;
        let rows = stmt
            .query_map([image], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, i64>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, Option<String>>(3)?,
                    r.get::<_, Option<String>>(4)?,
                    r.get::<_, String>(5)?,
                    r.get::<_, String>(6)?,
                    r.get::<_, i64>(7)?,
                    r.get::<_, Option<String>>(8)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        let mut out = Vec::with_capacity(rows.len());
        for (image, version, base, kernel, release, inputs, recipe, created, modules) in rows {
            let kernel = match (kernel, release) {
                (Some(k), Some(r)) => Some((parse_digest(&k)?, r)),
                _ => None,
            };
            let roles = self.roles_of(&image, version)?;
            out.push(VersionInfo {
                image,
                version: u64_of(version, "version")?,
                base: parse_digest(&base)?,
                roles,
                kernel,
                modules: modules.as_deref().map(parse_digest).transpose()?,
                inputs,
                recipe,
                created: u64_of(created, "created")?,
            });
        }
        Ok(out)
    }

    fn roles_of(&self, image: &str, version: i64) -> Result<Vec<RoleInfo>, CatalogError> {
        let mut stmt = self.conn.prepare(
            "SELECT role, site, layer, recipe FROM roles WHERE image = ?1 AND version = ?2 ORDER BY role, site",
        )?;
        let rows = stmt
            .query_map(params![image, version], |r| {
                Ok((
                    r.get::<_, String>(0)?,
                    r.get::<_, String>(1)?,
                    r.get::<_, String>(2)?,
                    r.get::<_, String>(3)?,
                ))
            })?
            .collect::<Result<Vec<_>, _>>()?;
        rows.into_iter()
            .map(|(role, site, layer, recipe)| {
                Ok(RoleInfo {
                    role,
                    site,
                    layer: parse_digest(&layer)?,
                    recipe,
                })
            })
            .collect()
    }

    /// One version's info.
    pub fn version(&self, image: &str, version: u64) -> Result<Option<VersionInfo>, CatalogError> {
        Ok(self
            .versions(Some(image))?
            .into_iter()
            .find(|v| v.version == version))
    }

    /// The newest (image, version) that has `role` for `site` ("" = generic), most recently
    /// committed first.
    pub fn find_role(
        &self,
        role: &str,
        site: &str,
    ) -> Result<Option<(String, u64, LayerId)>, CatalogError> {
        let row: Option<(String, i64, String)> = self
            .conn
            .query_row(
                "SELECT r.image, r.version, r.layer FROM roles r JOIN versions v
                   ON v.image = r.image AND v.version = r.version
                 WHERE r.role = ?1 AND r.site = ?2 ORDER BY v.created DESC, r.version DESC LIMIT 1",
                [role, site],
                |r| Ok((r.get(0)?, r.get(1)?, r.get(2)?)),
            )
            .optional()?;
        row.map(|(i, v, l)| Ok((i, u64_of(v, "version")?, parse_digest(&l)?)))
            .transpose()
    }

    /// Removes a version (and its roles) from the catalog. Layers stay until `gc`.
    pub fn remove_version(&mut self, image: &str, version: u64) -> Result<bool, CatalogError> {
        let tx = self.conn.transaction()?;
        tx.execute(
            "DELETE FROM roles WHERE image = ?1 AND version = ?2",
            params![image, i64_of(version)],
        )?;
        let n = tx.execute(
            "DELETE FROM versions WHERE image = ?1 AND version = ?2",
            params![image, i64_of(version)],
        )?;
        tx.commit()?;
        Ok(n > 0)
    }

    /// Records a node's layer on a role layer (replacing the node's previous one on that role).
    pub fn record_node_layer(
        &self,
        node_id: &str,
        role_layer: &LayerId,
        layer: &LayerId,
        facts: &str,
    ) -> Result<(), CatalogError> {
        self.conn.execute(
            "INSERT OR REPLACE INTO node_layers (node_id, role_layer, layer, facts, created) VALUES (?1, ?2, ?3, ?4, ?5)",
            params![node_id, role_layer.to_hex(), layer.to_hex(), facts, i64_of(now())],
        )?;
        Ok(())
    }

    /// Inserts node layers and records each as its node's layer on a role layer, all in one
    /// transaction: (layer, node id, role layer, facts digest).
    pub fn insert_node_layers(
        &self,
        rows: &[(&LayerRecord, &str, &LayerId, &str)],
    ) -> Result<(), CatalogError> {
        let tx = self.conn.unchecked_transaction()?;
        for (rec, node_id, role_layer, facts) in rows {
            self.insert_layer(rec)?;
            self.record_node_layer(node_id, role_layer, &rec.id, facts)?;
        }
        tx.commit()?;
        Ok(())
    }

    /// A node's layer on `role_layer`, with the facts digest it was built from.
    pub fn node_layer(
        &self,
        node_id: &str,
        role_layer: &LayerId,
    ) -> Result<Option<(LayerId, String)>, CatalogError> {
        let row: Option<(String, String)> = self
            .conn
            .query_row(
                "SELECT layer, facts FROM node_layers WHERE node_id = ?1 AND role_layer = ?2",
                [node_id, &role_layer.to_hex()],
                |r| Ok((r.get(0)?, r.get(1)?)),
            )
            .optional()?;
        row.map(|(l, f)| Ok((parse_digest(&l)?, f))).transpose()
    }

    /// Drops node layers whose role layer no version references any more (their nodes must get
    /// new ones built on the current role). Returns how many rows went.
    pub fn prune_node_layers(&self) -> Result<usize, CatalogError> {
        Ok(self.conn.execute(
            "DELETE FROM node_layers WHERE role_layer NOT IN (SELECT layer FROM roles)",
            [],
        )?)
    }

    /// Every layer something references: versions' bases, roles, node layers, and the parents
    /// of all of these; plus every referenced kernel and module archive blob.
    pub fn referenced(&self) -> Result<(BTreeSet<LayerId>, BTreeSet<Digest>), CatalogError> {
        let mut roots = Vec::new();
        for sql in [
            "SELECT base_layer FROM versions",
            "SELECT layer FROM roles",
            "SELECT layer FROM node_layers WHERE role_layer IN (SELECT layer FROM roles)",
        ] {
            let mut stmt = self.conn.prepare(sql)?;
            for id in stmt.query_map([], |r| r.get::<_, String>(0))? {
                roots.push(parse_digest(&id?)?);
            }
        }
        let parents: HashMap<LayerId, Option<LayerId>> = self
            .layers()?
            .into_iter()
            .map(|l| (l.id, l.parent))
            .collect();
        let mut layers = BTreeSet::new();
        for root in roots {
            let mut next = Some(root);
            while let Some(id) = next {
                if !layers.insert(id) {
                    break;
                }
                next = parents.get(&id).copied().flatten();
            }
        }
        let mut blobs = BTreeSet::new();
        for sql in [
            "SELECT kernel FROM versions WHERE kernel IS NOT NULL",
            "SELECT modules FROM versions WHERE modules IS NOT NULL",
        ] {
            let mut stmt = self.conn.prepare(sql)?;
            for id in stmt.query_map([], |r| r.get::<_, String>(0))? {
                blobs.insert(parse_digest(&id?)?);
            }
        }
        Ok((layers, blobs))
    }

    /// Forgets a layer (after gc removed its file). Node-layer rows naming it go too.
    pub fn delete_layer(&self, id: &LayerId) -> Result<(), CatalogError> {
        let tx = self.conn.unchecked_transaction()?;
        tx.execute(
            "DELETE FROM node_layers WHERE layer = ?1 OR role_layer = ?1",
            [id.to_hex()],
        )?;
        tx.execute("DELETE FROM layers WHERE id = ?1", [id.to_hex()])?;
        tx.commit()?;
        Ok(())
    }

    /// Forgets a blob.
    pub fn delete_blob(&self, id: &Digest) -> Result<(), CatalogError> {
        self.conn
            .execute("DELETE FROM blobs WHERE id = ?1", [id.to_hex()])?;
        Ok(())
    }

    /// Every recorded blob id.
    pub fn blobs(&self) -> Result<Vec<Digest>, CatalogError> {
        let mut stmt = self.conn.prepare("SELECT id FROM blobs ORDER BY id")?;
        let ids = stmt
            .query_map([], |r| r.get::<_, String>(0))?
            .collect::<Result<Vec<_>, _>>()?;
        ids.iter().map(|s| parse_digest(s)).collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A catalog written by schema version 1 (before module archives) opens, migrates to the
    /// current version, keeps its rows (no module archive recorded for them) and takes new
    /// versions that record one.
    #[test]
    fn version_1_catalogs_migrate() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("catalog.sqlite3");
        let kernel = blake3::hash(b"kernel");
        let base = blake3::hash(b"base");
        {
            let conn = Connection::open(&path).unwrap();
            conn.execute_batch(SCHEMA).unwrap();
            conn.pragma_update(None, "user_version", 1).unwrap();
            conn.execute(
                "INSERT INTO layers (id, size, virtual_size, parent, kind, chunk_size, chunks, created)
                 VALUES (?1, 1, 1, NULL, 'base', 1, x'', 0)",
                [base.to_hex().to_string()],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO blobs (id, size, kind, name) VALUES (?1, 6, 'kernel', 'vmlinuz-1')",
                [kernel.to_hex().to_string()],
            )
            .unwrap();
            conn.execute(
                "INSERT INTO versions (image, version, base_layer, kernel, kernel_release, inputs, recipe, created)
                 VALUES ('img', 1, ?1, ?2, '1', 'in', 'r', 0)",
                [base.to_hex().to_string(), kernel.to_hex().to_string()],
            )
            .unwrap();
        }
        let mut cat = Catalog::open(&path).unwrap();
        let found: i64 = cat
            .conn
            .pragma_query_value(None, "user_version", |r| r.get(0))
            .unwrap();
        assert_eq!(found, SCHEMA_VERSION);
        cat.check().unwrap();
        let v1 = cat.version("img", 1).unwrap().unwrap();
        assert_eq!(v1.kernel, Some((Digest::from(kernel), "1".into())));
        assert_eq!(v1.modules, None);
        let modules = blake3::hash(b"modules");
        cat.insert_blob(&Digest::from(modules), 7, "modules", "m")
            .unwrap();
        cat.commit_version(&NewVersion {
            image: "img".into(),
            version: 2,
            base: Digest::from(base),
            kernel: v1.kernel.clone(),
            modules: Some(Digest::from(modules)),
            inputs: "in2".into(),
            recipe: "r".into(),
            roles: Vec::new(),
        })
        .unwrap();
        let v2 = cat.version("img", 2).unwrap().unwrap();
        assert_eq!(v2.modules, Some(Digest::from(modules)));
        let (_, blobs) = cat.referenced().unwrap();
        assert!(blobs.contains(&Digest::from(modules)));
        assert_eq!(
            cat.blob_kind(&Digest::from(modules)).unwrap().as_deref(),
            Some("modules")
        );
        drop(cat);
        // Opening again migrates nothing more.
        Catalog::open(&path).unwrap().check().unwrap();
    }
}
