//! Which version to boot: boot counting and rollback, as A/B update systems do it. Pure: the
//! caller passes the saved [`State`], what the server offered, and what the cache holds; it
//! gets a [`Choice`] and the state to save *before* booting.
//!
//! Rules:
//! - A newly offered version becomes `current` (the old one `previous`) with `boot_count` 1
//!   and is not confirmed. Each further boot of an unconfirmed `current` increments the count.
//! - When the count has reached the manifest's `boot_tries` and the agent never confirmed
//!   health, the version is marked failed and the node boots its last known good version. It
//!   stays failed (the node keeps booting last known good) until the server offers something
//!   else, so a bad version cannot boot-loop the node.
//! - Health confirmation (the agent, [`confirm`]) makes `current` the last known good.
//! - Offering the last known good version again (an operator's rollback) boots it at once as
//!   confirmed: no tries, no download.
//! - Server unreachable: boot the last known good version if it is cached, else `current`.

use serde::{Deserialize, Serialize};

/// Most failed versions remembered.
pub const MAX_FAILED: usize = 8;

/// A bootable version: an image version in a role.
#[derive(Debug, Clone, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub struct Entry {
    /// Image name.
    pub image: String,
    /// Role.
    pub role: String,
    /// Version.
    pub version: u64,
}

impl Entry {
    /// The entry a manifest describes.
    pub fn of(m: &wire::manifest::Manifest) -> Self {
        Self {
            image: m.image.clone(),
            role: m.role.clone(),
            version: m.version,
        }
    }
}

/// Saved boot state (`state.json`).
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize)]
#[serde(default)]
pub struct State {
    /// The version booted last.
    pub current: Option<Entry>,
    /// The version booted before `current` was activated.
    pub previous: Option<Entry>,
    /// The last version whose health was confirmed.
    pub last_known_good: Option<Entry>,
    /// Boots of `current` since activation without confirmation.
    pub boot_count: u32,
    /// Tries `current` gets (from its manifest).
    pub boot_tries: u32,
    /// `current`'s health was confirmed.
    pub confirmed: bool,
    /// Versions that ran out of tries.
    pub failed: Vec<Entry>,
}

/// What the server said.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Offer {
    /// A verified manifest for this entry, granting `tries` boots.
    Assigned {
        /// The entry.
        entry: Entry,
        /// Its boot tries.
        tries: u32,
    },
    /// The server could not be reached (or `strata.mode=lkg`).
    Unreachable,
}

/// Why an entry was chosen.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Why {
    /// Newly activated (first try).
    New,
    /// Confirmed healthy before.
    Confirmed,
    /// Another try of an unconfirmed version.
    Trying {
        /// This boot's attempt number (1-based).
        attempt: u32,
        /// Tries granted.
        of: u32,
    },
    /// Rolled back from a version that failed its tries.
    Rollback {
        /// The failed version.
        from: Entry,
    },
    /// Server unreachable.
    Offline,
    /// Operator rollback: the server offered the last known good version.
    KnownGood,
}

/// The decision.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Choice {
    /// Boot this entry.
    Boot {
        /// The entry.
        entry: Entry,
        /// Why.
        why: Why,
    },
    /// Nothing bootable (no offer, nothing cached).
    Nothing,
}

