//! The delivery being handled, as its outcome's log lines and a
//! `lesson.replay_failed` event name it: its lesson, room and app once known,
//! and when its handler started. A task-local, set by [`super::delivery`].

use std::cell::RefCell;
use std::time::Instant;

/// The delivery being handled, for its log lines.
struct Handling {
    /// When its handler started: the `published` line says how long it took.
    started: Instant,
    /// The lesson it is about, once known: its outcome's log line carries
    /// `replay_id` and `task_id` as top-level fields, where log tools index
    /// them (JSON lines nest span fields); a `lesson.replay_failed` event
    /// carries them and the room.
    replay_id: Option<String>,
    task_id: Option<String>,
    room_id: Option<i64>,
    /// Its app, once known (its lane's, then its record's): the per-app metrics' label.
    app: Option<i64>,
}

/// Run `handler` as the handling of a delivery of app `app` (its lane's; `None`: not known yet).
pub(super) async fn scope<F: std::future::Future>(app: Option<i64>, handler: F) -> F::Output {
    let handling = Handling {
        started: Instant::now(),
        replay_id: None,
        task_id: None,
        room_id: None,
        app,
    };
    HANDLING.scope(RefCell::new(handling), handler).await
}

tokio::task_local! {
    static HANDLING: RefCell<Handling>;
}

pub(super) fn remember_lesson(
    replay_id: Option<&str>,
    task_id: Option<&str>,
    room_id: i64,
    app: Option<i64>,
) {
    let _ = HANDLING.try_with(|handling| {
        let mut handling = handling.borrow_mut();
        handling.replay_id = replay_id.map(str::to_owned);
        handling.task_id = task_id.map(str::to_owned);
        handling.room_id = Some(room_id);
        handling.app = app.or(handling.app);
    });
}

/// The room of the delivery being handled, when known.
pub(super) fn lesson_room() -> Option<i64> {
    HANDLING
        .try_with(|handling| handling.borrow().room_id)
        .ok()
        .flatten()
}

/// The app of the delivery being handled, when known.
pub(super) fn lesson_app() -> Option<i64> {
    HANDLING
        .try_with(|handling| handling.borrow().app)
        .ok()
        .flatten()
}

/// The `replay_id` and `task_id` of the delivery being handled, when known.
pub(super) fn lesson_ids() -> (Option<String>, Option<String>) {
    HANDLING
        .try_with(|handling| {
            let handling = handling.borrow();
            (handling.replay_id.clone(), handling.task_id.clone())
        })
        .unwrap_or_default()
}

/// Milliseconds since the handler of the current delivery started (to 0.01).
pub(super) fn handling_ms() -> Option<f64> {
    HANDLING
        .try_with(|handling| handling.borrow().started.elapsed())
        .ok()
        .map(|elapsed| (elapsed.as_secs_f64() * 1e5).round() / 100.0)
}
