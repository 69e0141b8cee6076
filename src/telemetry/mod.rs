//! Telemetry: every Prometheus series of the product, defined once in
//! [`metrics`], with closed label sets. Serving them over HTTP is the
//! services' job ([`crate::service::endpoints`]).

pub mod metrics;
