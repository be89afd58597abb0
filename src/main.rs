//! The `engagement-cdc` command line: parse, load the configuration, call into the library.

use std::path::PathBuf;
use std::process::ExitCode;
use std::sync::Arc;

use clap::{Parser, Subcommand};

use engagement_cdc::commands;
use engagement_cdc::config::Config;
use engagement_cdc::error::{exit_code, one_line};

#[derive(Parser)]
#[command(
    name = "engagement-cdc",
    version,
    about = "Stream new engagement_events rows from a Postgres slot, enrich them with content, deliver them to ClickHouse, Redis and an HTTP API.",
    after_help = "Configuration: --config FILE (default ./engagement-cdc.toml when present); every key can be overridden by ENGAGEMENT_CDC__<SECTION>__<KEY>. See docs/configuration.md."
)]
struct Cli {
    /// Configuration file (TOML).
    #[arg(long, global = true, value_name = "FILE")]
    config: Option<PathBuf>,

    /// Log lines on stderr as text, or as one JSON object per line.
    #[arg(long, global = true, value_enum, default_value_t = LogFormat::Text)]
    log_format: LogFormat,

    #[command(subcommand)]
    command: Command,
}

#[derive(Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
enum LogFormat {
    Text,
    Json,
}

#[derive(Subcommand)]
enum Command {
    /// Check Postgres, create the publication and slot, copy the content dimension, apply the ClickHouse migration, record the identity. Safe to run again.
    Setup {
        /// Drop the slot and create it again at the current position: the way out when the
        /// engine stopped because the slot cannot decode past a change (a dropped publication,
        /// a dropped required column). Prints the backfill that delivers the events in between.
        #[arg(long)]
        resync: bool,
    },
    /// Stream from the slot to the enabled sinks until SIGINT or SIGTERM.
    Run {
        /// Also print each enriched event as one JSON line on stdout (logs go to stderr).
        #[arg(long)]
        stdout: bool,
    },
    /// Re-deliver the events of [start, end) from Postgres to the sinks (ClickHouse and Redis by default). Safe to repeat.
    Backfill {
        /// Start of the range (inclusive), RFC 3339; without an offset it is UTC.
        #[arg(long, value_parser = time_arg)]
        start: i64,
        /// End of the range (exclusive), RFC 3339; without an offset it is UTC.
        #[arg(long, value_parser = time_arg)]
        end: i64,
        /// Comma-separated sinks: clickhouse, redis, http, stdout (one JSON line per event, to preview a backfill).
        #[arg(long, default_value = "clickhouse,redis")]
        sinks: String,
        /// Rows per page read from Postgres and per write to the sinks.
        #[arg(long, default_value_t = 5000, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch_size: u32,
    },
    /// Re-deliver what the journal still holds to one sink, from an LSN or a commit time (a truncated table, a flushed Redis, a new API endpoint). Safe to repeat, and while the engine runs.
    #[command(group(clap::ArgGroup::new("from").required(true).args(["from_lsn", "from_time"])))]
    Replay {
        /// The sink: clickhouse, redis or http.
        #[arg(long)]
        sink: String,
        /// Events of transactions that committed at or after this LSN (as Postgres writes it, 0/16B3748).
        #[arg(long, value_parser = lsn_arg)]
        from_lsn: Option<engagement_cdc::types::Lsn>,
        /// Events of transactions that committed at or after this time, RFC 3339; without an offset it is UTC.
        #[arg(long, value_parser = time_arg)]
        from_time: Option<i64>,
    },
    /// Insert realistic events into Postgres at a given rate (skewed content popularity, several event types and devices).
    Load {
        /// Events per second; 0 means as fast as possible.
        #[arg(long, default_value_t = 1000)]
        rate: u64,
        /// How long to run, e.g. 60s, 2m, 500ms.
        #[arg(long, default_value = "60s", value_parser = duration_arg)]
        duration: std::time::Duration,
        /// Number of content rows (ids 1..K, created when missing).
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=1_000_000))]
        contents: u32,
        /// Rows per INSERT transaction.
        #[arg(long, default_value_t = 100, value_parser = clap::value_parser!(u32).range(1..=100_000))]
        batch: u32,
        /// Concurrent Postgres connections.
        #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u32).range(1..=64))]
        connections: u32,
    },
    /// Manage the HTTP sink's dead-letter queue (stop the engine first: it holds the state store).
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Run a stand-in of the external API: POST /events, GET /stats, injected failures and slowness.
    MockApi {
        /// Address to listen on.
        #[arg(long, default_value = "127.0.0.1:58000")]
        listen: String,
        /// Fraction of POST /events answered with 500 (0 to 1).
        #[arg(long, default_value_t = 0.0, value_parser = fraction)]
        fail_rate: f64,
        /// Fraction of POST /events answered only after --slow-ms (0 to 1).
        #[arg(long, default_value_t = 0.0, value_parser = fraction)]
        slow_rate: f64,
        /// Delay of a slow answer, in milliseconds.
        #[arg(long, default_value_t = 1000)]
        slow_ms: u64,
        /// The HTTP status of an injected failure (e.g. 429, 503, or 400 to see a client error).
        #[arg(long, default_value_t = 500, value_parser = clap::value_parser!(u16).range(400..600))]
        fail_status: u16,
        /// Send `Retry-After: SECS` with each injected failure.
        #[arg(long)]
        retry_after: Option<u64>,
        /// Answer 401 to requests without `Authorization: Bearer TOKEN`.
        #[arg(long)]
        require_token: Option<String>,
        /// Keep each event's JSON, served at GET /events/{id} (memory grows with the events).
        #[arg(long)]
        keep_events: bool,
        /// Remember accepted event ids in this file across restarts.
        #[arg(long)]
        ids_file: Option<std::path::PathBuf>,
        /// Serve HTTPS with this certificate chain (PEM); needs --tls-key.
        #[arg(long, requires = "tls_key")]
        tls_cert: Option<std::path::PathBuf>,
        /// The private key (PEM) of --tls-cert.
        #[arg(long, requires = "tls_cert")]
        tls_key: Option<std::path::PathBuf>,
    },
    /// Show the checkpoint, the slot (lag, retained WAL, wal_status), each sink's health, the journal and each sink's cursor in it, the DLQ depth and the last commit time; exit 1 with the reason unless all is well.
    Status {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
        /// Slot lag (bytes of WAL not yet confirmed) above which the status is a problem.
        #[arg(long, default_value_t = commands::status::DEFAULT_MAX_LAG_BYTES)]
        max_lag_bytes: i64,
    },
}

