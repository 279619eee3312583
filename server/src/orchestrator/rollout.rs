//! Executing a plan: a pure step function. Given the plan, where the rollout is
//! ([`Progress`]), what the fleet looks like now ([`World`]) and the time, [`next`] says which
//! planned operations to perform and where the rollout is afterwards. The driver performs the
//! operations and stores the new progress in one fenced transaction, so a crash leaves either
//! the step done or not done, and a restart resumes at the stored wave and phase.
//!
//! Every operation [`next`] returns is taken from the plan (checked with [`Plan::permits`] by
//! the driver before writing). When the fleet no longer matches the plan (a planned node left
//! its role or was deleted, a node joined a role being rolled, someone else changed a role's
//! version or a node's assignment) the rollout halts and the current wave rolls back by plan.

use std::collections::{BTreeSet, HashMap};

use serde::{Deserialize, Serialize};
use wire::report::NodeState;

use super::plan::{Op, Plan};
use super::VersionRef;

/// A rollout's lifecycle.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum RolloutState {
    /// Planned, waiting for approval.
    Planned,
    /// Approved, waiting for `apply`.
    Approved,
    /// Being driven.
    Running,
    /// Paused by an operator.
    Paused,
    /// Every wave passed.
    Succeeded,
    /// A health gate failed or the fleet left the plan: halted (the wave rolled back).
    Halted,
    /// Aborted by an operator (the current wave rolled back).
    Aborted,
}

impl RolloutState {
    /// No further change is possible.
    pub fn is_final(self) -> bool {
        matches!(
            self,
            RolloutState::Succeeded | RolloutState::Halted | RolloutState::Aborted
        )
    }

    /// The stored name.
    pub fn as_str(self) -> &'static str {
        match self {
            RolloutState::Planned => "planned",
            RolloutState::Approved => "approved",
            RolloutState::Running => "running",
            RolloutState::Paused => "paused",
            RolloutState::Succeeded => "succeeded",
            RolloutState::Halted => "halted",
            RolloutState::Aborted => "aborted",
        }
    }

    /// Parses a stored name.
    pub fn parse(s: &str) -> Option<Self> {
        [
            RolloutState::Planned,
            RolloutState::Approved,
            RolloutState::Running,
            RolloutState::Paused,
            RolloutState::Succeeded,
            RolloutState::Halted,
            RolloutState::Aborted,
        ]
        .into_iter()
        .find(|s2| s2.as_str() == s)
    }
}

/// Where a wave is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "phase", rename_all = "snake_case")]
pub enum Phase {
    /// Not started.
    Pending,
    /// Nodes are downloading the new version.
    Staging {
        /// Unix ms the phase began.
        since_ms: u64,
    },
    /// Group `group` was activated and must report healthy.
    Activating {
        /// Group index.
        group: usize,
        /// Unix ms the group was activated.
        since_ms: u64,
    },
    /// The wave is going back to its previous assignments.
    RollingBack {
        /// Unix ms the rollback began.
        since_ms: u64,
        /// Why.
        reason: String,
        /// Halted or aborted once done.
        end: RolloutState,
    },
}

/// Where a rollout is.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Progress {
    /// Current wave index (`plan.waves.len()`: all done).
    pub wave: usize,
    /// Its phase.
    pub phase: Phase,
}

impl Default for Progress {
    fn default() -> Self {
        Progress {
            wave: 0,
            phase: Phase::Pending,
        }
    }
}

/// A node as the executor sees it.
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct NodeObs {
    /// Role.
    pub role: String,
    /// Explicit assignment, if any.
    pub pinned: Option<VersionRef>,
    /// What it is assigned now (pin, site override or role).
    pub effective: Option<VersionRef>,
    /// Reported state.
    pub state: NodeState,
    /// Reported running version.
    pub version: Option<u64>,
    /// Version fully present in its cache (checked against its stage target's layers).
    pub staged: Option<VersionRef>,
    /// Unix ms of its last full report (a new reporter session: it booted).
    pub session_ms: u64,
    /// Unix ms of its last report.
    pub report_ms: u64,
}

