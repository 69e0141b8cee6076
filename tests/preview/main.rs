//! The replay page in a real browser: headless Chromium plays lessons made of
//! ffmpeg-made videos, each a solid colour of its own with a frame counter,
//! from a loopback HTTP origin. At several moments of each lesson the page is opened at that time
//! (`#t=`), and the colour inside every rectangle the record's layout gives
//! for that moment (main and each tile) is checked in a screenshot, as is
//! that no track that should be hidden shows anywhere. Play, pause and a
//! click on the timeline are checked the same way.
//!
//! `player.rs` plays lessons that carry sound, a tone per track, and checks
//! what a viewer hears and does: sound after one click, speed, stalls, keys,
//! a phone's screen, resume, a tab shown again.

#[path = "../common/mod.rs"]
mod common;
mod player;

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::process::Command;

use common::browser::{Browser, Shot};
use common::messages::{finished, video};
use common::origin::{Faults, Origin};
use common::{isolated_config, lesson_replay};
use lesson_replay::decision::decide::{Decision, Envelope, decide};
use serde_json::Value;

/// Far apart in at least one channel by more than twice [`TOLERANCE`].
const COLOURS: [(&str, [u8; 3]); 14] = [
    ("red", [255, 0, 0]),
    ("green", [0, 255, 0]),
    ("blue", [0, 0, 255]),
    ("yellow", [255, 255, 0]),
    ("magenta", [255, 0, 255]),
    ("cyan", [0, 255, 255]),
    ("white", [255, 255, 255]),
    ("orange", [255, 128, 0]),
    ("purple", [128, 0, 255]),
    ("spring", [0, 255, 128]),
    ("pink", [255, 0, 128]),
    ("azure", [0, 128, 255]),
    ("lime", [128, 255, 0]),
    ("grey", [128, 128, 128]),
];
const TOLERANCE: i32 = 48;

/// One track of a test lesson: id, TIC video_type, colour, from, to (s),
/// and the tone its sound carries (Hz; none: a video without sound).
struct Part {
    id: &'static str,
    kind: i64,
    colour: &'static str,
    from: i64,
    to: i64,
    tone: Option<u32>,
}

fn rgb(name: &str) -> [u8; 3] {
    COLOURS.iter().find(|(n, _)| *n == name).unwrap().1
}

fn close(a: [u8; 3], b: [u8; 3]) -> bool {
    a.iter()
        .zip(b)
        .all(|(x, y)| (i32::from(*x) - i32::from(y)).abs() <= TOLERANCE)
}

/// A solid-colour H.264 MP4 of `seconds`, 10 frames a second, with a frame
/// counter, made by ffmpeg; with `tone`, an AAC sound track of that sine.
pub(crate) fn make_video(dir: &Path, colour: &str, seconds: i64, tone: Option<u32>) -> Vec<u8> {
    let [r, g, b] = rgb(colour);
    let picture = format!("color=c=0x{r:02x}{g:02x}{b:02x}:s=160x90:r=10:d={seconds}");
    // The frame number, small, black, in the bottom-left corner: outside
    // the area the colour checks sample.
    let counter = [
        "-vf",
        "drawtext=text='%{n}':x=3:y=h-th-3:fontsize=12:fontcolor=black",
    ];
    match tone {
        None => ffmpeg_mp4(
            &dir.join(format!("{colour}-{seconds}.mp4")),
            &[&picture],
            &counter,
        ),
        Some(hz) => ffmpeg_mp4(
            &dir.join(format!("{colour}-{seconds}-{hz}hz.mp4")),
            &[
                &picture,
                &format!("sine=frequency={hz}:sample_rate=48000:duration={seconds}"),
            ],
            &[&counter[..], &["-c:a", "aac", "-b:a", "96k"]].concat(),
        ),
    }
}

