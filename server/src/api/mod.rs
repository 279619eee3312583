//! The REST API under `/api/v1` (axum, JSON): nodes, roles, sites, images, rollouts, events
//! and tokens for operators; the manifest and report routes for nodes. docs/api.md describes
//! it; `server/openapi.json` is generated from [`openapi::ROUTES`] and drift-tested.
//!
//! Bodies are JSON objects with no unknown fields, at most [`MAX_BODY`] bytes
//! (reports: `wire::report::MAX_REPORT_BYTES`); every error is an [`ApiError`] body
//! `{"error": {"code", "message", "retryable"}}`.

pub mod auth;
mod error;
mod multicast;
mod nodes;
pub mod openapi;
mod roles;
mod rollouts;

use std::sync::Arc;

use axum::extract::{FromRequest, Request};
use axum::routing::{get, post};
use axum::Router;
use serde::de::DeserializeOwned;

pub use error::ApiError;

use crate::db::Db;
use crate::fleet::Fleet;

/// Largest operator request body.
pub const MAX_BODY: usize = 256 << 10;

/// What the API handlers share.
#[derive(Clone)]
pub struct ApiState {
    /// Nodes.
    pub fleet: Arc<Fleet>,
    /// The database.
    pub db: Db,
    /// Token lookups.
    pub tokens: Arc<auth::TokenCache>,
    /// Wakes the rollout driver (apply, resume, abort).
    pub wake: Arc<tokio::sync::Notify>,
}

impl ApiState {
    /// State over a fleet (and its database).
    pub fn new(fleet: Arc<Fleet>, wake: Arc<tokio::sync::Notify>) -> Self {
        ApiState {
            db: fleet.db().clone(),
            fleet,
            tokens: Arc::default(),
            wake,
        }
    }
}

/// The API router (paths include `/api/v1`).
pub fn router(state: ApiState) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(openapi::serve))
        .route("/api/v1/nodes", get(nodes::list))
        .route(
            "/api/v1/nodes/{mac}",
            get(nodes::get_one)
                .patch(nodes::patch)
                .delete(nodes::delete),
        )
        .route("/api/v1/nodes/{mac}/tokens", post(nodes::create_token))
        .route(
            "/api/v1/nodes/{mac}/tokens/rotate",
            post(nodes::rotate_token),
        )
        .route("/api/v1/nodes/by-mac/{mac}/manifest", get(nodes::manifest))
        .route("/api/v1/nodes/by-mac/{mac}/report", post(nodes::report))
        .route("/api/v1/roles", get(roles::list))
        .route(
            "/api/v1/roles/{name}",
            get(roles::get_one).put(roles::put).delete(roles::delete),
        )
        .route("/api/v1/sites", get(roles::sites))
        .route(
            "/api/v1/sites/{name}",
            get(roles::site)
                .put(roles::put_site)
                .delete(roles::delete_site),
        )
        .route("/api/v1/images", get(roles::images))
        .route(
            "/api/v1/rollouts",
            get(rollouts::list).post(rollouts::create),
        )
        .route("/api/v1/rollouts/{id}", get(rollouts::get_one))
        .route("/api/v1/rollouts/{id}/{action}", post(rollouts::act))
        .route("/api/v1/events", get(rollouts::events))
        .route(
            "/api/v1/tokens",
            get(rollouts::tokens).post(rollouts::create_token),
        )
        .route(
            "/api/v1/tokens/{id}",
            axum::routing::delete(rollouts::revoke_token),
        )
        .route("/api/v1/multicast/sessions", get(multicast::list))
        .route(
            "/api/v1/multicast/sessions/{layer}/start",
            post(multicast::start),
        )
        .fallback(fallback)
        .with_state(state)
}

async fn fallback(req: Request) -> ApiError {
    if req.uri().path().starts_with("/api/") {
        ApiError::NotFound {
            kind: "route",
            id: format!("{} {}", req.method(), req.uri().path()),
        }
    } else {
        ApiError::NotFound {
            kind: "path",
            id: req.uri().path().to_owned(),
        }
    }
}

/// A JSON body: at most [`MAX_BODY`] bytes, an object of the expected shape (unknown fields
/// are errors naming the field).
pub struct Body<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> FromRequest<S> for Body<T> {
    type Rejection = ApiError;

    async fn from_request(req: Request, _state: &S) -> Result<Self, Self::Rejection> {
        let limit = if req.uri().path().ends_with("/report") {
            wire::report::MAX_REPORT_BYTES
        } else {
            MAX_BODY
        };
        let ct = req
            .headers()
            .get(axum::http::header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .unwrap_or("");
        if !ct.is_empty() && !ct.starts_with("application/json") {
            return Err(ApiError::invalid(format!(
                "content type {ct:?} is not application/json"
            )));
        }
        let bytes = axum::body::to_bytes(req.into_body(), limit)
            .await
            .map_err(|_| ApiError::TooLarge { limit })?;
        let bytes = if bytes.iter().all(u8::is_ascii_whitespace) {
            &b"{}"[..]
        } else {
            &bytes[..]
        };
        serde_json::from_slice(bytes)
            .map(Body)
            .map_err(|e| ApiError::invalid(format!("request body: {e}")))
    }
}

/// A query string of the expected shape (errors are [`ApiError`]s).
pub struct Q<T>(pub T);

impl<S: Send + Sync, T: DeserializeOwned> axum::extract::FromRequestParts<S> for Q<T> {
    type Rejection = ApiError;

    async fn from_request_parts(
        parts: &mut axum::http::request::Parts,
        state: &S,
    ) -> Result<Self, Self::Rejection> {
        axum::extract::Query::<T>::from_request_parts(parts, state)
            .await
            .map(|q| Q(q.0))
            .map_err(|e| ApiError::invalid(e.body_text()))
    }
}

/// Parses a MAC path segment.
pub fn parse_mac(text: &str) -> Result<String, ApiError> {
    crate::boot::ipxe::normalize_mac(text)
        .ok_or_else(|| ApiError::invalid(format!("not a MAC address: {:?}", clip(text))))
}

/// Checks a role, site or node name: 1-63 of `a-z 0-9 - _ .`, starting with a letter or digit.
pub fn check_name(kind: &str, name: &str) -> Result<(), ApiError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b"-_.".contains(&b))
        && name
            .as_bytes()
            .first()
            .is_some_and(u8::is_ascii_alphanumeric);
    if ok {
        Ok(())
    } else {
        Err(ApiError::invalid(format!(
            "{kind} name {:?} must be 1-63 of a-z 0-9 - _ . starting with a letter or digit",
            clip(name)
        )))
    }
}

fn clip(text: &str) -> &str {
    match text.char_indices().nth(64) {
        Some((i, _)) => &text[..i],
        None => text,
    }
}
