//! Fault injection for crash-testing code built on mapstore (cargo feature
//! `testing`).
//!
//! [`FaultyFileSystem`] wraps the real file system and, on command, makes
//! fsyncs fail with `EIO`, writes fail with `ENOSPC`, or fsyncs take longer
//! (as on a slower disk), so a test can check what an application does when
//! the disk misbehaves.
//! [`PowerCutFileSystem`] is an in-memory file system that stops at any
//! chosen operation and restarts with only what a power cut would leave:
//! unsynced data lost, torn writes, directory changes undone.
//!
//! ```
//! # fn main() -> Result<(), mapstore::Error> {
//! use std::sync::Arc;
//! use mapstore::{Db, Error, Options};
//! use mapstore::testing::FaultyFileSystem;
//!
//! # let dir = tempfile::tempdir().unwrap();
//! let fs = Arc::new(FaultyFileSystem::new());
//! let db = Db::open_with(dir.path(), Options::default().file_system(fs.clone()))?;
//! db.insert("a", "1")?;
//! fs.fail_syncs(true);
//! assert!(db.insert("b", "2").is_err());               // never reported committed
//! assert!(matches!(db.insert("c", "3"), Err(Error::WritesStopped { .. })));
//! assert_eq!(db.get("a")?.as_deref(), Some(&b"1"[..])); // reads keep working
//! # Ok(()) }
//! ```

use std::io;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Duration;

pub use crate::io::{EntryKind, FileLock, FileSystem, RealFileSystem, WritableFile};
pub use power_cut::{PowerCut, PowerCutFileSystem};

mod power_cut;

/// A [`Clock`](crate::Clock) that moves only when told to, for exact tests
/// of commit times, time travel and expiry.
///
/// ```
/// # fn main() -> Result<(), mapstore::Error> {
/// # let dir = tempfile::tempdir().unwrap();
/// use std::sync::Arc;
/// use std::time::{Duration, UNIX_EPOCH};
/// use mapstore::{Db, Options};
/// use mapstore::testing::ManualClock;
///
/// let clock = Arc::new(ManualClock::new(UNIX_EPOCH + Duration::from_secs(1_000_000)));
/// let db = Db::open_with(dir.path(), Options::default().clock(clock.clone()))?;
/// db.insert("k", "v1")?;
/// clock.advance(Duration::from_secs(60));
/// db.insert("k", "v2")?;
/// let minute_ago = db.snapshot_at_time(clock.now() - Duration::from_secs(30))?;
/// assert_eq!(minute_ago.get("k")?.as_deref(), Some(&b"v1"[..]));
/// # Ok(()) }
/// ```
#[derive(Debug)]
pub struct ManualClock {
    micros: AtomicU64,
}

impl ManualClock {
    /// A clock showing `time`.
    pub fn new(time: std::time::SystemTime) -> ManualClock {
        ManualClock {
            micros: AtomicU64::new(crate::history::micros(time)),
        }
    }

    /// Moves the clock forward by `by`.
    pub fn advance(&self, by: Duration) {
        self.micros
            .fetch_add(crate::history::duration_micros(by), Ordering::SeqCst);
    }

    /// Sets the clock to `time` (also backwards).
    pub fn set(&self, time: std::time::SystemTime) {
        self.micros
            .store(crate::history::micros(time), Ordering::SeqCst);
    }

    /// The time it shows.
    pub fn now(&self) -> std::time::SystemTime {
        crate::history::time_of(self.micros.load(Ordering::SeqCst))
    }
}

impl crate::Clock for ManualClock {
    fn now(&self) -> std::time::SystemTime {
        ManualClock::now(self)
    }
}

/// A file system that forwards to the real one and injects failures on command.
#[derive(Debug, Default)]
pub struct FaultyFileSystem {
    faults: Arc<Faults>,
}

#[derive(Debug, Default)]
struct Faults {
    fail_syncs: AtomicBool,
    fail_writes: AtomicBool,
    /// Microseconds each fsync sleeps before it runs.
    sync_delay_micros: AtomicU64,
    syncs: AtomicU64,
    writes: AtomicU64,
    writeback_hints: AtomicU64,
    writeback_hint_bytes: AtomicU64,
}

impl FaultyFileSystem {
    /// A file system that injects nothing until told to.
    pub fn new() -> FaultyFileSystem {
        FaultyFileSystem::default()
    }

    /// While `on`, every file or directory fsync fails with `EIO` (and, as on
    /// a real disk after such a failure, what it should have flushed may be lost).
    pub fn fail_syncs(&self, on: bool) {
        self.faults.fail_syncs.store(on, Ordering::SeqCst);
    }