#[derive(Subcommand)]
enum DlqAction {
    /// List the dead letters.
    List {
        /// Print JSON instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Send every dead letter again (same body, same Idempotency-Key); remove what the API accepts.
    Replay,
    /// Delete every dead letter.
    Purge,
}

fn time_arg(s: &str) -> Result<i64, String> {
    commands::backfill::parse_time(s).map_err(|e| e.to_string())
}

fn lsn_arg(s: &str) -> Result<engagement_cdc::types::Lsn, String> {
    s.trim().parse()
}

fn duration_arg(s: &str) -> Result<std::time::Duration, String> {
    commands::load::parse_duration(s).map_err(|e| e.to_string())
}

fn fraction(s: &str) -> Result<f64, String> {
    let v: f64 = s.parse().map_err(|_| format!("{s:?} is not a number"))?;
    if (0.0..=1.0).contains(&v) {
        Ok(v)
    } else {
        Err(format!("{v} is not between 0 and 1"))
    }
}

/// glibc's allocator, tuned for a sidecar's footprint (docs/benchmarks.md, "Memory"): two
/// arenas instead of one per thread that ever allocated (8 per core), and blocks from
/// 256 KiB up that the heap has no free room for mapped apart and returned when freed,
/// instead of the threshold rising after the first such free and the heap growing to keep
/// them. Without it a 1,000,000-event catch-up peaked 10–20 MB higher.
///
/// Setting the mmap threshold also pins the trim threshold at its 128 KiB default, so
/// the heap gave back its free top whenever it passed 128 KiB and took the pages again
/// for the next request body, Redis call or batch: in a catch-up's profile, 15 % of the
/// engine's samples were the kernel zeroing fresh pages. Up to 8 MiB of free top is kept
/// instead, and serves large blocks too while it has room (docs/benchmarks.md, "Keeping
/// the heap's free top").
fn bound_the_heap() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator parameters; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_ARENA_MAX, 2);
        libc::mallopt(libc::M_MMAP_THRESHOLD, 256 * 1024);
        libc::mallopt(libc::M_TRIM_THRESHOLD, 8 * 1024 * 1024);
    }
}

