//! Scenarios 1 and 6: records per second through the worker (probing by
//! range reads, no archive), one and two processes, against a bare
//! consume → publish-with-confirm → ack loop on the same broker.

use futures_util::StreamExt;
use lapin::options::{BasicAckOptions, BasicConsumeOptions, BasicQosOptions};
use lapin::types::FieldTable;
use lesson_replay::broker::amqp;
use lesson_replay::config::settings::Config;
use serde_json::Value;
use std::sync::Arc;
use std::sync::atomic::{AtomicU64, AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use crate::common::messages::{FASTSTART, MOOV_AT_END};
use crate::common::origin::{Faults, Origin};
use crate::common::{Broker, WorkerProcess};
use crate::harness::{
    CpuTicks, Plan, cpu_seconds, lesson, mean_durations, preload, records_config, scrape,
    serve_metrics, start_worker, wait_for_depth,
};

/// What one run of the records path measured.
pub(crate) struct RecordsRun {
    pub(crate) per_s: f64,
    /// Bytes of one published record.
    pub(crate) record_bytes: usize,
    /// Mean stage durations (one worker only, else null).
    pub(crate) stages: Value,
    /// The workers' CPU time per record, ms (user + system, from `/proc`,
    /// start-up included).
    pub(crate) cpu_ms_per_record: f64,
    /// The share of the machine's two cores busy meanwhile (broker, origin,
    /// workers), 0 to 1: below 1, the run waited rather than worked.
    pub(crate) machine_busy: f64,
}

/// Scenario 1 (and 6): `workers` worker processes over the plan's preloaded
/// recordings, probing every track or (`probe` false, to show what the
/// probes cost) none.
pub(crate) async fn records_rate(
    plan: &Plan,
    origin: &Origin,
    workers: usize,
    probe: bool,
) -> RecordsRun {
    let mut config = records_config(plan);
    config.probe = probe;
    // One worker exposes its metrics; two would compete for the port.
    let port = if workers == 1 {
        serve_metrics(&mut config)
    } else {
        0
    };
    let broker = Broker::new(config).await;
    let files = [
        origin.add("/cam-a.mp4", FASTSTART.to_vec(), Faults::default()),
        origin.add("/cam-b.mp4", FASTSTART.to_vec(), Faults::default()),
        origin.add("/board.mp4", MOOV_AT_END.to_vec(), Faults::default()),
    ];
    let videos = [
        (files[0].clone(), FASTSTART.len(), 0),
        (files[1].clone(), FASTSTART.len(), 0),
        (files[2].clone(), MOOV_AT_END.len(), 2),
    ];
    preload(
        &broker,
        (0..plan.records).map(|i| lesson(&format!("rec-{workers}-{i}"), &videos)),
    )
    .await;
    let started = Instant::now();
    let ticks = CpuTicks::now();
    let mut running: Vec<WorkerProcess> =
        (0..workers).map(|_| start_worker(&broker.config)).collect();
    wait_for_depth(
        &broker,
        &broker.config.records_queue,
        plan.records as u32,
        Duration::from_secs(600),
    )
    .await;
    let per_s = plan.records as f64 / started.elapsed().as_secs_f64();
    let machine_busy = ticks.busy_share_since();
    let cpu: f64 = running.iter().map(|w| cpu_seconds(w.pid())).sum();
    let cpu_ms_per_record = cpu * 1e3 / plan.records as f64;
    let (sample, _) = broker
        .next(&broker.config.records_queue, Duration::from_secs(1))
        .await
        .unwrap();
    let record_bytes = serde_json::to_vec(&sample).unwrap().len();
    let stages = if workers == 1 {
        let text = scrape(port).await;
        mean_durations(&text)
    } else {
        Value::Null
    };
    for w in &running {
        w.terminate();
    }
    for w in &mut running {
        w.wait_exit(Duration::from_secs(30));
    }
    broker.cleanup().await;
    RecordsRun {
        per_s,
        record_bytes,
        stages,
        cpu_ms_per_record,
        machine_busy,
    }
}

/// The bare loop on the broker: consume (same prefetch), publish with
/// confirm, ack — `record` as the published body, or each inbound body again.
/// Runs until `count` messages are done or `stop` is cancelled; returns the
/// mean time of a publish with confirm, ms.
pub(crate) async fn bare_loop(
    config: Config,
    prefetch: u16,
    record: Option<Arc<Vec<u8>>>,
    count: Option<usize>,
    stop: tokio_util::sync::CancellationToken,
) -> f64 {
    let connection = amqp::connect(&config.broker_settings(), "bench baseline")
        .await
        .unwrap();
    let consumer_channel = connection.create_channel().await.unwrap();
    consumer_channel
        .basic_qos(prefetch, BasicQosOptions::default())
        .await
        .unwrap();
    let publisher = amqp::confirm_channel(&connection).await.unwrap();
    let mut deliveries = consumer_channel
        .basic_consume(
            config.work_queue.as_str().into(),
            "baseline".into(),
            BasicConsumeOptions::default(),
            FieldTable::default(),
        )
        .await
        .unwrap();
    let done = Arc::new(AtomicUsize::new(0));
    // Nanoseconds spent publishing with confirm, over all messages.
    let confirm_ns = Arc::new(AtomicU64::new(0));
    let tasks = tokio_util::task::TaskTracker::new();
    while count.is_none_or(|c| done.load(Ordering::SeqCst) + tasks.len() < c) {
        let delivery = tokio::select! {
            next = deliveries.next() => next.unwrap().unwrap(),
            () = stop.cancelled() => break,
        };
        let (publisher, record, done, exchange) = (
            publisher.clone(),
            record.clone(),
            done.clone(),
            config.records_exchange.clone(),
        );
        let confirm_ns = confirm_ns.clone();
        tasks.spawn(async move {
            let publishing = Instant::now();
            let body = record.as_deref().unwrap_or(&delivery.data);
            amqp::publish_confirmed(
                &publisher,
                &exchange,
                "v1.bench",
                body,
                amqp::json_properties(),
            )
            .await
            .unwrap();
            confirm_ns.fetch_add(publishing.elapsed().as_nanos() as u64, Ordering::SeqCst);
            delivery
                .acker
                .ack(BasicAckOptions::default())
                .await
                .unwrap();
            done.fetch_add(1, Ordering::SeqCst);
        });
    }
    tasks.close();
    tasks.wait().await;
    let _ = connection.close(200, "done".into()).await;
    confirm_ns.load(Ordering::SeqCst) as f64 / 1e6 / done.load(Ordering::SeqCst).max(1) as f64
}

/// What the bare loop measured.
pub(crate) struct LoopRun {
    pub(crate) per_s: f64,
    /// The CPU time per message of this process while the loop runs, ms:
    /// the loop's broker client, lapin as in the worker (the origin in this
    /// process is idle meanwhile).
    pub(crate) cpu_ms_per_message: f64,
    /// Mean time of a publish with confirm, ms.
    pub(crate) confirm_ms: f64,
    /// The share of the machine's two cores busy meanwhile, 0 to 1.
    pub(crate) machine_busy: f64,
}

/// Scenario 1 baseline: the bare loop over the same number of same-sized
/// messages.
pub(crate) async fn broker_baseline(plan: &Plan, record_bytes: usize) -> LoopRun {
    let broker = Broker::new(records_config(plan)).await;
    // Same size as the records path's inbound messages.
    let video = (
        "http://127.0.0.1:40000/cam-a.mp4".to_owned(),
        FASTSTART.len(),
        0,
    );
    let inbound = lesson("rec-1-00000", &[video.clone(), video.clone(), video]);
    preload(&broker, (0..plan.records).map(|_| inbound.clone())).await;
    let started = Instant::now();
    let ticks = CpuTicks::now();
    let cpu_before = cpu_seconds(std::process::id());
    let record = Some(Arc::new(vec![b'x'; record_bytes]));
    let confirm_ms = bare_loop(
        broker.config.clone(),
        plan.concurrency,
        record,
        Some(plan.records),
        Default::default(),
    )
    .await;
    let per_s = plan.records as f64 / started.elapsed().as_secs_f64();
    let machine_busy = ticks.busy_share_since();
    let cpu_ms = (cpu_seconds(std::process::id()) - cpu_before) * 1e3 / plan.records as f64;
    broker.cleanup().await;
    LoopRun {
        per_s,
        cpu_ms_per_message: cpu_ms,
        confirm_ms,
        machine_busy,
    }
}
