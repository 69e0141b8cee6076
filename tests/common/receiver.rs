//! A school's webhook endpoint for the tests: `scripts/webhook-receiver.py`,
//! which verifies every request's signature with the `standardwebhooks`
//! reference library (an implementation not written here) and plays the
//! faults a test scripts for each endpoint name.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use lesson_replay::broker::headers::callback_headers;
use lesson_replay::config::settings::Config;
use secrecy::SecretString;
use serde_json::Value;

use crate::common::messages::one_camera;
use crate::common::{Broker, isolated_config};

pub struct Receiver {
    child: Child,
    pub base: String,
    client: reqwest::Client,
}

/// The receiver's Python: the virtualenv of scripts/ensure-webhook-receiver.sh.
fn python() -> PathBuf {
    let venv = std::env::var("WEBHOOK_VENV")
        .map(PathBuf::from)
        .unwrap_or_else(|_| {
            PathBuf::from(std::env::var("HOME").unwrap_or_default())
                .join(".cache/lesson-replay/webhooks")
        });
    venv.join("bin/python")
}

impl Receiver {
    /// A receiver that verifies with each of `secrets` (`whsec_...`).
    pub fn start(secrets: &[&str]) -> Receiver {
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/webhook-receiver.py");
        let mut command = Command::new(python());
        command.arg(script).args(["--port", "0"]);
        for secret in secrets {
            command.args(["--secret", secret]);
        }
        let mut child = command
            .stdout(Stdio::piped())
            .spawn()
            .expect("the webhook receiver starts (scripts/ensure-webhook-receiver.sh installs it)");
        let mut line = String::new();
        BufReader::new(child.stdout.take().unwrap())
            .read_line(&mut line)
            .unwrap();
        let port = line
            .trim()
            .strip_prefix("listening ")
            .unwrap_or_else(|| panic!("the receiver said {line:?}"));
        Receiver {
            child,
            base: format!("http://127.0.0.1:{port}"),
            client: reqwest::Client::new(),
        }
    }

    /// The URL of endpoint `name`.
    pub fn url(&self, name: &str) -> String {
        format!("{}/{name}", self.base)
    }

    /// What endpoint `name` answers next, e.g. `"s500,ok"` (the last repeats).
    pub async fn script(&self, name: &str, actions: &str) {
        let answer = self
            .client
            .put(format!("{}/_control/{name}", self.base))
            .body(actions.to_owned())
            .send()
            .await
            .unwrap();
        assert!(answer.status().is_success(), "{answer:?}");
    }

    /// Every request endpoint `name` received, in order.
    pub async fn log(&self, name: &str) -> Vec<Value> {
        self.client
            .get(format!("{}/_log", self.base))
            .query(&[("name", name)])
            .send()
            .await
            .unwrap()
            .json()
            .await
            .unwrap()
    }

    /// Wait until endpoint `name` received at least `n` requests; return them.
    pub async fn wait_for(&self, name: &str, n: usize, limit: Duration) -> Vec<Value> {
        let deadline = tokio::time::Instant::now() + limit;
        loop {
            let log = self.log(name).await;
            if log.len() >= n {
                return log;
            }
            assert!(
                tokio::time::Instant::now() < deadline,
                "endpoint {name} received {} of {n} requests in {limit:?}: {log:#?}",
                log.len()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

impl Drop for Receiver {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Each request's signature verified by the reference library with every
/// one of `secrets` (rotation: one signature each), its timestamp near now.
pub fn assert_signed(requests: &[Value], secrets: usize) {
    let all: Vec<usize> = (0..secrets).collect();
    for request in requests {
        let verified: Vec<usize> = request["verified_by"]
            .as_array()
            .unwrap()
            .iter()
            .map(|v| v.as_u64().unwrap() as usize)
            .collect();
        assert_eq!(verified, all, "not verified: {request:#}");
        assert_eq!(request["signatures"], secrets, "{request:#}");
        let skew = request["timestamp_skew"].as_f64().expect("a timestamp");
        assert!(
            skew.abs() < 60.0,
            "timestamp {skew} s from now: {request:#}"
        );
        assert_eq!(request["content_type"], "application/json");
    }
}

/// The specification's example secret, and a second one: rotation.
pub const SECRET_A: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
pub const SECRET_B: &str = "whsec_BwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwcHBwc=";

pub const APP: i64 = 1400000001;

/// A test's settings with webhooks to `url`, fast delays and a short deadline.
pub fn webhook_config(test: &str, url: &str, secrets: &[&str]) -> Config {
    let mut config = isolated_config(test);
    config.webhook_url = Some(url.to_owned());
    config.webhook_secrets = secrets.iter().map(|s| SecretString::from(*s)).collect();
    config.webhook_queue = format!("{}.webhooks", config.work_queue);
    config.webhook_delays_secs = vec![1, 4];
    config.webhook_timeout_secs = 2;
    config.validate().expect("valid settings");
    config
}

/// A lesson of app `app` whose record the worker publishes (no probe, no archive).
pub fn lesson(task: &str, room: i64) -> Vec<u8> {
    one_camera(task, room, "https://1500.vod2.myqcloud.com/x/f0.mp4", 1000)
}

pub async fn publish_for(broker: &Broker, app: i64, body: &[u8]) {
    let app = app.to_string();
    broker
        .publish(body, callback_headers(None, None, Some(&app)))
        .await;
}
