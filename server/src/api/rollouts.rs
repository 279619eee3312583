//! `/api/v1/rollouts` (plan, approve, apply, pause, resume, abort), `/api/v1/events` and
//! `/api/v1/tokens`.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::auth::Caller;
use super::nodes::NewToken;
use super::{check_name, ApiError, ApiState, Body, Q};
use crate::db::events::Event;
use crate::db::rollouts::{Action, Rollout};
use crate::db::tokens::{Scope, TokenInfo};
use crate::orchestrator::plan::RolloutSpec;

/// Most roles in one rollout.
const MAX_ROLES: usize = 64;

fn parse_id(text: &str) -> Result<u64, ApiError> {
    text.parse::<u64>()
        .ok()
        .filter(|&n| n > 0 && n < i64::MAX as u64)
        .ok_or_else(|| {
            ApiError::invalid(format!(
                "not an id: {:?}",
                text.chars().take(32).collect::<String>()
            ))
        })
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    #[serde(default)]
    active: bool,
}

pub(super) async fn list(
    State(st): State<ApiState>,
    caller: Caller,
    Q(q): Q<ListQuery>,
) -> Result<Json<Vec<Rollout>>, ApiError> {
    caller.viewer()?;
    Ok(Json(
        st.db
            .call(move |c| crate::db::rollouts::list(c, q.active))
            .await?,
    ))
}

pub(super) async fn create(
    State(st): State<ApiState>,
    caller: Caller,
    Body(spec): Body<RolloutSpec>,
) -> Result<(StatusCode, Json<Rollout>), ApiError> {
    caller.admin()?;
    if spec.roles.len() > MAX_ROLES {
        return Err(ApiError::invalid(format!("more than {MAX_ROLES} roles")));
    }
    for r in &spec.roles {
        check_name("role", &r.role)?;
        check_name("image", &r.to.image)?;
    }
    let actor = caller.actor();
    st.fleet.flush().await?;
    let r = st
        .db
        .call(move |c| {
            let plan = crate::db::rollouts::plan(c, &spec)?
                .map_err(|e| crate::db::DbError::Conflict(format!("cannot plan: {e}")))?;
            crate::db::rollouts::create(c, &plan, &actor)
        })
        .await
        .map_err(|e| match e {
            crate::db::DbError::Conflict(m) => ApiError::invalid(m),
            other => other.into(),
        })?;
    Ok((StatusCode::CREATED, Json(r)))
}

pub(super) async fn get_one(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<Json<Rollout>, ApiError> {
    caller.viewer()?;
    let id = parse_id(&id)?;
    Ok(Json(
        st.db.call(move |c| crate::db::rollouts::get(c, id)).await?,
    ))
}

/// `POST /api/v1/rollouts/{id}/approve` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ActBody {
    /// The plan digest being approved (approve only).
    #[serde(default)]
    pub digest: Option<String>,
}

pub(super) async fn act(
    State(st): State<ApiState>,
    caller: Caller,
    Path((id, action)): Path<(String, String)>,
    Body(body): Body<ActBody>,
) -> Result<Json<Rollout>, ApiError> {
    caller.admin()?;
    let id = parse_id(&id)?;
    let action = match (action.as_str(), body.digest) {
        ("approve", Some(d)) => Action::Approve(d),
        ("approve", None) => {
            return Err(ApiError::invalid(
                "approve needs the plan's digest: {\"digest\": \"...\"}",
            ))
        }
        (_, Some(_)) => return Err(ApiError::invalid("digest is only for approve")),
        ("apply", None) => Action::Apply,
        ("pause", None) => Action::Pause,
        ("resume", None) => Action::Resume,
        ("abort", None) => Action::Abort,
        (other, None) => {
            return Err(ApiError::NotFound {
                kind: "rollout action",
                id: other.chars().take(32).collect(),
            });
        }
    };
    let actor = caller.actor();
    let r = st
        .db
        .call(move |c| crate::db::rollouts::act(c, id, &action, &actor))
        .await?;
    st.wake.notify_waiters();
    Ok(Json(r))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct EventQuery {
    #[serde(default)]
    after: u64,
    limit: Option<u32>,
    subject: Option<String>,
    kind: Option<String>,
}

pub(super) async fn events(
    State(st): State<ApiState>,
    caller: Caller,
    Q(q): Q<EventQuery>,
) -> Result<Json<Vec<Event>>, ApiError> {
    caller.viewer()?;
    let limit = q.limit.unwrap_or(1000).clamp(1, 10_000);
    st.fleet.flush().await?;
    Ok(Json(
        st.db
            .call(move |c| {
                crate::db::events::list(c, q.after, limit, q.subject.as_deref(), q.kind.as_deref())
            })
            .await?,
    ))
}

pub(super) async fn tokens(
    State(st): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<TokenInfo>>, ApiError> {
    caller.admin()?;
    Ok(Json(st.db.call(|c| crate::db::tokens::list(c)).await?))
}

/// `POST /api/v1/tokens` body.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TokenRequest {
    /// `admin` or `viewer` (node tokens come from `POST /api/v1/nodes/{mac}/tokens`).
    pub scope: Scope,
    /// Label.
    pub name: String,
}

pub(super) async fn create_token(
    State(st): State<ApiState>,
    caller: Caller,
    Body(req): Body<TokenRequest>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    caller.admin()?;
    if req.scope == Scope::Node {
        return Err(ApiError::invalid(
            "node tokens are made with POST /api/v1/nodes/{mac}/tokens",
        ));
    }
    if req.name.is_empty() || req.name.len() > 128 || req.name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "token name must be 1-128 printable characters",
        ));
    }
    let actor = caller.actor();
    let (info, token) = st
        .db
        .call(move |c| {
            let out = crate::db::tokens::create(c, req.scope, None, &req.name)?;
            crate::db::events::record(
                c,
                &crate::db::events::NewEvent::now(
                    actor,
                    "token.created",
                    format!("token/{}", out.0.id),
                    serde_json::json!({ "scope": req.scope }),
                ),
            )?;
            Ok(out)
        })
        .await?;
    Ok((StatusCode::CREATED, Json(NewToken { token, info })))
}

pub(super) async fn revoke_token(
    State(st): State<ApiState>,
    caller: Caller,
    Path(id): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.admin()?;
    let id = parse_id(&id)?;
    let actor = caller.actor();
    st.db
        .call(move |c| {
            let t = crate::db::tokens::revoke(c, id)?;
            if let Some(mac) = &t.node {
                crate::db::nodes::bump(c, mac)?;
            }
            crate::db::events::record(
                c,
                &crate::db::events::NewEvent::now(
                    actor,
                    "token.revoked",
                    format!("token/{id}"),
                    serde_json::json!({}),
                ),
            )
        })
        .await?;
    st.tokens.clear();
    st.fleet.flush().await?;
    Ok(StatusCode::NO_CONTENT)
}
