//! RESP framing, in one place: the command-boundary scanner for the replication stream, the parser for
//! commands that clients and replicas send us, and the encoders for the replies we write.
//!
//! The hot path (the master's stream) never builds frames: [`scan_command`] only finds where a command
//! ends and recognises the few commands whose boundaries matter to replication (MULTI, EXEC, DISCARD,
//! REPLCONF GETACK). Client commands are rare and small, so [`parse_command`] returns owned arguments.

use bytes::{BufMut, Bytes, BytesMut};

/// Bulk strings from the master are not capped by `proto-max-bulk-len` in Redis (the master client is
/// exempt), but a length beyond this is certainly garbage, not data.
pub const MAX_UPSTREAM_BULK: usize = 4 << 30;
/// Redis's default `proto-max-bulk-len` (512mb) applies to what clients and replicas send us.
pub const MAX_CLIENT_BULK: usize = 512 << 20;
/// Redis refuses multibulk counts above 1024*1024 from clients that are not the master.
pub const MAX_CLIENT_ARGS: usize = 1024 * 1024;
/// Redis's `PROTO_INLINE_MAX_SIZE`: an inline command (or an unterminated header line) longer than this
/// is a protocol error.
pub const MAX_INLINE: usize = 64 * 1024;
/// redis-server's caps before `AUTH` when a password is required (`processMultibulkBuffer`): more
/// arguments or a longer bulk closes the connection, so an anonymous client cannot make it buffer more.
pub const UNAUTHENTICATED_MAX_ARGS: usize = 10;
pub const UNAUTHENTICATED_MAX_BULK: usize = 16 * 1024;

/// How large a client command may be: [`CommandLimits::AUTHENTICATED`] once the client may run
/// commands, [`CommandLimits::UNAUTHENTICATED`] before `AUTH` when a password is required.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct CommandLimits {
    pub max_args: usize,
    pub max_bulk: usize,
    pub authenticated: bool,
}

impl CommandLimits {
    pub const AUTHENTICATED: CommandLimits =
        CommandLimits { max_args: MAX_CLIENT_ARGS, max_bulk: MAX_CLIENT_BULK, authenticated: true };
    pub const UNAUTHENTICATED: CommandLimits =
        CommandLimits { max_args: UNAUTHENTICATED_MAX_ARGS, max_bulk: UNAUTHENTICATED_MAX_BULK, authenticated: false };
}

/// Why a byte sequence is not valid RESP.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum ProtocolError {
    #[error("expected '{expected}', got byte 0x{got:02x} at stream position {at}")]
    UnexpectedByte { expected: char, got: u8, at: usize },
    #[error("invalid length in {what} header: {line:?}")]
    BadLength { what: &'static str, line: String },
    #[error("{what} length {len} exceeds the limit of {limit}")]
    TooLong { what: &'static str, len: usize, limit: usize },
    #[error("bulk string not terminated by CRLF at stream position {at}")]
    MissingCrlf { at: usize },
    #[error("header line longer than {MAX_INLINE} bytes")]
    LineTooLong,
    #[error("unbalanced quotes in inline command")]
    UnbalancedQuotes,
    /// redis-server's wording: `Protocol error: unauthenticated multibulk length` / `... bulk length`.
    #[error("unauthenticated {what} length")]
    Unauthenticated { what: &'static str },
}

/// What kind of command a scanned stream command is, as far as replication cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StreamCommand {
    Multi,
    Exec,
    Discard,
    /// `REPLCONF GETACK *`: the master asks for an immediate ACK.
    GetAck,
    Other,
}

/// A complete command found at the start of a buffer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Scanned {
    /// Bytes the command occupies, including its final CRLF.
    pub len: usize,
    pub kind: StreamCommand,
}

/// How far a scan got into a command that is not complete yet, so the next scan resumes there
/// instead of walking every argument header again (a propagated command with millions of
/// arguments arrives over many reads). Positions are relative to the command's first byte.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PartialCommand {
    argc: usize,
    next_arg: usize,
    pos: usize,
    kind: StreamCommand,
    first_is_replconf: bool,
}

