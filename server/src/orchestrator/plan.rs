//! The rollout planner: from a spec (roles and their target versions, canary size, batch size,
//! maximum unavailable) and a snapshot of the fleet, the exact waves, nodes and operations.
//! Pure and deterministic: the same inputs give the same plan and the same digest, which the
//! operator quotes to approve it.
//!
//! Shape: roles in rollout order (lower `order` first, then name); per role a canary wave,
//! then batches of `batch_size`. Within a wave every node stages the new version in the
//! background, then nodes activate (reboot) in groups of at most `max_unavailable`, each group
//! waiting for health before the next. The plan also lists each wave's rollback: the node goes
//! back to the assignment it had before the rollout.

use serde::{Deserialize, Serialize};

use super::VersionRef;

/// Largest number of nodes one plan may cover.
pub const MAX_PLAN_NODES: usize = 1_000_000;

/// What an operator asks for (`POST /api/v1/rollouts`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolloutSpec {
    /// The roles to move and the version each goes to.
    pub roles: Vec<RoleTarget>,
    /// Nodes in each role's canary wave (0: no canary).
    #[serde(default = "one")]
    pub canary: usize,
    /// Nodes per batch after the canary.
    #[serde(default = "ten")]
    pub batch_size: usize,
    /// Most nodes of a wave rebooting at once.
    #[serde(default = "one")]
    pub max_unavailable: usize,
    /// Seconds a group gets to report healthy after activation.
    #[serde(default = "health_timeout")]
    pub health_timeout_secs: u64,
    /// Seconds a wave gets to stage (download) the new version.
    #[serde(default = "stage_timeout")]
    pub stage_timeout_secs: u64,
}

fn one() -> usize {
    1
}
fn ten() -> usize {
    10
}
fn health_timeout() -> u64 {
    600
}
fn stage_timeout() -> u64 {
    3600
}

/// One role's target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RoleTarget {
    /// Role name.
    pub role: String,
    /// Image version it goes to.
    pub to: VersionRef,
}

/// A role as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RoleFact {
    /// Name.
    pub name: String,
    /// Rollout order (lower first).
    pub order: i64,
    /// The version its nodes run now (its desired state).
    pub current: Option<VersionRef>,
}

/// A node as the planner sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeFact {
    /// MAC.
    pub mac: String,
    /// Role.
    pub role: String,
    /// An explicit assignment overriding the role's version, if any.
    pub pinned: Option<VersionRef>,
    /// The version it is assigned now (pin, site override or role).
    pub effective: Option<VersionRef>,
}

/// Why a spec cannot be planned.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum PlanError {
    /// No roles.
    #[error("a rollout names at least one role")]
    NoRoles,
    /// A role twice.
    #[error("role {0:?} appears twice")]
    DuplicateRole(String),
    /// Unknown role.
    #[error("no role {0:?}")]
    UnknownRole(String),
    /// `batch_size` or `max_unavailable` is 0.
    #[error("{field} must be at least 1")]
    Zero {
        /// Which.
        field: &'static str,
    },
    /// A timeout of 0.
    #[error("{field} must be between 1 and 604800 seconds")]
    Timeout {
        /// Which.
        field: &'static str,
    },
    /// Too many nodes.
    #[error("{0} nodes exceed the plan limit of {MAX_PLAN_NODES}")]
    TooLarge(usize),
}

/// Canary or batch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum WaveKind {
    /// The first wave of a role.
    Canary,
    /// A later wave.
    Batch,
}

/// One planned operation on one node.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "snake_case")]
pub enum Op {
    /// Download `to` into the node's cache in the background.
    Stage {
        /// Node MAC.
        node: String,
        /// Version to stage.
        to: VersionRef,
    },
    /// Assign `to` and ask the node to reboot into it.
    Activate {
        /// Node MAC.
        node: String,
        /// Version to run.
        to: VersionRef,
    },
    /// Wait for the node to report healthy on `to`.
    AwaitHealthy {
        /// Node MAC.
        node: String,
        /// Version.
        to: VersionRef,
    },
    /// Give the node back its previous assignment (`None`: follow the role) and reboot it.
    Rollback {
        /// Node MAC.
        node: String,
        /// The assignment it had before the rollout.
        to: Option<VersionRef>,
    },
    /// Make `to` the role's desired version (after its last wave).
    SetRole {
        /// Role.
        role: String,
        /// Version.
        to: VersionRef,
    },
}

