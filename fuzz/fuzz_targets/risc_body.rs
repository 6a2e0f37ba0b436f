//! The body of `POST /risc`: size and UTF-8 checks, then the RS256 JWT parser
//! up to the signature check (the key cache holds no keys and never touches
//! the network).

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::fuzzing;

fuzz_target!(|data: &[u8]| {
    let _ = fuzzing::risc_body(data);
});
