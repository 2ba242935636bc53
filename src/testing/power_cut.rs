//! An in-memory file system that simulates power cuts.
//!
//! It keeps two states of everything: what the program sees (every write,
//! create, rename and removal) and what is *durable* (file contents as of
//! their last fsync, directory entries as of the directory's last fsync).
//! [`PowerCutFileSystem::crash_at`] makes the N-th mutating operation fail
//! and every operation after it fail too, as if the machine stopped there;
//! [`PowerCutFileSystem::restart`] then builds the state a restarted machine
//! could find, in one of several [`PowerCut`] modes, and lets a new `Db` open
//! on it.
//!
//! A write of whole pages that asks to be made durable at once
//! ([`WritableFile::write_pages_durably_at`]) is durable as soon as it
//! returns, as on the real file system with direct I/O, unless
//! [`PowerCutFileSystem::durable_page_writes`] turns that off (a file system
//! without direct I/O, where an fsync must follow).

use std::collections::{BTreeMap, BTreeSet};
use std::io;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex, MutexGuard};

use bytes::Bytes;

use crate::io::{EntryKind, FileLock, FileSystem, WritableFile};

/// What survives a power cut.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum PowerCut {
    /// No power loss: only the process stopped (like SIGKILL); everything it
    /// wrote survives, synced or not.
    NoPowerLoss,
    /// Only what was fsynced: file contents as of their last fsync, and
    /// directory entries as of their directory's last fsync.
    LoseUnsynced,
    /// Directory changes survive even without a directory fsync, but file
    /// contents not fsynced are lost (a rename reaching disk before the data
    /// of the renamed file).
    KeepDirectoryChanges,
    /// Unsynced file contents survive, but directory changes not fsynced are
    /// undone.
    KeepFileContents,
    /// File contents as of their last fsync, and every directory change made
    /// since its directory's last fsync except the `index`-th one (counted
    /// from 0, in the order they were made): a file system that reorders
    /// metadata updates.
    DropDirectoryChange {
        /// Which unsynced directory change is lost.
        index: usize,
    },
    /// Directory changes survive, and each file keeps its unsynced writes up
    /// to a point: the first `writes` of them whole, and `torn_bytes` bytes of
    /// the next one (a torn write).
    TornWrite {
        /// Unsynced writes kept whole, in the order they were made.
        writes: usize,
        /// Bytes kept of the write after them.
        torn_bytes: usize,
    },
}

type FileId = u64;

/// A change to a file not yet covered by an fsync.
#[derive(Clone, Debug)]
enum Change {
    Write { offset: u64, bytes: Vec<u8> },
    SetLen(u64),
}

#[derive(Clone, Debug, Default)]
struct SimFile {
    /// Contents as of the last fsync.
    durable: Vec<u8>,
    /// Changes since, in order.
    pending: Vec<Change>,
}

impl SimFile {
    fn apply(contents: &mut Vec<u8>, change: &Change, limit: Option<usize>) {
        match change {
            Change::Write { offset, bytes } => {
                let bytes = &bytes[..limit.unwrap_or(bytes.len()).min(bytes.len())];
                let start = *offset as usize;
                if contents.len() < start + bytes.len() {
                    contents.resize(start + bytes.len(), 0);
                }
                contents[start..start + bytes.len()].copy_from_slice(bytes);
            }
            Change::SetLen(len) => {
                if limit.is_none() {
                    contents.resize(*len as usize, 0);
                }
            }
        }
    }

    fn current(&self) -> Vec<u8> {
        let mut contents = self.durable.clone();
        for change in &self.pending {
            SimFile::apply(&mut contents, change, None);
        }
        contents
    }

    fn sync(&mut self) {
        self.durable = self.current();
        self.pending.clear();
    }
}

/// A directory change not yet covered by a directory fsync.
#[derive(Clone, Debug)]
enum DirChange {
    Create(PathBuf, FileId),
    Rename(PathBuf, PathBuf, FileId),
    Remove(PathBuf),
}