/// One wave.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Wave {
    /// Position in the plan, from 0.
    pub index: usize,
    /// Role.
    pub role: String,
    /// Canary or batch.
    pub kind: WaveKind,
    /// The wave's nodes.
    pub nodes: Vec<String>,
    /// Activation groups (each at most `max_unavailable` nodes), in order.
    pub groups: Vec<Vec<String>>,
    /// Operations, in order: stages, then per group activations and health waits; the last
    /// wave of a role ends with `set_role`.
    pub ops: Vec<Op>,
    /// The wave's rollback operations.
    pub rollback: Vec<Op>,
}

/// One role's part of a plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PlannedRole {
    /// Role.
    pub role: String,
    /// Its desired version before.
    pub from: Option<VersionRef>,
    /// After.
    pub to: VersionRef,
    /// Nodes of the role at plan time (all of them, skipped ones included).
    pub members: Vec<String>,
}

/// A node left out of the plan, and why.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Skipped {
    /// Node MAC.
    pub node: String,
    /// Why.
    pub reason: String,
}

/// The plan.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Plan {
    /// The spec it answers.
    pub spec: RolloutSpec,
    /// Roles in rollout order.
    pub roles: Vec<PlannedRole>,
    /// Waves in order.
    pub waves: Vec<Wave>,
    /// Nodes not touched.
    pub skipped: Vec<Skipped>,
}

impl Plan {
    /// blake3 of the plan's canonical JSON, hex: what an operator approves.
    pub fn digest(&self) -> String {
        Self::digest_of_json(&serde_json::to_vec(self).unwrap_or_default())
    }

    /// [`Plan::digest`] of a plan already serialised (`serde_json::to_vec(plan)`), so a large
    /// plan is serialised once to be both stored and digested.
    pub fn digest_of_json(json: &[u8]) -> String {
        blake3::hash(json).to_hex().to_string()
    }

    /// Whether `op` is one of the plan's operations in wave `wave` (rollbacks included).
    pub fn permits(&self, wave: usize, op: &Op) -> bool {
        self.waves
            .get(wave)
            .is_some_and(|w| w.ops.contains(op) || w.rollback.contains(op))
    }

    /// Every node the plan touches.
    pub fn node_count(&self) -> usize {
        self.waves.iter().map(|w| w.nodes.len()).sum()
    }
}

