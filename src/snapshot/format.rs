//! The RDB facts the relay checks, apart from any I/O: the header (`REDIS%04d` as Redis and Valkey up
//! to 8.x write it, `VALKEY%03d` as Valkey 9 writes RDB 80 and later), the `0xFF` EOF opcode,
//! and the CRC-64 trailer (Jones polynomial, `CRC_64_REDIS`, stored little-endian; zero means the
//! master runs with `rdbchecksum no` and loaders skip the check). Also the snapshot metadata file.

use std::io::Read as _;

use crc::{Crc, Digest, CRC_64_REDIS};
use serde::{Deserialize, Serialize};

use crate::offset::Position;

static CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_REDIS);

const REDIS_MAGIC: &[u8] = b"REDIS";
const VALKEY_MAGIC: &[u8] = b"VALKEY";
/// The newest RDB version under the `REDIS` magic: 12, Redis 7.4 and 8.x (`rdb.h`). Valkey reserves
/// 12 to 79 for such formats and never writes them.
pub const NEWEST_REDIS_RDB_VERSION: u32 = 12;
/// Valkey writes its own versions from 80 (9.0) under the `VALKEY` magic (`rdbUseValkeyMagic`:
/// above its foreign range 12..=79); 81 is 9.2's.
pub const FIRST_VALKEY_RDB_VERSION: u32 = 80;
pub const NEWEST_VALKEY_RDB_VERSION: u32 = 81;
const HEADER_LEN: usize = 9;
const EOF_OPCODE: u8 = 0xFF;
const TRAILER_LEN: usize = 9;

/// Why an RDB payload is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RdbError {
    #[error("payload of {0} bytes is too short to be an RDB")]
    TooShort(u64),
    #[error("bad signature {0:?} (expected REDIS<4 digits> or VALKEY<3 digits>)")]
    BadMagic(String),
    #[error(
        "RDB version {version} under the {magic} signature is not one the relay knows (REDIS 1 to \
         {NEWEST_REDIS_RDB_VERSION}, VALKEY {FIRST_VALKEY_RDB_VERSION} to {NEWEST_VALKEY_RDB_VERSION}): \
         it cannot check it"
    )]
    UnknownVersion { magic: &'static str, version: u32 },
    #[error("RDB does not end with the EOF opcode 0xFF (found 0x{0:02x})")]
    MissingEof(u8),
    #[error("CRC-64 mismatch: trailer says {stored:016x}, content gives {computed:016x}")]
    CrcMismatch { stored: u64, computed: u64 },
    #[error("cannot filter the RDB: {0}")]
    Filter(String),
}

/// Opcodes of redis 7.0's `rdb.h` that may come before the keyspace.
const OPCODE_FUNCTION2: u8 = 245;
const OPCODE_FUNCTION_PRE_GA: u8 = 246;
const OPCODE_MODULE_AUX: u8 = 247;
const OPCODE_AUX: u8 = 250;

/// What `REPLCONF rdb-filter-only` keeps (redis 7.0): nothing but the header and aux fields (`""`),
/// or also the function libraries (`functions`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct RdbFilter {
    pub functions: bool,
}

impl RdbFilter {
    /// Parses the option's value as redis-server does: space-separated names, only `functions`.
    pub fn parse(value: &str) -> Result<RdbFilter, String> {
        let mut filter = RdbFilter::default();
        for name in value.split_whitespace() {
            if name.eq_ignore_ascii_case("functions") {
                filter.functions = true;
            } else {
                return Err(name.to_string());
            }
        }
        Ok(filter)
    }
}

/// Reads `n` bytes of `input` into `out`.
fn copy_exact(input: &mut impl std::io::Read, out: &mut Vec<u8>, n: u64) -> Result<(), RdbError> {
    let start = out.len();
    let taken = input.take(n).read_to_end(out).map_err(|e| RdbError::Filter(e.to_string()))?;
    if taken as u64 != n {
        out.truncate(start);
        return Err(RdbError::Filter("the RDB ends inside a record".into()));
    }
    Ok(())
}

/// Copies one RDB length (`rdbLoadLen`) to `out`; returns it, or `None` for a special encoding
/// (with the encoding type).
fn copy_length(input: &mut impl std::io::Read, out: &mut Vec<u8>) -> Result<Result<u64, u8>, RdbError> {
    let at = out.len();
    copy_exact(input, out, 1)?;
    let first = out[at];
    Ok(match first >> 6 {
        0 => Ok(u64::from(first & 0x3F)),
        1 => {
            copy_exact(input, out, 1)?;
            Ok((u64::from(first & 0x3F) << 8) | u64::from(out[at + 1]))
        }
        2 if first == 0x80 => {
            copy_exact(input, out, 4)?;
            Ok(u64::from(u32::from_be_bytes([out[at + 1], out[at + 2], out[at + 3], out[at + 4]])))
        }
        2 if first == 0x81 => {
            copy_exact(input, out, 8)?;
            let mut bytes = [0u8; 8];
            bytes.copy_from_slice(&out[at + 1..at + 9]);
            Ok(u64::from_be_bytes(bytes))
        }
        2 => return Err(RdbError::Filter(format!("unknown length encoding 0x{first:02x}"))),
        _ => Err(first & 0x3F),
    })
}

