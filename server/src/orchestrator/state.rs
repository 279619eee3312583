//! The node state machine and the handling of delta reports (`wire::report`): pure functions,
//! no I/O, property-tested.
//!
//! States are the ones nodes report ([`NodeState`]). Within one reporter session (a run of
//! node-init or of its agent, which begins with a full report, `base_seq` 0) the allowed
//! transitions are the fixed table [`allowed`]. A new session begins at a (re)boot, which may
//! interrupt any state, so a full report may name any state but [`NodeState::Unknown`].
//!
//! Sequence rules (docs/api.md, "Reports"): the server keeps, per node, the last applied `seq`
//! and a digest of the report that carried it.
//! - a delta (`base_seq` > 0) whose `base_seq` is the applied `seq`: applied.
//! - a delta whose `seq` is the applied one, same digest: a duplicate; nothing changes. Another
//!   digest: the node and the server disagree (a retry with new content): ask for a full report.
//! - a delta with `seq` below the applied one: a late copy; nothing changes.
//! - a delta whose `base_seq` is not the applied `seq` (a gap): ask for a full report.
//! - a full report (`base_seq` 0) identical to the last applied report: a duplicate.
//! - any other full report starts a new session and replaces the status. A full report states
//!   the whole status, so applying it again yields the same status; node-init's reporter is
//!   serial and never sends an older full report after a newer delta was acknowledged.

use wire::report::{NodeState, NodeStatus, StateReport};

/// Every state, in declaration order.
pub const ALL_STATES: [NodeState; 9] = [
    NodeState::Unknown,
    NodeState::Booting,
    NodeState::Fetching,
    NodeState::Verifying,
    NodeState::Booted,
    NodeState::Healthy,
    NodeState::Offline,
    NodeState::RolledBack,
    NodeState::Failed,
];

/// The transition table within one reporter session: `(from, allowed next states)`. Staying in
/// a state is always allowed and is not a transition.
pub const TRANSITIONS: &[(NodeState, &[NodeState])] = {
    use NodeState::*;
    &[
        (
            Unknown,
            &[
                Booting, Fetching, Verifying, Booted, Healthy, Offline, RolledBack, Failed,
            ],
        ),
        (
            Booting,
            &[Fetching, Verifying, Booted, Offline, RolledBack, Failed],
        ),
        (Fetching, &[Verifying, Booted, Offline, RolledBack, Failed]),
        (Verifying, &[Fetching, Booted, Offline, RolledBack, Failed]),
        (Booted, &[Healthy, RolledBack, Failed]),
        (Healthy, &[Failed]),
        (Offline, &[Healthy, Failed]),
        (RolledBack, &[Healthy, Failed]),
        (Failed, &[Booting, Fetching]),
    ]
};

/// Whether a session may go from `from` to `to`.
pub fn allowed(from: NodeState, to: NodeState) -> bool {
    from == to
        || TRANSITIONS
            .iter()
            .find(|(f, _)| *f == from)
            .is_some_and(|(_, next)| next.contains(&to))
}

/// Where the server is in a node's report stream.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, serde::Serialize, serde::Deserialize)]
pub struct Cursor {
    /// Last applied `seq` (0: none).
    pub applied_seq: u64,
    /// blake3 of the canonical JSON of the report applied at `applied_seq`.
    pub digest: [u8; 32],
}

/// What to do with a report.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Apply: the node's new status and cursor. `transition` is set when the state changed;
    /// `new_session` when this was a full report.
    Apply {
        /// The status after the report.
        status: NodeStatus,
        /// The cursor after the report.
        cursor: Cursor,
        /// `(from, to)` when the state changed.
        transition: Option<(NodeState, NodeState)>,
        /// A full report started a new reporter session.
        new_session: bool,
    },
    /// Already applied (duplicate or late copy): nothing changes.
    Ignore,
    /// The node must send a full report; nothing changes.
    ResendFull,
    /// The report breaks the state machine: rejected, nothing changes.
    Illegal {
        /// State the server holds.
        from: NodeState,
        /// State reported.
        to: NodeState,
    },
}

/// The digest identifying a report (its canonical JSON).
pub fn report_digest(r: &StateReport) -> [u8; 32] {
    // Serialising a plain struct of strings, numbers and vectors cannot fail.
    let bytes = serde_json::to_vec(r).unwrap_or_default();
    *blake3::hash(&bytes).as_bytes()
}

