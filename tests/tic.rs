//! The TIC API client against the mock TIC (tests/common/tic_mock.rs) that
//! checks every request the way TIC does: the signature with the contract's
//! test key, the URL parameters, the body. It answers each error code of the
//! contract, and fails on purpose where a test needs it.

mod common;

use std::sync::{Arc, Mutex};
use std::time::Duration;

use common::tic_mock::{APP, KEY, Seen, TaskScript, TicMock};
use lesson_replay::decision::verify::compute_sign;
use lesson_replay::tic::client::{StartRequest, TicClient, TicError, TicSettings};
use serde_json::{Value, json};

/// The mock with the tasks these tests query: `finished-task`, and `flaky`
/// (HTTP 500 twice, then finished); `e-<code>` answers that error code.
async fn start_mock() -> (Arc<Mutex<Seen>>, String) {
    let mock = TicMock::start().await;
    let finished = TaskScript {
        finished: Some(finished_answer()),
        ..TaskScript::default()
    };
    mock.script("finished-task", finished.clone());
    mock.script(
        "flaky",
        TaskScript {
            fail_first: 2,
            ..finished
        },
    );
    (mock.seen, mock.api_base)
}

/// TIC's query answer for a finished task, as TIC formats it (the contract's
/// example, its own spacing kept).
fn finished_answer() -> String {
    std::fs::read_to_string(format!("{}/realtime-query-finished.json", common::EXAMPLES)).unwrap()
}

fn client(base: &str) -> TicClient {
    TicClient::new(TicSettings {
        api_base: base.to_owned(),
        sdkappid: APP,
        key: KEY.to_owned().into(),
        sign_ttl: Duration::from_secs(300),
        timeout: Duration::from_secs(5),
        attempts: 3,
    })
    .unwrap()
}

