//! The appliance's services under one cancellation token. The binary binds the sockets (it
//! knows the socket options and privileges) and hands each service its socket; [`Services`]
//! runs each in a `JoinSet` with a child token, and on shutdown (or the first service
//! failing) cancels the rest and joins them with a deadline.

use std::fmt::Display;
use std::future::Future;
use std::time::Duration;

use tokio::task::JoinSet;
use tokio_util::sync::CancellationToken;

/// A service that stopped with an error.
#[derive(Debug, thiserror::Error)]
#[error("{service} service failed: {message}")]
pub struct ServiceError {
    /// Which service.
    pub service: &'static str,
    /// What it said.
    pub message: String,
}

/// The running services.
pub struct Services {
    set: JoinSet<Result<(), ServiceError>>,
    shutdown: CancellationToken,
}

impl Services {
    /// An empty set stopped by `shutdown`.
    pub fn new(shutdown: CancellationToken) -> Self {
        Services {
            set: JoinSet::new(),
            shutdown,
        }
    }

    /// Starts a service: `start` gets a child token and returns the service's future.
    pub fn spawn<F, E>(&mut self, service: &'static str, start: impl FnOnce(CancellationToken) -> F)
    where
        F: Future<Output = Result<(), E>> + Send + 'static,
        E: Display,
    {
        let fut = start(self.shutdown.child_token());
        self.set.spawn(async move {
            fut.await.map_err(|e| ServiceError {
                service,
                message: format!("{e:#}"),
            })
        });
    }

    /// Runs until `shutdown` is cancelled or a service fails; then stops the rest.
    pub async fn run(mut self) -> Result<(), ServiceError> {
        let mut first_error = None;
        loop {
            tokio::select! {
                _ = self.shutdown.cancelled() => break,
                joined = self.set.join_next() => match joined {
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
        self.shutdown.cancel();
        let set = &mut self.set;
        let drain = async { while set.join_next().await.is_some() {} };
        if tokio::time::timeout(Duration::from_secs(10), drain)
            .await
            .is_err()
        {
            tracing::warn!("services did not stop within 10 s; aborting them");
            self.set.abort_all();
        }
        match first_error {
            Some(e) => Err(e),
            None => Ok(()),
        }
    }
}
