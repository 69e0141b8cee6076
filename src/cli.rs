//! The command line: argument parsing and the output of each command. The
//! work itself is in the library: services (worker, ingress) start through
//! [`crate::service::run`], messages are judged by
//! [`crate::decision::decide::decide`], the broker is reached through
//! [`crate::broker`], TIC's API through [`crate::tic`].

use std::io::Read;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use lapin::types::FieldTable;

use crate::broker::amqp::{self, BrokerSettings, DeclareError, PublishError};
use crate::broker::dlq::{self, DlqError};
use crate::broker::headers::{self};
use crate::broker::topology;
use crate::config::reference;
use crate::config::settings::{Config, ConfigError};
use crate::decision::decide::{Decision, Envelope, decide};
use crate::decision::record::Record;
use crate::decision::watch::{WATCH_TYPE, Watch, due_queue};
use crate::media::archive::Archiver;
use crate::media::s3_error::S3Error;
use crate::preview::page;
use crate::service::endpoints::Health;
use crate::service::run::{Service, ServiceError, init_logging, shutdown_signal};
use crate::telemetry::metrics::Metrics;
use crate::tic::client::{StartRequest, TicClient, TicError};
use crate::webhook::send::{Sender, Verdict};

/// Exit code of a rejected message (sysexits EX_DATAERR).
pub const EXIT_DATA_ERROR: u8 = 65;
/// Exit code when an input file cannot be read (sysexits EX_NOINPUT).
pub const EXIT_NO_INPUT: u8 = 66;
/// Exit code when a remote answers outside its protocol, e.g. TIC's answer
/// too large (sysexits EX_PROTOCOL).
pub const EXIT_PROTOCOL: u8 = 76;
/// Exit code for configuration and broker failures.
pub const EXIT_FAILURE: u8 = 1;

#[derive(Debug, Parser)]
#[command(name = "lesson-replay", version, about = "TIC recording messages in, lesson-replay records out", after_help = reference::help_text())]
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
    /// Receive TIC's callbacks over HTTP and publish them to the broker,
    /// answering TIC only once the broker confirmed (the edge service).
    Ingress,
    /// Call TIC's real-time recording API.
    Tic {
        /// The app to act as, when tic_keys has several.
        #[arg(long, global = true)]
        sdkappid: Option<i64>,
        #[command(subcommand)]
        action: TicAction,
    },
    /// Turn one message into a record on stdout, without any network, judged
    /// exactly as the worker judges it (same settings: limits, signatures,
    /// allowed VOD hosts).
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
        /// The callback's `sign` URL parameter (as the x-tic-sign header would).
        #[arg(long)]
        sign: Option<String>,
        /// When the callback was received, Unix seconds (the AMQP `timestamp`).
        #[arg(long)]
        timestamp: Option<i64>,
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
    /// Watch a task known from elsewhere: the worker asks TIC about it at once,
    /// then on the watch schedule, until its record is published.
    Watch {
        task_id: String,
        /// The app the task belongs to (its TicKey must be in tic_keys).
        #[arg(long)]
        sdkappid: i64,
        /// The room, when known (for the logs).
        #[arg(long, default_value_t = 0)]
        room_id: i64,
    },
    /// Check the settings and print them as JSON (secrets redacted); exit 1 when invalid.
    Config {
        /// Print the settings reference table (Markdown) instead.
        #[arg(long)]
        reference: bool,
    },
    /// Add the bucket's lifecycle rules for lesson-replay's prefix, keeping
    /// its other rules: multipart uploads unfinished after DAYS days are
    /// aborted (the backstop for a killed worker's upload no later attempt
    /// cleans), and stale entries of the upload journal expire.
    /// Every bucket of the configuration (the default one and each app's),
    /// or only app SDKAPPID's with `--sdkappid`.
    Lifecycle {
        #[arg(long, default_value_t = 1)]
        days: i32,
        /// Only this app's bucket (its `[apps.<sdkappid>]` table, else the default).
        #[arg(long)]
        sdkappid: Option<i64>,
    },
    /// Write a record's replay page: one self-contained HTML file that plays
    /// its tracks with their layout, a timeline and the record's facts. Each
    /// archived track plays from the bucket (with `--presign-hours`, through
    /// presigned URLs, for a private bucket), else from its VOD URL.
    /// `page.html#t=754000` opens it at that moment.
    Preview {
        /// The record (JSON), or `-` for standard input.
        #[arg(default_value = "-")]
        record: PathBuf,
        /// Where to write the page (default: standard output).
        #[arg(short, long)]
        output: Option<PathBuf>,
        /// Presign the archived copies' URLs for this many hours (at most
        /// 168); needs the archive's settings (s3_bucket, credentials) of
        /// the record's app (its `[apps.<sdkappid>]` table, else the default).
        #[arg(long)]
        presign_hours: Option<u64>,
    },
    /// Inspect and recover parked messages.
    Dlq {
        #[command(subcommand)]
        action: DlqAction,
    },
    /// Try a school's webhook endpoint.
    Webhook {
        #[command(subcommand)]
        action: WebhookAction,
    },
}