/// Copies one RDB string (`rdbGenericLoadStringObject`: plain, integer or LZF encoded) to `out`.
fn copy_string(input: &mut impl std::io::Read, out: &mut Vec<u8>) -> Result<(), RdbError> {
    match copy_length(input, out)? {
        Ok(len) => copy_exact(input, out, len),
        Err(0) => copy_exact(input, out, 1),
        Err(1) => copy_exact(input, out, 2),
        Err(2) => copy_exact(input, out, 4),
        Err(3) => {
            let compressed = copy_length(input, out)?.map_err(|_| RdbError::Filter("bad LZF length".into()))?;
            copy_length(input, out)?.map_err(|_| RdbError::Filter("bad LZF length".into()))?;
            copy_exact(input, out, compressed)
        }
        Err(other) => Err(RdbError::Filter(format!("unknown string encoding {other}"))),
    }
}

/// Builds the RDB that `REPLCONF rdb-filter-only` asks for from a whole one: its header and aux
/// fields, the function libraries when `filter.functions`, no keys, then EOF and a fresh CRC-64.
/// Redis 7.0 saves aux fields and functions before the first database, so only that prefix is read.
pub fn filter_rdb(input: &mut impl std::io::Read, filter: RdbFilter) -> Result<Vec<u8>, RdbError> {
    let mut out = Vec::with_capacity(4096);
    copy_exact(input, &mut out, HEADER_LEN as u64)?;
    parse_header(&out)?;
    loop {
        let mut opcode = Vec::with_capacity(1);
        copy_exact(input, &mut opcode, 1)?;
        match opcode[0] {
            OPCODE_AUX => {
                out.push(OPCODE_AUX);
                copy_string(input, &mut out)?;
                copy_string(input, &mut out)?;
            }
            OPCODE_FUNCTION2 => {
                let mut record = vec![OPCODE_FUNCTION2];
                copy_string(input, &mut record)?;
                if filter.functions {
                    out.extend_from_slice(&record);
                }
            }
            OPCODE_FUNCTION_PRE_GA | OPCODE_MODULE_AUX => {
                return Err(RdbError::Filter(format!("opcode {} before the keyspace is not supported", opcode[0])));
            }
            // SELECTDB, RESIZEDB, a key, or EOF: the keyspace (or the end) begins.
            _ => break,
        }
    }
    out.push(EOF_OPCODE);
    let crc = CRC64.checksum(&out);
    out.extend_from_slice(&crc.to_le_bytes());
    Ok(out)
}

/// Checks an RDB as it streams by: feed every byte with [`RdbVerifier::update`], then [`RdbVerifier::finish`].
///
/// The checksum covers everything but the last 8 bytes, and the end is only known at the end (EOF-marked
/// payloads), so the last 8 bytes seen are held back from the digest.
pub struct RdbVerifier {
    digest: Digest<'static, u64>,
    header: Vec<u8>,
    held: Vec<u8>,
    /// The last byte given to the digest: the EOF opcode once the whole RDB has been seen.
    last_digested: u8,
    total: u64,
    keys: KeyCounter,
}

/// What a verified RDB says about itself.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RdbFacts {
    pub version: u32,
    pub size: u64,
    /// As stored in the trailer (0 when the master does not checksum).
    pub crc64: u64,
    /// As computed over the content, whatever the trailer says: what the cache checks on reopen.
    pub content_crc64: u64,
    pub keys: KeyCount,
}

impl Default for RdbVerifier {
    fn default() -> Self {
        RdbVerifier {
            digest: CRC64.digest(),
            header: Vec::with_capacity(HEADER_LEN),
            held: Vec::new(),
            last_digested: 0,
            total: 0,
            keys: KeyCounter::default(),
        }
    }
}

