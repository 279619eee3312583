//! `/api/v1/nodes`: operators list, rename, place (role, site), pin, reboot and delete nodes,
//! and issue node tokens; nodes read their manifest and report their state.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::{Deserialize, Serialize};
use wire::manifest::SignedManifest;
use wire::report::{ReportAck, StateReport};

use super::auth::Caller;
use super::{check_name, parse_mac, ApiError, ApiState, Body, Q};
use crate::db::nodes::{NodeChange, NodeRow};
use crate::db::tokens::{Scope, TokenInfo};
use crate::orchestrator::VersionRef;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ListQuery {
    role: Option<String>,
}

pub(super) async fn list(
    State(st): State<ApiState>,
    caller: Caller,
    Q(q): Q<ListQuery>,
) -> Result<Json<Vec<NodeRow>>, ApiError> {
    caller.viewer()?;
    st.fleet.flush().await?;
    Ok(Json(
        st.db
            .call(move |c| crate::db::nodes::list(c, q.role.as_deref()))
            .await?,
    ))
}

pub(super) async fn get_one(
    State(st): State<ApiState>,
    caller: Caller,
    Path(mac): Path<String>,
) -> Result<Json<NodeRow>, ApiError> {
    caller.viewer()?;
    let mac = parse_mac(&mac)?;
    st.fleet.flush().await?;
    let m = mac.clone();
    let row = st.db.call(move |c| crate::db::nodes::get(c, &m)).await?;
    Ok(Json(row.ok_or(ApiError::NotFound {
        kind: "node",
        id: mac,
    })?))
}

fn present<'de, D, T>(d: D) -> Result<Option<Option<T>>, D::Error>
where
    D: serde::Deserializer<'de>,
    T: Deserialize<'de>,
{
    Option::<T>::deserialize(d).map(Some)
}

/// `PATCH /api/v1/nodes/{mac}`.
#[derive(Debug, Deserialize, Serialize)]
#[serde(deny_unknown_fields)]
pub struct NodePatch {
    /// New name.
    #[serde(default)]
    pub name: Option<String>,
    /// New role.
    #[serde(default)]
    pub role: Option<String>,
    /// New site (`null` clears).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub site: Option<Option<String>>,
    /// New pin (`null` clears: the node follows its site and role).
    #[serde(
        default,
        deserialize_with = "present",
        skip_serializing_if = "Option::is_none"
    )]
    pub pin: Option<Option<VersionRef>>,
    /// Ask the node to reboot.
    #[serde(default)]
    pub reboot: bool,
}

pub(super) async fn patch(
    State(st): State<ApiState>,
    caller: Caller,
    Path(mac): Path<String>,
    Body(p): Body<NodePatch>,
) -> Result<Json<NodeRow>, ApiError> {
    caller.admin()?;
    let mac = parse_mac(&mac)?;
    if let Some(n) = &p.name {
        check_name("node", n)?;
    }
    if let Some(r) = &p.role {
        check_name("role", r)?;
    }
    if let Some(Some(s)) = &p.site {
        check_name("site", s)?;
    }
    let change = NodeChange {
        name: p.name,
        role: p.role,
        site: p.site,
        pin: p.pin,
        reboot: p.reboot,
    };
    let actor = caller.actor();
    st.fleet.flush().await?;
    let row = st
        .db
        .call(move |c| crate::db::nodes::change(c, &mac, &change, &actor))
        .await?;
    st.fleet.flush().await?;
    Ok(Json(row))
}

pub(super) async fn delete(
    State(st): State<ApiState>,
    caller: Caller,
    Path(mac): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.admin()?;
    let mac = parse_mac(&mac)?;
    let actor = caller.actor();
    st.fleet.flush().await?;
    let m = mac.clone();
    st.db
        .call(move |c| crate::db::nodes::delete(c, &m, &actor))
        .await?;
    st.fleet.forget(&mac);
    st.tokens.clear();
    Ok(StatusCode::NO_CONTENT)
}

