//! Checkpoints and merges: the background side of the engine.
//!
//! When the active memtable grows past its limit, the commit leader
//! *freezes* it (see `commit.rs`): the WAL moves to a new segment, a fresh
//! memtable takes new writes, and the frozen one is handed to [`Storage`].
//! A background thread then
//!
//! 1. writes the frozen memtable to a new snapshot file (temporary name,
//!    fsync, rename, directory fsync),
//! 2. writes a new MANIFEST naming that file, the sequence number it covers
//!    and the WAL segment where replay now starts,
//! 3. swaps the frozen memtable for the file in the read view, and
//! 4. deletes the WAL segments the checkpoint covers.
//!
//! A frozen generation holds a memtable per keyspace, and each becomes a
//! file of its own: a snapshot file holds one keyspace. When a keyspace
//! has more than `max_snapshot_files` files (or on
//! [`Db::compact`](crate::Db::compact)), its files are merged into one,
//! dropping versions no reader can see. Files leave the manifest first and
//! the disk only when the last snapshot holding them is dropped; the files
//! of a dropped keyspace leave it with the first manifest whose checkpoint
//! covers the drop.
//!
//! The manifest and the file list change only on this thread, one job at a
//! time, so no two jobs race to install a manifest.

use std::collections::{BTreeSet, VecDeque};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use bytes::Bytes;

use crate::error::{Error, Result};
use crate::file_set::{FileSet, LiveFile};
use crate::files::{self, FileKind};
use crate::history::HistoryState;
use crate::io::FileSystem;
use crate::keyspace::Catalog;
use crate::manifest;
use crate::memtable::{MemtableSet, Version};
use crate::merge::{MergeIter, VersionGc};
use crate::merge_policy::{MergeChoice, MergePolicy};
use crate::proto::{Manifest, SnapshotFileMeta};
use crate::read::{ReadState, Source};
use crate::replayed::ReplayedRuns;
use crate::snapshot_file::writer::FileSummary;
use crate::snapshot_file::{SnapshotFile, SnapshotFileWriter};
use crate::trace;
use crate::wal::recycle::{Offer, RecycledSegments};

/// A memtable that no longer takes writes, waiting to be checkpointed
/// (or, after a crash, the run of versions the WAL replay recovered).
#[derive(Debug, Clone)]
pub(crate) struct FrozenMemtable {
    pub content: FrozenContent,
    /// The last sequence number in it (every earlier one is in it or in files).
    pub last_seq: u64,
    /// The WAL segment that holds the first commit after it.
    pub wal_start_segment: u64,
}

/// What a frozen memtable generation holds, by keyspace.
#[derive(Debug, Clone)]
pub(crate) enum FrozenContent {
    Memtables(Arc<MemtableSet>),
    Replayed(Arc<ReplayedRuns>),
}

impl FrozenContent {
    /// The same versions as a source of the read view.
    pub fn source(&self) -> Source {
        match self {
            FrozenContent::Memtables(set) => Source::Memtables(set.clone()),
            FrozenContent::Replayed(runs) => Source::Replayed(runs.clone()),
        }
    }

    /// Each keyspace's versions, in order, as a checkpoint writes them.
    fn keyspaces(&self) -> Vec<(u32, Box<dyn Iterator<Item = Version> + '_>)> {
        match self {
            FrozenContent::Memtables(set) => set
                .tables()
                .map(|(id, table)| {
                    (
                        id,
                        Box::new(table.versions()) as Box<dyn Iterator<Item = _>>,
                    )
                })
                .collect(),
            FrozenContent::Replayed(runs) => runs
                .iter()
                .map(|(id, run)| (id, Box::new(run.versions()) as Box<dyn Iterator<Item = _>>))
                .collect(),
        }
    }
}

/// Counters of the background work and of write backpressure.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[non_exhaustive]
pub struct CheckpointStats {
    /// Memtables written to snapshot files since open.
    pub checkpoints: u64,
    /// Merges of snapshot files since open.
    pub merges: u64,
    /// Versions dropped by checkpoints and merges (no reader could see them).
    pub versions_dropped: u64,
    /// Times a writer waited because `max_frozen_memtables` memtables were
    /// already waiting for a checkpoint.
    pub write_stalls: u64,
    /// Total time writers spent in those waits, in microseconds.
    pub write_stall_micros: u64,
    /// Memtables frozen and not yet checkpointed.
    pub frozen_memtables: usize,
    /// Snapshot files in the current manifest.
    pub snapshot_files: usize,
    /// Their total size in bytes.
    pub snapshot_file_bytes: u64,
    /// WAL segments kept for reuse that were deleted because the writer
    /// left them unused for
    /// [`Options::wal_segments_kept_idle`](crate::Options::wal_segments_kept_idle).
    pub idle_wal_segments_deleted: u64,
}

