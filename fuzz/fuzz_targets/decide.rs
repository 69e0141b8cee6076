//! Any bytes, as a message body with any header values: parse + verify +
//! normalize + layout must return a decision, never panic or hang.
#![no_main]

use libfuzzer_sys::fuzz_target;
use lesson_replay::decision::decide::{Envelope, InputPolicy, decide};

fuzz_target!(|input: (&[u8], Option<String>, Option<String>, Option<i64>)| {
    let (body, sign, sdkappid, timestamp) = input;
    let envelope = Envelope { sign, sdkappid, timestamp };
    let _ = decide(body, &envelope, &InputPolicy::default());
});
