//! The one API error type, mapped to HTTP in one place: a status, a stable `code`, a public
//! message and whether retrying may help. Internal detail goes to the log only.

use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::Json;

use crate::db::DbError;
use crate::fleet::FleetError;

/// An API error.
#[derive(Debug, thiserror::Error)]
pub enum ApiError {
    /// No such thing.
    #[error("no {kind} {id:?}")]
    NotFound {
        /// What kind.
        kind: &'static str,
        /// Its id.
        id: String,
    },
    /// The request conflicts with the current state.
    #[error("{message}")]
    Conflict {
        /// Why.
        message: String,
    },
    /// Malformed or invalid request.
    #[error("{message}")]
    InvalidRequest {
        /// What is wrong.
        message: String,
    },
    /// Body larger than the limit.
    #[error("request body exceeds {limit} bytes")]
    TooLarge {
        /// The limit.
        limit: usize,
    },
    /// No or unknown credentials.
    #[error("{message}")]
    Unauthenticated {
        /// Why.
        message: String,
    },
    /// Credentials that do not allow this.
    #[error("{message}")]
    Forbidden {
        /// Why.
        message: String,
    },
    /// A state report breaking the node state machine.
    #[error("{message}")]
    IllegalTransition {
        /// Which transition.
        message: String,
    },
    /// Cannot serve now; retry later.
    #[error("{message}")]
    Unavailable {
        /// Why.
        message: String,
    },
    /// Our fault; details in the log.
    #[error("internal error")]
    Internal {
        /// For the log only.
        detail: String,
    },
}

impl ApiError {
    /// A 400.
    pub fn invalid(message: impl Into<String>) -> Self {
        ApiError::InvalidRequest {
            message: message.into(),
        }
    }

    /// A 403.
    pub fn forbidden(message: impl Into<String>) -> Self {
        ApiError::Forbidden {
            message: message.into(),
        }
    }

    /// The HTTP status.
    pub fn status(&self) -> StatusCode {
        match self {
            ApiError::NotFound { .. } => StatusCode::NOT_FOUND,
            ApiError::Conflict { .. } | ApiError::IllegalTransition { .. } => StatusCode::CONFLICT,
            ApiError::InvalidRequest { .. } => StatusCode::BAD_REQUEST,
            ApiError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
            ApiError::Unauthenticated { .. } => StatusCode::UNAUTHORIZED,
            ApiError::Forbidden { .. } => StatusCode::FORBIDDEN,
            ApiError::Unavailable { .. } => StatusCode::SERVICE_UNAVAILABLE,
            ApiError::Internal { .. } => StatusCode::INTERNAL_SERVER_ERROR,
        }
    }

    /// The stable code clients match on.
    pub fn code(&self) -> &'static str {
        match self {
            ApiError::NotFound { .. } => "not_found",
            ApiError::Conflict { .. } => "conflict",
            ApiError::IllegalTransition { .. } => "illegal_transition",
            ApiError::InvalidRequest { .. } => "invalid_request",
            ApiError::TooLarge { .. } => "too_large",
            ApiError::Unauthenticated { .. } => "unauthenticated",
            ApiError::Forbidden { .. } => "forbidden",
            ApiError::Unavailable { .. } => "unavailable",
            ApiError::Internal { .. } => "internal",
        }
    }

    /// Whether the same request may succeed later.
    pub fn retryable(&self) -> bool {
        matches!(
            self,
            ApiError::Unavailable { .. } | ApiError::Internal { .. }
        )
    }
}

impl IntoResponse for ApiError {
    fn into_response(self) -> Response {
        let message = match &self {
            ApiError::Internal { detail } => {
                tracing::error!(error = %detail, "API internal error");
                "internal error; see the server log".to_owned()
            }
            other => other.to_string(),
        };
        let body = serde_json::json!({
            "error": { "code": self.code(), "message": message, "retryable": self.retryable() }
        });
        (self.status(), Json(body)).into_response()
    }
}

fn chain(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

impl From<DbError> for ApiError {
    fn from(e: DbError) -> Self {
        match e {
            DbError::NotFound { kind, id } => ApiError::NotFound { kind, id },
            DbError::Conflict(message) => ApiError::Conflict { message },
            DbError::Closed => ApiError::Unavailable {
                message: "server shutting down".into(),
            },
            DbError::Sqlite(ref s)
                if matches!(
                    s.sqlite_error_code(),
                    Some(rusqlite::ErrorCode::DatabaseBusy | rusqlite::ErrorCode::DatabaseLocked)
                ) =>
            {
                ApiError::Unavailable {
                    message: "database busy".into(),
                }
            }
            other => ApiError::Internal {
                detail: chain(&other),
            },
        }
    }
}

impl From<FleetError> for ApiError {
    fn from(e: FleetError) -> Self {
        match e {
            FleetError::NoImage { .. } => ApiError::Unavailable {
                message: e.to_string(),
            },
            FleetError::NotAssigned { .. } => ApiError::NotFound {
                kind: "assignment",
                id: e.to_string(),
            },
            FleetError::IllegalTransition { .. } => ApiError::IllegalTransition {
                message: e.to_string(),
            },
            FleetError::MacMismatch { .. } => ApiError::invalid(e.to_string()),
            FleetError::Db(d) => d.into(),
            FleetError::Internal(detail) => ApiError::Internal { detail },
        }
    }
}