/// Finds the first command in `buf`, which must start with `*` (the master only ever sends multibulk).
/// Returns `Ok(None)` when the command is not complete yet. `base` is only used in error messages.
pub fn scan_command(buf: &[u8], base: usize) -> Result<Option<Scanned>, ProtocolError> {
    scan_command_from(buf, base, &mut None)
}

/// [`scan_command`], resuming from and saving to `partial` when the command is incomplete.
pub fn scan_command_from(
    buf: &[u8],
    base: usize,
    partial: &mut Option<PartialCommand>,
) -> Result<Option<Scanned>, ProtocolError> {
    let mut state = match partial.take() {
        Some(state) => state,
        None => {
            let Some((argc, pos)) = read_header(buf, 0, b'*', "multibulk", MAX_CLIENT_ARGS * 1024, base)? else {
                return Ok(None);
            };
            PartialCommand { argc, next_arg: 0, pos, kind: StreamCommand::Other, first_is_replconf: false }
        }
    };
    while state.next_arg < state.argc {
        let Some((len, start)) = read_header(buf, state.pos, b'$', "bulk", MAX_UPSTREAM_BULK, base)? else {
            *partial = Some(state);
            return Ok(None);
        };
        let end = start + len;
        if buf.len() < end + 2 {
            *partial = Some(state);
            return Ok(None);
        }
        if &buf[end..end + 2] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf { at: base + end });
        }
        let arg = &buf[start..end];
        match state.next_arg {
            0 => {
                state.first_is_replconf = arg.eq_ignore_ascii_case(b"REPLCONF");
                state.kind = if arg.eq_ignore_ascii_case(b"MULTI") {
                    StreamCommand::Multi
                } else if arg.eq_ignore_ascii_case(b"EXEC") {
                    StreamCommand::Exec
                } else if arg.eq_ignore_ascii_case(b"DISCARD") {
                    StreamCommand::Discard
                } else {
                    StreamCommand::Other
                };
            }
            1 if state.first_is_replconf && arg.eq_ignore_ascii_case(b"GETACK") => {
                state.kind = StreamCommand::GetAck;
            }
            _ => {}
        }
        state.pos = end + 2;
        state.next_arg += 1;
    }
    Ok(Some(Scanned { len: state.pos, kind: state.kind }))
}

/// Reads a `<prefix><number>\r\n` header at `pos`. Returns the number and the position after the CRLF.
fn read_header(
    buf: &[u8],
    pos: usize,
    prefix: u8,
    what: &'static str,
    limit: usize,
    base: usize,
) -> Result<Option<(usize, usize)>, ProtocolError> {
    let Some(&first) = buf.get(pos) else {
        return Ok(None);
    };
    if first != prefix {
        return Err(ProtocolError::UnexpectedByte { expected: prefix as char, got: first, at: base + pos });
    }
    let Some(line_end) = find_crlf(&buf[pos..]) else {
        if buf.len() - pos > 32 {
            return Err(ProtocolError::BadLength { what, line: lossy(&buf[pos..pos + 32]) });
        }
        return Ok(None);
    };
    let digits = &buf[pos + 1..pos + line_end];
    let value = string2ll(digits)
        .filter(|v| *v >= 0)
        .ok_or_else(|| ProtocolError::BadLength { what, line: lossy(&buf[pos..pos + line_end]) })?
        as usize;
    if value > limit {
        return Err(ProtocolError::TooLong { what, len: value, limit });
    }
    Ok(Some((value, pos + line_end + 2)))
}

/// Position of the first `\r\n` in `buf`.
pub fn find_crlf(buf: &[u8]) -> Option<usize> {
    buf.windows(2).position(|w| w == b"\r\n")
}

/// The longest decimal redis-server parses as a number (`LONG_STR_SIZE` - 1: `-9223372036854775808`).
const MAX_DECIMAL_LEN: usize = 20;