/// Plans `spec` over `roles` and `nodes`.
pub fn plan(spec: &RolloutSpec, roles: &[RoleFact], nodes: &[NodeFact]) -> Result<Plan, PlanError> {
    if spec.roles.is_empty() {
        return Err(PlanError::NoRoles);
    }
    if spec.batch_size == 0 {
        return Err(PlanError::Zero {
            field: "batch_size",
        });
    }
    if spec.max_unavailable == 0 {
        return Err(PlanError::Zero {
            field: "max_unavailable",
        });
    }
    for (field, v) in [
        ("health_timeout_secs", spec.health_timeout_secs),
        ("stage_timeout_secs", spec.stage_timeout_secs),
    ] {
        if v == 0 || v > 604_800 {
            return Err(PlanError::Timeout { field });
        }
    }
    if nodes.len() > MAX_PLAN_NODES {
        return Err(PlanError::TooLarge(nodes.len()));
    }
    let mut targets: Vec<(&RoleFact, &RoleTarget)> = Vec::new();
    for t in &spec.roles {
        if targets.iter().any(|(_, x)| x.role == t.role) {
            return Err(PlanError::DuplicateRole(t.role.clone()));
        }
        let fact = roles
            .iter()
            .find(|r| r.name == t.role)
            .ok_or_else(|| PlanError::UnknownRole(t.role.clone()))?;
        targets.push((fact, t));
    }
    targets.sort_by(|a, b| (a.0.order, &a.0.name).cmp(&(b.0.order, &b.0.name)));

    let mut by_role: std::collections::HashMap<&str, Vec<&NodeFact>> =
        std::collections::HashMap::new();
    for n in nodes {
        by_role.entry(n.role.as_str()).or_default().push(n);
    }

    let mut out = Plan {
        spec: spec.clone(),
        roles: Vec::new(),
        waves: Vec::new(),
        skipped: Vec::new(),
    };
    for (fact, target) in targets {
        let mut members: Vec<&NodeFact> = by_role.remove(fact.name.as_str()).unwrap_or_default();
        members.sort_by(|a, b| a.mac.cmp(&b.mac));
        let mut todo = Vec::new();
        for n in &members {
            if n.effective.as_ref() == Some(&target.to) {
                out.skipped.push(Skipped {
                    node: n.mac.clone(),
                    reason: format!("already on {}", target.to),
                });
            } else {
                todo.push(*n);
            }
        }
        out.roles.push(PlannedRole {
            role: fact.name.clone(),
            from: fact.current.clone(),
            to: target.to.clone(),
            members: members.iter().map(|n| n.mac.clone()).collect(),
        });
        let mut chunks: Vec<(WaveKind, &[&NodeFact])> = Vec::new();
        let canary = spec.canary.min(todo.len());
        if canary > 0 {
            chunks.push((WaveKind::Canary, &todo[..canary]));
        }
        for c in todo[canary..].chunks(spec.batch_size) {
            chunks.push((WaveKind::Batch, c));
        }
        let first_wave = out.waves.len();
        for (kind, chunk) in chunks {
            let index = out.waves.len();
            let nodes: Vec<String> = chunk.iter().map(|n| n.mac.clone()).collect();
            let groups: Vec<Vec<String>> = nodes
                .chunks(spec.max_unavailable)
                .map(<[String]>::to_vec)
                .collect();
            let mut ops: Vec<Op> = nodes
                .iter()
                .map(|n| Op::Stage {
                    node: n.clone(),
                    to: target.to.clone(),
                })
                .collect();
            for g in &groups {
                ops.extend(g.iter().map(|n| Op::Activate {
                    node: n.clone(),
                    to: target.to.clone(),
                }));
                ops.extend(g.iter().map(|n| Op::AwaitHealthy {
                    node: n.clone(),
                    to: target.to.clone(),
                }));
            }
            let rollback = chunk
                .iter()
                .map(|n| Op::Rollback {
                    node: n.mac.clone(),
                    to: n.pinned.clone(),
                })
                .collect();
            out.waves.push(Wave {
                index,
                role: fact.name.clone(),
                kind,
                nodes,
                groups,
                ops,
                rollback,
            });
        }
        let set = Op::SetRole {
            role: fact.name.clone(),
            to: target.to.clone(),
        };
        let planned_waves = out.waves.len() > first_wave;
        match out.waves.last_mut() {
            Some(w) if planned_waves => w.ops.push(set),
            _ => {
                // Every node already runs the target: one empty wave makes it the role's version.
                let index = out.waves.len();
                out.waves.push(Wave {
                    index,
                    role: fact.name.clone(),
                    kind: WaveKind::Batch,
                    nodes: Vec::new(),
                    groups: Vec::new(),
                    ops: vec![set],
                    rollback: Vec::new(),
                });
            }
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(n: u64) -> VersionRef {
        VersionRef {
            image: "img".into(),
            version: n,
        }
    }

    fn fleet(counts: &[(&str, i64, usize)]) -> (Vec<RoleFact>, Vec<NodeFact>) {
        let mut roles = Vec::new();
        let mut nodes = Vec::new();
        for (r, (name, order, n)) in counts.iter().enumerate() {
            roles.push(RoleFact {
                name: (*name).into(),
                order: *order,
                current: Some(v(1)),
            });
            for i in 0..*n {
                nodes.push(NodeFact {
                    mac: format!("52:54:00:{r:02x}:{:02x}:{:02x}", i / 256, i % 256),
                    role: (*name).into(),
                    pinned: None,
                    effective: Some(v(1)),
                });
            }
        }
        (roles, nodes)
    }

    fn spec(roles: &[&str], canary: usize, batch: usize, maxu: usize) -> RolloutSpec {
        RolloutSpec {
            roles: roles
                .iter()
                .map(|r| RoleTarget {
                    role: (*r).into(),
                    to: v(2),
                })
                .collect(),
            canary,
            batch_size: batch,
            max_unavailable: maxu,
            health_timeout_secs: 60,
            stage_timeout_secs: 60,
        }
    }

    #[test]
    fn roles_go_in_order_canary_first() {
        let (roles, nodes) = fleet(&[("compute", 20, 5), ("storage", 10, 3)]);
        let p = plan(&spec(&["compute", "storage"], 1, 2, 1), &roles, &nodes).unwrap();
        let shape: Vec<(&str, WaveKind, usize)> = p
            .waves
            .iter()
            .map(|w| (w.role.as_str(), w.kind, w.nodes.len()))
            .collect();
        assert_eq!(
            shape,
            vec![
                ("storage", WaveKind::Canary, 1),
                ("storage", WaveKind::Batch, 2),
                ("compute", WaveKind::Canary, 1),
                ("compute", WaveKind::Batch, 2),
                ("compute", WaveKind::Batch, 2),
            ]
        );
        assert_eq!(
            p.waves[1].ops.last(),
            Some(&Op::SetRole {
                role: "storage".into(),
                to: v(2)
            })
        );
        assert_eq!(
            p.digest(),
            plan(&spec(&["compute", "storage"], 1, 2, 1), &roles, &nodes)
                .unwrap()
                .digest()
        );
        assert_eq!(p.digest().len(), 64);
    }

    #[test]
    fn bad_specs_are_refused() {
        let (roles, nodes) = fleet(&[("web", 0, 2)]);
        assert_eq!(
            plan(&spec(&[], 1, 1, 1), &roles, &nodes),
            Err(PlanError::NoRoles)
        );
        assert_eq!(
            plan(&spec(&["db"], 1, 1, 1), &roles, &nodes),
            Err(PlanError::UnknownRole("db".into()))
        );
        assert_eq!(
            plan(&spec(&["web", "web"], 1, 1, 1), &roles, &nodes),
            Err(PlanError::DuplicateRole("web".into()))
        );
        assert_eq!(
            plan(&spec(&["web"], 1, 0, 1), &roles, &nodes),
            Err(PlanError::Zero {
                field: "batch_size"
            })
        );
        assert_eq!(
            plan(&spec(&["web"], 1, 1, 0), &roles, &nodes),
            Err(PlanError::Zero {
                field: "max_unavailable"
            })
        );
    }

    proptest! {
        /// Every node of every role is either in exactly one wave or skipped because it
        /// already runs the target; canaries come first; groups respect max_unavailable; the
        /// plan is deterministic.
        #[test]
        fn plans_cover_each_node_once(
            sizes in proptest::collection::vec(0usize..40, 1..4),
            canary in 0usize..4, batch in 1usize..12, maxu in 1usize..5,
            done in proptest::collection::vec(any::<bool>(), 0..40),
        ) {
            let names = ["a", "b", "c", "d"];
            let counts: Vec<(&str, i64, usize)> = sizes.iter().enumerate().map(|(i, n)| (names[i], (3 - i) as i64, *n)).collect();
            let (roles, mut nodes) = fleet(&counts);
            for (n, d) in nodes.iter_mut().zip(done.iter()) {
                if *d { n.effective = Some(v(2)); }
            }
            let s = spec(&names[..sizes.len()], canary, batch, maxu);
            let p = plan(&s, &roles, &nodes).unwrap();
            prop_assert_eq!(&p, &plan(&s, &roles, &nodes).unwrap());
            let mut seen = std::collections::HashSet::new();
            for w in &p.waves {
                for n in &w.nodes { prop_assert!(seen.insert(n.clone())); }
                prop_assert!(w.groups.iter().all(|g| !g.is_empty() && g.len() <= maxu));
                prop_assert_eq!(w.groups.concat(), w.nodes.clone());
                if w.kind == WaveKind::Batch { prop_assert!(w.nodes.len() <= batch); }
                if w.kind == WaveKind::Canary { prop_assert!(w.nodes.len() <= canary); }
                for op in &w.ops { prop_assert!(p.permits(w.index, op)); }
            }
            for n in &nodes {
                let skipped = p.skipped.iter().any(|s| s.node == n.mac);
                prop_assert_eq!(seen.contains(&n.mac), !skipped);
                prop_assert_eq!(skipped, n.effective == Some(v(2)));
            }
            // Role order: a role's waves are contiguous and follow `order`.
            let order: Vec<&str> = p.waves.iter().map(|w| w.role.as_str()).collect();
            let mut dedup = order.clone();
            dedup.dedup();
            let mut sorted = dedup.clone();
            sorted.sort_by_key(|r| counts.iter().find(|c| c.0 == *r).map(|c| c.1));
            prop_assert_eq!(dedup, sorted);
        }
    }
}