/// The fleet as the executor sees it.
#[derive(Debug, Clone, Default)]
pub struct World {
    /// Nodes by MAC (those of the plan's roles and waves).
    pub nodes: HashMap<String, NodeObs>,
    /// Current members of each of the plan's roles.
    pub members: HashMap<String, BTreeSet<String>>,
    /// Each role's desired version.
    pub roles: HashMap<String, Option<VersionRef>>,
}

/// What to do next.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Step {
    /// Nothing yet.
    Wait,
    /// Perform `ops` (all from the plan) and store `progress`; if `finish` is set the rollout
    /// ends in that state with that reason.
    Do {
        /// Operations.
        ops: Vec<Op>,
        /// New progress.
        progress: Progress,
        /// Final state, if this step ends the rollout.
        finish: Option<(RolloutState, Option<String>)>,
    },
}

fn ms(secs: u64) -> u64 {
    secs.saturating_mul(1000)
}

/// Why the world no longer matches the plan for wave `w`, if it does not.
fn off_plan(plan: &Plan, wave: usize, world: &World) -> Option<String> {
    let w = plan.waves.get(wave)?;
    let role = plan.roles.iter().find(|r| r.role == w.role)?;
    let current = world.roles.get(&w.role).cloned().flatten();
    if current != role.from && current.as_ref() != Some(&role.to) {
        return Some(format!("role {} was changed outside the rollout", w.role));
    }
    if let Some(members) = world.members.get(&w.role) {
        if let Some(extra) = members.iter().find(|m| !role.members.contains(m)) {
            return Some(format!(
                "node {extra} joined role {} after planning",
                w.role
            ));
        }
    }
    for n in &w.nodes {
        let Some(obs) = world.nodes.get(n) else {
            return Some(format!("planned node {n} no longer exists"));
        };
        if obs.role != w.role {
            return Some(format!("planned node {n} left role {}", w.role));
        }
        let prior = w.rollback.iter().find_map(|op| match op {
            Op::Rollback { node, to } if node == n => Some(to.clone()),
            _ => None,
        });
        if obs.pinned.as_ref() != Some(&role.to) && prior.is_some_and(|p| p != obs.pinned) {
            return Some(format!("node {n} was reassigned outside the rollout"));
        }
    }
    None
}

fn healthy_on(obs: &NodeObs, to: &VersionRef, since_ms: u64) -> bool {
    obs.state == NodeState::Healthy && obs.version == Some(to.version) && obs.session_ms >= since_ms
}

fn failed_on(obs: &NodeObs, to: &VersionRef, since_ms: u64) -> Option<String> {
    if obs.report_ms < since_ms {
        return None;
    }
    match obs.state {
        NodeState::Failed => Some("failed".into()),
        NodeState::RolledBack => Some("rolled back by itself (boot counting)".into()),
        NodeState::Healthy if obs.session_ms >= since_ms && obs.version != Some(to.version) => {
            Some(format!(
                "came up healthy on version {:?} instead of {}",
                obs.version, to.version
            ))
        }
        _ => None,
    }
}

fn rollback(plan: &Plan, wave: usize, now_ms: u64, reason: String, end: RolloutState) -> Step {
    let ops = plan
        .waves
        .get(wave)
        .map(|w| w.rollback.clone())
        .unwrap_or_default();
    Step::Do {
        ops,
        progress: Progress {
            wave,
            phase: Phase::RollingBack {
                since_ms: now_ms,
                reason,
                end,
            },
        },
        finish: None,
    }
}

