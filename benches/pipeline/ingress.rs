//! Scenario 7: TIC callbacks per second through `lesson-replay ingress` (a
//! process of its own) at 64 concurrent HTTP clients, and the answer latency,
//! against the broker's bare publish-with-confirm rate from one process at
//! the same concurrency (64 publishes in flight on one confirm channel).

use std::sync::Arc;
use std::time::{Duration, Instant};

use lesson_replay::broker::amqp;

use crate::common::messages::FASTSTART;
use crate::common::{Broker, WorkerProcess, isolated_config};
use crate::harness::{Plan, cpu_seconds, lesson, percentile, quiet};

/// Clients (and publishes) in flight at once.
pub(crate) const CLIENTS: usize = 64;

/// Callbacks per second, answer latency (p50, p99 ms) and the ingress
/// process's CPU microseconds per callback.
pub(crate) async fn ingress_rate(plan: &Plan) -> (f64, f64, f64, f64) {
    let mut config = isolated_config("bench-ingress");
    let port = std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port();
    config.ingress_addr = format!("127.0.0.1:{port}");
    config.metrics_addr = String::new();
    let broker = Broker::new(config).await;
    let mut ingress = WorkerProcess::start_command("ingress", &broker.config, "warn", quiet());
    let url = format!("http://127.0.0.1:{port}/tic/callback?sdkappid=1400000001&random=1");
    let client = reqwest::Client::new();
    let body = lesson(
        "bench",
        &[(
            "http://1.vod2.myqcloud.com/a.mp4".into(),
            FASTSTART.len(),
            0,
        )],
    );
    // Until it answers 200: connected to the broker.
    let deadline = Instant::now() + Duration::from_secs(30);
    while !client
        .post(&url)
        .body(body.clone())
        .send()
        .await
        .is_ok_and(|r| r.status() == 200)
    {
        assert!(
            Instant::now() < deadline,
            "the ingress did not become ready"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    let total = plan.callbacks;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let cpu_before = cpu_seconds(ingress.pid());
    let started = Instant::now();
    let clients: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (client, url, body, next) =
                (client.clone(), url.clone(), body.clone(), next.clone());
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                    let sent = Instant::now();
                    let answer = client.post(&url).body(body.clone()).send().await.unwrap();
                    assert_eq!(answer.status(), 200);
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for c in clients {
        latencies.extend(c.await.unwrap());
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    let cpu_us = (cpu_seconds(ingress.pid()) - cpu_before) * 1e6 / total as f64;
    ingress.terminate();
    ingress.wait_exit(Duration::from_secs(30));
    broker.cleanup().await;
    let (p50, p99) = (
        percentile(&mut latencies, 0.50),
        percentile(&mut latencies, 0.99),
    );
    (rate, p50, p99, cpu_us)
}

/// The broker's own publish-confirm rate and latency (p50, p99 ms) from one
/// process, `CLIENTS` publishes in flight on one confirm channel.
pub(crate) async fn publish_baseline(plan: &Plan) -> (f64, f64, f64) {
    let broker = Broker::new(isolated_config("bench-publish")).await;
    let body = lesson(
        "bench",
        &[(
            "http://1.vod2.myqcloud.com/a.mp4".into(),
            FASTSTART.len(),
            0,
        )],
    );
    let channel = broker.channel.clone();
    let exchange = broker.config.inbound_exchange.clone();
    let total = plan.callbacks;
    let next = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let started = Instant::now();
    let publishers: Vec<_> = (0..CLIENTS)
        .map(|_| {
            let (channel, exchange, body, next) = (
                channel.clone(),
                exchange.clone(),
                body.clone(),
                next.clone(),
            );
            tokio::spawn(async move {
                let mut latencies = Vec::new();
                while next.fetch_add(1, std::sync::atomic::Ordering::Relaxed) < total {
                    let sent = Instant::now();
                    let properties = amqp::json_properties();
                    amqp::publish_confirmed(&channel, &exchange, "tic.bench", &body, properties)
                        .await
                        .unwrap();
                    latencies.push(sent.elapsed().as_secs_f64() * 1000.0);
                }
                latencies
            })
        })
        .collect();
    let mut latencies = Vec::new();
    for p in publishers {
        latencies.extend(p.await.unwrap());
    }
    let rate = total as f64 / started.elapsed().as_secs_f64();
    broker.cleanup().await;
    (
        rate,
        percentile(&mut latencies, 0.50),
        percentile(&mut latencies, 0.99),
    )
}
