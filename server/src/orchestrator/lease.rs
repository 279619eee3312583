//! Rollout leases: only the worker holding a rollout's lease acts on it. A lease has a holder,
//! an expiry (renewed by heartbeats) and a fencing token that increases on every takeover;
//! every write a worker makes carries its token and is refused unless the token is still the
//! current one and unexpired (`db` checks it in the same transaction as the write).
//!
//! Pure decisions over the stored row; the database applies them inside `BEGIN IMMEDIATE`.

use serde::{Deserialize, Serialize};

/// A lease as stored.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lease {
    /// Worker id (`<host>:<pid>:<random>`).
    pub holder: String,
    /// Fencing token.
    pub token: u64,
    /// Unix milliseconds after which the lease is free.
    pub expires_ms: u64,
}

/// Why a lease operation failed.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum LeaseError {
    /// Someone else holds an unexpired lease.
    #[error("held by {holder} until {expires_ms} (token {token})")]
    Held {
        /// Holder.
        holder: String,
        /// Its token.
        token: u64,
        /// Expiry.
        expires_ms: u64,
    },
    /// The caller's lease expired or was taken over: it must stop acting.
    #[error("lease lost (token {token} is no longer current)")]
    Lost {
        /// The caller's stale token.
        token: u64,
    },
}

/// Takes the lease for `me`. Free or expired: a new token (previous + 1). Already ours and
/// unexpired: renewed with the same token.
pub fn acquire(
    cur: Option<&Lease>,
    me: &str,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Lease, LeaseError> {
    let expires_ms = now_ms.saturating_add(ttl_ms);
    match cur {
        None => Ok(Lease {
            holder: me.to_owned(),
            token: 1,
            expires_ms,
        }),
        Some(l) if l.expires_ms <= now_ms => Ok(Lease {
            holder: me.to_owned(),
            token: l.token.saturating_add(1),
            expires_ms,
        }),
        Some(l) if l.holder == me => Ok(Lease {
            holder: me.to_owned(),
            token: l.token,
            expires_ms,
        }),
        Some(l) => Err(LeaseError::Held {
            holder: l.holder.clone(),
            token: l.token,
            expires_ms: l.expires_ms,
        }),
    }
}

/// Checks that `me` still holds the lease with `token` at `now_ms`.
pub fn check(cur: Option<&Lease>, me: &str, token: u64, now_ms: u64) -> Result<(), LeaseError> {
    match cur {
        Some(l) if l.holder == me && l.token == token && l.expires_ms > now_ms => Ok(()),
        _ => Err(LeaseError::Lost { token }),
    }
}

/// Renews `me`'s lease. Fails once it expired, even if nobody took it: the worker may have
/// been paused past its expiry and must re-acquire (getting a new token) before acting.
pub fn heartbeat(
    cur: Option<&Lease>,
    me: &str,
    token: u64,
    now_ms: u64,
    ttl_ms: u64,
) -> Result<Lease, LeaseError> {
    check(cur, me, token, now_ms)?;
    Ok(Lease {
        holder: me.to_owned(),
        token,
        expires_ms: now_ms.saturating_add(ttl_ms),
    })
}

/// Gives the lease up (expires it now, keeping the token so the next taker gets a higher one).
pub fn release(cur: Option<&Lease>, me: &str, token: u64, now_ms: u64) -> Option<Lease> {
    match cur {
        Some(l) if l.holder == me && l.token == token => Some(Lease {
            expires_ms: now_ms,
            ..l.clone()
        }),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    #[derive(Debug, Clone)]
    enum Ev {
        Acquire(usize),
        Beat(usize),
        Release(usize),
        Tick(u64),
    }

    fn ev() -> impl Strategy<Value = Ev> {
        prop_oneof![
            (0usize..3).prop_map(Ev::Acquire),
            (0usize..3).prop_map(Ev::Beat),
            (0usize..3).prop_map(Ev::Release),
            (1u64..40).prop_map(Ev::Tick),
        ]
    }

    #[test]
    fn takeover_after_expiry_bumps_the_token() {
        let a = acquire(None, "a", 0, 10).unwrap();
        assert_eq!(a.token, 1);
        assert!(matches!(
            acquire(Some(&a), "b", 5, 10),
            Err(LeaseError::Held { .. })
        ));
        let b = acquire(Some(&a), "b", 10, 10).unwrap();
        assert_eq!((b.holder.as_str(), b.token), ("b", 2));
        assert_eq!(
            check(Some(&b), "a", 1, 11),
            Err(LeaseError::Lost { token: 1 })
        );
        assert_eq!(
            heartbeat(Some(&b), "a", 1, 11, 10),
            Err(LeaseError::Lost { token: 1 })
        );
        assert!(check(Some(&b), "b", 2, 19).is_ok());
        assert!(check(Some(&b), "b", 2, 20).is_err());
    }

    proptest! {
        /// Whatever workers do, at any instant at most one passes `check`, and tokens never
        /// go down; a token, once superseded, never passes again.
        #[test]
        fn at_most_one_worker_acts(events in proptest::collection::vec(ev(), 1..60)) {
            let names = ["a", "b", "c"];
            let mut now = 0u64;
            let mut row: Option<Lease> = None;
            let mut tokens: [Option<u64>; 3] = [None; 3];
            let mut max_token = 0u64;
            for e in events {
                match e {
                    Ev::Acquire(i) => if let Ok(l) = acquire(row.as_ref(), names[i], now, 10) {
                        tokens[i] = Some(l.token);
                        row = Some(l);
                    },
                    Ev::Beat(i) => if let Some(t) = tokens[i] {
                        if let Ok(l) = heartbeat(row.as_ref(), names[i], t, now, 10) { row = Some(l); }
                    },
                    Ev::Release(i) => if let Some(t) = tokens[i] {
                        if let Some(l) = release(row.as_ref(), names[i], t, now) { row = Some(l); }
                    },
                    Ev::Tick(d) => now += d,
                }
                if let Some(l) = &row {
                    prop_assert!(l.token >= max_token);
                    max_token = l.token;
                }
                let acting: Vec<usize> = (0..3)
                    .filter(|&i| tokens[i].is_some_and(|t| check(row.as_ref(), names[i], t, now).is_ok()))
                    .collect();
                prop_assert!(acting.len() <= 1, "{:?}", acting);
                for i in acting {
                    prop_assert_eq!(tokens[i], Some(max_token));
                }
            }
        }
    }
}
