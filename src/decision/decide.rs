//! The decision for one inbound message, with no I/O: decode → verify →
//! normalize (with its layout) → URL policy. The worker and `lesson-replay
//! normalize` both call [`decide`] with the configured [`InputPolicy`] and only
//! carry out what it says, so they never disagree about a message's content.
//! (Only the worker resolves host names: one that resolves to a private
//! address is refused when it connects, see `media::guard`.)

use crate::decision::decode::{Limits, Payload, decode};
use crate::decision::normalize::{Normalized, normalize};
use crate::decision::reason::{ReasonCode, Rejection};
use crate::decision::url_policy::{UrlPolicy, UrlProblem};
use crate::decision::verify::{SignatureMode, SignedFields, TicKeys, verify};
use crate::decision::watch::Watch;

/// What travelled next to the body and matters to the decision: the
/// callback's URL parameters `x-tic-sign` and `x-tic-sdkappid` (AMQP headers;
/// `x-tic-random` only goes to the logs) and the AMQP
/// `timestamp` property.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Envelope {
    pub sign: Option<String>,
    pub sdkappid: Option<String>,
    /// AMQP `timestamp` property, Unix seconds.
    pub timestamp: Option<i64>,
}

/// What inbound messages must satisfy: signatures, size limits, VOD URLs.
#[derive(Debug, Clone, Default)]
pub struct InputPolicy {
    pub mode: SignatureMode,
    pub keys: TicKeys,
    pub limits: Limits,
    pub urls: UrlPolicy,
    /// Make a watch of every recording under way (`watch_lessons`).
    pub watch: bool,
}

/// What to do with a message.
#[derive(Debug, Clone)]
pub enum Decision {
    /// Fetch/probe/archive the tracks, publish the record, then acknowledge the message.
    Publish(Box<Normalized>),
    /// No finished recording: acknowledge and count as skipped.
    Skip(Rejection),
    /// A recording under way: schedule a watch of it, then acknowledge.
    Watch { reason: Rejection, watch: Watch },
    /// Bad input: park the message with this reason.
    Reject(Rejection),
}

/// Decide what one message becomes.
pub fn decide(body: &[u8], envelope: &Envelope, policy: &InputPolicy) -> Decision {
    match try_decide(body, envelope, policy) {
        Ok(decision) => decision,
        Err(rejection) => Decision::Reject(rejection),
    }
}

/// The app a message is about, as its record will say it (the body's
/// sdkappid, else the `x-tic-sdkappid` header); `None` when it names none or
/// cannot be read — the decision then judges it. What the worker sorts
/// messages into lanes by.
pub fn app_of(body: &[u8], envelope: &Envelope, limits: &Limits) -> Option<i64> {
    let announcement = decode(body, limits).ok()?;
    match announcement.sdkappid {
        Some(id) => Some(id),
        None => header_sdkappid(envelope).ok().flatten(),
    }
}

/// What a message says of its lesson, when it can be read: its app, task
/// and room. What a `lesson.replay_failed` event names when the message was
/// rejected before it became a record.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Named {
    pub app: Option<i64>,
    pub task_id: Option<String>,
    pub room_id: Option<i64>,
}

pub fn named(body: &[u8], envelope: &Envelope, limits: &Limits) -> Named {
    let Ok(announcement) = decode(body, limits) else {
        return Named::default();
    };
    let app = match announcement.sdkappid {
        Some(id) => Some(id),
        None => header_sdkappid(envelope).ok().flatten(),
    };
    match announcement.payload {
        Payload::Finished(recording) => Named {
            app,
            task_id: recording.task_id,
            room_id: Some(recording.room_id),
        },
        Payload::NotFinished(unfinished) => Named {
            app,
            task_id: unfinished.task_id,
            room_id: Some(unfinished.room_id),
        },
    }
}

