//! Client commands (multibulk and inline) from any bytes, whole and split in two reads.
#![no_main]

use bytes::BytesMut;
use libfuzzer_sys::fuzz_target;
use redis_relay::protocol::{parse_command, ClientCommand};

/// Commands taken off `buf` until it needs more bytes (`Ok`) or fails (`Err`).
fn drain(buf: &mut BytesMut, out: &mut Vec<ClientCommand>) -> Result<(), ()> {
    loop {
        match parse_command(buf) {
            Ok(Some(command)) => out.push(command),
            Ok(None) => return Ok(()),
            Err(_) => return Err(()),
        }
    }
}

fuzz_target!(|data: &[u8]| {
    let mut whole = Vec::new();
    let whole_ok = drain(&mut BytesMut::from(data), &mut whole);
    let split = data.len() / 2;
    let mut buf = BytesMut::from(&data[..split]);
    let mut pieces = Vec::new();
    let mut pieces_ok = drain(&mut buf, &mut pieces);
    if pieces_ok.is_ok() {
        buf.extend_from_slice(&data[split..]);
        pieces_ok = drain(&mut buf, &mut pieces);
    }
    // Where neither failed, how the bytes were read changes nothing.
    if whole_ok.is_ok() && pieces_ok.is_ok() {
        assert_eq!(whole, pieces);
    }
});