/// Decides what to boot. `cached(e)` tells whether `e` can boot without downloading.
pub fn decide(state: &State, offer: &Offer, cached: impl Fn(&Entry) -> bool) -> (Choice, State) {
    let mut s = state.clone();
    let lkg_cached = s.last_known_good.clone().filter(|e| cached(e));
    match offer {
        Offer::Unreachable => {
            if let Some(e) = lkg_cached {
                return (
                    Choice::Boot {
                        entry: e,
                        why: Why::Offline,
                    },
                    s,
                );
            }
            match s.current.clone().filter(|e| cached(e)) {
                Some(e) => {
                    if !s.confirmed {
                        s.boot_count = s.boot_count.saturating_add(1);
                    }
                    (
                        Choice::Boot {
                            entry: e,
                            why: Why::Offline,
                        },
                        s,
                    )
                }
                None => (Choice::Nothing, s),
            }
        }
        Offer::Assigned { entry, tries } => {
            let tries = (*tries).max(1);
            if s.failed.contains(entry) {
                if let Some(good) = lkg_cached.clone().filter(|g| g != entry) {
                    s.current = Some(good.clone());
                    s.confirmed = true;
                    s.boot_count = 0;
                    return (
                        Choice::Boot {
                            entry: good,
                            why: Why::Rollback {
                                from: entry.clone(),
                            },
                        },
                        s,
                    );
                }
                // Nothing better to boot: try it again rather than nothing.
                s.failed.retain(|f| f != entry);
            }
            if s.current.as_ref() == Some(entry) {
                if s.confirmed {
                    return (
                        Choice::Boot {
                            entry: entry.clone(),
                            why: Why::Confirmed,
                        },
                        s,
                    );
                }
                if s.boot_count < s.boot_tries.max(1) {
                    s.boot_count += 1;
                    let why = Why::Trying {
                        attempt: s.boot_count,
                        of: s.boot_tries.max(1),
                    };
                    return (
                        Choice::Boot {
                            entry: entry.clone(),
                            why,
                        },
                        s,
                    );
                }
                // Out of tries, never confirmed.
                if let Some(good) = lkg_cached.clone().filter(|g| g != entry) {
                    s.failed.push(entry.clone());
                    if s.failed.len() > MAX_FAILED {
                        s.failed.remove(0);
                    }
                    s.current = Some(good.clone());
                    s.previous = Some(entry.clone());
                    s.confirmed = true;
                    s.boot_count = 0;
                    return (
                        Choice::Boot {
                            entry: good,
                            why: Why::Rollback {
                                from: entry.clone(),
                            },
                        },
                        s,
                    );
                }
                s.boot_count = s.boot_count.saturating_add(1);
                let why = Why::Trying {
                    attempt: s.boot_count,
                    of: s.boot_tries.max(1),
                };
                return (
                    Choice::Boot {
                        entry: entry.clone(),
                        why,
                    },
                    s,
                );
            }
            // A different entry: activate it.
            if s.current.is_some() {
                s.previous = s.current.take();
            }
            s.current = Some(entry.clone());
            s.boot_tries = tries;
            if s.last_known_good.as_ref() == Some(entry) {
                s.confirmed = true;
                s.boot_count = 0;
                return (
                    Choice::Boot {
                        entry: entry.clone(),
                        why: Why::KnownGood,
                    },
                    s,
                );
            }
            s.confirmed = false;
            s.boot_count = 1;
            (
                Choice::Boot {
                    entry: entry.clone(),
                    why: Why::New,
                },
                s,
            )
        }
    }
}

