//! `Db::metrics`: counters, gauges and latency histograms of a running
//! database, and the recorder the write, read and background paths count
//! into.
//!
//! The recorder is cheap enough for the hot paths: a point read adds one
//! relaxed increment to a counter striped over cache lines (threads rarely
//! share one), a commit two clock reads. Histograms have fixed buckets,
//! powers of two of microseconds, each an atomic counter.

use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

/// Number of stripes of a [`StripedCounter`].
const STRIPES: usize = 16;

/// A counter that many threads increment: each thread adds to its own
/// cache line (chosen once per thread), and a read sums them.
#[derive(Debug, Default)]
pub(crate) struct StripedCounter {
    stripes: [PaddedCounter; STRIPES],
}

#[derive(Debug, Default)]
#[repr(align(128))]
struct PaddedCounter(AtomicU64);

thread_local! {
    /// This thread's stripe, given out round-robin at its first count
    /// (`usize::MAX` until then; a `const` thread-local needs no lazy
    /// initialisation check on each access).
    static STRIPE: std::cell::Cell<usize> = const { std::cell::Cell::new(usize::MAX) };
}

/// This thread's stripe.
#[inline]
fn stripe() -> usize {
    STRIPE.with(|stripe| {
        let mut index = stripe.get();
        if index == usize::MAX {
            static NEXT: AtomicU64 = AtomicU64::new(0);
            index = NEXT.fetch_add(1, Ordering::Relaxed) as usize % STRIPES;
            stripe.set(index);
        }
        index
    })
}

impl StripedCounter {
    #[inline]
    pub fn add(&self, n: u64) {
        self.stripes[stripe()].0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn get(&self) -> u64 {
        self.stripes
            .iter()
            .map(|s| s.0.load(Ordering::Relaxed))
            .sum()
    }
}

/// Upper bounds of the histogram buckets: 2^i microseconds for i in
/// 0..BUCKETS (1 µs to about 67 s), then +Inf.
const BUCKETS: usize = 27;

/// A latency histogram with fixed power-of-two buckets.
#[derive(Debug)]
pub(crate) struct LatencyHistogram {
    /// Observations per bucket (not cumulative); the last is +Inf.
    counts: [AtomicU64; BUCKETS + 1],
    sum_nanos: AtomicU64,
}

impl Default for LatencyHistogram {
    fn default() -> Self {
        LatencyHistogram {
            counts: std::array::from_fn(|_| AtomicU64::new(0)),
            sum_nanos: AtomicU64::new(0),
        }
    }
}

impl LatencyHistogram {
    pub fn record(&self, took: Duration) {
        let micros = u64::try_from(took.as_micros()).unwrap_or(u64::MAX);
        // The first bucket whose bound (2^i µs) is at or above `micros`.
        let bucket = if micros <= 1 {
            0
        } else {
            (64 - (micros - 1).leading_zeros()) as usize
        };
        self.counts[bucket.min(BUCKETS)].fetch_add(1, Ordering::Relaxed);
        let nanos = u64::try_from(took.as_nanos()).unwrap_or(u64::MAX);
        self.sum_nanos.fetch_add(nanos, Ordering::Relaxed);
    }

    /// What it holds now.
    pub fn read(&self) -> Histogram {
        let mut cumulative = 0;
        let mut buckets = Vec::with_capacity(BUCKETS + 1);
        for (i, count) in self.counts.iter().enumerate() {
            cumulative += count.load(Ordering::Relaxed);
            let bound = if i == BUCKETS {
                f64::INFINITY
            } else {
                (1u64 << i) as f64 / 1e6
            };
            buckets.push((bound, cumulative));
        }
        Histogram {
            count: cumulative,
            sum_seconds: self.sum_nanos.load(Ordering::Relaxed) as f64 / 1e9,
            buckets,
        }
    }
}

/// A latency histogram as read by [`Db::metrics`](crate::Db::metrics).
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Histogram {
    /// Observations.
    pub count: u64,
    /// Their total, in seconds.
    pub sum_seconds: f64,
    /// Cumulative buckets: (upper bound in seconds, observations at or
    /// below it); bounds are powers of two of microseconds, the last is
    /// infinite and counts every observation.
    pub buckets: Vec<(f64, u64)>,
}

impl Histogram {
    /// An upper bound of the `q` quantile (0 to 1): the bound of the first
    /// bucket holding it (`None` without observations).
    pub fn quantile_upper_bound(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let rank = (q.clamp(0.0, 1.0) * self.count as f64).ceil().max(1.0) as u64;
        self.buckets
            .iter()
            .find(|(_, cumulative)| *cumulative >= rank)
            .map(|(bound, _)| *bound)
    }
}

/// Where a point read found its answer.
#[derive(Clone, Copy, Debug)]
pub(crate) enum GetSource {
    /// The memtable (active or frozen), by its read index or its skiplist.
    Memtable,
    /// What the WAL replay recovered at open.
    Replayed,
    /// A snapshot file.
    File,
    /// No source holds the key.
    Absent,
}

/// What the database counts as it runs, shared by the commit path, the
/// readers and the background thread.
#[derive(Debug, Default)]
pub(crate) struct Recorder {
    pub commit_latency: LatencyHistogram,
    pub wal_write_latency: LatencyHistogram,
    pub checkpoint_duration: LatencyHistogram,
    pub checkpoint_bytes: AtomicU64,
    pub merge_duration: LatencyHistogram,
    pub merge_bytes_written: AtomicU64,
    pub merge_bytes_read: AtomicU64,
    gets: [StripedCounter; 4],
    pub bloom_skips: StripedCounter,
    pub iterators: StripedCounter,
}

impl Recorder {
    /// Counts a point read answered by `source`, which skipped
    /// `bloom_skips` files by their filters.
    #[inline]
    pub fn count_get(&self, source: GetSource, bloom_skips: u64) {
        self.gets[source as usize].add(1);
        if bloom_skips > 0 {
            self.bloom_skips.add(bloom_skips);
        }
    }

