//! Webhooks: a school's backend told over HTTP that a lesson's replay is
//! ready, or that it could not be made, as the Standard Webhooks
//! specification says (<https://www.standardwebhooks.com>).
//!
//! - [`event`] — pure: the events (`lesson.replay_ready`,
//!   `lesson.replay_failed`, `webhook.test`), their bodies and their ids;
//! - [`sign`] — pure: the `whsec_` secrets and the `webhook-signature`;
//! - [`send`] — one attempt: POST, a deadline, no redirects, the answer's
//!   body read to a bound and dropped, the status judged.
//!
//! The delivery itself — durable retries through the broker's delay queues,
//! one lane per app, parking — is the worker's webhook feed
//! (`service/worker/webhooks.rs`).

pub mod event;
pub mod send;
pub mod sign;
