//! Operations: what an operator runs or watches beside the delivery path.
//!
//! - [`status`]: per-platform figures (`stargazer status`).
//! - [`dlq`]: list, show, replay and purge dead letters (`stargazer dlq`).
//! - [`gauges`]: the periodic refresh of the Prometheus gauges in a gateway.
//!
//! The Redis commands themselves live in [`crate::bus::admin`]; stream
//! trimming in [`crate::trim`]; metric names in [`crate::metrics`].

pub mod dlq;
pub mod gauges;
pub mod status;
