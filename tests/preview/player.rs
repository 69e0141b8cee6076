//! The replay page as a viewer meets it, in Chromium: lessons whose tracks
//! carry a tone each (ffmpeg's `sine`), the page and its videos served from
//! one loopback origin. What the page sounds like is measured: a script run
//! before the page's own routes every media element through one WebAudio
//! analyser, whose input follows each element's `muted` and `volume`, and
//! the test reads the level at each track's tone. Clicks and keys are
//! trusted input events (DevTools `Input.*`), as a viewer's are.

use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Duration;

use serde_json::Value;

use super::common::browser::{Browser, Options};
use super::common::origin::{Faults, Origin, Withhold};
use super::{Lesson, Part, lesson, lesson_with_faults, scratch};

/// The listening tap, run before the page's scripts: every media element
/// that plays is routed (once) through one analyser; `__tap.levels([hz…])`
/// gives the level in dB at each frequency, loudest of five readings over
/// 200 ms.
const TAP: &str = r#"
(() => {
  let ctx = null, analyser = null;
  const routed = new WeakSet();
  const play = HTMLMediaElement.prototype.play;
  HTMLMediaElement.prototype.play = function () {
    if (!ctx) {
      ctx = new AudioContext();
      analyser = ctx.createAnalyser();
      analyser.fftSize = 8192;
      analyser.smoothingTimeConstant = 0;
      analyser.connect(ctx.destination);
    }
    if (!routed.has(this)) {
      routed.add(this);
      ctx.createMediaElementSource(this).connect(analyser);
    }
    ctx.resume();
    return play.call(this);
  };
  const read = (tones) => {
    const bins = new Float32Array(analyser.frequencyBinCount);
    analyser.getFloatFrequencyData(bins);
    const width = ctx.sampleRate / analyser.fftSize;
    // The strongest bin within 2 bins of the tone (AAC smears a little).
    return tones.map((hz) => {
      const at = Math.round(hz / width);
      return Math.max(...bins.slice(at - 2, at + 3));
    });
  };
  window.__tap = {
    async levels(tones) {
      if (!analyser) return tones.map(() => -Infinity);
      let loudest = tones.map(() => -Infinity);
      for (let i = 0; i < 5; i++) {
        loudest = read(tones).map((db, j) => Math.max(db, loudest[j]));
        await new Promise((r) => setTimeout(r, 40));
      }
      return loudest;
    },
  };
})();
"#;

/// A tone is heard above this level (dB in the analyser; a playing tone
/// reads about -45, silence below -140).
const HEARD_DB: f64 = -75.0;

fn voiced(id: &'static str, colour: &'static str, from: i64, to: i64, hz: u32) -> Part {
    Part {
        id,
        kind: 0,
        colour,
        from,
        to,
        tone: Some(hz),
    }
}

fn board(to: i64) -> Part {
    super::part("board", 2, "grey", 0, to)
}

/// The lesson's page, served by `origin` beside its videos: its URL.
fn serve_page(origin: &Origin, name: &str, lesson: &Lesson) -> String {
    origin.add(
        &format!("/{name}/index.html"),
        std::fs::read(&lesson.page).unwrap(),
        Faults::default(),
    )
}

async fn sound_browser() -> Browser {
    let mut browser = Browser::start_with(Options {
        autoplay_rule: true,
    })
    .await;
    browser.before_each_page(TAP).await;
    browser
}

/// Open `url` afresh (a page load, even when only `#t=` differs) and wait
/// until the player stands on its first frame.
async fn open(browser: &mut Browser, url: &str) {
    browser.open("about:blank").await;
    browser.open(url).await;
    browser.eval("lessonReplay.settled()").await;
}

/// Which of `tones` are heard now.
async fn heard(browser: &mut Browser, tones: &[u32]) -> Vec<u32> {
    let levels = browser
        .eval(&format!("__tap.levels({tones:?})"))
        .await
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v.as_f64().unwrap_or(f64::NEG_INFINITY))
        .collect::<Vec<_>>();
    tones
        .iter()
        .zip(levels)
        .filter(|(_, db)| *db > HEARD_DB)
        .map(|(hz, _)| *hz)
        .collect()
}

