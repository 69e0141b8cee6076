//! Secrets never reach the logs or the errors: every command that talks to
//! the broker, at every log level and in both formats, with a broker user of
//! its own whose password the test looks for — as text and as the byte list
//! an AMQP frame would print. And the VOD fetch ignores proxy variables, so a
//! proxy cannot resolve a host name past the private-address check.
//!
//! The broker user is made with `rabbitmqctl`: these tests need the local
//! broker and fail rather than pass without it.

mod common;

use std::io::Read;
use std::time::Duration;

use common::{Broker, WorkerProcess, isolated_config, worker_env};
use lesson_replay::config::settings::Config;
use secrecy::SecretString;

const USER: &str = "lr-secrets-test";
const PASSWORD: &str = "Pw-7f3a9c-never-logged";

fn rabbitmqctl(args: &[&str]) {
    let status = std::process::Command::new("rabbitmqctl")
        .args(args)
        .stdout(std::process::Stdio::null())
        .status()
        .expect("rabbitmqctl runs");
    assert!(status.success(), "rabbitmqctl {args:?}");
}

/// A broker user with a password to look for.
fn broker_user() {
    assert!(
        std::env::var("TEST_AMQP_URL").is_err(),
        "this test makes a broker user with rabbitmqctl: it needs the local broker"
    );
    let _ = std::process::Command::new("rabbitmqctl")
        .args(["delete_user", USER])
        .output();
    rabbitmqctl(&["add_user", USER, PASSWORD]);
    rabbitmqctl(&["set_permissions", "-p", "/", USER, ".*", ".*", ".*"]);
}

/// Every form the password could take in a log line.
fn leaks(text: &str) -> Option<String> {
    let bytes: Vec<String> = PASSWORD.bytes().map(|b| b.to_string()).collect();
    let forms = [PASSWORD.to_owned(), bytes.join(", "), bytes.join(",")];
    forms.into_iter().find(|form| text.contains(form.as_str()))
}

fn config_with_password(test: &str, password: &str) -> Config {
    let mut config = isolated_config(test);
    config.amqp_url = SecretString::from(format!("amqp://{USER}:{password}@127.0.0.1:5672/%2f"));
    config
}

