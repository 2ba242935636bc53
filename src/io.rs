//! The file-system layer: every file operation of the engine goes through the
//! [`FileSystem`] trait, so that tests can swap the real file system for one
//! that injects faults (lost unsynced data, torn writes, failing fsync).
//!
//! The trait speaks `std::io::Result`; the engine adds the operation name and
//! path when it turns a failure into [`Error::Io`](crate::Error::Io).
//!
//! The real file system writes a WAL segment's synced pages with direct I/O
//! (`O_DIRECT`, switched on the descriptor with `fcntl`, so one descriptor
//! serves both kinds of write), and makes them durable in the same call
//! (`pwritev2` with `RWF_DSYNC`) when asked. A lone synced commit is one
//! page written and made durable: on this project's test machine (ext4 on
//! a virtual disk), a loop of 4 KiB writes each followed by `fdatasync` ran
//! 10.5-11.6k/s through the page cache, 12.1-12.7k/s direct, and
//! 12.4-13.0k/s direct with `O_DSYNC` and no `fdatasync`.

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
    /// Writes `pages` at `offset` like [`write_all_at`](Self::write_all_at),
    /// for a write of whole blocks (offset and length multiples of 512) that
    /// is fsynced next and not read back soon. The real file system sends it
    /// to the device directly (`O_DIRECT`), bypassing the page cache, when
    /// offset and length are multiples of [`DIRECT_IO_ALIGN`] and the file
    /// system allows it. The data is no more durable for that: only
    /// `sync_data` makes it so.
    fn write_pages_at(&mut self, offset: u64, pages: &[u8]) -> io::Result<()> {
        self.write_all_at(offset, pages)
    }
    /// Writes `pages` like [`write_pages_at`](Self::write_pages_at) and,
    /// where the file system can do it in the same call, makes them durable
    /// as a `sync_data` after the write would; returns whether it did.
    ///
    /// Only the pages written are made durable, not earlier unsynced writes
    /// to the file: the caller uses it when there are none. The real file
    /// system does it for a direct write (`pwritev2` with `RWF_DSYNC`,
    /// which the kernel completes with the same device flush as
    /// `fdatasync`, saving a system call and the page-cache walk); the
    /// default writes and returns `false`, leaving the caller to sync.
    fn write_pages_durably_at(&mut self, offset: u64, pages: &[u8]) -> io::Result<bool> {
        self.write_pages_at(offset, pages).map(|()| false)
    }
    /// Asks for `len` bytes from `offset`, written before, to start going
    /// to the device now, and returns without waiting for them. They are
    /// no more durable for it: only `sync_data` and `sync_all` make them so.
    ///
    /// A file written in one go and then fsynced otherwise reaches the
    /// device all at once, at the fsync, and a write queued behind it (a
    /// WAL commit's) waits for all of it. A hint: the real file system
    /// calls `sync_file_range` on Linux; the default does nothing.
    fn start_writeback(&mut self, offset: u64, len: u64) -> io::Result<()> {
        let _ = (offset, len);
        Ok(())
    }
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
    /// Reads up to `len` bytes of a file from `offset` (fewer only where
    /// the file ends). The default reads the whole file.
    fn read_range(&self, path: &Path, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let whole = self.read(path)?;
        let start = (offset as usize).min(whole.len());
        let end = start.saturating_add(len as usize).min(whole.len());
        Ok(whole[start..end].to_vec())
    }
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
    /// The length of the file at `path`. The default reads it whole.
    fn file_len(&self, path: &Path) -> io::Result<u64> {
        self.read(path).map(|bytes| bytes.len() as u64)
    }
    /// Makes `to` a second name of the file `from` (a hard link), failing if
    /// `to` exists. The default refuses (`Unsupported`): callers then copy.
    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        let _ = (from, to);
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
    /// Makes the creations, renames and removals in a directory durable.
    fn sync_dir(&self, path: &Path) -> io::Result<()>;
    /// Takes an exclusive lock on `path` (creating the file if needed) without
    /// waiting; an error of kind `WouldBlock` means another holder has it.
    fn try_lock(&self, path: &Path) -> io::Result<Box<dyn FileLock>>;
    /// Takes a shared lock on the existing file `path` without waiting:
    /// any number of holders at once, none while an exclusive lock is
    /// held (`WouldBlock`). The default refuses (`Unsupported`).
    fn try_lock_shared(&self, path: &Path) -> io::Result<Box<dyn FileLock>> {
        let _ = path;
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }
}

/// The operating system's file system (`std::fs`, `fdatasync`, `flock`).
#[derive(Clone, Copy, Debug, Default)]
pub struct RealFileSystem;