/// `POST /api/v1/nodes/{mac}/tokens` body.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct NodeTokenRequest {
    /// Label.
    #[serde(default)]
    pub name: Option<String>,
}

/// A token just created: the secret is shown once.
#[derive(Debug, Serialize)]
pub struct NewToken {
    /// The secret.
    pub token: String,
    /// Its record.
    pub info: TokenInfo,
}

pub(super) async fn create_token(
    State(st): State<ApiState>,
    caller: Caller,
    Path(mac): Path<String>,
    Body(req): Body<NodeTokenRequest>,
) -> Result<(StatusCode, Json<NewToken>), ApiError> {
    caller.admin()?;
    let mac = parse_mac(&mac)?;
    let name = req.name.unwrap_or_else(|| format!("node {mac}"));
    if name.len() > 128 || name.chars().any(char::is_control) {
        return Err(ApiError::invalid(
            "token name must be at most 128 printable characters",
        ));
    }
    let actor = caller.actor();
    let (info, token) = st
        .db
        .call(move |c| {
            crate::db::nodes::require(c, &mac)?;
            let out = crate::db::tokens::create(c, Scope::Node, Some(&mac), &name)?;
            crate::db::nodes::bump(c, &mac)?;
            crate::db::events::record(
                c,
                &crate::db::events::NewEvent::now(
                    actor,
                    "token.created",
                    format!("node/{mac}"),
                    serde_json::json!({ "id": out.0.id }),
                ),
            )?;
            Ok(out)
        })
        .await?;
    st.fleet.flush().await?;
    Ok((StatusCode::CREATED, Json(NewToken { token, info })))
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ManifestQuery {
    version: Option<u64>,
}

pub(super) async fn manifest(
    State(st): State<ApiState>,
    caller: Result<Caller, ApiError>,
    Path(mac): Path<String>,
    Q(q): Q<ManifestQuery>,
) -> Result<Json<SignedManifest>, ApiError> {
    // Open to anonymous callers, so a token it does not know (a revoked one still in a node's
    // cache) counts as none rather than locking the node out of its assignment.
    let caller = caller.unwrap_or(Caller::Anonymous);
    let mac = parse_mac(&mac)?;
    caller.node(&mac, true, true)?;
    first_use(&st, &caller, &mac).await?;
    Ok(Json(st.fleet.signed_manifest(&mac, q.version).await?))
}

pub(super) async fn report(
    State(st): State<ApiState>,
    caller: Caller,
    Path(mac): Path<String>,
    Body(report): Body<StateReport>,
) -> Result<Json<ReportAck>, ApiError> {
    let mac = parse_mac(&mac)?;
    caller.node(&mac, !st.fleet.enrolled(&mac), false)?;
    first_use(&st, &caller, &mac).await?;
    Ok(Json(st.fleet.record_report(&mac, report).await?))
}

/// A node token authenticated a request of its node: record its first use (anonymous reports
/// stop; older layer-token generations are revoked, and their cached lookups dropped).
async fn first_use(st: &ApiState, caller: &Caller, mac: &str) -> Result<(), ApiError> {
    if let Some(t) = caller.node_token() {
        if !st.fleet.token_used(mac, t).await?.is_empty() {
            st.tokens.clear();
        }
    }
    Ok(())
}

pub(super) async fn rotate_token(
    State(st): State<ApiState>,
    caller: Caller,
    Path(mac): Path<String>,
) -> Result<(StatusCode, Json<TokenInfo>), ApiError> {
    caller.admin()?;
    let mac = parse_mac(&mac)?;
    let actor = caller.actor();
    let key = st.fleet.signing_key().clone();
    let info = st
        .db
        .call(move |c| {
            crate::db::nodes::require(c, &mac)?;
            crate::db::tokens::rotate(
                c,
                &mac,
                &|gen| crate::keys::node_token(&key, &mac, gen),
                &actor,
            )
        })
        .await?;
    st.fleet.flush().await?;
    Ok((StatusCode::CREATED, Json(info)))
}