/// Run `lesson-replay ARGS` with `config`'s settings at `rust_log`; its stderr.
fn run(config: &Config, args: &[&str], rust_log: &str, format: &str) -> (bool, String) {
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .args(args)
        .env_clear()
        .envs(worker_env(config))
        .env("LESSON_REPLAY_LOG_FORMAT", format)
        .env("RUST_LOG", rust_log)
        .output()
        .unwrap();
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_broker_password_is_in_no_log_line_at_any_level() {
    broker_user();
    let config = config_with_password("secrets", PASSWORD);
    let broker = Broker::new(config.clone()).await;
    let message = format!("{}/callback-record-finished.json", common::EXAMPLES);
    for rust_log in ["trace", "lapin=trace,amq_protocol=trace", "debug", "info"] {
        for format in ["json", "text"] {
            for args in [
                vec!["topology"],
                vec!["publish", message.as_str()],
                vec!["dlq", "list"],
            ] {
                let (ok, stderr) = run(&config, &args, rust_log, format);
                assert!(ok, "{args:?}: {stderr}");
                assert!(
                    leaks(&stderr).is_none(),
                    "{args:?} at {rust_log} ({format}) leaks: {stderr}"
                );
                if args[0] == "topology" && !rust_log.starts_with("lapin") {
                    assert!(
                        stderr.contains("topology declared"),
                        "logging is on: {stderr}"
                    );
                }
            }
        }
    }
    // The worker, from start to an orderly stop.
    let mut worker = WorkerProcess::start_with_env(
        "worker",
        &config,
        "trace",
        std::process::Stdio::piped(),
        &[],
    );
    let lines = worker.log_lines();
    std::thread::sleep(Duration::from_secs(2));
    worker.terminate();
    worker.wait_exit(Duration::from_secs(30));
    let logged: Vec<String> = lines.try_iter().collect();
    assert!(
        logged.iter().any(|l| l.contains("consuming")),
        "the worker ran"
    );
    for line in &logged {
        assert!(leaks(line).is_none(), "the worker leaks: {line}");
    }
    // A wrong password: refused, and neither password is shown.
    let wrong = config_with_password("secrets-wrong", "Wr0ng-pw-8d2e1b");
    let (ok, stderr) = run(&wrong, &["topology"], "trace", "text");
    assert!(!ok);
    assert!(
        !stderr.contains("Wr0ng-pw-8d2e1b") && leaks(&stderr).is_none(),
        "{stderr}"
    );
    broker.cleanup().await;
    rabbitmqctl(&["delete_user", USER]);
}

#[test]
fn configuration_errors_never_echo_a_secret() {
    let config = isolated_config("secrets-config");
    let mut env = worker_env(&config);
    // A TicKeys entry written the wrong way round.
    env.push((
        "LESSON_REPLAY_TIC_KEYS".into(),
        "9016607A382749C69D4F4B00C61DD083=1400000001".into(),
    ));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .arg("config")
        .env_clear()
        .envs(env.iter().cloned())
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(!out.status.success());
    assert!(stderr.contains("tic_keys entry 1"), "{stderr}");
    assert!(!stderr.contains("9016607A"), "{stderr}");
    // An all-digit S3 secret is a secret like any other: loaded, never printed.
    env.retain(|(k, _)| k != "LESSON_REPLAY_TIC_KEYS");
    env.push((
        "LESSON_REPLAY_S3_ACCESS_KEY_ID".into(),
        "AKIDEXAMPLE".into(),
    ));
    env.push((
        "LESSON_REPLAY_S3_SECRET_ACCESS_KEY".into(),
        "8675309123456".into(),
    ));
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .arg("config")
        .env_clear()
        .envs(env)
        .output()
        .unwrap();
    let shown = format!(
        "{}{}",
        String::from_utf8_lossy(&out.stdout),
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(out.status.success(), "{shown}");
    assert!(
        !shown.contains("8675309123456") && !shown.contains("AKIDEXAMPLE"),
        "{shown}"
    );
}

/// With proxy variables set, the worker still connects by itself, so the
/// resolver's refusal of private addresses holds.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn proxy_variables_do_not_bypass_the_address_check() {
    let proxy = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let proxy_url = format!("http://{}", proxy.local_addr().unwrap());
    proxy.set_nonblocking(true).unwrap();
    let mut config = isolated_config("secrets-proxy");
    config.probe = true;
    config.vod_allowed_hosts = vec!["localhost".into()];
    config.vod_allow_private_networks = false;
    let broker = Broker::new(config.clone()).await;
    let vars = [
        ("HTTP_PROXY", proxy_url.as_str()),
        ("http_proxy", proxy_url.as_str()),
        ("HTTPS_PROXY", proxy_url.as_str()),
        ("ALL_PROXY", proxy_url.as_str()),
    ];
    let mut worker = WorkerProcess::start_with_env(
        "worker",
        &config,
        "warn",
        std::process::Stdio::null(),
        &vars,
    );
    let body = common::messages::one_camera("via-proxy", 3, "http://localhost:9/a.mp4", 1000);
    broker.publish(&body, Default::default()).await;
    let (_, parked) = broker.take(&config.parking_queue, 1).await.remove(0);
    worker.terminate();
    worker.wait_exit(Duration::from_secs(30));
    assert_eq!(
        common::header(&parked, "x-lesson-replay-reason").as_deref(),
        Some("url_not_allowed")
    );
    let mut reached = 0;
    while let Ok((mut stream, _)) = proxy.accept() {
        let mut buf = [0u8; 256];
        let _ = stream.read(&mut buf);
        reached += 1;
    }
    assert_eq!(reached, 0, "the proxy was used");
    broker.cleanup().await;
}
