//! The fixture files and the message builders every test and the benchmark
//! share: one `record_finished` callback shape, one video entry shape.

use serde_json::{Value, json};

/// A 2 s, 320×240 MP4 whose `moov` comes first.
pub const FASTSTART: &[u8] = include_bytes!("../fixtures/faststart-2s-320x240.mp4");
/// A 5 s, 160×120 MP4 whose `moov` comes last.
pub const MOOV_AT_END: &[u8] = include_bytes!("../fixtures/moov-at-end-5s-160x120.mp4");

/// One entry of `video_info` (contract §4.5): `kind` is TIC's `video_type`
/// (0 camera, 1 screen share, 2 whiteboard, 3 mixed).
pub fn video(
    url: &str,
    id: &str,
    kind: i64,
    user: &str,
    size: usize,
    duration_ms: i64,
    offset_ms: i64,
) -> Value {
    json!({"video_play_time": offset_ms, "video_size": size, "video_format": "mp4",
           "video_duration": duration_ms, "video_url": url, "video_id": id, "video_type": kind,
           "user_id": user})
}

/// A `record_finished` callback of a 10 s lesson in `room` with `videos`.
pub fn finished(task: &str, room: i64, videos: Vec<Value>) -> Vec<u8> {
    serde_json::to_vec(&json!({
        "callback_type": "record_finished", "error_code": 0, "error_msg": "", "expire_time": 1700000600,
        "timestamp": 1700000500, "task_id": task, "room_id": room, "group_id": room.to_string(),
        "record_user_id": format!("tic_record_user_{room}_1"), "start_time": 1700000000,
        "stop_time": 1700000010, "video_info": videos
    }))
    .expect("a message serializes")
}

/// A lesson with one 2 s camera track of `size` bytes at `url`, its id the task's.
pub fn one_camera(task: &str, room: i64, url: &str, size: usize) -> Vec<u8> {
    finished(task, room, vec![video(url, task, 0, "t", size, 2000, 0)])
}