/// The alignment of offset, length and memory that a direct write needs:
/// the largest logical block size of common devices (the kernel refuses a
/// direct write aligned to less than the device's block).
pub const DIRECT_IO_ALIGN: usize = 4096;

/// The most a direct write copies into its aligned buffer at a time.
const DIRECT_CHUNK_BYTES: usize = 1 << 20;

#[derive(Debug)]
struct RealFile {
    file: File,
    mode: WriteMode,
    /// Set once the kernel refused `RWF_DSYNC` (before Linux 4.7).
    dsync_refused: bool,
    /// Scratch memory for direct writes, of which an aligned part is used.
    aligned: Vec<u8>,
}

/// Whether a direct write asks the kernel to make it durable before it
/// returns (`RWF_DSYNC`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Durably {
    No,
    Yes,
}

/// How the descriptor of a [`RealFile`] is set.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum WriteMode {
    /// Writes go through the page cache.
    Cached,
    /// `O_DIRECT` is set.
    Direct,
    /// The file system refused `O_DIRECT`; never tried again for this file.
    DirectRefused,
}

impl RealFile {
    fn new(file: File) -> RealFile {
        RealFile {
            file,
            mode: WriteMode::Cached,
            dsync_refused: false,
            aligned: Vec::new(),
        }
    }

    /// Sets or clears `O_DIRECT` on the descriptor.
    #[cfg(target_os = "linux")]
    fn set_direct(&mut self, direct: bool) -> io::Result<()> {
        use rustix::fs::{OFlags, fcntl_getfl, fcntl_setfl};
        let flags = fcntl_getfl(&self.file)?;
        let flags = if direct {
            flags | OFlags::DIRECT
        } else {
            flags - OFlags::DIRECT
        };
        fcntl_setfl(&self.file, flags)?;
        Ok(())
    }

    #[cfg(not(target_os = "linux"))]
    fn set_direct(&mut self, _direct: bool) -> io::Result<()> {
        Err(io::Error::from(io::ErrorKind::Unsupported))
    }

    /// Writes `pages` with `O_DIRECT` set, through the aligned buffer, each
    /// chunk made durable before the call returns if `durably` says so.
    fn write_direct(&mut self, offset: u64, pages: &[u8], durably: Durably) -> io::Result<()> {
        let chunk_bytes = pages.len().min(DIRECT_CHUNK_BYTES);
        if self.aligned.len() < chunk_bytes + DIRECT_IO_ALIGN {
            self.aligned = vec![0; chunk_bytes + DIRECT_IO_ALIGN];
        }
        let start = self.aligned.as_ptr().align_offset(DIRECT_IO_ALIGN);
        let mut written = 0;
        for chunk in pages.chunks(chunk_bytes) {
            let aligned = &mut self.aligned[start..start + chunk.len()];
            aligned.copy_from_slice(chunk);
            match durably {
                Durably::No => self.file.write_all_at(aligned, offset + written)?,
                Durably::Yes => write_all_dsync(&self.file, aligned, offset + written)?,
            }
            written += chunk.len() as u64;
        }
        Ok(())
    }

    /// Sets `O_DIRECT` if a write of `len` bytes at `offset` can go direct
    /// and the descriptor allows it; returns whether it is set.
    fn enter_direct_mode(&mut self, offset: u64, len: usize) -> bool {
        let align = DIRECT_IO_ALIGN as u64;
        let aligned = offset % align == 0 && len as u64 % align == 0;
        if !aligned || self.mode == WriteMode::DirectRefused {
            return false;
        }
        if self.mode == WriteMode::Cached {
            match self.set_direct(true) {
                Ok(()) => self.mode = WriteMode::Direct,
                // tmpfs and some other file systems have no direct I/O.
                Err(_) => self.mode = WriteMode::DirectRefused,
            }
        }
        self.mode == WriteMode::Direct
    }
}

/// Writes all of `bytes` at `offset` with `pwritev2(RWF_DSYNC)`: each call
/// returns once its bytes, and the metadata needed to read them, are
/// durable. Fails with `Unsupported` on a kernel without the flag, before
/// anything is written.
#[cfg(target_os = "linux")]
fn write_all_dsync(file: &File, mut bytes: &[u8], mut offset: u64) -> io::Result<()> {
    use rustix::io::{Errno, ReadWriteFlags, pwritev2};
    while !bytes.is_empty() {
        match pwritev2(
            file,
            &[io::IoSlice::new(bytes)],
            offset,
            ReadWriteFlags::DSYNC,
        ) {
            Ok(0) => return Err(io::Error::from(io::ErrorKind::WriteZero)),
            Ok(written) => {
                bytes = &bytes[written..];
                offset += written as u64;
            }
            Err(Errno::INTR) => {}
            Err(Errno::NOSYS | Errno::OPNOTSUPP) => {
                return Err(io::Error::from(io::ErrorKind::Unsupported));
            }
            Err(errno) => return Err(errno.into()),
        }
    }
    Ok(())
}

