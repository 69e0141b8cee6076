//! A school's backend told by signed webhooks, with real parts: RabbitMQ,
//! the worker, and an endpoint (`scripts/webhook-receiver.py`) that checks
//! every signature with the `standardwebhooks` reference library and plays
//! the faults of a school's server: errors, silence, a cut connection,
//! redirects, answers dripped byte by byte or 50 MB long, 410 Gone,
//! `Retry-After`. Every event is delivered or parked with its reason; the
//! same event always carries the same `webhook-id`; a hanging endpoint of
//! one app does not hold another app's events; a killed worker and a
//! restarted broker lose none.

mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::time::Duration;

use common::messages::one_camera;
use common::receiver::{
    APP, Receiver, SECRET_A, SECRET_B, assert_signed, lesson, publish_for, webhook_config,
};
use common::{Broker, lesson_replay, metric, spawn_worker, spawn_worker_with};
use lesson_replay::config::apps::AppSettings;
use lesson_replay::config::settings::Config;
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::Metrics;
use secrecy::SecretString;
use serde_json::Value;

/// App `app`'s events go to `url`, signed with `secret`.
fn endpoint_of(config: &mut Config, app: i64, url: &str, secret: &str) {
    let table = AppSettings {
        webhook_url: Some(url.to_owned()),
        webhook_secrets: Some(vec![SecretString::from(secret)]),
        ..AppSettings::default()
    };
    config.apps.insert(app.to_string(), table);
}

