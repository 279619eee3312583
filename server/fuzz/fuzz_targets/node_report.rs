//! Node state reports (`wire::report::StateReport` JSON, docs/api.md "Reports") through the
//! server's state machine (`orchestrator::state::apply_report`): every JSON value that parses
//! round-trips, nothing panics, and the application path keeps its invariants: an applied
//! report moves the cursor to its `seq`, a delta's transition is in the table, a full report
//! replaces the status, and delivering the same report again changes nothing.
//!
//! Input: up to 16 reports separated by newlines, applied in order to one node.
#![no_main]

use libfuzzer_sys::fuzz_target;
use wire::report::{NodeState, NodeStatus, StateReport, MAX_REPORT_BYTES};

#[allow(dead_code)]
#[path = "../../src/orchestrator/state.rs"]
mod state;

use state::{allowed, apply_report, Cursor, Outcome};

fuzz_target!(|data: &[u8]| {
    let mut status = NodeStatus::default();
    let mut cursor = Cursor::default();
    for line in data.split(|b| *b == b'\n').take(16) {
        if line.len() > MAX_REPORT_BYTES {
            continue;
        }
        let Ok(report) = serde_json::from_slice::<StateReport>(line) else { continue };
        let again: StateReport = serde_json::from_slice(&serde_json::to_vec(&report).expect("serialises")).expect("parses back");
        assert_eq!(again, report, "round trip");

        match apply_report(&status, &cursor, &report) {
            Outcome::Apply { status: next, cursor: c, transition, new_session } => {
                assert_eq!(c.applied_seq, report.seq);
                assert!(report.seq > 0);
                assert_eq!(new_session, report.base_seq == 0);
                let mut expect = if new_session { NodeStatus::default() } else { status.clone() };
                expect.apply(&report.delta);
                assert_eq!(next, expect);
                if new_session {
                    assert!(next.state != NodeState::Unknown || status.state == NodeState::Unknown);
                } else {
                    assert!(allowed(status.state, next.state));
                }
                assert_eq!(transition, (status.state != next.state).then_some((status.state, next.state)));
                // The same report delivered twice: applied once.
                assert_eq!(apply_report(&next, &c, &report), Outcome::Ignore, "duplicate of {report:?}");
                status = next;
                cursor = c;
            }
            Outcome::Illegal { from, to } => {
                assert_eq!(from, status.state);
                assert!(!allowed(from, to) || report.base_seq == 0);
            }
            Outcome::Ignore | Outcome::ResendFull => {}
        }
    }
});