/// An H.264 MP4 at `path` from ffmpeg's lavfi `sources` (made once; the
/// bytes are read back).
fn ffmpeg_mp4(path: &Path, sources: &[&str], filters: &[&str]) -> Vec<u8> {
    if !path.exists() {
        let mut command = Command::new("ffmpeg");
        command.args(["-loglevel", "error", "-y"]);
        for source in sources {
            command.args(["-f", "lavfi", "-i", source]);
        }
        let status = command
            .args(filters)
            .args(["-c:v", "libx264", "-pix_fmt", "yuv420p", "-g", "10"])
            .args(["-movflags", "+faststart"])
            .arg(path)
            .status()
            .expect("ffmpeg runs (scripts/ensure-browser.sh installs it)");
        assert!(status.success(), "ffmpeg made {}", path.display());
    }
    std::fs::read(path).unwrap()
}

/// A lesson: its videos on the origin, its record (the worker's own
/// decision), and its page written by `lesson-replay preview`.
struct Lesson {
    record: Value,
    colour_of: HashMap<String, [u8; 3]>,
    page: PathBuf,
}

fn lesson(name: &str, parts: &[Part], origin: &Origin, dir: &Path) -> Lesson {
    lesson_with_faults(name, parts, origin, dir, |_, _| Faults::default())
}

/// A lesson whose videos the origin serves with `faults(part, its size)`.
fn lesson_with_faults(
    name: &str,
    parts: &[Part],
    origin: &Origin,
    dir: &Path,
    faults: impl Fn(&Part, usize) -> Faults,
) -> Lesson {
    let mut videos = Vec::new();
    let mut colour_of = HashMap::new();
    for p in parts {
        let bytes = make_video(dir, p.colour, p.to - p.from, p.tone);
        let url = origin.add(
            &format!("/{name}/{}.mp4", p.id),
            bytes.clone(),
            faults(p, bytes.len()),
        );
        let user = if p.kind == 0 {
            format!("user-{}", p.id)
        } else {
            String::new()
        };
        videos.push(video(
            &url,
            p.id,
            p.kind,
            &user,
            bytes.len(),
            (p.to - p.from) * 1000,
            p.from * 1000,
        ));
        colour_of.insert(p.id.to_owned(), rgb(p.colour));
    }
    let message = finished(name, 7, videos);
    let policy = isolated_config("preview").input_policy();
    let record = match decide(&message, &Envelope::default(), &policy) {
        Decision::Publish(normalized) => normalized.record,
        other => panic!("{other:?}"),
    };
    let record_path = dir.join(format!("{name}.json"));
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    let page = dir.join(format!("{name}.html"));
    let (record_arg, page_arg) = (record_path.to_str().unwrap(), page.to_str().unwrap());
    let out = lesson_replay(
        &isolated_config("preview"),
        &["preview", record_arg, "-o", page_arg],
    );
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    Lesson {
        record: serde_json::to_value(&record).unwrap(),
        colour_of,
        page,
    }
}

/// The placements of the layout segment holding `ms`: track id → (x, y, w, h).
fn expected(record: &Value, ms: i64) -> HashMap<String, [f64; 4]> {
    let segments = record["layout"].as_array().unwrap();
    let segment = segments
        .iter()
        .find(|s| s["from_ms"].as_i64().unwrap() <= ms && ms < s["to_ms"].as_i64().unwrap())
        .unwrap_or_else(|| panic!("no segment holds {ms}"));
    let mut placed = HashMap::new();
    let boxes = segment["main"]
        .as_object()
        .map(|m| Value::Object(m.clone()))
        .into_iter()
        .chain(segment["tiles"].as_array().unwrap().iter().cloned());
    for b in boxes {
        let n = |k: &str| b[k].as_f64().unwrap();
        placed.insert(
            b["track_id"].as_str().unwrap().to_owned(),
            [n("x"), n("y"), n("w"), n("h")],
        );
    }
    placed
}

