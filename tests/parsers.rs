//! Property tests of everything that parses a peer's bytes: client commands (multibulk and inline),
//! the replication stream's command scanner, and the RDB checks (header, EOF opcode, CRC-64, key
//! count), and the one number parser (`string2ll`, redis-server's). Random inputs from fixed seeds, so a failure names its seed and repeats; each property
//! runs a few thousand cases in `cargo test`. For longer, coverage-guided runs see `fuzz/README.md`.

use bytes::BytesMut;
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};

use redis_relay::protocol::{encode_command, parse_command, scan_command, scan_command_from, string2ll, ClientCommand};
use redis_relay::snapshot::format::RdbVerifier;

const CASES: u64 = 2000;

/// Arguments of random bytes, CR, LF, `*` and `$` included: binary-safe framing must not care.
fn random_args(rng: &mut StdRng) -> Vec<Vec<u8>> {
    let argc = rng.random_range(1..8);
    (0..argc)
        .map(|_| {
            let len = if rng.random_bool(0.05) { rng.random_range(0..5000) } else { rng.random_range(0..24) };
            (0..len)
                .map(|_| match rng.random_range(0..10) {
                    0 => b'\r',
                    1 => b'\n',
                    2 => b'*',
                    3 => b'$',
                    _ => rng.random(),
                })
                .collect()
        })
        .collect()
}

fn encode(args: &[Vec<u8>]) -> Vec<u8> {
    let refs: Vec<&[u8]> = args.iter().map(Vec::as_slice).collect();
    encode_command(&refs).to_vec()
}

/// Feeds `bytes` to `parse_command` in random pieces, as reads would deliver them.
fn parse_in_pieces(rng: &mut StdRng, bytes: &[u8]) -> Vec<ClientCommand> {
    let mut buf = BytesMut::new();
    let mut commands = Vec::new();
    let mut at = 0;
    while at < bytes.len() {
        let n = rng.random_range(1..=64.min(bytes.len() - at));
        buf.extend_from_slice(&bytes[at..at + n]);
        at += n;
        while let Some(command) = parse_command(&mut buf).expect("a well-formed pipeline parses") {
            commands.push(command);
        }
    }
    assert!(buf.is_empty(), "every byte of a complete pipeline is consumed");
    commands
}

#[test]
fn client_commands_split_anywhere_parse_as_sent() {
    for seed in 0..CASES {
        let mut rng = StdRng::seed_from_u64(seed);
        let sent: Vec<Vec<Vec<u8>>> = (0..rng.random_range(1..6)).map(|_| random_args(&mut rng)).collect();
        let bytes: Vec<u8> = sent.iter().flat_map(|args| encode(args)).collect();
        let parsed = parse_in_pieces(&mut rng, &bytes);
        let parsed: Vec<Vec<Vec<u8>>> =
            parsed.into_iter().map(|c| c.args.into_iter().map(|a| a.to_vec()).collect()).collect();
        assert_eq!(parsed, sent, "seed {seed}");
    }
}

#[test]
fn inline_commands_split_anywhere_parse_as_sent() {
    for seed in 0..CASES {
        let mut rng = StdRng::seed_from_u64(seed);
        let words: Vec<String> = (0..rng.random_range(1..6))
            .map(|_| (0..rng.random_range(1..10)).map(|_| rng.random_range(b'a'..=b'z') as char).collect())
            .collect();
        let line = format!("{}\r\n", words.join(" "));
        let parsed = parse_in_pieces(&mut rng, line.as_bytes());
        assert_eq!(parsed.len(), 1, "seed {seed}");
        let args: Vec<String> = parsed[0].args.iter().map(|a| String::from_utf8_lossy(a).into_owned()).collect();
        assert_eq!(args, words, "seed {seed}");
    }
}

/// Random bytes, and valid commands with random damage: the parser answers (a command, a request
/// for more bytes, or an error) without panicking, and every command it returns consumed bytes.
#[test]
fn garbage_never_panics_the_client_parser() {
    for seed in 0..CASES * 5 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut bytes = if rng.random_bool(0.5) {
            (0..rng.random_range(0..200)).map(|_| rng.random()).collect::<Vec<u8>>()
        } else {
            encode(&random_args(&mut rng))
        };
        for _ in 0..rng.random_range(0..4) {
            if !bytes.is_empty() {
                let at = rng.random_range(0..bytes.len());
                bytes[at] = rng.random();
            }
        }
        let mut buf = BytesMut::from(&bytes[..]);
        loop {
            let before = buf.len();
            match parse_command(&mut buf) {
                Ok(Some(_)) => assert!(buf.len() < before, "seed {seed}: a command that consumed nothing"),
                Ok(None) | Err(_) => break,
            }
        }
    }
}

