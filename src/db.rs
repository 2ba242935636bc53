//! [`Db`]: opening a database and the operations on it.

use std::fmt;
use std::io;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::SystemTime;

use bytes::Bytes;

use crate::batch::WriteBatch;
use crate::checkpoint::{
    CheckpointStats, FrozenContent, FrozenMemtable, OnDisk, Storage, StorageConfig,
    history_start_of,
};
use crate::commit::{CommitPipeline, CommitStats, FreezeLimits};
use crate::condition::Condition;
use crate::error::{Error, Result};
use crate::expiry::{self, ExpiryQueue};
use crate::files;
use crate::history::{HistoryState, micros};
use crate::io::{FileLock, FileSystem};
use crate::keyspace::{Catalog, DEFAULT_KEYSPACE, Keyspace, KeyspaceInfo, check_name};
use crate::memtable::MemtableSet;
use crate::merge_policy::MergePolicy;
use crate::metrics::Recorder;
use crate::options::{Durability, Options, RecoveryMode};
use crate::read::{Iter, ReadState, ReadView, Snapshot, Source};
use crate::recovery::{self, RecoveryReport};
use crate::slice::Slice;
use crate::trace;
use crate::transaction::{Isolation, MAX_TRANSACT_ATTEMPTS, Transaction};
use crate::wal::history::{WalIndex, commit_time_of, last_seq_at_or_before};
use crate::wal::recycle::RecycledSegments;
use crate::wal::writer::{WalConfig, WalWriter};

/// A handle to an open database.
///
/// `Db` is cheap to clone and can be shared between threads; all clones use
/// the same database. The database closes when the last clone is dropped
/// ([`Keyspace`] handles, [`Transaction`]s and [`ChangeFeed`](crate::ChangeFeed)s hold one too), or explicitly
/// with [`close`](Db::close).
///
/// ```
/// # fn main() -> Result<(), mapstore::Error> {
/// # let dir = tempfile::tempdir().unwrap();
/// # let path = dir.path().join("db");
/// use mapstore::Db;
///
/// let db = Db::open(&path)?;
/// db.insert("greeting", "hello")?;
/// db.close()?;
///
/// let db = Db::open(&path)?;
/// assert_eq!(db.get("greeting")?.as_deref(), Some(&b"hello"[..]));
/// for entry in db.iter() {
///     let (key, value) = entry?;
///     println!("{key:?} = {value:?}");
/// }
/// # Ok(()) }
/// ```
#[derive(Clone)]
pub struct Db {
    inner: Arc<DbInner>,
}

pub(crate) struct DbInner {
    /// Tells this open database apart from every other one in the process,
    /// so that a keyspace handle of another cannot be used with it.
    id: u64,
    path: PathBuf,
    options: Options,
    /// The named keyspaces (shared with the commit leader, which records
    /// their creation and drop in commit order, and the checkpoints).
    catalog: Arc<Mutex<Catalog>>,
    /// Held while a keyspace is created or dropped: one change at a time.
    keyspace_changes: Mutex<()>,
    /// The default keyspace, as the internal operations take it.
    default_keyspace: Arc<KeyspaceInfo>,
    read_state: Arc<ReadState>,
    /// The history kept: its start, the clock, the WAL it reads.
    history: Arc<HistoryState>,
    /// The values written with a TTL, waiting for their expiry.
    expiries: Arc<ExpiryQueue>,
    pipeline: CommitPipeline,
    storage: Arc<Storage>,
    lock: Mutex<Option<Box<dyn FileLock>>>,
    /// Set once `close` begins: the cheap check readers make on every call
    /// (the `lock` mutex would serialize concurrent readers).
    closed: AtomicBool,
    /// Opened with [`Db::open_read_only`]: nothing is written, also not at
    /// close.
    read_only: bool,
    report: RecoveryReport,
}

#[cfg(test)]
impl Db {
    /// The commit pipeline, for unit tests of its state.
    pub(crate) fn pipeline(&self) -> &CommitPipeline {
        &self.inner.pipeline
    }
}

impl fmt::Debug for Db {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Db")
            .field("path", &self.inner.path)
            .field("options", &self.inner.options)
            .field("seq", &self.inner.read_state.visible_seq())
            .finish_non_exhaustive()
    }
}

impl Db {
    /// Opens the database in directory `path` with default [`Options`],
    /// creating the directory and the database if missing.
    ///
    /// # Errors
    /// [`Error::Locked`] if another `Db` has it open, [`Error::NotADirectory`],
    /// [`Error::NotADatabase`] for a directory of other files,
    /// [`Error::UnsupportedFormatVersion`], [`Error::Corruption`] for a damaged
    /// log or manifest, [`Error::Io`]. On any error, nothing in the directory
    /// was changed.
    pub fn open(path: impl AsRef<Path>) -> Result<Db> {
        Db::open_with(path, Options::default())
    }

    /// Opens the database in directory `path` with `options`.
    ///
    /// # Errors
    /// As [`open`](Db::open), and [`Error::InvalidOptions`].
    pub fn open_with(path: impl AsRef<Path>, options: Options) -> Result<Db> {
        Db::open_in(path.as_ref(), options, false)
    }

