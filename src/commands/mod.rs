//! One file per subcommand of `engagement-cdc`; `main.rs` parses the command line and calls
//! into these.

pub mod backfill;
pub mod dlq;
pub mod load;
pub mod mock_api;
pub mod replay;
pub mod run;
pub mod setup;
pub mod status;