#[derive(Debug, Subcommand)]
pub enum WebhookAction {
    /// Send one signed `webhook.test` event to the app's endpoint (its
    /// `[apps.<sdkappid>]` table's, else `webhook_url`) and print what it
    /// answered. Exit 0 on a 2xx, else 1.
    Test {
        /// The app whose endpoint is tried (none: the top-level `webhook_url`).
        #[arg(long)]
        sdkappid: Option<i64>,
    },
}

#[derive(Debug, Subcommand)]
pub enum TicAction {
    /// Start recording a room; prints the task id.
    Start {
        #[arg(long)]
        room_id: i64,
        /// The recording user: must start with tic_record_user_{ROOM_ID}.
        #[arg(long)]
        user_id: String,
        /// The recording user's UserSig (or TIC_USER_SIG, out of shell history and `ps`).
        #[arg(long, env = "TIC_USER_SIG", hide_env_values = true)]
        user_sig: String,
        #[arg(long)]
        group_id: Option<String>,
        /// Whiteboard size, WIDTHxHEIGHT (TIC's default 1280x960).
        #[arg(long, value_parser = parse_size)]
        whiteboard: Option<(u32, u32)>,
    },
    /// Stop a recording.
    Stop { task_id: String },
    /// Print a recording's state exactly as TIC sends it (pipe it to `normalize -`).
    Query { task_id: String },
    /// Register the callback URL with TIC (an empty URL deletes it).
    SetCallback { url: String },
}