    /// Opens the database in directory `path` for reading only, with a
    /// shared lock: any number of processes may hold it read-only at once,
    /// and none may open it for writing meanwhile. It changes no file: a
    /// log to replay is replayed in memory, a torn tail is left on disk
    /// (only not read), and nothing is checkpointed, merged or removed.
    /// Every write, checkpoint, sync or keyspace change returns
    /// [`Error::ReadOnly`]; snapshots, time travel, diffs and change feeds
    /// work as usual.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// db.insert("k", "v")?;
    /// db.close()?;
    /// let reader = mapstore::Db::open_read_only(dir.path())?;
    /// let another = mapstore::Db::open_read_only(dir.path())?;   // shared
    /// assert_eq!(reader.get("k")?.as_deref(), Some(&b"v"[..]));
    /// assert!(matches!(reader.insert("k", "w"), Err(mapstore::Error::ReadOnly)));
    /// assert!(matches!(mapstore::Db::open(dir.path()), Err(mapstore::Error::Locked { .. })));
    /// # drop(another);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::NoDatabase`] if `path` holds no database,
    /// [`Error::Locked`] while a writer has it open, and as
    /// [`open`](Db::open).
    pub fn open_read_only(path: impl AsRef<Path>) -> Result<Db> {
        Db::open_read_only_with(path, Options::default())
    }

    /// [`open_read_only`](Db::open_read_only) with `options` (the recovery
    /// mode, history, clock and file system apply; what governs writing
    /// does not).
    ///
    /// # Errors
    /// As [`open_read_only`](Db::open_read_only), and
    /// [`Error::InvalidOptions`].
    pub fn open_read_only_with(path: impl AsRef<Path>, options: Options) -> Result<Db> {
        Db::open_in(path.as_ref(), options, true)
    }

    fn open_in(path: &Path, options: Options, read_only: bool) -> Result<Db> {
        let opening = std::time::Instant::now();
        options.validate()?;
        let path = path.to_path_buf();
        let fs: Arc<dyn FileSystem> = options.file_system.clone();
        let lock_path = path.join(files::LOCK);
        let locked = |error: io::Error| match error.kind() {
            io::ErrorKind::WouldBlock => Error::Locked { path: path.clone() },
            _ => Error::io("lock", &lock_path, error),
        };
        let lock = if read_only {
            // Nothing is created: a directory without the lock file (which
            // every open for writing makes) holds no database.
            fs.try_lock_shared(&lock_path)
                .map_err(|error| match error.kind() {
                    io::ErrorKind::NotFound => Error::NoDatabase { path: path.clone() },
                    _ => locked(error),
                })?
        } else {
            recovery::check_directory(&*fs, &path)?;
            fs.try_lock(&lock_path).map_err(locked)?
        };
        static NEXT_DB_ID: AtomicU64 = AtomicU64::new(1);
        let id = NEXT_DB_ID.fetch_add(1, Ordering::Relaxed);
        let recovered = {
            let _span = trace::span!("mapstore::recovery", dir = %path.display(), read_only);
            let recovered = recovery::recover(&fs, &path, options.recovery_mode, id, read_only)?;
            trace::event!(
                last_seq = recovered.last_seq,
                batches_replayed = recovered.report.batches_replayed,
                "recovered"
            );
            recovered
        };
        // Writes go to a fresh memtable generation; what the replay
        // recovered waits behind it for its checkpoint, like a frozen one.
        let memtables = Arc::new(MemtableSet::new(
            options.memtable_size,
            options.memtable_read_index,
        ));
        let mut sources = vec![Source::Memtables(memtables)];
        // Any record replayed (even one that only created a keyspace) waits
        // for a checkpoint, whose MANIFEST then covers it.
        let replayed = (recovered.last_seq > recovered.manifest.checkpoint_seq)
            .then(|| Arc::new(recovered.replayed));
        if let Some(runs) = &replayed {
            sources.push(Source::Replayed(runs.clone()));
        }
        sources.extend(recovered.files.runs().into_iter().map(Source::Run));
        let wal_index = Arc::new(WalIndex::new(fs.clone(), path.clone()));
        let history = Arc::new(HistoryState::new(
            options.history,
            options.clock.clone(),
            wal_index,
            history_start_of(&recovered.manifest).min(recovered.last_seq),
        ));
        let recorder = Arc::new(Recorder::default());
        let read_state = Arc::new(ReadState::new(
            ReadView {
                sources,
                recorder: recorder.clone(),
            },
            recovered.last_seq,
            recovered.last_commit_micros,
            options.clock.clone(),
            id,
        ));
        let catalog = Arc::new(Mutex::new(recovered.catalog));
        let file_numbers = Arc::new(AtomicU64::new(recovered.next_file_number));
        // Up to `wal_segments_kept` WAL segments a checkpoint covers are kept
        // for reuse, except under `Strict`: a reused segment's tail after a
        // crash holds the old segment's records, which read as a torn tail
        // (`format/wal.md`).
        let recycled = (options.recovery_mode != RecoveryMode::Strict && !read_only).then(|| {
            Arc::new(RecycledSegments::new(
                options.wal_segments_kept,
                options.wal_segments_kept_idle,
            ))
        });
        let storage = Storage::start(
            fs.clone(),
            StorageConfig {
                dir: path.clone(),
                max_frozen_memtables: options.max_frozen_memtables,
                merge_policy: MergePolicy {
                    max_files: options.max_snapshot_files,
                    partition_bytes: options.partition_bytes,
                },
                recycled: recycled.clone(),
                background_nice: options.background_nice,
                read_only,
            },
            read_state.clone(),
            file_numbers.clone(),
            catalog.clone(),
            OnDisk {
                manifest: recovered.manifest,
                files: recovered.files,
                leftovers: recovered.leftovers,
                history: history.clone(),
            },
        );
        if let Some(runs) = replayed.filter(|_| !read_only) {
            // Every replayed segment is numbered below `next_file_number`,
            // and the WAL writer starts a new segment numbered from there:
            // once the runs are in files, recovery starts at that segment.
            storage.push_frozen(FrozenMemtable {
                content: FrozenContent::Replayed(runs),
                last_seq: recovered.last_seq,
                wal_start_segment: recovered.next_file_number,
            });
        }
        let wal_config = WalConfig {
            dir: path.clone(),
            page_bytes: options.wal_page_bytes,
            segment_bytes: options.wal_segment_bytes,
        };
        let wal = if read_only {
            WalWriter::read_only(fs, wal_config, file_numbers)
        } else {
            WalWriter::new(fs, wal_config, file_numbers, recycled)
        };
        if recovered.expiring {
            read_state.note_expiring();
        }
        let expiries = Arc::new(ExpiryQueue::default());
        let pipeline = CommitPipeline::new(
            wal,
            recovered.last_seq + 1,
            recovered.last_commit_micros,
            read_state.clone(),
            history.clone(),
            expiries.clone(),
            storage.clone(),
            catalog.clone(),
            FreezeLimits {
                memtable_bytes: options.memtable_size,
                wal_bytes: options.max_wal_bytes,
                memtable_read_index: options.memtable_read_index,
            },
        );
        let pipeline = if read_only {
            pipeline.into_read_only()
        } else {
            pipeline
        };
        let expiry_interval = options.expiry_interval;
        let db = Db {
            inner: Arc::new(DbInner {
                id,
                path,
                options,
                catalog,
                keyspace_changes: Mutex::new(()),
                default_keyspace: Arc::new(KeyspaceInfo::new(DEFAULT_KEYSPACE, String::new(), id)),
                read_state,
                history,
                expiries: expiries.clone(),
                pipeline,
                storage,
                lock: Mutex::new(Some(lock)),
                closed: AtomicBool::new(false),
                read_only,
                report: RecoveryReport {
                    duration: opening.elapsed(),
                    ..recovered.report
                },
            }),
        };
        if !read_only {
            expiry::start(&db.inner, expiries, expiry_interval);
        }
        Ok(db)
    }