impl DirChange {
    fn dir(&self) -> Option<&Path> {
        match self {
            DirChange::Create(path, _) | DirChange::Remove(path) => path.parent(),
            DirChange::Rename(_, to, _) => to.parent(),
        }
    }

    fn apply(&self, entries: &mut BTreeMap<PathBuf, FileId>) {
        match self {
            DirChange::Create(path, id) => {
                entries.insert(path.clone(), *id);
            }
            DirChange::Rename(from, to, id) => {
                entries.remove(from);
                entries.insert(to.clone(), *id);
            }
            DirChange::Remove(path) => {
                entries.remove(path);
            }
        }
    }
}

#[derive(Clone, Debug, Default)]
struct State {
    /// Directory changes since their directory's last fsync, in order.
    unsynced_dir_changes: Vec<DirChange>,
    dirs: BTreeSet<PathBuf>,
    /// What the program sees.
    entries: BTreeMap<PathBuf, FileId>,
    /// What survives a power cut without help.
    durable_entries: BTreeMap<PathBuf, FileId>,
    files: BTreeMap<FileId, SimFile>,
    next_id: FileId,
    locks: BTreeSet<PathBuf>,
    /// Mutating operations performed so far.
    operations: u64,
    crash_at: Option<u64>,
    crashed: bool,
    /// The operation that fails without stopping the machine.
    fail_at: Option<u64>,
    /// Reads fail with EIO.
    fail_reads: bool,
    /// Directory listings fail with "permission denied".
    fail_listing: bool,
    /// Every read returns the data with one bit flipped at this offset.
    flip_on_read: Option<u64>,
    /// Whether `write_pages_durably_at` makes its pages durable.
    durable_page_writes: bool,
}

impl State {
    /// Counts a mutating operation; fails it if the machine has stopped.
    fn operation(&mut self) -> io::Result<()> {
        if self.crashed {
            return Err(stopped());
        }
        self.operations += 1;
        if self.crash_at.is_some_and(|at| self.operations >= at) {
            self.crashed = true;
            return Err(stopped());
        }
        Ok(())
    }

    /// Whether the operation just counted is the one chosen to fail.
    fn fails_now(&self) -> bool {
        self.fail_at == Some(self.operations)
    }

    fn file_mut(&mut self, id: FileId) -> io::Result<&mut SimFile> {
        self.files.get_mut(&id).ok_or_else(not_found)
    }
}

fn stopped() -> io::Error {
    io::Error::other("simulated power cut: the machine has stopped")
}

fn eio() -> io::Error {
    io::Error::from_raw_os_error(5)
}

fn not_found() -> io::Error {
    io::Error::from(io::ErrorKind::NotFound)
}

/// An in-memory file system with power-cut simulation; see the
/// [module documentation](self).
///
/// ```
/// # fn main() -> Result<(), mapstore::Error> {
/// use std::sync::Arc;
/// use mapstore::{Db, Options};
/// use mapstore::testing::{PowerCut, PowerCutFileSystem};
///
/// let fs = Arc::new(PowerCutFileSystem::new());
/// let options = || Options::default().file_system(fs.clone());
/// let db = Db::open_with("/db", options())?;
/// db.insert("acknowledged", "1")?;          // synced: survives any power cut
/// fs.crash_at(fs.operations() + 1);         // the next write never happens
/// assert!(db.insert("lost", "2").is_err());
/// drop(db);
///
/// fs.restart(PowerCut::LoseUnsynced);
/// let db = Db::open_with("/db", options())?;
/// assert!(db.contains_key("acknowledged")?);
/// assert!(!db.contains_key("lost")?);
/// # Ok(()) }
/// ```
#[derive(Debug, Default, Clone)]
pub struct PowerCutFileSystem {
    state: Arc<Mutex<State>>,
}

impl PowerCutFileSystem {
    /// An empty file system with only the root directory.
    pub fn new() -> PowerCutFileSystem {
        let fs = PowerCutFileSystem::default();
        let mut state = fs.state();
        state.dirs.insert(PathBuf::from("/"));
        state.durable_page_writes = true;
        drop(state);
        fs
    }

