//! Read-only memory maps of files that do not change, a hint to the processor
//! to load mapped bytes ahead of their use, and one to the kernel to start
//! writing a file's new bytes to the device. This is the only module of
//! mapstore with `unsafe` code.
//!
//! A map is wrapped in [`Bytes`], so keys and values read from a snapshot
//! file are zero-copy slices that keep the mapping alive for as long as any
//! of them is held, even after the file is deleted (on Unix, an unlinked
//! file stays readable through an existing map).

use std::fs::File;
use std::io;
use std::ops::Range;
use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;

/// A file's bytes as [`FileSystem::map`](crate::io::FileSystem::map) gives
/// them, with a way to drop their pages from the process's memory when
/// they are a real map.
#[derive(Debug)]
pub struct MappedFile {
    pub bytes: Bytes,
    pub pages: Option<PageReleaser>,
}

impl MappedFile {
    /// Bytes that are not a map (read into memory): nothing to release.
    pub fn in_memory(bytes: Bytes) -> MappedFile {
        MappedFile { bytes, pages: None }
    }
}

/// Unmaps pages of a read-only map from the process, so that a pass over
/// a whole file (a merge) does not leave all of it counted in the
/// process's resident memory. The pages stay in the OS page cache, and the
/// next access maps them again.
#[derive(Debug, Clone)]
pub struct PageReleaser {
    map: Arc<memmap2::Mmap>,
}

impl PageReleaser {
    /// Releases the whole pages inside `range` of the map; out-of-range
    /// parts are ignored. Best effort: an error only means the pages stay.
    pub fn release(&self, range: Range<usize>) {
        let page = page_size();
        let start = range.start.div_ceil(page) * page;
        let end = (range.end.min(self.map.len()) / page) * page;
        if start >= end {
            return;
        }
        // SAFETY: `unchecked_advise_range` is unsafe because MADV_DONTNEED
        // replaces the contents of private or anonymous pages with zeros,
        // which would change bytes that live borrows point at. This map is
        // shared (`Mmap::map` maps MAP_SHARED), read-only and of a file that
        // is never modified (see `map_read_only`): on the next access the
        // kernel maps the same page-cache pages again, holding the same
        // bytes, so every `&[u8]` into the map reads what it read before.
        // The range lies inside the map (clamped above).
        let _ = unsafe {
            self.map
                .unchecked_advise_range(memmap2::UncheckedAdvice::DontNeed, start, end - start)
        };
    }
}

/// The unit `release` rounds to. On a machine with larger pages, memmap2
/// rounds the start down to a real page boundary, so up to one page before
/// the range is released too: harmless, since released pages read back
/// the same bytes (see the SAFETY comment above).
fn page_size() -> usize {
    4096
}

/// The owner of a map's bytes inside a [`Bytes`].
struct MapOwner(Arc<memmap2::Mmap>);

impl AsRef<[u8]> for MapOwner {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

/// Maps the whole file at `path` read-only.
///
/// Only for files that nothing modifies while they are mapped: snapshot
/// files, which mapstore writes under a temporary name, fsyncs and renames
/// and never opens for writing again; and WAL segments while recovery
/// replays them, before the database has a WAL writer.
pub(crate) fn map_read_only(path: &Path) -> io::Result<MappedFile> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        // mmap refuses empty files; an empty map has nothing to read anyway.
        return Ok(MappedFile::in_memory(Bytes::new()));
    }
    // SAFETY: `Mmap::map` is unsafe because the mapped memory changes (or, if
    // the file shrinks, faults) when another process modifies the file. No
    // file mapped here changes while mapped. Snapshot files are immutable by
    // construction: fully written and fsynced under a temporary name before
    // being renamed into place, never opened for writing again. WAL
    // segments are mapped only by recovery, which runs before this instance
    // creates its WAL writer, and which drops every map of a segment (it
    // copies out the records it keeps) before it cuts one. The directory
    // lock keeps a second mapstore instance out. Editing a database's files
    // by hand while it is open is outside what any embedded engine can
    // defend against. The map is read-only, so no `&mut` aliasing can arise.
    let map = Arc::new(unsafe { memmap2::Mmap::map(&file)? });
    Ok(MappedFile {
        bytes: Bytes::from_owner(MapOwner(map.clone())),
        pages: Some(PageReleaser { map }),
    })
}

/// Asks the processor to start loading `bytes` into its caches without
/// waiting for them, one request per 64-byte cache line.
///
/// A reverse scan calls it on the block it will read next, a few lines
/// per entry it reads: it walks the file's blocks from the last to the
/// first, an order in which the processor does not fetch ahead by itself,
/// and each block's loads would then stall its decoding. A point read
/// calls it on the block it is about to walk, so that the block's misses
/// overlap instead of coming one per entry. Both ask for a block's first
/// page at most: a longer block holds one large value, which neither
/// reads. Only a hint: it changes no result, and does nothing on other
/// processors than x86-64.
#[inline]
pub(crate) fn prefetch(bytes: &[u8]) {
    #[cfg(target_arch = "x86_64")]
    for line in bytes.chunks(64) {
        use std::arch::x86_64::{_MM_HINT_T0, _mm_prefetch};
        // SAFETY: `_mm_prefetch` is unsafe only because it needs the SSE
        // target feature, which is part of the x86-64 baseline every
        // x86-64 processor has and Rust compiles for. A prefetch reads
        // nothing into the program and never faults, whatever the address;
        // this one is inside a live slice anyway.
        unsafe { _mm_prefetch::<_MM_HINT_T0>(line.as_ptr().cast::<i8>()) };
    }
    #[cfg(not(target_arch = "x86_64"))]
    let _ = bytes;
}