/// The database's state on disk as recovery left it.
#[derive(Debug)]
pub(crate) struct OnDisk {
    pub manifest: Manifest,
    /// The manifest's snapshot files, open, by keyspace and partition.
    pub files: FileSet,
    /// Files nothing reads any more, to remove in the background.
    pub leftovers: Vec<PathBuf>,
    /// The history kept, whose start each checkpoint and merge moves and
    /// records.
    pub history: Arc<HistoryState>,
}

/// Settings the background work needs.
#[derive(Debug, Clone)]
pub(crate) struct StorageConfig {
    pub dir: PathBuf,
    pub max_frozen_memtables: usize,
    /// When to merge which files.
    pub merge_policy: MergePolicy,
    /// Where obsolete WAL segments go for the writer to reuse; `None` to
    /// delete them.
    pub recycled: Option<Arc<RecycledSegments>>,
    /// Nice levels the background thread lowers its priority by
    /// (`Options::background_nice`).
    pub background_nice: u8,
    /// The database was opened read-only: no background thread, so no
    /// checkpoint, merge or removal ever runs.
    pub read_only: bool,
}

struct State {
    /// Oldest first.
    frozen: VecDeque<FrozenMemtable>,
    manifest: Manifest,
    /// The files of `manifest`, arranged as it says.
    files: FileSet,
    merges_requested: u64,
    merges_done: u64,
    failure: Option<String>,
    shutdown: bool,
}

/// The checkpoint and merge machinery shared by the commit path (which
/// hands over frozen memtables) and the background thread.
pub(crate) struct Storage {
    fs: Arc<dyn FileSystem>,
    config: StorageConfig,
    read_state: Arc<ReadState>,
    file_numbers: Arc<AtomicU64>,
    /// The keyspaces: which exist as of a checkpoint, for its MANIFEST.
    catalog: Arc<Mutex<Catalog>>,
    history: Arc<HistoryState>,
    state: Mutex<State>,
    changed: Condvar,
    thread: Mutex<Option<JoinHandle<()>>>,
    /// Set together with `State::failure`.
    failed: AtomicBool,
    checkpoints: AtomicU64,
    merges: AtomicU64,
    versions_dropped: AtomicU64,
    write_stalls: AtomicU64,
    write_stall_micros: AtomicU64,
    idle_wal_segments_deleted: AtomicU64,
}

impl std::fmt::Debug for Storage {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Storage")
            .field("dir", &self.config.dir)
            .finish_non_exhaustive()
    }
}

impl Storage {
    /// Starts the background thread for a database whose state on disk is
    /// `manifest` with `files` open.
    pub fn start(
        fs: Arc<dyn FileSystem>,
        config: StorageConfig,
        read_state: Arc<ReadState>,
        file_numbers: Arc<AtomicU64>,
        catalog: Arc<Mutex<Catalog>>,
        on_disk: OnDisk,
    ) -> Arc<Storage> {
        let OnDisk {
            manifest,
            files,
            leftovers,
            history,
        } = on_disk;
        let storage = Arc::new(Storage {
            fs,
            config,
            read_state,
            file_numbers,
            catalog,
            history,
            state: Mutex::new(State {
                frozen: VecDeque::new(),
                manifest,
                files,
                merges_requested: 0,
                merges_done: 0,
                failure: None,
                shutdown: false,
            }),
            changed: Condvar::new(),
            thread: Mutex::new(None),
            failed: AtomicBool::new(false),
            checkpoints: AtomicU64::new(0),
            merges: AtomicU64::new(0),
            versions_dropped: AtomicU64::new(0),
            write_stalls: AtomicU64::new(0),
            write_stall_micros: AtomicU64::new(0),
            idle_wal_segments_deleted: AtomicU64::new(0),
        });
        if storage.config.read_only {
            return storage;
        }
        let worker = storage.clone();
        let nice = storage.config.background_nice;
        let handle = std::thread::Builder::new()
            .name("mapstore-checkpoint".into())
            .spawn(move || {
                lower_thread_priority(nice);
                worker.remove_leftovers(&leftovers);
                worker.run()
            });
        match handle {
            Ok(handle) => *lock(&storage.thread) = Some(handle),
            // Without a thread nothing is checkpointed; writes stop at the
            // first freeze with this cause instead of failing open.
            Err(error) => {
                storage.record_failure(format!("cannot start the checkpoint thread: {error}"))
            }
        }
        storage
    }

