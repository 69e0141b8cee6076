//! Shared helpers for the integration tests: every test gets its own uniquely
//! named exchanges and queues on the real broker, runs the real worker in
//! process, and deletes what it declared when done.

#![allow(dead_code)] // Each test binary uses a different subset.

pub mod browser;
pub mod cluster;
pub mod messages;
pub mod moto;
pub mod origin;
pub mod receiver;
pub mod s3;
pub mod tic_mock;

use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use lapin::options::{BasicAckOptions, BasicGetOptions, ExchangeDeleteOptions, QueueDeleteOptions};
use lapin::types::FieldTable;
use lapin::{BasicProperties, Channel, Connection, ConnectionProperties};
use lesson_replay::broker::{amqp, headers, topology};
use lesson_replay::config::settings::Config;
use lesson_replay::service::endpoints::Health;
use lesson_replay::service::run::{Service, ServiceError};
use lesson_replay::service::worker::Hooks;
use lesson_replay::telemetry::metrics::Metrics;
use secrecy::{ExposeSecret, SecretString};
use serde_json::Value;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

pub const EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/examples/tic");
pub const RECORD_EXAMPLES: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/proto/examples");
pub const SCHEMA: &str = concat!(
    env!("CARGO_MANIFEST_DIR"),
    "/proto/lesson-replay.v1.schema.json"
);

/// The variable naming another broker for the tests. Outside the settings'
/// `LESSON_REPLAY_*` namespace: the settings loader refuses unknown names
/// there, and every process a test starts inherits the environment.
pub const AMQP_URL_VAR: &str = "TEST_AMQP_URL";