impl RdbVerifier {
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
        self.keys.update(data);
        if self.header.len() < HEADER_LEN {
            let take = (HEADER_LEN - self.header.len()).min(data.len());
            self.header.extend_from_slice(&data[..take]);
        }
        // Release held bytes that are no longer among the last eight.
        if data.len() >= 8 {
            let held = std::mem::take(&mut self.held);
            self.digest_bytes(&held);
            self.held = held;
            self.held.clear();
            let (body, tail) = data.split_at(data.len() - 8);
            self.digest_bytes(body);
            data = tail;
        }
        self.held.extend_from_slice(data);
        if self.held.len() > 8 {
            let release = self.held.len() - 8;
            let released: Vec<u8> = self.held.drain(..release).collect();
            self.digest_bytes(&released);
        }
    }

    /// The keys seen so far (exact once the whole RDB has been fed).
    pub fn keys(&self) -> KeyCount {
        self.keys.count()
    }

    fn digest_bytes(&mut self, bytes: &[u8]) {
        if let Some(&last) = bytes.last() {
            self.last_digested = last;
        }
        self.digest.update(bytes);
    }

    pub fn finish(self) -> Result<RdbFacts, RdbError> {
        if self.total < (HEADER_LEN + TRAILER_LEN) as u64 || self.held.len() != 8 {
            return Err(RdbError::TooShort(self.total));
        }
        let version = parse_header(&self.header)?;
        let stored = u64::from_le_bytes(self.held[..8].try_into().map_err(|_| RdbError::TooShort(self.total))?);
        if self.last_digested != EOF_OPCODE {
            return Err(RdbError::MissingEof(self.last_digested));
        }
        let computed = self.digest.finalize();
        if stored != 0 && stored != computed {
            return Err(RdbError::CrcMismatch { stored, computed });
        }
        Ok(RdbFacts { version, size: self.total, crc64: stored, content_crc64: computed, keys: self.keys.count() })
    }
}

/// The RDB version of a 9-byte header: `REDIS` and four digits, or `VALKEY` and three (both fixed
/// width, as `snprintf` writes them), within the versions the relay knows for that signature.
pub fn parse_header(header: &[u8]) -> Result<u32, RdbError> {
    let bad = || RdbError::BadMagic(String::from_utf8_lossy(header).into_owned());
    let header = header.get(..HEADER_LEN).ok_or_else(bad)?;
    let (magic, known, digits) = if let Some(digits) = header.strip_prefix(VALKEY_MAGIC) {
        ("VALKEY", FIRST_VALKEY_RDB_VERSION..=NEWEST_VALKEY_RDB_VERSION, digits)
    } else if let Some(digits) = header.strip_prefix(REDIS_MAGIC) {
        ("REDIS", 1..=NEWEST_REDIS_RDB_VERSION, digits)
    } else {
        return Err(bad());
    };
    if !digits.iter().all(u8::is_ascii_digit) {
        return Err(bad());
    }
    let version = digits.iter().fold(0u32, |v, d| v * 10 + u32::from(d - b'0'));
    if !known.contains(&version) {
        return Err(RdbError::UnknownVersion { magic, version });
    }
    Ok(version)
}

/// The header a master of this RDB version writes (`REDIS0011`, `VALKEY080`).
pub fn header_for(version: u32) -> String {
    if version >= FIRST_VALKEY_RDB_VERSION {
        format!("VALKEY{version:03}")
    } else {
        format!("REDIS{version:04}")
    }
}

/// How many keys an RDB holds, as read while it streams by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default, Serialize, Deserialize)]
pub struct KeyCount {
    pub keys: u64,
    /// False when the walk stopped at an encoding it cannot skip (a module type without the self-
    /// describing format, a type newer than the relay): `keys` is then a lower bound made of the
    /// entries counted so far and the `RESIZEDB` sizes of the databases seen.
    pub exact: bool,
}

/// One thing the walker expects next. The stack holds them in reverse order of reading.
#[derive(Debug, Clone, Copy)]
enum Expect {
    /// A string: length-prefixed, an encoded integer, or LZF-compressed.
    Str,
    /// `n` items of one kind.
    Repeat(u64, Item),
    /// A length whose value says how many `Item`s follow.
    CountOf(Item),
    /// Raw bytes to pass over.
    Skip(u64),
    /// One length-encoded number to pass over.
    Len,
    /// A double as `rdbSaveDoubleValue` writes it: a length byte (253..=255 for NaN and the
    /// infinities) and that many ASCII bytes.
    OldDouble,
    /// The opcodes of a module value (`RDB_TYPE_MODULE_2`), up to `RDB_MODULE_OPCODE_EOF`.
    ModuleOpcodes,
}

