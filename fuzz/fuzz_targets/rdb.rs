//! The RDB checks (header, key counter, EOF opcode, CRC-64) from any bytes, in two pieces.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redis_relay::snapshot::format::RdbVerifier;

fuzz_target!(|data: &[u8]| {
    let mut verifier = RdbVerifier::default();
    let split = data.len() / 3;
    verifier.update(&data[..split]);
    verifier.update(&data[split..]);
    let _ = verifier.finish();
});
