//! The real worker's `/metrics`, `/healthz` and `/readyz` after real traffic:
//! every metric the Grafana dashboard and the alert rules use exists, so they
//! cannot silently drift from the code. And trace context follows a lesson.

mod common;

use std::collections::{BTreeSet, HashMap};

use common::messages::{FASTSTART, one_camera};
use common::origin::{Faults, Origin};
use common::s3::S3Server;
use common::{Broker, header, isolated_config, spawn_worker_with};
use lapin::types::FieldTable;
use lesson_replay::broker::headers::set_header;
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::Metrics;

const DASHBOARD: &str = include_str!("../deploy/grafana/dashboards/lesson-replay.json");
const RULES: &str = include_str!("../deploy/prometheus/rules/lesson-replay.yml");

/// Metric names (as in `# TYPE` lines) and their types.
fn exposed(text: &str) -> HashMap<String, String> {
    text.lines()
        .filter_map(|l| l.strip_prefix("# TYPE "))
        .map(|l| {
            let mut parts = l.split(' ');
            (
                parts.next().unwrap().to_owned(),
                parts.next().unwrap().to_owned(),
            )
        })
        .collect()
}

/// Every `lesson_replay_*` name a PromQL text refers to, histogram suffixes removed.
fn referenced(text: &str, types: &HashMap<String, String>) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = text.as_bytes();
    let mut at = 0;
    while let Some(found) = text[at..].find("lesson_replay_") {
        let start = at + found;
        let end = start
            + bytes[start..]
                .iter()
                .take_while(|b| b.is_ascii_alphanumeric() || **b == b'_')
                .count();
        let name = &text[start..end];
        let base = ["_bucket", "_sum", "_count"]
            .iter()
            .find_map(|s| {
                name.strip_suffix(s)
                    .filter(|b| types.get(*b).is_some_and(|t| t == "histogram"))
            })
            .unwrap_or(name);
        names.insert(base.to_owned());
        at = end;
    }
    names
}

// Long on purpose: traffic down every path first, then every check of the
// scrape that traffic makes meaningful.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn dashboard_and_alerts_use_only_metrics_the_worker_exports() {
    let s3 = S3Server::start("school");
    let origin = Origin::start().await;
    let mut config = isolated_config("metrics");
    s3.configure(&mut config, "school");
    config.probe = true;
    let broker = Broker::new(config).await;
    let health = Health::default();
    let metrics = Metrics::default();
    let mut config = broker.config.clone();
    config.metrics_addr = "127.0.0.1:0".into();
    let worker = spawn_worker_with(config.clone(), health.clone(), metrics.clone()).await;
    // An ingress reporting to the same registry: some panels and alerts are its.
    let ingress = common::spawn_ingress(config, metrics.clone()).await;
    ingress.wait_ready().await;
    let base = format!("http://{}", worker.endpoint.expect("endpoints listen"));

    // Traffic touching every labelled metric: published, retried, parked, skipped.
    let good = origin.add("/good.mp4", FASTSTART.to_vec(), Faults::default());
    let flaky = origin.add(
        "/flaky.mp4",
        FASTSTART.to_vec(),
        Faults {
            fail_first: 3,
            ..Faults::default()
        },
    );
    let traceparent = "00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01";
    let mut traced = FieldTable::default();
    set_header(&mut traced, "traceparent", traceparent);
    broker
        .publish(
            &one_camera("obs-good", 987654, &good, FASTSTART.len()),
            traced,
        )
        .await;
    broker
        .publish(
            &one_camera("obs-flaky", 987654, &flaky, FASTSTART.len()),
            FieldTable::default(),
        )
        .await;
    broker.publish(b"{", FieldTable::default()).await;
    broker
        .publish(
            br#"{"callback_type":"record_started","room_id":987654}"#,
            FieldTable::default(),
        )
        .await;

    let records = broker.take(&broker.config.records_queue, 2).await;
    let (_, good_props) = records
        .iter()
        .find(|(r, _)| r["task_id"] == "obs-good")
        .unwrap();
    assert_eq!(
        header(good_props, "traceparent").as_deref(),
        Some(traceparent),
        "trace context reaches the record"
    );
    broker.take(&broker.config.parking_queue, 1).await;

    let client = reqwest::Client::new();
    let get = |path: &str| client.get(format!("{base}{path}")).send();
    assert_eq!(get("/healthz").await.unwrap().status(), 200);
    assert_eq!(get("/readyz").await.unwrap().status(), 200);
    let text = get("/metrics").await.unwrap().text().await.unwrap();
    let types = exposed(&text);

    let mut used = referenced(DASHBOARD, &types);
    used.extend(referenced(RULES, &types));
    assert!(used.len() >= 12, "{used:?}");
    let missing: Vec<&String> = used
        .iter()
        .filter(|name| !types.contains_key(*name))
        .collect();
    assert!(
        missing.is_empty(),
        "used by the dashboard or alerts but not exported: {missing:?}\n{text}"
    );

    for outcome in ["published", "retried", "parked", "skipped"] {
        assert!(
            text.contains(&format!("outcome=\"{outcome}\"")),
            "no {outcome} series:\n{text}"
        );
    }
    for needle in [
        r#"target="vod""#,
        r#"target="s3""#,
        r#"stage="archive""#,
        r#"tier="1s""#,
    ] {
        assert!(text.contains(needle), "{needle} missing:\n{text}");
    }
    // Low cardinality: no task, room or user id ever becomes a label.
    for id in ["obs-good", "obs-flaky", "987654", "\"t\""] {
        assert!(
            !text.lines().any(|l| !l.starts_with('#') && l.contains(id)),
            "{id} in a label:\n{text}"
        );
    }
    assert!(text.contains("lesson_replay_broker_connected 1"));

    ingress.stop().await;
    worker.stop().await;
    assert!(!health.is_ready(), "not ready once stopped");
    assert!(
        get("/healthz").await.is_err(),
        "the endpoints close with the service"
    );
    broker.cleanup().await;
}

