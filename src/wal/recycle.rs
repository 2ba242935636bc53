//! WAL segments kept for reuse once a checkpoint covers them.
//!
//! A new segment is preallocated with zeros (see `writer.rs`), which costs
//! as many bytes of disk writes as the log itself. A segment that a
//! checkpoint made obsolete is already allocated: instead of deleting it,
//! the checkpoint thread offers it here, and the writer's preparation
//! renames it to the next segment's temporary name, rewrites its header
//! page and fsyncs it. Its old records stay behind the new ones; they
//! cannot pass for new records, because every fragment's checksum covers
//! its segment's number. `format/wal.md` ("Reused segments") has the
//! rules that keep such leftovers from looking like damage.
//!
//! Only segments this process's writer created are reused: they have this
//! session's page size and their full preallocated length (a segment is
//! cut short only when the database closes, or by recovery).

use std::collections::{BTreeMap, BTreeSet};
use std::sync::{Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// The obsolete segments kept for reuse, shared by the checkpoint thread
/// (which offers them) and the WAL writer (which takes them).
#[derive(Debug)]
pub struct RecycledSegments {
    /// How many are kept at most; the rest are deleted
    /// ([`Options::wal_segments_kept`](crate::Options::wal_segments_kept)).
    max_kept: usize,
    /// How long the kept segments may go untouched before they are all
    /// deleted ([`Options::wal_segments_kept_idle`](crate::Options::wal_segments_kept_idle)).
    idle_limit: Duration,
    state: Mutex<PoolState>,
}

#[derive(Debug)]
struct PoolState {
    /// Numbers of the segments kept, in the order offered.
    kept: Vec<u64>,
    /// Every number accepted and whose file may still be listed under its
    /// old name (kept, or taken and perhaps not yet renamed): a later
    /// checkpoint that lists the directory must neither offer nor delete
    /// it again.
    accepted: BTreeSet<u64>,
    /// The first segment this process's writer created; older segments
    /// (from before the open) are never reused.
    first_own: u64,
    /// Segments the writer cut short (at a switch), and their lengths;
    /// the others have the full preallocated length.
    cut: BTreeMap<u64, u64>,
    /// When a segment was last kept or taken.
    last_used: Instant,
}

impl Default for PoolState {
    fn default() -> Self {
        PoolState {
            kept: Vec::new(),
            accepted: BTreeSet::new(),
            first_own: u64::MAX,
            cut: BTreeMap::new(),
            last_used: Instant::now(),
        }
    }
}

/// What the checkpoint thread does with an obsolete segment.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Offer {
    /// Kept for reuse (or kept already): leave the file alone.
    Kept,
    /// Not wanted: delete the file.
    Delete,
}

impl RecycledSegments {
    /// A pool that keeps at most `max_kept` segments, for at most
    /// `idle_limit` without one being taken.
    pub fn new(max_kept: usize, idle_limit: Duration) -> RecycledSegments {
        RecycledSegments {
            max_kept,
            idle_limit,
            state: Mutex::default(),
        }
    }

    fn state(&self) -> MutexGuard<'_, PoolState> {
        // Every critical section leaves the state consistent before it
        // could panic (they only push, pop and compare numbers).
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Records that the writer created segment `number`.
    pub fn note_created(&self, number: u64) {
        let mut state = self.state();
        state.first_own = state.first_own.min(number);
    }

    /// Records that the writer cut segment `number` to `length` bytes.
    pub fn note_cut(&self, number: u64, length: u64) {
        self.state().cut.insert(number, length);
    }

    /// Offers obsolete segment `number` (which a durable checkpoint covers).
    pub fn offer(&self, number: u64) -> Offer {
        let mut state = self.state();
        if state.accepted.contains(&number) {
            return Offer::Kept;
        }
        if number < state.first_own || state.kept.len() >= self.max_kept {
            return Offer::Delete;
        }
        state.kept.push(number);
        state.accepted.insert(number);
        state.last_used = Instant::now();
        Offer::Kept
    }

    /// Forgets accepted numbers whose files are gone from the directory
    /// (`listed` holds every segment number found there), so that the set
    /// stays as small as the pool.
    pub fn forget_missing(&self, listed: &BTreeSet<u64>) {
        let mut state = self.state();
        let PoolState {
            kept,
            accepted,
            cut,
            ..
        } = &mut *state;
        accepted.retain(|number| listed.contains(number) || kept.contains(number));
        cut.retain(|number, _| listed.contains(number) || kept.contains(number));
    }

    /// Takes a kept segment to reuse, the oldest first: its number, and its
    /// length if the writer cut it short.
    pub fn take(&self) -> Option<(u64, Option<u64>)> {
        let mut state = self.state();
        if state.kept.is_empty() {
            return None;
        }
        let number = state.kept.remove(0);
        let cut = state.cut.remove(&number);
        state.last_used = Instant::now();
        Some((number, cut))
    }

    /// How long until the kept segments have gone unused for the idle
    /// limit (zero once they have), or `None` when none are kept.
    pub fn until_idle(&self) -> Option<Duration> {
        let state = self.state();
        if state.kept.is_empty() {
            return None;
        }
        Some(self.idle_limit.saturating_sub(state.last_used.elapsed()))
    }

    /// Takes every kept segment (to delete them).
    pub fn take_all(&self) -> Vec<u64> {
        std::mem::take(&mut self.state().kept)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_own_segments_are_kept_up_to_the_limit_and_each_once() {
        const MAX_KEPT: usize = 4;
        let pool = RecycledSegments::new(MAX_KEPT, Duration::from_secs(3600));
        // Nothing is the writer's yet: everything goes.
        assert_eq!(pool.offer(3), Offer::Delete);
        pool.note_created(10);
        assert_eq!(pool.offer(9), Offer::Delete);
        for number in 10..10 + MAX_KEPT as u64 {
            assert_eq!(pool.offer(number), Offer::Kept);
        }
        assert_eq!(pool.offer(20), Offer::Delete);
        // Listed again by a later checkpoint: still kept, not twice.
        assert_eq!(pool.offer(10), Offer::Kept);
        pool.note_cut(11, 4096);
        assert_eq!(pool.take(), Some((10, None)));
        // Taken, but its file may not be renamed yet: not offered again.
        assert_eq!(pool.offer(10), Offer::Kept);
        pool.forget_missing(&(11..14).collect());
        // Gone from the directory: forgotten, so a new offer is a new one.
        assert_eq!(pool.offer(10), Offer::Kept);
        assert_eq!(pool.take(), Some((11, Some(4096))));
        assert_eq!(pool.take_all(), vec![12, 13, 10]);
        assert_eq!(pool.take(), None);
    }

    #[test]
    fn the_idle_clock_runs_only_while_segments_are_kept() {
        let pool = RecycledSegments::new(2, Duration::from_secs(3600));
        pool.note_created(1);
        assert_eq!(pool.until_idle(), None);
        assert_eq!(pool.offer(1), Offer::Kept);
        let left = pool.until_idle().unwrap();
        assert!(left > Duration::from_secs(3500) && left <= Duration::from_secs(3600));
        assert_eq!(pool.take(), Some((1, None)));
        assert_eq!(pool.until_idle(), None);

        let pool = RecycledSegments::new(2, Duration::ZERO);
        pool.note_created(1);
        assert_eq!(pool.offer(1), Offer::Kept);
        assert_eq!(pool.until_idle(), Some(Duration::ZERO));
    }
}