/// A decimal exactly as redis-server's `string2ll` reads one, the one parser of every number a peer
/// sends (RESP lengths, `PSYNC` offsets, `REPLCONF` ports and ACKs, command arguments): an optional
/// `-`, then `0` alone or a first digit 1-9 and more digits, nothing else (no `+`, no spaces, no
/// leading zeros, no `-0`), and within `i64`. A strict form means every accepted text is the
/// canonical spelling of its value.
pub fn string2ll(text: &[u8]) -> Option<i64> {
    if text.is_empty() || text.len() > MAX_DECIMAL_LEN {
        return None;
    }
    if text == b"0" {
        return Some(0);
    }
    let (negative, digits) = match text.split_first() {
        Some((b'-', rest)) => (true, rest),
        _ => (false, text),
    };
    match digits.first() {
        Some(b'1'..=b'9') => {}
        _ => return None,
    }
    // Accumulated negatively, so `i64::MIN` (whose magnitude `i64` cannot hold) fits.
    let mut value: i64 = 0;
    for &digit in digits {
        if !digit.is_ascii_digit() {
            return None;
        }
        value = value.checked_mul(10)?.checked_sub(i64::from(digit - b'0'))?;
    }
    if negative {
        Some(value)
    } else {
        value.checked_neg()
    }
}

/// [`string2ll`] of a command argument, for callers holding text.
pub fn string2ll_str(text: &str) -> Option<i64> {
    string2ll(text.as_bytes())
}

fn lossy(bytes: &[u8]) -> String {
    String::from_utf8_lossy(bytes).into_owned()
}

/// A command from a client or a downstream replica: its arguments, and how many bytes it used.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ClientCommand {
    pub args: Vec<Bytes>,
}

impl ClientCommand {
    /// The command name, upper-cased for matching.
    pub fn name(&self) -> String {
        self.args.first().map(|a| String::from_utf8_lossy(a).to_ascii_uppercase()).unwrap_or_default()
    }

    /// Argument `i` as lossy UTF-8 (empty when absent).
    pub fn arg_str(&self, i: usize) -> String {
        self.args.get(i).map(|a| String::from_utf8_lossy(a).into_owned()).unwrap_or_default()
    }
}

/// Takes one command off the front of `buf`: multibulk, or inline like redis-server accepts (an empty
/// inline line yields a command with no arguments). `Ok(None)` means more bytes are needed.
pub fn parse_command(buf: &mut BytesMut) -> Result<Option<ClientCommand>, ProtocolError> {
    parse_command_within(buf, CommandLimits::AUTHENTICATED)
}

/// [`parse_command`] with the caps of `limits`; a header over an unauthenticated cap is refused as
/// soon as the header is complete, before any of its payload is buffered.
pub fn parse_command_within(buf: &mut BytesMut, limits: CommandLimits) -> Result<Option<ClientCommand>, ProtocolError> {
    let Some(&first) = buf.first() else {
        return Ok(None);
    };
    if first != b'*' {
        return parse_inline(buf);
    }
    let Some((argc, mut pos)) = read_header(buf, 0, b'*', "multibulk", MAX_CLIENT_ARGS, 0)? else {
        return Ok(None);
    };
    if argc > limits.max_args {
        return Err(if limits.authenticated {
            ProtocolError::TooLong { what: "multibulk", len: argc, limit: limits.max_args }
        } else {
            ProtocolError::Unauthenticated { what: "multibulk" }
        });
    }
    let mut spans = Vec::with_capacity(argc.min(64));
    for _ in 0..argc {
        let Some((len, start)) = read_header(buf, pos, b'$', "bulk", MAX_CLIENT_BULK, 0)? else {
            return Ok(None);
        };
        if len > limits.max_bulk {
            return Err(if limits.authenticated {
                ProtocolError::TooLong { what: "bulk", len, limit: limits.max_bulk }
            } else {
                ProtocolError::Unauthenticated { what: "bulk" }
            });
        }
        if buf.len() < start + len + 2 {
            return Ok(None);
        }
        if &buf[start + len..start + len + 2] != b"\r\n" {
            return Err(ProtocolError::MissingCrlf { at: start + len });
        }
        spans.push((start, len));
        pos = start + len + 2;
    }
    let frame = buf.split_to(pos).freeze();
    let args = spans.into_iter().map(|(start, len)| frame.slice(start..start + len)).collect();
    Ok(Some(ClientCommand { args }))
}

