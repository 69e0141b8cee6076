//! Render a record as its replay page: the record and each track's video
//! sources are embedded as JSON; `player.js` does the rest in the browser.

use std::collections::BTreeMap;

use crate::decision::record::{Kind, Record};

const TEMPLATE: &str = include_str!("page.html");
const STYLE: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("player.js");

/// Each track's video sources, tried in order (the archived copy first, then
/// the VOD origin): track id → URLs.
pub type Sources = BTreeMap<String, Vec<String>>;

/// Sources that play each track from its `source_url` alone.
pub fn origin_sources(record: &Record) -> Sources {
    record
        .tracks
        .iter()
        .map(|t| (t.track_id.clone(), vec![t.source_url.clone()]))
        .collect()
}

/// Sources that play each archived track from `copy(key)` first, then from
/// its `source_url`.
pub fn archive_sources(record: &Record, copy: impl Fn(&str) -> Option<String>) -> Sources {
    record
        .tracks
        .iter()
        .map(|t| {
            let archived = t.archive.as_ref().and_then(|a| copy(&a.key));
            let urls = archived
                .into_iter()
                .chain(std::iter::once(t.source_url.clone()))
                .collect();
            (t.track_id.clone(), urls)
        })
        .collect()
}

/// The page of `record`, playing `sources`.
pub fn render(record: &Record, sources: &Sources) -> String {
    let title = format!(
        "Lesson {} · {} — lesson-replay",
        record.room_id,
        record.task_id.as_deref().unwrap_or(&record.replay_id)
    );
    TEMPLATE
        .replace("{{TITLE}}", &escape_html(&title))
        .replace("{{ASPECT}}", aspect(record))
        .replace("{{STYLE}}", STYLE)
        .replace("{{SCRIPT}}", SCRIPT)
        .replace("{{SOURCES}}", &script_json(&serde_json::to_string(sources)))
        .replace("{{RECORD}}", &script_json(&serde_json::to_string(record)))
}

/// JSON made safe inside `<script>`: no `<` can close the element (it only
/// occurs inside strings, where `\u003c` means the same).
fn script_json(json: &serde_json::Result<String>) -> String {
    json.as_deref()
        .unwrap_or("null")
        .replace('<', "\\u003c")
        .replace('\u{2028}', "\\u2028")
        .replace('\u{2029}', "\\u2029")
}

fn escape_html(text: &str) -> String {
    text.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

/// The canvas the layout's fractions refer to: 4:3 when the main picture
/// (mixed, screen share or whiteboard) was probed closer to 4:3, else 16:9.
pub fn aspect(record: &Record) -> &'static str {
    let probed = record
        .tracks
        .iter()
        .filter(|t| t.kind != Kind::Camera)
        .filter_map(|t| t.probe.as_ref())
        .find_map(|p| Some((p.width?, p.height?)))
        .filter(|&(_, h)| h > 0);
    match probed {
        Some((w, h))
            if (f64::from(w) / f64::from(h) - 4.0 / 3.0).abs()
                < (f64::from(w) / f64::from(h) - 16.0 / 9.0).abs() =>
        {
            "4 / 3"
        }
        _ => "16 / 9",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn record() -> Record {
        let message = br#"{"callback_type":"record_finished","error_code":0,"task_id":"t</script><b>","room_id":5,
            "group_id":"5","record_user_id":"tic_record_user_5_1","start_time":1700000000,"stop_time":1700000010,
            "video_info":[{"video_play_time":0,"video_size":1,"video_format":"mp4","video_duration":10000,
            "video_url":"https://1.vod2.myqcloud.com/a.mp4","video_id":"v</script>","video_type":2,"user_id":"u"}]}"#;
        let policy = crate::decision::decide::InputPolicy::default();
        match crate::decision::decide::decide(message, &Default::default(), &policy) {
            crate::decision::decide::Decision::Publish(n) => n.record,
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn hostile_text_cannot_leave_its_script_or_title() {
        let record = record();
        let page = render(&record, &origin_sources(&record));
        assert_eq!(page.matches("</script>").count(), 3, "only the page's own");
        assert!(page.contains("<title>Lesson 5 · t&lt;/script&gt;&lt;b&gt;"));
        assert!(page.contains("v\\u003c/script>"));
    }

    #[test]
    fn the_canvas_follows_the_main_pictures_shape() {
        let mut record = record();
        assert_eq!(aspect(&record), "16 / 9", "unprobed");
        record.tracks[0].probe = Some(crate::decision::record::Probe {
            duration_ms: 10_000,
            width: Some(1024),
            height: Some(768),
        });
        assert_eq!(aspect(&record), "4 / 3");
    }

    #[test]
    fn archived_copies_come_before_the_origin() {
        let mut record = record();
        record.tracks[0].archive = Some(crate::decision::record::Archive {
            uri: "s3://b/p/k.mp4".into(),
            bucket: "b".into(),
            key: "p/k.mp4".into(),
            size_bytes: 1,
            md5: "0".repeat(32),
            etag: None,
        });
        let sources = archive_sources(&record, |key| Some(format!("https://store/{key}")));
        assert_eq!(
            sources[&record.tracks[0].track_id],
            ["https://store/p/k.mp4", "https://1.vod2.myqcloud.com/a.mp4"]
        );
    }
}