    /// A handle to the database `inner` (for the background threads, which
    /// hold it weakly).
    pub(crate) fn from_inner(inner: Arc<DbInner>) -> Db {
        Db { inner }
    }

    /// Sets `key` to `value`; returns the commit's sequence number.
    ///
    /// # Errors
    /// [`Error::KeyTooLarge`], [`Error::ValueTooLarge`] (nothing is written),
    /// [`Error::Io`] or [`Error::WritesStopped`] if the log write failed,
    /// [`Error::Closed`].
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<u64> {
        self.insert_at(&self.inner.default_keyspace, key.as_ref(), value.as_ref())
    }

    /// Sets `key` to `value` until `ttl` after the commit: from then on no
    /// read sees it (a [`Snapshot`] judges expiry at its own
    /// [`time`](Snapshot::time), so it stays repeatable), and the database
    /// commits its removal within [`Options::expiry_interval`], which the
    /// change feed delivers as [`ChangeOp::Expire`](crate::ChangeOp::Expire).
    /// Returns the commit's sequence number.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::time::Duration;
    /// let db = mapstore::Db::open(dir.path())?;
    /// db.insert_with_ttl("session/42", "token", Duration::from_secs(30))?;
    /// let left = db.ttl("session/42")?.expect("a TTL");
    /// assert!(left <= Duration::from_secs(30) && left > Duration::from_secs(25));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidTtl`] for a `ttl` under a microsecond or over
    /// [`MAX_TTL`](crate::MAX_TTL), and as [`insert`](Db::insert).
    pub fn insert_with_ttl(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
        ttl: std::time::Duration,
    ) -> Result<u64> {
        self.insert_with_ttl_at(
            &self.inner.default_keyspace,
            key.as_ref(),
            value.as_ref(),
            ttl,
        )
    }

    pub(crate) fn insert_with_ttl_at(
        &self,
        keyspace: &Arc<KeyspaceInfo>,
        key: &[u8],
        value: &[u8],
        ttl: std::time::Duration,
    ) -> Result<u64> {
        let mut batch = WriteBatch::new();
        batch.insert_with_ttl_into(keyspace, key, value, ttl);
        self.write(batch)
    }

    /// How long the value of `key` has left before it expires: `None` if
    /// the key is absent or has no TTL.
    ///
    /// # Errors
    /// As [`get`](Db::get).
    pub fn ttl(&self, key: impl AsRef<[u8]>) -> Result<Option<std::time::Duration>> {
        self.ttl_at(&self.inner.default_keyspace, key.as_ref())
    }

    pub(crate) fn ttl_at(
        &self,
        keyspace: &KeyspaceInfo,
        key: &[u8],
    ) -> Result<Option<std::time::Duration>> {
        let snapshot = self.inner.read_state.snapshot();
        keyspace.check(self.inner.id)?;
        let now = snapshot.time();
        Ok(match snapshot.expiry_of(keyspace.id, key)? {
            None | Some(0) => None,
            Some(expires) => Some(
                crate::history::time_of(expires)
                    .duration_since(now)
                    .unwrap_or_default(),
            ),
        })
    }

    /// Removes `key` (a no-op if absent); returns the commit's sequence number.
    ///
    /// # Errors
    /// As [`insert`](Db::insert).
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<u64> {
        self.remove_at(&self.inner.default_keyspace, key.as_ref())
    }

    /// Commits `batch` atomically; returns the sequence number of its last
    /// operation, which is the sequence number a snapshot needs to see it
    /// (an empty batch writes nothing and returns the current one).
    ///
    /// Under [`Durability::Sync`] it returns once the batch is on stable
    /// storage.
    ///
    /// # Errors
    /// As [`insert`](Db::insert), and [`Error::BatchTooLarge`].
    pub fn write(&self, batch: WriteBatch) -> Result<u64> {
        self.write_with_durability(batch, self.inner.options.durability)
    }

    /// Commits `batch` as [`write`](Db::write) does, but with `durability`
    /// instead of the database's [`Options::durability`]: a bulk load can
    /// write [`Durability::Buffered`] batches and call [`sync`](Db::sync) once
    /// at the end, while other writers keep syncing each commit.
    ///
    /// # Errors
    /// As [`write`](Db::write).
    pub fn write_with_durability(&self, batch: WriteBatch, durability: Durability) -> Result<u64> {
        let sealed = batch.seal()?;
        self.check_keyspaces(&sealed.keyspaces)?;
        self.inner
            .pipeline
            .commit(sealed, durability == Durability::Sync)
    }

