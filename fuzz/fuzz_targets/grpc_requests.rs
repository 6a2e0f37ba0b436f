//! Every request message of the `tokenvault.v1` API, decoded from arbitrary
//! bytes and, when it decodes, parsed as the RPC's handler parses it. The
//! first byte picks the RPC; the rest is the message.

#![no_main]

use libfuzzer_sys::fuzz_target;
use tokenvault::fuzzing::{self, Rpc};

fuzz_target!(|data: &[u8]| {
    let Some((&pick, message)) = data.split_first() else {
        return;
    };
    let rpc = Rpc::ALL[usize::from(pick) % Rpc::ALL.len()];
    let _ = fuzzing::grpc_request(rpc, message);
});