#[test]
fn the_stream_scanner_finds_each_command_however_it_arrives() {
    for seed in 0..CASES {
        let mut rng = StdRng::seed_from_u64(seed);
        let command = encode(&random_args(&mut rng));
        let whole = scan_command(&command, 0).expect("scans").expect("complete");
        assert_eq!(whole.len, command.len(), "seed {seed}");
        // Growing prefixes, resumed from the saved partial state, as reads arrive.
        let mut partial = None;
        let mut end = 0;
        loop {
            end = (end + rng.random_range(1..=32)).min(command.len());
            match scan_command_from(&command[..end], 0, &mut partial).expect("a prefix is not an error") {
                None => assert!(end < command.len(), "seed {seed}: the whole command is complete"),
                Some(found) => {
                    assert_eq!((found.len, end), (command.len(), command.len()), "seed {seed}");
                    break;
                }
            }
        }
        // With more commands behind it, the scanner still stops at this one's end.
        let mut two = command.clone();
        two.extend_from_slice(&encode(&random_args(&mut rng)));
        assert_eq!(scan_command(&two, 0).expect("scans").map(|s| s.len), Some(command.len()), "seed {seed}");
    }
}

#[test]
fn garbage_never_panics_the_stream_scanner() {
    for seed in 0..CASES * 5 {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut bytes = encode(&random_args(&mut rng));
        for _ in 0..rng.random_range(1..4) {
            let at = rng.random_range(0..bytes.len());
            bytes[at] = rng.random();
        }
        let cut = rng.random_range(0..=bytes.len());
        if let Ok(Some(found)) = scan_command(&bytes[..cut], 0) {
            assert!(found.len <= cut, "seed {seed}: a command longer than its buffer");
        }
    }
}

/// A small RDB as redis-server 7.0 writes it: header, aux fields, a database with RESIZEDB and
/// string keys, EOF, CRC-64 trailer.
fn rdb_with_keys(keys: usize) -> Vec<u8> {
    let mut rdb = b"REDIS0010".to_vec();
    rdb.extend_from_slice(&[0xFA, 9]);
    rdb.extend_from_slice(b"redis-ver");
    rdb.push(6);
    rdb.extend_from_slice(b"7.0.15");
    rdb.extend_from_slice(&[0xFE, 0]); // SELECTDB 0
    rdb.extend_from_slice(&[0xFB, keys as u8, 0]); // RESIZEDB: keys, expires
    for i in 0..keys {
        let key = format!("key:{i}");
        let value = format!("value:{i}");
        rdb.push(0); // string type
        rdb.push(key.len() as u8);
        rdb.extend_from_slice(key.as_bytes());
        rdb.push(value.len() as u8);
        rdb.extend_from_slice(value.as_bytes());
    }
    rdb.push(0xFF);
    let crc = crc::Crc::<u64>::new(&crc::CRC_64_REDIS).checksum(&rdb);
    rdb.extend_from_slice(&crc.to_le_bytes());
    rdb
}

fn verify_in_pieces(rng: &mut StdRng, bytes: &[u8]) -> Result<redis_relay::snapshot::format::RdbFacts, String> {
    let mut verifier = RdbVerifier::default();
    let mut at = 0;
    while at < bytes.len() {
        let n = rng.random_range(1..=17.min(bytes.len() - at));
        verifier.update(&bytes[at..at + n]);
        at += n;
    }
    verifier.finish().map_err(|e| e.to_string())
}

#[test]
fn an_rdb_in_any_pieces_verifies_and_counts_its_keys() {
    for seed in 0..CASES / 4 {
        let mut rng = StdRng::seed_from_u64(seed);
        let keys = rng.random_range(0..60);
        let rdb = rdb_with_keys(keys);
        let facts = verify_in_pieces(&mut rng, &rdb).unwrap_or_else(|e| panic!("seed {seed}: {e}"));
        assert_eq!((facts.version, facts.size), (10, rdb.len() as u64), "seed {seed}");
        assert_eq!((facts.keys.keys, facts.keys.exact), (keys as u64, true), "seed {seed}");
    }
}

