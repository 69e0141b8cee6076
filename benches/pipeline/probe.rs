//! Scenario 4: bytes read to probe a moov-at-end file of at least 1 GiB.

use std::collections::HashMap;
use std::time::Duration;

use crate::common::Broker;
use crate::common::messages::MOOV_AT_END;
use crate::common::origin::{Body, Faults, Origin};
use crate::harness::{Plan, lesson, preload, records_config, scrape, serve_metrics, start_worker};

/// Scenario 4: bytes read to probe one moov-at-end file of `bytes` without archiving.
pub(crate) async fn probe_cost(plan: &Plan, origin: &Origin, bytes: u64) -> u64 {
    let mut config = records_config(plan);
    let port = serve_metrics(&mut config);
    let broker = Broker::new(config).await;
    // ftyp, an mdat of `bytes`, then the moov of a real file.
    let mut boxes = HashMap::new();
    let mut at = 0;
    while at < MOOV_AT_END.len() {
        let size = u32::from_be_bytes(MOOV_AT_END[at..at + 4].try_into().unwrap()) as usize;
        boxes.insert(
            MOOV_AT_END[at + 4..at + 8].to_vec(),
            MOOV_AT_END[at..at + size].to_vec(),
        );
        at += size;
    }
    let mut head = boxes[&b"ftyp".to_vec()].clone();
    head.extend_from_slice(&1u32.to_be_bytes());
    head.extend_from_slice(b"mdat");
    head.extend_from_slice(&(bytes + 16).to_be_bytes());
    let tail = boxes[&b"moov".to_vec()].clone();
    let total = head.len() as u64 + bytes + tail.len() as u64;
    let url = origin.add_body(
        "/huge.mp4",
        Body::Synthetic {
            head,
            filler_len: bytes,
            tail,
        },
        Faults::default(),
    );
    let mut worker = start_worker(&broker.config);
    preload(
        &broker,
        std::iter::once(lesson("probe-cost", &[(url, total as usize, 2)])),
    )
    .await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert!(
        record["tracks"][0]["probe"]["duration_ms"]
            .as_i64()
            .unwrap()
            > 4000,
        "probed: {record}"
    );
    let metrics = scrape(port).await;
    worker.terminate();
    worker.wait_exit(Duration::from_secs(30));
    broker.cleanup().await;
    metrics
        .lines()
        .find_map(|l| l.strip_prefix("lesson_replay_probe_bytes_total "))
        .and_then(|v| v.trim().parse::<f64>().ok())
        .unwrap() as u64
}