    fn state(&self) -> MutexGuard<'_, State> {
        // Every operation leaves the state consistent before it can fail.
        self.state
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }

    /// Mutating operations (create, write, truncate, fsync, rename, remove,
    /// directory fsync) performed since the last restart.
    pub fn operations(&self) -> u64 {
        self.state().operations
    }

    /// Stops the machine at mutating operation number `n` (counted from 1
    /// since the last restart): that operation and every later one fail.
    pub fn crash_at(&self, n: u64) {
        self.state().crash_at = Some(n);
    }

    /// Makes mutating operation number `n` fail while the machine goes on: a
    /// write fails with `ENOSPC` and writes nothing; an fsync fails with
    /// `EIO` and, as on Linux, the file's unsynced changes are lost; any other
    /// operation (a durable write of pages among them) fails with `EIO` and
    /// does nothing.
    pub fn fail_operation_at(&self, n: u64) {
        self.state().fail_at = Some(n);
    }

    /// Whether a write of pages that asks to be made durable at once is
    /// (`true`, the default: the real file system on ext4 or xfs) or is an
    /// ordinary write that an fsync must follow (`false`: tmpfs, or a kernel
    /// before Linux 4.7).
    pub fn durable_page_writes(&self, on: bool) {
        self.state().durable_page_writes = on;
    }

    /// While `on`, listing a directory fails with "permission denied" (an
    /// unreadable directory).
    pub fn fail_listing(&self, on: bool) {
        self.state().fail_listing = on;
    }

    /// While `on`, every read and map fails with `EIO`.
    pub fn fail_reads(&self, on: bool) {
        self.state().fail_reads = on;
    }

    /// While `Some(offset)`, every read and map of a file at least that long
    /// returns its contents with the lowest bit of byte `offset` flipped (the
    /// data on "disk" is unchanged): bit rot in the page cache or on the bus.
    pub fn flip_bit_on_read(&self, offset: Option<u64>) {
        self.state().flip_on_read = offset;
    }

    /// Whether the machine has stopped.
    pub fn crashed(&self) -> bool {
        self.state().crashed
    }

    /// A copy of the whole file system, to restart from several times with
    /// different power-cut modes.
    pub fn fork(&self) -> PowerCutFileSystem {
        PowerCutFileSystem {
            state: Arc::new(Mutex::new(self.state().clone())),
        }
    }

    /// Restarts the machine: what survives is decided by `cut`, every lock is
    /// released, operation counting starts again and no crash is scheduled.
    /// Every `Db` using this file system must have been dropped.
    pub fn restart(&self, cut: PowerCut) {
        let mut state = self.state();
        let entries = match cut {
            PowerCut::LoseUnsynced | PowerCut::KeepFileContents => state.durable_entries.clone(),
            PowerCut::NoPowerLoss | PowerCut::KeepDirectoryChanges | PowerCut::TornWrite { .. } => {
                state.entries.clone()
            }
            PowerCut::DropDirectoryChange { index } => {
                let mut entries = state.durable_entries.clone();
                for (i, change) in state.unsynced_dir_changes.iter().enumerate() {
                    if i != index {
                        change.apply(&mut entries);
                    }
                }
                entries
            }
        };
        for file in state.files.values_mut() {
            let contents = match cut {
                PowerCut::LoseUnsynced
                | PowerCut::KeepDirectoryChanges
                | PowerCut::DropDirectoryChange { .. } => file.durable.clone(),
                PowerCut::NoPowerLoss | PowerCut::KeepFileContents => file.current(),
                PowerCut::TornWrite { writes, torn_bytes } => {
                    let mut contents = file.durable.clone();
                    for (index, change) in file.pending.iter().enumerate() {
                        if index < writes {
                            SimFile::apply(&mut contents, change, None);
                        } else if index == writes {
                            SimFile::apply(&mut contents, change, Some(torn_bytes));
                        }
                    }
                    contents
                }
            };
            file.durable = contents;
            file.pending.clear();
        }
        let live: BTreeSet<FileId> = entries.values().copied().collect();
        state.files.retain(|id, _| live.contains(id));
        state.entries = entries.clone();
        state.durable_entries = entries;
        state.unsynced_dir_changes.clear();
        state.locks.clear();
        state.operations = 0;
        state.crash_at = None;
        state.fail_at = None;
        state.crashed = false;
    }

    /// The current contents of a file (what a program would read).
    pub fn read_file(&self, path: &Path) -> Option<Vec<u8>> {
        let state = self.state();
        let id = state.entries.get(path)?;
        state.files.get(id).map(SimFile::current)
    }

    /// Replaces the contents of a file, durably (to plant damage).
    pub fn write_file(&self, path: &Path, contents: &[u8]) {
        let mut state = self.state();
        let id = match state.entries.get(path) {
            Some(id) => *id,
            None => {
                let id = state.next_id;
                state.next_id += 1;
                state.entries.insert(path.to_path_buf(), id);
                state.durable_entries.insert(path.to_path_buf(), id);
                id
            }
        };
        state.files.insert(
            id,
            SimFile {
                durable: contents.to_vec(),
                pending: Vec::new(),
            },
        );
    }

    /// The names of the files in `dir`, sorted.
    pub fn file_names(&self, dir: &Path) -> Vec<String> {
        let state = self.state();
        state
            .entries
            .keys()
            .filter(|path| path.parent() == Some(dir))
            .filter_map(|path| path.file_name().map(|n| n.to_string_lossy().into_owned()))
            .collect()
    }
}

