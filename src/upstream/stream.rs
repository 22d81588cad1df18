//! The applied offset, as a Redis replica's master client keeps it: it advances only at command
//! boundaries, and a MULTI…EXEC block counts as one unit, applied at its EXEC (or DISCARD).

use crate::protocol::{scan_command_from, PartialCommand, ProtocolError, StreamCommand};

/// Tracks how much of the buffered stream is made of complete, appliable commands.
#[derive(Debug, Default)]
pub struct StreamTracker {
    /// Bytes at the front of the buffer already scanned (complete commands).
    scanned: usize,
    /// Whether the scanned bytes end inside an open MULTI.
    in_multi: bool,
    /// The last scanned position outside any transaction.
    boundary: usize,
    /// Progress into the incomplete command that starts at `scanned`.
    partial: Option<PartialCommand>,
}

/// What one scan found, in positions from the buffer's start.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct ScanResult {
    /// How many bytes from the start are whole commands outside any open transaction.
    pub appliable: usize,
    /// The position just before the last `REPLCONF GETACK` among them: the offset to ACK.
    pub getack_before: Option<usize>,
}

impl StreamTracker {
    /// Scans what was added to `buf` since the last call. `stream_position` locates `buf[0]` in the
    /// stream for error messages.
    pub fn scan(&mut self, buf: &[u8], stream_position: u64) -> Result<ScanResult, ProtocolError> {
        let mut result = ScanResult::default();
        let base = stream_position as usize;
        while let Some(command) = scan_command_from(&buf[self.scanned..], base + self.scanned, &mut self.partial)? {
            let start = self.scanned;
            self.scanned += command.len;
            match command.kind {
                StreamCommand::Multi => self.in_multi = true,
                StreamCommand::Exec | StreamCommand::Discard => self.in_multi = false,
                StreamCommand::GetAck if !self.in_multi => result.getack_before = Some(start),
                _ => {}
            }
            if !self.in_multi {
                self.boundary = self.scanned;
            }
        }
        result.appliable = self.boundary;
        Ok(result)
    }

    /// The caller removed `len` applied bytes from the buffer's front.
    pub fn consumed(&mut self, len: usize) {
        self.scanned -= len;
        self.boundary -= len;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::protocol::encode_command;

    fn cmd(args: &[&str]) -> Vec<u8> {
        encode_command(&args.iter().map(|a| a.as_bytes()).collect::<Vec<_>>()).to_vec()
    }

    #[test]
    fn multi_exec_is_one_unit_whatever_the_split() {
        let set = cmd(&["SET", "a", "1"]);
        let mut stream = set.clone();
        stream.extend(cmd(&["MULTI"]));
        stream.extend(cmd(&["INCR", "x"]));
        stream.extend(cmd(&["INCR", "y"]));
        stream.extend(cmd(&["EXEC"]));
        let exec_end = stream.len();
        stream.extend(cmd(&["SET", "b", "2"]));
        // Feed every prefix: the appliable length must never fall inside the transaction.
        for cut in 0..=stream.len() {
            let mut tracker = StreamTracker::default();
            let appliable = tracker.scan(&stream[..cut], 0).unwrap().appliable;
            let allowed = if cut < set.len() {
                0
            } else if cut < exec_end {
                set.len()
            } else if cut < stream.len() {
                exec_end
            } else {
                stream.len()
            };
            assert_eq!(appliable, allowed, "cut at {cut}");
        }
    }

    #[test]
    fn incremental_scans_and_consumption_agree() {
        let mut stream = cmd(&["MULTI"]);
        stream.extend(cmd(&["SET", "k", "v"]));
        stream.extend(cmd(&["EXEC"]));
        stream.extend(cmd(&["PING"]));
        let mut tracker = StreamTracker::default();
        let mut buf = Vec::new();
        let mut applied = 0;
        for byte in &stream {
            buf.push(*byte);
            let n = tracker.scan(&buf, applied as u64).unwrap().appliable;
            if n > 0 {
                buf.drain(..n);
                tracker.consumed(n);
                applied += n;
            }
        }
        assert_eq!(applied, stream.len());
        assert!(buf.is_empty());
    }

    #[test]
    fn getack_reports_the_offset_before_it() {
        let mut stream = cmd(&["SET", "k", "v"]);
        let before = stream.len();
        stream.extend(cmd(&["REPLCONF", "GETACK", "*"]));
        let mut tracker = StreamTracker::default();
        let result = tracker.scan(&stream, 0).unwrap();
        assert_eq!(result, ScanResult { appliable: stream.len(), getack_before: Some(before) });
    }

    #[test]
    fn a_huge_command_arriving_in_pieces_is_found_once_complete() {
        let mut stream = cmd(&["SET", "before", "x"]);
        let before = stream.len();
        let args: Vec<String> = (0..50_000).map(|i| format!("member-{i}")).collect();
        let mut huge = vec!["SADD", "big"];
        huge.extend(args.iter().map(String::as_str));
        stream.extend(cmd(&huge));
        let huge_end = stream.len();
        stream.extend(cmd(&["REPLCONF", "GETACK", "*"]));
        let mut tracker = StreamTracker::default();
        let mut buf = Vec::new();
        let mut applied = 0usize;
        let mut boundaries = Vec::new();
        for piece in stream.chunks(4096) {
            buf.extend_from_slice(piece);
            let result = tracker.scan(&buf, applied as u64).unwrap();
            if let Some(getack) = result.getack_before {
                assert_eq!(applied + getack, huge_end, "GETACK right after the huge command");
            }
            if result.appliable > 0 {
                buf.drain(..result.appliable);
                tracker.consumed(result.appliable);
                applied += result.appliable;
                boundaries.push(applied);
            }
        }
        assert_eq!(applied, stream.len());
        assert!(boundaries.contains(&before) || boundaries[0] > before);
        assert!(boundaries.iter().all(|b| *b == before || *b >= huge_end), "never inside the huge command");
    }
}
