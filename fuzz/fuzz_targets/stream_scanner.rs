//! The replication stream's command scanner from any bytes, whole and resumed.
#![no_main]

use libfuzzer_sys::fuzz_target;
use redis_relay::protocol::{scan_command, scan_command_from};

fuzz_target!(|data: &[u8]| {
    let whole = scan_command(data, 0);
    if let Ok(Some(found)) = &whole {
        assert!(found.len <= data.len());
    }
    // Resumed over growing prefixes, the scanner agrees with one scan of the whole.
    let mut partial = None;
    for end in (1..=data.len()).step_by(7).chain(std::iter::once(data.len())) {
        match scan_command_from(&data[..end], 0, &mut partial) {
            Ok(Some(found)) => {
                if let Ok(Some(expected)) = &whole {
                    assert_eq!(found.len, expected.len);
                }
                break;
            }
            Ok(None) => {}
            Err(_) => break,
        }
    }
});
