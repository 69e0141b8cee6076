//! lesson-replay: TIC "recording finished" messages in, lesson-replay records out.
//!
//! A message flows through the modules in this order:
//!
//! 1. [`worker`] consumes it from RabbitMQ ([`broker`] holds the AMQP details);
//! 2. [`pipeline::decide`] turns it into a decision, with no I/O:
//!    [`decode`] (four JSON formats) → [`verify`] (signature) →
//!    [`normalize`] (durations, repairs, ids) + [`layout`] (screen layout);
//! 3. [`media`] checks every track against its file — [`fetch`] (HTTP, behind
//!    the [`guard`]), [`probe`] (MP4 `moov`), [`archive`] (S3) — and fills the record;
//! 4. [`worker`] publishes the [`record::Record`], sends the message to a delay
//!    tier ([`retry`]) or parks it with a [`reason::ReasonCode`], then acknowledges it.
//!
//! Around them: [`config`] (settings), [`topology`] (queues and exchanges as
//! data), [`metrics`] (Prometheus and health endpoints), [`dlq`] (operator
//! tools for the parking queue), [`cli`] (the commands).

pub mod archive;
pub mod broker;
pub mod cli;
pub mod config;
pub mod decode;
pub mod dlq;
pub mod fetch;
pub mod guard;
pub mod layout;
pub mod media;
pub mod metrics;
pub mod normalize;
pub mod pipeline;
pub mod probe;
pub mod reason;
pub mod record;
pub mod retry;
pub mod topology;
pub mod verify;
pub mod worker;
