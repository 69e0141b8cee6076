//! Starting a service: the one place that wires a service — the worker or
//! the ingress — to its endpoints, its logging and its shutdown. The commands
//! and the tests both go through [`Service`], so what the tests run is what
//! production runs.

use std::future::Future;
use std::io::IsTerminal;
use std::net::SocketAddr;

use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;
use tracing_subscriber::EnvFilter;

use crate::config::settings::{Config, ConfigError, LogFormat};
use crate::service::endpoints::{self, Health};
use crate::service::ingress;
use crate::service::worker::{self, Hooks, WorkerError};
use crate::telemetry::metrics::Metrics;

/// Why a service stopped with an error.
#[derive(Debug, thiserror::Error)]
pub enum ServiceError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error("metrics_addr {addr:?}: {source}")]
    Bind {
        addr: String,
        source: std::io::Error,
    },
    #[error(transparent)]
    Worker(#[from] WorkerError),
    #[error("serving callbacks: {0}")]
    Ingress(std::io::Error),
}

/// A service about to run: its settings, its metrics and readiness, and its
/// endpoint listener, already bound (so a port conflict fails at once).
pub struct Service {
    config: Config,
    metrics: Metrics,
    health: Health,
    listener: Option<TcpListener>,
    ingress_listener: Option<TcpListener>,
    hooks: Hooks,
}

impl Service {
    /// Bind `metrics_addr` (none when empty); the service reports to
    /// `metrics` and `health`, which the caller may keep to watch it.
    pub async fn bind(
        config: Config,
        metrics: Metrics,
        health: Health,
    ) -> Result<Service, ServiceError> {
        config.validate()?;
        let listener = match config.metrics_addr.trim() {
            "" => None,
            addr => Some(
                TcpListener::bind(addr)
                    .await
                    .map_err(|source| ServiceError::Bind {
                        addr: addr.to_owned(),
                        source,
                    })?,
            ),
        };
        Ok(Service {
            config,
            metrics,
            health,
            listener,
            ingress_listener: None,
            hooks: Hooks::default(),
        })
    }

    /// Bind `ingress_addr` now, and say where (port 0: the one the system chose).
    pub async fn bind_ingress(&mut self) -> Result<SocketAddr, ServiceError> {
        let addr = self.config.ingress_addr.trim().to_owned();
        let bound = |source| ServiceError::Bind {
            addr: addr.clone(),
            source,
        };
        let listener = TcpListener::bind(&addr).await.map_err(bound)?;
        let local = listener.local_addr().map_err(bound)?;
        self.ingress_listener = Some(listener);
        Ok(local)
    }

    /// Run with test seams (see [`Hooks`]).
    pub fn with_hooks(mut self, hooks: Hooks) -> Service {
        self.hooks = hooks;
        self
    }

    /// Where the endpoints listen (port 0 in the settings: the one the system chose).
    pub fn endpoint_addr(&self) -> Option<SocketAddr> {
        self.listener.as_ref().and_then(|l| l.local_addr().ok())
    }

    /// Run the worker until `shutdown` completes, then stop it in order; the
    /// endpoints stop last.
    pub async fn run_worker(self, shutdown: impl Future<Output = ()>) -> Result<(), ServiceError> {
        let (config, health, metrics, hooks) = (
            self.config,
            self.health.clone(),
            self.metrics.clone(),
            self.hooks,
        );
        let worker = worker::run(config, shutdown, health, metrics, hooks);
        Ok(with_endpoints(self.listener, &self.metrics, &self.health, worker).await?)
    }
}

/// Serve the endpoints on `listener` while `service` runs; stop them after.
async fn with_endpoints<T>(
    listener: Option<TcpListener>,
    metrics: &Metrics,
    health: &Health,
    service: impl Future<Output = T>,
) -> T {
    let endpoints_stop = CancellationToken::new();
    let server = listener.map(|listener| {
        tokio::spawn(endpoints::serve(
            listener,
            metrics.clone(),
            health.clone(),
            endpoints_stop.clone().cancelled_owned(),
        ))
    });
    let result = service.await;
    endpoints_stop.cancel();
    if let Some(server) = server
        && let Ok(Err(e)) = server.await
    {
        tracing::warn!(error = %e, "metrics endpoint failed");
    }
    result
}

impl Service {
    /// Serve TIC's callbacks until `shutdown` completes, then stop accepting,
    /// let the callbacks in hand finish and close; the endpoints stop last.
    pub async fn run_ingress(
        mut self,
        shutdown: impl Future<Output = ()> + Send + 'static,
    ) -> Result<(), ServiceError> {
        if self.ingress_listener.is_none() {
            self.bind_ingress().await?;
        }
        let listener = self.ingress_listener.take().expect("bound above");
        let (health, metrics) = (self.health.clone(), self.metrics.clone());
        let ingress = ingress::run(&self.config, listener, shutdown, health, metrics);
        let result = with_endpoints(self.listener, &self.metrics, &self.health, ingress).await;
        result.map_err(ServiceError::Ingress)
    }
}

/// Log to stderr, JSON or text as `format` says, at the level `RUST_LOG` sets
/// (default `info`). The AMQP client's modules that log whole frames at
/// `trace` — the login frame carries the broker password — never log at
/// `trace`, whatever `RUST_LOG` asks: a password never reaches the logs.
pub fn init_logging(format: LogFormat) {
    use tracing_subscriber::prelude::*;
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let filter = std::env::var("RUST_LOG")
        .ok()
        .and_then(|spec| EnvFilter::try_new(spec).ok())
        .unwrap_or_else(|| EnvFilter::new("info"));
    let no_frames = tracing_subscriber::filter::filter_fn(|meta| {
        !(*meta.level() == tracing::Level::TRACE && is_frame_logger(meta.target()))
    });
    let layer = tracing_subscriber::fmt::layer()
        .with_writer(std::io::stderr)
        // Colour codes only for a person at a terminal, never in a log file.
        .with_ansi(std::io::stderr().is_terminal());
    let registry = tracing_subscriber::registry().with(filter);
    if json {
        let layer = layer.json().flatten_event(true).with_current_span(true);
        registry.with(layer.with_filter(no_frames)).init();
    } else {
        registry.with(layer.with_filter(no_frames)).init();
    }
}

/// A module of the AMQP client that logs whole frames at `trace`.
fn is_frame_logger(target: &str) -> bool {
    target.starts_with("lapin::") || target.starts_with("amq_protocol")
}

/// Completes on the first SIGINT or SIGTERM; a second one quits the process
/// at once with exit code 130. Call inside the runtime.
pub fn shutdown_signal() -> impl Future<Output = ()> {
    let stop = CancellationToken::new();
    tokio::spawn(watch_signals(stop.clone()));
    stop.cancelled_owned()
}

async fn watch_signals(stop: CancellationToken) {
    next_signal().await;
    tracing::info!("shutdown signal received: stopping (a second signal quits at once)");
    stop.cancel();
    next_signal().await;
    tracing::warn!("second signal: quitting now");
    std::process::exit(130);
}

async fn next_signal() {
    #[cfg(unix)]
    {
        use tokio::signal::unix::{SignalKind, signal};
        let mut term = signal(SignalKind::terminate()).expect("SIGTERM handler installs");
        let mut int = signal(SignalKind::interrupt()).expect("SIGINT handler installs");
        tokio::select! {
            _ = term.recv() => {},
            _ = int.recv() => {},
        }
    }
    #[cfg(not(unix))]
    let _ = tokio::signal::ctrl_c().await;
}
