//! Serving lookups and scans from a snapshot file through a memory map.
//!
//! Opening checks the footer, the CRC of the index and the bloom filter.
//! The index is read in place from the map (see [`super::index`]); its
//! structure is checked once, before the first read uses it, so that
//! opening a database does not walk every block of every file. A data
//! block is checked in full (CRC, entry order, the last key the index
//! names) the first time it is read, before anything in it is used; a
//! bitmap remembers which blocks passed, so later reads skip the CRC (a
//! third of a lookup's time otherwise) but still check every length
//! against the block. Any failure is an [`Error::Corruption`] naming the
//! file and the offset.

use std::ops::Range;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, OnceLock};

use bytes::Bytes;

use super::bloom;
use super::format::{
    BLOCK_ALIGN, BlockCursor, EntryRef, FOOTER_BYTES, Footer, FooterError, SNAPSHOT_FORMAT_VERSION,
    decode_block, decode_bloom, parse_block_into,
};
use super::index::BlockIndex;
use crate::error::{Error, Result};
use crate::io::FileSystem;
use crate::memtable::{FoundVersion, Version};
use crate::mmap::PageReleaser;

/// An open snapshot file.
pub(crate) struct SnapshotFile {
    number: u64,
    path: PathBuf,
    /// The whole file, mapped.
    data: Bytes,
    /// Drops pages of the map from the process once a merge has read past
    /// them (`None` when the bytes are not a map).
    pages: Option<PageReleaser>,
    /// Where each block lies and its last key, read in place: only through
    /// [`index`](Self::index), which checks it first.
    index: BlockIndex,
    index_offset: u64,
    /// The result of checking the index's structure, once, at the first
    /// read (see [`BlockIndex::check`]).
    index_checked: OnceLock<std::result::Result<(), String>>,
    /// Bit `i` is set once block `i` passed its full check.
    verified: Box<[AtomicU64]>,
    bloom_bits: Bytes,
    bloom_probes: u8,
    entry_count: u64,
    /// The keyspace every entry belongs to (from the footer).
    keyspace: u32,
    /// The file is a merge's output (from the footer).
    merged: bool,
    /// The largest sequence number of an entry, as the MANIFEST or the
    /// writer says; `u64::MAX` when not told.
    largest_seq: u64,
    /// The earliest expiry of a value in the file; 0: none expires.
    earliest_expiry: u64,
    /// Set once the manifest no longer names the file: it is deleted when
    /// the last reader lets go of it.
    obsolete: AtomicBool,
    fs: Arc<dyn FileSystem>,
}

impl std::fmt::Debug for SnapshotFile {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("SnapshotFile")
            .field("path", &self.path)
            .field("blocks", &self.index.len())
            .field("entries", &self.entry_count)
            .finish_non_exhaustive()
    }
}

/// A block's entries, decoded, with the block's bytes.
pub(super) struct Block {
    pub bytes: Bytes,
    pub entries: Vec<EntryRef>,
}

impl SnapshotFile {
    /// Maps and checks the file `path`.
    pub fn open(fs: Arc<dyn FileSystem>, path: &Path, number: u64) -> Result<SnapshotFile> {
        let mapped = fs.map(path).map_err(|e| Error::io("map", path, e))?;
        let mut file = SnapshotFile::from_bytes(fs, path, number, mapped.bytes)?;
        file.pages = mapped.pages;
        Ok(file)
    }