fn parse_size(text: &str) -> Result<(u32, u32), String> {
    let (w, h) = text
        .split_once(['x', 'X'])
        .ok_or_else(|| format!("{text:?} is not WIDTHxHEIGHT"))?;
    let number = |n: &str| n.trim().parse::<u32>().map_err(|e| format!("{n:?}: {e}"));
    Ok((number(w)?, number(h)?))
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

/// Why a command failed (exit 1).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    #[error(transparent)]
    Config(#[from] ConfigError),
    #[error(transparent)]
    Service(#[from] ServiceError),
    #[error("broker: {0}")]
    Broker(#[from] lapin::Error),
    #[error(transparent)]
    Topology(#[from] DeclareError),
    #[error("publishing: {0}")]
    Publish(#[from] PublishError),
    #[error(transparent)]
    Dlq(#[from] DlqError),
    #[error(transparent)]
    Tic(#[from] TicError),
    #[error("cannot read {path}: {source}")]
    Read {
        path: String,
        source: std::io::Error,
    },
    #[error("cannot write the answer: {0}")]
    Write(std::io::Error),
    #[error("{0}")]
    Usage(String),
    #[error("the store: {0}")]
    Store(#[from] S3Error),
    #[error("webhook: {0}")]
    Webhook(String),
}

/// Run the command line; returns the process exit code.
pub fn main() -> ExitCode {
    let cli = Cli::parse();
    if let Command::Config { reference: true } = cli.command {
        // The reference describes the defaults: no settings needed.
        print!("{}", reference::markdown_table());
        return ExitCode::SUCCESS;
    }
    let config = match Config::load(cli.config.as_deref()) {
        Ok(config) => config,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_FAILURE);
        }
    };
    match cli.command {
        Command::Normalize {
            file,
            sdkappid,
            sign,
            timestamp,
        } => {
            let envelope = Envelope {
                sign,
                sdkappid: sdkappid.map(|id| id.to_string()),
                timestamp,
            };
            return run_normalize(&config, &file, &envelope);
        }
        Command::Config { .. } => {
            let shown = serde_json::to_string_pretty(&config).expect("settings serialize");
            println!("{shown}");
            return ExitCode::SUCCESS;
        }
        Command::Topology {
            print_definitions: true,
        } => {
            let plan = topology::plan(&config.broker_settings().topology);
            let definitions = topology::definitions(&plan);
            println!(
                "{}",
                serde_json::to_string_pretty(&definitions).expect("serializes")
            );
            return ExitCode::SUCCESS;
        }
        _ => {}
    }
    init_logging(config.log_format);
    let runtime = tokio::runtime::Runtime::new().expect("a tokio runtime starts");
    match runtime.block_on(run_networked(config, cli.command)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("error: {e}");
            match e {
                CliError::Tic(TicError::TooLarge { .. }) => ExitCode::from(EXIT_PROTOCOL),
                _ => ExitCode::from(EXIT_FAILURE),
            }
        }
    }
}

/// The commands that talk to the broker.
async fn run_networked(config: Config, command: Command) -> Result<(), CliError> {
    let broker = config.broker_settings();
    match command {
        Command::Lifecycle { days, sdkappid } => {
            let destinations = match sdkappid {
                Some(app) => config
                    .bucket_settings(Some(app))
                    .map(|settings| vec![(Some(app), settings)])
                    .unwrap_or_default(),
                None => config.destinations(),
            };
            if destinations.is_empty() {
                return Err(CliError::Usage(
                    "lifecycle needs s3_bucket (or the app's, and the store's settings)".into(),
                ));
            }
            for (app, settings) in destinations {
                let archiver = Archiver::new(&settings, Metrics::new()).await;
                let rules = archiver.apply_lifecycle(days).await?;
                let app = app.map_or_else(|| "default".to_owned(), |a| a.to_string());
                eprintln!(
                    "bucket {} (app {app}): lifecycle rules now {}",
                    archiver.bucket(),
                    rules.join(", ")
                );
            }
        }
        Command::Worker => {
            let service = Service::bind(config, Metrics::new(), Health::default()).await?;
            service.run_worker(shutdown_signal()).await?;
        }
        Command::Ingress => {
            let service = Service::bind(config, Metrics::new(), Health::default()).await?;
            service.run_ingress(shutdown_signal()).await?;
        }
        Command::Tic { sdkappid, action } => {
            let client = TicClient::new(config.tic_settings(sdkappid)?)?;
            run_tic(&client, action).await?;
        }
        Command::Topology { .. } => declare_only(&broker).await?,
        Command::Watch {
            task_id,
            sdkappid,
            room_id,
        } => {
            let watch = Watch {
                sdkappid,
                task_id,
                room_id,
                since: time::OffsetDateTime::now_utc().unix_timestamp(),
                checks: 0,
                failures: 0,
            };
            start_watch(&broker, &watch).await?;
        }
        Command::Dlq { action } => run_dlq(&broker, action).await?,
        Command::Webhook {
            action: WebhookAction::Test { sdkappid },
        } => try_webhook(&config, sdkappid).await?,
        Command::Publish {
            files,
            sign,
            random,
            sdkappid,
            routing_key,
        } => {
            let app = sdkappid.map(|id| id.to_string());
            let headers =
                headers::callback_headers(sign.as_deref(), random.as_deref(), app.as_deref());
            publish_files(&broker, &files, headers, &routing_key).await?;
        }
        Command::Preview {
            record,
            output,
            presign_hours,
        } => write_preview(&config, &record, output.as_deref(), presign_hours).await?,
        Command::Normalize { .. } | Command::Config { .. } => {
            unreachable!("answered without a runtime")
        }
    }
    Ok(())
}

/// Send a test event to app `sdkappid`'s endpoint; print the answer.
async fn try_webhook(config: &Config, sdkappid: Option<i64>) -> Result<(), CliError> {
    let destination = config.webhook_destination(sdkappid).ok_or_else(|| {
        CliError::Usage(match sdkappid {
            Some(app) => format!(
                "app {app} has no webhook endpoint: set webhook_url (and webhook_secrets) in [apps.{app}] or at the top level"
            ),
            None => "no webhook endpoint: set webhook_url and webhook_secrets".into(),
        })
    })?;
    let sender = Sender::new(std::time::Duration::from_secs(config.webhook_timeout_secs))
        .map_err(CliError::Webhook)?;
    let event = crate::webhook::event::test(sdkappid, time::OffsetDateTime::now_utc());
    println!(
        "POST {} webhook-id {} ({} signature{})",
        destination.shown(),
        event.id,
        destination.secrets.len(),
        if destination.secrets.len() == 1 {
            ""
        } else {
            "s"
        }
    );
    let attempt = sender.send(&destination, &event.id, &event.body).await;
    println!(
        "{} in {} ms",
        attempt.explanation,
        attempt.elapsed.as_millis()
    );
    match attempt.verdict {
        Verdict::Delivered => Ok(()),
        Verdict::Gone => Err(CliError::Webhook(
            "the endpoint answered 410 Gone: the worker would park its events (webhook_gone)"
                .into(),
        )),
        Verdict::Retry { .. } => Err(CliError::Webhook(
            "not delivered: the worker would try again on webhook_delays_secs".into(),
        )),
    }
}

/// The replay page of the record in `file`, written to `output` or stdout.
async fn write_preview(
    config: &Config,
    file: &Path,
    output: Option<&Path>,
    presign_hours: Option<u64>,
) -> Result<(), CliError> {
    let record: Record = serde_json::from_slice(&read_input(file)?).map_err(|e| {
        CliError::Usage(format!(
            "{} is not a lesson-replay record: {e}",
            file.display()
        ))
    })?;
    let sources = match (presign_hours, config.bucket_settings(record.sdkappid)) {
        (None, _) => page::origin_sources(&record),
        (Some(_), None) => {
            return Err(CliError::Usage(
                "--presign-hours needs the archive's settings (s3_bucket, credentials)".into(),
            ));
        }
        (Some(hours), Some(_)) if !(1..=168).contains(&hours) => {
            return Err(CliError::Usage(
                "--presign-hours must be 1 to 168 (S3 presigned URLs last at most 7 days)".into(),
            ));
        }
        (Some(hours), Some(settings)) => {
            let archiver = Archiver::new(&settings, Metrics::new()).await;
            let valid = std::time::Duration::from_secs(hours * 3600);
            let mut presigned = std::collections::HashMap::new();
            for archive in record.tracks.iter().filter_map(|t| t.archive.as_ref()) {
                presigned.insert(
                    archive.key.clone(),
                    archiver
                        .presigned_get(&archive.bucket, &archive.key, valid)
                        .await?,
                );
            }
            page::archive_sources(&record, |key| presigned.get(key).cloned())
        }
    };
    let html = page::render(&record, &sources);
    match output {
        Some(path) => std::fs::write(path, html).map_err(CliError::Write)?,
        None => std::io::Write::write_all(&mut std::io::stdout(), html.as_bytes())
            .map_err(CliError::Write)?,
    }
    Ok(())
}

fn read_input(file: &Path) -> Result<Vec<u8>, CliError> {
    let read = if file.as_os_str() == "-" {
        let mut body = Vec::new();
        std::io::stdin().read_to_end(&mut body).map(|_| body)
    } else {
        std::fs::read(file)
    };
    read.map_err(|source| CliError::Read {
        path: file.display().to_string(),
        source,
    })
}

fn run_normalize(config: &Config, file: &Path, envelope: &Envelope) -> ExitCode {
    let body = match read_input(file) {
        Ok(body) => body,
        Err(e) => {
            eprintln!("error: {e}");
            return ExitCode::from(EXIT_NO_INPUT);
        }
    };
    match decide(&body, envelope, &config.input_policy()) {
        Decision::Publish(normalized) => {
            println!(
                "{}",
                serde_json::to_string_pretty(&normalized.record)
                    .expect("a record always serializes")
            );
            ExitCode::SUCCESS
        }
        Decision::Skip(reason) => {
            eprintln!("skipped: {reason}");
            ExitCode::SUCCESS
        }
        Decision::Watch { reason, watch } => {
            eprintln!(
                "skipped: {reason} (the worker watches task {} of sdkappid {})",
                watch.task_id, watch.sdkappid
            );
            ExitCode::SUCCESS
        }
        Decision::Reject(rejection) => {
            eprintln!("error: {rejection}");
            ExitCode::from(EXIT_DATA_ERROR)
        }
    }
}

async fn run_tic(client: &TicClient, action: TicAction) -> Result<(), CliError> {
    match action {
        TicAction::Start {
            room_id,
            user_id,
            user_sig,
            group_id,
            whiteboard,
        } => {
            let request = StartRequest {
                room_id,
                user_id,
                user_sig: user_sig.into(),
                group_id,
                whiteboard,
            };
            println!("{}", client.start(&request).await?);
        }
        TicAction::Stop { task_id } => {
            client.stop(&task_id).await?;
            eprintln!("stopped {task_id}");
        }
        TicAction::Query { task_id } => {
            use std::io::Write;
            let answer = client.query(&task_id).await?;
            let mut out = std::io::stdout();
            out.write_all(&answer)
                .and_then(|()| out.flush())
                .map_err(CliError::Write)?;
        }
        TicAction::SetCallback { url } if url.is_empty() => {
            client.set_callback("").await?;
            eprintln!("callback deleted");
        }
        TicAction::SetCallback { url } => {
            client.set_callback(&url).await?;
            eprintln!("callback set: TIC's test request to {url} was answered");
        }
    }
    Ok(())
}

async fn run_dlq(broker: &BrokerSettings, action: DlqAction) -> Result<(), CliError> {
    match action {
        DlqAction::List { reason } => {
            let parked = dlq::list(broker, reason.as_deref()).await?;
            for message in &parked {
                println!("{}", serde_json::to_string(message).expect("serializes"));
            }
            eprintln!("{} parked message(s) listed", parked.len());
        }
        DlqAction::Replay { reason, limit } => {
            let moved = dlq::replay(broker, reason.as_deref(), limit).await?;
            eprintln!(
                "{moved} message(s) moved back to {}",
                broker.topology.work_queue
            );
        }
        DlqAction::Purge => {
            let purged = dlq::purge(broker).await?;
            eprintln!("{purged} parked message(s) deleted");
        }
    }
    Ok(())
}

/// Publish `watch` to the due watches, confirmed.
async fn start_watch(broker: &BrokerSettings, watch: &Watch) -> Result<(), CliError> {
    let connection = amqp::connect(broker, "lesson-replay watch").await?;
    amqp::declare_topology(&connection, &broker.topology).await?;
    let channel = amqp::confirm_channel(&connection).await?;
    let body = serde_json::to_vec(watch).expect("a watch always serializes");
    let properties = amqp::json_properties().with_type(WATCH_TYPE.into());
    let queue = due_queue(&broker.topology.work_queue);
    amqp::publish_confirmed(&channel, "", &queue, &body, properties).await?;
    eprintln!(
        "watching task {} of sdkappid {}: the worker asks TIC now",
        watch.task_id, watch.sdkappid
    );
    connection.close(200, "done".into()).await?;
    Ok(())
}

async fn declare_only(broker: &BrokerSettings) -> Result<(), CliError> {
    let connection = amqp::connect(broker, "lesson-replay topology").await?;
    amqp::declare_topology(&connection, &broker.topology).await?;
    tracing::info!("topology declared");
    Ok(connection.close(200, "done".into()).await?)
}

async fn publish_files(
    broker: &BrokerSettings,
    files: &[PathBuf],
    headers: FieldTable,
    routing_key: &str,
) -> Result<(), CliError> {
    let connection = amqp::connect(broker, "lesson-replay publish").await?;
    amqp::declare_topology(&connection, &broker.topology).await?;
    let channel = amqp::confirm_channel(&connection).await?;
    let now = time::OffsetDateTime::now_utc().unix_timestamp().max(0) as u64;
    for file in files {
        let body = read_input(file)?;
        let properties = amqp::json_properties()
            .with_headers(headers.clone())
            .with_timestamp(now);
        let exchange = &broker.topology.inbound_exchange;
        amqp::publish_confirmed(&channel, exchange, routing_key, &body, properties).await?;
        println!("published {}", file.display());
    }
    connection.close(200, "done".into()).await?;
    Ok(())
}