/// The next step of a running rollout. `abort` is an operator's abort request.
pub fn next(plan: &Plan, progress: &Progress, world: &World, now_ms: u64, abort: bool) -> Step {
    let Some(w) = plan.waves.get(progress.wave) else {
        return Step::Do {
            ops: Vec::new(),
            progress: progress.clone(),
            finish: Some((RolloutState::Succeeded, None)),
        };
    };
    let to = plan
        .roles
        .iter()
        .find(|r| r.role == w.role)
        .map(|r| r.to.clone());
    let Some(to) = to else {
        return Step::Do {
            ops: Vec::new(),
            progress: progress.clone(),
            finish: Some((
                RolloutState::Halted,
                Some(format!("plan has no target for role {}", w.role)),
            )),
        };
    };
    let finish_step = |ops: Vec<Op>| {
        let progress = Progress {
            wave: progress.wave + 1,
            phase: Phase::Pending,
        };
        let finish = (progress.wave >= plan.waves.len()).then_some((RolloutState::Succeeded, None));
        Step::Do {
            ops,
            progress,
            finish,
        }
    };
    if let Phase::RollingBack {
        since_ms,
        reason,
        end,
    } = &progress.phase
    {
        let back = w.nodes.iter().all(|n| {
            world.nodes.get(n).is_none_or(|o| {
                o.effective.as_ref().map(|e| e.version) == o.version
                    && o.state == NodeState::Healthy
            })
        });
        if back || now_ms.saturating_sub(*since_ms) > ms(plan.spec.health_timeout_secs) {
            let why = if back {
                reason.clone()
            } else {
                format!("{reason}; rollback did not complete in time")
            };
            return Step::Do {
                ops: Vec::new(),
                progress: progress.clone(),
                finish: Some((*end, Some(why))),
            };
        }
        return Step::Wait;
    }
    if abort {
        return match progress.phase {
            Phase::Pending => Step::Do {
                ops: Vec::new(),
                progress: progress.clone(),
                finish: Some((RolloutState::Aborted, Some("aborted by an operator".into()))),
            },
            _ => rollback(
                plan,
                progress.wave,
                now_ms,
                "aborted by an operator".into(),
                RolloutState::Aborted,
            ),
        };
    }
    if let Some(reason) = off_plan(plan, progress.wave, world) {
        return match progress.phase {
            Phase::Pending => Step::Do {
                ops: Vec::new(),
                progress: progress.clone(),
                finish: Some((
                    RolloutState::Halted,
                    Some(format!("outside the plan: {reason}")),
                )),
            },
            _ => rollback(
                plan,
                progress.wave,
                now_ms,
                format!("outside the plan: {reason}"),
                RolloutState::Halted,
            ),
        };
    }
    match &progress.phase {
        Phase::Pending => {
            if w.nodes.is_empty() {
                return finish_step(w.ops.clone());
            }
            let ops = w
                .ops
                .iter()
                .filter(|o| matches!(o, Op::Stage { .. }))
                .cloned()
                .collect();
            Step::Do {
                ops,
                progress: Progress {
                    wave: progress.wave,
                    phase: Phase::Staging { since_ms: now_ms },
                },
                finish: None,
            }
        }
        Phase::Staging { since_ms } => {
            let staged = w.nodes.iter().all(|n| {
                world.nodes.get(n).is_some_and(|o| {
                    o.staged.as_ref() == Some(&to) || o.version == Some(to.version)
                })
            });
            if staged {
                return activate(w, 0, &to, progress.wave, now_ms);
            }
            if now_ms.saturating_sub(*since_ms) > ms(plan.spec.stage_timeout_secs) {
                return rollback(
                    plan,
                    progress.wave,
                    now_ms,
                    format!("wave {} did not stage in time", w.index),
                    RolloutState::Halted,
                );
            }
            Step::Wait
        }
        Phase::Activating { group, since_ms } => {
            let members = w.groups.get(*group).map(Vec::as_slice).unwrap_or_default();
            for n in members {
                if let Some(why) = world
                    .nodes
                    .get(n)
                    .and_then(|o| failed_on(o, &to, *since_ms))
                {
                    return rollback(
                        plan,
                        progress.wave,
                        now_ms,
                        format!("health gate: node {n} {why}"),
                        RolloutState::Halted,
                    );
                }
            }
            let healthy = members.iter().all(|n| {
                world
                    .nodes
                    .get(n)
                    .is_some_and(|o| healthy_on(o, &to, *since_ms))
            });
            if healthy {
                if group + 1 < w.groups.len() {
                    return activate(w, group + 1, &to, progress.wave, now_ms);
                }
                let rest = w
                    .ops
                    .iter()
                    .filter(|o| matches!(o, Op::SetRole { .. }))
                    .cloned()
                    .collect();
                return finish_step(rest);
            }
            if now_ms.saturating_sub(*since_ms) > ms(plan.spec.health_timeout_secs) {
                let late: Vec<&String> = members
                    .iter()
                    .filter(|n| {
                        !world
                            .nodes
                            .get(*n)
                            .is_some_and(|o| healthy_on(o, &to, *since_ms))
                    })
                    .collect();
                return rollback(
                    plan,
                    progress.wave,
                    now_ms,
                    format!(
                        "health gate: {} node(s) not healthy in time (first {})",
                        late.len(),
                        late.first().map_or("?", |s| s.as_str())
                    ),
                    RolloutState::Halted,
                );
            }
            Step::Wait
        }
        Phase::RollingBack { .. } => Step::Wait,
    }
}

