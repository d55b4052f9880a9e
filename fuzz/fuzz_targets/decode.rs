//! Fuzzes what the daemon does with bytes from a client: frame headers, the handshake and
//! request bodies. It must never panic.
#![no_main]

libfuzzer_sys::fuzz_target!(|data: &[u8]| {
    portres_proto::fuzz_decode(data);
});