fn try_decide(
    body: &[u8],
    envelope: &Envelope,
    policy: &InputPolicy,
) -> Result<Decision, Rejection> {
    let announcement = decode(body, &policy.limits)?;
    let sdkappid = match announcement.sdkappid {
        Some(id) => Some(id),
        None => header_sdkappid(envelope)?,
    };
    verify(
        policy.mode,
        &policy.keys,
        SignedFields {
            sdkappid,
            sign: envelope.sign.as_deref(),
            expire_time: announcement.expire_time,
            sent_at: announcement.sent_at.or(envelope.timestamp),
        },
    )?;
    match announcement.payload {
        Payload::NotFinished(unfinished) => {
            let since = unfinished
                .start_time
                .or(announcement.sent_at)
                .or(envelope.timestamp);
            match (
                policy.watch && unfinished.in_progress,
                sdkappid,
                unfinished.task_id,
                since,
            ) {
                (true, Some(sdkappid), Some(task_id), Some(since)) => Ok(Decision::Watch {
                    reason: unfinished.reason,
                    watch: Watch {
                        sdkappid,
                        task_id,
                        room_id: unfinished.room_id,
                        since,
                        checks: 0,
                        failures: 0,
                    },
                }),
                _ => Ok(Decision::Skip(unfinished.reason)),
            }
        }
        Payload::Finished(recording) => {
            let mut normalized = normalize(&recording, sdkappid)?;
            check_urls(&mut normalized, &policy.urls)?;
            Ok(Decision::Publish(Box::new(normalized)))
        }
    }
}

/// A record only ever points at URLs the policy allows, fetched or not, and
/// carries each in the canonical form that was judged.
fn check_urls(normalized: &mut Normalized, urls: &UrlPolicy) -> Result<(), Rejection> {
    for track in &mut normalized.record.tracks {
        match urls.canonical(&track.source_url) {
            Ok(url) => track.source_url = url.to_string(),
            Err(UrlProblem::Malformed(why)) => {
                return Err(Rejection::field(
                    "video_url",
                    format!("track {}: {why}", track.track_id),
                ));
            }
            Err(UrlProblem::NotAllowed(why)) => {
                return Err(Rejection::new(
                    ReasonCode::UrlNotAllowed,
                    format!("track {}: {why}", track.track_id),
                ));
            }
        }
    }
    Ok(())
}

