//! The command line: `worker`, `normalize`, `publish`, `topology`.

use std::io::{IsTerminal, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lapin::types::{AMQPValue, FieldTable, ShortString};
use tracing_subscriber::EnvFilter;

use crate::broker;
use crate::config::{Config, LogFormat};
use crate::decode::{Limits, Payload, decode};
use crate::metrics::Metrics;
use crate::normalize::normalize;
use crate::worker::Health;
use tokio_util::sync::CancellationToken;

/// Exit code of a rejected message (sysexits EX_DATAERR).
pub const EXIT_DATA_ERROR: u8 = 65;
/// Exit code when an input file cannot be read (sysexits EX_NOINPUT).
pub const EXIT_NO_INPUT: u8 = 66;
/// Exit code for configuration and broker failures.
pub const EXIT_FAILURE: u8 = 1;

const SETTINGS_HELP: &str = "\
Settings come from defaults, then the TOML file given by --config, then
LESSON_REPLAY_* environment variables (see the README for the full table):
  LESSON_REPLAY_AMQP_URL          broker URL [amqp://guest:***@127.0.0.1:5672/%2f]
  LESSON_REPLAY_INBOUND_EXCHANGE  [tic.recordings]
  LESSON_REPLAY_WORK_QUEUE        [lesson-replay.recordings]
  LESSON_REPLAY_PARKING_QUEUE     [lesson-replay.parking]
  LESSON_REPLAY_RECORDS_EXCHANGE  [lesson-replay.records]
  LESSON_REPLAY_RECORDS_QUEUE     [lesson-replay.records]
  LESSON_REPLAY_DELIVERY_LIMIT    [20]
  LESSON_REPLAY_CONCURRENCY       messages in flight (prefetch) [16]
  LESSON_REPLAY_SIGNATURE         required | if-present | off [if-present]
  LESSON_REPLAY_TIC_KEYS          SDKAPPID=TICKEY,... (secret)
  LESSON_REPLAY_SHUTDOWN_GRACE_SECS [25]
  LESSON_REPLAY_LOG_FORMAT        auto | json | text [auto]
  LESSON_REPLAY_METRICS_ADDR      /metrics, /healthz, /readyz listener, empty = off [0.0.0.0:9090]
  LESSON_REPLAY_PROBE             probe every track's MP4 [true]
  LESSON_REPLAY_ARCHIVE           copy tracks to S3 [false]; with LESSON_REPLAY_S3_BUCKET,
                                  _S3_ENDPOINT, _S3_REGION, _S3_FORCE_PATH_STYLE, _S3_PREFIX,
                                  _S3_ACCESS_KEY_ID, _S3_SECRET_ACCESS_KEY (secret), ...";

#[derive(Debug, Parser)]
#[command(name = "lesson-replay", version, about = "TIC recording messages in, lesson-replay records out", after_help = SETTINGS_HELP)]
pub struct Cli {
    /// TOML configuration file.
    #[arg(long, global = true, env = "LESSON_REPLAY_CONFIG")]
    pub config: Option<PathBuf>,
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Consume TIC messages and publish lesson-replay records (the service).
    Worker,
    /// Turn one message into a record on stdout, without any network.
    ///
    /// Exit 0 with the record on stdout; exit 0 with `skipped: ...` on stderr
    /// for a message without a finished recording; exit 65 with
    /// `error: <reason_code>: <message>` on stderr for a rejected message.
    Normalize {
        /// The message file, or `-` for standard input.
        #[arg(default_value = "-")]
        file: PathBuf,
        /// The sdkappid when the body has none (as the x-tic-sdkappid header would).
        #[arg(long)]
        sdkappid: Option<i64>,
    },
    /// Publish message files to the inbound exchange (declares the topology first).
    Publish {
        /// Message files.
        #[arg(required = true)]
        files: Vec<PathBuf>,
        /// x-tic-sign header.
        #[arg(long)]
        sign: Option<String>,
        /// x-tic-random header.
        #[arg(long)]
        random: Option<String>,
        /// x-tic-sdkappid header.
        #[arg(long)]
        sdkappid: Option<i64>,
        /// Routing key on the inbound exchange.
        #[arg(long, default_value = "tic.recording")]
        routing_key: String,
    },
    /// Declare the exchanges and queues, then exit.
    Topology {
        /// Print the topology as RabbitMQ definitions JSON instead (no broker needed).
        #[arg(long)]
        print_definitions: bool,
    },
    /// Check the settings and print them (secrets redacted); exit 1 when invalid.
    Config,
    /// Inspect and recover parked messages.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum DlqAction {
    /// Print the parked messages, one JSON object per line (the queue is left unchanged).
    List {
        /// Only messages parked with this reason code.
        #[arg(long)]
        reason: Option<String>,
    },
    /// Move parked messages back to the work queue, attempt count reset.
    Replay {
        /// Only messages parked with this reason code.
        #[arg(long)]
        reason: Option<String>,
        /// At most this many.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Delete every parked message.
    Purge,
}

/// Run the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Normalize { file, sdkappid } = &cli.command {
        return run_normalize(file, *sdkappid);
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    init_logging(config.log_format);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    let result = runtime.block_on(async {
        match cli.command {
            Command::Worker => run_worker(config).await,
            Command::Topology {
                print_definitions: true,
            } => {
                let definitions = crate::topology::definitions(&crate::topology::plan(&config));
                println!(
                    "{}",
                    serde_json::to_string_pretty(&definitions).expect("serializes")
                );
                Ok(())
            }
            Command::Topology {
                print_definitions: false,
            } => declare_only(&config).await.map_err(|e| e.to_string()),
            Command::Dlq { action } => run_dlq(&config, action).await,
            Command::Config => {
                println!("{config:#?}");
                Ok(())
            }
            Command::Publish {
                files,
                sign,
                random,
                sdkappid,
                routing_key,
            } => {
                let headers = callback_headers(sign, random, sdkappid);
                publish_files(&config, &files, headers, &routing_key).await
            }
            Command::Normalize { .. } => unreachable!("handled above"),
        }
    });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            ExitCode::from(EXIT_FAILURE)
        }
    }
}