/// A repeated element.
#[derive(Debug, Clone, Copy)]
enum Item {
    Str,
    /// String then a string-encoded double (`RDB_TYPE_ZSET`).
    StrAndOldDouble,
    /// String then an 8-byte double (`RDB_TYPE_ZSET_2`).
    StrAndDouble,
    /// Container format then a string (`RDB_TYPE_LIST_QUICKLIST_2`).
    LenAndStr,
    /// A pair of strings (hash fields, stream listpack keys and values).
    StrPair,
    /// A stream consumer group (`version` 1..=3 of the stream type).
    StreamGroup(u8),
    /// A pending-entries-list entry of a group: 16-byte id, 8-byte delivery time, delivery count.
    GroupPel,
    /// A consumer (`version` 3 adds the active time).
    StreamConsumer(u8),
    /// A consumer's PEL entry: a 16-byte id.
    ConsumerPel,
}

/// Counts the keys of an RDB as its bytes stream by, without holding more than a few bytes: each
/// value is passed over by its encoding, so a key costs a few header reads whatever its size.
///
/// The count is of key entries; a database's `RESIZEDB` size stands in when the walk cannot finish.
#[derive(Debug)]
pub struct KeyCounter {
    /// Unread bytes shorter than the next header (at most a few dozen).
    pending: Vec<u8>,
    skip: u64,
    stack: Vec<Expect>,
    header_left: Option<usize>,
    counted: u64,
    /// Keys counted and RESIZEDB size of the database being read.
    db_counted: u64,
    db_resize: u64,
    /// Sum over finished databases of max(counted, RESIZEDB).
    bound: u64,
    done: bool,
    stopped: bool,
}

/// `rdbLoadLen`: returns (value, is_encoded, bytes used).
fn parse_len(bytes: &[u8]) -> Option<(u64, bool, usize)> {
    let first = *bytes.first()?;
    match first >> 6 {
        0 => Some(((first & 0x3F) as u64, false, 1)),
        1 => Some(((((first & 0x3F) as u64) << 8) | *bytes.get(1)? as u64, false, 2)),
        2 if first == 0x80 => {
            let b: [u8; 4] = bytes.get(1..5)?.try_into().ok()?;
            Some((u32::from_be_bytes(b) as u64, false, 5))
        }
        2 if first == 0x81 => {
            let b: [u8; 8] = bytes.get(1..9)?.try_into().ok()?;
            Some((u64::from_be_bytes(b), false, 9))
        }
        // An unknown length form: reported as encoded type 0xFF, which no caller accepts.
        2 => Some((0xFF, true, 1)),
        _ => Some(((first & 0x3F) as u64, true, 1)),
    }
}

impl Default for KeyCounter {
    fn default() -> Self {
        KeyCounter {
            pending: Vec::new(),
            skip: 0,
            stack: Vec::new(),
            header_left: Some(HEADER_LEN),
            counted: 0,
            db_counted: 0,
            db_resize: 0,
            bound: 0,
            done: false,
            stopped: false,
        }
    }
}

impl KeyCounter {
    /// The count so far; exact once the EOF opcode has been read.
    pub fn count(&self) -> KeyCount {
        if self.done {
            return KeyCount { keys: self.counted, exact: true };
        }
        KeyCount { keys: self.bound + self.db_counted.max(self.db_resize), exact: false }
    }

    fn finish_db(&mut self) {
        self.bound += self.db_counted.max(self.db_resize);
        self.db_counted = 0;
        self.db_resize = 0;
    }

    fn stop(&mut self) {
        self.stopped = true;
        self.pending = Vec::new();
        self.stack.clear();
    }

    pub fn update(&mut self, mut data: &[u8]) {
        while !data.is_empty() && !self.done && !self.stopped {
            if let Some(left) = self.header_left {
                let take = left.min(data.len());
                data = &data[take..];
                self.header_left = if left == take { None } else { Some(left - take) };
                continue;
            }
            if self.skip > 0 {
                let take = self.skip.min(data.len() as u64);
                self.skip -= take;
                data = &data[take as usize..];
                continue;
            }
            if self.pending.is_empty() {
                // Straight from the caller's bytes; only a header cut by the chunk's end is copied.
                match self.step(data) {
                    Some(used) => data = &data[used.min(data.len())..],
                    None => {
                        if !self.stopped {
                            self.pending.extend_from_slice(data);
                        }
                        return;
                    }
                }
                continue;
            }
            // Complete the cut header a little at a time: headers are at most 19 bytes.
            let take = data.len().min(32usize.saturating_sub(self.pending.len()).max(1));
            self.pending.extend_from_slice(&data[..take]);
            data = &data[take..];
            self.drain_pending();
        }
    }

    /// Reads the next expected thing from the front of `bytes`: how many bytes it took, or `None`
    /// when `bytes` ends inside its header.
    fn step(&mut self, bytes: &[u8]) -> Option<usize> {
        match self.stack.pop() {
            None => self.top_level(bytes),
            Some(expect) => {
                let used = self.expected(expect, bytes);
                if used.is_none() && !self.stopped {
                    self.stack.push(expect);
                }
                used
            }
        }
    }