fn parse_inline(buf: &mut BytesMut) -> Result<Option<ClientCommand>, ProtocolError> {
    let Some(newline) = buf.iter().position(|&b| b == b'\n') else {
        if buf.len() > MAX_INLINE {
            return Err(ProtocolError::LineTooLong);
        }
        return Ok(None);
    };
    let line = buf.split_to(newline + 1);
    let line = line.strip_suffix(b"\n").unwrap_or(&line);
    let line = line.strip_suffix(b"\r").unwrap_or(line);
    Ok(Some(ClientCommand { args: split_inline(line)? }))
}

/// Splits an inline command line into arguments, honouring double and single quotes like `sdssplitargs`.
fn split_inline(line: &[u8]) -> Result<Vec<Bytes>, ProtocolError> {
    let mut args = Vec::new();
    let mut i = 0;
    while i < line.len() {
        while i < line.len() && line[i].is_ascii_whitespace() {
            i += 1;
        }
        if i == line.len() {
            break;
        }
        let mut arg = Vec::new();
        match line[i] {
            quote @ (b'"' | b'\'') => {
                i += 1;
                loop {
                    match line.get(i) {
                        None => return Err(ProtocolError::UnbalancedQuotes),
                        Some(&c) if c == quote => {
                            i += 1;
                            break;
                        }
                        Some(b'\\') if quote == b'"' && i + 1 < line.len() => {
                            arg.push(match line[i + 1] {
                                b'n' => b'\n',
                                b'r' => b'\r',
                                b't' => b'\t',
                                other => other,
                            });
                            i += 2;
                        }
                        Some(&c) => {
                            arg.push(c);
                            i += 1;
                        }
                    }
                }
            }
            _ => {
                while i < line.len() && !line[i].is_ascii_whitespace() {
                    arg.push(line[i]);
                    i += 1;
                }
            }
        }
        args.push(Bytes::from(arg));
    }
    Ok(args)
}

/// Encodes a command as RESP multibulk, the form every handshake command is sent in.
pub fn encode_command(args: &[&[u8]]) -> Bytes {
    let mut out = BytesMut::with_capacity(16 + args.iter().map(|a| a.len() + 16).sum::<usize>());
    out.put_slice(format!("*{}\r\n", args.len()).as_bytes());
    for arg in args {
        out.put_slice(format!("${}\r\n", arg.len()).as_bytes());
        out.put_slice(arg);
        out.put_slice(b"\r\n");
    }
    out.freeze()
}

/// A reply we write to a client; encoded with [`Reply::encode`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Reply {
    Simple(String),
    Error(String),
    Integer(i64),
    Bulk(Bytes),
    Nil,
    Array(Vec<Reply>),
    /// A RESP3 map (`%`), only for clients that asked for RESP3 with `HELLO 3`.
    Map(Vec<(Reply, Reply)>),
}

impl Reply {
    pub fn ok() -> Reply {
        Reply::Simple("OK".into())
    }

    pub fn error(message: impl Into<String>) -> Reply {
        Reply::Error(message.into())
    }

    pub fn bulk(text: impl Into<Bytes>) -> Reply {
        Reply::Bulk(text.into())
    }

    pub fn encode(&self, out: &mut BytesMut) {
        match self {
            Reply::Simple(s) => put_line(out, b'+', s.as_bytes()),
            Reply::Error(s) => put_line(out, b'-', s.as_bytes()),
            Reply::Integer(n) => put_line(out, b':', n.to_string().as_bytes()),
            Reply::Bulk(b) => {
                put_line(out, b'$', b.len().to_string().as_bytes());
                out.put_slice(b);
                out.put_slice(b"\r\n");
            }
            Reply::Nil => out.put_slice(b"$-1\r\n"),
            Reply::Array(items) => {
                put_line(out, b'*', items.len().to_string().as_bytes());
                for item in items {
                    item.encode(out);
                }
            }
            Reply::Map(pairs) => {
                put_line(out, b'%', pairs.len().to_string().as_bytes());
                for (key, value) in pairs {
                    key.encode(out);
                    value.encode(out);
                }
            }
        }
    }
}

