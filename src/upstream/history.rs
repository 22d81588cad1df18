//! History-reset protection: what the link does when the master answers with a history that is not
//! the relay's (a `+FULLRESYNC` whose replid is neither the log's replid nor its replid2 up to where
//! it was valid) and the new RDB holds far fewer keys than the cached snapshot.
//!
//! The classic case is a master without persistence that restarts empty: a new replid at offset 0
//! and an empty RDB. Followed, it would wipe every replica below the relay. Under the `hold` policy
//! the link keeps the snapshot and the log untouched, drops the new RDB, and waits for an operator
//! (`RELAY HISTORY ACCEPT`) or for the master to present another history. A new history that is not
//! a shrink (a master restored from a backup) is followed, with a warning.

use std::time::SystemTime;

use crate::snapshot::KeyCount;

/// What to do with a new history that shrinks the dataset (`history_reset`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum HistoryResetPolicy {
    /// Keep serving the old dataset until an operator accepts the new history.
    Hold,
    /// Follow the master whatever it sends (the behaviour of a Redis replica).
    Follow,
}

impl HistoryResetPolicy {
    pub fn parse(text: &str) -> Option<HistoryResetPolicy> {
        match text.to_ascii_lowercase().as_str() {
            "hold" => Some(HistoryResetPolicy::Hold),
            "follow" => Some(HistoryResetPolicy::Follow),
            _ => None,
        }
    }
}

/// The default `history_reset_min_key_ratio`: a new RDB with fewer than half the keys is held.
pub const DEFAULT_MIN_KEY_RATIO: f64 = 0.5;

/// A new history the link refused to follow, as INFO and the metrics show it.
#[derive(Debug, Clone, PartialEq)]
pub struct HeldHistory {
    pub new_replid: String,
    pub new_offset: crate::offset::Position,
    pub new_keys: KeyCount,
    pub old_replid: String,
    pub old_keys: u64,
    /// When the hold started (the first refused RDB of this history).
    pub since: SystemTime,
}

/// Whether a dataset of `new` keys replacing one of `old` keys is a shrink worth holding: the new
/// one is empty while the old one is not, or holds fewer than `min_ratio` × `old` keys.
pub fn is_shrink(old: u64, new: u64, min_ratio: f64) -> bool {
    old > 0 && (new == 0 || (new as f64) < min_ratio * old as f64)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn empty_or_below_the_ratio_is_a_shrink() {
        assert!(is_shrink(345, 0, 0.5));
        assert!(is_shrink(1000, 499, 0.5));
        assert!(!is_shrink(1000, 500, 0.5));
        assert!(!is_shrink(1000, 5000, 0.5));
        assert!(!is_shrink(0, 0, 0.5), "nothing to lose");
        assert!(is_shrink(1000, 0, 0.0), "ratio 0 still holds an empty dataset");
        assert!(!is_shrink(1000, 1, 0.0));
    }

    #[test]
    fn policies_parse_by_name() {
        assert_eq!(HistoryResetPolicy::parse("hold"), Some(HistoryResetPolicy::Hold));
        assert_eq!(HistoryResetPolicy::parse("Follow"), Some(HistoryResetPolicy::Follow));
        assert_eq!(HistoryResetPolicy::parse("wipe"), None);
    }
}
