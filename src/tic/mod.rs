//! The TIC API edge: TIC's real-time recording HTTP API (contract §2), signed
//! the way TIC signs (contract §1). [`client::TicClient`] is what the
//! `lesson-replay tic …` commands call, and what a service can call.

pub mod client;
