//! `lesson-replay ingress` over real HTTP against the real broker: TIC's
//! callbacks become messages byte for byte, TIC is answered
//! `{"error_code":0}` only after the broker confirmed, and every other case
//! gets an answer whose `error_code` is not 0 (so TIC retries). The broker
//! outage in the middle of a stream is in tests/broker_restart.rs, which
//! owns the broker.

mod common;

use common::metric;

use std::io::{Read, Write};
use std::time::Duration;

use common::{Broker, EXAMPLES, header, isolated_config, spawn_ingress, spawn_worker};
use lapin::options::BasicGetOptions;
use lesson_replay::decision::verify::compute_sign;
use lesson_replay::telemetry::metrics::Metrics;
use serde_json::Value;

fn example(name: &str) -> Vec<u8> {
    std::fs::read(format!("{EXAMPLES}/{name}")).unwrap()
}

/// POST `body` to `url`; TIC's view of the answer: status and `error_code`.
async fn post(url: &str, query: &str, body: Vec<u8>) -> (u16, i64) {
    let response = reqwest::Client::new()
        .post(format!("{url}{query}"))
        .header("content-type", "application/json")
        .body(body)
        .send()
        .await
        .unwrap();
    let status = response.status().as_u16();
    let answer: Value = response.json().await.expect("every answer is JSON");
    (
        status,
        answer["error_code"].as_i64().expect("an error_code"),
    )
}

