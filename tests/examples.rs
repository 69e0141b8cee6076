//! Every example message of the contract through the pure path and through the
//! `normalize` command: records equal the pinned examples in `proto/examples/`
//! and validate against the schema; broken examples are rejected with a reason.

mod common;

use std::path::Path;
use std::process::{Command, Stdio};

use common::{EXAMPLES, RECORD_EXAMPLES, assert_valid_record};
use lesson_replay::decision::decide::{Decision, Envelope, InputPolicy, decide};
use lesson_replay::decision::reason::ReasonCode;
use serde_json::Value;

/// What each example must become.
enum Expect {
    Record,
    Skip(ReasonCode),
    Reject(ReasonCode),
}

fn expectations() -> Vec<(&'static str, Expect)> {
    vec![
        ("realtime-result-record", Expect::Record),
        ("realtime-query-finished", Expect::Record),
        ("callback-record-finished", Expect::Record),
        ("post-class-unmixed", Expect::Record),
        ("post-class-mixed", Expect::Record),
        (
            "callback-record-started",
            Expect::Skip(ReasonCode::RecordingStarted),
        ),
        (
            "realtime-query-recording",
            Expect::Skip(ReasonCode::NotFinished),
        ),
        // The documents' own examples, verbatim: missing commas (§4.5.2) and a trailing comma (§4.5.1).
        (
            "callback-record-finished.doc",
            Expect::Reject(ReasonCode::InvalidJson),
        ),
        (
            "callback-record-started.doc",
            Expect::Reject(ReasonCode::InvalidJson),
        ),
    ]
}

fn example(name: &str) -> Vec<u8> {
    std::fs::read(Path::new(EXAMPLES).join(format!("{name}.json"))).unwrap()
}

fn pinned_record(name: &str) -> Value {
    let text =
        std::fs::read_to_string(Path::new(RECORD_EXAMPLES).join(format!("{name}.record.json")))
            .unwrap();
    serde_json::from_str(&text).unwrap()
}

#[test]
fn every_example_file_has_an_expectation() {
    let mut names: Vec<String> = std::fs::read_dir(EXAMPLES)
        .unwrap()
        .map(|e| {
            e.unwrap()
                .file_name()
                .to_string_lossy()
                .trim_end_matches(".json")
                .to_owned()
        })
        .collect();
    names.sort();
    let mut expected: Vec<String> = expectations().iter().map(|(n, _)| n.to_string()).collect();
    expected.sort();
    assert_eq!(names, expected);
}

#[test]
fn examples_become_the_pinned_records_or_their_reason() {
    for (name, expect) in expectations() {
        let decision = decide(
            &example(name),
            &Envelope::default(),
            &InputPolicy::default(),
        );
        match (expect, decision) {
            (Expect::Record, Decision::Publish(record)) => {
                let got = serde_json::to_value(&record.record).unwrap();
                assert_valid_record(&got);
                assert_eq!(
                    got,
                    pinned_record(name),
                    "{name}: record differs from proto/examples"
                );
            }
            (Expect::Skip(code), Decision::Skip(r))
            | (Expect::Reject(code), Decision::Reject(r)) => {
                assert_eq!(r.code, code, "{name}: {r}");
            }
            (_, other) => panic!("{name}: unexpected {other:?}"),
        }
    }
}

#[test]
fn pinned_record_examples_validate_against_the_schema() {
    for entry in std::fs::read_dir(RECORD_EXAMPLES).unwrap() {
        let text = std::fs::read_to_string(entry.unwrap().path()).unwrap();
        assert_valid_record(&serde_json::from_str(&text).unwrap());
    }
}

#[test]
fn the_schema_rejects_what_it_should() {
    let mut record = pinned_record("realtime-query-finished");
    record["tracks"][0]["kind"] = Value::from("hologram");
    let schema: Value =
        serde_json::from_str(&std::fs::read_to_string(common::SCHEMA).unwrap()).unwrap();
    assert!(!jsonschema::is_valid(&schema, &record));
}

fn run_normalize(args: &[&str], stdin: Option<&[u8]>) -> (i32, String, String) {
    run_normalize_with(&[], args, stdin)
}

/// `lesson-replay normalize` with only the settings `env` (and the defaults).
fn run_normalize_with(
    env: &[(&str, &str)],
    args: &[&str],
    stdin: Option<&[u8]>,
) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .arg("normalize")
        .args(args)
        .env_clear()
        .envs(env.iter().copied())
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut input = child.stdin.take().unwrap();
    input.write_all(stdin.unwrap_or_default()).unwrap();
    drop(input);
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8(out.stdout).unwrap(),
        String::from_utf8(out.stderr).unwrap(),
    )
}

