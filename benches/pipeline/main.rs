//! The benchmark (scripts/bench.sh): the worker measured side by side with the
//! limits of this machine, each scenario with its baseline in the same run.
//!
//! 1. records path (probing by range reads, no archive) vs a bare
//!    consume → publish-with-confirm → ack loop on the same broker ([`records`]);
//! 2. archive path vs a plain streaming copy origin → S3 (same part size and
//!    concurrency, nothing else) ([`archive`]);
//! 3. peak RSS of the worker during 2, and with files 4× larger ([`archive`]);
//! 4. bytes read to probe a moov-at-end file of ≥ 1 GiB ([`probe`]);
//! 5. publish → record latency at half the measured maximum rate ([`latency`]);
//! 6. two worker processes vs one ([`records`]);
//! 7. TIC callbacks through the ingress at 64 concurrent clients vs the
//!    broker's bare publish-confirm rate from one process ([`ingress`]);
//! 8. the worker at the sizing model's peak, 4.6 recordings/s: its CPU per
//!    record there, idle time included ([`latency`]);
//! 9. archiving over a WAN against `rclone copyurl` ([`wan`]);
//! 10. fairness between apps (`BENCH_ONLY=a`): app B's lesson wait during
//!     app A's backlog against an idle worker, and A's throughput against A
//!     alone ([`fairness`]);
//! 11. webhooks (`BENCH_ONLY=b`): deliveries/s and CPU per delivery beside
//!     records alone; app B's events while app A's endpoint hangs, against
//!     idle ([`webhooks`]).
//!
//! Writes `target/bench/summary.json` and prints a table ([`report`]).
//! `--smoke` runs tiny sizes (CI), so the benchmark cannot rot; there, a missed
//! hard bound (flat memory, probe bytes) fails the run, ratios are reported.

#[path = "../../tests/common/mod.rs"]
mod common;

mod archive;
mod fairness;
mod harness;
mod ingress;
mod latency;
mod probe;
mod records;
mod report;
mod wan;
mod wan_proxy;
mod webhooks;

use common::origin::Origin;
use harness::{MIB, Plan, median, medians};
use latency::Processor;
use report::Results;
use serde_json::json;

/// The sizing model's peak (BENCHMARKS.md): 100 000 lessons a day, the peak
/// hour 4× the mean.
const MODEL_PEAK_PER_S: f64 = 100_000.0 / 24.0 * 4.0 / 3600.0;

#[tokio::main(flavor = "multi_thread")]
async fn main() {
    // `cargo bench` passes `--bench`; our own flag is `--smoke`. Anything else
    // (e.g. `cargo test --benches`) is not a benchmark run.
    let args: Vec<String> = std::env::args().collect();
    if !args.iter().any(|a| a == "--bench") {
        eprintln!("the benchmark runs through scripts/bench.sh (cargo bench); nothing to do here");
        return;
    }
    let smoke = args.iter().any(|a| a == "--smoke");
    let plan = if smoke { Plan::smoke() } else { Plan::full() };
    let origin = Origin::start_detached();
    eprintln!(
        "benchmark ({}): {} recordings, archive {} x {} MiB",
        if smoke { "smoke" } else { "full" },
        plan.records,
        plan.archive_files,
        plan.archive_file_bytes / MIB
    );
    // BENCH_ONLY=2,3 runs some scenarios only (for profiling); the others
    // report 0. Scenarios 10 and 11 are `a` and `b`.
    let only = std::env::var("BENCH_ONLY").ok();
    let wanted = |n: char| only.as_deref().is_none_or(|o| o.contains(n));
    let mut results = Results::default();
    if wanted('1') || wanted('5') || wanted('6') {
        run_records(&plan, &origin, &mut results).await;
    }
    if wanted('6') {
        eprintln!("6. two workers ...");
        results.two_workers_per_s = records::records_rate(&plan, &origin, 2, true).await.per_s;
    }
    if wanted('5') {
        run_latency(&plan, &origin, &mut results).await;
    }
    if wanted('2') || wanted('3') {
        run_archive(&plan, &origin, &mut results).await;
    }
    if wanted('3') {
        eprintln!("3. memory with files 4x larger ...");
        // As many files as uploads run at once, so both runs have the same concurrency.
        let files_4x = (plan.archive_files / 4).max(plan.archive_concurrency as usize);
        let run =
            archive::archive_rate(&plan, &origin, files_4x, plan.archive_file_bytes * 4).await;
        (results.archive_4x_mb_per_s, results.peak_rss_mib_4x) = (run.mb_per_s, run.peak_rss_mib);
    }
    if wanted('4') {
        eprintln!("4. probe cost ...");
        results.probe_bytes_per_track =
            probe::probe_cost(&plan, &origin, plan.probe_file_bytes).await;
    }
    if wanted('7') {
        eprintln!("7. ingress ...");
        (
            results.ingress_per_s,
            results.ingress_p50_ms,
            results.ingress_p99_ms,
            results.ingress_cpu_us_per_callback,
        ) = ingress::ingress_rate(&plan).await;
        (
            results.publish_baseline_per_s,
            results.publish_baseline_p50_ms,
            results.publish_baseline_p99_ms,
        ) = ingress::publish_baseline(&plan).await;
    }
    if wanted('8') {
        eprintln!("8. the sizing model's peak load ...");
        let run = latency::latency(
            &plan,
            &origin,
            MODEL_PEAK_PER_S,
            plan.model_seconds,
            Processor::Worker,
        )
        .await;
        results.model_cpu_ms_per_record = run.worker_cpu_ms_per_record;
        (results.model_p50_ms, results.model_p99_ms) = (run.p50_ms, run.p99_ms);
    }
    if wanted('9') {
        eprintln!("9. archive over a WAN ...");
        results.wan = wan::run(&plan, &origin).await;
    }
    if wanted('a') {
        eprintln!("10. fairness between apps ...");
        results.fairness = fairness::run(&plan, &origin).await;
    }
    if wanted('b') {
        eprintln!("11. webhooks ...");
        results.webhooks = webhooks::run(&plan).await;
    }
    let missed = report::write(&plan, smoke, &results);
    if smoke && !missed.is_empty() {
        eprintln!("hard bounds missed: {missed:?}");
        std::process::exit(1);
    }
}