/// Every placed track shows its colour inside its box; no other track's
/// colour shows anywhere on the stage.
fn check_picture(shot: &Shot, lesson: &Lesson, ms: i64, what: &str) {
    let placed = expected(&lesson.record, ms);
    let (w, h) = (f64::from(shot.width), f64::from(shot.height));
    for (track, [x, y, bw, bh]) in &placed {
        let colour = lesson.colour_of[track];
        // A 5 × 5 grid over the inner 60 % of the box.
        for i in 0..5 {
            for j in 0..5 {
                let px = ((x + bw * (0.2 + 0.15 * f64::from(i))) * w) as u32;
                let py = ((y + bh * (0.2 + 0.15 * f64::from(j))) * h) as u32;
                let got = shot.pixel(px.min(shot.width - 1), py.min(shot.height - 1));
                assert!(
                    close(got, colour),
                    "{what} at {ms} ms: {track} should show {colour:?} at ({px}, {py}), shows {got:?}"
                );
            }
        }
    }
    for (track, colour) in &lesson.colour_of {
        if placed.contains_key(track) {
            continue;
        }
        let mut seen = 0;
        for py in (0..shot.height).step_by(4) {
            for px in (0..shot.width).step_by(4) {
                if close(shot.pixel(px, py), *colour) {
                    seen += 1;
                }
            }
        }
        assert!(
            seen < 20,
            "{what} at {ms} ms: hidden {track} shows ({seen} samples)"
        );
    }
}

/// Open the page at `ms` and check the picture once every video settled.
async fn check_moment(browser: &mut Browser, lesson: &Lesson, ms: i64) {
    browser
        .open(&format!("file://{}#t={ms}", lesson.page.display()))
        .await;
    let at = browser
        .eval("lessonReplay.settled()")
        .await
        .as_f64()
        .unwrap();
    assert_eq!(at as i64, ms, "the page opened at #t={ms}");
    let stage = browser.rect("#stage").await;
    let shot = browser.screenshot(stage).await;
    check_picture(&shot, lesson, ms, "opened");
    if let Ok(dir) = std::env::var("LESSON_REPLAY_SAVE_SCREENSHOTS") {
        let player = browser.rect(".player").await;
        let png = browser.screenshot_png(Some(player)).await;
        let name = lesson
            .page
            .file_stem()
            .unwrap()
            .to_string_lossy()
            .into_owned();
        std::fs::write(
            Path::new(&dir).join(format!("{name}-{}s.png", ms / 1000)),
            png,
        )
        .unwrap();
    }
}

fn part(id: &'static str, kind: i64, colour: &'static str, from: i64, to: i64) -> Part {
    Part {
        id,
        kind,
        colour,
        from,
        to,
        tone: None,
    }
}

