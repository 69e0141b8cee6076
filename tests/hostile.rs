//! The hostile corpus (`tests/hostile/`, made by scripts/make-hostile-corpus.py):
//! every message ends in the parking queue with the reason its file name
//! names, and the worker keeps serving. Plus a property test: no input panics.

mod common;

use std::collections::HashMap;

use common::{Broker, header, isolated_config, spawn_worker};
use lapin::types::FieldTable;
use lesson_replay::broker::headers::set_header;
use lesson_replay::decision::decide::{Decision, InputPolicy, decide};
use proptest::prelude::*;
use serde_json::{Value, json};

const CORPUS: &str = concat!(env!("CARGO_MANIFEST_DIR"), "/tests/hostile");

/// (file name, expected reason, body), plus two cases too large to commit.
fn corpus() -> Vec<(String, String, Vec<u8>)> {
    let mut cases: Vec<_> = std::fs::read_dir(CORPUS)
        .unwrap()
        .map(|entry| {
            let path = entry.unwrap().path();
            let name = path.file_name().unwrap().to_string_lossy().into_owned();
            let reason = name
                .split_once("--")
                .expect("<reason>--<what>.json")
                .0
                .to_owned();
            (name, reason, std::fs::read(&path).unwrap())
        })
        .collect();
    cases.sort();
    let track = json!({"video_play_time":0,"video_size":1,"video_format":"mp4","video_duration":1,
        "video_url":"http://1.vod2.myqcloud.com/a.mp4","video_id":"1","video_type":0,"user_id":"u"});
    let message = |tracks: Vec<Value>| {
        serde_json::to_vec(&json!({"callback_type":"record_finished","room_id":1,"start_time":1,"video_info":tracks}))
            .unwrap()
    };
    cases.push((
        "generated--10000-tracks".into(),
        "body_too_large".into(),
        message(vec![track.clone(); 10_000]),
    ));
    let padding = Value::String("p".repeat(4000));
    let mut big = json!({"room_id": 1, "video_info": []});
    big["pad"] = Value::Array(vec![padding; 300]);
    cases.push((
        "generated--1.2MB-body".into(),
        "body_too_large".into(),
        serde_json::to_vec(&big).unwrap(),
    ));
    cases
}

#[test]
fn the_corpus_is_large_and_every_file_names_a_known_reason() {
    let cases = corpus();
    assert!(cases.len() >= 100, "{} cases", cases.len());
    let known: Vec<&str> = lesson_replay::decision::reason::ReasonCode::ALL
        .iter()
        .map(|c| c.as_str())
        .collect();
    for (name, reason, _) in &cases {
        assert!(
            known.contains(&reason.as_str()),
            "{name}: {reason} is not a reason code"
        );
    }
}

#[test]
fn the_pure_decision_rejects_every_case_before_any_io() {
    let policy = InputPolicy::default();
    for (name, reason, body) in corpus() {
        match decide(&body, &Default::default(), &policy) {
            Decision::Reject(r) => {
                assert_eq!(r.code.as_str(), reason, "{name}: {r}");
                if reason == "invalid_field" || reason == "field_too_long" {
                    // The error names the field's path: `video_info[1].video_size: ...`.
                    let (path, _) = r.message.split_once(": ").unwrap_or_default();
                    assert!(
                        !path.is_empty()
                            && path
                                .chars()
                                .all(|c| c.is_ascii_alphanumeric() || "_[].- …".contains(c)),
                        "{name}: no field path in {r}"
                    );
                }
            }
            other => panic!("{name}: expected {reason}, got {other:?}"),
        }
    }
}

/// The VOD hosts of the corpus' `url_not_allowed` cases that are IP literals
/// or name this machine, as an allow-list would spell them.
fn private_hosts() -> Vec<(String, Vec<u8>, String)> {
    corpus()
        .into_iter()
        .filter(|(_, reason, _)| reason == "url_not_allowed")
        .filter_map(|(name, _, body)| {
            let message: Value = serde_json::from_slice(&body).ok()?;
            let url = message["video_info"][0]["video_url"].as_str()?;
            let host = url::Url::parse(url).ok()?.host()?.to_owned();
            let spelled = match host {
                url::Host::Ipv4(ip) => ip.to_string(),
                url::Host::Ipv6(ip) => ip.to_string(),
                url::Host::Domain(d) if d == "localhost" => d,
                url::Host::Domain(_) => return None,
            };
            Some((name, body, spelled))
        })
        .collect()
}