fn put_line(out: &mut BytesMut, prefix: u8, body: &[u8]) {
    out.put_u8(prefix);
    // A simple string or error must stay on one line whatever the text.
    out.extend(body.iter().map(|&b| if b == b'\r' || b == b'\n' { b' ' } else { b }));
    out.put_slice(b"\r\n");
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cmd(args: &[&str]) -> Vec<u8> {
        encode_command(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>()).to_vec()
    }

    #[test]
    fn scan_finds_boundaries_and_kinds() {
        let mut stream = cmd(&["MULTI"]);
        stream.extend(cmd(&["SET", "k", "v"]));
        stream.extend(cmd(&["exec"]));
        stream.extend(cmd(&["REPLCONF", "GETACK", "*"]));
        let mut pos = 0;
        let mut kinds = vec![];
        while let Some(s) = scan_command(&stream[pos..], pos).unwrap() {
            kinds.push(s.kind);
            pos += s.len;
        }
        assert_eq!(pos, stream.len());
        use StreamCommand::*;
        assert_eq!(kinds, vec![Multi, Other, Exec, GetAck]);
    }

    #[test]
    fn scan_waits_for_incomplete_commands() {
        let full = cmd(&["SET", "key", "a-longer-value"]);
        for cut in 0..full.len() {
            assert_eq!(scan_command(&full[..cut], 0).unwrap(), None, "cut at {cut}");
        }
        assert_eq!(scan_command(&full, 0).unwrap().map(|s| s.len), Some(full.len()));
    }

    #[test]
    fn scan_rejects_garbage() {
        assert!(matches!(scan_command(b"+OK\r\n", 0), Err(ProtocolError::UnexpectedByte { .. })));
        assert!(matches!(scan_command(b"*1\r\n$3\r\nSETxx", 0), Err(ProtocolError::MissingCrlf { .. })));
        assert!(matches!(scan_command(b"*x\r\n", 0), Err(ProtocolError::BadLength { .. })));
        assert!(matches!(scan_command(b"*1\r\n$-5\r\n", 0), Err(ProtocolError::BadLength { .. })));
        assert!(matches!(scan_command(b"*1\r\n$99999999999\r\n", 0), Err(ProtocolError::TooLong { .. })));
    }

    #[test]
    fn parse_multibulk_and_inline() {
        let mut buf = BytesMut::from(&cmd(&["REPLCONF", "listening-port", "6380"])[..]);
        buf.extend_from_slice(b"SYNC\r\n\n PING  \"a b\\n\" 'c'\r\n*2\r\n$4\r\nPI");
        let c = parse_command(&mut buf).unwrap().unwrap();
        assert_eq!(c.name(), "REPLCONF");
        assert_eq!(c.arg_str(2), "6380");
        assert_eq!(parse_command(&mut buf).unwrap().unwrap().name(), "SYNC");
        assert!(parse_command(&mut buf).unwrap().unwrap().args.is_empty());
        let c = parse_command(&mut buf).unwrap().unwrap();
        assert_eq!(c.args, vec![Bytes::from("PING"), Bytes::from("a b\n"), Bytes::from("c")]);
        assert_eq!(parse_command(&mut buf).unwrap(), None);
    }

    #[test]
    fn parse_caps_client_lengths() {
        let mut buf = BytesMut::from(&b"*1\r\n$536870913\r\n"[..]);
        assert!(matches!(parse_command(&mut buf), Err(ProtocolError::TooLong { .. })));
        let mut buf = BytesMut::from(&b"*99999999\r\n"[..]);
        assert!(matches!(parse_command(&mut buf), Err(ProtocolError::TooLong { .. })));
    }

    #[test]
    fn unauthenticated_caps_are_redis_servers() {
        let eleven: Vec<&str> = std::iter::repeat_n("x", 11).collect();
        let mut buf = BytesMut::from(&cmd(&eleven)[..5]);
        assert_eq!(
            parse_command_within(&mut buf, CommandLimits::UNAUTHENTICATED),
            Err(ProtocolError::Unauthenticated { what: "multibulk" })
        );
        let ten: Vec<&str> = std::iter::repeat_n("x", 10).collect();
        let mut buf = BytesMut::from(&cmd(&ten)[..]);
        assert!(parse_command_within(&mut buf, CommandLimits::UNAUTHENTICATED).unwrap().is_some());
        // Refused on the header alone: the 16 KiB + 1 payload never has to arrive.
        let mut buf = BytesMut::from(&b"*2\r\n$4\r\nAUTH\r\n$16385\r\n"[..]);
        assert_eq!(
            parse_command_within(&mut buf, CommandLimits::UNAUTHENTICATED),
            Err(ProtocolError::Unauthenticated { what: "bulk" })
        );
        let big = "y".repeat(16384);
        let mut buf = BytesMut::from(&cmd(&["AUTH", &big])[..]);
        assert!(parse_command_within(&mut buf, CommandLimits::UNAUTHENTICATED).unwrap().is_some());
    }

    #[test]
    fn decimals_parse_as_string2ll() {
        assert_eq!(string2ll(b"0"), Some(0));
        assert_eq!(string2ll(b"1234"), Some(1234));
        assert_eq!(string2ll(b"-1"), Some(-1));
        assert_eq!(string2ll(b"9223372036854775807"), Some(i64::MAX));
        assert_eq!(string2ll(b"-9223372036854775808"), Some(i64::MIN));
        for bad in [
            &b""[..],
            b"-",
            b"12a",
            b"+3",
            b" 1",
            b"1 ",
            b"01",
            b"-0",
            b"-01",
            b"00",
            b"9223372036854775808",
            b"-9223372036854775809",
            b"18446744073709551616",
            b"100000000000000000000",
        ] {
            assert_eq!(string2ll(bad), None, "{:?}", String::from_utf8_lossy(bad));
        }
    }

    #[test]
    fn replies_encode() {
        let mut out = BytesMut::new();
        Reply::Array(vec![Reply::bulk("a"), Reply::Integer(3), Reply::Nil, Reply::error("ERR x\r\ny")])
            .encode(&mut out);
        assert_eq!(&out[..], b"*4\r\n$1\r\na\r\n:3\r\n$-1\r\n-ERR x  y\r\n");
    }

    /// The scanner agrees with an independent RESP2 decoder (redis-protocol) on where every command
    /// of a random stream ends, whatever the prefix given.
    #[test]
    fn scanner_agrees_with_redis_protocol_on_random_streams() {
        use rand::Rng;
        let mut rng = rand::rng();
        for _ in 0..200 {
            let mut stream = Vec::new();
            for _ in 0..rng.random_range(1..20) {
                let argc = rng.random_range(1..6);
                let args: Vec<Vec<u8>> =
                    (0..argc).map(|_| (0..rng.random_range(0..300)).map(|_| rng.random::<u8>()).collect()).collect();
                stream.extend(encode_command(&args.iter().map(|a| a.as_slice()).collect::<Vec<_>>()));
            }
            let mut ours = Vec::new();
            let mut pos = 0;
            while let Some(scanned) = scan_command(&stream[pos..], pos).unwrap() {
                pos += scanned.len;
                ours.push(pos);
            }
            let mut theirs = Vec::new();
            let mut pos = 0;
            while let Some((_, len)) = redis_protocol::resp2::decode::decode(&stream[pos..]).unwrap() {
                pos += len;
                theirs.push(pos);
            }
            assert_eq!(ours, theirs);
            assert_eq!(pos, stream.len());
            let cut = rng.random_range(0..stream.len());
            let complete_before_cut = ours.iter().filter(|end| **end <= cut).count();
            let mut pos = 0;
            let mut found = 0;
            while let Some(scanned) = scan_command(&stream[pos..cut], pos).unwrap() {
                pos += scanned.len;
                found += 1;
            }
            assert_eq!(found, complete_before_cut, "cut at {cut}");
        }
    }
}