/// Wait (at most 30 s) until `condition` holds in the page.
async fn until(browser: &mut Browser, condition: &str) {
    let waited = browser
        .eval(&format!(
            "new Promise(r => {{ const end = performance.now() + 30000; \
             const t = () => ({condition}) ? r(true) : performance.now() > end ? r(false) : setTimeout(t, 20); t(); }})"
        ))
        .await;
    assert_eq!(waited, Value::Bool(true), "waited 30 s for {condition}");
}

async fn click_on(browser: &mut Browser, selector: &str) {
    let (x, y, w, h) = browser.rect(selector).await;
    assert!(w > 0.0 && h > 0.0, "{selector} is not shown");
    browser.click(x + w / 2.0, y + h / 2.0).await;
}

async fn number(browser: &mut Browser, script: &str) -> f64 {
    let value = browser.eval(script).await;
    value
        .as_f64()
        .unwrap_or_else(|| panic!("{script} gave {value}"))
}

async fn sleep(ms: u64) {
    tokio::time::sleep(Duration::from_millis(ms)).await;
}

/// The largest distance (ms) between the lesson clock and a playing
/// track's own time, over the tracks on the timeline now.
const DRIFT: &str = "(() => { const t = lessonReplay.time(); \
  const offsets = Object.fromEntries(JSON.parse(document.getElementById('record').textContent)\
    .tracks.map(k => [k.track_id, k.offset_ms])); \
  return Math.max(0, ...[...document.querySelectorAll('#stage video')] \
    .filter(v => !v.paused).map(v => Math.abs(offsets[v.dataset.track] + v.currentTime * 1000 - t))); })()";

/// Every playing track is within [`DRIFT_MS`] of the lesson clock.
async fn assert_on_clock(browser: &mut Browser, when: &str) {
    let drift = number(browser, DRIFT).await;
    assert!(
        drift < DRIFT_MS,
        "{when}: a track is {drift} ms off the clock"
    );
}

/// The teacher (440 Hz) speaks all lesson; a student (550 Hz) from 0:04 to
/// 0:10; the whiteboard is silent.
fn class(origin: &Origin, name: &str) -> (Lesson, String) {
    class_of(origin, name, 20, (4, 10))
}

/// A class of `seconds` whose student speaks from `student.0` to `student.1` s.
fn class_of(origin: &Origin, name: &str, seconds: i64, student: (i64, i64)) -> (Lesson, String) {
    let lesson = lesson(
        name,
        &[
            board(seconds),
            voiced("teacher", "red", 0, seconds, TEACHER),
            voiced("student", "green", student.0, student.1, STUDENT),
        ],
        origin,
        &scratch(),
    );
    let url = serve_page(origin, name, &lesson);
    (lesson, url)
}

/// A track this far (ms) from the clock is off it: the player re-seeks past
/// 250 ms at its next frame, and a reading may fall between two frames.
const DRIFT_MS: f64 = 400.0;