/// The broker the tests use: `TEST_AMQP_URL`, else the local one.
pub fn amqp_url() -> String {
    std::env::var(AMQP_URL_VAR).unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// A loopback port free right now.
pub fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A configuration whose exchange and queue names belong to this test alone.
pub fn isolated_config(test: &str) -> Config {
    // Worker logs, shown for failing tests (RUST_LOG=debug for more).
    let filter =
        tracing_subscriber::EnvFilter::try_from_default_env().unwrap_or_else(|_| "info".into());
    let _ = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_test_writer()
        .try_init();
    static COUNTER: AtomicU32 = AtomicU32::new(0);
    let unique = format!(
        "test.{test}.{}.{}",
        std::process::id(),
        COUNTER.fetch_add(1, Ordering::Relaxed)
    );
    Config {
        amqp_url: SecretString::from(amqp_url()),
        inbound_exchange: format!("{unique}.tic"),
        work_queue: format!("{unique}.work"),
        parking_queue: format!("{unique}.parking"),
        records_exchange: format!("{unique}.records-x"),
        records_queue: format!("{unique}.records"),
        concurrency: 4,
        shutdown_grace_secs: 5,
        // The contract's example URLs do not exist: tests that fetch turn this on.
        probe: false,
        // The test origin listens on loopback.
        vod_allowed_hosts: vec!["127.0.0.1".into(), "*.vod2.myqcloud.com".into()],
        vod_allow_private_networks: true,
        retry_delays_secs: vec![1, 2],
        fetch_attempts: 2,
        // An ingress stops at once in tests (its drain has a test of its own).
        ingress_drain_secs: 0,
        metrics_addr: String::new(),
        ..Config::default()
    }
}

/// A test's own connection to the broker, for publishing and inspecting queues.
pub struct Broker {
    pub config: Config,
    pub connection: Connection,
    pub channel: Channel,
}

impl Broker {
    /// Connect and declare the test's topology.
    pub async fn new(config: Config) -> Broker {
        let connection = Connection::connect(
            config.amqp_url.expose_secret(),
            ConnectionProperties::default(),
        )
        .await
        .expect("RabbitMQ is reachable (scripts/test.sh starts it)");
        amqp::declare_topology(&connection, &config.broker_settings().topology)
            .await
            .unwrap();
        let channel = amqp::confirm_channel(&connection).await.unwrap();
        Broker {
            config,
            connection,
            channel,
        }
    }

    /// Publish a message body to the inbound exchange, as the callback service does.
    pub async fn publish(&self, body: &[u8], headers: FieldTable) {
        let properties = amqp::json_properties().with_headers(headers);
        amqp::publish_confirmed(
            &self.channel,
            &self.config.inbound_exchange,
            "tic.test",
            body,
            properties,
        )
        .await
        .unwrap();
    }

    /// The next message of `queue`, waiting up to `wait`; acknowledged. The
    /// body is parsed as JSON, or kept as a string when it is not JSON.
    pub async fn next(&self, queue: &str, wait: Duration) -> Option<(Value, BasicProperties)> {
        let (data, properties) = self.next_raw(queue, wait).await?;
        let body = serde_json::from_slice(&data)
            .unwrap_or_else(|_| Value::String(String::from_utf8_lossy(&data).into()));
        Some((body, properties))
    }

    /// The next message of `queue` with its body as sent, waiting up to `wait`; acknowledged.
    pub async fn next_raw(
        &self,
        queue: &str,
        wait: Duration,
    ) -> Option<(Vec<u8>, BasicProperties)> {
        let deadline = Instant::now() + wait;
        loop {
            let got = self
                .channel
                .basic_get(queue.into(), BasicGetOptions::default())
                .await
                .unwrap();
            if let Some(message) = got {
                message
                    .delivery
                    .acker
                    .ack(BasicAckOptions::default())
                    .await
                    .unwrap();
                return Some((message.delivery.data, message.delivery.properties));
            }
            if Instant::now() > deadline {
                return None;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    /// Exactly `n` messages from `queue`, bodies as sent (fails the test if they do not come).
    pub async fn take_raw(&self, queue: &str, n: usize) -> Vec<(Vec<u8>, BasicProperties)> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next_raw(queue, Duration::from_secs(20)).await {
                Some(m) => out.push(m),
                None => panic!("expected {n} messages on {queue}, got {}", out.len()),
            }
        }
        out
    }

    /// Exactly `n` messages from `queue` (fails the test if they do not come).
    pub async fn take(&self, queue: &str, n: usize) -> Vec<(Value, BasicProperties)> {
        let mut out = Vec::new();
        while out.len() < n {
            match self.next(queue, Duration::from_secs(20)).await {
                Some(m) => out.push(m),
                None => panic!("expected {n} messages on {queue}, got {}", out.len()),
            }
        }
        out
    }

    /// Every message ready in `queue` now, acknowledged (no waiting).
    pub async fn drain(&self, queue: &str) -> Vec<(Value, BasicProperties)> {
        let mut out = Vec::new();
        while let Some(message) = self.next(queue, Duration::ZERO).await {
            out.push(message);
        }
        out
    }

    /// Bind to `exchange` a queue that refuses every message (`x-max-length`
    /// 0, `reject-publish`): the broker then nacks every publish routed
    /// there. Returns its name; delete it to let publishes through again.
    pub async fn refusing_queue(&self, exchange: &str) -> String {
        use lapin::options::{QueueBindOptions, QueueDeclareOptions};
        use lapin::types::AMQPValue;
        let name = format!("{exchange}.refusing");
        let mut arguments = FieldTable::default();
        arguments.insert("x-max-length".into(), AMQPValue::LongLongInt(0));
        headers::set_header(&mut arguments, "x-overflow", "reject-publish");
        self.channel
            .queue_declare(
                name.as_str().into(),
                QueueDeclareOptions::default(),
                arguments,
            )
            .await
            .unwrap();
        self.channel
            .queue_bind(
                name.as_str().into(),
                exchange.into(),
                "#".into(),
                QueueBindOptions::default(),
                FieldTable::default(),
            )
            .await
            .unwrap();
        name
    }

    /// Delete `queue`.
    pub async fn delete_queue(&self, queue: &str) {
        self.channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await
            .unwrap();
    }

    /// Consumers of `queue` right now.
    pub async fn consumers(&self, queue: &str) -> u32 {
        let options = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .unwrap()
            .consumer_count()
    }

    /// Fail the test unless the work queue, every delay tier and the parking
    /// queue are empty: every message has reached its end. Meant for after
    /// the worker stopped, when nothing can still be on its way.
    pub async fn assert_settled(&self) {
        let plan = topology::plan(&self.config.broker_settings().topology);
        for queue in plan.queue_names() {
            if queue == self.config.records_queue {
                continue;
            }
            assert_eq!(self.depth(queue).await, 0, "{queue} is not empty");
        }
    }

    /// Messages currently ready in `queue`.
    pub async fn depth(&self, queue: &str) -> u32 {
        let options = lapin::options::QueueDeclareOptions {
            passive: true,
            ..Default::default()
        };
        self.channel
            .queue_declare(queue.into(), options, FieldTable::default())
            .await
            .unwrap()
            .message_count()
    }

    /// Delete everything this test declared (also done on drop, even after a panic).
    pub async fn cleanup(self) {
        delete_topology(&self.channel, &self.config).await;
        let _ = self.connection.close(200, "test done".into()).await;
    }
}

impl Drop for Broker {
    fn drop(&mut self) {
        if !self.connection.status().connected() {
            return; // cleanup() ran.
        }
        // A failed test never reaches cleanup(): delete its topology from a
        // thread of its own, since this may run inside the test's runtime.
        let config = self.config.clone();
        let _ = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                let url = config.amqp_url.expose_secret().to_owned();
                if let Ok(connection) =
                    Connection::connect(&url, ConnectionProperties::default()).await
                    && let Ok(channel) = connection.create_channel().await
                {
                    delete_topology(&channel, &config).await;
                    let _ = connection.close(200, "test cleanup".into()).await;
                }
            });
        })
        .join();
    }
}