fn activate(
    w: &super::plan::Wave,
    group: usize,
    to: &VersionRef,
    wave: usize,
    now_ms: u64,
) -> Step {
    let members = w.groups.get(group).cloned().unwrap_or_default();
    let ops = members
        .iter()
        .map(|n| Op::Activate {
            node: n.clone(),
            to: to.clone(),
        })
        .collect();
    Step::Do {
        ops,
        progress: Progress {
            wave,
            phase: Phase::Activating {
                group,
                since_ms: now_ms,
            },
        },
        finish: None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::orchestrator::plan::{plan, NodeFact, RoleFact, RoleTarget, RolloutSpec};

    fn v(n: u64) -> VersionRef {
        VersionRef {
            image: "img".into(),
            version: n,
        }
    }

    fn setup(n: usize) -> (Plan, World) {
        let roles = vec![RoleFact {
            name: "web".into(),
            order: 0,
            current: Some(v(1)),
        }];
        let nodes: Vec<NodeFact> = (0..n)
            .map(|i| NodeFact {
                mac: format!("52:54:00:00:00:{i:02x}"),
                role: "web".into(),
                pinned: None,
                effective: Some(v(1)),
            })
            .collect();
        let spec = RolloutSpec {
            roles: vec![RoleTarget {
                role: "web".into(),
                to: v(2),
            }],
            canary: 1,
            batch_size: 2,
            max_unavailable: 1,
            health_timeout_secs: 10,
            stage_timeout_secs: 10,
        };
        let p = plan(&spec, &roles, &nodes).unwrap();
        let mut world = World::default();
        world.roles.insert("web".into(), Some(v(1)));
        world
            .members
            .insert("web".into(), nodes.iter().map(|n| n.mac.clone()).collect());
        for n in &nodes {
            world.nodes.insert(
                n.mac.clone(),
                NodeObs {
                    role: "web".into(),
                    effective: Some(v(1)),
                    state: NodeState::Healthy,
                    version: Some(1),
                    ..Default::default()
                },
            );
        }
        (p, world)
    }

    /// A simulated fleet obeying the ops: stage → staged; activate → reboot into the version
    /// (healthy, or rolled back by boot counting for `bad` nodes); rollback → back on v1.
    fn perform(world: &mut World, ops: &[Op], now: u64, bad: &[String]) {
        for op in ops {
            match op {
                Op::Stage { node, to } => {
                    world.nodes.get_mut(node).unwrap().staged = Some(to.clone())
                }
                Op::Activate { node, to } => {
                    let o = world.nodes.get_mut(node).unwrap();
                    o.pinned = Some(to.clone());
                    o.effective = Some(to.clone());
                    o.session_ms = now;
                    o.report_ms = now;
                    if bad.contains(node) {
                        o.state = NodeState::RolledBack;
                        o.version = Some(1);
                    } else {
                        o.version = Some(to.version);
                    }
                }
                Op::Rollback { node, to } => {
                    let o = world.nodes.get_mut(node).unwrap();
                    o.pinned = to.clone();
                    o.effective = Some(v(1));
                    o.version = Some(1);
                    o.state = NodeState::Healthy;
                    o.session_ms = now;
                    o.report_ms = now;
                }
                Op::SetRole { role, to } => {
                    world.roles.insert(role.clone(), Some(to.clone()));
                }
                Op::AwaitHealthy { .. } => {}
            }
        }
    }

    fn run(p: &Plan, world: &mut World, bad: &[String]) -> (RolloutState, Option<String>, Vec<Op>) {
        let mut progress = Progress::default();
        let mut all = Vec::new();
        for t in 1..1000u64 {
            match next(p, &progress, world, t, false) {
                Step::Wait => {}
                Step::Do {
                    ops,
                    progress: np,
                    finish,
                } => {
                    for op in &ops {
                        assert!(
                            p.permits(progress.wave, op)
                                || p.permits(np.wave.saturating_sub(1), op),
                            "{op:?} not planned"
                        );
                    }
                    perform(world, &ops, t, bad);
                    all.extend(ops);
                    progress = np;
                    if let Some((s, why)) = finish {
                        return (s, why, all);
                    }
                }
            }
        }
        panic!("did not finish");
    }

    #[test]
    fn a_healthy_fleet_rolls_forward() {
        let (p, mut world) = setup(5);
        let (state, _, ops) = run(&p, &mut world, &[]);
        assert_eq!(state, RolloutState::Succeeded);
        assert_eq!(world.roles["web"], Some(v(2)));
        assert!(world.nodes.values().all(|o| o.version == Some(2)));
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, Op::Activate { .. }))
                .count(),
            5
        );
    }

    #[test]
    fn a_failing_canary_halts_and_rolls_back() {
        let (p, mut world) = setup(5);
        let canary = p.waves[0].nodes[0].clone();
        let (state, why, ops) = run(&p, &mut world, std::slice::from_ref(&canary));
        assert_eq!(state, RolloutState::Halted);
        assert!(why.unwrap().contains("health gate"));
        assert!(ops.contains(&Op::Rollback {
            node: canary.clone(),
            to: None
        }));
        assert_eq!(
            ops.iter()
                .filter(|o| matches!(o, Op::Activate { .. }))
                .count(),
            1
        );
        assert_eq!(world.roles["web"], Some(v(1)));
        assert!(world
            .nodes
            .values()
            .all(|o| o.version == Some(1) && o.pinned.is_none()));
    }

    #[test]
    fn a_node_joining_the_role_halts() {
        let (p, mut world) = setup(3);
        world
            .members
            .get_mut("web")
            .unwrap()
            .insert("52:54:00:00:00:ff".into());
        let (state, why, ops) = run(&p, &mut world, &[]);
        assert_eq!(state, RolloutState::Halted);
        assert!(why.unwrap().contains("joined role"));
        assert!(ops.is_empty());
    }

    #[test]
    fn health_timeout_rolls_back() {
        let (p, world) = setup(2);
        let progress = Progress {
            wave: 0,
            phase: Phase::Activating {
                group: 0,
                since_ms: 5,
            },
        };
        assert_eq!(next(&p, &progress, &world, 10_005, false), Step::Wait);
        let Step::Do { progress, ops, .. } = next(&p, &progress, &world, 10_006, false) else {
            panic!()
        };
        assert!(matches!(progress.phase, Phase::RollingBack { .. }));
        assert!(ops.iter().all(|o| matches!(o, Op::Rollback { .. })));
    }
}