    /// Parses what `pending` holds; leaves an incomplete header there for the next bytes.
    fn drain_pending(&mut self) {
        let mut pending = std::mem::take(&mut self.pending);
        while !(self.done || self.stopped || pending.is_empty()) {
            if self.skip > 0 {
                let take = self.skip.min(pending.len() as u64) as usize;
                self.skip -= take as u64;
                pending.drain(..take);
                continue;
            }
            match self.step(&pending) {
                Some(used) => {
                    pending.drain(..used.min(pending.len()));
                }
                None => break,
            }
        }
        if !self.stopped {
            self.pending = pending;
        }
    }

    /// A top-level opcode or a value type (then the key and the value).
    fn top_level(&mut self, bytes: &[u8]) -> Option<usize> {
        let opcode = *bytes.first()?;
        match opcode {
            0xFF => {
                self.finish_db();
                self.done = true;
                Some(1)
            }
            0xFE => {
                let (_, _, n) = parse_len(&bytes[1..])?;
                self.finish_db();
                Some(1 + n)
            }
            0xFB => {
                let (db_size, _, a) = parse_len(&bytes[1..])?;
                let (_, _, b) = parse_len(&bytes[1 + a..])?;
                self.db_resize = db_size;
                Some(1 + a + b)
            }
            0xFA => {
                self.stack.extend([Expect::Str, Expect::Str]);
                Some(1)
            }
            0xFD => {
                self.skip = 4;
                Some(1)
            }
            0xFC => {
                self.skip = 8;
                Some(1)
            }
            0xF9 => {
                self.skip = 1;
                Some(1)
            }
            0xF8 => {
                self.stack.push(Expect::Len);
                Some(1)
            }
            0xF7 => {
                // MODULE_AUX: module id, `when` opcode and value, then the module's opcodes.
                self.stack.extend([Expect::ModuleOpcodes, Expect::Len, Expect::Len, Expect::Len]);
                Some(1)
            }
            0xF5 => {
                self.stack.push(Expect::Str);
                Some(1)
            }
            0xF4 => {
                // SLOT_INFO: slot id, slot size, expires slot size.
                self.stack.extend([Expect::Len, Expect::Len, Expect::Len]);
                Some(1)
            }
            value_type => {
                let value = match value_type {
                    0 | 9..=13 | 16 | 17 | 20 => Expect::Str,
                    1 | 2 | 14 => Expect::CountOf(Item::Str),
                    3 => Expect::CountOf(Item::StrAndOldDouble),
                    4 => Expect::CountOf(Item::StrPair),
                    5 => Expect::CountOf(Item::StrAndDouble),
                    7 => {
                        self.stack.push(Expect::ModuleOpcodes);
                        Expect::Len
                    }
                    18 => Expect::CountOf(Item::LenAndStr),
                    15 | 19 | 21 => {
                        let version = match value_type {
                            15 => 1,
                            19 => 2,
                            _ => 3,
                        };
                        // Consumer groups last, then the stream's metadata, then its listpacks.
                        self.stack.push(Expect::CountOf(Item::StreamGroup(version)));
                        let metadata_lens = if version >= 2 { 8 } else { 3 };
                        for _ in 0..metadata_lens {
                            self.stack.push(Expect::Len);
                        }
                        Expect::CountOf(Item::StrPair)
                    }
                    _ => {
                        self.stop();
                        return None;
                    }
                };
                self.counted += 1;
                self.db_counted += 1;
                self.stack.push(value);
                self.stack.push(Expect::Str);
                Some(1)
            }
        }
    }