/// Delete every queue and exchange of the test's topology, as the worker plans it.
pub async fn delete_topology(channel: &Channel, c: &Config) {
    let plan = topology::plan(&c.broker_settings().topology);
    for queue in plan.queue_names() {
        let _ = channel
            .queue_delete(queue.into(), QueueDeleteOptions::default())
            .await;
    }
    for exchange in &plan.exchanges {
        let _ = channel
            .exchange_delete(exchange.as_str().into(), ExchangeDeleteOptions::default())
            .await;
    }
}

/// The real worker service, running in this process until [`RunningWorker::stop`]:
/// started exactly as `lesson-replay worker` starts it, endpoints included.
pub struct RunningWorker {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServiceError>>,
    /// Where `/metrics`, `/healthz`, `/readyz` answer (set `metrics_addr` to `127.0.0.1:0`).
    pub endpoint: Option<std::net::SocketAddr>,
    health: Health,
}

pub async fn spawn_worker(config: Config) -> RunningWorker {
    spawn_worker_with(config, Health::default(), Metrics::default()).await
}

/// The worker with health and metrics the test can watch.
pub async fn spawn_worker_with(config: Config, health: Health, metrics: Metrics) -> RunningWorker {
    spawn_worker_hooked(config, health, metrics, Hooks::default()).await
}

/// The worker with test seams, e.g. a panic on purpose.
pub async fn spawn_worker_hooked(
    config: Config,
    health: Health,
    metrics: Metrics,
    hooks: Hooks,
) -> RunningWorker {
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let service = Service::bind(config, metrics, health.clone())
        .await
        .expect("the endpoint listener binds")
        .with_hooks(hooks);
    let endpoint = service.endpoint_addr();
    let task = tokio::spawn(service.run_worker(shutdown));
    RunningWorker {
        stop: Some(stop),
        task,
        endpoint,
        health,
    }
}

