//! What operators see of a running engine: its counters and histograms ([`metrics`]), each
//! sink's health ([`health`]) and the HTTP server that shows them ([`server`]: `/metrics`,
//! `/status`, the dashboard).

pub mod config;
pub mod health;
pub mod http;
pub mod metrics;
pub mod server;
