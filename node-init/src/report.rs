//! State reports to the server as deltas (wire::report): the reporter keeps the last status
//! the server acknowledged and sends only what changed. A report with nothing changed is still
//! sent (an empty delta, a few dozen bytes): it is the node's heartbeat, and the server's
//! answer is how the node hears of requests (stage, reboot, repair). Best effort: a node
//! boots whether or not the server hears about it; a refused token (401/403) is logged.

use wire::report::{NodeStatus, ReportAck, StateReport};

use crate::http::Client;

/// Sends deltas for one node.
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct Reporter {
    /// The node's MAC.
    pub mac: String,
    /// Last sequence number sent and acknowledged.
    pub seq: u64,
    /// The status the server holds (as of `seq`).
    pub acked: NodeStatus,
}

impl Reporter {
    /// A reporter that has sent nothing yet.
    pub fn new(mac: &str) -> Self {
        Self {
            mac: mac.to_owned(),
            seq: 0,
            acked: NodeStatus::default(),
        }
    }

    /// Sends what changed from the acknowledged status to `now` (possibly nothing). Returns
    /// the server's answer when it accepted the report (`None`: not sent, refused, or a full
    /// report is wanted next).
    pub fn send(&mut self, client: &Client, now: &NodeStatus) -> Option<ReportAck> {
        let delta = self.acked.diff(now);
        let report = StateReport {
            mac: self.mac.clone(),
            seq: self.seq + 1,
            base_seq: self.seq,
            delta,
        };
        let body = serde_json::to_vec(&report).ok()?;
        let path = format!("/api/v1/nodes/by-mac/{}/report", self.mac);
        match client.post_json(&path, &body, 64 * 1024) {
            Ok((status, resp)) if (200..300).contains(&status) => {
                let ack: ReportAck = serde_json::from_slice(&resp).unwrap_or_default();
                if ack.resend_full {
                    self.seq = 0;
                    self.acked = NodeStatus::default();
                    return None;
                }
                self.seq += 1;
                self.acked = now.clone();
                Some(ack)
            }
            Ok((status @ (401 | 403), _)) => {
                let with = if client.has_token() {
                    "its token"
                } else {
                    "no token"
                };
                crate::info!("report refused: HTTP {status} (the node sent {with})");
                None
            }
            Ok((status, _)) => {
                crate::info!("report not accepted: HTTP {status}");
                None
            }
            Err(e) => {
                crate::info!("report not sent: {}", crate::fetch::chain(&e));
                None
            }
        }
    }
}
