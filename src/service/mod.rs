//! The services: what wires the decision, the edges and the settings into a
//! running process. [`run`] is the one place that starts one, with its
//! endpoints and its shutdown; the command line and the tests both call it.

pub mod endpoints;
pub mod ingress;
pub mod run;
pub mod watches;
pub mod worker;