fn body(request: &Value) -> &Value {
    &request["body"]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn records_and_failures_reach_the_endpoint_signed_once_per_event_id() {
    let receiver = Receiver::start(&[SECRET_A, SECRET_B]);
    let config = webhook_config(
        "webhooks-events",
        &receiver.url("school"),
        &[SECRET_A, SECRET_B],
    );
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;
    worker.wait_ready().await;

    let good = lesson("task-good", 7001);
    publish_for(&broker, APP, &good).await;
    // The same callback again (TIC sends duplicates by design).
    publish_for(&broker, APP, &good).await;
    // A VOD host not allowed: parked as url_not_allowed.
    let bad = one_camera("task-bad", 7002, "https://evil.example/f0.mp4", 1000);
    publish_for(&broker, APP, &bad).await;

    let log = receiver
        .wait_for("school", 3, Duration::from_secs(30))
        .await;
    assert_signed(&log, 2);
    let (ready, failed): (Vec<&Value>, Vec<&Value>) = log
        .iter()
        .partition(|r| body(r)["type"] == "lesson.replay_ready");
    assert_eq!(ready.len(), 2, "{log:#?}");
    assert_eq!(
        ready[0]["webhook_id"], ready[1]["webhook_id"],
        "one event, one id"
    );
    let (record, _) = broker
        .next(&broker.config.records_queue, Duration::from_secs(5))
        .await
        .expect("the record is published");
    assert_eq!(
        body(ready[0])["data"]["record"],
        record,
        "the event carries the record"
    );
    assert_eq!(body(ready[0])["data"]["replay_id"], record["replay_id"]);

    assert_eq!(failed.len(), 1, "{log:#?}");
    let data = &body(failed[0])["data"];
    assert_eq!(body(failed[0])["type"], "lesson.replay_failed");
    assert_eq!(data["reason"], "url_not_allowed");
    assert_eq!(data["task_id"], "task-bad");
    assert_eq!(data["room_id"], 7002);
    assert_eq!(data["sdkappid"], APP);
    assert!(
        data["message"].as_str().unwrap().contains("evil.example"),
        "{data}"
    );
    assert_ne!(failed[0]["webhook_id"], ready[0]["webhook_id"]);

    // The host is allowed after all: a replay that succeeds tells the school.
    worker.stop().await;
    let mut fixed = broker.config.clone();
    fixed.vod_allowed_hosts.push("evil.example".into());
    let worker = spawn_worker(fixed.clone()).await;
    worker.wait_ready().await;
    let replayed = lesson_replay(&fixed, &["dlq", "replay", "--reason", "url_not_allowed"]);
    assert!(replayed.status.success(), "{replayed:?}");
    let log = receiver
        .wait_for("school", 4, Duration::from_secs(30))
        .await;
    assert_signed(&log, 2);
    let late = body(&log[3]);
    assert_eq!(late["type"], "lesson.replay_ready", "{late:#}");
    assert_eq!(late["data"]["task_id"], "task-bad");
    worker.stop().await;
    broker.cleanup().await;
}

/// The endpoints of the fault test: each an app of its own, its script, and
/// what becomes of its event.
const FAULTS: [(&str, &str); 10] = [
    ("flaky", "s500,ok"),
    ("hang", "hang,ok"),
    ("close", "close,ok"),
    ("redirect", "redirect,ok"),
    ("private", "redirect-private,ok"),
    ("drip", "drip,ok"),
    ("big", "big"),
    ("later", "ra429:3,ok"),
    ("gone", "s410"),
    ("dead", "s500"),
];

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_fault_of_an_endpoint_ends_delivered_or_parked_with_its_reason() {
    let receiver = Receiver::start(&[SECRET_A]);
    let mut config = webhook_config("webhooks-faults", &receiver.url("default"), &[SECRET_A]);
    let apps: BTreeMap<&str, i64> = FAULTS
        .iter()
        .enumerate()
        .map(|(n, (name, _))| (*name, 1400000100 + n as i64))
        .collect();
    for (name, app) in &apps {
        endpoint_of(&mut config, *app, &receiver.url(name), SECRET_A);
    }
    config.validate().expect("valid settings");
    for (name, script) in FAULTS {
        receiver.script(name, script).await;
    }
    let broker = Broker::new(config).await;
    let metrics = Metrics::new();
    let worker = spawn_worker_with(broker.config.clone(), Health::default(), metrics.clone()).await;
    worker.wait_ready().await;
    for (n, (name, app)) in apps.iter().enumerate() {
        publish_for(&broker, *app, &lesson(name, 8000 + n as i64)).await;
    }

    // Delivered on the second attempt, the first having failed its own way.
    for name in [
        "flaky", "hang", "close", "redirect", "private", "drip", "later",
    ] {
        let log = receiver.wait_for(name, 2, Duration::from_secs(60)).await;
        assert_eq!(log[1]["action"], "ok", "{name}: {log:#?}");
        assert_eq!(
            log[0]["webhook_id"], log[1]["webhook_id"],
            "{name}: the same id on a retry"
        );
        assert_signed(&log, 1);
    }
    // A redirect is not followed: nothing reached where it pointed (the
    // other one points at the cloud metadata address), and the parking
    // reason would say where it pointed.
    assert!(receiver.log("redirect-redirected").await.is_empty());
    let redirects = r#"lesson_replay_http_responses_total{class="3xx",target="webhook"}"#;
    assert_eq!(
        metric(&metrics, redirects),
        2,
        "both redirects taken as answers"
    );
    // Retry-After: 3 moved the second attempt to the 4 s tier (at most a
    // fifth less); a plain failure waits the first tier, 1 s.
    let gap = |log: &[Value]| {
        log[1]["received_at"].as_f64().unwrap() - log[0]["received_at"].as_f64().unwrap()
    };
    let later = receiver.log("later").await;
    assert!(
        gap(&later) >= 3.0,
        "Retry-After: 3 honoured: {}",
        gap(&later)
    );
    let flaky = receiver.log("flaky").await;
    assert!(
        gap(&flaky) >= 0.75,
        "the first delay (1 s, jittered): {}",
        gap(&flaky)
    );
    assert!(gap(&flaky) < 3.0, "not the second delay: {}", gap(&flaky));

    // The dead endpoint: 1 + 2 delays = 3 attempts, then parked.
    let dead = receiver.wait_for("dead", 3, Duration::from_secs(60)).await;
    let ids: BTreeSet<String> = dead.iter().map(|r| r["webhook_id"].to_string()).collect();
    assert_eq!(ids.len(), 1);
    let parked = wait_parked(&broker.config, 2).await;
    let reasons: BTreeMap<String, String> = parked
        .iter()
        .map(|p| {
            (
                p["reason"].as_str().unwrap().to_owned(),
                p["error"].as_str().unwrap_or_default().to_owned(),
            )
        })
        .collect();
    assert!(reasons["webhook_gone"].contains("410"), "{reasons:?}");
    assert!(
        reasons["webhook_failed"].contains("answered 500"),
        "{reasons:?}"
    );
    assert!(
        reasons["webhook_failed"].contains("3 attempts"),
        "{reasons:?}"
    );
    // 200 with 50 MB is delivered at once; 410 is never tried again.
    tokio::time::sleep(Duration::from_secs(5)).await;
    assert_eq!(receiver.log("big").await.len(), 1);
    assert_eq!(receiver.log("gone").await.len(), 1);
    assert_eq!(receiver.log("dead").await.len(), 3);

    // The endpoint is back: a replay delivers the parked event, same id.
    receiver.script("dead", "ok").await;
    let replayed = lesson_replay(
        &broker.config,
        &["dlq", "replay", "--reason", "webhook_failed"],
    );
    assert!(replayed.status.success(), "{replayed:?}");
    let dead = receiver.wait_for("dead", 4, Duration::from_secs(30)).await;
    assert_eq!(dead[3]["action"], "ok");
    assert_eq!(dead[3]["webhook_id"], dead[0]["webhook_id"]);

    // The receiver logs a request before answering it: the worker counts
    // the 204 a moment later.
    let delivered = format!(
        "lesson_replay_webhook_deliveries_total{{app=\"{}\",outcome=\"delivered\"}}",
        apps["dead"]
    );
    common::wait_until(
        "the replayed event is counted",
        Duration::from_secs(10),
        || metric(&metrics, &delivered) == 1,
    )
    .await;
    let series = |app: i64, outcome: &str| {
        metric(
            &metrics,
            &format!(
                "lesson_replay_webhook_deliveries_total{{app=\"{app}\",outcome=\"{outcome}\"}}"
            ),
        )
    };
    assert_eq!(series(apps["flaky"], "delivered"), 1);
    assert_eq!(series(apps["flaky"], "retried"), 1);
    assert_eq!(series(apps["gone"], "parked"), 1);
    assert_eq!(series(apps["dead"], "parked"), 1);
    assert_eq!(series(apps["dead"], "delivered"), 1);
    worker.stop().await;
    broker.cleanup().await;
}

/// `dlq list`'s lines, once at least `n` messages are parked.
async fn wait_parked(config: &Config, n: usize) -> Vec<Value> {
    for _ in 0..600 {
        let listed = lesson_replay(config, &["dlq", "list"]);
        let lines: Vec<Value> = String::from_utf8_lossy(&listed.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str(l).ok())
            .collect();
        if lines.len() >= n {
            return lines;
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    panic!("fewer than {n} messages parked");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hanging_endpoint_holds_only_its_own_apps_events() {
    let receiver = Receiver::start(&[SECRET_A]);
    let mut config = webhook_config("webhooks-fair", &receiver.url("default"), &[SECRET_A]);
    config.webhook_timeout_secs = 10;
    config.webhook_concurrency = 2;
    let (slow, quick) = (1400000201_i64, 1400000202_i64);
    for (app, name) in [(slow, "slow"), (quick, "quick")] {
        endpoint_of(&mut config, app, &receiver.url(name), SECRET_A);
    }
    receiver.script("slow", "hang").await;
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;
    worker.wait_ready().await;
    for n in 0..6 {
        publish_for(&broker, slow, &lesson(&format!("slow-{n}"), 9000 + n)).await;
    }
    // The slow app's lane holds its 2 events in flight, hanging; its other
    // 4 wait behind them.
    let hanging = receiver.wait_for("slow", 2, Duration::from_secs(30)).await;
    assert!(
        hanging.iter().all(|r| r["action"] == "hang"),
        "{hanging:#?}"
    );
    for n in 0..3 {
        publish_for(&broker, quick, &lesson(&format!("quick-{n}"), 9100 + n)).await;
    }
    let quick_log = receiver.wait_for("quick", 3, Duration::from_secs(30)).await;
    assert_signed(&quick_log, 1);
    // Delivered while the slow app's 2 were still hanging: none of them had
    // timed out (10 s), none of its others had been sent.
    let slow_log = receiver.log("slow").await;
    assert_eq!(slow_log.len(), 2, "{slow_log:#?}");
    worker.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_test_command_sends_a_signed_event_and_says_what_the_endpoint_answered() {
    let receiver = Receiver::start(&[SECRET_A, SECRET_B]);
    let mut config = webhook_config("webhooks-cli", &receiver.url("cli"), &[SECRET_A]);
    endpoint_of(&mut config, APP, &receiver.url("cli-app"), SECRET_B);
    let sent = lesson_replay(
        &config,
        &["webhook", "test", "--sdkappid", &APP.to_string()],
    );
    let stdout = String::from_utf8_lossy(&sent.stdout);
    assert!(sent.status.success(), "{sent:?}");
    assert!(stdout.contains("answered 204"), "{stdout}");
    let log = receiver.log("cli-app").await;
    assert_eq!(log.len(), 1);
    assert_eq!(
        log[0]["verified_by"],
        serde_json::json!([1]),
        "the app's own secret"
    );
    assert_eq!(body(&log[0])["type"], "webhook.test");
    assert!(receiver.log("cli").await.is_empty());

    receiver.script("cli", "s410").await;
    let refused = lesson_replay(&config, &["webhook", "test"]);
    assert_eq!(refused.status.code(), Some(1), "{refused:?}");
    assert!(
        String::from_utf8_lossy(&refused.stdout).contains("answered 410"),
        "{refused:?}"
    );
    assert!(
        String::from_utf8_lossy(&refused.stderr).contains("410 Gone"),
        "{refused:?}"
    );
    let none = lesson_replay(&config, &["webhook", "test", "--sdkappid", "1400000999"]);
    // An app without a table falls back on the top-level endpoint.
    assert_eq!(none.status.code(), Some(1), "{none:?}");
    assert_eq!(receiver.log("cli").await.len(), 2);
}

/// The verification example of docs/operations.md, run with python3
/// against what the worker signs: accepted as sent, refused when the body,
/// the id or the time is not what was signed, accepted with one of two
/// signatures (rotation).
#[test]
fn the_operations_guide_s_verification_example_accepts_what_the_worker_signs() {
    use lesson_replay::webhook::sign::{Secret, signature};
    let doc = include_str!("../docs/operations.md");
    let example = doc
        .split("<!-- verify-example:begin -->")
        .nth(1)
        .and_then(|rest| rest.split("<!-- verify-example:end -->").next())
        .and_then(|block| block.split("```python\n").nth(1))
        .and_then(|code| code.split("```").next())
        .expect("docs/operations.md has the verification example");
    let secret = Secret::parse(SECRET_A).unwrap();
    let other = Secret::parse(SECRET_B).unwrap();
    let now = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .unwrap()
        .as_secs() as i64;
    let body =
        r#"{"type":"lesson.replay_ready","timestamp":"2026-12-07T10:00:00Z","data":{"tracks":1}}"#;
    let case = |id: &str, at: i64, signed: String, body: &str| {
        serde_json::json!({"headers": {"webhook-id": id, "webhook-timestamp": at.to_string(),
            "webhook-signature": signed}, "body": body})
    };
    let good = signature(std::slice::from_ref(&secret), "msg_1", now, body.as_bytes());
    let cases = serde_json::json!([
        case("msg_1", now, good.clone(), body),
        case("msg_1", now, good.clone(), &body.replace("1}", "2}")),
        case("msg_2", now, good.clone(), body),
        case(
            "msg_1",
            now - 600,
            signature(
                std::slice::from_ref(&secret),
                "msg_1",
                now - 600,
                body.as_bytes()
            ),
            body
        ),
        case(
            "msg_1",
            now,
            signature(
                &[other.clone(), secret.clone()],
                "msg_1",
                now,
                body.as_bytes()
            ),
            body
        ),
        case(
            "msg_1",
            now,
            signature(&[other], "msg_1", now, body.as_bytes()),
            body
        ),
    ]);
    let driver = format!(
        "{example}\nimport json, sys\ncases = json.loads(sys.argv[2])\n\
         print(json.dumps([verify(sys.argv[1], c['headers'], c['body'].encode()) for c in cases]))\n"
    );
    let out = std::process::Command::new("python3")
        .args(["-c", &driver, SECRET_A, &cases.to_string()])
        .output()
        .expect("python3 runs");
    assert!(out.status.success(), "{out:?}");
    let verdicts: Vec<bool> = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(verdicts, [true, false, false, false, true, false]);
}