fn init_logging(format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info"));
    let json = match format {
        LogFormat::Json => true,
        LogFormat::Text => false,
        LogFormat::Auto => !std::io::stderr().is_terminal(),
    };
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr);
    if json {
        builder
            .json()
            .flatten_event(true)
            .with_current_span(true)
            .init();
    } else {
        builder.init();
    }
}

/// The service: the worker plus its metrics and health endpoints. The first
/// SIGTERM/SIGINT starts an orderly stop; a second one quits at once.
async fn run_worker(config: Config) -> Result<(), String> {
    let health = Health::default();
    let metrics = Metrics::new();
    let stop = CancellationToken::new();
    tokio::spawn(watch_signals(stop.clone()));
    let server_stop = CancellationToken::new();
    let server = match config.metrics_addr.trim() {
        "" => None,
        addr => {
            let listener = tokio::net::TcpListener::bind(addr)
                .await
                .map_err(|e| format!("metrics_addr {addr:?}: {e}"))?;
            let serving = crate::metrics::serve(
                listener,
                metrics.clone(),
                health.clone(),
                server_stop.clone().cancelled_owned(),
            );
            Some(tokio::spawn(serving))
        }
    };
    let result = crate::worker::run(config, stop.cancelled_owned(), health, metrics).await;
    server_stop.cancel();
    if let Some(server) = server
        && let Ok(Err(e)) = server.await
    {
        tracing::warn!(error = %e, "metrics endpoint failed");
    }
    result.map_err(|e| e.to_string())
}

/// Cancel `stop` on the first SIGINT or SIGTERM; exit at once on the second.
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

fn read_input(file: &Path) -> std::io::Result<Vec<u8>> {
    if file.as_os_str() == "-" {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body)?;
        Ok(body)
    } else {
        std::fs::read(file)
    }
}

