//! The rollout driver: one task per server process. Every tick it takes (or renews) the lease
//! of each running rollout, builds the world from the database, asks [`rollout::next`] what
//! to do and writes the step with its fencing token ([`crate::db::rollouts::apply_step`]). A
//! worker whose lease expired or was taken over gets `LeaseError::Lost` on its next write and
//! stops acting on that rollout; a second process sharing the database takes over a dead
//! worker's rollout once its lease expires, and never acts on one whose lease is live.

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use tokio::sync::Notify;
use tokio_util::sync::CancellationToken;

use super::rollout::{self, RolloutState, Step};
use crate::db::{now_ms, Db, DbError};
use crate::fleet::Fleet;

/// Driver settings.
#[derive(Debug, Clone)]
pub struct DriverConfig {
    /// How often to step rollouts.
    pub tick: Duration,
    /// Lease lifetime (renewed every tick).
    pub lease_ttl: Duration,
    /// This worker's id.
    pub worker: String,
}

impl Default for DriverConfig {
    fn default() -> Self {
        DriverConfig {
            tick: Duration::from_secs(1),
            lease_ttl: Duration::from_secs(15),
            worker: worker_id(),
        }
    }
}

/// A worker id unique to this process: `<host>:<pid>:<random>`.
pub fn worker_id() -> String {
    let host = std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|h| h.trim().to_owned())
        .unwrap_or_else(|_| "host".into());
    format!(
        "{host}:{}:{:08x}",
        std::process::id(),
        rand::random::<u32>()
    )
}

/// The driver.
pub struct Driver {
    db: Db,
    fleet: Arc<Fleet>,
    cfg: DriverConfig,
    wake: Arc<Notify>,
    held: HashMap<u64, u64>,
}

impl Driver {
    /// A driver over `fleet`'s database.
    pub fn new(fleet: Arc<Fleet>, cfg: DriverConfig, wake: Arc<Notify>) -> Self {
        Driver {
            db: fleet.db().clone(),
            fleet,
            cfg,
            wake,
            held: HashMap::new(),
        }
    }

    /// Runs until `shutdown`, then gives its leases up.
    pub async fn run(mut self, shutdown: CancellationToken) -> Result<(), DbError> {
        tracing::info!(worker = %self.cfg.worker, "rollout driver started");
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(self.cfg.tick) => {}
                _ = self.wake.notified() => {}
            }
            if let Err(e) = self.tick().await {
                tracing::error!(error = %e, "rollout driver tick");
            }
        }
        for (id, token) in std::mem::take(&mut self.held) {
            let me = self.cfg.worker.clone();
            let _ = self
                .db
                .call(move |c| crate::db::rollouts::release(c, id, &me, token, now_ms()))
                .await;
        }
        Ok(())
    }

    /// One pass over the active rollouts.
    pub async fn tick(&mut self) -> Result<(), DbError> {
        let active = self.db.call(|c| crate::db::rollouts::list(c, true)).await?;
        self.held.retain(|id, _| active.iter().any(|r| r.id == *id));
        let ttl = u64::try_from(self.cfg.lease_ttl.as_millis()).unwrap_or(u64::MAX);
        for r in active {
            let id = r.id;
            let me = self.cfg.worker.clone();
            let token = match self.held.get(&id).copied() {
                Some(t) => {
                    let m = me.clone();
                    match self
                        .db
                        .call(move |c| crate::db::rollouts::heartbeat(c, id, &m, t, now_ms(), ttl))
                        .await
                    {
                        Ok(_) => t,
                        Err(DbError::Lease(e)) => {
                            tracing::warn!(rollout = id, error = %e, "lease lost; no longer acting on this rollout");
                            self.held.remove(&id);
                            continue;
                        }
                        Err(e) => return Err(e),
                    }
                }
                None => {
                    let m = me.clone();
                    match self
                        .db
                        .call(move |c| crate::db::rollouts::acquire(c, id, &m, now_ms(), ttl))
                        .await
                    {
                        Ok(l) => {
                            tracing::info!(rollout = id, token = l.token, "driving rollout");
                            self.held.insert(id, l.token);
                            l.token
                        }
                        Err(DbError::Lease(_)) => continue,
                        Err(e) => return Err(e),
                    }
                }
            };
            if r.state != RolloutState::Running {
                continue;
            }
            let plan = r.plan.clone();
            let wave = r.progress.wave;
            let world = self
                .db
                .call(move |c| crate::db::rollouts::world(c, &plan, wave))
                .await?;
            let now = now_ms();
            match rollout::next(&r.plan, &r.progress, &world, now, r.abort_requested) {
                Step::Wait => {}
                Step::Do {
                    ops,
                    progress,
                    finish,
                } => {
                    if let Some((state, why)) = &finish {
                        tracing::info!(
                            rollout = id,
                            state = state.as_str(),
                            reason = why.as_deref().unwrap_or(""),
                            "rollout finished"
                        );
                    }
                    let m = me.clone();
                    let done = finish.is_some();
                    let res = self
                        .db
                        .call(move |c| {
                            crate::db::rollouts::apply_step(
                                c, id, &m, token, now, wave, &ops, &progress, finish,
                            )
                        })
                        .await;
                    match res {
                        Ok(()) => {
                            if done {
                                self.held.remove(&id);
                            }
                            self.fleet
                                .flush()
                                .await
                                .map_err(|e| DbError::Conflict(e.to_string()))?;
                        }
                        Err(DbError::Lease(e)) => {
                            tracing::warn!(rollout = id, error = %e, "fenced off: another worker holds the rollout");
                            self.held.remove(&id);
                        }
                        Err(e) => return Err(e),
                    }
                }
            }
        }
        Ok(())
    }
}
