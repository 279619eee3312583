//! Node state reports: node-init (at boot) and its agent mode (inside the booted image) send
//! the server only what changed since their last acknowledged report.
//!
//! A node keeps a [`NodeStatus`]; each report carries a [`StateDelta`] computed with
//! [`NodeStatus::diff`] against the status it last reported, a sequence number `seq` and the
//! `base_seq` the delta applies on (0: the delta is against [`NodeStatus::default`], i.e. a
//! full report). A server holding a different `base_seq` for the node asks for a full report
//! by answering [`ReportAck::resend_full`]. The acknowledgement also carries the server's
//! requests (stage a version, reboot, repair drifted layers); fields added later are optional,
//! so older nodes and servers understand each other.

use serde::{Deserialize, Serialize};

use crate::chunk::LayerId;

/// Largest report body a server should accept (bytes of JSON).
pub const MAX_REPORT_BYTES: usize = 64 << 10;

/// The node state machine's states (the server checks transitions).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Default, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum NodeState {
    /// Nothing known yet.
    #[default]
    Unknown,
    /// node-init is up and asking for its assignment.
    Booting,
    /// Downloading layers.
    Fetching,
    /// Verifying cached layers before boot.
    Verifying,
    /// switch_root done: the image's init is starting; health not yet confirmed.
    Booted,
    /// The agent confirmed health of the running version.
    Healthy,
    /// The server was unreachable: booted the last known good version.
    Offline,
    /// A version was abandoned and the previous one booted.
    RolledBack,
    /// node-init cannot boot anything and is waiting to retry or reboot.
    Failed,
}

/// Everything a node reports about itself.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct NodeStatus {
    /// Current state.
    pub state: NodeState,
    /// Role being booted or running.
    pub role: Option<String>,
    /// Version being booted or running.
    pub version: Option<u64>,
    /// Last version confirmed healthy.
    pub last_known_good: Option<u64>,
    /// Boots attempted of the current version without a health confirmation.
    pub boot_count: u32,
    /// Layers present and verified in the node's cache.
    pub cached_layers: Vec<LayerId>,
    /// Cached layers whose hash no longer matches (drift).
    pub drift: Vec<LayerId>,
    /// Last error or notice, human readable.
    pub message: Option<String>,
}

/// The fields of a [`NodeStatus`] that changed; `None` means unchanged. An optional field that
/// became empty is sent as `Some(None)`.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct StateDelta {
    /// New state.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub state: Option<NodeState>,
    /// New role.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub role: Option<Option<String>>,
    /// New version.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub version: Option<Option<u64>>,
    /// New last known good.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub last_known_good: Option<Option<u64>>,
    /// New boot count.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub boot_count: Option<u32>,
    /// New set of cached layers (sent whole when it changed).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cached_layers: Option<Vec<LayerId>>,
    /// New drift set.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub drift: Option<Vec<LayerId>>,
    /// New message.
    #[serde(
        default,
        skip_serializing_if = "Option::is_none",
        deserialize_with = "present"
    )]
    pub message: Option<Option<String>>,
}

/// `POST /api/v1/nodes/by-mac/{mac}/report` body.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StateReport {
    /// The node's boot MAC (lower-case, colon separated).
    pub mac: String,
    /// This report's sequence number (strictly increasing per node boot of node-init/agent).
    pub seq: u64,
    /// The `seq` of the report this delta applies on; 0 = against the default status.
    pub base_seq: u64,
    /// What changed.
    pub delta: StateDelta,
}

/// The server's answer to a report.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct ReportAck {
    /// The last `seq` the server applied.
    pub applied_seq: u64,
    /// The server's base did not match: send a full report (`base_seq` 0) next.
    #[serde(default)]
    pub resend_full: bool,
    /// Download this version of the node's image into the cache in the background (its
    /// manifest: `GET .../manifest?version=N`) without booting it; report the layers in
    /// `cached_layers` once they are verified. Absent: nothing to stage.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stage: Option<u64>,
    /// Reboot now into the version the node's manifest names (an activation or a rollback).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub reboot: bool,
    /// Cached layers to fetch again (drift repair: their hash no longer matches).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub repair: Vec<LayerId>,
}

/// A field that is present (even as `null`) is `Some`: `null` means "became empty".
fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