#[test]
fn normalize_command_prints_the_record() {
    let file = format!("{EXAMPLES}/realtime-query-finished.json");
    let (code, stdout, stderr) = run_normalize(&[&file, "--sdkappid", "1400000001"], None);
    assert_eq!(code, 0, "{stderr}");
    let record: Value = serde_json::from_str(&stdout).unwrap();
    assert_valid_record(&record);
    assert_eq!(record["sdkappid"], 1400000001);
    assert_eq!(record["task_id"], "g68cee8e90jcq4ogg8jb");
}

#[test]
fn normalize_command_reads_stdin_and_reports_rejections_with_exit_65() {
    let (code, stdout, stderr) =
        run_normalize(&["-"], Some(&example("callback-record-finished.doc")));
    assert_eq!(code, 65);
    assert!(stdout.is_empty());
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.starts_with("error: invalid_json: "), "{stderr}");

    let (code, _, stderr) = run_normalize(&["-"], Some(br#"{"room_id":"x","video_info":[]}"#));
    assert_eq!(code, 65);
    assert!(
        stderr.starts_with("error: invalid_field: room_id: "),
        "{stderr}"
    );
}

#[test]
fn normalize_command_skips_unfinished_recordings_with_exit_0() {
    let file = format!("{EXAMPLES}/callback-record-started.json");
    let (code, stdout, stderr) = run_normalize(&[&file], None);
    assert_eq!(code, 0);
    assert!(stdout.is_empty());
    assert!(
        stderr.starts_with("skipped: recording_started: "),
        "{stderr}"
    );
}

/// The command judges a message with the worker's settings and the worker's
/// decision: what one refuses, the other refuses, with the same reason.
#[test]
fn normalize_command_applies_the_configured_input_policy() {
    let finished = std::fs::read(format!("{EXAMPLES}/realtime-query-finished.json")).unwrap();
    // The contract's VOD host is allowed by default, refused when not listed.
    let (code, _, stderr) = run_normalize_with(&[], &["--sdkappid", "1"], Some(&finished));
    assert_eq!(code, 0, "{stderr}");
    let other_host = [("LESSON_REPLAY_VOD_ALLOWED_HOSTS", "cdn.example.org")];
    let (code, _, stderr) = run_normalize_with(&other_host, &["-"], Some(&finished));
    assert_eq!(code, 65);
    assert!(
        stderr.starts_with("error: url_not_allowed: track "),
        "{stderr}"
    );

    // A look-alike of the allowed host (Cyrillic "о").
    let text = String::from_utf8(finished.clone()).unwrap();
    let lookalike = text.replace("myqcloud.com", "myqcl\\u043eud.com");
    assert_ne!(lookalike, text, "the example names a myqcloud.com host");
    let (code, _, stderr) = run_normalize_with(&[], &["-"], Some(lookalike.as_bytes()));
    assert_eq!(code, 65);
    assert!(stderr.starts_with("error: url_not_allowed: "), "{stderr}");

    // Limits and signatures come from the settings too.
    let small = [("LESSON_REPLAY_MAX_BODY_BYTES", "100")];
    let (code, _, stderr) = run_normalize_with(&small, &["-"], Some(&finished));
    assert_eq!(code, 65);
    assert!(stderr.starts_with("error: body_too_large: "), "{stderr}");
    let signed = [
        ("LESSON_REPLAY_SIGNATURE", "required"),
        ("LESSON_REPLAY_TIC_KEYS", "1400000001=KEY"),
    ];
    let (code, _, stderr) = run_normalize_with(&signed, &["-"], Some(&finished));
    assert_eq!(code, 65);
    assert!(stderr.starts_with("error: signature_missing: "), "{stderr}");

    // Invalid settings stop the command before it judges anything.
    let broken = [("LESSON_REPLAY_MAX_TRACKS", "0")];
    let (code, _, stderr) = run_normalize_with(&broken, &["-"], Some(&finished));
    assert_eq!(code, 1);
    assert!(stderr.contains("max_tracks"), "{stderr}");
}

/// The variable that points the tests at another broker is inherited by every
/// process a test starts: the settings loader must not take it for one of
/// its own (it refuses unknown `LESSON_REPLAY_*` names).
#[test]
fn the_tests_broker_variable_is_not_a_setting() {
    let out = Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .arg("config")
        .env_clear()
        .env(
            common::AMQP_URL_VAR,
            "amqp://guest:guest@127.0.0.1:5682/%2f",
        )
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{} set, the settings do not load: {}",
        common::AMQP_URL_VAR,
        String::from_utf8_lossy(&out.stderr)
    );
}