/// `lesson-replay tic …` with the mock's settings; (exit code, stdout, stderr).
async fn tic_command(base: &str, args: &[&str], keys: &str) -> (i32, Vec<u8>, String) {
    let out = tokio::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .arg("tic")
        .args(args)
        .env_clear()
        .env("LESSON_REPLAY_TIC_API_BASE", base)
        .env("LESSON_REPLAY_TIC_KEYS", keys)
        .env("LESSON_REPLAY_LOG_FORMAT", "text")
        .output()
        .await
        .unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

#[test]
fn the_signature_is_the_contracts_test_vector() {
    assert_eq!(
        compute_sign(KEY, 1548247837),
        "5400bac77ba6467a8f8ac056f1769f45"
    );
}

#[tokio::test]
async fn start_checks_the_user_then_returns_tics_task_id() {
    let (seen, base) = start_mock().await;
    let mut request = StartRequest {
        room_id: 1234,
        user_id: "teacher".into(),
        user_sig: "sig".to_owned().into(),
        group_id: None,
        whiteboard: Some((1280, 720)),
    };
    let refused = client(&base).start(&request).await.unwrap_err();
    assert!(matches!(refused, TicError::InvalidRequest(_)), "{refused}");
    assert!(
        seen.lock().unwrap().calls.is_empty(),
        "refused before sending"
    );
    request.user_id = "tic_record_user_1234_01".into();
    assert_eq!(client(&base).start(&request).await.unwrap(), "new-task-1");
    let (action, body) = seen.lock().unwrap().calls[0].clone();
    assert_eq!(action, "start");
    assert_eq!(body["room_id"], 1234);
    assert_eq!(body["user_id"], "tic_record_user_1234_01");
    assert_eq!(body["whiteboard"], json!({"width": 1280, "height": 720}));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn query_prints_the_answer_exactly_and_normalize_reads_it() {
    let (seen, base) = start_mock().await;
    let keys = format!("{APP}={KEY}");
    let (code, stdout, stderr) = tic_command(&base, &["query", "finished-task"], &keys).await;
    assert_eq!(code, 0, "{stderr}");
    assert!(stdout == finished_answer().as_bytes(), "byte for byte");
    // `lesson-replay tic query T | lesson-replay normalize -`
    let mut normalize = std::process::Command::new(env!("CARGO_BIN_EXE_lesson-replay"))
        .args(["normalize", "-", "--sdkappid", &APP.to_string()])
        .env_clear()
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    normalize.stdin.take().unwrap().write_all(&stdout).unwrap();
    let out = normalize.wait_with_output().unwrap();
    assert!(out.status.success());
    let record: Value = serde_json::from_slice(&out.stdout).unwrap();
    common::assert_valid_record(&record);
    assert_eq!(record["task_id"], "g68cee8e90jcq4ogg8jb");
    // Requests carry fresh randoms.
    let (stop, _, _) = tic_command(&base, &["stop", "t1"], &keys).await;
    assert_eq!(stop, 0);
    let randoms = seen.lock().unwrap().randoms.clone();
    assert_eq!(randoms.len(), 2);
    assert_ne!(randoms[0], randoms[1]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_error_code_is_a_clear_failure() {
    let (seen, base) = start_mock().await;
    for code in [20000, 20001, 20002, 20003, 20004, 20005, 20011] {
        let task = format!("e-{code}");
        let err = client(&base).query(&task).await.unwrap_err();
        assert_eq!(err.code(), Some(code), "{err}");
        assert!(!err.is_transient(), "{code} is not retried");
        assert_eq!(seen.lock().unwrap().per_task[&task], 1, "{code}: one call");
    }
    let keys = format!("{APP}={KEY}");
    let (status, stdout, stderr) = tic_command(&base, &["query", "e-20005"], &keys).await;
    assert_eq!(status, 1);
    assert!(stdout.is_empty());
    assert!(
        stderr.contains("TIC error 20005 (data read failed: check the task id"),
        "{stderr}"
    );
    assert!(!stderr.contains(KEY), "the key is never shown");
}

#[tokio::test]
async fn timeouts_and_server_errors_are_retried_with_backoff() {
    let (seen, base) = start_mock().await;
    // 500 twice, then the answer.
    let answer = client(&base).query("flaky").await.unwrap();
    assert_eq!(answer, finished_answer().as_bytes());
    assert_eq!(seen.lock().unwrap().per_task["flaky"], 3);
    // TIC's internal error is retried too, then given up.
    let err = client(&base).query("e-20099").await.unwrap_err();
    assert_eq!(err.code(), Some(20099));
    assert_eq!(
        seen.lock().unwrap().per_task["e-20099"],
        3,
        "all three attempts"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn set_callback_registers_and_deletes_and_the_app_is_chosen() {
    let (seen, base) = start_mock().await;
    let keys = format!("{APP}={KEY}");
    let url = "https://school.example/tic/callback";
    assert_eq!(tic_command(&base, &["set-callback", url], &keys).await.0, 0);
    assert_eq!(tic_command(&base, &["set-callback", ""], &keys).await.0, 0);
    let bodies: Vec<Value> = seen
        .lock()
        .unwrap()
        .calls
        .iter()
        .map(|(_, b)| b["callback"].clone())
        .collect();
    assert_eq!(bodies, [json!(url), json!("")]);
    // Several apps: the command asks which.
    let two = format!("{APP}={KEY},1400000001=OTHERKEY");
    let (status, _, stderr) = tic_command(&base, &["stop", "t"], &two).await;
    assert_eq!(status, 1);
    assert!(stderr.contains("choose one with --sdkappid"), "{stderr}");
    let chosen = ["--sdkappid", &APP.to_string(), "stop", "t"];
    assert_eq!(tic_command(&base, &chosen, &two).await.0, 0);
}

/// A failure to reach TIC never shows the signed URL: with it, anyone
/// reading the logs could call TIC as this app until the signature expires.
#[tokio::test]
async fn transport_errors_do_not_show_the_signature() {
    let closed = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let base = format!("http://{}/record/v1/online/", closed.local_addr().unwrap());
    drop(closed);
    let err = client(&base).query("t").await.unwrap_err();
    assert!(
        matches!(
            err,
            TicError::Transport {
                connected: false,
                ..
            }
        ),
        "{err}"
    );
    let shown = err.to_string();
    assert!(
        !shown.contains("sign=") && !shown.contains("random="),
        "{shown}"
    );
}

/// An answer far larger than any of the contract's is refused unread — not
/// held in memory, not printed — with its own exit code; one just under the
/// limit still passes.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_oversized_answer_is_refused_with_a_clear_error_and_exit_code() {
    use lesson_replay::tic::client::MAX_ANSWER_BYTES;
    let mock = TicMock::start().await;
    let padded = |len: usize| {
        let answer = json!({"error_code": 0, "task_id": "t", "status": "recording", "pad": ""});
        let bare = answer.to_string().len();
        let mut answer = answer;
        answer["pad"] = json!("x".repeat(len - bare));
        answer.to_string()
    };
    for (task, len) in [
        ("huge", 50 * MAX_ANSWER_BYTES),
        ("just-over", MAX_ANSWER_BYTES + 1),
        ("just-under", MAX_ANSWER_BYTES),
    ] {
        mock.script(
            task,
            TaskScript {
                finished: Some(padded(len)),
                ..TaskScript::default()
            },
        );
    }
    let answer = client(&mock.api_base).query("just-under").await.unwrap();
    assert_eq!(answer.len(), MAX_ANSWER_BYTES);
    for task in ["huge", "just-over"] {
        let err = client(&mock.api_base).query(task).await.unwrap_err();
        assert!(matches!(err, TicError::TooLarge { .. }), "{task}: {err}");
        assert!(!err.is_transient(), "not asked again");
        assert_eq!(mock.queries(task), 1);
    }
    let keys = format!("{APP}={KEY}");
    let (code, stdout, stderr) = tic_command(&mock.api_base, &["query", "huge"], &keys).await;
    assert_eq!(code, 76, "EX_PROTOCOL: {stderr}");
    assert!(stdout.is_empty(), "nothing of it printed");
    assert!(stderr.contains("larger than 1048576 bytes"), "{stderr}");
    assert!(stderr.len() < 1000, "the answer is not echoed");
}