impl StateDelta {
    /// True if nothing changed.
    pub fn is_empty(&self) -> bool {
        self == &Self::default()
    }
}

fn changed<T: PartialEq + Clone>(old: &T, new: &T) -> Option<T> {
    (old != new).then(|| new.clone())
}

impl NodeStatus {
    /// What changed from `self` to `newer`.
    pub fn diff(&self, newer: &NodeStatus) -> StateDelta {
        StateDelta {
            state: changed(&self.state, &newer.state),
            role: changed(&self.role, &newer.role),
            version: changed(&self.version, &newer.version),
            last_known_good: changed(&self.last_known_good, &newer.last_known_good),
            boot_count: changed(&self.boot_count, &newer.boot_count),
            cached_layers: changed(&self.cached_layers, &newer.cached_layers),
            drift: changed(&self.drift, &newer.drift),
            message: changed(&self.message, &newer.message),
        }
    }

    /// Applies a delta in place.
    pub fn apply(&mut self, d: &StateDelta) {
        if let Some(v) = d.state {
            self.state = v;
        }
        if let Some(v) = &d.role {
            self.role.clone_from(v);
        }
        if let Some(v) = d.version {
            self.version = v;
        }
        if let Some(v) = d.last_known_good {
            self.last_known_good = v;
        }
        if let Some(v) = d.boot_count {
            self.boot_count = v;
        }
        if let Some(v) = &d.cached_layers {
            self.cached_layers.clone_from(v);
        }
        if let Some(v) = &d.drift {
            self.drift.clone_from(v);
        }
        if let Some(v) = &d.message {
            self.message.clone_from(v);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::chunk::Digest;
    use proptest::prelude::*;

    fn any_state() -> impl Strategy<Value = NodeState> {
        prop_oneof![
            Just(NodeState::Unknown),
            Just(NodeState::Booting),
            Just(NodeState::Fetching),
            Just(NodeState::Verifying),
            Just(NodeState::Booted),
            Just(NodeState::Healthy),
            Just(NodeState::Offline),
            Just(NodeState::RolledBack),
            Just(NodeState::Failed),
        ]
    }

    prop_compose! {
        fn any_status()(
            state in any_state(),
            role in proptest::option::of("[a-z]{1,8}"),
            version in proptest::option::of(any::<u64>()),
            last_known_good in proptest::option::of(any::<u64>()),
            boot_count in any::<u32>(),
            cached in proptest::collection::vec(any::<[u8; 32]>(), 0..3),
            drift in proptest::collection::vec(any::<[u8; 32]>(), 0..2),
            message in proptest::option::of(".{0,20}"),
        ) -> NodeStatus {
            NodeStatus {
                state, role, version, last_known_good, boot_count,
                cached_layers: cached.into_iter().map(Digest).collect(),
                drift: drift.into_iter().map(Digest).collect(),
                message,
            }
        }
    }

    #[test]
    fn unchanged_status_gives_empty_delta_and_small_json() {
        let s = NodeStatus {
            state: NodeState::Healthy,
            version: Some(2),
            ..Default::default()
        };
        let d = s.diff(&s.clone());
        assert!(d.is_empty());
        assert_eq!(serde_json::to_string(&d).unwrap(), "{}");
    }

    #[test]
    fn cleared_field_is_sent() {
        let a = NodeStatus {
            message: Some("x".into()),
            ..Default::default()
        };
        let b = NodeStatus::default();
        let d = a.diff(&b);
        assert_eq!(d.message, Some(None));
        let json = serde_json::to_string(&d).unwrap();
        let back: StateDelta = serde_json::from_str(&json).unwrap();
        let mut c = a.clone();
        c.apply(&back);
        assert_eq!(c, b);
    }

    proptest! {
        #[test]
        fn diff_then_apply_gives_newer(a in any_status(), b in any_status()) {
            let d = a.diff(&b);
            let json = serde_json::to_string(&StateReport {
                mac: "52:54:00:00:00:01".into(), seq: 2, base_seq: 1, delta: d,
            }).unwrap();
            let r: StateReport = serde_json::from_str(&json).unwrap();
            let mut c = a.clone();
            c.apply(&r.delta);
            prop_assert_eq!(c, b);
        }
    }
}