    pub fn gets(&self, source: GetSource) -> u64 {
        self.gets[source as usize].get()
    }
}

/// A database's counters, gauges and histograms at one moment
/// ([`Db::metrics`](crate::Db::metrics)). Counters count since the
/// database was opened.
#[derive(Clone, Debug, Default, PartialEq)]
#[non_exhaustive]
pub struct Metrics {
    /// Batches committed.
    pub commits: u64,
    /// Groups written to the WAL (one write, and one fsync if synced, for
    /// many commits).
    pub commit_groups: u64,
    /// fsyncs of the WAL.
    pub wal_syncs: u64,
    /// Bytes written to the WAL (page padding included).
    pub wal_bytes: u64,
    /// Time from a commit's call to its return.
    pub commit_latency: Histogram,
    /// Time to write a group to the WAL, its fsync included when synced.
    pub wal_write_latency: Histogram,
    /// Times writers waited for a checkpoint (too many frozen memtables).
    pub write_stalls: u64,
    /// Time writers spent in those waits, in seconds.
    pub write_stall_seconds: f64,
    /// Bytes in the active memtable.
    pub memtable_bytes: u64,
    /// Memtables frozen and waiting for a checkpoint.
    pub frozen_memtables: u64,
    /// Checkpoints done.
    pub checkpoints: u64,
    /// Their durations.
    pub checkpoint_duration: Histogram,
    /// Bytes of snapshot files they wrote.
    pub checkpoint_bytes: u64,
    /// Merges done.
    pub merges: u64,
    /// Their durations.
    pub merge_duration: Histogram,
    /// Bytes of snapshot files merges read.
    pub merge_bytes_read: u64,
    /// Bytes of snapshot files merges wrote.
    pub merge_bytes_written: u64,
    /// Versions checkpoints and merges dropped (no reader could see them).
    pub versions_dropped: u64,
    /// Snapshot files and their bytes, per level (0: checkpoints' files,
    /// 1: merges' outputs), in level order.
    pub files_per_level: Vec<(u32, u64, u64)>,
    /// Partitions of the keyspaces' key ranges (`Options::partition_bytes`).
    pub partitions: u64,
    /// The most files one partition holds: a point read looks at no more
    /// files than this.
    pub most_files_in_a_partition: u64,
    /// Bytes of the WAL segments in the directory.
    pub wal_bytes_on_disk: u64,
    /// Point reads answered by the memtables (active or frozen).
    pub gets_from_memtable: u64,
    /// Point reads answered by what the WAL replay recovered at open.
    pub gets_from_replayed_log: u64,
    /// Point reads answered by a snapshot file.
    pub gets_from_file: u64,
    /// Point reads of absent keys.
    pub gets_absent: u64,
    /// Snapshot files a point read skipped because their bloom filter
    /// ruled the key out.
    pub bloom_skips: u64,
    /// Iterators created.
    pub iterators: u64,
    /// Snapshots the application holds now.
    pub live_snapshots: u64,
    /// The newest sequence number readers see.
    pub visible_seq: u64,
    /// How long opening the database took (recovery included), in seconds.
    pub open_seconds: f64,
}

impl crate::Db {
    /// The database's counters, gauges and histograms now: commits and
    /// their latency, WAL writes, stalls, memtable, checkpoints and merges,
    /// files and bytes per level, point reads by where they were answered,
    /// iterators, snapshots, and the time the open took. With the
    /// `prometheus` feature, `mapstore::prometheus::MetricsCollector`
    /// exposes the same to a Prometheus registry.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// db.insert("k", "v")?;
    /// db.get("k")?;
    /// db.get("absent")?;
    /// let metrics = db.metrics();
    /// assert_eq!(metrics.commits, 1);
    /// assert_eq!((metrics.gets_from_memtable, metrics.gets_absent), (1, 1));
    /// assert_eq!(metrics.commit_latency.count, 1);
    /// # Ok(()) }
    /// ```
    pub fn metrics(&self) -> Metrics {
        let commits = self.commit_stats();
        let background = self.checkpoint_stats();
        let recorder = self.read_state().recorder();
        let (manifest, _) = self.storage().durable_state();
        let (partitions, most_files_in_a_partition) = self.storage().partition_counts();
        let mut levels: std::collections::BTreeMap<u32, (u64, u64)> = Default::default();
        for meta in &manifest.snapshot_files {
            let level = levels.entry(meta.level).or_default();
            level.0 += 1;
            level.1 += meta.size_bytes;
        }
        let wal_bytes_on_disk = self
            .fs()
            .list_dir(self.path())
            .unwrap_or_default()
            .iter()
            .filter(|name| {
                matches!(
                    crate::files::classify(name),
                    Some(crate::files::FileKind::WalSegment(_))
                )
            })
            .filter_map(|name| self.fs().file_len(&self.path().join(name)).ok())
            .sum();
        Metrics {
            commits: commits.commits,
            commit_groups: commits.groups,
            wal_syncs: commits.wal_syncs,
            wal_bytes: commits.wal_bytes,
            commit_latency: recorder.commit_latency.read(),
            wal_write_latency: recorder.wal_write_latency.read(),
            write_stalls: background.write_stalls,
            write_stall_seconds: background.write_stall_micros as f64 / 1e6,
            memtable_bytes: self.memtable_bytes() as u64,
            frozen_memtables: background.frozen_memtables as u64,
            checkpoints: background.checkpoints,
            checkpoint_duration: recorder.checkpoint_duration.read(),
            checkpoint_bytes: recorder.checkpoint_bytes.load(Ordering::Relaxed),
            merges: background.merges,
            merge_duration: recorder.merge_duration.read(),
            merge_bytes_read: recorder.merge_bytes_read.load(Ordering::Relaxed),
            merge_bytes_written: recorder.merge_bytes_written.load(Ordering::Relaxed),
            versions_dropped: background.versions_dropped,
            files_per_level: levels
                .into_iter()
                .map(|(level, (files, bytes))| (level, files, bytes))
                .collect(),
            partitions,
            most_files_in_a_partition,
            wal_bytes_on_disk,
            gets_from_memtable: recorder.gets(GetSource::Memtable),
            gets_from_replayed_log: recorder.gets(GetSource::Replayed),
            gets_from_file: recorder.gets(GetSource::File),
            gets_absent: recorder.gets(GetSource::Absent),
            bloom_skips: recorder.bloom_skips.get(),
            iterators: recorder.iterators.get(),
            live_snapshots: self.read_state().pinned_seqs().len() as u64,
            visible_seq: self.read_state().visible_seq(),
            open_seconds: self.recovery_report().duration.as_secs_f64(),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_are_cumulative_powers_of_two() {
        let h = LatencyHistogram::default();
        for micros in [0, 1, 2, 3, 4, 5, 1000, 1 << 40] {
            h.record(Duration::from_micros(micros));
        }
        let read = h.read();
        assert_eq!(read.count, 8);
        let at = |bound: f64| read.buckets.iter().find(|b| b.0 == bound).unwrap().1;
        assert_eq!(at(1e-6), 2); // 0 and 1 µs
        assert_eq!(at(2e-6), 3);
        assert_eq!(at(4e-6), 5); // 3 and 4
        assert_eq!(at(8e-6), 6); // 5
        assert_eq!(at(1024e-6), 7); // 1000
        assert_eq!(read.buckets.last().unwrap(), &(f64::INFINITY, 8));
        assert_eq!(read.quantile_upper_bound(0.5), Some(4e-6));
        assert!(read.sum_seconds > 1e6);
    }

    #[test]
    fn striped_counters_sum_every_thread() {
        let counter = std::sync::Arc::new(StripedCounter::default());
        let threads: Vec<_> = (0..8)
            .map(|_| {
                let counter = counter.clone();
                std::thread::spawn(move || (0..1000).for_each(|_| counter.add(1)))
            })
            .collect();
        threads.into_iter().for_each(|t| t.join().unwrap());
        assert_eq!(counter.get(), 8000);
    }
}
