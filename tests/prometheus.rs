//! The worker's metrics as an operator's Prometheus sees them: a freshly
//! started worker already exports, at zero, every series an alert or a panel
//! will `rate()`; and after traffic, `increase()` over a real Prometheus (the
//! Debian package, scraping every second) counts the first parked message of
//! a deploy, which a series created on first use would hide.

mod common;

use std::time::Duration;

use common::messages::{FASTSTART, one_camera};
use common::origin::{Faults, Origin};
use common::{Broker, isolated_config, spawn_worker_with, wait_until};
use lesson_replay::decision::reason::ReasonCode;
use lesson_replay::service::endpoints::Health;
use lesson_replay::telemetry::metrics::{Metrics, StatusClass, Target, outcomes_with};
use serde_json::Value;

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A real Prometheus scraping `target` every second, until dropped.
struct Prometheus {
    child: std::process::Child,
    api: String,
    dir: std::path::PathBuf,
}

impl Prometheus {
    fn start(target: &str) -> Prometheus {
        let dir = std::env::temp_dir().join(format!("lr-prometheus-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let config = format!(
            "global:\n  scrape_interval: 1s\n  evaluation_interval: 1s\nscrape_configs:\n  - job_name: worker\n    static_configs:\n      - targets: [\"{target}\"]\n"
        );
        std::fs::write(dir.join("prometheus.yml"), config).unwrap();
        let port = free_port();
        let child = std::process::Command::new("prometheus")
            .arg(format!(
                "--config.file={}",
                dir.join("prometheus.yml").display()
            ))
            .arg(format!(
                "--storage.tsdb.path={}",
                dir.join("data").display()
            ))
            .arg(format!("--web.listen-address=127.0.0.1:{port}"))
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("prometheus runs (scripts/ensure-prometheus.sh installs it)");
        Prometheus {
            child,
            api: format!("http://127.0.0.1:{port}"),
            dir,
        }
    }

    /// The value of an instant query that returns one number.
    async fn query(&self, expr: &str) -> Option<f64> {
        let answer: Value = reqwest::Client::new()
            .get(format!("{}/api/v1/query", self.api))
            .query(&[("query", expr)])
            .send()
            .await
            .ok()?
            .json()
            .await
            .ok()?;
        answer["data"]["result"][0]["value"][1]
            .as_str()?
            .parse()
            .ok()
    }
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn increase_over_a_real_prometheus_counts_the_first_parked_message() {
    let origin = Origin::start().await;
    // Archiving on: the worker's start-up talks to the store before the
    // first scrape, and must not make a series born above zero.
    let s3 = common::s3::S3Server::start("school");
    let mut config = isolated_config("prometheus");
    s3.configure(&mut config, "school");
    config.metrics_addr = "127.0.0.1:0".into();
    config.probe = true;
    let broker = Broker::new(config.clone()).await;
    let metrics = Metrics::default();
    let worker = spawn_worker_with(config.clone(), Health::default(), metrics.clone()).await;
    worker.wait_ready().await;
    let target = worker.endpoint.expect("endpoints listen").to_string();

    // A freshly started worker: the series are there, at zero.
    let text = reqwest::get(format!("http://{target}/metrics"))
        .await
        .unwrap()
        .text()
        .await
        .unwrap();
    let mut expected = vec![r#"lesson_replay_retries_total{tier="1s"} 0"#.to_owned()];
    for reason in ReasonCode::ALL {
        for outcome in outcomes_with(reason) {
            expected.push(format!(
                r#"lesson_replay_messages_total{{outcome="{}",reason="{}"}} 0"#,
                outcome.as_str(),
                reason.as_str()
            ));
        }
    }
    for target in Target::ALL {
        for class in StatusClass::ALL {
            expected.push(format!(
                r#"lesson_replay_http_responses_total{{class="{}",target="{}"}} 0"#,
                class.as_str(),
                target.as_str()
            ));
        }
    }
    for series in &expected {
        assert!(
            text.contains(series.as_str()),
            "{series} missing from a fresh worker"
        );
    }
    // Nothing counted before the first scrape (the store's start-up check
    // included): every counter of these families is at zero.
    for line in text.lines().filter(|l| {
        l.starts_with("lesson_replay_messages_total{")
            || l.starts_with("lesson_replay_http_responses_total{")
    }) {
        assert!(line.ends_with(" 0"), "born above zero: {line}");
    }

    let prometheus = Prometheus::start(&target);
    let up = "up{job=\"worker\"}";
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    while prometheus.query(up).await != Some(1.0) {
        assert!(
            std::time::Instant::now() < deadline,
            "Prometheus never scraped the worker"
        );
        tokio::time::sleep(Duration::from_millis(500)).await;
    }
    // A few scrapes at zero, then the first traffic since the start.
    tokio::time::sleep(Duration::from_secs(3)).await;
    for i in 0..8 {
        broker
            .publish(format!("not json {i}").as_bytes(), Default::default())
            .await;
    }
    // A file the origin does not have (a 404, parked), and one that fails
    // three times first (retried through the 1 s delay tier, then published).
    let gone = format!("{}/gone.mp4", origin.base);
    let body = one_camera("gone", 3, &gone, FASTSTART.len());
    broker.publish(&body, Default::default()).await;
    let busy = Faults {
        fail_first: 3,
        ..Faults::default()
    };
    let flaky = origin.add("/flaky.mp4", FASTSTART.to_vec(), busy);
    let body = one_camera("flaky", 3, &flaky, FASTSTART.len());
    broker.publish(&body, Default::default()).await;
    broker.take(&config.parking_queue, 9).await;
    broker.take(&config.records_queue, 1).await;
    wait_until("the worker counted them", Duration::from_secs(10), || {
        common::metric(
            &metrics,
            r#"lesson_replay_messages_total{outcome="parked",reason="invalid_json"}"#,
        ) == 8
            && common::metric(
                &metrics,
                r#"lesson_replay_messages_total{outcome="published",reason=""}"#,
            ) == 1
    })
    .await;
    // Two scrapes after the last increment.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let parked = prometheus
        .query(r#"sum(increase(lesson_replay_messages_total{outcome="parked"}[1m]))"#)
        .await
        .expect("an answer");
    // increase() extrapolates to the window's edges: about the count, never
    // the near-zero a series born with its first increment would show.
    assert!(
        (8.5..=14.0).contains(&parked),
        "increase() saw {parked} parked, 9 were"
    );
    let retried = prometheus
        .query(r#"sum(increase(lesson_replay_retries_total{tier="1s"}[1m]))"#)
        .await
        .expect("an answer");
    assert!(
        (0.9..=2.0).contains(&retried),
        "increase() saw {retried} retries, 1 was"
    );
    let not_found = prometheus
        .query(r#"sum(increase(lesson_replay_http_responses_total{target="vod",class="4xx"}[1m]))"#)
        .await
        .expect("an answer");
    assert!(
        not_found >= 0.9,
        "increase() saw {not_found} VOD 4xx, at least 1 was"
    );
    worker.stop().await;
    broker.cleanup().await;
}
