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
use crate::files::{self, FileKind};
use crate::history::HistoryState;
use crate::io::FileSystem;
use crate::keyspace::Catalog;
use crate::manifest;
use crate::memtable::{MemtableSet, Version};
use crate::merge::{MergeIter, VersionGc};
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
    /// The manifest's snapshot files, open, newest first.
    pub files: Vec<Arc<SnapshotFile>>,
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
    pub max_snapshot_files: usize,
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
    /// The files of `manifest`, in the same order (newest first).
    files: Vec<Arc<SnapshotFile>>,
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
        (state.manifest.clone(), state.files.clone())
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
            snapshot_file_bytes: state.files.iter().map(|file| file.size()).sum(),
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
                    if let Some(keyspace) = self.keyspace_over_file_limit(&state.files) {
                        break Job::Merge {
                            keyspaces: vec![keyspace],
                            requested: state.merges_done,
                        };
                    }
                    if let Some(frozen) = state.frozen.front() {
                        break Job::Checkpoint(frozen.clone());
                    }
                    if state.merges_requested > state.merges_done {
                        // A compaction merges every keyspace's files.
                        let mut keyspaces: Vec<u32> =
                            state.files.iter().map(|file| file.keyspace()).collect();
                        keyspaces.sort_unstable();
                        keyspaces.dedup();
                        break Job::Merge {
                            keyspaces,
                            requested: state.merges_requested,
                        };
                    }
                    state = self.wait_for_work(state);
                }
            };
            let result = match &job {
                Job::Checkpoint(frozen) => self.checkpoint(frozen),
                Job::Merge {
                    keyspaces,
                    requested,
                } => self.merge(keyspaces, *requested),
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

    /// A keyspace with more than `max_snapshot_files` files, if any.
    fn keyspace_over_file_limit(&self, files: &[Arc<SnapshotFile>]) -> Option<u32> {
        let mut counts = std::collections::BTreeMap::new();
        for file in files {
            *counts.entry(file.keyspace()).or_insert(0usize) += 1;
        }
        counts
            .into_iter()
            .find(|(_, count)| *count > self.config.max_snapshot_files)
            .map(|(keyspace, _)| keyspace)
    }

    /// Writes `versions` (sorted) of `keyspace` to a new snapshot file,
    /// keeping what `gc` keeps, marked as a full merge's output if `merged`
    /// (a merge takes every file of its keyspace);
    /// returns the open file and what it holds, or `None` if nothing
    /// survived.
    fn write_file(
        &self,
        keyspace: u32,
        versions: impl Iterator<Item = Result<Version>>,
        gc: &mut VersionGc,
        merged: bool,
    ) -> Result<Option<(Arc<SnapshotFile>, FileSummary)>> {
        let (number, path) = self.new_file_path();
        let mut writer = SnapshotFileWriter::create(&*self.fs, &self.config.dir, path.clone())?
            .for_keyspace(keyspace)
            .merge_output(merged);
        let mut written = 0u64;
        for version in versions {
            let version = match version {
                Ok(version) => version,
                Err(error) => {
                    writer.abandon();
                    return Err(error);
                }
            };
            if gc.keep(&version) {
                if let Err(error) = writer.add(
                    &version.key,
                    version.seq,
                    version.value.as_deref(),
                    version.expires,
                ) {
                    writer.abandon();
                    return Err(error);
                }
                written += 1;
            }
        }
        self.versions_dropped
            .fetch_add(gc.dropped, Ordering::Relaxed);
        if written == 0 {
            writer.abandon();
            return Ok(None);
        }
        let summary = writer.finish()?;
        let file = Arc::new(
            SnapshotFile::open(self.fs.clone(), &path, number)?
                .with_largest_seq(summary.largest_seq)
                .with_earliest_expiry(summary.earliest_expiry),
        );
        // What this thread just wrote is checked here, in the background,
        // not at a reader's first lookup; a file that fails (a writer's
        // bug) is not installed.
        file.check_index()?;
        Ok(Some((file, summary)))
    }

    /// Writes the keyspaces that exist as of `manifest.checkpoint_seq` into
    /// `manifest`, and takes the files of every other keyspace out of it
    /// and out of `files`; returns those files (a drop's space comes back
    /// once the checkpoint that covers the drop is durable).
    fn record_keyspaces(
        &self,
        manifest: &mut Manifest,
        files: &mut Vec<Arc<SnapshotFile>>,
    ) -> Vec<Arc<SnapshotFile>> {
        let catalog = lock(&self.catalog);
        let seq = manifest.checkpoint_seq;
        manifest.keyspaces = catalog.manifest_entries(seq);
        manifest.next_keyspace_id = catalog.next_id_at(seq);
        manifest
            .snapshot_files
            .retain(|meta| catalog.exists_at(meta.keyspace, seq));
        let (kept, dropped) = std::mem::take(files)
            .into_iter()
            .partition(|file| catalog.exists_at(file.keyspace(), seq));
        *files = kept;
        dropped
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
        let mut written = Vec::new();
        for (keyspace, versions) in keyspaces {
            // Tombstones stay: older versions of their keys may be in
            // files. A collector per keyspace: it compares each version
            // with the one before, which must be of the same keyspace.
            let mut gc = self.version_gc(false)?;
            written.extend(self.write_file(keyspace, versions.map(Ok), &mut gc, false)?);
        }
        let frozen_source = frozen.content.source();
        let written_bytes: u64 = written.iter().map(|(_, summary)| summary.size_bytes).sum();

        let (old_manifest, old_files) = {
            let state = self.state();
            (state.manifest.clone(), state.files.clone())
        };
        let mut manifest = Manifest {
            checkpoint_seq: frozen.last_seq,
            wal_start_segment: frozen.wal_start_segment,
            next_file_number: self.file_numbers.load(Ordering::SeqCst),
            ..old_manifest
        };
        let mut files = old_files;
        for (file, summary) in written.iter().rev() {
            manifest
                .snapshot_files
                .insert(0, file_meta(file.number(), file.keyspace(), summary, 0));
            files.insert(0, file.clone());
        }
        let dropped = self.record_keyspaces(&mut manifest, &mut files);
        manifest.history_start = Some(self.history.start());
        manifest::write(&*self.fs, &self.config.dir, &mut manifest)?;
        lock(&self.catalog).forget_dropped(manifest.checkpoint_seq);

        // The manifest is durable: readers switch to the files, and the WAL
        // before `wal_start_segment` is no longer needed.
        self.read_state.edit(|view| {
            let mut sources = Vec::with_capacity(view.sources.len() + written.len());
            for source in &view.sources {
                if source.is(&frozen_source) {
                    sources.extend(written.iter().map(|(file, _)| Source::File(file.clone())));
                } else if !is_one_of(source, &dropped) {
                    sources.push(source.clone());
                }
            }
            sources
        });
        for file in &dropped {
            file.mark_obsolete();
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

    /// Merges the files of each of `keyspaces` into one file per keyspace,
    /// and installs the result with one manifest.
    fn merge(&self, keyspaces: &[u32], requested: u64) -> Result<()> {
        let _span = trace::span!("mapstore::merge", keyspaces = keyspaces.len());
        let started = Instant::now();
        let (old_manifest, mut files) = {
            let state = self.state();
            (state.manifest.clone(), state.files.clone())
        };
        let mut merged: Vec<Arc<SnapshotFile>> = Vec::new();
        let mut written = Vec::new();
        for &keyspace in keyspaces {
            // Every file of the keyspace takes part, so nothing older can
            // hide under a dropped tombstone.
            let inputs: Vec<Arc<SnapshotFile>> = files
                .iter()
                .filter(|file| file.keyspace() == keyspace)
                .cloned()
                .collect();
            if inputs.is_empty() {
                continue;
            }
            let mut gc = self.version_gc(true)?;
            let streams: Vec<_> = inputs.iter().map(|file| file.versions()).collect();
            written.extend(self.write_file(keyspace, MergeIter::new(streams), &mut gc, true)?);
            merged.extend(inputs);
        }
        let bytes_read: u64 = merged.iter().map(|file| file.size()).sum();
        let bytes_written: u64 = written.iter().map(|(_, summary)| summary.size_bytes).sum();
        // The merged files take the place of the oldest: each replaces
        // every file of its keyspace.
        files.retain(|file| !merged.iter().any(|old| Arc::ptr_eq(old, file)));
        files.extend(written.iter().map(|(file, _)| file.clone()));
        let mut manifest = Manifest {
            next_file_number: self.file_numbers.load(Ordering::SeqCst),
            ..old_manifest
        };
        manifest
            .snapshot_files
            .retain(|meta| files.iter().any(|file| file.number() == meta.file_number));
        for (file, summary) in &written {
            manifest
                .snapshot_files
                .push(file_meta(file.number(), file.keyspace(), summary, 1));
        }
        merged.extend(self.record_keyspaces(&mut manifest, &mut files));
        manifest.history_start = Some(self.history.start());
        manifest::write(&*self.fs, &self.config.dir, &mut manifest)?;

        self.read_state.edit(|view| {
            let mut sources: Vec<Source> = view
                .sources
                .iter()
                .filter(|source| !is_one_of(source, &merged))
                .cloned()
                .collect();
            sources.extend(written.iter().map(|(file, _)| Source::File(file.clone())));
            sources
        });
        // Out of the manifest: each old file goes when its last reader does.
        // Let go of them here before reporting the merge done, so that a
        // caller dropping its last snapshot sees the files go at once.
        for file in &merged {
            file.mark_obsolete();
        }
        drop(merged);
        {
            let mut state = self.state();
            state.manifest = manifest;
            state.files = files;
            state.merges_done = state.merges_done.max(requested);
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
}

enum Job {
    Checkpoint(FrozenMemtable),
    /// Merge each of these keyspaces' files into one.
    Merge {
        keyspaces: Vec<u32>,
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

/// Whether `source` is one of `files`.
fn is_one_of(source: &Source, files: &[Arc<SnapshotFile>]) -> bool {
    match source {
        Source::File(file) => files.iter().any(|old| Arc::ptr_eq(old, file)),
        Source::Memtables(_) | Source::Replayed(_) => false,
    }
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
