//! The HTTP endpoints every service serves: `/metrics` (Prometheus),
//! `/healthz` (alive) and `/readyz` (ready for work), and the readiness flag
//! the service sets.

use std::future::Future;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::State;
use axum::http::{StatusCode, header};
use axum::response::IntoResponse;
use axum::routing::get;

use crate::telemetry::metrics::Metrics;

/// Readiness, for `/readyz` (and the `broker_connected` gauge), with why
/// the service is not ready when only an operator can fix it.
#[derive(Debug, Clone, Default)]
pub struct Health {
    ready: Arc<AtomicBool>,
    blocked: Arc<Mutex<Option<String>>>,
    /// Shutting down: not ready from the first signal on, whatever else
    /// happens (a load balancer takes the endpoint out before the listener
    /// closes).
    draining: Arc<AtomicBool>,
}

impl Health {
    /// Connected to the broker and consuming, and not shutting down.
    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::SeqCst) && !self.is_draining()
    }

    /// Not ready from now on: the service is shutting down.
    pub fn drain(&self) {
        self.draining.store(true, Ordering::SeqCst);
    }

    pub fn is_draining(&self) -> bool {
        self.draining.load(Ordering::SeqCst)
    }

    /// The worker's readiness, mirrored in `lesson_replay_broker_connected`.
    pub fn set_ready(&self, ready: bool, metrics: &Metrics) {
        self.set(ready);
        metrics.set_broker_connected(ready);
    }

    /// Readiness alone (a service that reports its broker session elsewhere).
    /// Ready clears the reason of [`Health::block`].
    pub fn set(&self, ready: bool) {
        if ready {
            *self.blocked.lock().unwrap_or_else(|e| e.into_inner()) = None;
        }
        self.ready.store(ready, Ordering::SeqCst);
    }

    /// Not ready for a reason only an operator can fix; `/readyz` says it.
    /// `true` when the reason is new: the caller says it once, not at every
    /// recheck.
    pub fn block(&self, reason: &str, metrics: &Metrics) -> bool {
        metrics.set_broker_connected(false);
        self.block_reason(reason)
    }

    /// [`Health::block`] for a service that reports its broker session
    /// elsewhere (the ingress).
    pub fn block_reason(&self, reason: &str) -> bool {
        let mut blocked = self.blocked.lock().unwrap_or_else(|e| e.into_inner());
        let new = blocked.as_deref() != Some(reason);
        *blocked = Some(reason.to_owned());
        drop(blocked);
        self.set(false);
        new
    }

    /// Why the service is blocked, if it is.
    pub fn blocked(&self) -> Option<String> {
        self.blocked
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }
}

#[derive(Clone)]
struct Endpoints {
    metrics: Metrics,
    health: Health,
}

/// Serve `/metrics`, `/healthz` and `/readyz` on `listener` until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    metrics: Metrics,
    health: Health,
    shutdown: impl Future<Output = ()> + Send + 'static,
) -> std::io::Result<()> {
    tracing::info!(addr = %listener.local_addr()?, "serving /metrics, /healthz, /readyz");
    let app = Router::new()
        .route("/metrics", get(metrics_endpoint))
        .route("/healthz", get(|| async { "ok\n" }))
        .route("/readyz", get(ready_endpoint))
        .with_state(Arc::new(Endpoints { metrics, health }));
    axum::serve(listener, app)
        .with_graceful_shutdown(shutdown)
        .await
}

async fn metrics_endpoint(State(endpoints): State<Arc<Endpoints>>) -> impl IntoResponse {
    (
        [(
            header::CONTENT_TYPE,
            "text/plain; version=0.0.4; charset=utf-8",
        )],
        endpoints.metrics.render(),
    )
}

async fn ready_endpoint(State(endpoints): State<Arc<Endpoints>>) -> impl IntoResponse {
    if endpoints.health.is_ready() {
        (StatusCode::OK, "ready\n".to_owned())
    } else if endpoints.health.is_draining() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            "not ready: shutting down\n".to_owned(),
        )
    } else if let Some(reason) = endpoints.health.blocked() {
        (
            StatusCode::SERVICE_UNAVAILABLE,
            format!("not ready: {reason}\n"),
        )
    } else {
        (StatusCode::SERVICE_UNAVAILABLE, "not ready\n".to_owned())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_block_is_new_once_per_reason_and_readiness_clears_it() {
        let (health, metrics) = (Health::default(), Metrics::default());
        assert!(health.block("classic parking queue", &metrics));
        assert!(!health.block("classic parking queue", &metrics));
        assert!(!health.is_ready());
        assert!(health.block_reason("access refused"), "another reason");
        health.set_ready(true, &metrics);
        assert_eq!(health.blocked(), None);
        assert!(
            health.block_reason("access refused"),
            "new again after a session"
        );
    }
}
