//! [`Db`]: opening a database and the operations on it.

use std::fmt;
use std::io;
use std::ops::RangeBounds;
use std::path::{Path, PathBuf};
use std::sync::atomic::AtomicU64;
use std::sync::{Arc, Mutex};

use crate::batch::WriteBatch;
use crate::commit::{CommitPipeline, CommitStats};
use crate::error::{Error, Result};
use crate::files;
use crate::io::{FileLock, FileSystem};
use crate::options::{Durability, Options};
use crate::read::{Iter, ReadState, ReadView, Snapshot, Source};
use crate::recovery::{self, RecoveryReport};
use crate::slice::Slice;
use crate::wal::writer::{WalConfig, WalWriter};

/// A handle to an open database.
///
/// `Db` is cheap to clone and can be shared between threads; all clones use
/// the same database. The database closes when the last clone is dropped, or
/// explicitly with [`close`](Db::close).
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

struct DbInner {
    path: PathBuf,
    options: Options,
    read_state: Arc<ReadState>,
    pipeline: CommitPipeline,
    lock: Mutex<Option<Box<dyn FileLock>>>,
    report: RecoveryReport,
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
        options.validate()?;
        let path = path.as_ref().to_path_buf();
        let fs: Arc<dyn FileSystem> = options.file_system.clone();
        recovery::check_directory(&*fs, &path)?;
        let lock_path = path.join(files::LOCK);
        let lock = fs
            .try_lock(&lock_path)
            .map_err(|error| match error.kind() {
                io::ErrorKind::WouldBlock => Error::Locked { path: path.clone() },
                _ => Error::io("lock", &lock_path, error),
            })?;
        let recovered = recovery::recover(&*fs, &path, options.recovery_mode)?;
        let memtable = Arc::new(recovered.memtable);
        let read_state = Arc::new(ReadState::new(
            ReadView {
                sources: vec![Source::Memtable(memtable)],
            },
            recovered.last_seq,
        ));
        let wal = WalWriter::new(
            fs,
            WalConfig {
                dir: path.clone(),
                page_bytes: options.wal_page_bytes,
                segment_bytes: options.wal_segment_bytes,
            },
            Arc::new(AtomicU64::new(recovered.next_file_number)),
        );
        let pipeline = CommitPipeline::new(wal, recovered.last_seq + 1, read_state.clone());
        Ok(Db {
            inner: Arc::new(DbInner {
                path,
                options,
                read_state,
                pipeline,
                lock: Mutex::new(Some(lock)),
                report: recovered.report,
            }),
        })
    }

    /// Sets `key` to `value`; returns the commit's sequence number.
    ///
    /// # Errors
    /// [`Error::KeyTooLarge`], [`Error::ValueTooLarge`] (nothing is written),
    /// [`Error::Io`] or [`Error::WritesStopped`] if the log write failed,
    /// [`Error::Closed`].
    pub fn insert(&self, key: impl AsRef<[u8]>, value: impl AsRef<[u8]>) -> Result<u64> {
        let mut batch = WriteBatch::new();
        batch.insert(key, value);
        self.write(batch)
    }

    /// Removes `key` (a no-op if absent); returns the commit's sequence number.
    ///
    /// # Errors
    /// As [`insert`](Db::insert).
    pub fn remove(&self, key: impl AsRef<[u8]>) -> Result<u64> {
        let mut batch = WriteBatch::new();
        batch.remove(key);
        self.write(batch)
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
        let sealed = batch.seal()?;
        let sync = self.inner.options.durability == Durability::Sync;
        self.inner.pipeline.commit(sealed, sync)
    }

    /// The value of `key`, if present.
    ///
    /// # Errors
    /// [`Error::Closed`]; [`Error::Corruption`] if a file holding it is damaged.
    pub fn get(&self, key: impl AsRef<[u8]>) -> Result<Option<Slice>> {
        self.check_open()?;
        self.snapshot().get(key)
    }

    /// Whether `key` is present.
    ///
    /// # Errors
    /// As [`get`](Db::get).
    pub fn contains_key(&self, key: impl AsRef<[u8]>) -> Result<bool> {
        Ok(self.get(key)?.is_some())
    }

    /// A point-in-time view of everything committed so far.
    pub fn snapshot(&self) -> Snapshot {
        self.inner.read_state.snapshot()
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
        view.active_memtable()
            .map_or(0, |table| table.approximate_bytes())
    }

    /// The database directory.
    pub fn path(&self) -> &Path {
        &self.inner.path
    }

    fn check_open(&self) -> Result<()> {
        match self.inner.lock.lock() {
            Ok(lock) if lock.is_some() => Ok(()),
            _ => Err(Error::Closed),
        }
    }
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
        let result = self.pipeline.close();
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
};
