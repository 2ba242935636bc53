//! The file-system layer: every file operation of the engine goes through the
//! [`FileSystem`] trait, so that tests can swap the real file system for one
//! that injects faults (lost unsynced data, torn writes, failing fsync).
//!
//! The trait speaks `std::io::Result`; the engine adds the operation name and
//! path when it turns a failure into [`Error::Io`](crate::Error::Io).

use std::fmt;
use std::fs::{self, File, OpenOptions};
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

/// What a path names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum EntryKind {
    /// A regular file.
    File,
    /// A directory.
    Directory,
    /// Anything else (a socket, a device, ...).
    Other,
}

/// A file opened for writing at explicit offsets.
pub trait WritableFile: Send + Sync + fmt::Debug {
    /// Writes all of `bytes` at byte `offset`, growing the file if needed.
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()>;
    /// Flushes the file's data, and the metadata needed to read it back
    /// (`fdatasync`).
    fn sync_data(&mut self) -> io::Result<()>;
    /// Flushes the file's data and all its metadata (`fsync`).
    fn sync_all(&mut self) -> io::Result<()>;
    /// Sets the file's length, cutting or extending (with zeros).
    fn set_len(&mut self, len: u64) -> io::Result<()>;
}

/// A held directory lock; dropping it releases the lock.
pub trait FileLock: Send + Sync + fmt::Debug {}

/// Every file operation mapstore performs.
///
/// Implementations must be usable from many threads at once. The real one is
/// [`RealFileSystem`]; `mapstore::testing` has a fault-injecting one.
pub trait FileSystem: Send + Sync + fmt::Debug {
    /// What `path` names, or `None` when nothing is there.
    fn entry_kind(&self, path: &Path) -> io::Result<Option<EntryKind>>;
    /// Creates a directory and its missing parents.
    fn create_dir_all(&self, path: &Path) -> io::Result<()>;
    /// The names of the entries of a directory, in no particular order.
    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>>;
    /// Reads a whole file.
    fn read(&self, path: &Path) -> io::Result<Vec<u8>>;
    /// Maps a whole file read-only; only a file that nothing changes while
    /// it is mapped (a snapshot file, or a WAL segment during recovery).
    fn map(&self, path: &Path) -> io::Result<crate::mmap::MappedFile>;
    /// Creates a new, empty file; fails if it exists.
    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>>;
    /// Opens an existing file for writing.
    fn open_writable(&self, path: &Path) -> io::Result<Box<dyn WritableFile>>;
    /// Renames `from` to `to`, replacing `to` atomically if it exists.
    fn rename(&self, from: &Path, to: &Path) -> io::Result<()>;
    /// Removes a file.
    fn remove_file(&self, path: &Path) -> io::Result<()>;
    /// Makes the creations, renames and removals in a directory durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `path` (creating the file if needed) without
    /// waiting; an error of kind `WouldBlock` means another holder has it.
    fn try_lock(&self, path: &Path) -> io::Result<Box<dyn FileLock>>;
}

/// The operating system's file system (`std::fs`, `fdatasync`, `flock`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFileSystem;

#[derive(Debug)]
struct RealFile(File);

impl WritableFile for RealFile {
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        self.0.write_all_at(bytes, offset)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.0.sync_data()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.0.sync_all()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.0.set_len(len)
    }
}

#[derive(Debug)]
struct RealLock(File);

impl FileLock for RealLock {}

impl Drop for RealLock {
    fn drop(&mut self) {
        // Closing the descriptor releases the flock as well; unlocking first
        // makes the release independent of other descriptors of the file.
        let _ = fs2::FileExt::unlock(&self.0);
    }
}

impl FileSystem for RealFileSystem {
    fn entry_kind(&self, path: &Path) -> io::Result<Option<EntryKind>> {
        match fs::metadata(path) {
            Ok(meta) if meta.is_file() => Ok(Some(EntryKind::File)),
            Ok(meta) if meta.is_dir() => Ok(Some(EntryKind::Directory)),
            Ok(_) => Ok(Some(EntryKind::Other)),
            Err(error) if error.kind() == io::ErrorKind::NotFound => Ok(None),
            Err(error) => Err(error),
        }
    }

    fn create_dir_all(&self, path: &Path) -> io::Result<()> {
        fs::create_dir_all(path)
    }

    fn list_dir(&self, path: &Path) -> io::Result<Vec<String>> {
        let mut names = Vec::new();
        for entry in fs::read_dir(path)? {
            names.push(entry?.file_name().to_string_lossy().into_owned());
        }
        Ok(names)
    }

    fn read(&self, path: &Path) -> io::Result<Vec<u8>> {
        fs::read(path)
    }

    fn map(&self, path: &Path) -> io::Result<crate::mmap::MappedFile> {
        crate::mmap::map_read_only(path)
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(RealFile(file)))
    }

    fn open_writable(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let file = OpenOptions::new().write(true).open(path)?;
        Ok(Box::new(RealFile(file)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn sync_dir(&self, path: &Path) -> io::Result<()> {
        File::open(path)?.sync_all()
    }

    fn try_lock(&self, path: &Path) -> io::Result<Box<dyn FileLock>> {
        let file = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(path)?;
        fs2::FileExt::try_lock_exclusive(&file)?;
        Ok(Box::new(RealLock(file)))
    }
}