fn header_sdkappid(envelope: &Envelope) -> Result<Option<i64>, Rejection> {
    envelope
        .sdkappid
        .as_deref()
        .map(|raw| {
            raw.trim()
                .parse()
                .ok()
                .filter(|app: &i64| *app > 0)
                .ok_or_else(|| {
                    Rejection::field(
                        "header x-tic-sdkappid",
                        format!("{raw:?} is not an sdkappid (a positive integer)"),
                    )
                })
        })
        .transpose()
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::decision::verify::compute_sign;

    const BODY: &str = r#"{"callback_type":"record_finished","expire_time":1700000100,"timestamp":1700000000,
        "task_id":"t1","room_id":1,"group_id":"1","start_time":1700000000,"stop_time":1700000060,"video_info":[]}"#;

    fn policy(mode: SignatureMode) -> InputPolicy {
        InputPolicy {
            mode,
            keys: TicKeys::parse_list("1400000001=SECRETKEY").unwrap(),
            limits: Limits::default(),
            urls: UrlPolicy::default(),
            watch: false,
        }
    }

    #[test]
    fn sdkappid_comes_from_the_header_when_the_body_has_none() {
        let envelope = Envelope {
            sdkappid: Some("1400000001".into()),
            sign: Some(compute_sign("SECRETKEY", 1700000100)),
            ..Envelope::default()
        };
        match decide(BODY.as_bytes(), &envelope, &policy(SignatureMode::Required)) {
            Decision::Publish(n) => assert_eq!(n.record.sdkappid, Some(1400000001)),
            other => panic!("{other:?}"),
        }
        let no_header = decide(
            BODY.as_bytes(),
            &Envelope::default(),
            &policy(SignatureMode::IfPresent),
        );
        assert!(matches!(no_header, Decision::Publish(n) if n.record.sdkappid.is_none()));
    }

    #[test]
    fn body_timestamp_wins_over_the_amqp_timestamp_for_expiry() {
        let envelope = Envelope {
            sdkappid: Some("1400000001".into()),
            sign: Some(compute_sign("SECRETKEY", 1700000100)),
            timestamp: Some(1800000000),
        };
        assert!(matches!(
            decide(BODY.as_bytes(), &envelope, &policy(SignatureMode::Required)),
            Decision::Publish(_)
        ));
        // Without a body timestamp the AMQP property decides: sent after expiry.
        let body = BODY.replace(r#""timestamp":1700000000,"#, "");
        match decide(body.as_bytes(), &envelope, &policy(SignatureMode::Required)) {
            Decision::Reject(r) => assert_eq!(r.code, ReasonCode::SignatureExpired),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn the_app_of_a_message_is_the_one_its_record_gets() {
        let limits = Limits::default();
        let header = |id: &str| Envelope {
            sdkappid: Some(id.into()),
            ..Envelope::default()
        };
        // The body's app wins over the header's, as in the record.
        let with_app = BODY.replacen('{', r#"{"sdkappid":1400000001,"#, 1);
        assert_eq!(
            app_of(with_app.as_bytes(), &header("1400000002"), &limits),
            Some(1400000001)
        );
        let no_app = BODY;
        assert_eq!(
            app_of(no_app.as_bytes(), &header("1400000002"), &limits),
            Some(1400000002)
        );
        assert_eq!(app_of(no_app.as_bytes(), &header("abc"), &limits), None);
        assert_eq!(app_of(b"not json", &header("1400000002"), &limits), None);
        assert_eq!(
            app_of(no_app.as_bytes(), &Envelope::default(), &limits),
            None
        );
    }

    #[test]
    fn a_bad_header_sdkappid_is_rejected() {
        let envelope = Envelope {
            sdkappid: Some("abc".into()),
            ..Envelope::default()
        };
        match decide(BODY.as_bytes(), &envelope, &policy(SignatureMode::Off)) {
            Decision::Reject(r) => assert!(r.message.starts_with("header x-tic-sdkappid"), "{r}"),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn signature_is_checked_before_skipping() {
        let started = r#"{"callback_type":"record_started","room_id":1,"expire_time":5}"#;
        let envelope = Envelope {
            sdkappid: Some("1400000001".into()),
            sign: Some("forged".into()),
            ..Envelope::default()
        };
        match decide(
            started.as_bytes(),
            &envelope,
            &policy(SignatureMode::IfPresent),
        ) {
            Decision::Reject(r) => assert_eq!(r.code, ReasonCode::SignatureInvalid),
            other => panic!("{other:?}"),
        }
        match decide(
            started.as_bytes(),
            &Envelope::default(),
            &policy(SignatureMode::IfPresent),
        ) {
            Decision::Skip(r) => assert_eq!(r.code, ReasonCode::RecordingStarted),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn urls_outside_the_policy_are_refused_by_the_decision() {
        let track = |url: &str| {
            format!(
                r#"{{"callback_type":"record_finished","task_id":"t1","room_id":1,"start_time":1700000000,
                "stop_time":1700000060,"video_info":[{{"video_play_time":0,"video_size":10,"video_format":"mp4",
                "video_duration":1000,"video_url":"{url}","video_id":"v1","video_type":0,"user_id":"u"}}]}}"#
            )
        };
        let policy = policy(SignatureMode::Off);
        let allowed = track("http://1253488539.vod2.myqcloud.com/a.mp4");
        assert!(matches!(
            decide(allowed.as_bytes(), &Envelope::default(), &policy),
            Decision::Publish(_)
        ));
        // A look-alike host with a Cyrillic "о", and a private address.
        for url in [
            "http://1253488539.vod2.myqcl\u{043e}ud.com/a.mp4",
            "http://10.0.0.1/a.mp4",
        ] {
            match decide(track(url).as_bytes(), &Envelope::default(), &policy) {
                Decision::Reject(r) => {
                    assert_eq!(r.code, ReasonCode::UrlNotAllowed, "{url}");
                    assert!(r.message.starts_with("track v1: "), "{r}");
                }
                other => panic!("{url}: {other:?}"),
            }
        }
    }

    #[test]
    fn a_recording_under_way_becomes_a_watch_when_it_can_be_queried() {
        let started = r#"{"callback_type":"record_started","task_id":"t9","room_id":7,"timestamp":1700000000}"#;
        let mut policy = policy(SignatureMode::Off);
        policy.watch = true;
        let with_app = Envelope {
            sdkappid: Some("1400000001".into()),
            ..Envelope::default()
        };
        match decide(started.as_bytes(), &with_app, &policy) {
            Decision::Watch { reason, watch } => {
                assert_eq!(reason.code, ReasonCode::RecordingStarted);
                assert_eq!(
                    (
                        watch.sdkappid,
                        watch.task_id.as_str(),
                        watch.room_id,
                        watch.since
                    ),
                    (1400000001, "t9", 7, 1700000000)
                );
            }
            other => panic!("{other:?}"),
        }
        // Without an sdkappid there is nobody to ask: skipped, as before.
        assert!(matches!(
            decide(started.as_bytes(), &Envelope::default(), &policy),
            Decision::Skip(_)
        ));
        // Watches off: skipped.
        policy.watch = false;
        assert!(matches!(
            decide(started.as_bytes(), &with_app, &policy),
            Decision::Skip(_)
        ));
        // A query answer still recording is watched; one with an odd status is not.
        policy.watch = true;
        let recording =
            r#"{"status":"recording","task_id":"t9","room_id":7,"start_time":1700000000}"#;
        assert!(matches!(
            decide(recording.as_bytes(), &with_app, &policy),
            Decision::Watch { .. }
        ));
        let odd = r#"{"status":"paused","task_id":"t9","room_id":7,"start_time":1700000000}"#;
        assert!(matches!(
            decide(odd.as_bytes(), &with_app, &policy),
            Decision::Skip(_)
        ));
    }

    #[test]
    fn records_carry_the_canonical_url_that_was_judged() {
        let with_url = |url: &str| {
            format!(
                r#"{{"callback_type":"record_finished","task_id":"t1","room_id":1,"start_time":1700000000,
                "stop_time":1700000060,"video_info":[{{"video_play_time":0,"video_size":10,"video_format":"mp4",
                "video_duration":1000,"video_url":"{url}","video_id":"v1","video_type":0,"user_id":"u"}}]}}"#
            )
        };
        let policy = policy(SignatureMode::Off);
        for (raw, canonical) in [
            (
                "HTTP://1.VOD2.MyQcloud.COM/a.mp4",
                "http://1.vod2.myqcloud.com/a.mp4",
            ),
            (
                "http:1.vod2.myqcloud.com/a.mp4",
                "http://1.vod2.myqcloud.com/a.mp4",
            ),
            (
                "http://1.vod2.myqcloud.com:80/a%20b.mp4",
                "http://1.vod2.myqcloud.com/a%20b.mp4",
            ),
        ] {
            match decide(with_url(raw).as_bytes(), &Envelope::default(), &policy) {
                Decision::Publish(n) => assert_eq!(n.record.tracks[0].source_url, canonical),
                other => panic!("{raw}: {other:?}"),
            }
        }
        for raw in [
            "http://1.vod2.myqcloud.com/a.mp4\\r\\nX-Injected: 1",
            "http://1.vod2\\t.myqcloud.com/a.mp4",
            "http://1.vod2.myqcloud.com\\\\@127.0.0.1:5672/",
        ] {
            match decide(with_url(raw).as_bytes(), &Envelope::default(), &policy) {
                Decision::Reject(r) => {
                    assert_eq!(r.code, ReasonCode::InvalidField, "{raw}: {r}");
                    assert!(r.message.starts_with("video_url: track v1: "), "{r}");
                }
                other => panic!("{raw}: {other:?}"),
            }
        }
    }

    #[test]
    fn questionable_inputs_are_decided_one_way() {
        let policy = policy(SignatureMode::Off);
        let decision = |body: &str, envelope: &Envelope| decide(body.as_bytes(), envelope, &policy);
        let query = |status: &str| {
            format!(
                r#"{{"status":"{status}","task_id":"t1","room_id":1,"start_time":1700000000,
                "stop_time":1700000060,"video_info":[]}}"#
            )
        };
        // A status in another case is the same word.
        assert!(matches!(
            decision(&query("FINISHED"), &Envelope::default()),
            Decision::Publish(_)
        ));
        let refused = |body: &str, envelope: &Envelope, field: &str| match decision(body, envelope)
        {
            Decision::Reject(r) => {
                assert_eq!(r.code, ReasonCode::InvalidField, "{r}");
                assert!(r.message.starts_with(field), "{field}: {r}");
            }
            other => panic!("{field}: {other:?}"),
        };
        // Times beyond 2100, and a week-long offset, are not a lesson.
        let far = BODY.replace(
            "\"stop_time\":1700000060",
            "\"stop_time\":4611686018427387904",
        );
        refused(&far, &Envelope::default(), "stop_time");
        // Bidirectional overrides reorder what a reader sees: refused like control characters.
        let bidi = BODY.replace("\"task_id\":\"t1\"", "\"task_id\":\"t1\\u202egnp.exe\"");
        refused(&bidi, &Envelope::default(), "task_id");
        // An sdkappid is positive, in the body as in the header.
        let negative = BODY.replace("\"callback_type\"", "\"sdkappid\":-5,\"callback_type\"");
        refused(&negative, &Envelope::default(), "sdkappid");
        let header = Envelope {
            sdkappid: Some("-1400000001".into()),
            ..Envelope::default()
        };
        refused(BODY, &header, "header x-tic-sdkappid");
    }
}
