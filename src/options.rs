//! Settings for opening a database.

use std::fmt;
use std::sync::Arc;
use std::time::Duration;

use crate::error::{Error, Result};
use crate::history::{Clock, History, SystemClock};
use crate::io::{FileSystem, RealFileSystem};

/// When a write is acknowledged relative to the disk.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum Durability {
    /// A write returns only after its log bytes are on stable storage
    /// (`fdatasync`). Concurrent writers share one fsync (group commit).
    #[default]
    Sync,
    /// A write is handed to the operating system and returns; it becomes
    /// durable at the next [`Db::sync`](crate::Db::sync), synced write, or close.
    /// A crash of the process loses nothing; a power cut may lose the writes
    /// since the last sync (never part of a batch).
    Buffered,
}

/// What opening does when the write-ahead log is damaged.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Default)]
pub enum RecoveryMode {
    /// Cut off a torn or checksum-failing tail of the last segment (what a
    /// crash in the middle of a write leaves) and open with every earlier
    /// commit; damage followed by valid records is real corruption and gives
    /// [`Error::Corruption`] naming the file and offset.
    #[default]
    TolerateCorruptedTail,
    /// Keep every commit before the first damaged record, wherever it is, and
    /// move the rest of the log aside into files whose names
    /// [`RecoveryReport::moved_aside`](crate::RecoveryReport::moved_aside) lists.
    PointInTime,
    /// Refuse to open on any anomaly, a torn tail included.
    ///
    /// A database opened this way never reuses obsolete WAL segments (it
    /// zero-fills every new one): after a crash, a reused segment's old
    /// records read as a torn tail. One written in another mode and then
    /// opened with `Strict` after a crash is refused for that reason
    /// (`format/wal.md`, "Reused segments").
    Strict,
}

/// Smallest accepted WAL page size.
pub const MIN_WAL_PAGE_BYTES: usize = 512;
/// Largest accepted WAL page size (fragment lengths are 16-bit).
pub const MAX_WAL_PAGE_BYTES: usize = 65_536;

/// Settings for [`Db::open_with`](crate::Db::open_with), built with chained setters.
///
/// ```
/// use mapstore::{Durability, Options, RecoveryMode};
/// let options = Options::default()
///     .durability(Durability::Sync)
///     .recovery_mode(RecoveryMode::TolerateCorruptedTail)
///     .wal_segment_bytes(16 << 20);
/// # let _ = options;
/// ```
#[derive(Clone)]
pub struct Options {
    pub(crate) durability: Durability,
    pub(crate) recovery_mode: RecoveryMode,
    pub(crate) wal_page_bytes: usize,
    pub(crate) wal_segment_bytes: u64,
    pub(crate) wal_segments_kept: usize,
    pub(crate) wal_segments_kept_idle: Duration,
    pub(crate) memtable_size: usize,
    pub(crate) max_wal_bytes: u64,
    pub(crate) max_frozen_memtables: usize,
    pub(crate) max_snapshot_files: usize,
    pub(crate) partition_bytes: u64,
    pub(crate) checkpoint_on_close: bool,
    pub(crate) memtable_read_index: bool,
    pub(crate) background_nice: u8,
    pub(crate) history: History,
    pub(crate) clock: Arc<dyn Clock>,
    pub(crate) expiry_interval: Duration,
    pub(crate) file_system: Arc<dyn FileSystem>,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            durability: Durability::Sync,
            recovery_mode: RecoveryMode::TolerateCorruptedTail,
            wal_page_bytes: 4096,
            wal_segment_bytes: 4 << 20,
            wal_segments_kept: 4,
            wal_segments_kept_idle: Duration::from_secs(10),
            memtable_size: 64 << 20,
            max_wal_bytes: 256 << 20,
            max_frozen_memtables: 2,
            max_snapshot_files: 8,
            partition_bytes: 256 << 20,
            checkpoint_on_close: true,
            memtable_read_index: true,
            background_nice: 0,
            history: History::None,
            clock: Arc::new(SystemClock),
            expiry_interval: Duration::from_millis(250),
            file_system: Arc::new(RealFileSystem),
        }
    }
}

