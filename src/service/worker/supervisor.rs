//! The broker session's keeper: rebuilt with backoff when lost, a refused
//! topology said once and rechecked now and then; a stop during a lost
//! session drains the handlers ([`super::session::drain`]).

use std::time::Duration;

use backon::{BackoffBuilder, ExponentialBuilder};
use tracing::{error, info, warn};

use super::session::{drain, session};
use super::{MAX_RECONNECT_WAIT, Shared, WorkerError};

/// Keep a broker session running, rebuilding it with backoff whenever it is
/// lost. A topology the broker refuses is said once, shown in `/readyz`, and
/// tried again only now and then: it is not a loop.
pub(super) async fn supervise(shared: &Shared) -> Result<(), WorkerError> {
    let reconnect = || {
        ExponentialBuilder::default()
            .with_min_delay(Duration::from_millis(250))
            .with_max_delay(MAX_RECONNECT_WAIT)
            .without_max_times()
            .with_jitter()
            .build()
    };
    let mut delays = reconnect();
    let mut sessions = 0u64;
    let mut refused = false;
    loop {
        let on_connected = || {
            delays = reconnect();
            if std::mem::take(&mut refused) {
                info!("the broker accepts the topology now");
            }
            if sessions > 0 {
                shared.metrics.broker_reconnected();
                info!("reconnected to the broker");
            }
            sessions += 1;
        };
        let result = session(shared, on_connected).await;
        shared.health.set_ready(false, &shared.metrics);
        match result {
            Ok(()) => return Ok(()),
            Err(e) if shared.stop.is_cancelled() => {
                warn!(error = %e, "broker session ended during shutdown");
                drain(shared).await;
                return Ok(());
            }
            Err(WorkerError::Topology(e)) if e.is_permanent() => {
                let why = e.to_string();
                if shared.health.block(&why, &shared.metrics) {
                    error!(error = %why, recheck_secs = shared.broker.refused_recheck.as_secs(),
                        "not ready: the broker refuses the topology; an operator must act (docs/operations.md)");
                }
                refused = true;
                tokio::select! {
                    () = tokio::time::sleep(shared.broker.refused_recheck) => {},
                    () = shared.stop.cancelled() => return Ok(()),
                }
            }
            Err(e) => {
                let wait = delays.next().unwrap_or(MAX_RECONNECT_WAIT);
                error!(error = %e, ?wait, "broker session lost: reconnecting");
                tokio::select! {
                    () = tokio::time::sleep(wait) => {},
                    () = shared.stop.cancelled() => {
                        drain(shared).await;
                        return Ok(());
                    },
                }
            }
        }
    }
}