    /// Checks the file whose bytes are `data` (what [`open`](Self::open)
    /// mapped; the fuzzer passes arbitrary bytes).
    pub fn from_bytes(
        fs: Arc<dyn FileSystem>,
        path: &Path,
        number: u64,
        data: Bytes,
    ) -> Result<SnapshotFile> {
        let corrupt = |offset: u64, reason: String| Error::corruption(path, offset, reason);
        let footer_at = data.len().saturating_sub(FOOTER_BYTES) as u64;
        let footer = Footer::decode(&data).map_err(|error| match error {
            FooterError::Corrupt(reason) => corrupt(footer_at, reason),
            FooterError::UnsupportedVersion(found) => Error::UnsupportedFormatVersion {
                path: path.to_path_buf(),
                found,
                supported: SNAPSHOT_FORMAT_VERSION,
            },
        })?;
        // Footer::decode checked that index and bloom tile the file before the footer.
        let index_range = footer.index_offset as usize..footer.bloom_offset as usize;
        let bloom_range = footer.bloom_offset as usize..footer_at as usize;
        let index_section = data.slice(index_range);
        let index = match footer.version {
            1 => BlockIndex::open_version_1(&index_section),
            _ => BlockIndex::open(index_section),
        }
        .map_err(|reason| corrupt(footer.index_offset, reason))?;
        let bloom_section = data.slice(bloom_range);
        let (bloom_probes, bits) =
            decode_bloom(&bloom_section).map_err(|reason| corrupt(footer.bloom_offset, reason))?;
        let bloom_bits = bloom_section.slice(bits);
        let verified = (0..index.len().div_ceil(64))
            .map(|_| AtomicU64::new(0))
            .collect();
        Ok(SnapshotFile {
            number,
            path: path.to_path_buf(),
            data,
            pages: None,
            index,
            index_offset: footer.index_offset,
            index_checked: OnceLock::new(),
            verified,
            bloom_bits,
            bloom_probes,
            entry_count: footer.entry_count,
            keyspace: footer.keyspace,
            merged: footer.merged,
            largest_seq: u64::MAX,
            earliest_expiry: 0,
            obsolete: AtomicBool::new(false),
            fs,
        })
    }

    /// Whether the file is a merge's output.
    pub fn is_merge_output(&self) -> bool {
        self.merged
    }

    /// The file's number.
    pub fn number(&self) -> u64 {
        self.number
    }

    /// The keyspace the file holds.
    pub fn keyspace(&self) -> u32 {
        self.keyspace
    }

    /// The file, knowing that no entry's sequence number is above `seq`
    /// (what its MANIFEST entry, or its writer, says).
    pub fn with_largest_seq(mut self, seq: u64) -> SnapshotFile {
        self.largest_seq = seq;
        self
    }

    /// Records the earliest expiry of a value in the file (from its
    /// manifest entry or its writer; 0: none expires).
    pub fn with_earliest_expiry(mut self, micros: u64) -> SnapshotFile {
        self.earliest_expiry = micros;
        self
    }

    /// The earliest expiry of a value in the file (0: none expires).
    pub fn earliest_expiry(&self) -> u64 {
        self.earliest_expiry
    }

    /// No entry of the file has a sequence number above this.
    pub fn largest_seq(&self) -> u64 {
        self.largest_seq
    }

    /// The file's size in bytes.
    pub fn size(&self) -> u64 {
        self.data.len() as u64
    }

    /// Marks the file for deletion once no reader holds it.
    pub fn mark_obsolete(&self) {
        self.obsolete.store(true, Ordering::Release);
    }

    /// The number of data blocks.
    pub(super) fn block_count(&self) -> usize {
        self.index.len()
    }

    /// The block index, checked at the first call (an
    /// [`Error::Corruption`] at the index's offset if it fails, at this and
    /// every later call).
    fn index(&self) -> Result<&BlockIndex> {
        let checked = self
            .index_checked
            .get_or_init(|| self.index.check(self.index_offset));
        match checked {
            Ok(()) => Ok(&self.index),
            Err(reason) => Err(Error::corruption(
                &self.path,
                self.index_offset,
                reason.clone(),
            )),
        }
    }

    /// Checks the block index now rather than at the first read: a
    /// checkpoint or merge does, for the file it just wrote, so that a
    /// file that fails is never installed and readers of a new file do
    /// not pay for the check.
    pub(crate) fn check_index(&self) -> Result<()> {
        self.index().map(|_| ())
    }

    /// The last key of block `block`, as the index names it.
    pub(super) fn last_key(&self, block: usize) -> Result<&[u8]> {
        Ok(self.index()?.last_key(block))
    }

    /// The first block whose last key is at or after `key`.
    pub(super) fn first_block_from(&self, key: &[u8]) -> Result<usize> {
        Ok(self.index()?.search(key, |last_key| last_key < key))
    }

    /// The first block whose last key is after `key`.
    pub(super) fn first_block_after(&self, key: &[u8]) -> Result<usize> {
        Ok(self.index()?.search(key, |last_key| last_key <= key))
    }