fn answered(outcome: &str) -> String {
    format!(r#"lesson_replay_ingress_requests_total{{outcome="{outcome}"}}"#)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn contract_callbacks_become_messages_byte_for_byte() {
    let broker = Broker::new(isolated_config("ingress-contract")).await;
    let c = broker.config.clone();
    let metrics = Metrics::default();
    let ingress = spawn_ingress(c.clone(), metrics.clone()).await;
    ingress.wait_ready().await;
    let query = "?sdkappid=1400042982&sign=5400bac77ba6467a8f8ac056f1769f45&random=526919";
    let before = time::OffsetDateTime::now_utc().unix_timestamp();
    for (name, key) in [
        ("callback-record-finished.json", "tic.record_finished"),
        ("callback-record-started.json", "tic.record_started"),
    ] {
        let body = example(name);
        assert_eq!(
            post(&ingress.url, query, body.clone()).await,
            (200, 0),
            "{name}"
        );
        // Answered only after the confirm: the message is there now.
        let got = broker
            .channel
            .basic_get(
                c.work_queue.as_str().into(),
                BasicGetOptions { no_ack: true },
            )
            .await
            .unwrap()
            .expect("published before the answer");
        let delivery = got.delivery;
        assert!(delivery.data == body, "{name}: the body is byte-identical");
        assert_eq!(delivery.routing_key.as_str(), key);
        let p = &delivery.properties;
        assert_eq!(
            header(p, "x-tic-sign").as_deref(),
            Some("5400bac77ba6467a8f8ac056f1769f45")
        );
        assert_eq!(header(p, "x-tic-random").as_deref(), Some("526919"));
        assert_eq!(header(p, "x-tic-sdkappid").as_deref(), Some("1400042982"));
        assert_eq!(p.delivery_mode(), &Some(2), "persistent");
        let at = p.timestamp().expect("the time of receipt") as i64;
        assert!(at >= before && at <= before + 60, "{at}");
    }
    assert_eq!(metric(&metrics, &answered("accepted")), 2);
    ingress.stop().await;
    assert_eq!(broker.depth(&c.work_queue).await, 0);
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn test_requests_are_answered_and_nothing_is_published() {
    let broker = Broker::new(isolated_config("ingress-test-request")).await;
    let c = broker.config.clone();
    let metrics = Metrics::default();
    let ingress = spawn_ingress(c.clone(), metrics.clone()).await;
    ingress.wait_ready().await;
    for body in ["", "{}", r#"{"test":"hello"}"#] {
        assert_eq!(
            post(&ingress.url, "", body.into()).await,
            (200, 0),
            "{body:?}"
        );
    }
    // Answers come after any publish's confirm: an empty queue now is final.
    assert_eq!(broker.depth(&c.work_queue).await, 0);
    assert_eq!(metric(&metrics, &answered("test_request")), 3);
    assert_eq!(metric(&metrics, &answered("accepted")), 0);
    ingress.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_refusal_has_its_answer_and_error_code() {
    let mut config = isolated_config("ingress-limits");
    config.max_body_bytes = 4096;
    let broker = Broker::new(config).await;
    let c = broker.config.clone();
    let metrics = Metrics::default();
    let ingress = spawn_ingress(c.clone(), metrics.clone()).await;
    ingress.wait_ready().await;
    // Not JSON (the contract's own §4.5.2 example): 400, TIC retries.
    let doc = example("callback-record-finished.doc.json");
    assert_eq!(post(&ingress.url, "", doc).await, (400, 400));
    // Too large: 413.
    let big = format!(r#"{{"room_id":1,"pad":"{}"}}"#, "x".repeat(5000));
    assert_eq!(post(&ingress.url, "", big.into()).await, (413, 413));
    // Wrong method, wrong path.
    let client = reqwest::Client::new();
    let get = client.get(&ingress.url).send().await.unwrap();
    assert_eq!(get.status().as_u16(), 405);
    let elsewhere = ingress.url.replace("/tic/callback", "/other");
    assert_eq!(post(&elsewhere, "", b"{}".to_vec()).await, (404, 404));
    assert_eq!(broker.depth(&c.work_queue).await, 0);
    assert_eq!(metric(&metrics, &answered("not_json")), 1);
    assert_eq!(metric(&metrics, &answered("too_large")), 1);
    ingress.stop().await;
    broker.cleanup().await;
}

/// Requests in hand are bounded: beyond `ingress_max_in_flight`, an
/// immediate 503; a request too slow to arrive ends with a 408.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_flight_requests_are_bounded_and_slow_ones_time_out() {
    let mut config = isolated_config("ingress-busy");
    config.ingress_max_in_flight = 1;
    config.ingress_request_timeout_ms = 1500;
    let broker = Broker::new(config).await;
    let c = broker.config.clone();
    let metrics = Metrics::default();
    let ingress = spawn_ingress(c.clone(), metrics.clone()).await;
    ingress.wait_ready().await;
    // A request whose body never finishes arriving holds the only slot.
    let addr = ingress
        .url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned();
    let slow = std::thread::spawn(move || {
        let mut stream = std::net::TcpStream::connect(addr).unwrap();
        let head = "POST /tic/callback HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\ncontent-length: 100\r\n\r\n{\"room";
        stream.write_all(head.as_bytes()).unwrap();
        let mut answer = String::new();
        let _ = stream.read_to_string(&mut answer);
        answer
    });
    let gauge = "lesson_replay_ingress_in_flight_requests";
    common::wait_until(
        "the slow request is in hand",
        Duration::from_secs(10),
        || metric(&metrics, gauge) == 1,
    )
    .await;
    assert_eq!(post(&ingress.url, "", b"{}".to_vec()).await, (503, 503));
    let answer = tokio::task::spawn_blocking(move || slow.join().unwrap())
        .await
        .unwrap();
    assert!(answer.starts_with("HTTP/1.1 408"), "{answer}");
    assert_eq!(metric(&metrics, &answered("busy")), 1);
    assert_eq!(metric(&metrics, &answered("timeout")), 1);
    // The slot is free again.
    assert_eq!(post(&ingress.url, "", b"{}".to_vec()).await, (200, 0));
    ingress.stop().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn required_signatures_are_judged_at_the_edge() {
    let mut config = isolated_config("ingress-signed");
    config.ingress_signature = lesson_replay::decision::verify::SignatureMode::Required;
    config.tic_keys = lesson_replay::config::settings::TicKeysSetting::List(
        "1400042982=9016607A382749C69D4F4B00C61DD083"
            .to_owned()
            .into(),
    );
    let broker = Broker::new(config).await;
    let c = broker.config.clone();
    let ingress = spawn_ingress(c.clone(), Metrics::default()).await;
    ingress.wait_ready().await;
    // The contract's callback, sent now: expiring in ten minutes.
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    let expire = now + 600;
    let contract = String::from_utf8(example("callback-record-finished.json")).unwrap();
    let at = |timestamp: i64| {
        contract
            .replace(
                "\"expire_time\":1529908745",
                &format!("\"expire_time\":{expire}"),
            )
            .replace(
                "\"timestamp\": 1529908745",
                &format!("\"timestamp\": {timestamp}"),
            )
            .into_bytes()
    };
    let body = at(now);
    assert_ne!(
        body,
        contract.as_bytes(),
        "the example's times are written so"
    );
    let good = compute_sign("9016607A382749C69D4F4B00C61DD083", expire);
    let with = |sign: &str| format!("?sdkappid=1400042982&random=1&sign={sign}");
    assert_eq!(
        post(&ingress.url, "?sdkappid=1400042982", body.clone()).await,
        (401, 20002)
    );
    assert_eq!(
        post(&ingress.url, &with("0000"), body.clone()).await,
        (401, 20002)
    );
    // Sent after it expired.
    assert_eq!(
        post(&ingress.url, &with(&good), at(expire + 10)).await,
        (401, 20001)
    );
    // A `timestamp` far from the time of receipt: the sender's clock is not trusted.
    assert_eq!(
        post(&ingress.url, &with(&good), at(now - 3600)).await,
        (401, 20001)
    );
    assert_eq!(
        broker.depth(&c.work_queue).await,
        0,
        "nothing refused was published"
    );
    assert_eq!(post(&ingress.url, &with(&good), body).await, (200, 0));
    assert_eq!(broker.depth(&c.work_queue).await, 1);
    ingress.stop().await;
    broker.cleanup().await;
}

/// The broker refusing the message (a nack) or not being there at all: 503
/// with an error code, never `{"error_code":0}`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn without_a_confirm_the_answer_is_503() {
    let broker = Broker::new(isolated_config("ingress-nack")).await;
    let c = broker.config.clone();
    let metrics = Metrics::default();
    let ingress = spawn_ingress(c.clone(), metrics.clone()).await;
    ingress.wait_ready().await;
    let full = broker.refusing_queue(&c.inbound_exchange).await;
    let body = example("callback-record-finished.json");
    assert_eq!(post(&ingress.url, "", body.clone()).await, (503, 503));
    broker.delete_queue(&full).await;
    // TIC's retry goes through.
    assert_eq!(post(&ingress.url, "", body).await, (200, 0));
    assert_eq!(metric(&metrics, &answered("broker_unavailable")), 1);
    ingress.stop().await;

    // No broker at all: not ready, and 503.
    let mut nowhere = c.clone();
    nowhere.amqp_url = "amqp://guest:guest@127.0.0.1:1/%2f".to_owned().into();
    let ingress = spawn_ingress(nowhere, Metrics::default()).await;
    assert!(!ingress.health.is_ready());
    let body = example("callback-record-started.json");
    assert_eq!(post(&ingress.url, "", body).await, (503, 503));
    ingress.stop().await;
    broker.cleanup().await;
}

/// A callback over HTTP becomes a record: ingress → broker → worker.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_callback_over_http_ends_as_a_record() {
    let broker = Broker::new(isolated_config("ingress-e2e")).await;
    let c = broker.config.clone();
    let ingress = spawn_ingress(c.clone(), Metrics::default()).await;
    let worker = spawn_worker(c.clone()).await;
    ingress.wait_ready().await;
    let body = example("callback-record-finished.json");
    assert_eq!(
        post(&ingress.url, "?sdkappid=1400042982&random=7", body).await,
        (200, 0)
    );
    let (record, _) = broker.take(&c.records_queue, 1).await.remove(0);
    common::assert_valid_record(&record);
    assert_eq!(record["task_id"], "g68cee8e90jcq4ogg8jb");
    assert_eq!(record["sdkappid"], 1400042982, "from the URL's sdkappid");
    worker.stop().await;
    ingress.stop().await;
    broker.assert_settled().await;
    broker.cleanup().await;
}

/// The ingress's address, `host:port`.
fn address(ingress: &common::RunningIngress) -> String {
    ingress
        .url
        .trim_start_matches("http://")
        .split('/')
        .next()
        .unwrap()
        .to_owned()
}

/// Read from `stream` until the server closes it; `true` when it did within
/// `limit` (end of stream, a reset, or an answer followed by the close).
async fn closed_by_server(stream: &mut tokio::net::TcpStream, limit: Duration) -> bool {
    use tokio::io::AsyncReadExt;
    let mut buf = [0u8; 1024];
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Err(_) => return false,
            Ok(Ok(0)) | Ok(Err(_)) => return true,
            Ok(Ok(_)) => continue,
        }
    }
}

