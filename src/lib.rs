//! lesson-replay: TIC "recording finished" messages in, lesson-replay records out.
//!
//! The crate is four rooms and the services that wire them. Imports only run
//! downwards in this list:
//!
//! - [`decision`] — pure, no I/O: [`decision::decide::decide`] turns a message
//!   body and its envelope into a [`decision::decide::Decision`]: decode (four
//!   JSON formats) → verify (signature) → normalize (durations, repairs, ids)
//!   → layout → URL policy (every VOD URL allowed). The record, reason codes and warning codes live here.
//! - [`preview`] — the replay page: a record rendered as one self-contained
//!   HTML file that plays its tracks with their layout.
//! - [`telemetry`] — every metric, with its labels as closed enums.
//! - [`media`] and [`broker`] — the edges. [`media`] checks every track against
//!   its file over HTTP (fetch, guard, probe) and archives it to S3; [`broker`]
//!   speaks AMQP (connection, headers, topology, delay tiers, parking queue);
//!   [`webhook`] tells a school's backend over HTTP: its events, their
//!   Standard Webhooks signature, one attempt to send one.
//! - [`config`] — the settings: loaded once, validated, and turned into the
//!   typed settings of each part above.
//! - [`service`] — the running services: [`service::worker`] consumes a
//!   message (enters), calls `decide` (decided), lets [`media`] check its
//!   files, then publishes the record (and its webhook event), sends the message to a delay tier or
//!   parks it (leaves) and only then acknowledges it. [`service::run`] starts
//!   a service with its health endpoints and shutdown; [`cli`] parses the
//!   command line and calls it.

pub mod broker;
pub mod cli;
pub mod config;
pub mod decision;
pub mod media;
pub mod preview;
pub mod service;
pub mod telemetry;
pub mod tic;
pub mod webhook;