    /// The value of `key`, if present.
    ///
    /// # Errors
    /// [`Error::Closed`]; [`Error::Corruption`] if a file holding it is damaged.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Slice>> {
        self.get_at(&self.inner.default_keyspace, key.as_ref())
    }

    /// Whether `key` is present.
    ///
    /// # Errors
    /// As [`get`](Db::get).
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// The value of `key` and its version, if present: the version is the
    /// sequence number of the commit that wrote it (stable across
    /// checkpoints, merges and reopening), what
    /// [`compare_and_swap`](Db::compare_and_swap) expects.
    ///
    /// # Errors
    /// As [`get`](Db::get).
    pub fn get_versioned(&self, key: impl AsRef<[u8]>) -> Result<Option<(Slice, u64)>> {
        self.get_versioned_at(&self.inner.default_keyspace, key.as_ref())
    }

    /// Stores `value` under `key` if the key is absent, and returns `None`;
    /// if it is present, changes nothing and returns its value (Go's
    /// `sync.Map.LoadOrStore`). Of many threads racing to insert one key,
    /// exactly one stores its value and the others all get that value.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// assert_eq!(db.insert_if_absent("k", "first")?, None);
    /// assert_eq!(db.insert_if_absent("k", "second")?.as_deref(), Some(&b"first"[..]));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`insert`](Db::insert).
    pub fn insert_if_absent(
        &self,
        key: impl AsRef<[u8]>,
        value: impl AsRef<[u8]>,
    ) -> Result<Option<Slice>> {
        self.insert_if_absent_at(&self.inner.default_keyspace, key.as_ref(), value.as_ref())
    }

    /// Sets `key` to `value` if the key's version is `expected` (`None`:
    /// the key is absent); returns the commit's sequence number, the key's
    /// new version. The check and the write are one step in commit order,
    /// so concurrent swaps of one key from one version succeed exactly once.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// let v1 = db.compare_and_swap("counter", None, "1")?;
    /// let v2 = db.compare_and_swap("counter", Some(v1), "2")?;
    /// // A stale version is refused, and nothing is written.
    /// let stale = db.compare_and_swap("counter", Some(v1), "3");
    /// assert!(matches!(stale, Err(mapstore::Error::Conflict { version: Some(v), .. }) if v == v2));
    /// assert_eq!(db.get("counter")?.as_deref(), Some(&b"2"[..]));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::Conflict`] with the key's current version if it is not
    /// `expected` (nothing is written); otherwise as [`insert`](Db::insert).
    pub fn compare_and_swap(
        &self,
        key: impl AsRef<[u8]>,
        expected: Option<u64>,
        value: impl AsRef<[u8]>,
    ) -> Result<u64> {
        self.compare_and_swap_at(
            &self.inner.default_keyspace,
            key.as_ref(),
            expected,
            Some(value.as_ref()),
        )
    }

    /// Removes `key` if its version is `expected`; returns the commit's
    /// sequence number.
    ///
    /// # Errors
    /// [`Error::Conflict`] with the key's current version (`None` if it is
    /// absent) if it is not `expected`; otherwise as [`insert`](Db::insert).
    pub fn compare_and_remove(&self, key: impl AsRef<[u8]>, expected: u64) -> Result<u64> {
        self.compare_and_swap_at(
            &self.inner.default_keyspace,
            key.as_ref(),
            Some(expected),
            None,
        )
    }

    /// Reads `key`, calls `change` with its value (`None`: absent), and
    /// stores what `change` returns (`None`: removes the key), as one
    /// compare-and-swap on the version read; on a conflict it reads again
    /// and calls `change` again, until a swap succeeds. Returns the commit's
    /// sequence number, or, when the key is absent and `change` returns
    /// `None` (nothing to write), the sequence number it read at.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// let increment = |old: Option<&[u8]>| {
    ///     let n: u64 = old.map_or(0, |v| std::str::from_utf8(v).unwrap().parse().unwrap());
    ///     Some((n + 1).to_string().into_bytes())
    /// };
    /// db.update("hits", increment)?;
    /// db.update("hits", increment)?;
    /// assert_eq!(db.get("hits")?.as_deref(), Some(&b"2"[..]));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// As [`insert`](Db::insert); never [`Error::Conflict`].
    pub fn update<F>(&self, key: impl AsRef<[u8]>, change: F) -> Result<u64>
    where
        F: FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    {
        self.update_at(&self.inner.default_keyspace, key.as_ref(), change)
    }

    /// Begins an optimistic transaction under snapshot isolation (see
    /// [`Transaction`] and [`Isolation`]).
    pub fn transaction(&self) -> Transaction {
        self.transaction_with(Isolation::Snapshot)
    }

    /// Begins an optimistic transaction under `isolation`.
    pub fn transaction_with(&self, isolation: Isolation) -> Transaction {
        Transaction::new(self.clone(), self.snapshot(), isolation)
    }

    /// Runs `body` in a snapshot-isolation transaction and commits it; on
    /// [`Error::Conflict`] (from the commit, or returned by `body`) runs it
    /// again in a new transaction, up to [`MAX_TRANSACT_ATTEMPTS`] times in
    /// all. Returns what `body` returned in the run that committed.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// db.insert("a", "10")?;
    /// let moved = db.transact(|tx| {
    ///     let a = tx.get("a")?.map_or(0, |v| v[0] - b'0');
    ///     tx.insert("a", "0")?;
    ///     tx.insert("b", [b'0' + a])?;
    ///     Ok(a)
    /// })?;
    /// assert_eq!(moved, 1);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// Whatever `body` returns other than a conflict, at once; the last
    /// [`Error::Conflict`] after [`MAX_TRANSACT_ATTEMPTS`] refused runs;
    /// otherwise as [`Transaction::commit`].
    pub fn transact<T, F>(&self, body: F) -> Result<T>
    where
        F: FnMut(&mut Transaction) -> Result<T>,
    {
        self.transact_with(Isolation::Snapshot, body)
    }

    /// [`transact`](Db::transact) under `isolation`.
    ///
    /// # Errors
    /// As [`transact`](Db::transact).
    pub fn transact_with<T, F>(&self, isolation: Isolation, mut body: F) -> Result<T>
    where
        F: FnMut(&mut Transaction) -> Result<T>,
    {
        let mut attempts = 0;
        loop {
            attempts += 1;
            let mut transaction = self.transaction_with(isolation);
            let outcome = body(&mut transaction).and_then(|output| {
                transaction.commit()?;
                Ok(output)
            });
            match outcome {
                Err(error) if error.is_conflict() && attempts < MAX_TRANSACT_ATTEMPTS => {
                    // Let the commit that won run on before trying again.
                    std::thread::yield_now();
                }
                outcome => return outcome,
            }
        }
    }

    /// Commits `batch` if every one of `conditions` holds when its turn
    /// comes in the commit order; else [`Error::Conflict`], and nothing is
    /// written.
    pub(crate) fn commit_conditional(
        &self,
        batch: WriteBatch,
        conditions: Vec<Condition>,
    ) -> Result<u64> {
        let mut sealed = batch.seal()?;
        self.check_keyspaces(&sealed.keyspaces)?;
        sealed.conditions = conditions;
        self.inner
            .pipeline
            .commit(sealed, self.inner.options.durability == Durability::Sync)
    }

    /// Opens the keyspace named `name`, creating it if it does not exist
    /// (durably, as a commit of its own, under [`Options::durability`]).
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path())?;
    /// let users = db.keyspace("users")?;
    /// users.insert("ada", "admin")?;
    /// assert_eq!(db.keyspace("users")?.get("ada")?.as_deref(), Some(&b"admin"[..]));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::InvalidKeyspaceName`] for an empty name or one longer than
    /// [`MAX_KEYSPACE_NAME_BYTES`](crate::MAX_KEYSPACE_NAME_BYTES); as
    /// [`insert`](Db::insert) for the commit that creates it.
    pub fn keyspace(&self, name: &str) -> Result<Keyspace> {
        check_name(name)?;
        self.check_open()?;
        // (A `match` on the lookup would hold the catalog's lock through
        // its arms, and the creation takes it again.)
        let existing = self.catalog().lookup(name);
        let info = match existing {
            Some(info) => info,
            None => self.create_keyspace(name)?,
        };
        Ok(Keyspace {
            db: self.clone(),
            info,
        })
    }

    /// Creates keyspace `name` unless another thread did while this one
    /// waited for its turn; returns it.
    fn create_keyspace(&self, name: &str) -> Result<Arc<KeyspaceInfo>> {
        let _changing = lock(&self.inner.keyspace_changes);
        if self.catalog().lookup(name).is_none() {
            let mut batch = WriteBatch::new();
            batch.create_keyspace(self.catalog().next_id(), name);
            self.write(batch)?;
        }
        self.existing_keyspace(name)
    }

    /// The keyspace named `name`, or [`Error::KeyspaceNotFound`].
    fn existing_keyspace(&self, name: &str) -> Result<Arc<KeyspaceInfo>> {
        self.catalog()
            .lookup(name)
            .ok_or_else(|| Error::KeyspaceNotFound {
                name: name.to_string(),
            })
    }

    /// The names of the keyspaces, sorted (the default keyspace has none).
    ///
    /// # Errors
    /// [`Error::Closed`].
    pub fn keyspace_names(&self) -> Result<Vec<String>> {
        self.check_open()?;
        Ok(self.catalog().names())
    }

    /// Drops the keyspace named `name`, durably, as one commit: from then
    /// on it has no data for any reader (a snapshot taken before included),
    /// every handle of it returns [`Error::KeyspaceDropped`], and batches
    /// and transactions that write to it are refused. Its files' space is
    /// returned once a checkpoint covers the drop. A keyspace created later
    /// with the same name is a new, empty one.
    ///
    /// # Errors
    /// [`Error::KeyspaceNotFound`]; as [`insert`](Db::insert).
    pub fn drop_keyspace(&self, name: &str) -> Result<u64> {
        self.check_open()?;
        let _changing = lock(&self.inner.keyspace_changes);
        let info = self.existing_keyspace(name)?;
        let mut batch = WriteBatch::new();
        batch.drop_keyspace(&info);
        self.write(batch)
    }

    /// The default keyspace, as the internal operations take it.
    pub(crate) fn default_keyspace(&self) -> &Arc<KeyspaceInfo> {
        &self.inner.default_keyspace
    }

    fn catalog(&self) -> MutexGuard<'_, Catalog> {
        lock(&self.inner.catalog)
    }

    /// `Ok` if every keyspace a batch writes to is this database's and
    /// not dropped (the commit leader checks the drop again in commit
    /// order).
    fn check_keyspaces(&self, keyspaces: &[Arc<KeyspaceInfo>]) -> Result<()> {
        keyspaces
            .iter()
            .try_for_each(|info| info.check(self.inner.id))
    }

    // The operations of one keyspace, which the default keyspace's methods
    // above and `Keyspace`'s share.

    pub(crate) fn insert_at(
        &self,
        keyspace: &Arc<KeyspaceInfo>,
        key: &[u8],
        value: &[u8],
    ) -> Result<u64> {
        let mut batch = WriteBatch::new();
        batch.insert_into(keyspace, key, value);
        self.write(batch)
    }

    pub(crate) fn remove_at(&self, keyspace: &Arc<KeyspaceInfo>, key: &[u8]) -> Result<u64> {
        let mut batch = WriteBatch::new();
        batch.remove_from(keyspace, key);
        self.write(batch)
    }

    /// A snapshot for one read of `keyspace`, once the database and the
    /// keyspace are checked.
    fn read_snapshot(&self, keyspace: &KeyspaceInfo) -> Result<Snapshot> {
        self.check_open()?;
        keyspace.check(self.inner.id)?;
        Ok(self.inner.read_state.point_read_snapshot())
    }

    /// The present time, for judging the expiry of a value a point read
    /// found.
    fn now(&self) -> u64 {
        self.inner.read_state.now_micros()
    }

    pub(crate) fn get_at(&self, keyspace: &KeyspaceInfo, key: &[u8]) -> Result<Option<Slice>> {
        self.read_snapshot(keyspace)?
            .get_from_at(keyspace.id, key, || self.now())
    }

    pub(crate) fn get_versioned_at(
        &self,
        keyspace: &KeyspaceInfo,
        key: &[u8],
    ) -> Result<Option<(Slice, u64)>> {
        self.read_snapshot(keyspace)?
            .get_versioned_from_at(keyspace.id, key, || self.now())
    }

    pub(crate) fn insert_if_absent_at(
        &self,
        keyspace: &Arc<KeyspaceInfo>,
        key: &[u8],
        value: &[u8],
    ) -> Result<Option<Slice>> {
        let mut batch = WriteBatch::new();
        batch.insert_into(keyspace, key, value);
        loop {
            let absent = expect_version(keyspace.id, key, None);
            match self.commit_conditional(batch.clone(), vec![absent]) {
                Ok(_) => return Ok(None),
                Err(Error::Conflict { .. }) => {
                    if let Some(present) = self.get_at(keyspace, key)? {
                        return Ok(Some(present));
                    }
                    // Removed since the check refused the insert: try again.
                }
                Err(error) => return Err(error),
            }
        }
    }

    /// Sets (`Some`) or removes (`None`) `key` if its version is `expected`.
    pub(crate) fn compare_and_swap_at(
        &self,
        keyspace: &Arc<KeyspaceInfo>,
        key: &[u8],
        expected: Option<u64>,
        value: Option<&[u8]>,
    ) -> Result<u64> {
        let mut batch = WriteBatch::new();
        match value {
            Some(value) => batch.insert_into(keyspace, key, value),
            None => batch.remove_from(keyspace, key),
        }
        self.commit_conditional(batch, vec![expect_version(keyspace.id, key, expected)])
    }

    pub(crate) fn update_at<F>(
        &self,
        keyspace: &Arc<KeyspaceInfo>,
        key: &[u8],
        mut change: F,
    ) -> Result<u64>
    where
        F: FnMut(Option<&[u8]>) -> Option<Vec<u8>>,
    {
        loop {
            let snapshot = self.read_snapshot(keyspace)?;
            let current = snapshot.get_versioned_from_at(keyspace.id, key, || self.now())?;
            let version = current.as_ref().map(|(_, version)| *version);
            let changed = change(current.as_ref().map(|(value, _)| &value[..]));
            if changed.is_none() && version.is_none() {
                return Ok(snapshot.seq());
            }
            match self.compare_and_swap_at(keyspace, key, version, changed.as_deref()) {
                Err(Error::Conflict { .. }) => continue,
                outcome => return outcome,
            }
        }
    }

    /// A point-in-time view of everything committed so far.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.read_state.snapshot()
    }

    /// The oldest sequence number whose state is still readable exactly:
    /// [`snapshot_at`](Db::snapshot_at) accepts it and every later one,
    /// and [`changes_since`](Db::changes_since) every commit after it. It
    /// follows [`Options::history`]; under [`History::None`](crate::History::None)
    /// it is where the last checkpoint or merge found the newest commit.
    ///
    /// # Errors
    /// [`Error::Closed`].
    pub fn history_start(&self) -> Result<u64> {
        self.check_open()?;
        Ok(self.inner.history.start())
    }

    /// The database as it was right after the commit numbered `seq` (a
    /// sequence number a write returned, or any other): a snapshot that
    /// sees exactly the commits at or below `seq`, read at their time
    /// ([`Snapshot::time`]).
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// use std::time::Duration;
    /// use mapstore::{Db, History, Options};
    /// let db = Db::open_with(dir.path(), Options::default().history(History::Duration(Duration::from_secs(3600))))?;
    /// let first = db.insert("k", "old")?;
    /// db.insert("k", "new")?;
    /// db.checkpoint()?;                         // the history survives checkpoints and merges
    /// let then = db.snapshot_at(first)?;
    /// assert_eq!(then.get("k")?.as_deref(), Some(&b"old"[..]));
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::HistoryTrimmed`] if `seq` is older than
    /// [`history_start`](Db::history_start), [`Error::FutureSeq`] if no
    /// commit reached it yet, [`Error::Closed`]; [`Error::Io`] or
    /// [`Error::Corruption`] if the WAL holding its commit time cannot be read.
    pub fn snapshot_at(&self, seq: u64) -> Result<Snapshot> {
        self.check_open()?;
        let newest = self.inner.read_state.visible_seq();
        if seq > newest {
            return Err(Error::FutureSeq {
                requested: seq,
                newest,
            });
        }
        if seq == newest {
            return Ok(self.snapshot());
        }
        let time = commit_time_of(self.inner.history.wal(), seq)?
            .unwrap_or_else(|| self.inner.read_state.now_micros());
        self.inner
            .history
            .register_at(seq, || self.inner.read_state.snapshot_at(seq, time))
    }

    /// The database as it was at wall-clock time `time`: a snapshot at the
    /// newest commit made at or before it (commit times are recorded with
    /// each commit, so this is exact to the commit), read at `time`.
    ///
    /// # Errors
    /// [`Error::HistoryTrimmed`] (with `requested` 0 when even the oldest
    /// commit the WAL still holds is later than `time`) if that commit is
    /// older than [`history_start`](Db::history_start),
    /// [`Error::FutureTime`] if `time` is after the clock's present, as
    /// [`snapshot_at`](Db::snapshot_at) otherwise.
    pub fn snapshot_at_time(&self, time: SystemTime) -> Result<Snapshot> {
        self.check_open()?;
        let requested = micros(time);
        let state = &self.inner.read_state;
        // The newest commit first, so that whatever the WAL shows up to
        // it is published.
        let newest = state.visible_seq();
        let now = state.now_micros();
        if requested > now {
            return Err(Error::FutureTime {
                requested_micros: requested,
                now_micros: now,
            });
        }
        let seq = if requested >= state.published_micros() {
            Some(newest)
        } else {
            last_seq_at_or_before(self.inner.history.wal(), requested)?
        };
        // Before the oldest commit the WAL holds: the empty database, if
        // that commit was the first ever.
        let seq = match seq {
            None if self.inner.history.start() == 0 && first_wal_seq(&self.inner)? == Some(1) => {
                Some(0)
            }
            seq => seq,
        };
        let Some(seq) = seq else {
            return Err(Error::HistoryTrimmed {
                requested: 0,
                oldest: self.inner.history.start(),
            });
        };
        let seq = seq.min(newest);
        self.inner
            .history
            .register_at(seq, || state.snapshot_at(seq, requested))
    }

    /// The entries with keys in `range`, in key order, as of now.
    pub fn range<K: AsRef<[u8]>, R: RangeBounds<K>>(&self, range: R) -> Iter {
        self.snapshot().range(range)
    }

    /// The entries whose keys start with `prefix`, in key order, as of now.
    pub fn prefix(&self, prefix: impl AsRef<[u8]>) -> Iter {
        self.snapshot().prefix(prefix)
    }

    /// Every entry in key order, as of now.
    pub fn iter(&self) -> Iter {
        self.snapshot().iter()
    }

    /// Makes every write committed so far durable (useful under
    /// [`Durability::Buffered`]).
    ///
    /// # Errors
    /// [`Error::Io`] if the fsync fails (writes then stop until reopen),
    /// [`Error::WritesStopped`], [`Error::Closed`].
    pub fn sync(&self) -> Result<()> {
        self.inner.pipeline.sync()
    }

    /// Syncs and closes the database, releasing its directory lock. Every
    /// clone of this handle then returns [`Error::Closed`]; snapshots stay
    /// readable. Dropping the last handle closes as well, ignoring errors.
    ///
    /// # Errors
    /// [`Error::Io`] if the final sync fails; [`Error::WritesStopped`] if an
    /// earlier log write failed (the lock is released all the same).
    pub fn close(&self) -> Result<()> {
        self.inner.close()
    }

    /// Writes everything committed so far to snapshot files and records them
    /// in the MANIFEST, so that the WAL it covers can be deleted; returns once
    /// that is durable. Checkpoints also run on their own in the background
    /// when the memtable passes [`Options::memtable_size`].
    ///
    /// # Errors
    /// [`Error::Io`] (writes then stop until reopen), [`Error::WritesStopped`]
    /// if background work failed, [`Error::Closed`].
    pub fn checkpoint(&self) -> Result<()> {
        let seq = self.inner.pipeline.freeze_now()?;
        self.inner.storage.wait_checkpointed(seq)
    }

    /// Checkpoints, then merges every snapshot file into one, dropping the
    /// versions no live snapshot can see; returns once the result is durable.
    /// Old files are deleted when the last snapshot reading them is dropped.
    ///
    /// # Errors
    /// As [`checkpoint`](Db::checkpoint).
    pub fn compact(&self) -> Result<()> {
        self.checkpoint()?;
        self.inner.storage.merge_and_wait()
    }

    /// Writes a consistent point-in-time copy of the database into `dest`
    /// while writers keep going, and says at which sequence number. The
    /// copy is a database directory: [`Db::open`] on it gives exactly the
    /// state at that sequence number (with its history starting there).
    ///
    /// A checkpoint first puts every commit so far into snapshot files;
    /// those are hard-linked into `dest` where the file system allows (they
    /// never change) and copied otherwise. A second backup to the same
    /// place keeps the files it already holds and brings only new ones.
    /// A crash in the middle leaves `dest` marked incomplete: opening it is
    /// refused with [`Error::IncompleteBackup`] until a backup to it
    /// completes.
    ///
    /// ```
    /// # fn main() -> Result<(), mapstore::Error> {
    /// # let dir = tempfile::tempdir().unwrap();
    /// # let backups = tempfile::tempdir().unwrap();
    /// let db = mapstore::Db::open(dir.path().join("db"))?;
    /// db.insert("k", "v1")?;
    /// let backup = db.backup_to(backups.path().join("monday"))?;
    /// db.insert("k", "v2")?;
    ///
    /// let copy = mapstore::Db::open(backups.path().join("monday"))?;
    /// assert_eq!(copy.get("k")?.as_deref(), Some(&b"v1"[..]));
    /// assert_eq!(copy.snapshot().seq(), backup.seq);
    /// # Ok(()) }
    /// ```
    ///
    /// # Errors
    /// [`Error::BackupIntoItself`] for the database's own directory or one
    /// inside it, [`Error::BackupOfAnotherDatabase`] if `dest` holds another
    /// database, [`Error::NotADatabase`] if it holds foreign files,
    /// [`Error::NotADirectory`], [`Error::Locked`] if a `Db` has `dest`
    /// open, [`Error::Corruption`] if `dest` holds a database whose
    /// MANIFEST cannot be read (it is left alone), [`Error::ReadOnly`], and
    /// as [`checkpoint`](Db::checkpoint).
    pub fn backup_to(&self, dest: impl AsRef<Path>) -> Result<crate::BackupInfo> {
        self.check_open()?;
        if self.inner.read_only {
            return Err(Error::ReadOnly);
        }
        // Refused before the checkpoint, which would be wasted.
        crate::backup::check_destination(self.path(), dest.as_ref())?;
        let _span = trace::span!("mapstore::backup", dest = %dest.as_ref().display());
        self.checkpoint()?;
        let (manifest, files) = self.inner.storage.durable_state();
        crate::backup::write_backup(&**self.fs(), self.path(), &manifest, &files, dest.as_ref())
    }

    /// Counters of checkpoints, merges and write backpressure.
    pub fn checkpoint_stats(&self) -> CheckpointStats {
        self.inner.storage.stats()
    }

    /// What opening found and repaired.
    pub fn recovery_report(&self) -> &RecoveryReport {
        &self.inner.report
    }

    /// Counters of the write path: commits, WAL groups and fsyncs since open.
    pub fn commit_stats(&self) -> CommitStats {
        self.inner.pipeline.stats()
    }

    /// Approximate bytes of memory the memtable holds (keys, values and
    /// per-entry overhead).
    pub fn memtable_bytes(&self) -> usize {
        let view = self.inner.read_state.view();
        view.active_memtables()
            .map_or(0, |set| set.approximate_bytes())
    }

    /// Keys in the memtable's read index: a hash index of each key's newest
    /// version that the engine builds in the background once writes have
    /// stopped and reads keep reaching the memtable, so that point reads
    /// need not search the skiplist. 0 when there is none, or when a write
    /// has begun since it was built (it is then stale and unused, until the
    /// memtable is quiet again).
    pub fn memtable_indexed_keys(&self) -> usize {
        let view = self.inner.read_state.view();
        view.active_memtables()
            .and_then(|set| set.default_table())
            .map_or(0, |table| table.indexed_keys())
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    pub(crate) fn check_open(&self) -> Result<()> {
        if self.is_closed() {
            return Err(Error::Closed);
        }
        Ok(())
    }

    // What the history's readers (`feed.rs`, `diff.rs`) need of the
    // database.

    pub(crate) fn is_closed(&self) -> bool {
        self.inner.closed.load(Ordering::Acquire)
    }

    pub(crate) fn read_state(&self) -> &ReadState {
        &self.inner.read_state
    }

    pub(crate) fn pipeline_ref(&self) -> &CommitPipeline {
        &self.inner.pipeline
    }

    pub(crate) fn history_ref(&self) -> &HistoryState {
        &self.inner.history
    }

    pub(crate) fn storage(&self) -> &crate::checkpoint::Storage {
        &self.inner.storage
    }

    pub(crate) fn fs(&self) -> &Arc<dyn FileSystem> {
        &self.inner.options.file_system
    }

    /// Keyspace `id`, unless it is dropped or unknown.
    pub(crate) fn keyspace_info(&self, id: u32) -> Option<Arc<KeyspaceInfo>> {
        if id == DEFAULT_KEYSPACE {
            return Some(self.inner.default_keyspace.clone());
        }
        self.catalog().by_id(id).filter(|info| !info.is_dropped())
    }

    /// The name of keyspace `id`, if the catalog still knows it.
    pub(crate) fn keyspace_by_id(&self, id: u32) -> Option<String> {
        self.catalog().by_id(id).map(|info| info.name.clone())
    }
}

