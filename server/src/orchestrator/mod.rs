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