    fn state(&self) -> MutexGuard<'_, State> {
        lock(&self.state)
    }

    fn wait<'a>(&self, guard: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        self.changed
            .wait(guard)
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    fn wait_timeout<'a>(
        &self,
        guard: MutexGuard<'a, State>,
        timeout: Duration,
    ) -> MutexGuard<'a, State> {
        match self.changed.wait_timeout(guard, timeout) {
            Ok((guard, _)) => guard,
            Err(poisoned) => poisoned.into_inner().0,
        }
    }

    fn failure_error(cause: &str) -> Error {
        Error::WritesStopped {
            cause: format!("background checkpoint failed: {cause}"),
        }
    }

    /// Waits until fewer than `max_frozen_memtables` memtables wait for a
    /// checkpoint (backpressure on the commit path).
    pub fn wait_for_room(&self) -> Result<()> {
        let state = self.state();
        if state.frozen.len() < self.config.max_frozen_memtables {
            return Ok(());
        }
        let _span = trace::span!("mapstore::write_stall", frozen = state.frozen.len());
        let started = Instant::now();
        self.write_stalls.fetch_add(1, Ordering::Relaxed);
        let max = self.config.max_frozen_memtables;
        drop(self.wait_until(state, |state| state.frozen.len() < max)?);
        let micros = u64::try_from(started.elapsed().as_micros()).unwrap_or(u64::MAX);
        self.write_stall_micros.fetch_add(micros, Ordering::Relaxed);
        Ok(())
    }

    /// Waits until `done` holds, or fails if background work failed or the
    /// database is shutting down first.
    fn wait_until<'a>(
        &self,
        mut state: MutexGuard<'a, State>,
        done: impl Fn(&State) -> bool,
    ) -> Result<MutexGuard<'a, State>> {
        loop {
            if done(&state) {
                return Ok(state);
            }
            if let Some(cause) = &state.failure {
                return Err(Self::failure_error(cause));
            }
            if state.shutdown {
                return Err(Error::Closed);
            }
            state = self.wait(state);
        }
    }

    /// Takes a frozen memtable to checkpoint in the background.
    pub fn push_frozen(&self, frozen: FrozenMemtable) {
        self.state().frozen.push_back(frozen);
        self.changed.notify_all();
    }

    /// Waits until every commit up to `seq` is in snapshot files named by a
    /// durable manifest.
    pub fn wait_checkpointed(&self, seq: u64) -> Result<()> {
        self.wait_until(self.state(), |state| state.manifest.checkpoint_seq >= seq)
            .map(drop)
    }

    /// Asks for a merge of every file and waits until it is durable.
    pub fn merge_and_wait(&self) -> Result<()> {
        let mut state = self.state();
        state.merges_requested += 1;
        let target = state.merges_requested;
        self.changed.notify_all();
        drop(self.wait_until(state, |state| state.merges_done >= target)?);
        // A compaction is asked for to reclaim space: that includes the
        // obsolete WAL segments kept for reuse.
        self.remove_kept_segments();
        Ok(())
    }

    /// Deletes the obsolete WAL segments kept for reuse, and returns how
    /// many there were. A failure leaves the file to the next open, which
    /// removes every segment a checkpoint covers.
    fn remove_kept_segments(&self) -> u64 {
        let Some(recycled) = &self.config.recycled else {
            return 0;
        };
        let numbers = recycled.take_all();
        for number in &numbers {
            let _ = self
                .fs
                .remove_file(&self.config.dir.join(files::wal_segment_name(*number)));
        }
        numbers.len() as u64
    }

    /// The error to refuse writes with once background work has failed
    /// (checked on every commit, so the common case is one atomic load).
    pub fn check_healthy(&self) -> Result<()> {
        if !self.failed.load(Ordering::Acquire) {
            return Ok(());
        }
        match &self.state().failure {
            Some(cause) => Err(Self::failure_error(cause)),
            None => Ok(()),
        }
    }

    fn record_failure(&self, cause: String) {
        self.state().failure = Some(cause);
        self.failed.store(true, Ordering::Release);
        self.changed.notify_all();
    }

    /// The durable manifest and its snapshot files, held open: no merge
    /// deletes them while the caller holds them (a backup copies them).
    pub fn durable_state(&self) -> (Manifest, Vec<Arc<SnapshotFile>>) {
        let state = self.state();
        let files = state.files.files().map(|live| live.file.clone()).collect();
        (state.manifest.clone(), files)
    }

    /// How many partitions the keyspaces with files have, and the most
    /// files one of them holds.
    pub fn partition_counts(&self) -> (u64, u64) {
        let state = self.state();
        let files = &state.files;
        let mut partitions = 0;
        let mut most = 0;
        for keyspace in files.keyspaces() {
            for partition in files.partitions(keyspace) {
                partitions += 1;
                most = most.max(partition.files.len() as u64);
            }
        }
        (partitions, most)
    }

    pub fn stats(&self) -> CheckpointStats {
        let state = self.state();
        CheckpointStats {
            checkpoints: self.checkpoints.load(Ordering::Relaxed),
            merges: self.merges.load(Ordering::Relaxed),
            versions_dropped: self.versions_dropped.load(Ordering::Relaxed),
            write_stalls: self.write_stalls.load(Ordering::Relaxed),
            write_stall_micros: self.write_stall_micros.load(Ordering::Relaxed),
            frozen_memtables: state.frozen.len(),
            snapshot_files: state.files.len(),
            snapshot_file_bytes: state.files.files().map(LiveFile::size).sum(),
            idle_wal_segments_deleted: self.idle_wal_segments_deleted.load(Ordering::Relaxed),
        }
    }

    /// Stops the background thread after the job in progress. Frozen
    /// memtables not yet written stay covered by the WAL.
    pub fn shutdown(&self) {
        self.state().shutdown = true;
        self.changed.notify_all();
        if let Some(handle) = lock(&self.thread).take() {
            let _ = handle.join();
        }
        // Nothing reuses them any more (the WAL writer is closed first).
        self.remove_kept_segments();
    }

    /// Removes what a crash left that nothing reads (see
    /// `Recovered::leftovers`), before anything else, so that it is done
    /// by the time `close` returns. A removal that fails is left to the
    /// next open, which finds the same file again.
    fn remove_leftovers(&self, leftovers: &[PathBuf]) {
        for path in leftovers {
            let _ = self.fs.remove_file(path);
        }
    }

    /// The background loop.
    fn run(&self) {
        loop {
            let job = {
                let mut state = self.state();
                loop {
                    if state.shutdown || state.failure.is_some() {
                        return;
                    }
                    // Too many files come first, so that the bound on the
                    // files a lookup reads holds even under a stream of
                    // checkpoints (writers may then wait for the merge).
                    if let Some(job) = self.merge_due(&state.files, true) {
                        break job;
                    }
                    // The merges the policy asks for, one partition at a
                    // time, come before a checkpoint while writers still
                    // have room for another frozen memtable: under a
                    // steady stream of writes they would otherwise wait
                    // until files pile up to the bound, and merges forced
                    // there take whatever is newest, not files of a size.
                    let room = state.frozen.len() < self.config.max_frozen_memtables;
                    if room && let Some(job) = self.merge_due(&state.files, false) {
                        break job;
                    }
                    if let Some(frozen) = state.frozen.front() {
                        break Job::Checkpoint(frozen.clone());
                    }
                    if state.merges_requested > state.merges_done {
                        break Job::Compact {
                            requested: state.merges_requested,
                        };
                    }
                    if let Some(job) = self.merge_due(&state.files, false) {
                        break job;
                    }
                    state = self.wait_for_work(state);
                }
            };
            let result = match &job {
                Job::Checkpoint(frozen) => self.checkpoint(frozen),
                Job::Merge {
                    keyspace,
                    partition,
                    choice,
                } => self.merge(*keyspace, *partition, *choice),
                Job::Compact { requested } => self.compact(*requested),
            };
            if let Err(error) = result {
                self.record_failure(error.to_string());
                return;
            }
        }
    }

    /// Waits, with nothing to do, until something changes; while segments
    /// are kept for reuse, only until they have gone unused for the idle
    /// limit, and then deletes them.
    fn wait_for_work<'a>(&'a self, state: MutexGuard<'a, State>) -> MutexGuard<'a, State> {
        let until_idle = self
            .config
            .recycled
            .as_ref()
            .and_then(|pool| pool.until_idle());
        match until_idle {
            None => self.wait(state),
            Some(wait) if !wait.is_zero() => self.wait_timeout(state, wait),
            Some(_) => {
                // Unlinking takes time: not under the lock the commit path
                // takes.
                drop(state);
                let deleted = self.remove_kept_segments();
                self.idle_wal_segments_deleted
                    .fetch_add(deleted, Ordering::Relaxed);
                self.state()
            }
        }
    }

    /// The sequence numbers readers may still read at: live snapshots and
    /// the newest commit.
    /// What a garbage collection about to run must keep: it moves the
    /// history's start to its horizon first, then reads the live snapshots
    /// (a snapshot taken at an older point is refused once the start has
    /// moved, one taken before is in the list).
    fn version_gc(&self, drop_tombstones: bool) -> Result<VersionGc> {
        let newest = self.read_state.visible_seq();
        let history_start = self.history.advance(newest)?;
        let mut seqs = self.read_state.pinned_seqs();
        seqs.push(newest);
        Ok(VersionGc::new(seqs, drop_tombstones, history_start))
    }

    fn new_file_path(&self) -> (u64, PathBuf) {
        let number = self.file_numbers.fetch_add(1, Ordering::SeqCst);
        (
            number,
            self.config.dir.join(files::snapshot_file_name(number)),
        )
    }

    /// A merge the policy asks for, if any: with `only_over_bound`, only
    /// in a partition holding more files than the bound on reads.
    fn merge_due(&self, files: &FileSet, only_over_bound: bool) -> Option<Job> {
        let policy = &self.config.merge_policy;
        for keyspace in files.keyspaces() {
            let keyspace_bytes = files.keyspace_size(keyspace);
            for (index, partition) in files.partitions(keyspace).iter().enumerate() {
                if only_over_bound && partition.files.len() <= policy.max_files {
                    continue;
                }
                let sizes: Vec<u64> = partition.files.iter().map(LiveFile::size).collect();
                let split_bytes = policy.split_bytes(keyspace_bytes, &partition.lower);
                if let Some(choice) = policy.choose(&sizes, split_bytes) {
                    return Some(Job::Merge {
                        keyspace,
                        partition: index,
                        choice,
                    });
                }
            }
        }
        None
    }

    /// Writes `versions` (sorted) of `keyspace` to new snapshot files,
    /// keeping what `gc` keeps, cut as `cut` says, and marked as the output
    /// of a whole partition's merge if `whole_merge`; returns each open
    /// file and what it holds (none if nothing survived).
    ///
    /// A whole merge also keeps the newest version of the first key of
    /// each file it writes and of the last key it reads, even a removal it
    /// could drop: its files then cover the key range of its inputs
    /// without a gap, so that a repair finds every input a crash left
    /// behind by overlap (`format/snapshot.md`, flag bit 0).
    fn write_files(
        &self,
        keyspace: u32,
        versions: impl Iterator<Item = Result<Version>>,
        gc: &mut VersionGc,
        cut: Cut<'_>,
        whole_merge: bool,
    ) -> Result<Vec<(Arc<SnapshotFile>, FileSummary)>> {
        let mut output = FileOutput::new(self, keyspace, whole_merge);
        let result = self.write_versions(&mut output, versions, gc, cut, whole_merge);
        self.versions_dropped
            .fetch_add(gc.dropped, Ordering::Relaxed);
        match result {
            Ok(()) => output.finish(),
            Err(error) => {
                output.abandon();
                Err(error)
            }
        }
    }

    /// The loop of [`write_files`](Self::write_files).
    fn write_versions(
        &self,
        output: &mut FileOutput<'_>,
        versions: impl Iterator<Item = Result<Version>>,
        gc: &mut VersionGc,
        cut: Cut<'_>,
        whole_merge: bool,
    ) -> Result<()> {
        let mut splits = match cut {
            Cut::AtKeys(keys) => keys,
            Cut::EveryBytes(_) => &[],
        };
        let mut current_key: Option<Bytes> = None;
        // The newest version of the key read last, if the collection
        // dropped it (a whole merge keeps it if no other key follows).
        let mut dropped_edge: Option<Version> = None;
        for version in versions {
            let version = version?;
            let newest_of_key = current_key.as_ref() != Some(&version.key);
            if newest_of_key {
                current_key = Some(version.key.clone());
                dropped_edge = None;
                let mut cut_here = false;
                while let Some((split, rest)) = splits.split_first() {
                    if split[..] > version.key[..] {
                        break;
                    }
                    splits = rest;
                    cut_here = true;
                }
                if let Cut::EveryBytes(bytes) = cut {
                    cut_here |= output.bytes_in_current() >= bytes;
                }
                if cut_here {
                    output.finish_current()?;
                }
            }
            let keep = gc.keep(&version);
            let edge = whole_merge && newest_of_key && !output.has_entries();
            if keep || edge {
                output.add(&version)?;
            } else if whole_merge && newest_of_key {
                dropped_edge = Some(version);
            }
        }
        if let Some(version) = dropped_edge {
            output.add(&version)?;
        }
        Ok(())
    }

    /// Writes the keyspaces that exist as of `manifest.checkpoint_seq` into
    /// `manifest`, and takes the files of every other keyspace out of
    /// `files`; returns those files (a drop's space comes back once the
    /// checkpoint that covers the drop is durable). Then writes `files`
    /// into `manifest`.
    fn record_files(&self, manifest: &mut Manifest, files: &mut FileSet) -> Vec<LiveFile> {
        let catalog = lock(&self.catalog);
        let seq = manifest.checkpoint_seq;
        manifest.keyspaces = catalog.manifest_entries(seq);
        manifest.next_keyspace_id = catalog.next_id_at(seq);
        let dropped = files.retain_keyspaces(|keyspace| catalog.exists_at(keyspace, seq));
        files.write_to(manifest);
        manifest.next_file_number = self.file_numbers.load(Ordering::SeqCst);
        manifest.history_start = Some(self.history.start());
        dropped
    }

    /// Makes `files` what readers read, in place of the view's files (and
    /// of the in-memory source `written`, if given, now in files).
    fn publish(&self, files: &FileSet, written: Option<&Source>) {
        let runs = files.runs();
        self.read_state.edit(|view| {
            let mut sources: Vec<Source> = view
                .sources
                .iter()
                .filter(|source| !matches!(source, Source::Run(_)))
                .filter(|source| written.is_none_or(|written| !source.is(written)))
                .cloned()
                .collect();
            sources.extend(runs.into_iter().map(Source::Run));
            sources
        });
    }

    /// The WAL segments a checkpoint covers that the history still needs:
    /// those holding a commit after the history start that `manifest`
    /// (durable) records.
    fn history_segments(&self, manifest: &Manifest) -> Result<BTreeSet<u64>> {
        let start = history_start_of(manifest);
        let segments = self.history.wal().segments()?;
        // A segment's commits end where the next one's begin; the last
        // one's, at the checkpoint at the latest (the segments it covers
        // are the only ones that may be retired).
        let ends = segments
            .iter()
            .skip(1)
            .map(|next| next.first_seq - 1)
            .chain([manifest.checkpoint_seq]);
        Ok(segments
            .iter()
            .zip(ends)
            .filter(|(_, last_seq)| *last_seq > start)
            .map(|(segment, _)| segment.number)
            .collect())
    }

    fn checkpoint(&self, frozen: &FrozenMemtable) -> Result<()> {
        let _span = trace::span!("mapstore::checkpoint", seq = frozen.last_seq);
        let started = Instant::now();
        // A keyspace dropped by the end of the generation gets no file.
        let keyspaces: Vec<_> = {
            let catalog = lock(&self.catalog);
            frozen
                .content
                .keyspaces()
                .into_iter()
                .filter(|(id, _)| catalog.exists_at(*id, frozen.last_seq))
                .collect()
        };
        let (old_manifest, mut files) = {
            let state = self.state();
            (state.manifest.clone(), state.files.clone())
        };
        let mut written = Vec::new();
        for (keyspace, versions) in keyspaces {
            // Tombstones stay: older versions of their keys may be in
            // files. A collector per keyspace: it compares each version
            // with the one before, which must be of the same keyspace. A
            // file per partition the memtable has keys for.
            let mut gc = self.version_gc(false)?;
            let splits = files.split_keys(keyspace);
            written.extend(self.write_files(
                keyspace,
                versions.map(Ok),
                &mut gc,
                Cut::AtKeys(&splits),
                false,
            )?);
        }
        let written_bytes: u64 = written.iter().map(|(_, summary)| summary.size_bytes).sum();
        for (file, summary) in &written {
            files.add_newest(LiveFile {
                meta: file_meta(file.number(), file.keyspace(), summary, 0),
                file: file.clone(),
            });
        }
        let mut manifest = Manifest {
            checkpoint_seq: frozen.last_seq,
            wal_start_segment: frozen.wal_start_segment,
            ..old_manifest
        };
        let dropped = self.record_files(&mut manifest, &mut files);
        manifest::write(&*self.fs, &self.config.dir, &mut manifest)?;
        lock(&self.catalog).forget_dropped(manifest.checkpoint_seq);

        // The manifest is durable: readers switch to the files, and the WAL
        // before `wal_start_segment` is no longer needed.
        self.publish(&files, Some(&frozen.content.source()));
        for live in &dropped {
            live.file.mark_obsolete();
        }
        // Let go of them before reporting the checkpoint done, so that a
        // caller waiting for it sees a dropped keyspace's files go at once
        // (tests/keyspaces.rs counted one left, once, on a busy machine).
        drop(dropped);
        let history_segments = self.history_segments(&manifest)?;
        retire_wal_segments_before(
            &*self.fs,
            &self.config.dir,
            frozen.wal_start_segment,
            &history_segments,
            self.config.recycled.as_deref(),
        )?;
        {
            let mut state = self.state();
            state.manifest = manifest;
            state.files = files;
            state.frozen.pop_front();
        }
        self.checkpoints.fetch_add(1, Ordering::Relaxed);
        let recorder = self.read_state.recorder();
        recorder.checkpoint_duration.record(started.elapsed());
        recorder
            .checkpoint_bytes
            .fetch_add(written_bytes, Ordering::Relaxed);
        trace::event!(
            files = written.len(),
            bytes = written_bytes,
            "checkpoint written"
        );
        self.changed.notify_all();
        Ok(())
    }

    /// Merges files of partition `partition` of `keyspace` as `choice`
    /// says, and installs the result with a new manifest.
    fn merge(&self, keyspace: u32, partition: usize, choice: MergeChoice) -> Result<()> {
        let _span = trace::span!("mapstore::merge", keyspace, partition);
        let started = Instant::now();
        let (old_manifest, mut files) = {
            let state = self.state();
            (state.manifest.clone(), state.files.clone())
        };
        let Some(inputs) = files.partitions(keyspace).get(partition) else {
            return Ok(());
        };
        let (count, whole) = match choice {
            MergeChoice::Newest(count) => (count.min(inputs.files.len()), false),
            MergeChoice::Whole { .. } => (inputs.files.len(), true),
        };
        let inputs: Vec<LiveFile> = inputs.files[..count].to_vec();
        // Only a merge of every file of the partition holds every version
        // of its keys, so only it may drop removals: nothing older can
        // surface from a file left out.
        let mut gc = self.version_gc(whole)?;
        let streams: Vec<_> = inputs.iter().map(|live| live.file.versions()).collect();
        let cut = match choice {
            MergeChoice::Whole { piece_bytes } => Cut::EveryBytes(piece_bytes),
            MergeChoice::Newest(_) => Cut::AtKeys(&[]),
        };
        let written = self.write_files(keyspace, MergeIter::new(streams), &mut gc, cut, whole)?;
        let bytes_read: u64 = inputs.iter().map(LiveFile::size).sum();
        let bytes_written: u64 = written.iter().map(|(_, summary)| summary.size_bytes).sum();
        let outputs: Vec<LiveFile> = written
            .iter()
            .map(|(file, summary)| LiveFile {
                meta: file_meta(file.number(), keyspace, summary, 1),
                file: file.clone(),
            })
            .collect();
        let mut replaced = if whole {
            files.replace_partition(keyspace, partition, outputs)
        } else {
            files.replace_newest(keyspace, partition, count, outputs.into_iter().next())
        };
        let mut manifest = old_manifest;
        replaced.extend(self.record_files(&mut manifest, &mut files));
        manifest::write(&*self.fs, &self.config.dir, &mut manifest)?;

        self.publish(&files, None);
        // Out of the manifest: each old file goes when its last reader does.
        // Let go of them here before reporting the merge done, so that a
        // caller dropping its last snapshot sees the files go at once.
        for live in &replaced {
            live.file.mark_obsolete();
        }
        drop(replaced);
        {
            let mut state = self.state();
            state.manifest = manifest;
            state.files = files;
        }
        self.merges.fetch_add(1, Ordering::Relaxed);
        let recorder = self.read_state.recorder();
        recorder.merge_duration.record(started.elapsed());
        recorder
            .merge_bytes_read
            .fetch_add(bytes_read, Ordering::Relaxed);
        recorder
            .merge_bytes_written
            .fetch_add(bytes_written, Ordering::Relaxed);
        trace::event!(bytes_read, bytes_written, "merge written");
        self.changed.notify_all();
        Ok(())
    }

    /// Merges every partition of every keyspace whole, one at a time
    /// ([`Db::compact`](crate::Db::compact)), then reports compaction
    /// `requested` done.
    fn compact(&self, requested: u64) -> Result<()> {
        // Only counts are taken: a handle on the files would keep the
        // merges' inputs on disk until this returns.
        let partitions: Vec<(u32, usize, u64)> = {
            let state = self.state();
            let files = &state.files;
            let policy = &self.config.merge_policy;
            let mut partitions = Vec::new();
            for keyspace in files.keyspaces() {
                let keyspace_bytes = files.keyspace_size(keyspace);
                for (index, partition) in files.partitions(keyspace).iter().enumerate() {
                    let split_bytes = policy.split_bytes(keyspace_bytes, &partition.lower);
                    partitions.push((keyspace, index, (split_bytes / 2).max(1)));
                }
            }
            partitions
        };
        // From the last partition back: a split shifts the indices of the
        // partitions after it only.
        for (keyspace, partition, piece_bytes) in partitions.into_iter().rev() {
            self.merge(keyspace, partition, MergeChoice::Whole { piece_bytes })?;
        }
        {
            let mut state = self.state();
            // Keyspaces dropped since the compaction began leave with the
            // next checkpoint; the request itself is done.
            state.merges_done = state.merges_done.max(requested);
        }
        self.changed.notify_all();
        Ok(())
    }
}