/// The first sequence number the WAL still holds.
fn first_wal_seq(inner: &DbInner) -> Result<Option<u64>> {
    Ok(inner
        .history
        .wal()
        .segments()?
        .first()
        .map(|segment| segment.first_seq))
}

/// The condition "`key`'s version is `expected`" (`None`: absent).
fn expect_version(keyspace: u32, key: &[u8], expected: Option<u64>) -> Condition {
    Condition::VersionIs {
        keyspace,
        key: Bytes::copy_from_slice(key),
        expected,
    }
}

fn lock<T>(mutex: &Mutex<T>) -> MutexGuard<'_, T> {
    // The catalog and the keyspace-change lock are changed in single calls
    // that leave them whole at every point a panic could interrupt.
    mutex
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner())
}

impl DbInner {
    fn close(&self) -> Result<()> {
        let mut lock = self
            .lock
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if lock.is_none() {
            return Err(Error::Closed);
        }
        // A clean close checkpoints the memtable (unless the options say
        // not to), so the next open maps
        // snapshot files and replays (almost) no WAL. Writes that slip in
        // after the freeze are in the WAL and replayed as usual. A failure
        // here still closes; the next open recovers from the WAL instead.
        let checkpointed = if self.options.checkpoint_on_close && !self.read_only {
            self.pipeline
                .freeze_now()
                .and_then(|seq| self.storage.wait_checkpointed(seq))
        } else {
            Ok(())
        };
        self.closed.store(true, Ordering::Release);
        self.expiries.stop();
        let result = self.pipeline.close().and(checkpointed);
        self.storage.shutdown();
        // Released even after a failure: the next open recovers from disk.
        *lock = None;
        result
    }
}

impl Drop for DbInner {
    fn drop(&mut self) {
        let _ = self.close();
    }
}

// Compile-time checks that the handles can be shared between threads.
const _: () = {
    const fn assert_send_sync<T: Send + Sync>() {}
    assert_send_sync::<Db>();
    assert_send_sync::<Snapshot>();
    assert_send_sync::<Iter>();
    assert_send_sync::<Transaction>();
};