/// Slow and idle clients cannot hold the ingress: 300 connections that send
/// a byte of their headers every 700 ms, and 50 keep-alive connections left
/// idle after one callback, are closed at `ingress_header_timeout_ms`, while
/// valid callbacks keep being answered and published all along.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn slow_and_idle_clients_are_closed_at_the_header_deadline() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut config = isolated_config("ingress-slow-clients");
    config.ingress_header_timeout_ms = 2_000;
    let broker = Broker::new(config).await;
    let c = broker.config.clone();
    let ingress = spawn_ingress(c.clone(), Metrics::default()).await;
    ingress.wait_ready().await;
    let addr = address(&ingress);
    let head = format!(
        "POST {} HTTP/1.1\r\nhost: x\r\ncontent-type: application/json\r\n",
        c.ingress_path
    );

    // Slow clients: one header byte every 700 ms, never the whole header.
    let mut slow = Vec::new();
    for _ in 0..300 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        stream.write_all(&head.as_bytes()[..1]).await.unwrap();
        slow.push(stream);
    }
    let dripping = {
        let head = head.clone();
        tokio::spawn(async move {
            for i in 1..head.len() {
                tokio::time::sleep(Duration::from_millis(700)).await;
                for stream in &mut slow {
                    let _ = stream.write_all(&head.as_bytes()[i..=i]).await;
                }
                if i == 8 {
                    break;
                }
            }
            slow
        })
    };
    // Idle keep-alive clients: one callback each, then silence.
    let body = example("callback-record-finished.json");
    let mut idle = Vec::new();
    for _ in 0..50 {
        let mut stream = tokio::net::TcpStream::connect(&addr).await.unwrap();
        let request = format!("{head}content-length: {}\r\n\r\n", body.len());
        stream.write_all(request.as_bytes()).await.unwrap();
        stream.write_all(&body).await.unwrap();
        let mut answer = vec![0u8; 512];
        let n = stream.read(&mut answer).await.unwrap();
        assert!(
            answer[..n].starts_with(b"HTTP/1.1 200"),
            "{:?}",
            String::from_utf8_lossy(&answer[..n])
        );
        idle.push(stream);
    }
    // Valid callbacks all along, on connections of their own.
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    let mut answered = 0;
    for _ in 0..30 {
        let answer = client
            .post(&ingress.url)
            .header("content-type", "application/json")
            .body(body.clone())
            .send()
            .await
            .expect("a valid callback is answered while slow clients hang on");
        assert_eq!(answer.status(), 200);
        answered += 1;
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
    // Past the deadline, every slow and idle connection was closed by the server.
    let mut slow = dripping.await.unwrap();
    for (i, stream) in slow.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, Duration::from_secs(5)).await,
            "slow client {i} still open"
        );
    }
    for (i, stream) in idle.iter_mut().enumerate() {
        assert!(
            closed_by_server(stream, Duration::from_secs(5)).await,
            "idle keep-alive client {i} still open"
        );
    }
    ingress.stop().await;
    let published = broker.drain(&c.work_queue).await.len();
    assert_eq!(
        published,
        answered + 50,
        "every answered callback is in the broker"
    );
    broker.cleanup().await;
}