/// The real ingress service, running in this process until [`RunningIngress::stop`].
pub struct RunningIngress {
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<Result<(), ServiceError>>,
    /// Where callbacks are POSTed: `http://127.0.0.1:PORT{ingress_path}`.
    pub url: String,
    pub health: Health,
}

/// Start the ingress on a free loopback port, as `lesson-replay ingress` starts it.
pub async fn spawn_ingress(mut config: Config, metrics: Metrics) -> RunningIngress {
    config.ingress_addr = "127.0.0.1:0".into();
    let path = config.ingress_path.clone();
    let health = Health::default();
    let mut service = Service::bind(config, metrics, health.clone())
        .await
        .expect("valid settings");
    let addr = service.bind_ingress().await.expect("a free port");
    let (stop, stopped) = oneshot::channel::<()>();
    let shutdown = async move {
        let _ = stopped.await;
    };
    let task = tokio::spawn(service.run_ingress(shutdown));
    RunningIngress {
        stop: Some(stop),
        task,
        url: format!("http://{addr}{path}"),
        health,
    }
}

impl RunningIngress {
    /// Wait until it is connected to the broker.
    pub async fn wait_ready(&self) {
        let health = self.health.clone();
        wait_until("the ingress is ready", Duration::from_secs(20), || {
            health.is_ready()
        })
        .await;
    }

    /// Stop it the way SIGTERM does and check it exits cleanly.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the ingress stops")
            .expect("the ingress task does not panic")
            .expect("the ingress exits cleanly");
    }
}

/// The value of one series in `metrics`' text (`name{labels}`), 0 when absent.
pub fn metric(metrics: &Metrics, series: &str) -> u64 {
    metrics
        .render()
        .lines()
        .find_map(|l| l.strip_prefix(series)?.trim().parse().ok())
        .unwrap_or(0)
}

