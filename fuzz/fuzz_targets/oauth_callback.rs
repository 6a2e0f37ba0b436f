//! The query string of `GET /oauth/callback`, through axum's `Query`
//! extractor and the callback's checks. Bytes that are not UTF-8 are decoded
//! lossily, so every input reaches the parser.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::fuzzing;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::oauth_callback_query(&String::from_utf8_lossy(data));
});