#[cfg(not(target_os = "linux"))]
fn write_all_dsync(_file: &File, _bytes: &[u8], _offset: u64) -> io::Result<()> {
    Err(io::Error::from(io::ErrorKind::Unsupported))
}

impl WritableFile for RealFile {
    fn write_all_at(&mut self, offset: u64, bytes: &[u8]) -> io::Result<()> {
        if self.mode == WriteMode::Direct {
            self.set_direct(false)?;
            self.mode = WriteMode::Cached;
        }
        self.file.write_all_at(bytes, offset)
    }

    fn write_pages_at(&mut self, offset: u64, pages: &[u8]) -> io::Result<()> {
        if !self.enter_direct_mode(offset, pages.len()) {
            return self.write_all_at(offset, pages);
        }
        match self.write_direct(offset, pages, Durably::No) {
            // A device whose blocks are larger than the alignment refuses
            // the write before writing anything.
            Err(error) if error.kind() == io::ErrorKind::InvalidInput => {
                self.write_all_at(offset, pages)?;
                self.mode = WriteMode::DirectRefused;
                Ok(())
            }
            other => other,
        }
    }

    fn write_pages_durably_at(&mut self, offset: u64, pages: &[u8]) -> io::Result<bool> {
        if self.dsync_refused || !self.enter_direct_mode(offset, pages.len()) {
            return self.write_pages_at(offset, pages).map(|()| false);
        }
        match self.write_direct(offset, pages, Durably::Yes) {
            Ok(()) => Ok(true),
            // Refused before anything was written: by the kernel (no
            // `RWF_DSYNC`) or by the device (alignment).
            Err(error) => match error.kind() {
                io::ErrorKind::Unsupported => {
                    self.dsync_refused = true;
                    self.write_pages_at(offset, pages).map(|()| false)
                }
                io::ErrorKind::InvalidInput => {
                    self.write_all_at(offset, pages)?;
                    self.mode = WriteMode::DirectRefused;
                    Ok(false)
                }
                _ => Err(error),
            },
        }
    }