/// The agent confirmed the health of `running`: it becomes the last known good version.
/// Returns false (and changes nothing) if `running` is not `current`.
pub fn confirm(state: &mut State, running: &Entry) -> bool {
    if state.current.as_ref() != Some(running) {
        return false;
    }
    state.confirmed = true;
    state.boot_count = 0;
    state.last_known_good = Some(running.clone());
    state.failed.retain(|f| f != running);
    true
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    fn v(n: u64) -> Entry {
        Entry {
            image: "busybox".into(),
            role: "web".into(),
            version: n,
        }
    }
    fn offer(n: u64, tries: u32) -> Offer {
        Offer::Assigned { entry: v(n), tries }
    }
    fn boot(s: &mut State, o: &Offer) -> Choice {
        let (c, next) = decide(s, o, |_| true);
        *s = next;
        c
    }

    #[test]
    fn first_boot_then_confirm() {
        let mut s = State::default();
        assert_eq!(
            boot(&mut s, &offer(1, 3)),
            Choice::Boot {
                entry: v(1),
                why: Why::New
            }
        );
        assert!(confirm(&mut s, &v(1)));
        assert_eq!(s.last_known_good, Some(v(1)));
        assert_eq!(
            boot(&mut s, &offer(1, 3)),
            Choice::Boot {
                entry: v(1),
                why: Why::Confirmed
            }
        );
    }

    #[test]
    fn unconfirmed_version_rolls_back_after_its_tries_and_stays_back() {
        let mut s = State::default();
        boot(&mut s, &offer(2, 2));
        confirm(&mut s, &v(2));
        assert_eq!(
            boot(&mut s, &offer(3, 2)),
            Choice::Boot {
                entry: v(3),
                why: Why::New
            }
        );
        assert_eq!(
            boot(&mut s, &offer(3, 2)),
            Choice::Boot {
                entry: v(3),
                why: Why::Trying { attempt: 2, of: 2 }
            }
        );
        assert_eq!(
            boot(&mut s, &offer(3, 2)),
            Choice::Boot {
                entry: v(2),
                why: Why::Rollback { from: v(3) }
            }
        );
        // The server keeps offering v3: the node stays on v2.
        assert_eq!(
            boot(&mut s, &offer(3, 2)),
            Choice::Boot {
                entry: v(2),
                why: Why::Rollback { from: v(3) }
            }
        );
        // A new version is tried.
        assert_eq!(
            boot(&mut s, &offer(4, 2)),
            Choice::Boot {
                entry: v(4),
                why: Why::New
            }
        );
    }

    #[test]
    fn operator_rollback_to_known_good_is_confirmed_at_once() {
        let mut s = State::default();
        boot(&mut s, &offer(1, 3));
        confirm(&mut s, &v(1));
        boot(&mut s, &offer(2, 3));
        assert_eq!(
            boot(&mut s, &offer(1, 3)),
            Choice::Boot {
                entry: v(1),
                why: Why::KnownGood
            }
        );
        assert!(s.confirmed);
        assert_eq!(s.previous, Some(v(2)));
    }

    #[test]
    fn offline_boots_last_known_good_if_cached() {
        let mut s = State::default();
        boot(&mut s, &offer(1, 3));
        confirm(&mut s, &v(1));
        boot(&mut s, &offer(2, 3));
        let (c, _) = decide(&s, &Offer::Unreachable, |_| true);
        assert_eq!(
            c,
            Choice::Boot {
                entry: v(1),
                why: Why::Offline
            }
        );
        let (c, _) = decide(&s, &Offer::Unreachable, |e| e == &v(2));
        assert_eq!(
            c,
            Choice::Boot {
                entry: v(2),
                why: Why::Offline
            }
        );
        let (c, _) = decide(&s, &Offer::Unreachable, |_| false);
        assert_eq!(c, Choice::Nothing);
    }

    fn any_offer() -> impl Strategy<Value = Offer> {
        prop_oneof![
            1 => Just(Offer::Unreachable),
            4 => (1u64..5, 1u32..4).prop_map(|(n, t)| offer(n, t)),
        ]
    }

    proptest! {
        /// Whatever the sequence of offers, confirmations and cache contents: an unconfirmed
        /// version never boots more than its tries while a cached known-good one exists, and a
        /// failed version is never chosen while the known good version is cached.
        #[test]
        fn tries_are_bounded(steps in proptest::collection::vec((any_offer(), any::<bool>()), 1..40)) {
            let mut s = State::default();
            let mut run_len = 0u32;
            let mut last: Option<Entry> = None;
            for (o, healthy) in steps {
                let (c, next) = decide(&s, &o, |_| true);
                s = next;
                if let Choice::Boot { entry, why } = c {
                    if let Offer::Assigned { entry: offered, .. } = &o {
                        if s.failed.contains(offered) && s.last_known_good.as_ref() != Some(offered) {
                            prop_assert_ne!(&entry, offered);
                        }
                    }
                    if !s.confirmed && s.last_known_good.is_some() && s.last_known_good.as_ref() != Some(&entry) {
                        if last.as_ref() == Some(&entry) { run_len += 1 } else { run_len = 1 }
                        prop_assert!(run_len <= s.boot_tries.max(1), "{:?} booted {} times", why, run_len);
                    } else {
                        run_len = 0;
                    }
                    last = Some(entry.clone());
                    if healthy {
                        confirm(&mut s, &entry);
                    }
                }
                prop_assert!(s.failed.len() <= MAX_FAILED);
            }
        }
    }
}