/// Decides what a report does to a node holding `status` at `cursor`.
pub fn apply_report(status: &NodeStatus, cursor: &Cursor, r: &StateReport) -> Outcome {
    let digest = report_digest(r);
    if r.seq == 0 {
        return Outcome::ResendFull;
    }
    let full = r.base_seq == 0;
    if full {
        if cursor.applied_seq > 0 && digest == cursor.digest {
            return Outcome::Ignore;
        }
    } else {
        if r.seq == cursor.applied_seq {
            return if digest == cursor.digest {
                Outcome::Ignore
            } else {
                Outcome::ResendFull
            };
        }
        if r.seq < cursor.applied_seq {
            return Outcome::Ignore;
        }
        if r.base_seq != cursor.applied_seq || r.seq <= r.base_seq {
            return Outcome::ResendFull;
        }
    }
    let mut next = if full {
        NodeStatus::default()
    } else {
        status.clone()
    };
    next.apply(&r.delta);
    let from = status.state;
    let to = next.state;
    let legal = if full {
        to != NodeState::Unknown || from == NodeState::Unknown
    } else {
        allowed(from, to)
    };
    if !legal {
        return Outcome::Illegal { from, to };
    }
    Outcome::Apply {
        status: next,
        cursor: Cursor {
            applied_seq: r.seq,
            digest,
        },
        transition: (from != to).then_some((from, to)),
        new_session: full,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use wire::report::StateDelta;

    fn any_state() -> impl Strategy<Value = NodeState> {
        proptest::sample::select(ALL_STATES.to_vec())
    }

    fn report(
        seq: u64,
        base_seq: u64,
        state: Option<NodeState>,
        version: Option<u64>,
    ) -> StateReport {
        StateReport {
            mac: "52:54:00:00:00:01".into(),
            seq,
            base_seq,
            delta: StateDelta {
                state,
                version: version.map(Some),
                ..Default::default()
            },
        }
    }

    fn apply(status: &mut NodeStatus, cur: &mut Cursor, r: &StateReport) -> Outcome {
        let out = apply_report(status, cur, r);
        if let Outcome::Apply {
            status: s,
            cursor: c,
            ..
        } = &out
        {
            *status = s.clone();
            *cur = *c;
        }
        out
    }

    #[test]
    fn table_covers_every_state_once() {
        for s in ALL_STATES {
            assert_eq!(
                TRANSITIONS.iter().filter(|(f, _)| *f == s).count(),
                1,
                "{s:?}"
            );
        }
        for (_, next) in TRANSITIONS {
            assert!(
                !next.contains(&NodeState::Unknown),
                "nothing goes back to unknown"
            );
        }
    }

    #[test]
    fn healthy_node_cannot_start_fetching_without_a_reboot() {
        let mut st = NodeStatus::default();
        let mut cur = Cursor::default();
        assert!(matches!(
            apply(
                &mut st,
                &mut cur,
                &report(1, 0, Some(NodeState::Healthy), Some(1))
            ),
            Outcome::Apply { .. }
        ));
        let out = apply(
            &mut st,
            &mut cur,
            &report(2, 1, Some(NodeState::Fetching), None),
        );
        assert_eq!(
            out,
            Outcome::Illegal {
                from: NodeState::Healthy,
                to: NodeState::Fetching
            }
        );
        assert_eq!(st.state, NodeState::Healthy);
        assert_eq!(cur.applied_seq, 1);
        // A reboot is a new session: a full report may start anywhere.
        assert!(matches!(
            apply(
                &mut st,
                &mut cur,
                &report(1, 0, Some(NodeState::Fetching), Some(2))
            ),
            Outcome::Apply {
                new_session: true,
                ..
            }
        ));
    }

    #[test]
    fn duplicate_late_and_gapped_reports() {
        let mut st = NodeStatus::default();
        let mut cur = Cursor::default();
        let r1 = report(1, 0, Some(NodeState::Booting), None);
        let r2 = report(2, 1, Some(NodeState::Fetching), Some(3));
        let r3 = report(3, 2, Some(NodeState::Booted), None);
        assert!(matches!(
            apply(&mut st, &mut cur, &r1),
            Outcome::Apply { .. }
        ));
        assert!(matches!(
            apply(&mut st, &mut cur, &r2),
            Outcome::Apply { .. }
        ));
        assert_eq!(apply(&mut st, &mut cur, &r2), Outcome::Ignore);
        assert_eq!(
            apply(
                &mut st,
                &mut cur,
                &report(2, 1, Some(NodeState::Failed), None)
            ),
            Outcome::ResendFull
        );
        assert_eq!(
            apply(
                &mut st,
                &mut cur,
                &report(5, 4, Some(NodeState::Booted), None)
            ),
            Outcome::ResendFull
        );
        assert!(matches!(
            apply(&mut st, &mut cur, &r3),
            Outcome::Apply { .. }
        ));
        assert_eq!(apply(&mut st, &mut cur, &r2), Outcome::Ignore);
        assert_eq!(st.state, NodeState::Booted);
        assert_eq!(st.version, Some(3));
    }

    proptest! {
        /// Delivering a stream of deltas with duplicates and reorderings never yields a status
        /// the node did not have, and once the last report is delivered in order the server
        /// holds exactly the node's final status.
        #[test]
        fn duplicates_and_reordering_change_nothing_twice(
            states in proptest::collection::vec((any_state(), proptest::option::of(0u64..4)), 1..12),
            shuffle in proptest::collection::vec(0usize..64, 0..30),
        ) {
            // The node's own sequence of statuses, each reachable legally from the previous.
            let mut node = NodeStatus::default();
            let mut history = vec![node.clone()];
            let mut reports = Vec::new();
            for (i, (s, v)) in states.iter().enumerate() {
                let mut next = node.clone();
                if allowed(node.state, *s) && *s != NodeState::Unknown { next.state = *s; }
                if let Some(v) = v { next.version = Some(*v); }
                let seq = i as u64 + 1;
                reports.push(StateReport { mac: "52:54:00:00:00:01".into(), seq, base_seq: seq - 1, delta: node.diff(&next) });
                history.push(next.clone());
                node = next;
            }
            let mut st = NodeStatus::default();
            let mut cur = Cursor::default();
            // Chaos first: arbitrary re-deliveries of any report.
            // The first report is the full one, delivered once; then deltas in any order.
            let _ = apply(&mut st, &mut cur, &reports[0]);
            for k in &shuffle {
                let r = &reports[k % reports.len()];
                if r.base_seq == 0 { continue; }
                let _ = apply(&mut st, &mut cur, r);
                prop_assert!(history.contains(&st), "status {:?} never existed on the node", st);
            }
            // Then the node's reporter does its job: on ResendFull it sends a full report.
            let last = reports.len() as u64;
            let mut delivered = cur.applied_seq;
            while delivered < last {
                let r = &reports[delivered as usize];
                match apply(&mut st, &mut cur, r) {
                    Outcome::Apply { .. } => delivered += 1,
                    Outcome::ResendFull => {
                        let full = StateReport { mac: r.mac.clone(), seq: r.seq, base_seq: 0,
                            delta: NodeStatus::default().diff(&history[r.seq as usize]) };
                        let ok = matches!(apply(&mut st, &mut cur, &full), Outcome::Apply { .. });
                        prop_assert!(ok);
                        delivered = r.seq;
                    }
                    other => prop_assert!(false, "unexpected {:?}", other),
                }
            }
            prop_assert_eq!(&st, &node);
            // Every report again, in any order: nothing changes.
            for k in &shuffle {
                let r = &reports[k % reports.len()];
                if r.base_seq == 0 && r.seq != cur.applied_seq { continue; }
                let applied = matches!(apply(&mut st, &mut cur, r), Outcome::Apply { .. });
                prop_assert!(!applied);
            }
            prop_assert_eq!(&st, &node);
        }

        /// A delta is applied only when the table allows its transition.
        #[test]
        fn deltas_follow_the_table(from in any_state(), to in any_state()) {
            let st = NodeStatus { state: from, ..Default::default() };
            let cur = Cursor { applied_seq: 4, digest: [0; 32] };
            let out = apply_report(&st, &cur, &report(5, 4, Some(to), None));
            if allowed(from, to) {
                let ok = matches!(out, Outcome::Apply { .. });
                prop_assert!(ok, "{:?}", out);
            } else {
                prop_assert_eq!(out, Outcome::Illegal { from, to });
            }
        }
    }
}
