//! A mock of TIC on loopback, for the TIC client, the watches and the
//! ingress: its API checks every request the way TIC does (the signature with
//! the contract's test key, the URL parameters), answers `query` from a script
//! per task (still recording for a while, failing for a while, unknown), and
//! it sends TIC's callbacks itself, over HTTP, like TIC.

use std::collections::HashMap;
use std::sync::{Arc, Mutex};

use axum::Router;
use axum::extract::{Path, Query, State};
use axum::http::StatusCode;
use axum::routing::post;
use lesson_replay::decision::verify::compute_sign;
use serde_json::{Value, json};

/// The contract's test key (§1) and the app it belongs to.
pub const KEY: &str = "9016607A382749C69D4F4B00C61DD083";
pub const APP: i64 = 1400042982;

/// How the mock answers `query` for one task.
#[derive(Debug, Clone, Default)]
pub struct TaskScript {
    /// Answer HTTP 500 to this many queries first.
    pub fail_first: usize,
    /// Then answer status `recording` to this many.
    pub recording_first: usize,
    /// Then this finished answer (a JSON body); `None`: error 20005.
    pub finished: Option<String>,
}

#[derive(Default)]
pub struct Seen {
    /// (action, body) of every request that passed the checks.
    pub calls: Vec<(String, Value)>,
    /// Calls per task id.
    pub per_task: HashMap<String, usize>,
    /// Every `random`.
    pub randoms: Vec<u32>,
    pub scripts: HashMap<String, TaskScript>,
}

/// The running mock.
#[derive(Clone)]
pub struct TicMock {
    pub seen: Arc<Mutex<Seen>>,
    /// What `tic_api_base` must be set to.
    pub api_base: String,
}

impl TicMock {
    pub async fn start() -> TicMock {
        let seen: Arc<Mutex<Seen>> = Arc::default();
        let app = Router::new()
            .route("/record/v1/online/{action}", post(api))
            .with_state(seen.clone());
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let api_base = format!(
            "http://{}/record/v1/online/",
            listener.local_addr().unwrap()
        );
        tokio::spawn(async move { axum::serve(listener, app).await });
        TicMock { seen, api_base }
    }

    /// Script the answers to `query` for `task`.
    pub fn script(&self, task: &str, script: TaskScript) {
        self.seen
            .lock()
            .unwrap()
            .scripts
            .insert(task.to_owned(), script);
    }

    /// Queries of `task` so far.
    pub fn queries(&self, task: &str) -> usize {
        self.seen
            .lock()
            .unwrap()
            .per_task
            .get(task)
            .copied()
            .unwrap_or(0)
    }

    /// Send a callback to `url` as TIC does (signed URL parameters); the answer's status.
    pub async fn send_callback(&self, url: &str, body: &Value) -> u16 {
        let expire = body["expire_time"].as_i64().unwrap_or(0);
        let query = format!(
            "?sdkappid={APP}&sign={}&random=7",
            compute_sign(KEY, expire)
        );
        reqwest::Client::new()
            .post(format!("{url}{query}"))
            .json(body)
            .send()
            .await
            .map_or(0, |r| r.status().as_u16())
    }
}

/// TIC's `record_started` callback for `task`.
pub fn record_started(task: &str, room: i64, start: i64) -> Value {
    json!({"callback_type": "record_started", "error_code": 0, "error_msg": "", "task_id": task,
           "room_id": room, "group_id": room.to_string(), "record_user_id": format!("tic_record_user_{room}_1"),
           "expire_time": start + 600, "timestamp": start})
}

/// TIC's `record_finished` callback: `finished` (a query answer) as a callback.
pub fn record_finished(finished: &Value) -> Value {
    let mut callback = finished.clone();
    let map = callback.as_object_mut().unwrap();
    map.remove("status");
    let stop = map["stop_time"].as_i64().unwrap_or(0);
    map.insert("callback_type".into(), json!("record_finished"));
    map.insert("expire_time".into(), json!(stop + 600));
    map.insert("timestamp".into(), json!(stop));
    callback
}

/// A finished query answer for `task`: one camera video at `url` of `size` bytes.
pub fn finished_answer(task: &str, room: i64, start: i64, url: &str, size: usize) -> Value {
    json!({"error_code": 0, "error_msg": "", "task_id": task, "status": "finished",
           "room_id": room, "group_id": room.to_string(),
           "record_user_id": format!("tic_record_user_{room}_1"),
           "start_time": start, "stop_time": start + 10,
           "video_info": [{"video_play_time": 0, "video_size": size, "video_format": "mp4",
                           "video_duration": 2000, "video_url": url, "video_id": format!("{task}-v"),
                           "video_type": 0, "user_id": "teacher"}]})
}

async fn api(
    State(seen): State<Arc<Mutex<Seen>>>,
    Path(action): Path<String>,
    Query(params): Query<HashMap<String, String>>,
    body: axum::body::Bytes,
) -> (StatusCode, String) {
    let answer = |v: Value| (StatusCode::OK, v.to_string());
    let Ok(body) = serde_json::from_slice::<Value>(&body) else {
        return answer(json!({"error_code": 20003, "error_msg": "body is not JSON"}));
    };
    let expire = body["expire_time"].as_i64().unwrap_or(0);
    let now = time::OffsetDateTime::now_utc().unix_timestamp();
    if params.get("sdkappid").map(String::as_str) != Some(&APP.to_string()) {
        return answer(json!({"error_code": 20003, "error_msg": "sdkappid"}));
    }
    if params.get("sign") != Some(&compute_sign(KEY, expire)) {
        return answer(json!({"error_code": 20002, "error_msg": "sign invalid"}));
    }
    if expire < now {
        return answer(json!({"error_code": 20001, "error_msg": "sign expired"}));
    }
    let Some(random) = params.get("random").and_then(|r| r.parse::<u32>().ok()) else {
        return answer(json!({"error_code": 20003, "error_msg": "random"}));
    };
    let task = body["task_id"].as_str().unwrap_or_default().to_owned();
    let (calls, script) = {
        let mut seen = seen.lock().unwrap();
        seen.randoms.push(random);
        seen.calls.push((action.clone(), body.clone()));
        let n = seen.per_task.entry(task.clone()).or_default();
        *n += 1;
        let calls = *n;
        (calls, seen.scripts.get(&task).cloned())
    };
    match (action.as_str(), task.as_str(), script) {
        ("start", _, _) => {
            answer(json!({"error_code": 0, "error_msg": "", "task_id": "new-task-1"}))
        }
        ("query" | "stop", code, _) if code.starts_with("e-") => {
            let code: i64 = code[2..].parse().unwrap();
            answer(json!({"error_code": code, "error_msg": "as the contract says"}))
        }
        ("query", _, Some(script)) => {
            if calls <= script.fail_first {
                return (StatusCode::INTERNAL_SERVER_ERROR, "busy".into());
            }
            if calls <= script.fail_first + script.recording_first {
                return answer(json!({"error_code": 0, "error_msg": "", "task_id": task,
                                     "status": "recording", "room_id": 1, "start_time": now}));
            }
            match script.finished {
                Some(text) => (StatusCode::OK, text),
                None => answer(json!({"error_code": 20005, "error_msg": "data read failed"})),
            }
        }
        ("query", _, None) => answer(json!({"error_code": 20005, "error_msg": "data read failed"})),
        ("stop" | "callback", _, _) => answer(json!({"error_code": 0, "error_msg": ""})),
        _ => answer(json!({"error_code": 20003, "error_msg": "unknown"})),
    }
}
