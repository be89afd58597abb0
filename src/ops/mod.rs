//! What operators see of a running engine: its counters and histograms ([`metrics`]) and
//! the HTTP server that shows them ([`server`]: `/metrics`, `/status`, the dashboard).

pub mod config;
pub mod http;
pub mod metrics;
pub mod server;