#[test]
fn the_dashboard_is_provisioned_and_refers_to_its_datasource() {
    let dashboard: serde_json::Value = serde_json::from_str(DASHBOARD).unwrap();
    assert_eq!(dashboard["uid"], "lesson-replay");
    let panels = dashboard["panels"].as_array().unwrap();
    assert!(panels.len() >= 10);
    for panel in panels {
        assert!(
            !panel["targets"].as_array().unwrap().is_empty(),
            "{}",
            panel["title"]
        );
    }
    let provider = include_str!("../deploy/grafana/provisioning/dashboards/lesson-replay.yml");
    assert!(provider.contains("/var/lib/grafana/dashboards"));
}

/// In JSON logs, the outcome of a delivery carries `replay_id` and `task_id`
/// at the top level, where log tools index them, and every line of a
/// delivery carries its span: `body_md5`, the lesson and TIC's `random`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn json_log_lines_carry_the_lesson_at_the_top_level() {
    let broker = Broker::new(isolated_config("json-logs")).await;
    let body = common::messages::one_camera("logged", 5, "http://1.vod2.myqcloud.com/a.mp4", 1000);
    let mut headers = FieldTable::default();
    set_header(&mut headers, "x-tic-random", "8675309");
    set_header(&mut headers, "x-tic-sdkappid", "1400042982");
    let (record, published) = through_json_logging_worker(&broker, &body, headers).await;
    assert_eq!(published["replay_id"], record["replay_id"], "{published}");
    assert_eq!(published["task_id"], "logged", "{published}");
    let md5 = hex::encode(<md5::Md5 as md5::Digest>::digest(&body));
    let span = &published["span"];
    assert_eq!(span["body_md5"], md5.as_str(), "{published}");
    // The lesson's fields, recorded on the span once decided, and TIC's
    // request id from the message's headers.
    assert_eq!(span["replay_id"], record["replay_id"], "{published}");
    assert_eq!(span["room_id"], record["room_id"], "{published}");
    assert!(record["sdkappid"].is_i64(), "{record}");
    assert_eq!(span["sdkappid"], record["sdkappid"], "{published}");
    assert_eq!(span["task_id"], "logged", "{published}");
    assert_eq!(span["tic_random"], "8675309", "{published}");
    broker.cleanup().await;
}

/// The `published` line says how long the handler took: a record held up by
/// a slow origin is found in the log.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_published_line_says_how_long_the_record_took() {
    const PAUSE: std::time::Duration = std::time::Duration::from_millis(400);
    let mut config = isolated_config("json-elapsed");
    config.probe = true;
    let broker = Broker::new(config).await;
    let origin = Origin::start().await;
    // The probe's first window (32 KiB) comes in two chunks with a pause
    // between them.
    let file = [FASTSTART, &[0u8; 40 * 1024][..]].concat();
    let size = file.len();
    let slow = Faults {
        chunk_delay: Some(PAUSE),
        ..Faults::default()
    };
    let url = origin.add("/slow.mp4", file, slow);
    let body = one_camera("slow", 5, &url, size);
    let (record, published) =
        through_json_logging_worker(&broker, &body, FieldTable::default()).await;
    assert!(
        record["tracks"][0]["probe"]["duration_ms"].is_i64(),
        "the slow file was probed: {record}"
    );
    let elapsed = published["elapsed_ms"]
        .as_f64()
        .unwrap_or_else(|| panic!("no elapsed_ms: {published}"));
    assert!(
        elapsed >= PAUSE.as_millis() as f64,
        "the handler waited {PAUSE:?} for the origin, the line says {elapsed} ms: {published}"
    );
    assert!(elapsed < 30_000.0, "{published}");
    broker.cleanup().await;
}

/// Run one message through a worker process that logs JSON lines, as in
/// production: the record, and the worker's `published` line.
async fn through_json_logging_worker(
    broker: &Broker,
    body: &[u8],
    headers: FieldTable,
) -> (serde_json::Value, serde_json::Value) {
    let mut worker = common::WorkerProcess::start_with_env(
        "worker",
        &broker.config,
        "info",
        std::process::Stdio::piped(),
        &[("LESSON_REPLAY_LOG_FORMAT", "json")],
    );
    let lines = worker.log_lines();
    broker.publish(body, headers).await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    worker.terminate();
    worker.wait_exit(std::time::Duration::from_secs(30));
    let published = lines
        .try_iter()
        .filter_map(|l| serde_json::from_str::<serde_json::Value>(&l).ok())
        .find(|l| l["message"] == "published")
        .expect("a published line");
    (record, published)
}
