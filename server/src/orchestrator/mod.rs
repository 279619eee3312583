//! The orchestrator: roles carry desired state (an image version), rollouts move roles to new
//! versions in waves (canary, then batches, in role order) with health gates, only the worker
//! holding a rollout's lease acts on it, and nodes report state deltas checked against a fixed
//! state machine. DESIGN.md "Orchestration" and "Delta state"; docs/api.md.
//!
//! The planners are pure and property-tested: [`state`] (node state machine and report
//! sequencing), [`plan`] (waves and operations), [`rollout`] (the step function executing a
//! plan), [`lease`] (lease and fencing decisions). [`driver`] is the one task that runs them
//! against the database.

pub mod driver;
pub mod lease;
pub mod plan;
pub mod rollout;
pub mod state;

use serde::{Deserialize, Serialize};

/// An image version: what a role or node is assigned.
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct VersionRef {
    /// Image name.
    pub image: String,
    /// Version number.
    pub version: u64,
}

impl std::fmt::Display for VersionRef {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}@{}", self.image, self.version)
    }
}

use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use ed25519_dalek::SigningKey;
use tokio_util::sync::CancellationToken;

use crate::api::ApiState;
use crate::app::Services;
use crate::db::Db;
use crate::fleet::{Fleet, ImageSource};

/// Settings of the orchestrator's background tasks.
#[derive(Debug, Clone)]
pub struct Options {
    /// Role given to nodes nobody assigned.
    pub default_role: String,
    /// How often buffered node facts are written.
    pub flush_every: Duration,
    /// The rollout driver.
    pub driver: driver::DriverConfig,
}

impl Options {
    /// Defaults with `default_role`.
    pub fn new(default_role: impl Into<String>) -> Self {
        Options {
            default_role: default_role.into(),
            flush_every: Duration::from_millis(500),
            driver: driver::DriverConfig::default(),
        }
    }

    /// The options `strata serve` runs with: `[boot] default_role` and `[orchestrator]`.
    pub fn from_config(config: &crate::config::Config) -> Self {
        let o = &config.orchestrator;
        let mut opts = Options::new(config.boot.default_role.clone());
        opts.flush_every = Duration::from_millis(o.flush_ms);
        opts.driver.tick = Duration::from_millis(o.tick_ms);
        opts.driver.lease_ttl = Duration::from_millis(o.lease_ms);
        opts
    }
}

/// Why the orchestrator could not start.
#[derive(Debug, thiserror::Error)]
pub enum OpenError {
    /// The database.
    #[error("orchestrator database")]
    Db(#[from] crate::db::DbError),
    /// Loading the fleet.
    #[error("loading nodes")]
    Fleet(#[from] crate::fleet::FleetError),
    /// Writing the admin token file.
    #[error("writing {path}")]
    TokenFile {
        /// The file.
        path: PathBuf,
        /// Why.
        #[source]
        source: std::io::Error,
    },
}

/// The orchestrator of one server process: database, fleet, API state, driver settings.
pub struct Orchestrator {
    /// Nodes.
    pub fleet: Arc<Fleet>,
    /// API handler state.
    pub api: ApiState,
    opts: Options,
    wake: Arc<tokio::sync::Notify>,
}

/// The file `strata serve` writes the first admin token to.
pub fn admin_token_path(data_dir: &Path) -> PathBuf {
    data_dir.join("admin.token")
}

impl Orchestrator {
    /// Opens `<data_dir>/orchestrator.db`, loads the fleet, and on first start creates an
    /// admin token and writes it to `<data_dir>/admin.token` (mode 0600).
    pub async fn open(
        data_dir: &Path,
        key: SigningKey,
        images: Arc<dyn ImageSource>,
        opts: Options,
    ) -> Result<Orchestrator, OpenError> {
        let db = Db::open(&data_dir.join("orchestrator.db"))?;
        let token_path = admin_token_path(data_dir);
        let created = db
            .call(|c| {
                if crate::db::tokens::has_admin(c)? {
                    return Ok(None);
                }
                let (_, secret) = crate::db::tokens::create(
                    c,
                    crate::db::tokens::Scope::Admin,
                    None,
                    "initial admin",
                )?;
                Ok(Some(secret))
            })
            .await?;
        if let Some(secret) = created {
            write_secret(&token_path, &secret).map_err(|source| OpenError::TokenFile {
                path: token_path.clone(),
                source,
            })?;
            tracing::info!(file = %token_path.display(), "created the first admin token");
        }
        let fleet = Fleet::open(key, images, opts.default_role.clone(), db).await?;
        let wake = Arc::new(tokio::sync::Notify::new());
        Ok(Orchestrator {
            api: ApiState::new(Arc::clone(&fleet), Arc::clone(&wake)),
            fleet,
            opts,
            wake,
        })
    }

    /// The API router.
    pub fn router(&self) -> axum::Router {
        crate::api::router(self.api.clone())
    }

    /// Starts the fact flusher and the rollout driver.
    pub fn spawn(&self, services: &mut Services) {
        let fleet = Arc::clone(&self.fleet);
        let every = self.opts.flush_every;
        services.spawn("node-facts", move |token| fleet.run_flusher(every, token));
        let d = driver::Driver::new(
            Arc::clone(&self.fleet),
            self.opts.driver.clone(),
            Arc::clone(&self.wake),
        );
        services.spawn("rollouts", move |token| d.run(token));
    }

    /// Serves the API and the layer files (`/layers/{id}`, which carry the node layers' tokens)
    /// on `listener` with the background tasks until `shutdown` (for tests, benchmarks and
    /// tools that run the orchestrator without the boot services).
    pub async fn serve(
        self,
        listener: tokio::net::TcpListener,
        shutdown: CancellationToken,
    ) -> Result<(), crate::app::ServiceError> {
        let mut services = Services::new(shutdown);
        let files = crate::http::HttpState {
            public_url: String::new(),
            kernel: None,
            initramfs: None,
            cmdline: String::new(),
            tftp_root: PathBuf::new(),
            fleet: Arc::clone(&self.fleet),
            iscsi: None,
            composer: None,
        };
        let app = crate::http::router(files).merge(self.router());
        services.spawn("http", move |token| async move {
            axum::serve(listener, app)
                .with_graceful_shutdown(token.cancelled_owned())
                .await
        });
        self.spawn(&mut services);
        services.run().await
    }
}

fn write_secret(path: &Path, secret: &str) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::PermissionsExt;
    let dir = path.parent().unwrap_or(Path::new("."));
    let mut tmp = crate::store::atomic::TempFile::new_in(dir, "token")?;
    tmp.file()
        .set_permissions(std::fs::Permissions::from_mode(0o600))?;
    tmp.file().write_all(format!("{secret}\n").as_bytes())?;
    tmp.persist(path)
}