/// Asks the kernel to start writing `len` bytes of `file` from `offset`
/// (written before, still in the page cache) to the device, and returns
/// without waiting for them (`sync_file_range` with
/// `SYNC_FILE_RANGE_WRITE`). The bytes are no more durable for it: only
/// an fsync makes them so. Does nothing on other systems than Linux.
pub(crate) fn start_writeback(file: &File, offset: u64, len: u64) -> io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        use std::os::fd::AsRawFd;
        let out_of_range = |_| io::Error::from(io::ErrorKind::InvalidInput);
        let offset = offset.try_into().map_err(out_of_range)?;
        let len = len.try_into().map_err(out_of_range)?;
        // SAFETY: the call reads and writes no memory of this process: its
        // arguments are a descriptor, which `file` keeps open through the
        // call, and integers. A descriptor or range the kernel does not
        // take comes back as an error (EBADF, EINVAL, ESPIPE).
        let result = unsafe {
            libc::sync_file_range(file.as_raw_fd(), offset, len, libc::SYNC_FILE_RANGE_WRITE)
        };
        if result != 0 {
            return Err(io::Error::last_os_error());
        }
    }
    #[cfg(not(target_os = "linux"))]
    let _ = (file, offset, len);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The call reaches the kernel: it takes a range of a regular file,
    /// and the kernel's refusals come back as errors.
    #[test]
    #[cfg(target_os = "linux")]
    fn writeback_of_a_file_starts_and_refusals_are_errors() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, vec![7u8; 3 * 4096]).unwrap();
        let file = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        start_writeback(&file, 0, 3 * 4096).unwrap();
        start_writeback(&file, 4096, 100).unwrap();
        // Not a regular file: the kernel refuses (ESPIPE).
        let null = std::fs::OpenOptions::new()
            .write(true)
            .open("/dev/null")
            .unwrap();
        let refused = start_writeback(&null, 0, 4096).unwrap_err();
        assert_eq!(refused.raw_os_error(), Some(libc::ESPIPE));
        // Past what the kernel's offsets can express.
        let too_far = start_writeback(&file, u64::MAX, 1).unwrap_err();
        assert_eq!(too_far.kind(), io::ErrorKind::InvalidInput);
        assert_eq!(std::fs::read(&path).unwrap(), vec![7u8; 3 * 4096]);
    }

    #[test]
    fn maps_contents_and_outlives_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello, map").unwrap();
        let bytes = map_read_only(&path).unwrap().bytes;
        let slice = bytes.slice(7..);
        drop(bytes);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&slice[..], b"map");
    }

    #[test]
    fn an_empty_file_maps_to_no_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, b"").unwrap();
        assert!(map_read_only(&path).unwrap().bytes.is_empty());
        assert!(map_read_only(&dir.path().join("missing")).is_err());
    }

    /// A mapped file of `len` patterned bytes, with those bytes.
    fn mapped_file_of(len: u32) -> (tempfile::TempDir, Vec<u8>, MappedFile) {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        let contents: Vec<u8> = (0..len).map(|i| (i % 251) as u8).collect();
        std::fs::write(&path, &contents).unwrap();
        let mapped = map_read_only(&path).unwrap();
        (dir, contents, mapped)
    }

    /// A prefetch of any slice (empty, shorter than a cache line, not a
    /// multiple of one, of a map or of the heap) changes nothing.
    #[test]
    fn prefetching_changes_no_bytes() {
        let (_dir, contents, mapped) = mapped_file_of(3 * 4096 + 7);
        for range in [0..0, 0..1, 5..70, 4096..8192, 0..contents.len()] {
            prefetch(&mapped.bytes[range.clone()]);
            prefetch(&contents[range]);
        }
        assert_eq!(mapped.bytes[..], contents[..]);
    }

    /// Released pages read back the same bytes, through the map and
    /// through slices taken before the release.
    #[test]
    fn released_pages_read_back_unchanged() {
        let (_dir, contents, mapped) = mapped_file_of(5 * 4096 + 100);
        let held = mapped.bytes.slice(4000..9000);
        assert_eq!(mapped.bytes[..], contents[..]);
        let pages = mapped.pages.expect("a real map");
        pages.release(0..contents.len());
        pages.release(100..5000); // not a whole page: nothing to do
        pages.release(0..usize::MAX); // clamped to the map
        assert_eq!(mapped.bytes[..], contents[..]);
        assert_eq!(held[..], contents[4000..9000]);
    }
}