    fn start_writeback(&mut self, offset: u64, len: u64) -> io::Result<()> {
        crate::mmap::start_writeback(&self.file, offset, len)
    }
    fn sync_data(&mut self) -> io::Result<()> {
        self.file.sync_data()
    }
    fn sync_all(&mut self) -> io::Result<()> {
        self.file.sync_all()
    }
    fn set_len(&mut self, len: u64) -> io::Result<()> {
        self.file.set_len(len)
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

    fn read_range(&self, path: &Path, offset: u64, len: u64) -> io::Result<Vec<u8>> {
        let file = File::open(path)?;
        let size = file.metadata()?.len();
        let mut bytes = vec![0; len.min(size.saturating_sub(offset)) as usize];
        // The file may be cut meanwhile: stop at its end.
        let mut filled = 0;
        while filled < bytes.len() {
            match file.read_at(&mut bytes[filled..], offset + filled as u64) {
                Ok(0) => break,
                Ok(n) => filled += n,
                Err(error) if error.kind() == io::ErrorKind::Interrupted => {}
                Err(error) => return Err(error),
            }
        }
        bytes.truncate(filled);
        Ok(bytes)
    }

    fn map(&self, path: &Path) -> io::Result<crate::mmap::MappedFile> {
        crate::mmap::map_read_only(path)
    }

    fn create_new(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let file = OpenOptions::new().write(true).create_new(true).open(path)?;
        Ok(Box::new(RealFile::new(file)))
    }

    fn open_writable(&self, path: &Path) -> io::Result<Box<dyn WritableFile>> {
        let file = OpenOptions::new().write(true).open(path)?;
        Ok(Box::new(RealFile::new(file)))
    }

    fn rename(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::rename(from, to)
    }

    fn remove_file(&self, path: &Path) -> io::Result<()> {
        fs::remove_file(path)
    }

    fn hard_link(&self, from: &Path, to: &Path) -> io::Result<()> {
        fs::hard_link(from, to)
    }

    fn file_len(&self, path: &Path) -> io::Result<u64> {
        fs::metadata(path).map(|m| m.len())
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

    fn try_lock_shared(&self, path: &Path) -> io::Result<Box<dyn FileLock>> {
        let file = File::open(path)?;
        fs2::FileExt::try_lock_shared(&file)?;
        Ok(Box::new(RealLock(file)))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Whether the file system under `dir` lets a file be opened with
    /// `O_DIRECT` (ext4 and xfs do; tmpfs before Linux 6.6 does not).
    fn allows_direct_io(dir: &Path) -> bool {
        #[cfg(target_os = "linux")]
        {
            use std::os::unix::fs::OpenOptionsExt;
            let direct = rustix::fs::OFlags::DIRECT.bits() as i32;
            let path = dir.join("probe");
            let opened = OpenOptions::new()
                .write(true)
                .create(true)
                .truncate(true)
                .custom_flags(direct)
                .open(&path);
            let _ = fs::remove_file(&path);
            opened.is_ok()
        }
        #[cfg(not(target_os = "linux"))]
        {
            let _ = dir;
            false
        }
    }

    /// A new file `dir/file`, opened for writing.
    fn new_real_file(dir: &Path) -> (std::path::PathBuf, RealFile) {
        let path = dir.join("file");
        let file = OpenOptions::new()
            .write(true)
            .create_new(true)
            .open(&path)
            .unwrap();
        (path, RealFile::new(file))
    }

    #[test]
    fn page_writes_go_direct_where_allowed_and_every_write_reads_back() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut file) = new_real_file(dir.path());
        let direct_mode = if allows_direct_io(dir.path()) {
            WriteMode::Direct
        } else {
            WriteMode::DirectRefused
        };
        let mut expected = Vec::new();
        let mut write = |file: &mut RealFile, offset: u64, len: usize, fill: u8, pages: bool| {
            let bytes: Vec<u8> = (0..len).map(|i| fill ^ (i % 251) as u8).collect();
            if pages {
                file.write_pages_at(offset, &bytes).unwrap();
            } else {
                file.write_all_at(offset, &bytes).unwrap();
            }
            let end = offset as usize + len;
            if expected.len() < end {
                expected.resize(end, 0);
            }
            expected[offset as usize..end].copy_from_slice(&bytes);
        };

        write(&mut file, 0, 100, 1, false);
        assert_eq!(file.mode, WriteMode::Cached);
        // Two aligned pages, then more than one copy buffer's worth.
        write(&mut file, 4096, 8192, 2, true);
        assert_eq!(file.mode, direct_mode);
        write(&mut file, 12288, DIRECT_CHUNK_BYTES + 4096, 3, true);
        assert_eq!(file.mode, direct_mode);
        // An ordinary write in the middle of the direct ones.
        write(&mut file, 12288 + 10, 50, 4, false);
        assert_ne!(file.mode, WriteMode::Direct);
        // Whole 512-byte blocks that are not 4 KiB aligned go through the cache.
        write(&mut file, 512, 512, 5, true);
        assert_ne!(file.mode, WriteMode::Direct);
        write(&mut file, 8192, 4096, 6, true);
        assert_eq!(file.mode, direct_mode);
        file.sync_data().unwrap();

        assert_eq!(fs::read(&path).unwrap(), expected);
    }

    /// A durable page write says whether it spared the caller the fsync:
    /// only when it went direct (a kernel since Linux 4.7 has `RWF_DSYNC`).
    #[test]
    fn durable_page_writes_need_no_sync_only_when_they_go_direct() {
        let dir = tempfile::tempdir().unwrap();
        let (path, mut file) = new_real_file(dir.path());
        let direct = allows_direct_io(dir.path());
        let mut expected = vec![0u8; 12288 + DIRECT_CHUNK_BYTES + 4096];
        let mut write = |file: &mut RealFile, offset: u64, len: usize, fill: u8| {
            let bytes: Vec<u8> = (0..len).map(|i| fill ^ (i % 253) as u8).collect();
            expected[offset as usize..offset as usize + len].copy_from_slice(&bytes);
            file.write_pages_durably_at(offset, &bytes).unwrap()
        };

        assert_eq!(write(&mut file, 4096, 8192, 1), direct);
        // More than one copy buffer's worth, each chunk durable.
        assert_eq!(
            write(&mut file, 12288, DIRECT_CHUNK_BYTES + 4096, 2),
            direct
        );
        // Whole 512-byte blocks that are not 4 KiB aligned: cached, so an
        // fsync must follow.
        assert!(!write(&mut file, 512, 1024, 3));
        assert_ne!(file.mode, WriteMode::Direct);
        assert_eq!(write(&mut file, 0, 4096, 4), direct);
        file.sync_data().unwrap();

        assert_eq!(fs::read(&path).unwrap(), expected);
    }
}
