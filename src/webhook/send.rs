//! One attempt to deliver one event, as the specification says: a POST of
//! the exact bytes, signed at the moment of sending; success is any 2xx
//! within the deadline; a redirect is a failure (never followed: a receiver
//! cannot send the body elsewhere, to a private address least of all); the
//! answer's body is read to at most [`MAX_ANSWER_BYTES`] and dropped; `410
//! Gone` ends the event's delivery; `Retry-After` on 429, 502, 503 and 504
//! is the least wait before the next attempt.

use std::time::{Duration, Instant, SystemTime};

use reqwest::header::{CONTENT_TYPE, HeaderValue, LOCATION, RETRY_AFTER};
use url::Url;

use crate::decision::reason::error_chain;
use crate::webhook::sign::{Secret, signature};

/// An answer's body is read up to this much, then dropped (the connection
/// with it): a receiver answering 50 MB costs 64 KiB.
pub const MAX_ANSWER_BYTES: usize = 64 * 1024;

/// How much of an answer's body a failure's explanation quotes.
const QUOTED_ANSWER: usize = 200;

/// Where one app's events go.
#[derive(Debug, Clone)]
pub struct Destination {
    pub url: Url,
    /// One signature each (several while a secret is rotated).
    pub secrets: Vec<Secret>,
}

impl Destination {
    /// The URL as logs and commands show it: without a password or a query
    /// (either may hold a token).
    pub fn shown(&self) -> String {
        let mut url = self.url.clone();
        if url.password().is_some() {
            let _ = url.set_password(Some("***"));
        }
        if url.query().is_some() {
            url.set_query(Some("[REDACTED]"));
        }
        url.to_string()
    }
}

/// What an attempt means for the event.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Verdict {
    /// A 2xx: delivered.
    Delivered,
    /// 410 Gone: the endpoint asks never to be sent this again.
    Gone,
    /// Anything else: try again later, not sooner than `at_least` when the
    /// receiver said so (`Retry-After`).
    Retry { at_least: Option<Duration> },
}

/// One attempt's result.
#[derive(Debug, Clone)]
pub struct Attempt {
    /// The answer's status; `None` when there was no answer in time.
    pub status: Option<u16>,
    pub verdict: Verdict,
    /// From the request's start to the answer read (or the failure).
    pub elapsed: Duration,
    /// What happened, in words, for logs and the parking reason:
    /// `answered 500: <the answer's start>`, `no answer within 15 s`, ...
    pub explanation: String,
    /// The start of the answer's body (at most [`QUOTED_ANSWER`] bytes).
    pub answer: String,
}

/// Sends events over one HTTP client (its connections kept per endpoint).
#[derive(Debug, Clone)]
pub struct Sender {
    client: reqwest::Client,
    deadline: Duration,
}