impl fmt::Debug for Options {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Options")
            .field("durability", &self.durability)
            .field("recovery_mode", &self.recovery_mode)
            .field("wal_page_bytes", &self.wal_page_bytes)
            .field("wal_segment_bytes", &self.wal_segment_bytes)
            .field("wal_segments_kept", &self.wal_segments_kept)
            .field("wal_segments_kept_idle", &self.wal_segments_kept_idle)
            .field("memtable_size", &self.memtable_size)
            .field("max_wal_bytes", &self.max_wal_bytes)
            .field("max_frozen_memtables", &self.max_frozen_memtables)
            .field("max_snapshot_files", &self.max_snapshot_files)
            .field("partition_bytes", &self.partition_bytes)
            .field("checkpoint_on_close", &self.checkpoint_on_close)
            .field("memtable_read_index", &self.memtable_read_index)
            .field("background_nice", &self.background_nice)
            .field("history", &self.history)
            .field("clock", &self.clock)
            .field("expiry_interval", &self.expiry_interval)
            .finish_non_exhaustive()
    }
}

impl Options {
    /// When writes are acknowledged; [`Durability::Sync`] by default.
    pub fn durability(mut self, durability: Durability) -> Self {
        self.durability = durability;
        self
    }

    /// What opening does with a damaged log; [`RecoveryMode::TolerateCorruptedTail`] by default.
    pub fn recovery_mode(mut self, mode: RecoveryMode) -> Self {
        self.recovery_mode = mode;
        self
    }

    /// Size of a WAL page in bytes: a power of two from 512 to 65,536,
    /// 4,096 by default. Each synced group of commits starts on a fresh page,
    /// so a smaller page wastes less space per fsync, and a page should not be
    /// smaller than the device's atomic write unit.
    pub fn wal_page_bytes(mut self, bytes: usize) -> Self {
        self.wal_page_bytes = bytes;
        self
    }

    /// Size that each WAL segment file is preallocated to (filled with zeros,
    /// so that later writes overwrite blocks in place and `fdatasync` has no
    /// file size to update); 4 MiB by default, at least 4 pages. The active
    /// segment and the next one, prepared in the background, are on disk at
    /// their full size while the database is open, and the log not yet
    /// checkpointed is rounded up to whole segments, so a smaller segment
    /// costs less disk; each segment switch costs a rename and a few
    /// fsyncs in the background. A commit larger than a segment gets a
    /// segment of its own that grows past it.
    pub fn wal_segment_bytes(mut self, bytes: u64) -> Self {
        self.wal_segment_bytes = bytes;
        self
    }

    /// How many WAL segments that a checkpoint made obsolete are kept for
    /// the writer to reuse instead of zero-filling new ones; 4 by default,
    /// 0 to delete them at once.
    ///
    /// A checkpoint of the default 64 MiB memtable frees about eight 4 MiB
    /// segments at once; the next four segment switches take the kept ones
    /// and the rest zero-fill new segments. Kept segments cost their full
    /// size on disk (16 MiB by default) for as long as they wait: until the
    /// writer needs them, a [`Db::compact`](crate::Db::compact), the close,
    /// or [`wal_segments_kept_idle`](Options::wal_segments_kept_idle)
    /// without the writer taking one. In exchange the log's bytes are not
    /// written twice (once as zeros). With [`RecoveryMode::Strict`] none are
    /// kept, whatever this says.
    pub fn wal_segments_kept(mut self, count: usize) -> Self {
        self.wal_segments_kept = count;
        self
    }

    /// How long segments kept for reuse (see
    /// [`wal_segments_kept`](Options::wal_segments_kept)) may wait without
    /// the writer taking one before the background deletes them all; 10
    /// seconds by default. A database whose writes have stopped, or slowed
    /// to less than a segment in that time, so gives their disk space
    /// back without a compaction or a close; the writer then zero-fills
    /// its next segments until a checkpoint offers new ones.
    pub fn wal_segments_kept_idle(mut self, idle: Duration) -> Self {
        self.wal_segments_kept_idle = idle;
        self
    }

