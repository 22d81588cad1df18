//! Positions in the master's replication stream, and the one place where Redis's ±1 lives.
//!
//! Redis numbers the stream's bytes from 1 and names two different things "offset":
//! - the offset of the **last byte held**: `master_repl_offset` (INFO), the offset of
//!   `+FULLRESYNC <replid> <offset>` and of an RDB snapshot, `REPLCONF ACK <offset>` / `FACK`,
//!   `slave_repl_offset`, a replica's `offset=` in INFO;
//! - the offset of the **next byte wanted**: the `<offset>` of `PSYNC <replid> <offset>`
//!   (`master_repl_offset + 1`), `repl_backlog_first_byte_offset`, and `second_repl_offset` (the
//!   first PSYNC offset `replid2` no longer covers; -1 when there is no replid2).
//!
//! The relay works in the first kind, a [`Position`]: the log is addressed by it, a replica's
//! cursor is one, the log's start is the position before its first byte. The second kind exists
//! only on the wire and in INFO; [`Position::from_next_offset`] and [`Position::next_offset`] (and
//! their named forms) convert, and no other module adds or subtracts the 1.

use std::fmt;

/// The offset of the last byte of the master's stream that something holds (a log's end, a
/// replica's cursor, a snapshot's dataset); 0 before the first byte. Printed as the number Redis
/// prints for `master_repl_offset`, and stored as that number (`snapshot.meta`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, PartialOrd, Ord, Hash, serde::Serialize, serde::Deserialize)]
#[serde(transparent)]
pub struct Position(u64);

impl Position {
    pub const ZERO: Position = Position(0);

    /// The position Redis prints as `master_repl_offset`, `+FULLRESYNC`'s offset or an ACK's.
    pub const fn new(last_byte_offset: u64) -> Position {
        Position(last_byte_offset)
    }

    /// The number Redis prints for this position (`master_repl_offset`, `REPLCONF ACK`, ...).
    pub const fn get(self) -> u64 {
        self.0
    }

    /// A last-byte offset as Redis sends it (`+FULLRESYNC <replid> <offset>`, `REPLCONF ACK`);
    /// `None` when negative.
    pub fn from_last_byte_offset(offset: i64) -> Option<Position> {
        u64::try_from(offset).ok().map(Position)
    }

    /// The position of a reader whose next wanted byte is at `offset` (`PSYNC`'s offset,
    /// `second_repl_offset`, `repl_backlog_first_byte_offset`): `offset - 1`. `None` for offsets
    /// below 1, which name no byte (Redis sends `PSYNC ? -1` for "no history").
    pub fn from_next_offset(offset: i64) -> Option<Position> {
        u64::try_from(offset).ok()?.checked_sub(1).map(Position)
    }

    /// The position a replica asking `PSYNC <replid> <offset>` holds; `None` when the offset names
    /// no byte (0 or negative).
    pub fn from_psync_offset(offset: i64) -> Option<Position> {
        Self::from_next_offset(offset)
    }

    /// The offset of the byte after this position: what `PSYNC` asks for, what
    /// `repl_backlog_first_byte_offset` shows for a log starting here.
    pub const fn next_offset(self) -> u64 {
        self.0 + 1
    }

    /// The `second_repl_offset` of INFO for a `replid2` valid up to and including `valid_through`;
    /// -1 when there is no replid2.
    pub fn second_repl_offset(valid_through: Option<Position>) -> i64 {
        valid_through.map_or(-1, |p| i64::try_from(p.next_offset()).unwrap_or(i64::MAX))
    }

    /// The last position a `replid2` with this `second_repl_offset` is valid for; `None` when
    /// there is no replid2 (-1) or it covers no byte.
    pub fn from_second_repl_offset(second_repl_offset: i64) -> Option<Position> {
        Self::from_next_offset(second_repl_offset)
    }

    /// The position `bytes` further on.
    pub const fn advance(self, bytes: u64) -> Position {
        Position(self.0 + bytes)
    }

    /// Bytes from `earlier` to this position; 0 when `earlier` is not before it.
    pub const fn bytes_since(self, earlier: Position) -> u64 {
        self.0.saturating_sub(earlier.0)
    }

    /// The position `bytes` back, stopping at 0.
    pub const fn back(self, bytes: u64) -> Position {
        Position(self.0.saturating_sub(bytes))
    }
}

impl std::ops::Add<u64> for Position {
    type Output = Position;
    fn add(self, bytes: u64) -> Position {
        self.advance(bytes)
    }
}

impl std::ops::AddAssign<u64> for Position {
    fn add_assign(&mut self, bytes: u64) {
        *self = self.advance(bytes);
    }
}

impl fmt::Display for Position {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        self.0.fmt(f)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn psync_offsets_name_the_next_byte() {
        assert_eq!(Position::from_psync_offset(1), Some(Position::ZERO), "PSYNC id 1: nothing held yet");
        assert_eq!(Position::from_psync_offset(1001), Some(Position::new(1000)));
        assert_eq!(Position::from_psync_offset(0), None, "0 names no byte");
        assert_eq!(Position::from_psync_offset(-1), None, "PSYNC ? -1");
        assert_eq!(Position::from_psync_offset(i64::MIN), None);
        assert_eq!(Position::from_psync_offset(i64::MAX), Some(Position::new(i64::MAX as u64 - 1)));
        assert_eq!(Position::new(1000).next_offset(), 1001);
        assert_eq!(Position::from_last_byte_offset(0), Some(Position::ZERO), "+FULLRESYNC id 0: no byte yet");
        assert_eq!(Position::from_last_byte_offset(-1), None);
        assert_eq!(Position::ZERO.next_offset(), 1);
        for offset in [1, 2, 1001, i64::MAX] {
            let position = Position::from_psync_offset(offset).unwrap();
            assert_eq!(position.next_offset(), offset as u64, "round trip of {offset}");
        }
    }

    #[test]
    fn second_repl_offset_is_the_next_byte_or_minus_one() {
        assert_eq!(Position::second_repl_offset(None), -1);
        assert_eq!(Position::second_repl_offset(Some(Position::new(1010))), 1011);
        assert_eq!(Position::second_repl_offset(Some(Position::ZERO)), 1);
        assert_eq!(Position::second_repl_offset(Some(Position::new(u64::MAX - 1))), i64::MAX, "clamped, not wrapped");
        assert_eq!(Position::from_second_repl_offset(-1), None);
        assert_eq!(Position::from_second_repl_offset(0), None);
        assert_eq!(Position::from_second_repl_offset(1011), Some(Position::new(1010)));
    }

    #[test]
    fn arithmetic_and_display() {
        let p = Position::new(100);
        assert_eq!(p + 23, Position::new(123));
        assert_eq!(Position::new(123).bytes_since(p), 23);
        assert_eq!(p.bytes_since(Position::new(123)), 0);
        assert_eq!(p.back(500), Position::ZERO);
        assert_eq!(p.to_string(), "100");
        assert!(Position::new(99) < p);
    }
}
