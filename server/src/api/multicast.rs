//! Multicast sessions the server offers in manifests (docs/multicast.md, "Sessions scheduled
//! by the server"): list them with their counters, and start one now (an operator's command).

use axum::extract::{Path, State};
use axum::Json;

use super::auth::Caller;
use super::{ApiError, ApiState};
use crate::multicast::{Scheduler, SessionInfo};

fn scheduler(st: &ApiState) -> Result<&std::sync::Arc<Scheduler>, ApiError> {
    st.fleet.multicast().ok_or_else(|| ApiError::Unavailable {
        message: "multicast sessions are off (multicast.enabled)".into(),
    })
}

/// `GET /api/v1/multicast/sessions`: live sessions, then finished ones.
pub(super) async fn list(
    State(st): State<ApiState>,
    caller: Caller,
) -> Result<Json<Vec<SessionInfo>>, ApiError> {
    caller.viewer()?;
    Ok(Json(
        st.fleet
            .multicast()
            .map(|s| s.sessions())
            .unwrap_or_default(),
    ))
}

/// `POST /api/v1/multicast/sessions/{layer}/start`: start the live session of a layer now.
pub(super) async fn start(
    State(st): State<ApiState>,
    caller: Caller,
    Path(layer): Path<String>,
) -> Result<Json<Vec<SessionInfo>>, ApiError> {
    caller.admin()?;
    let id: wire::LayerId = layer
        .parse()
        .map_err(|_| ApiError::invalid("layer is not 64 hex digits"))?;
    let sched = scheduler(&st)?;
    if !sched.start(&id) {
        return Err(ApiError::NotFound {
            kind: "multicast session for layer",
            id: layer,
        });
    }
    Ok(Json(
        sched
            .sessions()
            .into_iter()
            .filter(|s| s.layer == id)
            .collect(),
    ))
}
