//! Scenario 5: publish → record latency at half the measured maximum rate,
//! the worker against the bare loop; and scenario 8, the worker at the
//! sizing model's peak load (BENCHMARKS.md), for its CPU per record there.

use futures_util::StreamExt;
use lapin::options::BasicConsumeOptions;
use lapin::types::FieldTable;
use lesson_replay::broker::amqp;
use serde_json::Value;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::common::Broker;
use crate::common::messages::MOOV_AT_END;
use crate::common::origin::{Faults, Origin};
use crate::harness::{
    Plan, cpu_seconds, lesson, preload, publish_unconfirmed, records_config, scrape, serve_metrics,
    start_worker,
};
use crate::records::bare_loop;

/// Who turns messages into records in the latency scenario.
#[derive(Clone, Copy, PartialEq)]
pub(crate) enum Processor {
    Worker,
    BareLoop,
}

// Long on purpose: one scenario, publisher and receiver side by side, so
// that what is timed stays visible in one place.
/// What one paced run measured.
pub(crate) struct Paced {
    pub(crate) p50_ms: f64,
    pub(crate) p99_ms: f64,
    /// The worker's CPU time per record from the first paced message to the
    /// last record, idle time included, ms; 0 for the bare loop.
    pub(crate) worker_cpu_ms_per_record: f64,
}

/// Scenarios 5 and 8: publish → record latency at `rate` messages/s for
/// `seconds`.
pub(crate) async fn latency(
    plan: &Plan,
    origin: &Origin,
    rate: f64,
    seconds: f64,
    processor: Processor,
) -> Paced {
    let mut config = records_config(plan);
    let port = serve_metrics(&mut config);
    let broker = Broker::new(config).await;
    let url = origin.add("/lat.mp4", MOOV_AT_END.to_vec(), Faults::default());
    let videos = [
        (url.clone(), MOOV_AT_END.len(), 0),
        (url.clone(), MOOV_AT_END.len(), 0),
        (url, MOOV_AT_END.len(), 2),
    ];
    let stop_loop = tokio_util::sync::CancellationToken::new();
    let (mut worker, bare) = match processor {
        Processor::Worker => (Some(start_worker(&broker.config)), None),
        Processor::BareLoop => {
            let run = bare_loop(
                broker.config.clone(),
                plan.concurrency,
                None,
                None,
                stop_loop.clone(),
            );
            (None, Some(tokio::spawn(run)))
        }
    };
    // Warm up: consuming once one record comes back.
    preload(&broker, std::iter::once(lesson("warmup", &videos))).await;
    broker.take(&broker.config.records_queue, 1).await;

    let connection = amqp::connect(&broker.config.broker_settings(), "bench latency")
        .await
        .unwrap();
    let channel = connection.create_channel().await.unwrap();
    let mut records = channel
        .basic_consume(
            broker.config.records_queue.as_str().into(),
            "latency".into(),
            BasicConsumeOptions {
                no_ack: true,
                ..Default::default()
            },
            FieldTable::default(),
        )
        .await
        .unwrap();
    let total = ((rate * seconds) as usize).max(20);
    let cpu_before = worker.as_ref().map(|w| cpu_seconds(w.pid()));
    let sent: Arc<std::sync::Mutex<HashMap<String, Instant>>> = Arc::default();
    let publisher = {
        let (sent, broker_channel, exchange) = (
            sent.clone(),
            broker.channel.clone(),
            broker.config.inbound_exchange.clone(),
        );
        let interval = Duration::from_secs_f64(1.0 / rate);
        tokio::spawn(async move {
            let start = Instant::now();
            for i in 0..total {
                let due = start + interval * i as u32;
                tokio::time::sleep_until(due.into()).await;
                let task = format!("lat-{i}");
                let body = lesson(&task, &videos);
                sent.lock().unwrap().insert(task, Instant::now());
                publish_unconfirmed(&broker_channel, &exchange, &body).await;
            }
        })
    };
    let mut latencies = Vec::with_capacity(total);
    let trace = std::env::var("BENCH_TRACE").is_ok();
    while latencies.len() < total {
        let delivery = tokio::time::timeout(Duration::from_secs(60), records.next())
            .await
            .unwrap()
            .unwrap()
            .unwrap();
        let record: Value = serde_json::from_slice(&delivery.data).unwrap();
        let task = record["task_id"].as_str().unwrap();
        if let Some(at) = sent.lock().unwrap().get(task) {
            latencies.push(at.elapsed().as_secs_f64() * 1000.0);
            if trace {
                // To set beside the worker's `published` log lines
                // (BENCH_WORKER_LOG): which leg a slow record lost its time on.
                let now = std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .unwrap_or_default();
                let ms = latencies.last().copied().unwrap_or_default();
                eprintln!(
                    "latency {task} received_unix_s {:.6} ms {ms:.3}",
                    now.as_secs_f64()
                );
            }
        }
    }
    publisher.await.unwrap();
    let worker_cpu_ms_per_record = match (&worker, cpu_before) {
        (Some(w), Some(before)) => (cpu_seconds(w.pid()) - before) * 1e3 / total as f64,
        _ => 0.0,
    };
    if std::env::var("BENCH_DEBUG").is_ok() && worker.is_some() {
        let text = scrape(port).await;
        for line in text.lines().filter(|l| {
            l.contains("processing_duration_seconds_bucket")
                || l.contains("stage_duration_seconds_bucket{stage=\"probe\"")
                || l.contains("confirm_duration_seconds_bucket")
        }) {
            eprintln!("{line}");
        }
    }
    if let Some(worker) = &mut worker {
        worker.terminate();
        worker.wait_exit(Duration::from_secs(30));
    }
    stop_loop.cancel();
    if let Some(bare) = bare {
        bare.await.unwrap();
    }
    let _ = connection.close(200, "done".into()).await;
    broker.cleanup().await;
    latencies.sort_by(|a, b| a.partial_cmp(b).unwrap());
    let pct = |p: f64| latencies[((latencies.len() as f64 * p) as usize).min(latencies.len() - 1)];
    Paced {
        p50_ms: pct(0.50),
        p99_ms: pct(0.99),
        worker_cpu_ms_per_record,
    }
}