/// Any flipped byte or truncation of an RDB is refused: the header, the EOF opcode or the CRC-64
/// catches it (CRC-64 detects every error burst of up to 64 bits).
#[test]
fn any_damage_to_an_rdb_is_refused() {
    let rdb = rdb_with_keys(20);
    let mut rng = StdRng::seed_from_u64(7);
    for at in 0..rdb.len() {
        for _ in 0..3 {
            let mut damaged = rdb.clone();
            damaged[at] ^= rng.random_range(1..=255u8);
            assert!(verify_in_pieces(&mut rng, &damaged).is_err(), "a flip at byte {at} passed");
        }
    }
    for cut in 0..rdb.len() {
        assert!(verify_in_pieces(&mut rng, &rdb[..cut]).is_err(), "a cut at {cut} passed");
    }
}

#[test]
fn garbage_never_panics_the_rdb_checks() {
    for seed in 0..CASES {
        let mut rng = StdRng::seed_from_u64(seed);
        let mut bytes = rdb_with_keys(rng.random_range(0..10));
        // Damage after the header too, so the key counter walks nonsense lengths and types.
        for _ in 0..rng.random_range(1..8) {
            let at = rng.random_range(0..bytes.len());
            bytes[at] = rng.random();
        }
        if rng.random_bool(0.3) {
            bytes.extend((0..rng.random_range(0..300)).map(|_| rng.random::<u8>()));
        }
        let _ = verify_in_pieces(&mut rng, &bytes);
    }
}

/// The reference for `string2ll`: redis-server documents it as accepting exactly the texts that are
/// the canonical spelling of an `i64` (what `%lld` prints), so parse leniently and print back.
fn string2ll_model(text: &[u8]) -> Option<i64> {
    let text = std::str::from_utf8(text).ok()?;
    let value: i64 = text.parse().ok()?;
    (value.to_string() == text).then_some(value)
}

/// Texts near the edges of the grammar: signs, zeros, spaces, the `i64` limits and one past them.
fn random_decimal_text(rng: &mut StdRng) -> Vec<u8> {
    match rng.random_range(0..4) {
        0 => rng.random::<i64>().to_string().into_bytes(),
        1 => {
            let edges = [i64::MIN, i64::MAX, 0, 1, -1, i64::MIN + 1, i64::MAX - 1];
            let mut text = edges[rng.random_range(0..edges.len())].to_string().into_bytes();
            // One digit changed, added or dropped: just past a limit, or a leading zero.
            match rng.random_range(0..4) {
                0 => text.push(rng.random_range(b'0'..=b'9')),
                1 => text.insert(0, rng.random_range(b'0'..=b'9')),
                2 if !text.is_empty() => {
                    let at = rng.random_range(0..text.len());
                    text[at] = rng.random_range(b'0'..=b'9');
                }
                _ => {}
            }
            text
        }
        _ => {
            const ALPHABET: &[u8] = b"0123456789000--+ \t\r\nx.e";
            let len = rng.random_range(0..23);
            (0..len).map(|_| ALPHABET[rng.random_range(0..ALPHABET.len())]).collect()
        }
    }
}

#[test]
fn string2ll_accepts_exactly_the_canonical_i64_texts() {
    for seed in 0..CASES * 10 {
        let mut rng = StdRng::seed_from_u64(seed);
        let text = random_decimal_text(&mut rng);
        assert_eq!(string2ll(&text), string2ll_model(&text), "seed {seed}: {:?}", String::from_utf8_lossy(&text));
    }
    for text in ["+100", "0100", "-0", " 1", "1 ", "", "-", "9223372036854775808", "-9223372036854775809"] {
        assert_eq!(string2ll(text.as_bytes()), None, "{text:?}");
    }
    assert_eq!(string2ll(b"-9223372036854775808"), Some(i64::MIN));
    // The RESP headers go through it too: redis-server answers "invalid multibulk/bulk length".
    for bad in [&b"*01\r\n$4\r\nPING\r\n"[..], b"*+1\r\n$4\r\nPING\r\n", b"*1\r\n$04\r\nPING\r\n"] {
        assert!(parse_command(&mut BytesMut::from(bad)).is_err(), "{:?}", String::from_utf8_lossy(bad));
    }
}