#[derive(Debug)]
struct SimWritable {
    fs: PowerCutFileSystem,
    id: FileId,
}

impl WritableFile for SimWritable {
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        let mut state = self.fs.state();
        state.operation()?;
        if state.fails_now() {
            return Err(io::Error::from_raw_os_error(28)); // ENOSPC
        }
        state.file_mut(self.id)?.pending.push(Change::Write {
            offset,
            bytes: bytes.to_vec(),
        });
        Ok(())
    }

    fn write_pages_durably_at(&mut self, offset: u64, pages: &[u8]) -> io::Result<bool> {
        if !self.fs.state().durable_page_writes {
            return self.write_all_at(offset, pages).map(|()| false);
        }
        let mut state = self.fs.state();
        state.operation()?;
        if state.fails_now() {
            // The write or its flush failed: nothing of it is known to be
            // anywhere. (An fsync's failure also drops the file's other
            // unsynced changes; this one only concerns its own pages.)
            return Err(eio());
        }
        let file = state.file_mut(self.id)?;
        let write = Change::Write {
            offset,
            bytes: pages.to_vec(),
        };
        // Durable now; kept among the pending changes too, so that what the
        // program sees keeps every change in order. Only these pages become
        // durable, not the file's earlier unsynced changes (the WAL writer
        // makes such a write only when there are none).
        SimFile::apply(&mut file.durable, &write, None);
        file.pending.push(write);
        Ok(true)
    }

    fn sync_data(&mut self) -> io::Result<()> {
        let mut state = self.fs.state();
        state.operation()?;
        if state.fails_now() {
            state.file_mut(self.id)?.pending.clear();
            return Err(eio());
        }
        state.file_mut(self.id)?.sync();
        Ok(())
    }

    fn sync_all(&mut self) -> io::Result<()> {
        self.sync_data()
    }

    fn set_len(&mut self, len: u64) -> io::Result<()> {
        let mut state = self.fs.state();
        state.operation()?;
        if state.fails_now() {
            return Err(eio());
        }
        state.file_mut(self.id)?.pending.push(Change::SetLen(len));
        Ok(())
    }
}

#[derive(Debug)]
struct SimLock {
    fs: PowerCutFileSystem,
    path: PathBuf,
}

impl FileLock for SimLock {}

impl Drop for SimLock {
    fn drop(&mut self) {
        self.fs.state().locks.remove(&self.path);
    }
}