    fn expected(&mut self, expect: Expect, bytes: &[u8]) -> Option<usize> {
        match expect {
            Expect::Skip(n) => {
                self.skip = n;
                Some(0)
            }
            Expect::Len => parse_len(bytes).map(|(_, _, n)| n),
            Expect::OldDouble => {
                let len = *bytes.first()?;
                if len < 253 {
                    self.skip = len as u64;
                }
                Some(1)
            }
            Expect::Str => {
                let (len, encoded, n) = parse_len(bytes)?;
                if !encoded {
                    self.skip = len;
                    return Some(n);
                }
                match len {
                    0 => self.skip = 1,
                    1 => self.skip = 2,
                    2 => self.skip = 4,
                    3 => {
                        let (compressed, _, a) = parse_len(&bytes[n..])?;
                        let (_, _, b) = parse_len(&bytes[n + a..])?;
                        self.skip = compressed;
                        return Some(n + a + b);
                    }
                    _ => {
                        self.stop();
                        return Some(0);
                    }
                }
                Some(n)
            }
            Expect::CountOf(item) => {
                let (count, _, n) = parse_len(bytes)?;
                self.stack.push(Expect::Repeat(count, item));
                Some(n)
            }
            Expect::Repeat(0, _) => Some(0),
            Expect::Repeat(left, item) => {
                self.stack.push(Expect::Repeat(left - 1, item));
                self.push_item(item);
                Some(0)
            }
            Expect::ModuleOpcodes => {
                let (opcode, _, n) = parse_len(bytes)?;
                match opcode {
                    0 => return Some(n),
                    1 | 2 => self.stack.extend([Expect::ModuleOpcodes, Expect::Len]),
                    3 => self.stack.extend([Expect::ModuleOpcodes, Expect::Skip(4)]),
                    4 => self.stack.extend([Expect::ModuleOpcodes, Expect::Skip(8)]),
                    5 => self.stack.extend([Expect::ModuleOpcodes, Expect::Str]),
                    _ => {
                        self.stop();
                        return Some(0);
                    }
                }
                Some(n)
            }
        }
    }

    /// Pushes the parts of one `item`, the first part read last pushed.
    fn push_item(&mut self, item: Item) {
        let parts: &[Expect] = match item {
            Item::Str => &[Expect::Str],
            Item::StrPair => &[Expect::Str, Expect::Str],
            Item::StrAndDouble => &[Expect::Skip(8), Expect::Str],
            Item::LenAndStr => &[Expect::Str, Expect::Len],
            Item::GroupPel => &[Expect::Len, Expect::Skip(24)],
            Item::ConsumerPel => &[Expect::Skip(16)],
            Item::StrAndOldDouble => &[Expect::OldDouble, Expect::Str],
            Item::StreamGroup(version) => {
                self.stack.push(Expect::CountOf(Item::StreamConsumer(version)));
                self.stack.push(Expect::CountOf(Item::GroupPel));
                if version >= 2 {
                    self.stack.push(Expect::Len);
                }
                &[Expect::Len, Expect::Len, Expect::Str]
            }
            Item::StreamConsumer(version) => {
                self.stack.push(Expect::CountOf(Item::ConsumerPel));
                if version >= 3 {
                    self.stack.push(Expect::Skip(8));
                }
                &[Expect::Skip(8), Expect::Str]
            }
        };
        self.stack.extend_from_slice(parts);
    }
}