    /// For the fuzzer: the first key (if any) at which the index search
    /// finds other blocks than a plain walk over the blocks' last keys,
    /// probing at the first 64 blocks' last keys, just past each, and the
    /// ends. `None` also if the index fails its check (nothing is
    /// searched then).
    pub(crate) fn index_search_disagreement(&self) -> Option<Vec<u8>> {
        let index = self.index().ok()?;
        let last_keys = || (0..index.len()).map(|i| index.last_key(i));
        let probes = last_keys()
            .take(64)
            .flat_map(|key| [key.to_vec(), [key, b"\0"].concat()])
            .chain([Vec::new(), b"\xff".to_vec()]);
        probes.into_iter().find(|probe| {
            let from = last_keys().take_while(|last| *last < &probe[..]).count();
            let after = last_keys().take_while(|last| *last <= &probe[..]).count();
            self.first_block_from(probe).ok() != Some(from)
                || self.first_block_after(probe).ok() != Some(after)
        })
    }

    /// The bytes of block `i`, fully checked the first time it is read.
    pub(super) fn block_bytes(&self, i: usize) -> Result<Bytes> {
        let block = self.index()?.location(i);
        // BlockIndex::check made sure every block lies inside the data.
        let start = block.offset as usize;
        let bytes = self.data.slice(start..start + block.len as usize);
        let (word, bit) = (i / 64, 1u64 << (i % 64));
        if self.verified[word].load(Ordering::Relaxed) & bit == 0 {
            self.check_block(i, &bytes)?;
            self.verified[word].fetch_or(bit, Ordering::Relaxed);
        }
        Ok(bytes)
    }

    /// Checks the whole file again, every block included, whatever earlier
    /// reads checked: the damage found, with offsets (`Db::verify`).
    /// Returns how many blocks it read, and the damage.
    pub(crate) fn verify(&self) -> (u64, Vec<Error>) {
        if let Err(error) = self.check_index() {
            return (0, vec![error]);
        }
        let mut damage = Vec::new();
        let count = self.block_count();
        for i in 0..count {
            let block = self.index.location(i);
            let start = block.offset as usize;
            let bytes = self.data.slice(start..start + block.len as usize);
            if let Err(error) = self.check_block(i, &bytes) {
                damage.push(error);
            }
        }
        (count as u64, damage)
    }

    /// The full check of block `i`: CRC, entries, and the last key the
    /// index names (a mismatch is damage that both CRCs missed, or a file
    /// put together wrongly).
    fn check_block(&self, i: usize, bytes: &[u8]) -> Result<()> {
        let entries = decode_block(bytes).map_err(self.damaged_block(i))?;
        let last = entries.last().map(|e| &bytes[e.key()]);
        if entries.is_empty() || last != Some(self.last_key(i)?) {
            return Err(self.damaged_block(i)(
                "block does not end with the key the index names".into(),
            ));
        }
        Ok(())
    }