impl FileSystem for PowerCutFileSystem {
    fn entry_kind(&self, path: &Path) -> io::Result<Option<EntryKind>> {
        let state = self.state();
        if state.dirs.contains(path) {
            Ok(Some(EntryKind::Directory))
        } else if state.entries.contains_key(path) {
            Ok(Some(EntryKind::File))
        } else {
            Ok(None)
        }
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        // Directories are durable at once: the engine creates only the
        // database directory, before anything in it.
        let mut state = self.state();
        for ancestor in path.ancestors() {
            state.dirs.insert(ancestor.to_path_buf());
        }
        Ok(())
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        if self.state().fail_listing {
            return Err(io::Error::from(io::ErrorKind::PermissionDenied));
        }
        if !self.state().dirs.contains(path) {
            return Err(not_found());
        }
        Ok(self.file_names(path))
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        let (fail, flip) = {
            let state = self.state();
            (state.fail_reads, state.flip_on_read)
        };
        if fail {
            return Err(eio());
        }
        let mut contents = self.read_file(path).ok_or_else(not_found)?;
        if let Some(byte) = flip.and_then(|offset| contents.get_mut(offset as usize)) {
            *byte ^= 1;
        }
        Ok(contents)
    }

    fn map(&self, path: &Path) -> io::Result<crate::mmap::MappedFile> {
        self.read(path)
            .map(|contents| crate::mmap::MappedFile::in_memory(Bytes::from(contents)))
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let mut state = self.state();
        if state.entries.contains_key(path) {
            return Err(io::Error::from(io::ErrorKind::AlreadyExists));
        }
        if !path.parent().is_some_and(|dir| state.dirs.contains(dir)) {
            return Err(not_found());
        }
        state.operation()?;
        if state.fails_now() {
            return Err(eio());
        }
        let id = state.next_id;
        state.next_id += 1;
        state.files.insert(id, SimFile::default());
        state.entries.insert(path.to_path_buf(), id);
        state
            .unsynced_dir_changes
            .push(DirChange::Create(path.to_path_buf(), id));
        Ok(Box::new(SimWritable {
            fs: self.clone(),
            id,
        }))
    }

    fn open_writable(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let id = *self.state().entries.get(path).ok_or_else(not_found)?;
        Ok(Box::new(SimWritable {
            fs: self.clone(),
            id,
        }))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        let mut state = self.state();
        let id = *state.entries.get(from).ok_or_else(not_found)?;
        state.operation()?;
        if state.fails_now() {
            return Err(eio());
        }
        state.entries.remove(from);
        state.entries.insert(to.to_path_buf(), id);
        state.unsynced_dir_changes.push(DirChange::Rename(
            from.to_path_buf(),
            to.to_path_buf(),
            id,
        ));
        Ok(())
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        if !state.entries.contains_key(path) {
            return Err(not_found());
        }
        state.operation()?;
        if state.fails_now() {
            return Err(eio());
        }
        state.entries.remove(path);
        state
            .unsynced_dir_changes
            .push(DirChange::Remove(path.to_path_buf()));
        Ok(())
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        let mut state = self.state();
        state.operation()?;
        if state.fails_now() {
            return Err(eio());
        }
        let in_dir = |p: &PathBuf| p.parent() == Some(path);
        let current: Vec<(PathBuf, FileId)> = state
            .entries
            .iter()
            .filter(|(p, _)| in_dir(p))
            .map(|(p, id)| (p.clone(), *id))
            .collect();
        state.durable_entries.retain(|p, _| !in_dir(p));
        state.durable_entries.extend(current);
        state
            .unsynced_dir_changes
            .retain(|change| change.dir() != Some(path));
        Ok(())
    }

    fn try_lock(&self, path: &Path) -> io::Result<Box<dyn FileLock>> {
        let mut state = self.state();
        if state.crashed {
            return Err(stopped());
        }
        if !state.locks.insert(path.to_path_buf()) {
            return Err(io::Error::from(io::ErrorKind::WouldBlock));
        }
        if !state.entries.contains_key(path) {
            // The lock file itself is empty and needs no durability.
            let id = state.next_id;
            state.next_id += 1;
            state.files.insert(id, SimFile::default());
            state.entries.insert(path.to_path_buf(), id);
            state.durable_entries.insert(path.to_path_buf(), id);
        }
        Ok(Box::new(SimLock {
            fs: self.clone(),
            path: path.to_path_buf(),
        }))
    }
}
