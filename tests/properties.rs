//! Properties of the decision over generated input. Valid messages of all
//! four formats (the contract's examples) get one field mutated — replaced by
//! another JSON value, or removed — and whatever the outcome, it must be well
//! formed: a record validates against the schema, its layout tiles the
//! timeline, `duration_ms` covers every track, the tile rules and the 16-tile
//! cap hold, tracks are in timeline order; a rejection names the field it
//! refuses. A second property builds recordings with many tracks at random
//! places, to reach every tile rule.

mod common;

use common::{EXAMPLES, assert_valid_record};
use lesson_replay::decision::decide::{Decision, InputPolicy, decide};
use lesson_replay::decision::layout::MAX_TILES;
use lesson_replay::decision::reason::ReasonCode;
use lesson_replay::decision::record::{Kind, Record};
use proptest::prelude::*;
use serde_json::{Value, json};

/// The contract's valid examples: one or more of each of the four formats.
const BASES: [&str; 6] = [
    "callback-record-finished.json",
    "callback-record-started.json",
    "realtime-query-finished.json",
    "realtime-result-record.json",
    "post-class-unmixed.json",
    "post-class-mixed.json",
];

fn base(index: usize) -> Value {
    let text = std::fs::read(format!("{EXAMPLES}/{}", BASES[index])).unwrap();
    serde_json::from_slice(&text).unwrap()
}

/// One step into a JSON document.
#[derive(Debug, Clone)]
enum Step {
    Key(String),
    Index(usize),
}

