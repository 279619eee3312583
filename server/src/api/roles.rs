//! `/api/v1/roles`, `/api/v1/sites`, `/api/v1/images`: desired state.

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::Json;
use serde::Deserialize;

use super::auth::Caller;
use super::{check_name, ApiError, ApiState, Body};
use crate::db::events::NewEvent;
use crate::db::roles::{Override, Role, Site};
use crate::fleet::ImageInfo;
use crate::orchestrator::VersionRef;

pub(super) async fn list(
    State(st): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<Role>>, ApiError> {
    caller.viewer()?;
    Ok(Json(st.db.call(|c| crate::db::roles::list(c)).await?))
}

pub(super) async fn get_one(
    State(st): State<ApiState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Role>, ApiError> {
    caller.viewer()?;
    check_name("role", &name)?;
    let n = name.clone();
    let role = st.db.call(move |c| crate::db::roles::get(c, &n)).await?;
    Ok(Json(role.ok_or(ApiError::NotFound {
        kind: "role",
        id: name,
    })?))
}

/// `PUT /api/v1/roles/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RolePut {
    /// The version the role's nodes run (absent or null: the store's newest for the role).
    #[serde(default)]
    pub version: Option<VersionRef>,
    /// Rollout order (lower first).
    #[serde(default)]
    pub order: i64,
}

pub(super) async fn put(
    State(st): State<ApiState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body<RolePut>,
) -> Result<Json<Role>, ApiError> {
    caller.admin()?;
    check_name("role", &name)?;
    if let Some(v) = &body.version {
        check_name("image", &v.image)?;
    }
    let actor = caller.actor();
    let role = st
        .db
        .call(move |c| {
            let role = crate::db::roles::put(c, &name, body.version.as_ref(), body.order)?;
            crate::db::events::record(
                c,
                &NewEvent::now(
                    actor,
                    "role.put",
                    format!("role/{name}"),
                    serde_json::json!({ "version": role.version, "order": role.order }),
                ),
            )?;
            Ok(role)
        })
        .await?;
    st.fleet.flush().await?;
    Ok(Json(role))
}

pub(super) async fn delete(
    State(st): State<ApiState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.admin()?;
    check_name("role", &name)?;
    let actor = caller.actor();
    st.fleet.flush().await?;
    st.db
        .call(move |c| {
            crate::db::roles::delete(c, &name)?;
            crate::db::events::record(
                c,
                &NewEvent::now(
                    actor,
                    "role.deleted",
                    format!("role/{name}"),
                    serde_json::json!({}),
                ),
            )
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn sites(
    State(st): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<Site>>, ApiError> {
    caller.viewer()?;
    Ok(Json(st.db.call(|c| crate::db::roles::sites(c)).await?))
}

pub(super) async fn site(
    State(st): State<ApiState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<Json<Site>, ApiError> {
    caller.viewer()?;
    check_name("site", &name)?;
    let n = name.clone();
    let s = st.db.call(move |c| crate::db::roles::site(c, &n)).await?;
    Ok(Json(s.ok_or(ApiError::NotFound {
        kind: "site",
        id: name,
    })?))
}

/// `PUT /api/v1/sites/{name}`.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SitePut {
    /// Free text.
    #[serde(default)]
    pub description: String,
    /// Overrides on generic roles.
    #[serde(default)]
    pub overrides: Vec<Override>,
}

pub(super) async fn put_site(
    State(st): State<ApiState>,
    caller: Caller,
    Path(name): Path<String>,
    Body(body): Body<SitePut>,
) -> Result<Json<Site>, ApiError> {
    caller.admin()?;
    check_name("site", &name)?;
    if body.description.len() > 1024 {
        return Err(ApiError::invalid("description longer than 1024 bytes"));
    }
    if body.overrides.len() > 1024 {
        return Err(ApiError::invalid("more than 1024 overrides"));
    }
    for o in &body.overrides {
        check_name("role", &o.role)?;
        check_name("image", &o.version.image)?;
    }
    let actor = caller.actor();
    let site = st
        .db
        .call(move |c| {
            let site = crate::db::roles::put_site(c, &name, &body.description, &body.overrides)?;
            crate::db::events::record(
                c,
                &NewEvent::now(
                    actor,
                    "site.put",
                    format!("site/{name}"),
                    serde_json::json!({ "overrides": site.overrides }),
                ),
            )?;
            Ok(site)
        })
        .await?;
    st.fleet.flush().await?;
    Ok(Json(site))
}

pub(super) async fn delete_site(
    State(st): State<ApiState>,
    caller: Caller,
    Path(name): Path<String>,
) -> Result<StatusCode, ApiError> {
    caller.admin()?;
    check_name("site", &name)?;
    let actor = caller.actor();
    st.fleet.flush().await?;
    st.db
        .call(move |c| {
            crate::db::roles::delete_site(c, &name)?;
            crate::db::events::record(
                c,
                &NewEvent::now(
                    actor,
                    "site.deleted",
                    format!("site/{name}"),
                    serde_json::json!({}),
                ),
            )
        })
        .await?;
    Ok(StatusCode::NO_CONTENT)
}

pub(super) async fn images(
    State(st): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<ImageInfo>>, ApiError> {
    caller.viewer()?;
    let images = std::sync::Arc::clone(st.fleet.images());
    let v = tokio::task::spawn_blocking(move || images.versions())
        .await
        .map_err(|e| ApiError::Internal {
            detail: format!("image listing task: {e}"),
        })??;
    Ok(Json(v))
}