    /// Turns a decoder's reason into the corruption error of block `i`
    /// (the block's offset comes from its index record, checked or not:
    /// it only names the place).
    pub(super) fn damaged_block(&self, i: usize) -> impl Fn(String) -> Error + Copy + '_ {
        move |reason| Error::corruption(&self.path, self.index.location(i).offset, reason)
    }

    /// Loads block `i` with its entries decoded.
    pub(super) fn block(&self, i: usize) -> Result<Block> {
        let mut entries = Vec::new();
        let bytes = self.block_into(i, &mut entries)?;
        Ok(Block { bytes, entries })
    }

    /// Loads block `i`, decoding its entries into `entries` (replacing what
    /// it held; unspecified on error).
    pub(super) fn block_into(&self, i: usize, entries: &mut Vec<EntryRef>) -> Result<Bytes> {
        let bytes = self.block_bytes(i)?;
        parse_block_into(&bytes, entries).map_err(self.damaged_block(i))?;
        Ok(bytes)
    }

    /// Where in the file's bytes the part of block `i` worth prefetching
    /// lies (see [`block_head`]); an empty range if there is no such block
    /// or the index is damaged.
    pub(super) fn block_head_span(&self, i: usize) -> Range<usize> {
        let Ok(index) = self.index() else {
            return 0..0;
        };
        if i >= index.len() {
            return 0..0;
        }
        let block = index.location(i);
        let start = block.offset as usize;
        start..start + block_head_len(block.len as usize)
    }

    /// Starts loading `span` of the file's bytes into the processor's
    /// caches (see [`prefetch`](crate::mmap::prefetch)); nothing for a
    /// span outside the file.
    pub(super) fn prefetch_span(&self, span: Range<usize>) {
        if let Some(bytes) = self.data.get(span) {
            crate::mmap::prefetch(bytes);
        }
    }

    /// The newest version of `key` (whose [`bloom::key_hash`] is
    /// `key_hash`) at or below `seq`: `None` if the file has none.
    /// Whether the file's bloom filter lets the key through (a `false`
    /// is certain: the file does not hold the key).
    #[inline]
    pub fn may_contain(&self, key_hash: u64) -> bool {
        bloom::may_contain(&self.bloom_bits, self.bloom_probes, key_hash)
    }

    pub fn get(&self, key: &[u8], key_hash: u64, seq: u64) -> Result<Option<FoundVersion>> {
        if !self.may_contain(key_hash) {
            return Ok(None);
        }
        self.get_past_filter(key, seq)
    }

    /// [`get`](Self::get) for a key the filter let through.
    pub fn get_past_filter(&self, key: &[u8], seq: u64) -> Result<Option<FoundVersion>> {
        // A key's versions may continue into the next block.
        for i in self.first_block_from(key)?..self.index.len() {
            let bytes = self.block_bytes(i)?;
            // The walk below finds each entry from the one before it, so
            // the block's cache-line misses would come one after another;
            // asking for its lines first (up to a page, see `block_head`)
            // lets them overlap (measured: about 20% more random reads per
            // second after a fill of 1M keys).
            crate::mmap::prefetch(block_head(&bytes));
            let corrupt = self.damaged_block(i);
            let mut cursor = BlockCursor::new(&bytes).map_err(corrupt)?;
            // Entries are sorted (checked with the CRC): walk to the first
            // version of `key` visible at `seq`, or stop past the key.
            while let Some(entry) = cursor.next_entry().map_err(corrupt)? {
                match bytes[entry.key()].cmp(key) {
                    std::cmp::Ordering::Less => continue,
                    std::cmp::Ordering::Greater => return Ok(None),
                    std::cmp::Ordering::Equal if entry.seq <= seq => {
                        return Ok(Some(FoundVersion {
                            seq: entry.seq,
                            value: entry.value().map(|range| bytes.slice(range)),
                            expires: entry.expires(&bytes),
                        }));
                    }
                    std::cmp::Ordering::Equal => {}
                }
            }
        }
        Ok(None)
    }

    /// Every version in the file, in file order (for merging).
    pub fn versions(self: &Arc<Self>) -> FileVersions {
        FileVersions {
            file: self.clone(),
            next_block: 0,
            current: None,
            released_up_to: 0,
        }
    }
}

/// The part of a block worth prefetching: all of it, up to one page. Only
/// a block that holds a single large entry is longer, and its value is
/// handed out in place, not read, so a read must not pull megabytes of it
/// into the cache.
fn block_head(block: &[u8]) -> &[u8] {
    &block[..block_head_len(block.len())]
}

/// How many bytes of a block of `len` bytes [`block_head`] takes.
fn block_head_len(len: usize) -> usize {
    len.min(BLOCK_ALIGN)
}

impl Drop for SnapshotFile {
    fn drop(&mut self) {
        if self.obsolete.load(Ordering::Acquire) {
            // Best effort: a file that survives (crash, I/O error) is not in
            // the manifest and is removed at the next open.
            let _ = self.fs.remove_file(&self.path);
        }
    }
}

/// Iterates over every version of a file, block by block.
pub(crate) struct FileVersions {
    file: Arc<SnapshotFile>,
    next_block: usize,
    current: Option<(Block, usize)>,
    /// The file offset below which this pass released the map's pages.
    released_up_to: usize,
}

/// How far a pass over a file reads past the pages it last released
/// before releasing again: a merge reading files of any size keeps at most
/// about this much of each input in the process's memory.
const RELEASE_STEP_BYTES: usize = 1 << 20;

impl Iterator for FileVersions {
    type Item = Result<Version>;