fn scratch() -> PathBuf {
    let dir = std::env::temp_dir().join(format!("lesson-replay-preview-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn cameras_joining_and_leaving_take_the_tiles_the_rules_give() {
    let origin = Origin::start().await;
    let dir = scratch();
    // 1, 5, 7 and 9 cameras over a whiteboard, then two leave.
    let parts = [
        part("board", 2, "grey", 0, 40),
        part("c1", 0, "red", 0, 40),
        part("c2", 0, "green", 10, 40),
        part("c3", 0, "blue", 10, 40),
        part("c4", 0, "yellow", 10, 40),
        part("c5", 0, "magenta", 10, 40),
        part("c6", 0, "cyan", 20, 40),
        part("c7", 0, "white", 20, 40),
        part("c8", 0, "orange", 30, 36),
        part("c9", 0, "purple", 30, 36),
    ];
    let lesson = lesson("cameras", &parts, &origin, &dir);
    let mut browser = Browser::start().await;
    for (ms, cameras) in [
        (5_000, 1),
        (15_000, 5),
        (25_000, 7),
        (33_000, 9),
        (38_000, 7),
    ] {
        assert_eq!(
            expected(&lesson.record, ms).len(),
            cameras + 1,
            "the record places {cameras} cameras and the board at {ms}"
        );
        check_moment(&mut browser, &lesson, ms).await;
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_screen_share_covers_the_whiteboard_only_while_it_lasts() {
    let origin = Origin::start().await;
    let dir = scratch();
    let parts = [
        part("board", 2, "grey", 0, 30),
        part("share", 1, "orange", 10, 20),
        part("c1", 0, "red", 0, 30),
        part("c2", 0, "green", 0, 30),
    ];
    let lesson = lesson("share", &parts, &origin, &dir);
    let mut browser = Browser::start().await;
    for ms in [5_000, 15_000, 25_000] {
        check_moment(&mut browser, &lesson, ms).await;
    }

    // Play from 8 s across the start of the share, then pause.
    browser
        .open(&format!("file://{}#t=8000", lesson.page.display()))
        .await;
    browser.eval("lessonReplay.settled()").await;
    browser.eval("lessonReplay.play()").await;
    let playing = browser
        .eval("new Promise(r => { const t = () => lessonReplay.time() >= 11500 ? r(lessonReplay.playing()) : setTimeout(t, 20); t(); })")
        .await;
    assert_eq!(playing, Value::Bool(true));
    browser.eval("lessonReplay.pause()").await;
    let at = browser
        .eval("lessonReplay.settled()")
        .await
        .as_f64()
        .unwrap() as i64;
    assert!((11_500..14_000).contains(&at), "paused at {at} ms");
    // Every visible video stands at the clock's time.
    let drift = browser
        .eval(&format!(
            "Math.max(...[...document.querySelectorAll('#stage video')]
               .filter(v => v.style.display === 'block')
               .map(v => Math.abs(v.currentTime - ({at} - {{board:0,share:10000,c1:0,c2:0}}[v.dataset.track]) / 1000)))"
        ))
        .await
        .as_f64()
        .unwrap();
    assert!(drift < 0.05, "a video is {drift} s off the clock");
    let stage = browser.rect("#stage").await;
    check_picture(
        &browser.screenshot(stage).await,
        &lesson,
        at,
        "played then paused",
    );

    // A click on the timeline at three quarters seeks there.
    let (x, y, w, h) = browser.rect("#timeline").await;
    browser.click(x + w * 0.75, y + h / 2.0).await;
    let at = browser
        .eval("lessonReplay.settled()")
        .await
        .as_f64()
        .unwrap() as i64;
    let duration = lesson.record["duration_ms"].as_i64().unwrap();
    assert!(
        (at - duration * 3 / 4).abs() < duration / 50,
        "clicked at 3/4 of {duration} ms, the clock says {at}"
    );
    check_picture(
        &browser.screenshot(stage).await,
        &lesson,
        at,
        "timeline click",
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_mixed_video_fills_the_canvas() {
    let origin = Origin::start().await;
    let dir = scratch();
    let parts = [part("mix", 3, "purple", 0, 20)];
    let lesson = lesson("mixed", &parts, &origin, &dir);
    let mut browser = Browser::start().await;
    for ms in [5_000, 15_000] {
        assert_eq!(expected(&lesson.record, ms)["mix"], [0.0, 0.0, 1.0, 1.0]);
        check_moment(&mut browser, &lesson, ms).await;
    }
}

/// With archiving on, the worker writes the page as `index.html` beside
/// `manifest.json`, playing the tracks by their relative keys: the lesson's
/// folder, copied anywhere, plays itself.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_archived_lesson_folder_plays_itself() {
    use common::s3::S3Server;
    use common::{Broker, spawn_worker};
    use lapin::types::FieldTable;

    let origin = Origin::start().await;
    let dir = scratch().join("archived");
    std::fs::create_dir_all(&dir).unwrap();
    let s3 = S3Server::start("school");
    let mut config = isolated_config("preview-archive");
    s3.configure(&mut config, "school");
    let broker = Broker::new(config).await;
    let worker = spawn_worker(broker.config.clone()).await;
    let parts = [part("board", 2, "grey", 0, 10), part("c1", 0, "red", 0, 10)];
    let mut videos = Vec::new();
    let mut colour_of = HashMap::new();
    for p in &parts {
        let bytes = make_video(&scratch(), p.colour, p.to - p.from, p.tone);
        let url = origin.add(
            &format!("/archived/{}.mp4", p.id),
            bytes.clone(),
            Faults::default(),
        );
        videos.push(video(
            &url,
            p.id,
            p.kind,
            "u",
            bytes.len(),
            (p.to - p.from) * 1000,
            0,
        ));
        colour_of.insert(p.id.to_owned(), rgb(p.colour));
    }
    broker
        .publish(&finished("archived", 7, videos), FieldTable::default())
        .await;
    let (record, _) = broker.take(&broker.config.records_queue, 1).await.remove(0);
    worker.stop().await;
    broker.cleanup().await;

    // Copy the lesson's folder out of the bucket, as a web server would serve it.
    let track_key = record["tracks"][0]["archive"]["key"].as_str().unwrap();
    let folder = &track_key[..track_key.rfind('/').unwrap() + 1];
    let client = s3.client();
    let listed = client
        .list_objects_v2()
        .bucket("school")
        .prefix(folder)
        .send()
        .await
        .unwrap();
    let mut names = Vec::new();
    for object in listed.contents() {
        let key = object.key().unwrap();
        let bytes = common::s3::object(&client, "school", key).await;
        let name = key.strip_prefix(folder).unwrap();
        std::fs::write(dir.join(name), bytes).unwrap();
        names.push(name.to_owned());
    }
    names.sort();
    assert!(names.contains(&"index.html".to_owned()), "{names:?}");
    assert!(names.contains(&"manifest.json".to_owned()), "{names:?}");

    let lesson = Lesson {
        record,
        colour_of,
        page: dir.join("index.html"),
    };
    let mut browser = Browser::start().await;
    check_moment(&mut browser, &lesson, 5_000).await;
    // Played from the copies beside the page, not from the origin.
    let sources = browser
        .eval("[...document.querySelectorAll('#stage video')].map(v => v.currentSrc)")
        .await;
    for source in sources.as_array().unwrap() {
        let source = source.as_str().unwrap();
        assert!(
            source.starts_with(&format!("file://{}/", dir.display())),
            "{source}"
        );
    }
}

/// `--presign-hours`: each archived copy plays through a presigned URL, so a
/// private bucket's lesson can be watched from a laptop.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn presigned_urls_open_a_private_buckets_copies() {
    use common::moto::MotoServer;
    let origin = Origin::start().await;
    let dir = scratch().join("presigned");
    std::fs::create_dir_all(&dir).unwrap();
    let lesson = lesson(
        "presigned",
        &[part("board", 2, "grey", 0, 5)],
        &origin,
        &dir,
    );
    let bytes = make_video(&scratch(), "grey", 5, None);
    let moto = MotoServer::start("school").await;
    let key = "lesson-replay/presigned/board.mp4";
    moto.client()
        .put_object()
        .bucket("school")
        .key(key)
        .body(bytes.clone().into())
        .send()
        .await
        .unwrap();
    let mut record = lesson.record.clone();
    record["tracks"][0]["archive"] = serde_json::json!({"uri": format!("s3://school/{key}"),
        "bucket": "school", "key": key, "size_bytes": bytes.len(), "md5": "0".repeat(32), "etag": null});
    let record_path = dir.join("archived.json");
    std::fs::write(&record_path, serde_json::to_vec(&record).unwrap()).unwrap();
    let mut config = isolated_config("presign");
    moto.configure(&mut config, "school");
    let record_arg = record_path.to_str().unwrap();
    let preview =
        |hours: &str| lesson_replay(&config, &["preview", "--presign-hours", hours, record_arg]);
    let out = preview("2");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let page = String::from_utf8(out.stdout).unwrap();
    let sources_json = page
        .split(r#"<script type="application/json" id="sources">"#)
        .nth(1)
        .and_then(|rest| rest.split("</script>").next())
        .unwrap();
    let sources: HashMap<String, Vec<String>> = serde_json::from_str(sources_json).unwrap();
    let urls = &sources["board"];
    assert_eq!(urls.len(), 2, "the copy, then the origin: {urls:?}");
    assert!(
        urls[0].contains("X-Amz-Signature=") && urls[0].contains("X-Amz-Expires=7200"),
        "{}",
        urls[0]
    );
    let fetched = reqwest::get(&urls[0]).await.unwrap();
    assert_eq!(fetched.status(), 200);
    assert_eq!(fetched.bytes().await.unwrap().as_ref(), bytes.as_slice());
    assert_eq!(
        urls[1],
        lesson.record["tracks"][0]["source_url"].as_str().unwrap()
    );

    let refused = preview("500");
    assert_eq!(refused.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&refused.stderr).contains("1 to 168"));
}

/// A `w`×`h` H.264 MP4 of `colour` with a white square in its middle (side:
/// 60 % of the shorter edge): its proportions can be measured on the screen.
fn make_shape_video(dir: &Path, colour: &str, (w, h): (u32, u32), seconds: i64) -> Vec<u8> {
    let [r, g, b] = rgb(colour);
    let side = w.min(h) * 6 / 10;
    let (x, y) = ((w - side) / 2, (h - side) / 2);
    ffmpeg_mp4(
        &dir.join(format!("{colour}-{w}x{h}-{seconds}.mp4")),
        &[&format!(
            "color=c=0x{r:02x}{g:02x}{b:02x}:s={w}x{h}:r=10:d={seconds},drawbox=x={x}:y={y}:w={side}:h={side}:color=white:t=fill"
        )],
        &[],
    )
}

/// Within 2 %, or 2 pixels where 2 % is less than that (edges are scaled).
fn near(measured: f64, expected: f64) -> bool {
    (measured - expected).abs() <= (expected * 0.02).max(2.0)
}

/// The bounding box (x0, y0, x1, y1, exclusive ends) of the pixels of
/// `shot` inside `area` that `matches`.
fn bounds(
    shot: &Shot,
    (ax, ay, aw, ah): (u32, u32, u32, u32),
    matches: impl Fn([u8; 3]) -> bool,
) -> Option<(u32, u32, u32, u32)> {
    let mut found: Option<(u32, u32, u32, u32)> = None;
    for y in ay..(ay + ah).min(shot.height) {
        for x in ax..(ax + aw).min(shot.width) {
            if matches(shot.pixel(x, y)) {
                let (x0, y0, x1, y1) = found.unwrap_or((x, y, x + 1, y + 1));
                found = Some((x0.min(x), y0.min(y), x1.max(x + 1), y1.max(y + 1)));
            }
        }
    }
    found
}

/// Every placed video shows its whole picture, centred in its box, at its
/// own proportions, with black bars: the picture's box on the screen has
/// the video's aspect (2 %), the square inside it stays a square, and the
/// bars are black.
fn check_letterbox(
    shot: &Shot,
    record: &Value,
    sizes: &HashMap<&str, (u32, u32)>,
    ms: i64,
    what: &str,
) {
    let (sw, sh) = (f64::from(shot.width), f64::from(shot.height));
    for (track, [x, y, w, h]) in expected(record, ms) {
        let (vw, vh) = sizes[track.as_str()];
        let aspect = f64::from(vw) / f64::from(vh);
        // The box on the screen, a pixel in from each edge (antialiasing).
        let (bx, by) = ((x * sw).round() as u32 + 1, (y * sh).round() as u32 + 1);
        let (bw, bh) = ((w * sw).round() as u32 - 2, (h * sh).round() as u32 - 2);
        let (ew, eh) = if f64::from(bw) / f64::from(bh) > aspect {
            (f64::from(bh) * aspect, f64::from(bh))
        } else {
            (f64::from(bw), f64::from(bw) / aspect)
        };
        let lit = |p: [u8; 3]| p.iter().any(|c| *c > 60);
        let (x0, y0, x1, y1) = bounds(shot, (bx, by, bw, bh), lit)
            .unwrap_or_else(|| panic!("{what}: {track} shows nothing"));
        let (pw, ph) = (f64::from(x1 - x0), f64::from(y1 - y0));
        assert!(
            near(pw, ew) && near(ph, eh),
            "{what}: {track} ({vw}x{vh}) in a {bw}x{bh} box shows {pw}x{ph}, expected {ew:.0}x{eh:.0}"
        );
        // Centred: the bars on opposite sides are equal (within 2 px).
        let (left, right) = (x0 - bx, bx + bw - x1);
        let (top, bottom) = (y0 - by, by + bh - y1);
        assert!(
            left.abs_diff(right) <= 2 && top.abs_diff(bottom) <= 2,
            "{what}: {track} off centre: bars {left}/{right} {top}/{bottom}"
        );
        // The bars are black.
        for (size, px, py) in [
            (left, bx + left / 2, by + bh / 2),
            (right, x1 + right / 2, by + bh / 2),
            (top, bx + bw / 2, by + top / 2),
            (bottom, bx + bw / 2, y1 + bottom / 2),
        ] {
            if size > 4 {
                let p = shot.pixel(px, py);
                assert!(
                    p.iter().all(|c| *c < 30),
                    "{what}: {track}'s bar at ({px}, {py}) is {p:?}"
                );
            }
        }
        // The square stays a square.
        let white = |p: [u8; 3]| p.iter().all(|c| *c > 200);
        let (sx0, sy0, sx1, sy1) = bounds(shot, (x0, y0, x1 - x0, y1 - y0), white)
            .unwrap_or_else(|| panic!("{what}: {track}'s square is not seen"));
        let (qw, qh) = (f64::from(sx1 - sx0), f64::from(sy1 - sy0));
        assert!(near(qw, qh), "{what}: {track}'s square shows {qw}x{qh}");
    }
}

/// A portrait phone camera (3:4), a 16:9 camera and a 4:3 whiteboard, on a
/// 16:9 canvas and on a 4:3 one: each picture whole, centred, unstretched.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_video_keeps_its_proportions_with_black_bars() {
    let origin = Origin::start().await;
    let dir = scratch();
    let tracks: [(&str, i64, &str, (u32, u32)); 3] = [
        ("board", 2, "grey", (320, 240)),
        ("c1", 0, "red", (320, 180)),
        ("c10", 0, "azure", (240, 320)),
    ];
    let mut videos = Vec::new();
    let mut sizes = HashMap::new();
    for (id, kind, colour, size) in tracks {
        let bytes = make_shape_video(&dir, colour, size, 10);
        let url = origin.add(
            &format!("/shapes/{id}.mp4"),
            bytes.clone(),
            Faults::default(),
        );
        let user = if kind == 0 {
            format!("user-{id}")
        } else {
            String::new()
        };
        videos.push(video(&url, id, kind, &user, bytes.len(), 10_000, 0));
        sizes.insert(id, size);
    }
    let policy = isolated_config("preview").input_policy();
    let record = match decide(
        &finished("shapes", 7, videos),
        &Envelope::default(),
        &policy,
    ) {
        Decision::Publish(normalized) => serde_json::to_value(&normalized.record).unwrap(),
        other => panic!("{other:?}"),
    };
    // A warning about c10 only: tied to its track by id, exactly (c1's id is
    // a prefix of it).
    let mut record = record;
    record["warnings"].as_array_mut().unwrap().push(serde_json::json!(
        {"code": "format_assumed", "message": "track c10: no video_format, \"mp4\" assumed", "track_id": "c10"}
    ));
    // The canvas is 4:3 when the whiteboard was probed 4:3, else 16:9.
    let mut probed = record.clone();
    for track in probed["tracks"].as_array_mut().unwrap() {
        let (w, h) = sizes[track["track_id"].as_str().unwrap()];
        track["probe"] = serde_json::json!({"duration_ms": 10_000, "width": w, "height": h});
    }
    let mut browser = Browser::start().await;
    for (name, record, canvas) in [
        ("shapes-169", &record, 16.0 / 9.0),
        ("shapes-43", &probed, 4.0 / 3.0),
    ] {
        let record_path = dir.join(format!("{name}.json"));
        std::fs::write(&record_path, serde_json::to_vec(record).unwrap()).unwrap();
        let page = dir.join(format!("{name}.html"));
        let out = lesson_replay(
            &isolated_config("preview"),
            &[
                "preview",
                record_path.to_str().unwrap(),
                "-o",
                page.to_str().unwrap(),
            ],
        );
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        browser
            .open(&format!("file://{}#t=5000", page.display()))
            .await;
        browser.eval("lessonReplay.settled()").await;
        let stage = browser.rect("#stage").await;
        assert!(
            (stage.2 / stage.3 - canvas).abs() < 0.01,
            "{name}: the canvas is {}x{}",
            stage.2,
            stage.3
        );
        let shot = browser.screenshot(stage).await;
        check_letterbox(&shot, record, &sizes, 5_000, name);
        let marks = |track: &str| {
            format!("document.querySelectorAll('.lane[data-track=\"{track}\"] .mark').length")
        };
        assert_eq!(
            browser.eval(&marks("c10")).await,
            serde_json::json!(1),
            "{name}"
        );
        assert_eq!(
            browser.eval(&marks("c1")).await,
            serde_json::json!(0),
            "{name}: c1 took c10's warning"
        );
    }
}