    /// Memory the active memtable may hold (approximately) before a
    /// checkpoint freezes it and writes it to a snapshot file in the
    /// background; 64 MiB by default, at least 1 byte.
    pub fn memtable_size(mut self, bytes: usize) -> Self {
        self.memtable_size = bytes;
        self
    }

    /// WAL bytes written since the last checkpoint that trigger the next
    /// one, whatever the memtable's size (bounds replay time at open);
    /// 256 MiB by default. The count is of the log as it lies on disk: a
    /// synced commit ends its page, so each lone synced commit counts a
    /// whole page (4 KiB by default), however small.
    pub fn max_wal_bytes(mut self, bytes: u64) -> Self {
        self.max_wal_bytes = bytes;
        self
    }

    /// Frozen memtables that may wait for the background checkpoint before
    /// writers are held back (backpressure, counted in
    /// [`CheckpointStats::write_stalls`](crate::CheckpointStats)); 2 by
    /// default, at least 1.
    pub fn max_frozen_memtables(mut self, count: usize) -> Self {
        self.max_frozen_memtables = count;
        self
    }

    /// The most snapshot files one partition of a keyspace's key range
    /// holds before the background merges its newest ones; 8 by default, at
    /// least 2. A point lookup reads at most the active and frozen
    /// memtables and this many files (one more while a checkpoint lands
    /// before the merge). The merge policy merges long before this as a
    /// rule (`format/snapshot.md`, "Merge policy").
    pub fn max_snapshot_files(mut self, count: usize) -> Self {
        self.max_snapshot_files = count;
        self
    }

    /// The size past which a partition of a keyspace's key range is split
    /// in two by its next whole merge; 256 MiB by default, at least 4 KiB.
    /// A merge reads and rewrites one partition at most, so this bounds
    /// the extra space and the time a merge takes. In a keyspace larger
    /// than 16 times this, the bound is a sixteenth of the keyspace
    /// instead, so that a checkpoint, which writes a file per partition,
    /// writes about 16 at most.
    ///
    /// ```
    /// let options = mapstore::Options::default().partition_bytes(64 << 20);
    /// # let _ = options;
    /// ```
    pub fn partition_bytes(mut self, bytes: u64) -> Self {
        self.partition_bytes = bytes;
        self
    }

    /// Whether [`Db::close`](crate::Db::close) (and dropping the last
    /// handle) checkpoints the memtable first; `true` by default. A
    /// checkpointed close makes the next open map snapshot files instead of
    /// replaying the WAL (milliseconds instead of up to a memtable's worth
    /// of replay); turning it off makes closing faster and leaves the WAL
    /// for the next open to replay.
    pub fn checkpoint_on_close(mut self, enabled: bool) -> Self {
        self.checkpoint_on_close = enabled;
        self
    }

    /// Whether a memtable gets a read index once writes go quiet; `true`
    /// by default.
    ///
    /// When reads keep reaching the memtable and no write has begun for a
    /// while (the reads since the last write number at least an eighth of
    /// the memtable's entries), a background thread builds a hash index of
    /// each key's newest version, and point reads use it instead of
    /// searching the skiplist until the next write begins. After a fill of
    /// a million random keys, point reads ran about a third faster with it
    /// (README, Performance). It costs about 96 bytes per key of the
    /// memtable while it exists (the keys and values are shared, not
    /// copied) and one walk of the memtable per build; turn it off to save
    /// that memory.
    pub fn memtable_read_index(mut self, enabled: bool) -> Self {
        self.memtable_read_index = enabled;
        self
    }