/// Wait until `check` holds, polling, at most `limit` (then fail the test).
pub async fn wait_until(what: &str, limit: Duration, mut check: impl FnMut() -> bool) {
    let deadline = Instant::now() + limit;
    while !check() {
        assert!(Instant::now() < deadline, "timed out waiting until {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

impl RunningWorker {
    /// Wait until it has checked its dependencies and consumes.
    pub async fn wait_ready(&self) {
        let health = self.health.clone();
        wait_until("the worker is ready", Duration::from_secs(20), || {
            health.is_ready()
        })
        .await;
    }

    /// Stop it the way SIGTERM does and check it exits cleanly.
    pub async fn stop(mut self) {
        let _ = self.stop.take().unwrap().send(());
        tokio::time::timeout(Duration::from_secs(30), self.task)
            .await
            .expect("the worker stops within its grace period")
            .expect("the worker task does not panic")
            .expect("the worker exits cleanly");
    }
}

/// Fail the test when `record` does not match the pinned JSON Schema.
pub fn assert_valid_record(record: &Value) {
    static VALIDATOR: std::sync::OnceLock<jsonschema::Validator> = std::sync::OnceLock::new();
    let validator = VALIDATOR.get_or_init(|| {
        let schema: Value =
            serde_json::from_str(&std::fs::read_to_string(SCHEMA).unwrap()).unwrap();
        jsonschema::validator_for(&schema).expect("the schema compiles")
    });
    let errors: Vec<String> = validator
        .iter_errors(record)
        .map(|e| format!("{} at {}", e, e.instance_path()))
        .collect();
    assert!(
        errors.is_empty(),
        "record violates the schema: {errors:#?}\n{record:#}"
    );
}

/// Header value as text.
pub fn header(properties: &BasicProperties, name: &str) -> Option<String> {
    headers::header_text(properties.headers().as_ref(), name)
}

/// The real `lesson-replay worker` binary as a child process, configured
/// through its environment like in production.
pub struct WorkerProcess {
    child: std::process::Child,
}

/// The environment that gives the binary the same settings as `config`:
/// every setting, secrets included, with text logs for the test output.
pub fn worker_env(c: &Config) -> Vec<(String, String)> {
    let mut env = c.to_environment();
    env.retain(|(name, _)| name != "LESSON_REPLAY_LOG_FORMAT");
    env.push(("LESSON_REPLAY_LOG_FORMAT".into(), "text".into()));
    env
}

/// The binary [`WorkerProcess`] runs: the one cargo built, or the one
/// `LESSON_REPLAY_BENCH_BIN` names (the benchmark compares two builds so).
fn binary() -> std::path::PathBuf {
    std::env::var_os("LESSON_REPLAY_BENCH_BIN")
        .map_or_else(|| env!("CARGO_BIN_EXE_lesson-replay").into(), Into::into)
}

/// Run `lesson-replay ARGS` to its end with `config`'s settings.
pub fn lesson_replay(config: &Config, args: &[&str]) -> std::process::Output {
    std::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .args(args)
        .env_clear()
        .envs(worker_env(config))
        .output()
        .expect("the binary runs")
}

impl WorkerProcess {
    pub fn start(config: &Config) -> WorkerProcess {
        let log = std::env::var("RUST_LOG").unwrap_or_else(|_| "warn".into());
        Self::start_with(config, &log, std::process::Stdio::inherit())
    }

    /// With a log level of its own, its log output going to `stderr`.
    pub fn start_with(
        config: &Config,
        rust_log: &str,
        stderr: std::process::Stdio,
    ) -> WorkerProcess {
        Self::start_command("worker", config, rust_log, stderr)
    }

    /// Another service of the binary (`ingress`), configured the same way.
    pub fn start_command(
        command: &str,
        config: &Config,
        rust_log: &str,
        stderr: std::process::Stdio,
    ) -> WorkerProcess {
        Self::start_with_env(command, config, rust_log, stderr, &[])
    }

    /// With more environment than the settings, e.g. `HTTP_PROXY`.
    pub fn start_with_env(
        command: &str,
        config: &Config,
        rust_log: &str,
        stderr: std::process::Stdio,
        extra: &[(&str, &str)],
    ) -> WorkerProcess {
        let child = std::process::Command::new(binary())
            .arg(command)
            .env_clear()
            .env("PATH", std::env::var("PATH").unwrap_or_default())
            .env("RUST_LOG", rust_log)
            .envs(worker_env(config))
            .envs(extra.iter().copied())
            // Allocator and runtime tuning (MALLOC_ARENA_MAX,
            // TOKIO_WORKER_THREADS) reaches the worker.
            .envs(
                std::env::vars()
                    .filter(|(k, _)| k.starts_with("MALLOC_") || k == "TOKIO_WORKER_THREADS"),
            )
            .stderr(stderr)
            .spawn()
            .expect("the worker binary starts");
        WorkerProcess { child }
    }

    /// The lines of its log, as they come (started with piped stderr).
    pub fn log_lines(&mut self) -> std::sync::mpsc::Receiver<String> {
        use std::io::BufRead;
        let stderr = self
            .child
            .stderr
            .take()
            .expect("started with Stdio::piped()");
        let (send, receive) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in std::io::BufReader::new(stderr)
                .lines()
                .map_while(Result::ok)
            {
                eprintln!("worker: {line}");
                if send.send(line).is_err() {
                    break;
                }
            }
        });
        receive
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// SIGKILL: a crash, nothing cleaned up.
    pub fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }

    /// SIGTERM: an orderly stop.
    pub fn terminate(&self) {
        let status = std::process::Command::new("kill")
            .args(["-TERM", &self.child.id().to_string()])
            .status()
            .unwrap();
        assert!(status.success());
    }

    /// Wait for the process to exit, at most `limit`.
    pub fn wait_exit(&mut self, limit: Duration) -> std::process::ExitStatus {
        let deadline = Instant::now() + limit;
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                return status;
            }
            assert!(
                Instant::now() < deadline,
                "the worker did not exit within {limit:?}"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for WorkerProcess {
    fn drop(&mut self) {
        self.kill();
    }
}