    fn next(&mut self) -> Option<Result<Version>> {
        loop {
            if let Some((block, position)) = &mut self.current {
                if let Some(entry) = block.entries.get(*position) {
                    *position += 1;
                    return Some(Ok(Version {
                        key: block.bytes.slice(entry.key()),
                        seq: entry.seq,
                        value: entry.value().map(|r| block.bytes.slice(r)),
                        expires: entry.expires(&block.bytes),
                    }));
                }
            }
            if self.next_block >= self.file.index.len() {
                return None;
            }
            let offset = match self.file.index() {
                Ok(index) => index.location(self.next_block).offset as usize,
                Err(error) => {
                    self.next_block = self.file.index.len();
                    return Some(Err(error));
                }
            };
            if let Some(pages) = &self.file.pages {
                if offset - self.released_up_to.min(offset) >= RELEASE_STEP_BYTES {
                    pages.release(self.released_up_to..offset);
                    self.released_up_to = offset;
                }
            }
            match self.file.block(self.next_block) {
                Ok(block) => self.current = Some((block, 0)),
                Err(error) => {
                    self.next_block = self.file.index.len();
                    return Some(Err(error));
                }
            }
            self.next_block += 1;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::RealFileSystem;
    use crate::memtable::Direction;
    use crate::snapshot_file::{FileCursor, SnapshotFileWriter};
    use std::ops::Bound;

    /// A file where key "m" has 200 versions (seq 1..=200, 100-byte values),
    /// so they span several blocks, between keys "a" (seq 500) and "z" (seq 501).
    fn spanning_file(dir: &Path) -> Arc<SnapshotFile> {
        let fs: Arc<dyn FileSystem> = Arc::new(RealFileSystem);
        let path = dir.join("1.snap");
        let mut writer = SnapshotFileWriter::create(&*fs, dir, path.clone()).unwrap();
        writer.add(b"a", 500, Some(b"first"), 0).unwrap();
        for seq in (1..=200u64).rev() {
            let value = if seq % 50 == 0 {
                None
            } else {
                Some(vec![seq as u8; 100])
            };
            writer.add(b"m", seq, value.as_deref(), 0).unwrap();
        }
        writer.add(b"z", 501, Some(b"last"), 0).unwrap();
        writer.finish().unwrap();
        Arc::new(SnapshotFile::open(fs, &path, 1).unwrap())
    }

    fn scan(
        file: &Arc<SnapshotFile>,
        seq: u64,
        direction: Direction,
        lower: Bound<&[u8]>,
        upper: Bound<&[u8]>,
    ) -> Vec<(Vec<u8>, u64)> {
        let own = |bound: Bound<&[u8]>| bound.map(Bytes::copy_from_slice);
        let mut cursor = FileCursor::new(file.clone(), seq, direction, own(lower), own(upper));
        let mut out = Vec::new();
        loop {
            cursor.fill().unwrap();
            let Some((key, seq)) = cursor.head() else {
                return out;
            };
            out.push((key.to_vec(), seq));
            cursor.skip();
        }
    }

    #[test]
    fn a_file_written_in_several_chunks_reads_back_whole() {
        // About 3.5 MB: the writer gathers blocks a megabyte at a time, so
        // this file takes several writes, each at its own offset.
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn FileSystem> = Arc::new(RealFileSystem);
        let path = dir.path().join("1.snap");
        let mut writer = SnapshotFileWriter::create(&*fs, dir.path(), path.clone()).unwrap();
        let value = |i: u32| vec![(i % 251) as u8; 100 + (i % 7) as usize];
        let count = 30_000u32;
        for i in 0..count {
            writer
                .add(&i.to_be_bytes(), u64::from(i) + 1, Some(&value(i)), 0)
                .unwrap();
        }
        writer.finish().unwrap();
        assert!(std::fs::metadata(&path).unwrap().len() > 3 << 20);
        let file = Arc::new(SnapshotFile::open(fs, &path, 1).unwrap());
        for i in (0..count).step_by(97).chain([count - 1]) {
            let key = i.to_be_bytes();
            let got = file.get(&key, bloom::key_hash(&key), u64::MAX).unwrap();
            let got = got.and_then(|found| found.value);
            assert_eq!(got.as_deref(), Some(&value(i)[..]), "key {i}");
        }
        let all = scan(
            &file,
            u64::MAX,
            Direction::Forward,
            Bound::Unbounded,
            Bound::Unbounded,
        );
        assert_eq!(all.len(), count as usize);
        assert!(
            all.iter()
                .zip(0u32..)
                .all(|((key, _), i)| key[..] == i.to_be_bytes())
        );
    }

    /// What a reverse scan prefetches of each block: the block's own
    /// bytes, up to a page, never a large value's rest, never past the
    /// file.
    #[test]
    fn block_head_spans_are_each_block_up_to_a_page() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn FileSystem> = Arc::new(RealFileSystem);
        let path = dir.path().join("1.snap");
        let mut writer = SnapshotFileWriter::create(&*fs, dir.path(), path.clone()).unwrap();
        for i in 0..200u32 {
            // Key 100 holds a value of five pages, a block of its own.
            let value = vec![i as u8; if i == 100 { 5 * BLOCK_ALIGN } else { 100 }];
            writer
                .add(&i.to_be_bytes(), u64::from(i) + 1, Some(&value), 0)
                .unwrap();
        }
        writer.finish().unwrap();
        let file = SnapshotFile::open(fs, &path, 1).unwrap();
        let mut long_blocks = 0;
        for i in 0..file.block_count() {
            let block = file.block_bytes(i).unwrap();
            let start = block.as_ptr() as usize - file.data.as_ptr() as usize;
            let span = file.block_head_span(i);
            assert_eq!(
                span,
                start..start + block.len().min(BLOCK_ALIGN),
                "block {i}"
            );
            long_blocks += usize::from(block.len() > BLOCK_ALIGN);
        }
        assert_eq!(long_blocks, 1);
        assert_eq!(file.block_head_span(file.block_count()), 0..0);
    }

    #[test]
    fn versions_spanning_blocks_resolve_in_both_directions() {
        let dir = tempfile::tempdir().unwrap();
        let file = spanning_file(dir.path());
        assert!(file.index.len() >= 4, "versions should span blocks");
        for seq in [1, 49, 50, 51, 120, 199, 200, 600] {
            let visible = seq.min(200);
            let expected_m = if visible % 50 == 0 {
                None
            } else {
                Some(vec![visible as u8; 100])
            };
            let got = file
                .get(b"m", bloom::key_hash(b"m"), seq)
                .unwrap()
                .expect("m has a version");
            assert_eq!(got.value.as_deref(), expected_m.as_deref(), "get at {seq}");
            let mut expected = Vec::new();
            if seq >= 500 {
                expected.push((b"a".to_vec(), 500));
            }
            expected.push((b"m".to_vec(), visible));
            if seq >= 501 {
                expected.push((b"z".to_vec(), 501));
            }
            assert_eq!(
                scan(
                    &file,
                    seq,
                    Direction::Forward,
                    Bound::Unbounded,
                    Bound::Unbounded
                ),
                expected
            );
            let mut backward = scan(
                &file,
                seq,
                Direction::Backward,
                Bound::Unbounded,
                Bound::Unbounded,
            );
            backward.reverse();
            assert_eq!(backward, expected, "backward at {seq}");
            // Bounds that land on the spanning key.
            let m = &b"m"[..];
            assert_eq!(
                scan(
                    &file,
                    seq,
                    Direction::Backward,
                    Bound::Unbounded,
                    Bound::Included(m)
                )
                .first(),
                Some(&(b"m".to_vec(), visible))
            );
            assert_eq!(
                scan(
                    &file,
                    seq,
                    Direction::Forward,
                    Bound::Included(m),
                    Bound::Unbounded
                )
                .first(),
                Some(&(b"m".to_vec(), visible))
            );
            assert!(
                scan(
                    &file,
                    seq,
                    Direction::Forward,
                    Bound::Excluded(m),
                    Bound::Excluded(b"z")
                )
                .is_empty()
            );
        }
        assert_eq!(file.get(b"b", bloom::key_hash(b"b"), 1000).unwrap(), None);
        assert_eq!(file.versions().count(), 202);
    }

    /// Sorted keys: `short` short ones, `tenant` that share their first 16
    /// bytes and differ after them, and `last` short ones sorting last.
    fn keys_with_shared_prefixes(short: u32, tenant: u32, last: u32) -> Vec<Vec<u8>> {
        let mut keys: Vec<Vec<u8>> = (0..short)
            .map(|i| format!("short{i:02}").into_bytes())
            .collect();
        keys.extend((0..tenant).map(|i| format!("tenant/0001/user{i:05}").into_bytes()));
        keys.extend((0..last).map(|i| format!("zz{i:02}").into_bytes()));
        keys.sort();
        keys
    }

    /// The index search on key prefixes finds the same blocks as a search
    /// on whole keys, where many blocks' last keys share their first 16
    /// bytes, for keys in the file, between its keys and outside them.
    #[test]
    fn index_search_agrees_with_whole_keys_when_prefixes_tie() {
        let dir = tempfile::tempdir().unwrap();
        let fs: Arc<dyn FileSystem> = Arc::new(RealFileSystem);
        let path = dir.path().join("1.snap");
        let mut writer = SnapshotFileWriter::create(&*fs, dir.path(), path.clone()).unwrap();
        let keys = keys_with_shared_prefixes(40, 400, 40);
        for key in &keys {
            writer.add(key, 1, Some(&[9u8; 200]), 0).unwrap();
        }
        writer.finish().unwrap();
        let file = SnapshotFile::open(fs, &path, 1).unwrap();
        let head = |i: usize| crate::memtable::key_head(file.last_key(i).unwrap());
        let tied = (1..file.block_count())
            .filter(|&i| head(i - 1) == head(i))
            .count();
        assert!(tied >= 10, "{tied} blocks share a prefix with the next");
        let mut probes = keys.clone();
        probes.extend(keys.iter().map(|key| [&key[..], b"!"].concat()));
        probes.extend([
            b"".to_vec(),
            b"tenant/0001/user".to_vec(),
            b"tenant/0001/user~".to_vec(),
            b"~".to_vec(),
        ]);
        for probe in &probes {
            let last_keys = || (0..file.block_count()).map(|i| file.last_key(i).unwrap());
            let from = last_keys().take_while(|last| *last < &probe[..]).count();
            let after = last_keys().take_while(|last| *last <= &probe[..]).count();
            assert_eq!(
                file.first_block_from(probe).unwrap(),
                from,
                "from {probe:?}"
            );
            assert_eq!(
                file.first_block_after(probe).unwrap(),
                after,
                "after {probe:?}"
            );
        }
    }

    /// What `tests/data/snapshot-v1.snap` holds: it was written by the
    /// version 1 writer (commit 0956f07) from exactly these versions, in
    /// this order. 170 keys, some sharing their first 16 bytes, each with
    /// a value and every seventh with a newer removal.
    fn version_1_fixture_versions() -> Vec<(Vec<u8>, u64, Option<Vec<u8>>)> {
        let mut out = Vec::new();
        for (i, key) in (0u64..).zip(keys_with_shared_prefixes(30, 120, 20)) {
            if i % 7 == 0 {
                out.push((key.clone(), 2 * i + 3, None));
            }
            let value = vec![(i % 251) as u8; 100 + (i % 90) as usize];
            out.push((key, 2 * i + 2, Some(value)));
        }
        out
    }

    /// A file written in format version 1 (whose index has another layout)
    /// still opens, and every read finds what was written.
    #[test]
    fn a_version_1_file_reads_back_everything() {
        let bytes = include_bytes!("../../tests/data/snapshot-v1.snap");
        let footer = Footer::decode(bytes).unwrap();
        assert_eq!(footer.version, 1);
        let file = Arc::new(
            SnapshotFile::from_bytes(
                Arc::new(RealFileSystem),
                Path::new("snapshot-v1.snap"),
                1,
                Bytes::from_static(bytes),
            )
            .unwrap(),
        );
        let expected = version_1_fixture_versions();
        assert!(file.block_count() >= 5, "{} blocks", file.block_count());
        let all: Vec<_> = file
            .versions()
            .map(|version| {
                let version = version.unwrap();
                let value = version.value.map(|value| value.to_vec());
                (version.key.to_vec(), version.seq, value)
            })
            .collect();
        assert_eq!(all, expected);
        for (key, seq, value) in &expected {
            let got = file.get(key, bloom::key_hash(key), *seq).unwrap();
            assert_eq!(
                got.map(|found| (found.seq, found.value.map(|v| v.to_vec()))),
                Some((*seq, value.clone()))
            );
            // Below a key's oldest version, the file has nothing for it.
            let oldest = expected.iter().filter(|v| v.0 == *key).map(|v| v.1).min();
            if Some(*seq) == oldest {
                assert_eq!(file.get(key, bloom::key_hash(key), seq - 1).unwrap(), None);
            }
        }
        let newest: Vec<(Vec<u8>, u64)> = expected
            .iter()
            .filter(|(key, seq, _)| expected.iter().all(|v| v.0 != *key || v.1 <= *seq))
            .map(|(key, seq, _)| (key.clone(), *seq))
            .collect();
        let forward = scan(
            &file,
            u64::MAX,
            Direction::Forward,
            Bound::Unbounded,
            Bound::Unbounded,
        );
        assert_eq!(forward, newest);
        let mut backward = scan(
            &file,
            u64::MAX,
            Direction::Backward,
            Bound::Unbounded,
            Bound::Unbounded,
        );
        backward.reverse();
        assert_eq!(backward, newest);
    }

    /// A file whose index has a valid CRC but keys out of order (what a
    /// writer's bug would leave) opens, since opening checks only the
    /// index's CRC; then every read of it, however it starts, fails with
    /// the corruption, every time, and none returns data.
    #[test]
    fn an_index_that_fails_its_check_fails_every_read() {
        let dir = tempfile::tempdir().unwrap();
        let good = spanning_file(dir.path());
        let blocks: Vec<(u64, u32, Vec<u8>)> = (0..good.block_count())
            .map(|i| {
                let location = good.index.location(i);
                (
                    location.offset,
                    location.len,
                    good.last_key(i).unwrap().to_vec(),
                )
            })
            .collect();
        let mut swapped = blocks.clone();
        swapped[0].2 = b"n".to_vec(); // after block 1's "m"
        let data = &good.data[..good.index_offset as usize];
        let index = super::super::index::encode_index(&swapped);
        let bloom_section =
            &good.data[footer_of(&good).bloom_offset as usize..good.data.len() - FOOTER_BYTES];
        let footer = Footer {
            version: SNAPSHOT_FORMAT_VERSION,
            index_offset: good.index_offset,
            index_len: index.len() as u64,
            bloom_offset: good.index_offset + index.len() as u64,
            bloom_len: bloom_section.len() as u64,
            entry_count: footer_of(&good).entry_count,
            keyspace: 0,
            merged: false,
        };
        let bytes = [data, &index, bloom_section, &footer.encode()].concat();
        let path = dir.path().join("2.snap");
        let file = Arc::new(
            SnapshotFile::from_bytes(Arc::new(RealFileSystem), &path, 2, Bytes::from(bytes))
                .unwrap(),
        );
        let is_index_corruption = |error: Error| {
            matches!(&error, Error::Corruption { path: p, offset, .. }
                if *p == path && *offset == good.index_offset)
        };
        for _ in 0..2 {
            assert!(is_index_corruption(
                file.get(b"m", bloom::key_hash(b"m"), 600).unwrap_err()
            ));
            let mut versions = file.versions();
            assert!(is_index_corruption(versions.next().unwrap().unwrap_err()));
            assert!(versions.next().is_none());
            for direction in [Direction::Forward, Direction::Backward] {
                for bound in [Bound::Unbounded, Bound::Included(Bytes::from_static(b"m"))] {
                    let mut cursor =
                        FileCursor::new(file.clone(), 600, direction, bound.clone(), bound.clone());
                    assert!(is_index_corruption(cursor.fill().unwrap_err()));
                    assert!(is_index_corruption(cursor.fill().unwrap_err()));
                    assert_eq!(cursor.head(), None);
                }
            }
            // Nothing to prefetch, and no panic, when the index is damaged.
            assert_eq!(file.block_head_span(0), 0..0);
            file.prefetch_span(file.block_head_span(0));
        }
    }

    fn footer_of(file: &SnapshotFile) -> Footer {
        Footer::decode(&file.data).unwrap()
    }

    /// A file from a newer format version is refused as such, not as
    /// corruption.
    #[test]
    fn a_file_of_a_newer_format_version_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let good = spanning_file(dir.path());
        let mut bytes = good.data.to_vec();
        let footer = Footer {
            version: SNAPSHOT_FORMAT_VERSION + 1,
            ..footer_of(&good)
        };
        let at = bytes.len() - FOOTER_BYTES;
        bytes[at..].copy_from_slice(&footer.encode());
        let path = dir.path().join("3.snap");
        match SnapshotFile::from_bytes(Arc::new(RealFileSystem), &path, 3, Bytes::from(bytes)) {
            Err(Error::UnsupportedFormatVersion {
                path: p,
                found,
                supported,
            }) => {
                assert_eq!((p, found, supported), (path, 5, 4));
            }
            other => panic!("expected UnsupportedFormatVersion, got {other:?}"),
        }
    }
}