/// Every path to a value in `value` (not the root).
fn paths(value: &Value, prefix: &mut Vec<Step>, out: &mut Vec<Vec<Step>>) {
    match value {
        Value::Object(map) => {
            for (key, child) in map {
                prefix.push(Step::Key(key.clone()));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        Value::Array(items) => {
            for (i, child) in items.iter().enumerate() {
                prefix.push(Step::Index(i));
                out.push(prefix.clone());
                paths(child, prefix, out);
                prefix.pop();
            }
        }
        _ => {}
    }
}

/// Replace (or, with `None`, remove) the value at `path`.
fn mutate(value: &mut Value, path: &[Step], replacement: Option<Value>) {
    let (last, parents) = path.split_last().unwrap();
    let mut at = value;
    for step in parents {
        at = match step {
            Step::Key(k) => &mut at[k.as_str()],
            Step::Index(i) => &mut at[*i],
        };
    }
    match (last, replacement) {
        (Step::Key(k), Some(v)) => at[k.as_str()] = v,
        (Step::Key(k), None) => {
            at.as_object_mut().unwrap().remove(k);
        }
        (Step::Index(i), Some(v)) => at[*i] = v,
        (Step::Index(i), None) => {
            at.as_array_mut().unwrap().remove(*i);
        }
    }
}

/// A value to put in place of a field: of every JSON type, with the edges
/// numbers and strings have in this contract.
fn replacement() -> impl Strategy<Value = Option<Value>> {
    prop_oneof![
        Just(None),
        Just(Some(Value::Null)),
        any::<bool>().prop_map(|b| Some(Value::Bool(b))),
        prop_oneof![
            Just(0i64),
            Just(-1),
            Just(1),
            Just(i64::MAX),
            Just(i64::MIN),
            Just(1_600_000_000),
            Just(1_600_000_000_000),
            any::<i64>(),
        ]
        .prop_map(|n| Some(json!(n))),
        prop_oneof![Just(0.5f64), Just(-0.0), Just(1e300)].prop_map(|f| Some(json!(f))),
        prop_oneof![
            Just(String::new()),
            Just("123".to_owned()),
            Just("-5".to_owned()),
            Just("record_finished".to_owned()),
            Just("finished".to_owned()),
            Just("http://1.vod2.myqcloud.com/x.mp4".to_owned()),
            Just("http://127.0.0.1/x.mp4".to_owned()),
            Just("a\nb".to_owned()),
            ".{0,12}".prop_map(|s| s),
        ]
        .prop_map(|s| Some(Value::String(s))),
        Just(Some(json!([]))),
        Just(Some(json!({}))),
    ]
}

/// Everything a published record must satisfy.
fn check_record(record: &Record) -> Result<(), TestCaseError> {
    assert_valid_record(&serde_json::to_value(record).unwrap());
    // Tracks in timeline order, ids unique, all inside the timeline.
    let order = |t: &lesson_replay::decision::record::Track| {
        (t.offset_ms, t.kind, t.user_id.clone(), t.track_id.clone())
    };
    for pair in record.tracks.windows(2) {
        prop_assert!(order(&pair[0]) <= order(&pair[1]), "tracks out of order");
    }
    let ids: std::collections::HashSet<_> = record.tracks.iter().map(|t| &t.track_id).collect();
    prop_assert_eq!(ids.len(), record.tracks.len());
    for track in &record.tracks {
        prop_assert!(track.offset_ms >= 0 && track.duration_ms >= 0);
        prop_assert!(
            track.end_ms() <= record.duration_ms,
            "{} past the end",
            track.track_id
        );
    }
    // Segments tile [0, duration_ms) without gaps or overlaps.
    let mut at = 0;
    for segment in &record.layout {
        prop_assert_eq!(segment.from_ms, at);
        prop_assert!(segment.to_ms > segment.from_ms);
        at = segment.to_ms;
        check_segment(record, segment)?;
    }
    prop_assert_eq!(at, record.duration_ms);
    Ok(())
}

/// A segment places only tracks playing all along it, cameras as tiles of
/// the size their number calls for (contract §4), at most 16, on the canvas.
fn check_segment(
    record: &Record,
    segment: &lesson_replay::decision::record::Segment,
) -> Result<(), TestCaseError> {
    let track = |id: &str| record.tracks.iter().find(|t| t.track_id == id).unwrap();
    let placements = segment.main.iter().chain(&segment.tiles);
    for p in placements {
        let t = track(&p.track_id);
        prop_assert!(t.offset_ms <= segment.from_ms && t.end_ms() >= segment.to_ms);
        let eps = 1e-9;
        prop_assert!(
            p.x >= -eps && p.y >= -eps && p.x + p.w <= 1.0 + eps && p.y + p.h <= 1.0 + eps
        );
    }
    if let Some(main) = &segment.main {
        prop_assert!(track(&main.track_id).kind != Kind::Camera);
    }
    prop_assert!(segment.tiles.len() <= MAX_TILES);
    let (w, h) = match segment.tiles.len() {
        0..=4 => (1.0 / 5.0, 1.0 / 4.0),
        5..=6 => (1.0 / 7.0, 1.0 / 6.0),
        7..=8 => (1.0 / 9.0, 1.0 / 8.0),
        _ => (1.0 / 10.0, 1.0 / 8.0),
    };
    for tile in &segment.tiles {
        prop_assert_eq!(track(&tile.track_id).kind, Kind::Camera);
        prop_assert!((tile.w - w).abs() < 1e-9 && (tile.h - h).abs() < 1e-9);
    }
    Ok(())
}

/// The key of the last object step of `path` (the field that was changed).
fn field_of(path: &[Step]) -> Option<&str> {
    path.iter().rev().find_map(|s| match s {
        Step::Key(k) => Some(k.as_str()),
        Step::Index(_) => None,
    })
}

proptest! {
    #![proptest_config(ProptestConfig::with_cases(3000))]

    #[test]
    fn one_mutated_field_gives_a_well_formed_outcome(
        which in 0..BASES.len(),
        pick in any::<prop::sample::Index>(),
        replacement in replacement(),
    ) {
        let mut message = base(which);
        let mut all = Vec::new();
        paths(&message, &mut Vec::new(), &mut all);
        let path = pick.get(&all).clone();
        mutate(&mut message, &path, replacement);
        let body = serde_json::to_vec(&message).unwrap();
        match decide(&body, &Default::default(), &InputPolicy::default()) {
            Decision::Publish(n) => check_record(&n.record)?,
            Decision::Skip(r) | Decision::Watch { reason: r, .. } => prop_assert!(
                matches!(r.code, ReasonCode::RecordingStarted | ReasonCode::NotFinished),
                "{r}"
            ),
            Decision::Reject(r) => {
                prop_assert!(!r.message.is_empty());
                if r.code == ReasonCode::InvalidField {
                    // The error names the field: the mutated one, or (when
                    // the whole list or object went) the one that is now missing.
                    let named = r.message.split(": ").next().unwrap_or_default();
                    let field = field_of(&path).unwrap_or_default();
                    prop_assert!(
                        named.contains(field) || r.message.contains("missing"),
                        "{} changed, error: {}", field, r
                    );
                }
            }
        }
    }

    #[test]
    fn recordings_with_many_tracks_keep_every_layout_rule(
        tracks in prop::collection::vec((0i64..10_000_000, 0i64..10_000_000, 0i64..4, 0i64..1_000_000_000), 0..40),
        span in 0i64..100_000,
    ) {
        let videos: Vec<Value> = tracks.iter().enumerate().map(|(i, (offset, duration, kind, size))| json!({
            "video_play_time": offset, "video_duration": duration, "video_type": kind, "video_size": size,
            "video_url": format!("http://1.vod2.myqcloud.com/{i}.mp4"), "video_id": (i % 25).to_string(),
            "user_id": format!("u{}", i % 20)
        })).collect();
        let body = serde_json::to_vec(&json!({"room_id": 1, "start_time": 1_600_000_000,
            "stop_time": 1_600_000_000 + span, "video_info": videos})).unwrap();
        match decide(&body, &Default::default(), &InputPolicy::default()) {
            Decision::Publish(n) => check_record(&n.record)?,
            other => prop_assert!(false, "{:?}", other),
        }
    }
}
