//! The on-disk format of the replication log, apart from any I/O.
//!
//! A segment file is named after the stream position before its first byte (`{position:020}.seg`) and
//! holds a 32-byte header then records:
//!
//! ```text
//! header:  "RRLOGSEG" | version u32 | reserved u32 | start position u64 | crc32c of the above u32 | pad u32
//! record:  payload length u32 | crc32c(position ‖ payload) u32 | position u64 | payload
//! ```
//!
//! All integers little-endian; CRC-32C (Castagnoli), computed with the CPU's CRC instruction where
//! there is one (it is on the hot path of every append). A record's position is the stream position before its first byte, so a
//! record that does not continue its predecessor exactly is as bad as one whose checksum fails.

use serde::{Deserialize, Serialize};

pub const SEGMENT_MAGIC: &[u8; 8] = b"RRLOGSEG";
pub const SEGMENT_VERSION: u32 = 1;
pub const SEGMENT_HEADER_LEN: usize = 32;
pub const RECORD_HEADER_LEN: usize = 16;
/// A record larger than this is certainly a torn or corrupt length field.
pub const MAX_RECORD_LEN: usize = 1 << 31;

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum FormatError {
    #[error("segment header is not a redis-relay log header")]
    BadSegmentMagic,
    #[error("segment header checksum mismatch")]
    BadSegmentHeader,
    #[error("unsupported segment version {0}")]
    BadSegmentVersion(u32),
    #[error("record length {0} is impossible")]
    BadRecordLength(u64),
    #[error("record checksum mismatch at position {0}")]
    BadRecordChecksum(u64),
    #[error("record at position {found} where {expected} was expected")]
    Discontinuous { expected: u64, found: u64 },
}

pub fn segment_file_name(start: u64) -> String {
    format!("{start:020}.seg")
}

pub fn parse_segment_file_name(name: &str) -> Option<u64> {
    let digits = name.strip_suffix(".seg")?;
    (digits.len() == 20).then(|| digits.parse().ok()).flatten()
}

pub fn encode_segment_header(start: u64) -> [u8; SEGMENT_HEADER_LEN] {
    let mut header = [0u8; SEGMENT_HEADER_LEN];
    header[..8].copy_from_slice(SEGMENT_MAGIC);
    header[8..12].copy_from_slice(&SEGMENT_VERSION.to_le_bytes());
    header[16..24].copy_from_slice(&start.to_le_bytes());
    let crc = crc32c::crc32c(&header[..24]);
    header[24..28].copy_from_slice(&crc.to_le_bytes());
    header
}

/// Returns the start position a segment header declares.
pub fn decode_segment_header(header: &[u8]) -> Result<u64, FormatError> {
    if header.len() < SEGMENT_HEADER_LEN || &header[..8] != SEGMENT_MAGIC {
        return Err(FormatError::BadSegmentMagic);
    }
    let crc = u32::from_le_bytes(le4(&header[24..28]));
    if crc != crc32c::crc32c(&header[..24]) {
        return Err(FormatError::BadSegmentHeader);
    }
    let version = u32::from_le_bytes(le4(&header[8..12]));
    if version != SEGMENT_VERSION {
        return Err(FormatError::BadSegmentVersion(version));
    }
    Ok(u64::from_le_bytes(le8(&header[16..24])))
}

fn le4(bytes: &[u8]) -> [u8; 4] {
    let mut out = [0u8; 4];
    out.copy_from_slice(&bytes[..4]);
    out
}

fn le8(bytes: &[u8]) -> [u8; 8] {
    let mut out = [0u8; 8];
    out.copy_from_slice(&bytes[..8]);
    out
}

fn record_crc(position: u64, payload: &[u8]) -> u32 {
    crc32c::crc32c_append(crc32c::crc32c(&position.to_le_bytes()), payload)
}

/// The 16-byte header that precedes `payload` at `position`.
pub fn encode_record_header(position: u64, payload: &[u8]) -> [u8; RECORD_HEADER_LEN] {
    let mut header = [0u8; RECORD_HEADER_LEN];
    header[..4].copy_from_slice(&(payload.len() as u32).to_le_bytes());
    header[4..8].copy_from_slice(&record_crc(position, payload).to_le_bytes());
    header[8..16].copy_from_slice(&position.to_le_bytes());
    header
}

/// A record header's fields, before the payload is checked.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct RecordHeader {
    pub len: usize,
    pub crc: u32,
    pub position: u64,
}

pub fn decode_record_header(bytes: &[u8]) -> Result<RecordHeader, FormatError> {
    let len = u32::from_le_bytes(le4(&bytes[..4])) as usize;
    if len == 0 || len > MAX_RECORD_LEN {
        return Err(FormatError::BadRecordLength(len as u64));
    }
    Ok(RecordHeader {
        len,
        crc: u32::from_le_bytes(le4(&bytes[4..8])),
        position: u64::from_le_bytes(le8(&bytes[8..16])),
    })
}

/// Checks a record's payload against its header.
pub fn verify_record(header: &RecordHeader, payload: &[u8]) -> Result<(), FormatError> {
    if payload.len() != header.len || record_crc(header.position, payload) != header.crc {
        return Err(FormatError::BadRecordChecksum(header.position));
    }
    Ok(())
}

/// The replication history the log belongs to, persisted beside the segments (`history.meta`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct HistoryMeta {
    pub replid: String,
    pub replid2: String,
    pub second_repl_offset: i64,
    /// The position at which this history's log began (the full-sync offset).
    pub start: u64,
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn segment_headers_round_trip_and_reject_damage() {
        let header = encode_segment_header(123_456);
        assert_eq!(decode_segment_header(&header), Ok(123_456));
        let mut bad = header;
        bad[17] ^= 1;
        assert_eq!(decode_segment_header(&bad), Err(FormatError::BadSegmentHeader));
        bad[0] = b'X';
        assert_eq!(decode_segment_header(&bad), Err(FormatError::BadSegmentMagic));
        assert_eq!(parse_segment_file_name(&segment_file_name(42)), Some(42));
        assert_eq!(parse_segment_file_name("42.seg"), None);
    }

    #[test]
    fn crc_is_castagnoli() {
        // The check value of CRC-32C ("123456789"), so the format does not depend on the library.
        assert_eq!(crc32c::crc32c(b"123456789"), 0xE306_9283);
        let crc = crc::Crc::<u32>::new(&crc::CRC_32_ISCSI);
        let mut digest = crc.digest();
        digest.update(&7u64.to_le_bytes());
        digest.update(b"payload");
        assert_eq!(record_crc(7, b"payload"), digest.finalize());
    }

    #[test]
    fn records_round_trip_and_detect_flips() {
        let payload = b"*1\r\n$4\r\nPING\r\n";
        let header_bytes = encode_record_header(77, payload);
        let header = decode_record_header(&header_bytes).unwrap();
        assert_eq!(header.position, 77);
        assert_eq!(verify_record(&header, payload), Ok(()));
        let mut flipped = payload.to_vec();
        flipped[3] ^= 0x20;
        assert_eq!(verify_record(&header, &flipped), Err(FormatError::BadRecordChecksum(77)));
        let mut moved = header;
        moved.position = 78;
        assert!(verify_record(&moved, payload).is_err(), "the position is covered by the checksum");
    }
}