/// The hand-over on shutdown: callbacks sent all through it are answered 0
/// and published, or refused once the listener closed — never cut while the
/// ingress still said ready. Readiness drops at the signal; the listener
/// stays open for `ingress_drain_secs`.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn callbacks_through_a_shutdown_are_answered_or_refused_never_cut() {
    let mut config = isolated_config("ingress-drain");
    config.ingress_drain_secs = 2;
    let broker = Broker::new(config).await;
    let c = broker.config.clone();
    let ingress = spawn_ingress(c.clone(), Metrics::default()).await;
    ingress.wait_ready().await;
    let health = ingress.health.clone();
    let url = ingress.url.clone();
    let body = example("callback-record-finished.json");
    let client = reqwest::Client::builder()
        .pool_max_idle_per_host(0)
        .timeout(Duration::from_secs(10))
        .build()
        .unwrap();
    // (ready when sent, outcome): Ok(status) or Err(refused?).
    let sender = {
        let health = health.clone();
        tokio::spawn(async move {
            let mut outcomes = Vec::new();
            let started = std::time::Instant::now();
            while started.elapsed() < Duration::from_secs(5) {
                let ready = health.is_ready();
                let sent = client
                    .post(&url)
                    .header("content-type", "application/json")
                    .body(body.clone())
                    .send()
                    .await;
                let outcome = match sent {
                    Ok(answer) => Ok(answer.status().as_u16()),
                    Err(e) => Err((e.is_connect(), e.to_string())),
                };
                outcomes.push((ready, started.elapsed(), outcome));
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
            outcomes
        })
    };
    tokio::time::sleep(Duration::from_millis(1000)).await;
    let stopping = tokio::spawn(ingress.stop());
    common::wait_until(
        "not ready at the signal",
        Duration::from_millis(500),
        || !health.is_ready(),
    )
    .await;
    stopping.await.unwrap();
    let outcomes = sender.await.unwrap();
    let ok = outcomes.iter().filter(|(_, _, o)| *o == Ok(200)).count();
    let answered_not_ready = outcomes
        .iter()
        .filter(|(ready, _, o)| !ready && *o == Ok(200))
        .count();
    let refused = outcomes
        .iter()
        .filter(|(_, _, o)| matches!(o, Err((true, _))))
        .count();
    for (ready, at, outcome) in &outcomes {
        match outcome {
            Ok(200) => {}
            Err(_) if !ready => {}
            other => panic!("at {at:?} (ready: {ready}): {other:?}"),
        }
    }
    assert!(
        answered_not_ready > 10,
        "the drain kept serving: {answered_not_ready}"
    );
    assert!(refused > 10, "refused once the listener closed: {refused}");
    let published = broker.drain(&c.work_queue).await.len();
    assert_eq!(published, ok, "every answered callback is in the broker");
    broker.cleanup().await;
}

