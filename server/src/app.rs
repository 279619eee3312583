//! `run`: the appliance's services under one cancellation token. The binary binds the sockets
//! (it knows the socket options and privileges); `run` spawns a task per service into a
//! `JoinSet`, and on shutdown (or the first service failing) cancels the rest and joins them
//! with a deadline.

use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

use crate::http::{self, HttpState};

/// The already-bound sockets of the services to run. `None` leaves a service off.
pub struct Sockets {
    /// HTTP.
    pub http: tokio::net::TcpListener,
}

/// A service that stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("{service} service failed: {message}")]
pub struct ServiceError {
    /// Which service.
    pub service: &'static str,
    /// What it said.
    pub message: String,
}

/// Runs every service until `shutdown` is cancelled or one fails.
pub async fn run(
    sockets: Sockets,
    http_state: HttpState,
    shutdown: CancellationToken,
) -> Result<(), ServiceError> {
    let mut services: JoinSet<Result<(), ServiceError>> = JoinSet::new();

    let token = shutdown.child_token();
    let app = http::router(http_state);
    services.spawn(async move {
        axum::serve(sockets.http, app)
            .with_graceful_shutdown(token.cancelled_owned())
            .await
            .map_err(|e| ServiceError { service: "http", message: e.to_string() })
    });

    let mut first_error = None;
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            joined = services.join_next() => match joined {
                None => break,
                Some(Ok(Ok(()))) => {}
                Some(Ok(Err(e))) => { first_error = Some(e); break; }
                Some(Err(e)) => {
                    first_error = Some(ServiceError { service: "task", message: e.to_string() });
                    break;
                }
            }
        }
    }
    shutdown.cancel();
    let drain = async { while services.join_next().await.is_some() {} };
    if tokio::time::timeout(Duration::from_secs(10), drain).await.is_err() {
        tracing::warn!("services did not stop within 10 s; aborting them");
        services.abort_all();
    }
    match first_error {
        Some(e) => Err(e),
        None => Ok(()),
    }
}