/// Where [`Storage::write_files`] cuts its output into files.
#[derive(Clone, Copy)]
enum Cut<'a> {
    /// Before each of these keys (a checkpoint, at its keyspace's
    /// partitions' split keys).
    AtKeys(&'a [Bytes]),
    /// Before the first key after a file has this many bytes (a whole
    /// merge, splitting its partition).
    EveryBytes(u64),
}

/// The files a checkpoint or merge is writing: the finished ones and the
/// one being written.
struct FileOutput<'a> {
    storage: &'a Storage,
    keyspace: u32,
    whole_merge: bool,
    finished: Vec<(u64, PathBuf, FileSummary)>,
    current: Option<(u64, PathBuf, SnapshotFileWriter<'a>)>,
}

impl<'a> FileOutput<'a> {
    fn new(storage: &'a Storage, keyspace: u32, whole_merge: bool) -> FileOutput<'a> {
        FileOutput {
            storage,
            keyspace,
            whole_merge,
            finished: Vec::new(),
            current: None,
        }
    }

    /// Whether the file being written has an entry.
    fn has_entries(&self) -> bool {
        self.current
            .as_ref()
            .is_some_and(|(_, _, writer)| writer.entries() > 0)
    }

    /// The bytes of the file being written so far.
    fn bytes_in_current(&self) -> u64 {
        self.current
            .as_ref()
            .map_or(0, |(_, _, writer)| writer.bytes_so_far())
    }

    /// Adds `version` to the file being written, starting one if needed.
    fn add(&mut self, version: &Version) -> Result<()> {
        if self.current.is_none() {
            let (number, path) = self.storage.new_file_path();
            let writer = SnapshotFileWriter::create(
                &*self.storage.fs,
                &self.storage.config.dir,
                path.clone(),
            )?
            .for_keyspace(self.keyspace)
            .merge_output(self.whole_merge);
            self.current = Some((number, path, writer));
        }
        let Some((_, _, writer)) = &mut self.current else {
            return Ok(());
        };
        writer.add(
            &version.key,
            version.seq,
            version.value.as_deref(),
            version.expires,
        )
    }

    /// Finishes the file being written, if any (durable under its name).
    fn finish_current(&mut self) -> Result<()> {
        if let Some((number, path, writer)) = self.current.take() {
            let summary = writer.finish()?;
            self.finished.push((number, path, summary));
        }
        Ok(())
    }

    /// Finishes the last file, then opens each; what this thread just
    /// wrote is checked here, in the background, not at a reader's first
    /// lookup; a file that fails (a writer's bug) is not installed.
    fn finish(mut self) -> Result<Vec<(Arc<SnapshotFile>, FileSummary)>> {
        self.finish_current()?;
        let mut opened = Vec::with_capacity(self.finished.len());
        for (number, path, summary) in std::mem::take(&mut self.finished) {
            let file = Arc::new(
                SnapshotFile::open(self.storage.fs.clone(), &path, number)?
                    .with_largest_seq(summary.largest_seq)
                    .with_earliest_expiry(summary.earliest_expiry),
            );
            file.check_index()?;
            opened.push((file, summary));
        }
        Ok(opened)
    }

    /// Gives up: the file being written is removed; finished ones stay
    /// as orphans that no MANIFEST names (the next open removes them).
    fn abandon(mut self) {
        if let Some((_, _, writer)) = self.current.take() {
            writer.abandon();
        }
    }
}

enum Job {
    Checkpoint(FrozenMemtable),
    /// Merge files of one partition, as the policy chose.
    Merge {
        keyspace: u32,
        partition: usize,
        choice: MergeChoice,
    },
    /// Merge every partition whole.
    Compact {
        requested: u64,
    },
}

/// Lowers the calling thread's priority by `levels` nice levels, at most to
/// 19, the lowest. Linux gives each thread its own nice value (a new thread
/// starts with its creator's); elsewhere this does nothing. A failure
/// leaves the priority as it was: slower under contention, never wrong.
fn lower_thread_priority(levels: u8) {
    #[cfg(target_os = "linux")]
    if levels > 0 {
        let me = Some(rustix::thread::gettid());
        if let Ok(nice) = rustix::process::getpriority_process(me) {
            let lowered = (nice + i32::from(levels)).min(19);
            let _ = rustix::process::setpriority_process(me, lowered);
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = levels;
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // Every critical section here only moves values in and out; a panic in
    // one cannot leave the state half-changed.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// What a MANIFEST says of a file: `level` 0 for a checkpoint's, 1 for a
/// merge's output.
pub(crate) fn file_meta(
    number: u64,
    keyspace: u32,
    summary: &FileSummary,
    level: u32,
) -> SnapshotFileMeta {
    SnapshotFileMeta {
        file_number: number,
        keyspace,
        size_bytes: summary.size_bytes,
        level,
        smallest_key: Bytes::copy_from_slice(&summary.smallest_key),
        largest_key: Bytes::copy_from_slice(&summary.largest_key),
        smallest_seq: summary.smallest_seq,
        largest_seq: summary.largest_seq,
        entry_count: summary.entry_count,
        earliest_expiry_micros: summary.earliest_expiry,
    }
}

/// The history start a MANIFEST records (before format version 3, its
/// checkpoint: the files hold that state exactly, and the WAL what
/// follows).
pub(crate) fn history_start_of(manifest: &Manifest) -> u64 {
    manifest.history_start.unwrap_or(manifest.checkpoint_seq)
}

/// Retires the WAL segments numbered below `first_kept` (a durable
/// checkpoint covers them) except those in `history` (the history still
/// reads them): each is kept for the WAL writer to reuse if `recycled`
/// wants it, else removed. A crash midway leaves some behind; recovery
/// ignores and removes them.
pub(crate) fn retire_wal_segments_before(
    fs: &dyn FileSystem,
    dir: &Path,
    first_kept: u64,
    history: &BTreeSet<u64>,
    recycled: Option<&RecycledSegments>,
) -> Result<()> {
    let names = fs
        .list_dir(dir)
        .map_err(|e| Error::io("list directory", dir, e))?;
    let mut listed = BTreeSet::new();
    for name in names {
        if let Some(FileKind::WalSegment(number)) = files::classify(&name) {
            listed.insert(number);
            if number >= first_kept || history.contains(&number) {
                continue;
            }
            if recycled.is_some_and(|recycled| recycled.offer(number) == Offer::Kept) {
                continue;
            }
            let path = dir.join(&name);
            match fs.remove_file(&path) {
                Ok(()) => {}
                // Already gone: nothing left to do.
                Err(error) if error.kind() == std::io::ErrorKind::NotFound => {}
                Err(error) => return Err(Error::io("remove", &path, error)),
            }
        }
    }
    if let Some(recycled) = recycled {
        recycled.forget_missing(&listed);
    }
    Ok(())
}
