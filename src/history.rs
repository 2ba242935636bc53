//! History: how far back a database stays readable, and the clock that
//! stamps commit times.
//!
//! Every commit has a sequence number and a commit time (in its WAL
//! record). The **history** is the span of sequence numbers, from
//! [`HistoryState::start`] to the newest, at each of which the database's
//! state can still be read exactly ([`Db::snapshot_at`](crate::Db::snapshot_at))
//! and after which every commit can still be read back whole
//! ([`Db::changes_since`](crate::Db::changes_since)). Two things keep it:
//!
//! - version garbage collection (checkpoints and merges, `merge.rs`) keeps
//!   every version newer than the start, as if a snapshot were held at
//!   every sequence number from it on;
//! - WAL segments that hold a commit after the start are kept
//!   (`checkpoint.rs`), so the change feed and commit times can be read
//!   from them (`wal/history.rs`).
//!
//! The start only moves forward: each checkpoint or merge moves it to the
//! [`History`] policy's horizon before it drops anything, and the MANIFEST
//! it writes records it, so a reopened database knows what it still holds.

use std::fmt;
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use crate::error::{Error, Result};
use crate::wal::history::WalIndex;

/// How much history a database keeps beyond what live snapshots hold
/// ([`Options::history`](crate::Options::history)).
///
/// ```
/// use std::time::Duration;
/// use mapstore::{History, Options};
/// let options = Options::default().history(History::Duration(Duration::from_secs(3600)));
/// # let _ = options;
/// ```
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum History {
    /// Keep only what live snapshots need (the default): the past is
    /// readable back to the last checkpoint or merge.
    #[default]
    None,
    /// Keep every version committed within this long before now (by the
    /// database's [`Clock`]).
    Duration(Duration),
    /// Keep every version among the last `n` sequence numbers. A batch
    /// takes one sequence number per operation, so this keeps the last `n`
    /// commits of one operation, fewer of larger batches. At least 1.
    Commits(u64),
}

/// Where commit times come from ([`Options::clock`](crate::Options::clock)).
///
/// Commit times are wall-clock times; the database makes them
/// non-decreasing along the log even if the clock steps back.
/// `mapstore::testing::ManualClock` (feature `testing`) is one that tests
/// set by hand.
pub trait Clock: Send + Sync + fmt::Debug {
    /// The current time.
    fn now(&self) -> SystemTime;
}

/// The operating system's wall clock.
#[derive(Clone, Copy, Debug, Default)]
pub struct SystemClock;

impl Clock for SystemClock {
    fn now(&self) -> SystemTime {
        SystemTime::now()
    }
}

/// `time` in microseconds since the Unix epoch (0 before it; saturating
/// far in the future).
pub(crate) fn micros(time: SystemTime) -> u64 {
    time.duration_since(UNIX_EPOCH).map_or(0, |since| {
        u64::try_from(since.as_micros()).unwrap_or(u64::MAX)
    })
}

/// The time `micros` microseconds after the Unix epoch.
pub(crate) fn time_of(micros: u64) -> SystemTime {
    UNIX_EPOCH + Duration::from_micros(micros)
}

/// The history a database keeps, and its start.
#[derive(Debug)]
pub(crate) struct HistoryState {
    policy: History,
    clock: Arc<dyn Clock>,
    wal: Arc<WalIndex>,
    /// The oldest sequence number whose state is exact: only grows. A
    /// snapshot at an older one is refused under this lock, which is also
    /// held while the start moves, so a snapshot registered here is one
    /// the next garbage collection sees.
    start: Mutex<u64>,
}

impl HistoryState {
    pub fn new(policy: History, clock: Arc<dyn Clock>, wal: Arc<WalIndex>, start: u64) -> Self {
        HistoryState {
            policy,
            clock,
            wal,
            start: Mutex::new(start),
        }
    }

    fn lock_start(&self) -> MutexGuard<'_, u64> {
        // Only a u64 is guarded; a panic cannot leave it half-written.
        self.start.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn wal(&self) -> &Arc<WalIndex> {
        &self.wal
    }

    /// The clock's time in microseconds since the Unix epoch.
    pub fn now_micros(&self) -> u64 {
        micros(self.clock.now())
    }

    /// The oldest sequence number still readable exactly.
    pub fn start(&self) -> u64 {
        *self.lock_start()
    }

    /// Moves the start up to the policy's horizon as of now (`newest` is
    /// the newest published sequence number) and returns it: a garbage
    /// collection about to run keeps every version newer than it. Called
    /// before the collection reads the live snapshots.
    pub fn advance(&self, newest: u64) -> Result<u64> {
        let horizon = match self.policy {
            History::None => newest,
            History::Commits(n) => newest.saturating_sub(n),
            History::Duration(keep) => {
                let cutoff = self.now_micros().saturating_sub(duration_micros(keep));
                // The start of the newest WAL segment whose first commit is
                // at or before the cutoff: every commit before it is older
                // than the cutoff. (Segment by segment, so the history kept
                // is at most one segment longer than asked.)
                let segments = self.wal.segments()?;
                segments
                    .iter()
                    .rev()
                    .find(|segment| segment.first_time <= cutoff)
                    .map_or(0, |segment| segment.first_seq - 1)
            }
        };
        let mut start = self.lock_start();
        *start = (*start).max(horizon.min(newest));
        Ok(*start)
    }

    /// Runs `register` (which registers a snapshot at `seq`) if `seq` is
    /// still inside the history, under the lock that moving the start
    /// takes.
    pub fn register_at<T>(&self, seq: u64, register: impl FnOnce() -> T) -> Result<T> {
        let start = self.lock_start();
        if seq < *start {
            return Err(Error::HistoryTrimmed {
                requested: seq,
                oldest: *start,
            });
        }
        Ok(register())
    }
}

/// `duration` in whole microseconds, saturating.
pub(crate) fn duration_micros(duration: Duration) -> u64 {
    u64::try_from(duration.as_micros()).unwrap_or(u64::MAX)
}