/// Scenario 1: the records path and its baseline; then the same path with
/// probing off, which shows what the three probes per record cost.
async fn run_records(plan: &Plan, origin: &Origin, results: &mut Results) {
    eprintln!("1. records path ...");
    let run = records::records_rate(plan, origin, 1, true).await;
    results.records_per_s = run.per_s;
    results.worker_cpu_ms_per_record = run.cpu_ms_per_record;
    results.records_mean_ms = run.stages;
    results.records_machine_busy = run.machine_busy;
    let bare = records::broker_baseline(plan, run.record_bytes).await;
    results.broker_baseline_per_s = bare.per_s;
    results.loop_cpu_ms_per_message = bare.cpu_ms_per_message;
    results.loop_confirm_ms = bare.confirm_ms;
    results.loop_machine_busy = bare.machine_busy;
    let unprobed = records::records_rate(plan, origin, 1, false).await;
    results.unprobed_per_s = unprobed.per_s;
    results.unprobed_cpu_ms_per_record = unprobed.cpu_ms_per_record;
    results.unprobed_machine_busy = unprobed.machine_busy;
}

/// Scenarios 2 and 3 (256 MiB files). Throughput on a shared machine swings
/// between runs (the plain copy alone by ±10 %): the worker and the copy
/// alternate `archive_rounds` times, medians reported.
async fn run_archive(plan: &Plan, origin: &Origin, results: &mut Results) {
    eprintln!("2. archive path ...");
    let (mut rates, mut copies, mut cpu, mut rss) = (Vec::new(), Vec::new(), Vec::new(), 0f64);
    for _ in 0..plan.archive_rounds {
        let run =
            archive::archive_rate(plan, origin, plan.archive_files, plan.archive_file_bytes).await;
        rates.push(run.mb_per_s);
        cpu.push(run.cpu_s_per_gb);
        rss = rss.max(run.peak_rss_mib);
        copies.push(
            archive::copy_baseline(plan, origin, plan.archive_files, plan.archive_file_bytes).await,
        );
    }
    eprintln!("   archive rounds (MB/s): worker {rates:?}, plain copy {copies:?}");
    results.archive_mb_per_s = median(rates);
    results.copy_baseline_mb_per_s = median(copies);
    results.archive_cpu_s_per_gb = median(cpu);
    results.peak_rss_mib = rss;
    results.md5_floor_cpu_s_per_gb =
        archive::md5_floor_cpu_s_per_gb(plan.archive_file_bytes.min(1024 * MIB)).await;
}

/// Scenario 5. A p99 over a few seconds is at the mercy of a broker stall (a
/// confirm taking 100+ ms): the two alternate three times, medians reported.
async fn run_latency(plan: &Plan, origin: &Origin, results: &mut Results) {
    eprintln!("5. latency ...");
    let rate = results.records_per_s / 2.0;
    let (mut worker_rounds, mut loop_rounds) = (Vec::new(), Vec::new());
    for _ in 0..3 {
        let seconds = plan.latency_seconds;
        let worker = latency::latency(plan, origin, rate, seconds, Processor::Worker).await;
        let bare = latency::latency(plan, origin, rate, seconds, Processor::BareLoop).await;
        worker_rounds.push((worker.p50_ms, worker.p99_ms));
        loop_rounds.push((bare.p50_ms, bare.p99_ms));
    }
    eprintln!("   latency rounds (p50, p99 ms): worker {worker_rounds:?}, loop {loop_rounds:?}");
    (results.latency_p50_ms, results.latency_p99_ms) = medians(&worker_rounds);
    (
        results.latency_baseline_p50_ms,
        results.latency_baseline_p99_ms,
    ) = medians(&loop_rounds);
    results.latency_rounds = json!({"worker": worker_rounds, "loop": loop_rounds});
}
