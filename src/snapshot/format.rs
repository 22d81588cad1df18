//! The RDB facts the relay checks, apart from any I/O: the `REDIS%04d` header, the `0xFF` EOF opcode,
//! and the CRC-64 trailer (Jones polynomial, `CRC_64_REDIS`, stored little-endian; zero means the
//! master runs with `rdbchecksum no` and loaders skip the check). Also the snapshot metadata file.

use crc::{Crc, Digest, CRC_64_REDIS};
use serde::{Deserialize, Serialize};

static CRC64: Crc<u64> = Crc::<u64>::new(&CRC_64_REDIS);

const MAGIC: &[u8] = b"REDIS";
const HEADER_LEN: usize = 9;
const EOF_OPCODE: u8 = 0xFF;
const TRAILER_LEN: usize = 9;

/// Why an RDB payload is refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum RdbError {
    #[error("payload of {0} bytes is too short to be an RDB")]
    TooShort(u64),
    #[error("bad signature {0:?} (expected REDIS<version>)")]
    BadMagic(String),
    #[error("RDB does not end with the EOF opcode 0xFF (found 0x{0:02x})")]
    MissingEof(u8),
    #[error("CRC-64 mismatch: trailer says {stored:016x}, content gives {computed:016x}")]
    CrcMismatch { stored: u64, computed: u64 },
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
}

impl Default for RdbVerifier {
    fn default() -> Self {
        RdbVerifier {
            digest: CRC64.digest(),
            header: Vec::with_capacity(HEADER_LEN),
            held: Vec::new(),
            last_digested: 0,
            total: 0,
        }
    }
}

impl RdbVerifier {
    pub fn update(&mut self, mut data: &[u8]) {
        self.total += data.len() as u64;
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
        Ok(RdbFacts { version, size: self.total, crc64: stored, content_crc64: computed })
    }
}

fn parse_header(header: &[u8]) -> Result<u32, RdbError> {
    let bad = || RdbError::BadMagic(String::from_utf8_lossy(header).into_owned());
    if header.len() < HEADER_LEN || &header[..MAGIC.len()] != MAGIC {
        return Err(bad());
    }
    std::str::from_utf8(&header[MAGIC.len()..]).ok().and_then(|v| v.parse::<u32>().ok()).ok_or_else(bad)
}

/// The metadata stored beside a cached RDB (`snapshot.meta`, YAML).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SnapshotMeta {
    /// The master's replid announced with `+FULLRESYNC`.
    pub replid: String,
    /// The master offset the RDB was produced at (the `+FULLRESYNC` offset).
    pub offset: u64,
    pub size: u64,
    pub rdb_version: u32,
    /// CRC-64 as stored in the RDB trailer (0 when the master does not checksum).
    pub crc64: u64,
    /// CRC-64 computed over the content on receipt, so a cached file is checked on reopen even when
    /// the master runs with `rdbchecksum no`.
    pub content_crc64: u64,
    /// Unix seconds when the relay finished receiving it.
    pub created_unix: u64,
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

    #[test]
    fn zero_checksum_is_not_checked() {
        let mut rdb = sample_rdb();
        let n = rdb.len();
        rdb[n - 8..].fill(0);
        assert_eq!(verify_in_pieces(&rdb, 5).unwrap().crc64, 0);
    }
}
