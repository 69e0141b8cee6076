//! The decision: what one inbound message becomes, as pure functions with no
//! I/O. [`decide::decide`] is the entry point; the other modules are its stages
//! and the vocabulary (record, reason codes, warning codes) every other room uses.

pub mod callback;
pub mod decide;
pub mod decode;
pub mod layout;
pub mod normalize;
pub mod reason;
pub mod record;
pub mod url_policy;
pub mod verify;
pub mod warning;
pub mod watch;