    /// How many nice levels below the thread that opens the database the
    /// background checkpoint and merge thread runs (at most down to 19, the
    /// lowest); 0 by default, the same priority. Linux only, where each
    /// thread has a priority of its own; ignored elsewhere.
    ///
    /// With more busy threads than processors, a lowered checkpoint thread
    /// lets the scheduler run the writers and the memtable insert helper
    /// first. On two cores, 10 levels made fills in synced batches 8-14%
    /// faster, but the checkpoint then lagged: peak memory of a fill grew by
    /// 30-50 MB (the frozen memtables wait longer) and reads beside a busy
    /// writer were 15-19% slower (README, Performance). A bulk load on a
    /// small machine may want it; the default does not. The checkpoint
    /// still runs whenever writers wait, and they wait for it once
    /// `max_frozen_memtables` memtables are frozen, so memory stays bounded.
    pub fn background_nice(mut self, levels: u8) -> Self {
        self.background_nice = levels;
        self
    }

    /// How much history to keep beyond what live snapshots need: how far
    /// back [`Db::snapshot_at`](crate::Db::snapshot_at),
    /// [`Db::snapshot_at_time`](crate::Db::snapshot_at_time) and
    /// [`Db::changes_since`](crate::Db::changes_since) reach.
    /// [`History::None`] by default. The history kept costs the space of
    /// the versions and WAL segments inside it.
    pub fn history(mut self, history: History) -> Self {
        self.history = history;
        self
    }

    /// Where commit times and the present come from (the system clock by
    /// default); a test can pass `mapstore::testing::ManualClock`.
    pub fn clock(mut self, clock: Arc<dyn Clock>) -> Self {
        self.clock = clock;
        self
    }

    /// How often the database looks for values whose TTL ran out, to
    /// commit their removal (250 ms by default): an expiry is committed
    /// within this long after its time (reads never return an expired
    /// value, whenever the removal is committed). At least 1 ms.
    pub fn expiry_interval(mut self, interval: Duration) -> Self {
        self.expiry_interval = interval;
        self
    }

    /// Route every file operation through `file_system` (for fault injection
    /// in tests; see [`testing`](crate::testing)).
    #[cfg(feature = "testing")]
    pub fn file_system(mut self, file_system: Arc<dyn FileSystem>) -> Self {
        self.file_system = file_system;
        self
    }

    /// Checks every setting against its allowed range.
    pub(crate) fn validate(&self) -> Result<()> {
        let page = self.wal_page_bytes;
        if !page.is_power_of_two() || !(MIN_WAL_PAGE_BYTES..=MAX_WAL_PAGE_BYTES).contains(&page) {
            return Err(Error::InvalidOptions {
                reason: format!(
                    "wal_page_bytes is {page}; it must be a power of two from {MIN_WAL_PAGE_BYTES} to {MAX_WAL_PAGE_BYTES}"
                ),
            });
        }
        if self.wal_segment_bytes < 4 * page as u64 {
            return Err(Error::InvalidOptions {
                reason: format!(
                    "wal_segment_bytes is {}; it must be at least 4 pages ({} bytes)",
                    self.wal_segment_bytes,
                    4 * page
                ),
            });
        }
        if self.memtable_size == 0 || self.max_wal_bytes == 0 {
            return Err(Error::InvalidOptions {
                reason: "memtable_size and max_wal_bytes must be at least 1".into(),
            });
        }
        if self.expiry_interval < Duration::from_millis(1) {
            return Err(Error::InvalidOptions {
                reason: "expiry_interval must be at least 1 ms".into(),
            });
        }
        if self.history == History::Commits(0) {
            return Err(Error::InvalidOptions {
                reason: "History::Commits(0) keeps nothing; use History::None".into(),
            });
        }
        if self.partition_bytes < 4096 {
            return Err(Error::InvalidOptions {
                reason: "partition_bytes must be at least 4096".into(),
            });
        }
        if self.max_frozen_memtables == 0 || self.max_snapshot_files < 2 {
            return Err(Error::InvalidOptions {
                reason: "max_frozen_memtables must be at least 1 and max_snapshot_files at least 2"
                    .into(),
            });
        }
        Ok(())
    }
}