/// At most `ingress_max_connections` are open: one more waits in the listen
/// backlog, and is served once the header deadline closed an idle one.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn open_connections_are_bounded() {
    let mut config = isolated_config("ingress-connections");
    config.ingress_max_connections = 3;
    config.ingress_header_timeout_ms = 1_500;
    let broker = Broker::new(config).await;
    let c = broker.config.clone();
    let ingress = spawn_ingress(c.clone(), Metrics::default()).await;
    ingress.wait_ready().await;
    let addr = address(&ingress);
    let mut idle = Vec::new();
    for _ in 0..3 {
        idle.push(tokio::net::TcpStream::connect(&addr).await.unwrap());
    }
    tokio::time::sleep(Duration::from_millis(200)).await;
    let answer = reqwest::Client::new()
        .post(&ingress.url)
        .header("content-type", "application/json")
        .body(example("callback-record-finished.json"))
        .timeout(Duration::from_secs(20))
        .send()
        .await
        .expect("answered once a slot is free");
    assert_eq!(answer.status(), 200);
    // It was served only after the deadline closed the idle ones.
    let mut closed = 0;
    for stream in &mut idle {
        if closed_by_server(stream, Duration::from_millis(100)).await {
            closed += 1;
        }
    }
    assert_eq!(closed, 3, "served while the 3 slots were still held");
    ingress.stop().await;
    broker.cleanup().await;
}