const TEACHER: u32 = 440;
const STUDENT: u32 = 550;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn one_click_plays_every_voice_on_the_timeline_and_refused_sound_is_told() {
    let origin = Origin::start().await;
    let (_, url) = class(&origin, "sound");
    let mut browser = sound_browser().await;
    open(&mut browser, &url).await;
    let tones = [TEACHER, STUDENT];

    // No gesture yet: the browser refuses sound, and the page says so
    // instead of playing silent.
    browser.eval("lessonReplay.play()").await;
    until(
        &mut browser,
        "!document.getElementById('notice').hidden && !lessonReplay.playing()",
    )
    .await;
    sleep(300).await;
    assert_eq!(heard(&mut browser, &tones).await, Vec::<u32>::new());
    assert_eq!(number(&mut browser, "lessonReplay.time()").await, 0.0);

    // One real click: the teacher is heard, the student (not yet on the
    // timeline) is not.
    click_on(&mut browser, "#notice-play").await;
    until(&mut browser, "lessonReplay.time() >= 1500").await;
    assert_eq!(
        browser
            .eval("document.getElementById('notice').hidden")
            .await,
        Value::Bool(true)
    );
    assert_eq!(
        heard(&mut browser, &tones).await,
        vec![TEACHER],
        "at 0:01.5"
    );

    // The student's track starts later: the first click unlocked it too.
    until(&mut browser, "lessonReplay.time() >= 5500").await;
    assert_eq!(
        heard(&mut browser, &tones).await,
        vec![TEACHER, STUDENT],
        "at 0:05.5"
    );

    // Past the student's span (key 6: 60 % = 0:12), they fall silent.
    browser.press("6").await;
    until(&mut browser, "lessonReplay.time() >= 12500").await;
    assert_eq!(
        heard(&mut browser, &tones).await,
        vec![TEACHER],
        "at 0:12.5"
    );

    // Mute and unmute (the button), volume down to nothing and up (keys).
    click_on(&mut browser, "#mute").await;
    sleep(300).await;
    assert_eq!(
        heard(&mut browser, &tones).await,
        Vec::<u32>::new(),
        "muted"
    );
    assert_eq!(
        browser.eval("lessonReplay.playing()").await,
        Value::Bool(true)
    );
    browser.press("m").await;
    sleep(300).await;
    assert_eq!(heard(&mut browser, &tones).await, vec![TEACHER], "unmuted");
    for _ in 0..10 {
        browser.press("ArrowDown").await;
    }
    assert_eq!(number(&mut browser, "lessonReplay.volume()").await, 0.0);
    sleep(300).await;
    assert_eq!(
        heard(&mut browser, &tones).await,
        Vec::<u32>::new(),
        "volume 0"
    );
    browser.press("ArrowUp").await;
    sleep(300).await;
    assert_eq!(
        heard(&mut browser, &tones).await,
        vec![TEACHER],
        "volume 0.1"
    );

    // Paused: nothing is heard.
    browser.press("k").await;
    sleep(300).await;
    assert_eq!(
        browser.eval("lessonReplay.playing()").await,
        Value::Bool(false)
    );
    assert_eq!(
        heard(&mut browser, &tones).await,
        Vec::<u32>::new(),
        "paused"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn where_one_voice_may_sound_the_main_speaker_is_heard() {
    let origin = Origin::start().await;
    let (_, url) = class(&origin, "one-voice");
    let mut browser = sound_browser().await;
    browser
        .call(
            "Emulation.setUserAgentOverride",
            serde_json::json!({"userAgent": "Mozilla/5.0 (iPhone; CPU iPhone OS 17_5 like Mac OS X) AppleWebKit/605.1.15 (KHTML, like Gecko) Version/17.5 Mobile/15E148 Safari/604.1"}),
        )
        .await;
    open(&mut browser, &format!("{url}#t=5000")).await;
    click_on(&mut browser, "#play").await;
    until(&mut browser, "lessonReplay.time() >= 6000").await;
    assert_eq!(
        heard(&mut browser, &[TEACHER, STUDENT]).await,
        vec![TEACHER],
        "an iPhone sounds one element: the teacher's, the first camera"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn speed_moves_every_track_with_the_clock_at_the_same_pitch() {
    let origin = Origin::start().await;
    let (_, url) = class_of(&origin, "speed", 40, (0, 40));
    let mut browser = sound_browser().await;
    open(&mut browser, &url).await;
    click_on(&mut browser, "#play").await;
    until(&mut browser, "lessonReplay.time() >= 1000").await;
    // 1 → 1.25 → 1.5 by key, then 2 from the list.
    for (keys, rate) in [(2, 1.5), (0, 2.0)] {
        for _ in 0..keys {
            browser.press(">").await;
        }
        if keys == 0 {
            browser
                .eval("(() => { const s = document.getElementById('speed'); s.value = '2'; s.dispatchEvent(new Event('change')); })()")
                .await;
        }
        assert_eq!(number(&mut browser, "lessonReplay.rate()").await, rate);
        sleep(500).await;
        // Lesson seconds and each track's own seconds, per wall second.
        // Over 3 s without a wait for data (a wait stops the clock by
        // design: the window is measured again, at most three times).
        let mut measured = Value::Null;
        for _ in 0..3 {
            measured = browser
                .eval(
                    "(async () => { const vs = [...document.querySelectorAll('#stage video')]; \
                     const t0 = lessonReplay.time(), w0 = performance.now(), m0 = vs.map(v => v.currentTime); \
                     let waited = false; const end = w0 + 3000; \
                     while (performance.now() < end) { waited ||= lessonReplay.waiting(); await new Promise(r => setTimeout(r, 50)); } \
                     const wall = (performance.now() - w0) / 1000; \
                     return waited ? null : [(lessonReplay.time() - t0) / 1000 / wall, ...vs.map((v, i) => (v.currentTime - m0[i]) / wall)]; })()",
                )
                .await;
            if !measured.is_null() {
                break;
            }
        }
        assert!(
            !measured.is_null(),
            "at {rate}x the player waited for data in every window"
        );
        for (i, speed) in measured.as_array().unwrap().iter().enumerate() {
            let speed = speed.as_f64().unwrap();
            assert!(
                (speed - rate).abs() < rate * 0.08,
                "at {rate}x, {} moved {speed:.3} s a second",
                if i == 0 {
                    "the clock".into()
                } else {
                    format!("video {i}")
                }
            );
        }
        assert_on_clock(&mut browser, &format!("at {rate}x")).await;
        // The pitch is kept: the teacher still sounds at 440 Hz, not higher.
        let faster = (f64::from(TEACHER) * rate) as u32;
        assert_eq!(
            heard(&mut browser, &[TEACHER, STUDENT, faster]).await,
            vec![TEACHER, STUDENT],
            "at {rate}x"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_track_out_of_data_stops_the_clock_until_every_track_can_play() {
    let origin = Origin::start().await;
    // The student's bytes stop at 40 % of the file (about 0:12) until released.
    let shut = Arc::new(AtomicBool::new(true));
    let gate = shut.clone();
    let lesson = lesson_with_faults(
        "stall",
        &[
            voiced("teacher", "red", 0, 30, TEACHER),
            voiced("student", "green", 0, 30, STUDENT),
        ],
        &origin,
        &scratch(),
        move |part, size| Faults {
            withhold: (part.id == "student").then(|| Withhold {
                from: size as u64 * 4 / 10,
                shut: gate.clone(),
            }),
            ..Faults::default()
        },
    );
    let url = serve_page(&origin, "stall", &lesson);
    let mut browser = Browser::start().await;
    open(&mut browser, &format!("{url}#t=8000")).await;
    // Every seek from now on, with how far its video had played before it.
    browser
        .eval(
            "window.seeks = []; for (const v of document.querySelectorAll('#stage video')) { \
               v.shown = v.currentTime; \
               v.addEventListener('timeupdate', () => { if (!v.seeking) v.shown = Math.max(v.shown, v.currentTime); }); \
               v.addEventListener('seeking', () => seeks.push([v.dataset.track, v.currentTime, v.shown])); } 1",
        )
        .await;
    browser.eval("lessonReplay.play()").await;
    // (Play itself may wait a moment for the tracks: the stall is later.)
    until(
        &mut browser,
        "lessonReplay.waiting() && lessonReplay.time() > 9500",
    )
    .await;
    let stood = number(&mut browser, "lessonReplay.time()").await;
    assert!(
        (9_000.0..20_000.0).contains(&stood),
        "the clock stood at {stood} ms"
    );
    assert_eq!(
        browser
            .eval("document.getElementById('status').textContent")
            .await,
        Value::String("Buffering…".into()),
        "the page says it is buffering"
    );
    sleep(3000).await;
    assert_eq!(
        number(&mut browser, "lessonReplay.time()").await,
        stood,
        "the clock moved while the student's bytes were withheld"
    );
    assert_eq!(
        browser
            .eval("[...document.querySelectorAll('#stage video')].every(v => v.paused)")
            .await,
        Value::Bool(true),
        "every track pauses while one waits"
    );

    shut.store(false, Ordering::SeqCst);
    until(
        &mut browser,
        &format!("lessonReplay.time() >= {}", stood + 2000.0),
    )
    .await;
    assert_eq!(
        browser.eval("lessonReplay.waiting()").await,
        Value::Bool(false)
    );
    assert_on_clock(&mut browser, "after the stall").await;
    // No track was sent past what it had shown: nothing said was skipped.
    let seeks = browser.eval("seeks").await;
    for seek in seeks.as_array().unwrap() {
        let (to, shown) = (seek[1].as_f64().unwrap(), seek[2].as_f64().unwrap());
        assert!(
            to <= shown + 0.3,
            "{} was seeked to {to:.2} s having shown {shown:.2} s (all seeks: {seeks})",
            seek[0]
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn keys_drive_the_player_and_tab_reaches_every_control() {
    let origin = Origin::start().await;
    let lesson = lesson(
        "keys",
        &[board(60), voiced("teacher", "red", 0, 60, TEACHER)],
        &origin,
        &scratch(),
    );
    let url = serve_page(&origin, "keys", &lesson);
    let mut browser = Browser::start().await;
    open(&mut browser, &format!("{url}#t=20000")).await;

    // Play/pause: k, and Space, once even with the Play button focused.
    browser.press("k").await;
    assert_eq!(
        browser.eval("lessonReplay.playing()").await,
        Value::Bool(true)
    );
    browser.press("k").await;
    assert_eq!(
        browser.eval("lessonReplay.playing()").await,
        Value::Bool(false)
    );
    click_on(&mut browser, "#play").await;
    assert_eq!(
        browser.eval("lessonReplay.playing()").await,
        Value::Bool(true)
    );
    browser.press(" ").await;
    sleep(100).await;
    assert_eq!(
        browser.eval("lessonReplay.playing()").await,
        Value::Bool(false),
        "Space on the focused Play button toggles once"
    );
    // Space on another button presses that button; arrows on the lesson
    // time are the page's 5 s steps.
    click_on(&mut browser, "#mute").await;
    assert_eq!(
        browser.eval("lessonReplay.muted()").await,
        Value::Bool(true)
    );
    browser.press(" ").await;
    assert_eq!(
        browser.eval("lessonReplay.muted()").await,
        Value::Bool(false)
    );
    assert_eq!(
        browser.eval("lessonReplay.playing()").await,
        Value::Bool(false)
    );
    browser
        .eval("document.getElementById('seek').focus()")
        .await;
    let before = number(&mut browser, "lessonReplay.time()").await;
    browser.press("ArrowRight").await;
    assert_eq!(
        number(&mut browser, "lessonReplay.time()").await - before,
        5_000.0,
        "→ on the focused lesson time"
    );

    // Seeking by keys, paused: ← → 5 s, j l 10 s, digits to tenths.
    browser.press("3").await;
    assert_eq!(number(&mut browser, "lessonReplay.time()").await, 18_000.0);
    for (key, step) in [
        ("ArrowRight", 5_000.0),
        ("ArrowLeft", -5_000.0),
        ("l", 10_000.0),
        ("j", -10_000.0),
    ] {
        let before = number(&mut browser, "lessonReplay.time()").await;
        browser.press(key).await;
        assert_eq!(
            number(&mut browser, "lessonReplay.time()").await - before,
            step,
            "{key}"
        );
    }
    browser.press("0").await;
    assert_eq!(number(&mut browser, "lessonReplay.time()").await, 0.0);

    // Volume, mute, speed, the keys' list.
    browser.press("ArrowDown").await;
    assert_eq!(number(&mut browser, "lessonReplay.volume()").await, 0.9);
    browser.press("ArrowUp").await;
    assert_eq!(number(&mut browser, "lessonReplay.volume()").await, 1.0);
    browser.press("m").await;
    assert_eq!(
        browser.eval("lessonReplay.muted()").await,
        Value::Bool(true)
    );
    assert_eq!(
        browser
            .eval("[...document.querySelectorAll('#stage video')].every(v => v.muted)")
            .await,
        Value::Bool(true)
    );
    browser.press("M").await;
    assert_eq!(
        browser.eval("lessonReplay.muted()").await,
        Value::Bool(false)
    );
    browser.press(">").await;
    assert_eq!(number(&mut browser, "lessonReplay.rate()").await, 1.25);
    browser.press("<").await;
    browser.press("<").await;
    assert_eq!(number(&mut browser, "lessonReplay.rate()").await, 0.75);
    browser.press("?").await;
    assert_eq!(
        browser.eval("document.getElementById('keys').hidden").await,
        Value::Bool(false)
    );
    browser.press("Escape").await;
    assert_eq!(
        browser.eval("document.getElementById('keys').hidden").await,
        Value::Bool(true)
    );

    // Full screen: the player, and back.
    browser.press("f").await;
    until(&mut browser, "document.fullscreenElement?.id === 'player'").await;
    browser.press("f").await;
    until(&mut browser, "document.fullscreenElement === null").await;

    // Typing in a field is typing, not a command.
    browser
        .eval("(() => { const i = document.createElement('input'); i.id = 'note'; document.body.prepend(i); i.focus(); })()")
        .await;
    browser.press("k").await;
    browser.press("5").await;
    assert_eq!(
        browser.eval("lessonReplay.playing()").await,
        Value::Bool(false)
    );
    assert_eq!(number(&mut browser, "lessonReplay.time()").await, 0.0);
    assert_eq!(
        browser.eval("document.getElementById('note').value").await,
        Value::String("k5".into())
    );
    browser
        .eval("document.getElementById('note').remove()")
        .await;

    // Tab walks the controls in order, each labelled, each focus visible.
    browser.eval("document.activeElement.blur()").await;
    let mut walked = Vec::new();
    for _ in 0..7 {
        browser.press("Tab").await;
        let focused = browser
            .eval(
                "(() => { const e = document.activeElement; const s = getComputedStyle(e); \
                 return [e.id, e.getAttribute('aria-label') || '', s.outlineStyle, parseFloat(s.outlineWidth)]; })()",
            )
            .await;
        assert!(
            !focused[1].as_str().unwrap().is_empty(),
            "{focused}: no label"
        );
        assert!(
            focused[2] != "none" && focused[3].as_f64().unwrap() >= 2.0,
            "{focused}: no visible focus"
        );
        walked.push(focused[0].as_str().unwrap().to_owned());
    }
    assert_eq!(
        walked,
        [
            "play",
            "seek",
            "mute",
            "volume",
            "speed",
            "fullscreen",
            "keys-button"
        ]
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn on_a_phone_the_stage_takes_the_width_and_controls_take_a_thumb() {
    let origin = Origin::start().await;
    let (lesson, url) = class(&origin, "phone");
    let mut browser = Browser::start().await;
    browser.viewport(375, 667, true).await;
    open(&mut browser, &format!("{url}#t=5000")).await;
    let (x, _, w, h) = browser.rect("#stage").await;
    assert!(
        x.abs() < 1.0 && (w - 375.0).abs() < 1.0,
        "the stage is {w} px wide at x {x}"
    );
    assert!((w / h - 16.0 / 9.0).abs() < 0.02, "the stage is {w}x{h}");
    let width = number(&mut browser, "document.documentElement.scrollWidth").await;
    assert!(width <= 375.0, "the page scrolls sideways: {width} px");
    // Every control shown is within the screen and at least 44 px to touch.
    let controls = browser
        .eval(
            "[...document.querySelectorAll('.controls button, .controls select, .controls input')] \
             .filter(e => e.offsetParent !== null).map(e => { const r = e.getBoundingClientRect(); \
             return [e.id, r.left, r.right, r.width, r.height]; })",
        )
        .await;
    let controls = controls.as_array().unwrap();
    assert!(controls.len() >= 5, "{controls:?}");
    for c in controls {
        let n = |i: usize| c[i].as_f64().unwrap();
        assert!(n(1) >= 0.0 && n(2) <= 375.0, "{c} is off screen");
        assert!(n(4) >= 44.0, "{c} is less than 44 px high");
        if c[0] != "seek" {
            assert!(n(3) >= 44.0, "{c} is less than 44 px wide");
        }
    }
    // The clock is on screen; the facts come below the player.
    let (cx, _, cw, _) = browser.rect("#clock").await;
    assert!(cx >= 0.0 && cx + cw <= 375.0, "the clock is off screen");
    let (_, py, _, ph) = browser.rect("#player").await;
    let (_, fy, _, _) = browser.rect("#facts").await;
    assert!(fy >= py + ph, "the facts are beside the player, not below");
    assert_eq!(
        browser
            .eval("[...document.querySelectorAll('#stage video')].every(v => v.hasAttribute('playsinline'))")
            .await,
        Value::Bool(true)
    );
    // What the phone shows: the lesson's picture as on a desktop.
    let stage = browser.rect("#stage").await;
    super::check_picture(&browser.screenshot(stage).await, &lesson, 5_000, "phone");
    if let Ok(dir) = std::env::var("LESSON_REPLAY_SAVE_SCREENSHOTS") {
        let png = browser.screenshot_png(Some((0.0, 0.0, 375.0, 667.0))).await;
        std::fs::write(std::path::Path::new(&dir).join("phone.png"), png).unwrap();
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_lesson_left_part_way_is_offered_where_it_was_left() {
    let origin = Origin::start().await;
    let (_, url) = class(&origin, "resume");
    let mut browser = Browser::start().await;
    // Nothing to resume on a first visit.
    open(&mut browser, &url).await;
    let offered = "!document.getElementById('resume').hidden";
    assert_eq!(browser.eval(offered).await, Value::Bool(false));
    // Watched to 0:07, then the page is left.
    browser.eval("lessonReplay.seek(6000)").await;
    browser.eval("lessonReplay.play()").await;
    until(&mut browser, "lessonReplay.time() >= 7000").await;
    browser.eval("lessonReplay.pause()").await;
    let left = number(&mut browser, "lessonReplay.time()").await;
    open(&mut browser, &url).await;
    assert_eq!(browser.eval(offered).await, Value::Bool(true));
    let label = browser
        .eval("document.getElementById('resume-play').textContent")
        .await;
    let seconds = (left / 1000.0) as u64;
    assert_eq!(label, Value::String(format!("Resume at 0:{seconds:02}")));
    assert_eq!(number(&mut browser, "lessonReplay.time()").await, 0.0);
    click_on(&mut browser, "#resume-play").await;
    assert_eq!(
        browser.eval("lessonReplay.playing()").await,
        Value::Bool(true)
    );
    let at = number(&mut browser, "lessonReplay.time()").await;
    assert!((at - left).abs() < 300.0, "resumed at {at}, left at {left}");
    // A moment asked for in the address wins.
    open(&mut browser, &format!("{url}#t=3000")).await;
    assert_eq!(browser.eval(offered).await, Value::Bool(false));
    assert_eq!(number(&mut browser, "lessonReplay.time()").await, 3000.0);
    // Left in the last 10 s: nothing is offered.
    browser.eval("lessonReplay.seek(15000)").await;
    browser.eval("lessonReplay.play()").await;
    until(&mut browser, "lessonReplay.time() >= 15500").await;
    browser.eval("lessonReplay.pause()").await;
    open(&mut browser, &url).await;
    assert_eq!(browser.eval(offered).await, Value::Bool(false));
}

/// A viewer listening with the tab in the background: a voice that starts
/// while the tab is hidden is heard, and shown again every track is on the
/// clock.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_hidden_tab_goes_on_by_ear_and_shown_again_every_track_is_on_the_clock() {
    let origin = Origin::start().await;
    let (_, url) = class_of(&origin, "hidden-tab", 20, (4, 16));
    let mut browser = sound_browser().await;
    open(&mut browser, &format!("{url}#t=1000")).await;
    click_on(&mut browser, "#play").await;
    until(&mut browser, "lessonReplay.time() >= 1500").await;
    browser.other_tab().await;
    until(&mut browser, "document.visibilityState === 'hidden'").await;
    // The student's track starts at 0:04, while the tab is hidden (whose
    // timers the browser slows to one a second: 3 s of margin on a busy machine).
    until(&mut browser, "lessonReplay.time() >= 7000").await;
    assert_eq!(
        browser.eval("document.visibilityState").await,
        Value::String("hidden".into())
    );
    assert_eq!(
        heard(&mut browser, &[TEACHER, STUDENT]).await,
        vec![TEACHER, STUDENT],
        "hidden, at 0:07"
    );
    browser.bring_to_front().await;
    until(
        &mut browser,
        "document.visibilityState === 'visible' && !lessonReplay.waiting()",
    )
    .await;
    assert_eq!(
        browser.eval("lessonReplay.playing()").await,
        Value::Bool(true)
    );
    assert_on_clock(&mut browser, "after the tab came back").await;
    // Every track on the timeline now plays.
    let idle = browser
        .eval(
            "(() => { const t = lessonReplay.time(); \
             const tracks = JSON.parse(document.getElementById('record').textContent).tracks; \
             return tracks.filter(k => k.offset_ms <= t && t < k.offset_ms + k.duration_ms) \
               .map(k => document.querySelector(`#stage video[data-track=\"${k.track_id}\"]`)) \
               .filter(v => v.paused).map(v => v.dataset.track); })()",
        )
        .await;
    assert_eq!(
        idle,
        serde_json::json!([]),
        "tracks on the timeline, paused"
    );
}

/// A file that ends before its declared span (a probe within 2 % keeps the
/// declared duration; a track may be a minute short in an hour): the track
/// falls silent where its file ends, is not played again from its start,
/// and the lesson does not wait for it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_file_shorter_than_its_span_ends_without_replaying_or_stalling() {
    let origin = Origin::start().await;
    let (_, url) = class_of(&origin, "short", 12, (0, 12));
    // The teacher's file holds 7 s of the 12 the record declares.
    let short = super::make_video(&scratch(), "red", 7, Some(TEACHER));
    origin.add("/short/teacher.mp4", short, Faults::default());
    let mut browser = sound_browser().await;
    open(&mut browser, &format!("{url}#t=5000")).await;
    browser
        .eval(
            "window.rewound = []; window.waited = false; \
             const v = document.querySelector('#stage video[data-track=\"teacher\"]'); \
             v.addEventListener('seeking', () => rewound.push(v.currentTime)); \
             setInterval(() => { if (lessonReplay.time() > 7500) waited ||= lessonReplay.waiting(); }, 20); 1",
        )
        .await;
    click_on(&mut browser, "#play").await;
    until(&mut browser, "lessonReplay.time() >= 9500").await;
    assert_eq!(
        heard(&mut browser, &[TEACHER, STUDENT]).await,
        vec![STUDENT],
        "at 0:09.5, past the end of the teacher's file"
    );
    assert_eq!(
        browser.eval("waited").await,
        Value::Bool(false),
        "the lesson waited for a track whose file had ended"
    );
    let rewound = browser.eval("rewound").await;
    assert!(
        rewound
            .as_array()
            .unwrap()
            .iter()
            .all(|t| t.as_f64().unwrap() >= 4.9),
        "the teacher's track was played again from earlier: seeks {rewound}"
    );
}