fn main() -> ExitCode {
    // Every TLS connection uses ring; make it the default for libraries that ask.
    engagement_cdc::tls::install_default_provider();
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            let code = if e.use_stderr() { 2 } else { 0 };
            let _ = e.print();
            return ExitCode::from(code);
        }
    };
    if matches!(cli.command, Command::Run { .. }) {
        bound_the_heap();
    } else {
        // A command whose output is piped into `head` ends quietly when the reader goes, as
        // `cat` does (Rust ignores SIGPIPE, so println! would panic). `run` keeps ignoring
        // it: its stdout sink reports a closed pipe as a sink error instead.
        // SAFETY: restoring the default disposition of one signal, before any thread starts.
        unsafe {
            libc::signal(libc::SIGPIPE, libc::SIG_DFL);
        }
    }
    if let Err(e) = init_tracing(cli.log_format) {
        eprintln!("error: {e}");
        return ExitCode::from(2);
    }
    match run(cli) {
        Ok(code) => code,
        Err(err) => {
            eprintln!("error: {}", one_line(&err));
            ExitCode::from(exit_code(&err) as u8)
        }
    }
}

/// Logs on stderr, filtered by `ENGAGEMENT_CDC_LOG` (default `info`); a filter that does
/// not parse is a usage error, not silently ignored.
fn init_tracing(format: LogFormat) -> Result<(), String> {
    let filter = match std::env::var("ENGAGEMENT_CDC_LOG") {
        Ok(text) => tracing_subscriber::EnvFilter::try_new(&text).map_err(|e| {
            format!("ENGAGEMENT_CDC_LOG={text:?} is not a log filter ({e}); use e.g. info, debug or engagement_cdc=debug,warn")
        })?,
        Err(_) => tracing_subscriber::EnvFilter::new("info"),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_target(false);
    match format {
        LogFormat::Json => builder.json().init(),
        LogFormat::Text => builder
            .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
            .init(),
    }
    Ok(())
}

fn load_config(path: Option<&std::path::Path>) -> anyhow::Result<Config> {
    let (config, source) = Config::load(path)?;
    tracing::debug!("configuration from {source}");
    Ok(config)
}

fn run(cli: Cli) -> anyhow::Result<ExitCode> {
    // `run` on one thread (docs/architecture.md, "Threads"): its tasks hand each batch to
    // one another, and on a multi-threaded runtime every hand-off could wake a parked
    // worker — at 5,000 one-row transactions a second that cost about a fifth of the
    // engine's CPU. Blocking work (sled, the journal's files) goes to tokio's blocking
    // pool either way. `load` on one thread too: its connections wait on Postgres, and at
    // 5,000 one-row inserts a second two workers handing wake-ups to each other cost it
    // 34–37 µs an insert against 25–26 (docs/benchmarks.md, "What the steady tail shares
    // its cores with, and a lighter load"). The other commands keep the multi-threaded
    // runtime.
    let runtime = if matches!(cli.command, Command::Run { .. }) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .on_thread_park(engagement_cdc::source::stream::nap_before_park)
            .build()
    } else if matches!(cli.command, Command::Load { .. }) {
        tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
    } else {
        tokio::runtime::Builder::new_multi_thread()
            .enable_all()
            .build()
    }
    .map_err(|e| anyhow::anyhow!("cannot start the async runtime: {e}"))?;
    match cli.command {
        Command::Setup { resync } => {
            let config = load_config(cli.config.as_deref())?;
            runtime.block_on(async {
                let report =
                    commands::setup::setup(&config, commands::setup::SetupOptions { resync })
                        .await?;
                for line in &report.lines {
                    println!("{line}");
                }
                println!("setup done");
                Ok::<_, anyhow::Error>(())
            })?;
        }
        Command::Run { stdout } => {
            let config = load_config(cli.config.as_deref())?;
            runtime.block_on(async {
                let shutdown = commands::run::shutdown_signal()?;
                commands::run::run(&config, commands::run::RunOptions { stdout }, shutdown).await
            })?;
        }
        Command::Backfill {
            start,
            end,
            sinks,
            batch_size,
        } => {
            let config = load_config(cli.config.as_deref())?;
            let opts = commands::backfill::BackfillOptions {
                start_us: start,
                end_us: end,
                sinks: engagement_cdc::sinks::SinkKind::parse_list(&sinks)?,
                batch_size: batch_size as usize,
            };
            let report = runtime.block_on(commands::backfill::backfill(&config, &opts))?;
            println!("{report}");
        }
        Command::Replay {
            sink,
            from_lsn,
            from_time,
        } => {
            let config = load_config(cli.config.as_deref())?;
            let kinds = engagement_cdc::sinks::SinkKind::parse_list(&sink)?;
            let [sink] = kinds[..] else {
                return Err(engagement_cdc::error::UsageError::new(format!(
                    "--sink takes one sink (clickhouse, redis or http), not {sink:?}"
                ))
                .into());
            };
            let from = match (from_lsn, from_time) {
                (Some(l), _) => commands::replay::From::Lsn(l),
                (None, Some(t)) => commands::replay::From::Time(t),
                (None, None) => {
                    return Err(engagement_cdc::error::UsageError::new(
                        "replay needs --from-lsn LSN or --from-time TIME",
                    )
                    .into())
                }
            };
            let opts = commands::replay::ReplayOptions { sink, from };
            let report = runtime.block_on(commands::replay::replay(&config, &opts))?;
            println!("{report}");
        }
        Command::Load {
            rate,
            duration,
            contents,
            batch,
            connections,
        } => {
            let config = load_config(cli.config.as_deref())?;
            let opts = commands::load::LoadOptions {
                rate,
                duration,
                contents,
                batch: batch as usize,
                connections: connections as usize,
            };
            let report = runtime.block_on(commands::load::load(&config, &opts))?;
            println!("{report}");
        }
        Command::Dlq { action } => {
            let config = load_config(cli.config.as_deref())?;
            let cmd = match action {
                DlqAction::List { json } => commands::dlq::DlqCommand::List { json },
                DlqAction::Replay => commands::dlq::DlqCommand::Replay,
                DlqAction::Purge => commands::dlq::DlqCommand::Purge,
            };
            let out = runtime.block_on(commands::dlq::command(&config, cmd))?;
            print!("{out}");
        }
        Command::MockApi {
            listen,
            fail_rate,
            slow_rate,
            slow_ms,
            fail_status,
            retry_after,
            require_token,
            keep_events,
            ids_file,
            tls_cert,
            tls_key,
        } => {
            let tls = match (tls_cert, tls_key) {
                (Some(cert), Some(key)) => Some(Arc::new(engagement_cdc::tls::server_config(
                    &cert,
                    &key,
                    ("--tls-cert", "--tls-key"),
                )?)),
                _ => None,
            };
            runtime.block_on(commands::mock_api::serve(commands::mock_api::MockOptions {
                listen,
                fail_rate,
                slow_rate,
                slow_ms,
                fail_status,
                retry_after,
                require_token,
                keep_events,
                ids_file,
                tls,
            }))?;
        }
        Command::Status {
            json,
            max_lag_bytes,
        } => {
            let config = load_config(cli.config.as_deref())?;
            let status = runtime.block_on(commands::status::status(&config, max_lag_bytes))?;
            if json {
                println!("{}", serde_json::to_string_pretty(&status)?);
            } else {
                print!("{}", status.render_text());
            }
            // For monitoring: 1 with the reasons on one line unless all is well.
            if !status.healthy {
                eprintln!("unhealthy: {}", status.problems.join("; "));
                return Ok(ExitCode::from(1));
            }
        }
    }
    Ok(ExitCode::SUCCESS)
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

    /// Words the parser knows, so random command lines reach deep into it.
    const WORDS: [&str; 24] = [
        "setup",
        "run",
        "status",
        "backfill",
        "dlq",
        "list",
        "replay",
        "purge",
        "load",
        "mock-api",
        "--json",
        "--stdout",
        "--resync",
        "--start",
        "--end",
        "--sinks",
        "--fail-rate",
        "--config",
        "--batch-size",
        "--max-lag-bytes",
        "--rate",
        "--listen",
        "--fail-status",
        "--retry-after",
    ];

    proptest! {
        /// Any command line is parsed or refused, never a panic.
        #[test]
        fn any_command_line_is_parsed_or_refused(
            args in prop::collection::vec(
                prop_oneof![
                    prop::sample::select(WORDS.to_vec()).prop_map(str::to_string),
                    "\\PC{0,24}",
                    "-?[0-9]{0,12}(\\.[0-9]{0,6})?",
                    "20[0-9]{2}-[0-9]{2}-[0-9é]{2}T[0-9]{2}:[0-9]{2}:[0-9]{2}(Z|[+-][0-9]{2}:[0-9]{2})?",
                ],
                0..8,
            )
        ) {
            let mut argv = vec!["engagement-cdc".to_string()];
            argv.extend(args);
            let _ = Cli::try_parse_from(&argv);
        }
    }
}