fn run_normalize(file: &Path, sdkappid: Option<i64>) -> ExitCode {
    let body = match read_input(file) {
        Ok(body) => body,
        Err(e) => {
            eprintln!("error: cannot read {}: {e}", file.display());
            return ExitCode::from(EXIT_NO_INPUT);
        }
    };
    let outcome =
        decode(&body, &Limits::default()).and_then(|announcement| match announcement.payload {
            Payload::Finished(recording) => {
                normalize(&recording, announcement.sdkappid.or(sdkappid)).map(|n| Some(n.record))
            }
            Payload::NotFinished(reason) => {
                eprintln!("skipped: {reason}");
                Ok(None)
            }
        });
    match outcome {
        Ok(Some(record)) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&record).expect("a record always serializes")
            );
            ExitCode::SUCCESS
        }
        Ok(None) => ExitCode::SUCCESS,
        Err(rejection) => {
            eprintln!("error: {rejection}");
            ExitCode::from(EXIT_DATA_ERROR)
        }
    }
}

async fn run_dlq(config: &Config, action: DlqAction) -> Result<(), String> {
    match action {
        DlqAction::List { reason } => {
            let parked = crate::dlq::list(config, reason.as_deref())
                .await
                .map_err(|e| e.to_string())?;
            for message in &parked {
                println!("{}", serde_json::to_string(message).expect("serializes"));
            }
            eprintln!("{} parked message(s) listed", parked.len());
        }
        DlqAction::Replay { reason, limit } => {
            let moved = crate::dlq::replay(config, reason.as_deref(), limit).await?;
            eprintln!("{moved} message(s) moved back to {}", config.work_queue);
        }
        DlqAction::Purge => {
            let purged = crate::dlq::purge(config).await.map_err(|e| e.to_string())?;
            eprintln!("{purged} parked message(s) deleted");
        }
    }
    Ok(())
}

async fn declare_only(config: &Config) -> Result<(), lapin::Error> {
    let connection = broker::connect(config, "lesson-replay topology").await?;
    let channel = connection.create_channel().await?;
    broker::declare_topology(&channel, config).await?;
    tracing::info!("topology declared");
    connection.close(200, "done".into()).await
}

/// The callback's URL parameters as AMQP headers.
pub fn callback_headers(
    sign: Option<String>,
    random: Option<String>,
    sdkappid: Option<i64>,
) -> FieldTable {
    let mut headers = FieldTable::default();
    if let Some(sign) = sign {
        broker::set_header(&mut headers, broker::HEADER_SIGN, &sign);
    }
    if let Some(random) = random {
        broker::set_header(&mut headers, broker::HEADER_RANDOM, &random);
    }
    if let Some(app) = sdkappid {
        headers.insert(
            ShortString::from(broker::HEADER_SDKAPPID),
            AMQPValue::LongLongInt(app),
        );
    }
    headers
}

async fn publish_files(
    config: &Config,
    files: &[PathBuf],
    headers: FieldTable,
    routing_key: &str,
) -> Result<(), String> {
    let connection = broker::connect(config, "lesson-replay publish")
        .await
        .map_err(|e| e.to_string())?;
    let channel = broker::confirm_channel(&connection)
        .await
        .map_err(|e| e.to_string())?;
    broker::declare_topology(&channel, config)
        .await
        .map_err(|e| e.to_string())?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    for file in files {
        let body = read_input(file).map_err(|e| format!("cannot read {}: {e}", file.display()))?;
        let properties = broker::json_properties()
            .with_headers(headers.clone())
            .with_timestamp(now);
        broker::publish_confirmed(
            &channel,
            &config.inbound_exchange,
            routing_key,
            &body,
            properties,
        )
        .await
        .map_err(|e| e.to_string())?;
        println!("published {}", file.display());
    }
    connection
        .close(200, "done".into())
        .await
        .map_err(|e| e.to_string())
}