    /// While `on`, every write fails with `ENOSPC` (no space left on device).
    pub fn fail_writes_no_space(&self, on: bool) {
        self.faults.fail_writes.store(on, Ordering::SeqCst);
    }

    /// Makes every file and directory fsync first sleep for `delay`, as a
    /// disk whose cache flush is that much slower would (zero turns it off).
    pub fn delay_syncs(&self, delay: Duration) {
        let micros = u64::try_from(delay.as_micros()).unwrap_or(u64::MAX);
        self.faults
            .sync_delay_micros
            .store(micros, Ordering::SeqCst);
    }

    /// How many file and directory fsyncs were attempted.
    pub fn sync_count(&self) -> u64 {
        self.faults.syncs.load(Ordering::SeqCst)
    }

    /// How many writes were attempted.
    pub fn write_count(&self) -> u64 {
        self.faults.writes.load(Ordering::SeqCst)
    }

    /// How many times a file was asked to start writing bytes to the
    /// device ahead of its fsync ([`WritableFile::start_writeback`]), and
    /// how many bytes those requests covered.
    pub fn writeback_hints(&self) -> (u64, u64) {
        (
            self.faults.writeback_hints.load(Ordering::SeqCst),
            self.faults.writeback_hint_bytes.load(Ordering::SeqCst),
        )
    }
}

impl Faults {
    fn sync(&self) -> io::Result<()> {
        self.syncs.fetch_add(1, Ordering::SeqCst);
        let delay = self.sync_delay_micros.load(Ordering::SeqCst);
        if delay > 0 {
            std::thread::sleep(Duration::from_micros(delay));
        }
        if self.fail_syncs.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(5)); // EIO
        }
        Ok(())
    }

    fn write(&self) -> io::Result<()> {
        self.writes.fetch_add(1, Ordering::SeqCst);
        if self.fail_writes.load(Ordering::SeqCst) {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        Ok(())
    }
}

#[derive(Debug)]
struct FaultyFile {
    inner: Box<dyn WritableFile>,
    faults: Arc<Faults>,
}

impl WritableFile for FaultyFile {
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.faults.write()?;
        self.inner.write_all_at(offset, bytes)
    }
    fn write_pages_at(&mut self, offset: u64, pages: &[u8]) -> io::Result<()> {
        // Held to the method's contract (whole blocks of 512 bytes), as a
        // direct write is by the kernel.
        if offset % 512 != 0 || pages.len() % 512 != 0 {
            return Err(io::Error::new(
                io::ErrorKind::InvalidInput,
                format!(
                    "write_pages_at({offset}, {} bytes) is not whole blocks",
                    pages.len()
                ),
            ));
        }
        self.faults.write()?;
        self.inner.write_pages_at(offset, pages)
    }
    fn start_writeback(&mut self, offset: u64, len: u64) -> io::Result<()> {
        self.faults.writeback_hints.fetch_add(1, Ordering::SeqCst);
        self.faults
            .writeback_hint_bytes
            .fetch_add(len, Ordering::SeqCst);
        self.inner.start_writeback(offset, len)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.faults.sync()?;
        self.inner.sync_data()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.faults.sync()?;
        self.inner.sync_all()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.inner.set_len(len)
    }
}

impl FileSystem for FaultyFileSystem {
    fn entry_kind(&self, path: &Path) -> io::Result<Option<EntryKind>> {
        RealFileSystem.entry_kind(path)
    }
    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        RealFileSystem.create_dir_all(path)
    }
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        RealFileSystem.list_dir(path)
    }
    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        RealFileSystem.read(path)
    }
    fn read_range(&self, path: &Path, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        RealFileSystem.read_range(path, offset, len)
    }
    fn map(&self, path: &Path) -> io::Result<crate::mmap::MappedFile> {
        RealFileSystem.map(path)
    }
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let inner = RealFileSystem.create_new(path)?;
        Ok(Box::new(FaultyFile {
            inner,
            faults: self.faults.clone(),
        }))
    }
    fn open_writable(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let inner = RealFileSystem.open_writable(path)?;
        Ok(Box::new(FaultyFile {
            inner,
            faults: self.faults.clone(),
        }))
    }
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        RealFileSystem.rename(from, to)
    }
    fn remove_file(&self, path: &Path) -> io::Result<()> {
        RealFileSystem.remove_file(path)
    }
    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        self.faults.sync()?;
        RealFileSystem.sync_dir(path)
    }
    fn try_lock(&self, path: &Path) -> io::Result<Box<dyn FileLock>> {
        RealFileSystem.try_lock(path)
    }
    fn try_lock_shared(&self, path: &Path) -> io::Result<Box<dyn FileLock>> {
        RealFileSystem.try_lock_shared(path)
    }
}