/// The SSRF cases again with their hosts on the allow-list: what refuses them
/// is the private-address rule, not the allow-list. (The decision judges IP
/// literals; a name such as `localhost` is judged by the worker when it
/// resolves it, see the worker test below.)
#[test]
fn private_addresses_are_refused_even_when_their_host_is_allowed() {
    let cases = private_hosts();
    assert!(cases.len() >= 5, "{cases:?}");
    for (name, body, host) in cases.iter().filter(|(_, _, h)| h != "localhost") {
        let mut policy = InputPolicy::default();
        policy.urls.allowed_hosts = vec![host.clone()];
        match decide(body, &Default::default(), &policy) {
            Decision::Reject(r) => {
                assert_eq!(r.code.as_str(), "url_not_allowed", "{name}: {r}");
                assert!(r.message.contains("address"), "{name}: {r}");
            }
            other => panic!("{name}: {other:?}"),
        }
        // And with private networks allowed, the same message passes.
        policy.urls.allow_private_networks = true;
        assert!(
            matches!(
                decide(body, &Default::default(), &policy),
                Decision::Publish(_)
            ),
            "{name}: the allow-list admits {host}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_worker_refuses_private_addresses_whose_host_is_allowed() {
    let cases = private_hosts();
    let mut config = isolated_config("hostile-private");
    config.probe = true;
    config.vod_allowed_hosts = cases.iter().map(|(_, _, h)| h.clone()).collect();
    config.vod_allow_private_networks = false;
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;
    for (name, body, _) in &cases {
        let mut headers = FieldTable::default();
        set_header(&mut headers, "x-test-case", name);
        broker.publish(body, headers).await;
    }
    let parked = broker
        .take_raw(&broker.config.parking_queue, cases.len())
        .await;
    worker.stop().await;
    for (_, properties) in &parked {
        let case = header(properties, "x-test-case").unwrap();
        let reason = header(properties, "x-lesson-replay-reason").unwrap();
        assert_eq!(reason, "url_not_allowed", "{case}");
    }
    assert_eq!(broker.depth(&broker.config.records_queue).await, 0);
    broker.assert_settled().await;
    broker.cleanup().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_hostile_message_is_parked_with_its_reason_and_the_worker_keeps_serving() {
    let mut config = isolated_config("hostile");
    // Production defaults: only TIC's VOD hosts, no private addresses.
    config.vod_allowed_hosts = vec!["*.vod2.myqcloud.com".into()];
    config.vod_allow_private_networks = false;
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;

    let cases = corpus();
    for (name, _, body) in &cases {
        let mut headers = FieldTable::default();
        set_header(&mut headers, "x-test-case", name);
        broker.publish(body, headers).await;
    }
    let good = std::fs::read(format!("{}/realtime-query-finished.json", common::EXAMPLES)).unwrap();
    broker.publish(&good, FieldTable::default()).await;

    let parked: HashMap<String, (String, String, Vec<u8>)> = broker
        .take_raw(&broker.config.parking_queue, cases.len())
        .await
        .into_iter()
        .map(|(body, p)| {
            let case = header(&p, "x-test-case").unwrap();
            (
                case,
                (
                    header(&p, "x-lesson-replay-reason").unwrap(),
                    header(&p, "x-lesson-replay-error").unwrap(),
                    body,
                ),
            )
        })
        .collect();
    for (name, reason, sent) in &cases {
        let (got, error, body) = parked
            .get(name)
            .unwrap_or_else(|| panic!("{name} was not parked"));
        assert_eq!(got, reason, "{name}: {error}");
        assert!(
            body == sent,
            "{name}: the parked body differs from what was sent"
        );
        assert!(
            !error.is_empty() && error.len() < 2000,
            "{name}: a readable error, not an echo: {error}"
        );
    }
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    assert_eq!(
        record["task_id"], "g68cee8e90jcq4ogg8jb",
        "still serving after the corpus"
    );
    worker.stop().await;
    assert_eq!(broker.depth(&broker.config.records_queue).await, 0);
    broker.assert_settled().await;
    broker.cleanup().await;
}

/// Arbitrary JSON, nested a few levels.
fn json_value() -> impl Strategy<Value = Value> {
    let leaf = prop_oneof![
        Just(Value::Null),
        any::<bool>().prop_map(Value::Bool),
        any::<i64>().prop_map(Value::from),
        any::<f64>()
            .prop_filter("finite", |f| f.is_finite())
            .prop_map(Value::from),
        ".{0,20}".prop_map(Value::String),
        prop_oneof![
            Just("1234"),
            Just("-1"),
            Just("9999999999999999999999"),
            Just("")
        ]
        .prop_map(Value::from),
    ];
    leaf.prop_recursive(4, 64, 8, |inner| {
        let keys = prop_oneof![
            Just("room_id".to_owned()),
            Just("video_info".to_owned()),
            Just("callback_type".to_owned()),
            Just("status".to_owned()),
            Just("start_time".to_owned()),
            Just("stop_time".to_owned()),
            Just("RoomId".to_owned()),
            Just("VideoInfos".to_owned()),
            Just("video_play_time".to_owned()),
            Just("video_duration".to_owned()),
            Just("video_url".to_owned()),
            Just("video_type".to_owned()),
            Just("video_size".to_owned()),
            Just("TotalTime".to_owned()),
            ".{0,8}".prop_map(|s| s),
        ];
        prop_oneof![
            prop::collection::vec(inner.clone(), 0..6).prop_map(Value::Array),
            prop::collection::btree_map(keys, inner, 0..8)
                .prop_map(|m| Value::Object(m.into_iter().collect())),
        ]
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(2000))]

    /// Whatever the JSON, a decision (no panic), and a rejection says why.
    #[test]
    fn arbitrary_json_gets_a_decision(value in json_value()) {
        let body = serde_json::to_vec(&value).unwrap();
        match decide(&body, &Default::default(), &InputPolicy::default()) {
            Decision::Reject(r) | Decision::Skip(r) | Decision::Watch { reason: r, .. } => {
                prop_assert!(!r.message.is_empty())
            }
            Decision::Publish(n) => common::assert_valid_record(&serde_json::to_value(&n.record).unwrap()),
        }
    }

    /// Bytes that are not UTF-8 JSON are refused as `invalid_json`, never published.
    #[test]
    fn arbitrary_bytes_get_a_decision(body in prop::collection::vec(any::<u8>(), 0..512)) {
        let decision = decide(&body, &Default::default(), &InputPolicy::default());
        if serde_json::from_slice::<Value>(&body).is_err() {
            prop_assert!(
                matches!(&decision, Decision::Reject(r) if r.code.as_str() == "invalid_json"),
                "{:?}", decision
            );
        }
    }
}