impl Sender {
    /// A sender whose every attempt ends within `deadline`: connecting,
    /// sending and reading the answer together.
    pub fn new(deadline: Duration) -> Result<Sender, String> {
        let client = reqwest::Client::builder()
            .redirect(reqwest::redirect::Policy::none())
            .connect_timeout(deadline.min(Duration::from_secs(10)))
            .user_agent(concat!("lesson-replay/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("webhook HTTP client: {e}"))?;
        Ok(Sender { client, deadline })
    }

    /// Send `body` as event `id` to `destination`, signed now.
    pub async fn send(&self, destination: &Destination, id: &str, body: &[u8]) -> Attempt {
        let started = Instant::now();
        let timestamp = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_secs() as i64);
        let signed = signature(&destination.secrets, id, timestamp, body);
        let request = self
            .client
            .post(destination.url.clone())
            .header(CONTENT_TYPE, "application/json")
            .header("webhook-id", id)
            .header("webhook-timestamp", timestamp.to_string())
            .header("webhook-signature", signed)
            .body(body.to_vec());
        let outcome = tokio::time::timeout(self.deadline, async {
            let response = request.send().await?;
            let status = response.status().as_u16();
            let headers = response.headers().clone();
            let answer = read_bounded(response).await;
            Ok::<_, reqwest::Error>((status, headers, answer))
        })
        .await;
        let elapsed = started.elapsed();
        match outcome {
            Err(_) => Attempt {
                status: None,
                verdict: Verdict::Retry { at_least: None },
                elapsed,
                explanation: format!(
                    "no complete answer within {} s",
                    self.deadline.as_secs_f64()
                ),
                answer: String::new(),
            },
            Ok(Err(e)) => Attempt {
                status: None,
                verdict: Verdict::Retry { at_least: None },
                elapsed,
                explanation: format!("no answer: {}", describe(e)),
                answer: String::new(),
            },
            Ok(Ok((status, headers, answer))) => {
                let quoted = quote(&answer);
                let verdict = judge(status, headers.get(RETRY_AFTER), SystemTime::now());
                let explanation = match (status, headers.get(LOCATION)) {
                    (300..=399, Some(to)) => format!(
                        "answered {status}, a redirect to {:?}: not followed",
                        quote(to.as_bytes())
                    ),
                    _ if quoted.is_empty() => format!("answered {status}"),
                    _ => format!("answered {status}: {quoted}"),
                };
                Attempt {
                    status: Some(status),
                    verdict,
                    elapsed,
                    explanation,
                    answer: quoted,
                }
            }
        }
    }
}

/// What an answer's status (and `Retry-After`) means for the event.
pub fn judge(status: u16, retry_after: Option<&HeaderValue>, now: SystemTime) -> Verdict {
    match status {
        200..=299 => Verdict::Delivered,
        410 => Verdict::Gone,
        429 | 502 | 503 | 504 => Verdict::Retry {
            at_least: retry_after.and_then(|v| retry_after_of(v, now)),
        },
        _ => Verdict::Retry { at_least: None },
    }
}

/// `Retry-After` as seconds or as an HTTP date.
fn retry_after_of(value: &HeaderValue, now: SystemTime) -> Option<Duration> {
    let text = value.to_str().ok()?.trim();
    if let Ok(seconds) = text.parse::<u64>() {
        return Some(Duration::from_secs(seconds));
    }
    let at = httpdate::parse_http_date(text).ok()?;
    Some(at.duration_since(now).unwrap_or_default())
}

/// The answer's body, read to [`MAX_ANSWER_BYTES`] at most. What cannot be
/// read (the connection cut) is what was read so far.
async fn read_bounded(mut response: reqwest::Response) -> Vec<u8> {
    let mut body = Vec::new();
    while body.len() < MAX_ANSWER_BYTES {
        match response.chunk().await {
            Ok(Some(chunk)) => {
                let room = MAX_ANSWER_BYTES - body.len();
                body.extend_from_slice(&chunk[..chunk.len().min(room)]);
            }
            Ok(None) | Err(_) => break,
        }
    }
    body
}

/// The start of an answer, printable, on one line.
fn quote(answer: &[u8]) -> String {
    String::from_utf8_lossy(&answer[..answer.len().min(QUOTED_ANSWER)])
        .chars()
        .map(|c| if c.is_control() { ' ' } else { c })
        .collect::<String>()
        .trim()
        .to_owned()
}

/// A transport error with its causes, without the URL: a token in its
/// query would travel into logs and the parking queue's headers.
fn describe(error: reqwest::Error) -> String {
    error_chain(&error.without_url())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn statuses_are_judged_as_the_specification_says() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_800_000_000);
        assert_eq!(judge(204, None, now), Verdict::Delivered);
        assert_eq!(judge(410, None, now), Verdict::Gone);
        for status in [301, 302, 307, 400, 404, 500] {
            assert_eq!(judge(status, None, now), Verdict::Retry { at_least: None });
        }
        let seconds = HeaderValue::from_static("120");
        assert_eq!(
            judge(429, Some(&seconds), now),
            Verdict::Retry {
                at_least: Some(Duration::from_secs(120))
            }
        );
        let date =
            HeaderValue::from_str(&httpdate::fmt_http_date(now + Duration::from_secs(90))).unwrap();
        assert_eq!(
            judge(503, Some(&date), now),
            Verdict::Retry {
                at_least: Some(Duration::from_secs(90))
            }
        );
        // Only where the specification gives it a meaning.
        assert_eq!(
            judge(500, Some(&seconds), now),
            Verdict::Retry { at_least: None }
        );
        let nonsense = HeaderValue::from_static("soon");
        assert_eq!(
            judge(429, Some(&nonsense), now),
            Verdict::Retry { at_least: None }
        );
    }
}