/// The metadata stored beside a cached RDB (`snapshot.meta`, YAML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// The master's replid announced with `+FULLRESYNC`.
    pub replid: String,
    /// The master offset the RDB was produced at (the `+FULLRESYNC` offset).
    pub offset: Position,
    pub size: u64,
    pub rdb_version: u32,
    /// CRC-64 as stored in the RDB trailer (0 when the master does not checksum).
    pub crc64: u64,
    /// CRC-64 computed over the content on receipt, so a cached file is checked on reopen even when
    /// the master runs with `rdbchecksum no`.
    pub content_crc64: u64,
    /// Unix seconds when the relay finished receiving it.
    pub created_unix: u64,
    /// Keys the RDB holds (absent in metadata written before the relay counted them: counted on
    /// reopen).
    #[serde(default)]
    pub keys: Option<KeyCount>,
    /// Where it came from: `master` or `replica <ip:port>` (empty in metadata written before
    /// snapshot sources existed).
    #[serde(default)]
    pub source: String,
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;

    /// A tiny but well-formed RDB: header, one aux field, EOF, checksum.
    pub fn sample_rdb() -> Vec<u8> {
        let mut rdb = b"REDIS0010".to_vec();
        rdb.extend_from_slice(&[0xFA, 9]);
        rdb.extend_from_slice(b"redis-ver");
        rdb.extend_from_slice(&[6]);
        rdb.extend_from_slice(b"7.0.15");
        rdb.push(0xFF);
        let crc = CRC64.checksum(&rdb);
        rdb.extend_from_slice(&crc.to_le_bytes());
        rdb
    }

    fn verify_in_pieces(rdb: &[u8], piece: usize) -> Result<RdbFacts, RdbError> {
        let mut v = RdbVerifier::default();
        for chunk in rdb.chunks(piece) {
            v.update(chunk);
        }
        v.finish()
    }

    #[test]
    fn accepts_good_rdb_in_any_split() {
        let rdb = sample_rdb();
        for piece in 1..rdb.len() + 1 {
            let facts = verify_in_pieces(&rdb, piece).unwrap();
            assert_eq!(facts.version, 10);
            assert_eq!(facts.size, rdb.len() as u64);
        }
    }

    #[test]
    fn headers_of_redis_and_valkey_within_known_versions() {
        for (header, version) in [
            (&b"REDIS0001"[..], 1),
            (b"REDIS0010", 10),
            (b"REDIS0011", 11),
            (b"REDIS0012", 12),
            (b"VALKEY080", 80),
            (b"VALKEY081", 81),
        ] {
            assert_eq!(parse_header(header), Ok(version), "{}", String::from_utf8_lossy(header));
            assert_eq!(header_for(version).as_bytes(), header);
        }
        for (header, magic, version) in [
            (&b"REDIS0013"[..], "REDIS", 13),
            (b"REDIS0080", "REDIS", 80),
            (b"VALKEY011", "VALKEY", 11),
            (b"VALKEY082", "VALKEY", 82),
        ] {
            assert_eq!(parse_header(header), Err(RdbError::UnknownVersion { magic, version }));
        }
        for bad in
            [&b"REDIS001"[..], b"REDIS 011", b"REDIS+011", b"VALKEY80 ", b"VALKEY8.0", b"KEYDB0011", b"valkey080"]
        {
            let short_or_bad = parse_header(bad);
            assert!(
                matches!(short_or_bad, Err(RdbError::BadMagic(_))),
                "{}: {short_or_bad:?}",
                String::from_utf8_lossy(bad)
            );
        }
    }

    #[test]
    fn a_valkey_rdb_verifies() {
        let mut rdb = sample_rdb();
        rdb[..9].copy_from_slice(b"VALKEY080");
        let body = rdb.len() - 8;
        let crc = CRC64.checksum(&rdb[..body]);
        rdb[body..].copy_from_slice(&crc.to_le_bytes());
        for piece in [1, 4, 9, rdb.len()] {
            assert_eq!(verify_in_pieces(&rdb, piece).map(|f| f.version), Ok(80));
        }
    }

    #[test]
    fn rejects_corruption() {
        let mut rdb = sample_rdb();
        rdb[12] ^= 1;
        assert!(matches!(verify_in_pieces(&rdb, 7), Err(RdbError::CrcMismatch { .. })));
        let rdb = sample_rdb();
        assert!(matches!(verify_in_pieces(&rdb[..10], 3), Err(RdbError::TooShort(10))));
        let mut no_eof = sample_rdb();
        let n = no_eof.len();
        no_eof[n - 9] = 0xFE;
        assert!(matches!(verify_in_pieces(&no_eof, 4), Err(RdbError::MissingEof(0xFE))));
        let mut bad = sample_rdb();
        bad[0] = b'X';
        assert!(matches!(verify_in_pieces(&bad, 4), Err(RdbError::BadMagic(_))));
    }

    fn short_str(out: &mut Vec<u8>, s: &[u8]) {
        out.push(s.len() as u8);
        out.extend_from_slice(s);
    }

    /// Two databases with strings (plain, int-encoded, LZF, 14-bit length), expiries, a hash, an
    /// old-style zset, a quicklist2, a module-aux record and a function, then EOF and a checksum.
    fn rdb_with_keys() -> Vec<u8> {
        let mut rdb = b"REDIS0010".to_vec();
        rdb.push(0xFA);
        short_str(&mut rdb, b"redis-ver");
        short_str(&mut rdb, b"7.0.15");
        rdb.push(0xF5);
        short_str(&mut rdb, b"#!lua name=lib\nredis.register_function('f', g)");
        rdb.extend_from_slice(&[0xFE, 0, 0xFB, 4, 1]);
        rdb.push(0);
        short_str(&mut rdb, b"plain");
        short_str(&mut rdb, b"value");
        rdb.push(0xFC);
        rdb.extend_from_slice(&1_900_000_000_000u64.to_le_bytes());
        rdb.push(0);
        short_str(&mut rdb, b"intkey");
        rdb.extend_from_slice(&[0xC1, 0x39, 0x30]);
        rdb.push(0);
        short_str(&mut rdb, b"lzf");
        rdb.extend_from_slice(&[0xC3, 3, 60, b'a', b'b', b'c']);
        rdb.push(4);
        short_str(&mut rdb, b"hash");
        rdb.push(2);
        for field in [b"f1", b"v1", b"f2", b"v2"] {
            short_str(&mut rdb, field);
        }
        rdb.extend_from_slice(&[0xF7, 0x81, 1, 2, 3, 4, 5, 6, 7, 8, 2, 2]);
        rdb.extend_from_slice(&[2, 7, 5, 3, b'a', b'u', b'x', 4]);
        rdb.extend_from_slice(&1.5f64.to_le_bytes());
        rdb.push(0);
        rdb.extend_from_slice(&[0xFE, 1, 0xFB, 3, 0]);
        rdb.push(3);
        short_str(&mut rdb, b"zset");
        rdb.push(2);
        short_str(&mut rdb, b"m1");
        short_str(&mut rdb, b"1.5");
        short_str(&mut rdb, b"m2");
        rdb.push(254);
        rdb.push(18);
        short_str(&mut rdb, b"list");
        rdb.extend_from_slice(&[1, 2]);
        short_str(&mut rdb, b"listpack-bytes");
        rdb.push(0);
        short_str(&mut rdb, b"long");
        rdb.extend_from_slice(&[0x41, 0x00]);
        rdb.extend_from_slice(&[b'x'; 256]);
        rdb.push(0xFF);
        let crc = CRC64.checksum(&rdb);
        rdb.extend_from_slice(&crc.to_le_bytes());
        rdb
    }

    #[test]
    fn counts_keys_in_any_split() {
        let rdb = rdb_with_keys();
        for piece in 1..rdb.len() + 1 {
            let facts = verify_in_pieces(&rdb, piece).unwrap();
            assert_eq!(facts.keys, KeyCount { keys: 7, exact: true }, "piece {piece}");
        }
        assert_eq!(verify_in_pieces(&sample_rdb(), 3).unwrap().keys, KeyCount { keys: 0, exact: true });
    }

    #[test]
    fn an_unknown_type_gives_a_lower_bound_from_resizedb() {
        let mut rdb = b"REDIS0010".to_vec();
        rdb.extend_from_slice(&[0xFE, 0, 0xFB, 0x40, 200, 0]);
        rdb.push(0);
        short_str(&mut rdb, b"k");
        short_str(&mut rdb, b"v");
        rdb.push(6); // a module value in the old format, which cannot be passed over
        short_str(&mut rdb, b"m");
        rdb.extend_from_slice(&[1, 2, 3, 0xFF]);
        let crc = CRC64.checksum(&rdb);
        rdb.extend_from_slice(&crc.to_le_bytes());
        assert_eq!(verify_in_pieces(&rdb, 4).unwrap().keys, KeyCount { keys: 200, exact: false });
    }

    #[test]
    fn the_filter_keeps_aux_fields_and_functions_only() {
        let mut rdb = b"REDIS0010".to_vec();
        rdb.extend_from_slice(&[0xFA, 9]);
        rdb.extend_from_slice(b"redis-ver");
        rdb.extend_from_slice(&[6]);
        rdb.extend_from_slice(b"7.0.15");
        // aux with an integer-encoded value (0xC0 = 8-bit int).
        rdb.extend_from_slice(&[0xFA, 8]);
        rdb.extend_from_slice(b"ctime-ms");
        rdb.extend_from_slice(&[0xC0, 42]);
        let function = b"#!lua name=lib\nredis.register_function('f', function() return 1 end)";
        // A 14-bit length (the library is longer than 63 bytes).
        rdb.extend_from_slice(&[OPCODE_FUNCTION2, 0x40 | (function.len() >> 8) as u8, function.len() as u8]);
        rdb.extend_from_slice(function);
        // SELECTDB 0, RESIZEDB, one string key.
        rdb.extend_from_slice(&[0xFE, 0, 0xFB, 1, 0, 0, 1, b'k', 1, b'v']);
        rdb.push(0xFF);
        let crc = CRC64.checksum(&rdb);
        rdb.extend_from_slice(&crc.to_le_bytes());

        let functions = filter_rdb(&mut &rdb[..], RdbFilter { functions: true }).unwrap();
        verify_in_pieces(&functions, 7).unwrap();
        assert!(functions.windows(function.len()).any(|w| w == function));
        assert!(!functions.windows(2).any(|w| w == [1, b'k']), "no keys");
        let empty = filter_rdb(&mut &rdb[..], RdbFilter::default()).unwrap();
        verify_in_pieces(&empty, 3).unwrap();
        assert!(!empty.windows(function.len()).any(|w| w == function));
        assert!(empty.windows(8).any(|w| w == b"ctime-ms"), "aux fields stay");
        assert_eq!(RdbFilter::parse("").unwrap(), RdbFilter { functions: false });
        assert_eq!(RdbFilter::parse("functions").unwrap(), RdbFilter { functions: true });
        assert_eq!(RdbFilter::parse("keys").unwrap_err(), "keys");
    }

    #[test]
    fn zero_checksum_is_not_checked() {
        let mut rdb = sample_rdb();
        let n = rdb.len();
        rdb[n - 8..].fill(0);
        assert_eq!(verify_in_pieces(&rdb, 5).unwrap().crc64, 0);
    }
}
