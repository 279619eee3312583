//! Bearer-token authentication: `Authorization: Bearer stk_...`. Operators are `admin`
//! (changes anything) or `viewer` (reads); a `node` token covers one node's own routes.
//!
//! Lookups are cached, so a report does not wait on the database (orch_load measured a p99 of
//! 65 ms with one lookup per report: the database thread's flushes and checkpoints are on the
//! report path then). Revocation in this process is immediate (the cache is cleared). For
//! another process sharing the database: an operator token's lookup is trusted for
//! [`CACHE_TTL`]; a node token's for as long as its node's desired-state revision is unchanged
//! (revoking, rotating or first use bumps it, and every process picks that up at its next
//! flush, 500 ms) and at most [`NODE_CACHE_TTL`].

use std::collections::HashMap;
use std::sync::Mutex;
use std::time::{Duration, Instant};

use axum::extract::FromRequestParts;
use axum::http::request::Parts;

use super::{ApiError, ApiState};
use crate::db::tokens::{self, Scope, TokenInfo};

/// How long an operator token's lookup (or an unknown token's) is trusted.
pub const CACHE_TTL: Duration = Duration::from_secs(5);

/// How long a node token's lookup is trusted while its node's revision is unchanged.
pub const NODE_CACHE_TTL: Duration = Duration::from_secs(600);

/// Most cached lookups (a fleet of 10,000 nodes with a token each fits).
const MAX_CACHED: usize = 50_000;

/// A cached lookup: the token (None: unknown), when it was read, and for a node token its
/// node's revision then.
type Cached = (Option<TokenInfo>, Instant, Option<u64>);

/// Token lookups.
#[derive(Default)]
pub struct TokenCache {
    map: Mutex<HashMap<[u8; 32], Cached>>,
}

impl TokenCache {
    /// Forgets everything (after a revocation).
    pub fn clear(&self) {
        self.map.lock().unwrap_or_else(|e| e.into_inner()).clear();
    }
}

/// Who is calling.
#[derive(Debug, Clone)]
pub enum Caller {
    /// No token.
    Anonymous,
    /// An operator or node token.
    Token(TokenInfo),
}

impl Caller {
    /// The actor name recorded in events.
    pub fn actor(&self) -> String {
        match self {
            Caller::Anonymous => "anonymous".into(),
            Caller::Token(t) => format!("token:{}:{}", t.id, t.name),
        }
    }

    /// Allows operators (admin or viewer).
    pub fn viewer(&self) -> Result<(), ApiError> {
        match self {
            Caller::Token(t) if matches!(t.scope, Scope::Admin | Scope::Viewer) => Ok(()),
            Caller::Token(_) => Err(ApiError::forbidden(
                "node tokens cannot use operator routes",
            )),
            Caller::Anonymous => Err(ApiError::Unauthenticated {
                message: "a bearer token is required".into(),
            }),
        }
    }

    /// Allows admins.
    pub fn admin(&self) -> Result<(), ApiError> {
        self.viewer()?;
        match self {
            Caller::Token(t) if t.scope == Scope::Admin => Ok(()),
            _ => Err(ApiError::forbidden("this needs an admin token")),
        }
    }

    /// Allows the node's own token, an admin (`admin_ok`), or no token (`anonymous_ok`: the
    /// manifest of any node, a report of a node that has not authenticated with its token yet;
    /// docs/api.md).
    pub fn node(&self, mac: &str, anonymous_ok: bool, admin_ok: bool) -> Result<(), ApiError> {
        match self {
            Caller::Token(t) if t.scope == Scope::Node && t.node.as_deref() == Some(mac) => Ok(()),
            Caller::Token(t) if t.scope == Scope::Node => {
                Err(ApiError::forbidden("a node token covers only its own node"))
            }
            Caller::Token(t) if admin_ok && t.scope == Scope::Admin => Ok(()),
            Caller::Token(_) => Err(ApiError::forbidden("this route is for the node itself")),
            Caller::Anonymous if anonymous_ok => Ok(()),
            Caller::Anonymous => Err(ApiError::Unauthenticated {
                message: format!("node {mac} has used its token: send it"),
            }),
        }
    }

    /// The node token, if the caller holds one.
    pub fn node_token(&self) -> Option<&TokenInfo> {
        match self {
            Caller::Token(t) if t.scope == Scope::Node => Some(t),
            _ => None,
        }
    }
}

impl FromRequestParts<ApiState> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut Parts,
        state: &ApiState,
    ) -> Result<Self, Self::Rejection> {
        let Some(value) = parts.headers.get(axum::http::header::AUTHORIZATION) else {
            return Ok(Caller::Anonymous);
        };
        let secret = value
            .to_str()
            .ok()
            .and_then(|v| v.strip_prefix("Bearer "))
            .map(str::trim)
            .filter(|s| s.len() <= 128)
            .ok_or_else(|| ApiError::Unauthenticated {
                message: "Authorization must be `Bearer <token>`".into(),
            })?
            .to_owned();
        let h = tokens::hash(&secret);
        let node_rev = |t: &TokenInfo| {
            t.node
                .as_deref()
                .filter(|_| t.scope == Scope::Node)
                .and_then(|m| state.fleet.node_rev(m))
        };
        let cached = {
            let map = state.tokens.map.lock().unwrap_or_else(|e| e.into_inner());
            map.get(&h)
                .filter(|(t, at, rev)| match t {
                    Some(t) if t.scope == Scope::Node => {
                        at.elapsed() < NODE_CACHE_TTL && rev.is_some() && *rev == node_rev(t)
                    }
                    _ => at.elapsed() < CACHE_TTL,
                })
                .map(|(t, _, _)| t.clone())
        };
        let info = match cached {
            Some(t) => t,
            None => {
                let t = state.db.call(move |c| tokens::lookup(c, &secret)).await?;
                let rev = t.as_ref().and_then(node_rev);
                let mut map = state.tokens.map.lock().unwrap_or_else(|e| e.into_inner());
                if map.len() > MAX_CACHED {
                    map.clear();
                }
                map.insert(h, (t.clone(), Instant::now(), rev));
                t
            }
        };
        info.map(Caller::Token)
            .ok_or_else(|| ApiError::Unauthenticated {
                message: "unknown or revoked token".into(),
            })
    }
}
