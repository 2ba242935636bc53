//! Reading one snapshot file in key order, one visible key at a time, in
//! place in its mapped blocks: what a merged scan (`read::Iter`) takes from
//! each file.
//!
//! A file holds every version of a key, newest first. At snapshot `seq`, a
//! key's visible version is its newest at or below `seq`; a key with none
//! is not there for this reader. The cursor keeps that version as its
//! *head*: the merge compares heads in place, and only the head it takes
//! is turned into an owned key and value.

use std::ops::{Bound, Range};
use std::sync::Arc;

use bytes::Bytes;

use super::format::{BlockCursor, BlockPosition, EntryRef};
use super::reader::SnapshotFile;
use crate::error::Result;
use crate::memtable::{Direction, as_ref_bound, is_expired, within_lower, within_upper};
use crate::slice::Slice;

/// A walk over one file's visible keys, within bounds, in one direction.
///
/// [`fill`](Self::fill) finds the next head; [`head`](Self::head) shows it;
/// [`take_value`](Self::take_value) (a value) or [`skip`](Self::skip) (a
/// value or a removal) lets it go. A `fill` that meets a damaged block
/// fails, and fails again if called again: the walk does not go past the
/// damage.
pub(crate) struct FileCursor {
    file: Arc<SnapshotFile>,
    seq: u64,
    /// The reader's time (microseconds since the Unix epoch): a value that
    /// expired by then reads as a removal.
    time: u64,
    lower: Bound<Bytes>,
    upper: Bound<Bytes>,
    walk: Walk,
    /// The block to load next; `None` once the walk is past the last one.
    next_block: Option<usize>,
    /// Whether every key of the current block is within the bound the walk
    /// goes towards (the index tells, from the block's last key or the
    /// previous block's), so that its keys need no compare with it.
    block_within_end: bool,
    /// Whether a key was within the bound the walk started from: keys come
    /// in order, so every later one is too.
    past_start: bool,
    /// The newest visible version of the next key, found by `fill`: a
    /// place in `head_block`.
    head: Option<EntryRef>,
    /// The block the head lies in, and its index. It changes only when a
    /// head comes from another block, so a head takes no reference count
    /// of its own: a key's only one is the value's, taken by `take_value`.
    head_block: Option<(usize, Bytes)>,
    /// No key is left in the bounds.
    exhausted: bool,
}

/// Where the walk stands in its current block.
enum Walk {
    /// Forward, in place: each entry is decoded as it is read.
    Forward {
        /// The block's index and bytes, and the next entry's place in it.
        block: Option<(usize, Bytes, BlockPosition)>,
        /// The key of the entry read last, as a range of the block (`None`
        /// at a block's start, where the index names the previous block's
        /// last key): a key's versions are told apart from the next key's
        /// by comparing with it, without copying keys.
        previous: Option<Range<usize>>,
        /// Whether the key read last is settled: its head was found, so its
        /// older versions are skipped.
        settled: bool,
    },
    /// Backward: a block's entries are decoded into a list and read from
    /// its end (the format can only be decoded front to back).
    Backward {
        /// The block's index and bytes.
        block: Option<(usize, Bytes)>,
        /// The block's entries; one list, reused from block to block.
        entries: Vec<EntryRef>,
        /// `entries[next - 1]` is read next.
        next: usize,
        /// The block the walk reads next, and the part of its first page
        /// not yet asked for (see [`PREFETCH_PER_ENTRY`]).
        ahead: Option<(usize, Range<usize>)>,
    },
}

/// Makes `entry` of block `index` the head (`FileCursor::head` and
/// `head_block`), taking a handle on the block only if it is a new one.
fn place_head(
    head: &mut Option<EntryRef>,
    head_block: &mut Option<(usize, Bytes)>,
    index: usize,
    bytes: &Bytes,
    entry: EntryRef,
) {
    if head_block.as_ref().is_none_or(|(held, _)| *held != index) {
        *head_block = Some((index, bytes.clone()));
    }
    *head = Some(entry);
}

impl FileCursor {
    /// A cursor over `file` at snapshot `seq`, within the bounds; nothing is
    /// read before the first [`fill`](Self::fill).
    pub fn new(
        file: Arc<SnapshotFile>,
        seq: u64,
        direction: Direction,
        lower: Bound<Bytes>,
        upper: Bound<Bytes>,
    ) -> FileCursor {
        let count = file.block_count();
        // An index that fails its check fails the first `fill` (every
        // block read checks it), and every later one: where the walk would
        // have started does not matter then.
        let (walk, next_block, past_start) = match direction {
            Direction::Forward => {
                let first = match as_ref_bound(&lower) {
                    Bound::Included(key) | Bound::Excluded(key) => {
                        file.first_block_from(key).unwrap_or(0)
                    }
                    Bound::Unbounded => 0,
                };
                let walk = Walk::Forward {
                    block: None,
                    previous: None,
                    settled: false,
                };
                (walk, first, matches!(lower, Bound::Unbounded))
            }
            Direction::Backward => {
                // The first block whose last key is past the bound: versions
                // of the bound key itself may continue into it.
                let first = match as_ref_bound(&upper) {
                    Bound::Included(key) | Bound::Excluded(key) => {
                        file.first_block_after(key).unwrap_or(count)
                    }
                    Bound::Unbounded => count,
                };
                let walk = Walk::Backward {
                    block: None,
                    entries: Vec::new(),
                    next: 0,
                    ahead: None,
                };
                let first = first.min(count.saturating_sub(1));
                (walk, first, matches!(upper, Bound::Unbounded))
            }
        };
        FileCursor {
            file,
            seq,
            time: 0,
            lower,
            upper,
            walk,
            next_block: (next_block < count).then_some(next_block),
            block_within_end: false,
            past_start,
            head: None,
            head_block: None,
            exhausted: false,
        }
    }

    /// Makes values that expired at or before `time` read as removals.
    pub fn at_time(mut self, time: u64) -> FileCursor {
        self.time = time;
        self
    }

    /// The head's key and sequence number, if `fill` found one.
    #[inline]
    pub fn head(&self) -> Option<(&[u8], u64)> {
        let entry = self.head.as_ref()?;
        let (_, bytes) = self.head_block.as_ref()?;
        Some((bytes.get(entry.key())?, entry.seq))
    }

    /// When the head's value expires (0: never, or a removal).
    #[inline]
    pub fn head_expires(&self) -> u64 {
        match (&self.head, &self.head_block) {
            (Some(entry), Some((_, bytes))) => entry.expires(bytes),
            _ => 0,
        }
    }

    /// Whether the head is a removal, or a value expired at the cursor's
    /// time.
    #[inline]
    pub fn head_is_removal(&self) -> bool {
        match (&self.head, &self.head_block) {
            (Some(entry), Some((_, bytes))) => self.is_gone(entry, bytes),
            (Some(entry), None) => entry.is_removal(),
            (None, _) => false,
        }
    }

    #[inline]
    fn is_gone(&self, entry: &EntryRef, bytes: &[u8]) -> bool {
        entry.is_removal() || is_expired(entry.expires(bytes), self.time)
    }

    /// Takes the head as an owned key and value; `None`, and the head
    /// stays, if there is none or it is a removal (or expired).
    ///
    /// Always inlined: with a second caller (`RunCursor`) the compiler
    /// stopped inlining it into the scan's loop, and a full scan of four
    /// files fell from 21.7M to 18M keys per second.
    #[inline(always)]
    pub fn take_value(&mut self) -> Option<(Slice, Slice)> {
        let (_, bytes) = self.head_block.as_ref()?;
        if self
            .head
            .as_ref()
            .is_some_and(|entry| self.is_gone(entry, bytes))
        {
            return None;
        }
        let entry = self.head.take()?;
        let key = Slice::from_part(bytes, entry.key());
        let value = Slice::from_part(bytes, entry.value()?);
        Some((key, value))
    }

    /// Drops the head (an older version than another source's).
    #[inline]
    pub fn skip(&mut self) {
        self.head = None;
    }

    /// Finds the next head, unless there is one or the walk is over.
    pub fn fill(&mut self) -> Result<()> {
        if self.head.is_some() || self.exhausted {
            return Ok(());
        }
        match self.walk {
            Walk::Forward { .. } => self.fill_forward(),
            Walk::Backward { .. } => self.fill_backward(),
        }
    }

    /// Forward, a key's versions come newest first: its head is the first
    /// version at or below `seq`, and the versions after it are skipped.
    fn fill_forward(&mut self) -> Result<()> {
        loop {
            let Walk::Forward {
                block: Some((index, bytes, position)),
                previous,
                settled,
            } = &mut self.walk
            else {
                if !self.load_next_block()? {
                    self.exhausted = true;
                    return Ok(());
                }
                continue;
            };
            let corrupt = self.file.damaged_block(*index);
            let mut reader = BlockCursor::resume(bytes, *position);
            while let Some(entry) = reader.next_entry().map_err(corrupt)? {
                let key = &bytes[entry.key()];
                let previous_key = match previous.take() {
                    Some(range) => Some(&bytes[range]),
                    None => index
                        .checked_sub(1)
                        .map(|i| self.file.last_key(i))
                        .transpose()?,
                };
                if !previous_key.is_some_and(|previous| same_key(previous, key)) {
                    *settled = false;
                }
                *previous = Some(entry.key());
                if !self.past_start {
                    if !within_lower(key, as_ref_bound(&self.lower)) {
                        continue;
                    }
                    self.past_start = true;
                }
                if !self.block_within_end && !within_upper(key, as_ref_bound(&self.upper)) {
                    self.exhausted = true;
                    return Ok(());
                }
                if *settled || entry.seq > self.seq {
                    continue;
                }
                *settled = true;
                *position = reader.position();
                place_head(&mut self.head, &mut self.head_block, *index, bytes, entry);
                return Ok(());
            }
            // The block is used up.
            if let Walk::Forward { block, .. } = &mut self.walk {
                *block = None;
            }
        }
    }

    /// Backward, a key's versions come oldest first: its head is the last
    /// version at or below `seq` before the key's first entry (the one
    /// after an entry of another key), and a key may continue into the
    /// previous block.
    ///
    /// Within a block, the best version so far is a position in the block's
    /// entry list; only when the walk leaves a block in the middle of a key
    /// is it given a handle on the block.
    fn fill_backward(&mut self) -> Result<()> {
        let mut best_at: Option<usize> = None;
        let mut best_left_behind: Option<(usize, Bytes, EntryRef)> = None;
        loop {
            let Walk::Backward {
                block: Some((index, bytes)),
                entries,
                next,
                ahead,
            } = &mut self.walk
            else {
                if !self.load_next_block()? {
                    break;
                }
                continue;
            };
            let Some(at) = next.checked_sub(1) else {
                // The block is used up in the middle of a key; the best
                // version so far must outlive the block.
                if let Some(entry) = best_at.take().and_then(|i| entries.get(i)) {
                    best_left_behind = Some((*index, bytes.clone(), entry.clone()));
                }
                if let Walk::Backward { block, .. } = &mut self.walk {
                    *block = None;
                }
                continue;
            };
            let Some(entry) = entries.get(at) else {
                break;
            };
            let key = &bytes[entry.key()];
            if !self.past_start {
                if !within_upper(key, as_ref_bound(&self.upper)) {
                    *next = at;
                    continue;
                }
                self.past_start = true;
            }
            if !self.block_within_end && !within_lower(key, as_ref_bound(&self.lower)) {
                break;
            }
            if entry.seq <= self.seq {
                // Newer than any version kept so far.
                best_at = Some(at);
            }
            *next = at;
            if let Some((_, rest)) = ahead.as_mut().filter(|(_, rest)| !rest.is_empty()) {
                let end = rest.end.min(rest.start + PREFETCH_PER_ENTRY);
                self.file.prefetch_span(rest.start..end);
                rest.start = end;
            }
            if best_at.is_some() || best_left_behind.is_some() {
                // The entry before this one, or the previous block's last
                // (which the index names), tells whether the key's versions
                // are all read.
                let before = match at.checked_sub(1) {
                    Some(before) => entries.get(before).map(|entry| &bytes[entry.key()]),
                    None => index
                        .checked_sub(1)
                        .map(|i| self.file.last_key(i))
                        .transpose()?,
                };
                if !before.is_some_and(|before| same_key(before, key)) {
                    break;
                }
            }
        }
        // The head: the best version in the current block, or the one kept
        // from a block the walk has left.
        let in_block = match (&self.walk, best_at) {
            (
                Walk::Backward {
                    block: Some((index, bytes)),
                    entries,
                    ..
                },
                Some(i),
            ) => entries.get(i).map(|entry| (*index, bytes, entry)),
            _ => None,
        };
        let left_behind = best_left_behind
            .as_ref()
            .map(|(index, bytes, entry)| (*index, bytes, entry));
        match in_block.or(left_behind) {
            Some((index, bytes, entry)) => {
                let entry = entry.clone();
                place_head(&mut self.head, &mut self.head_block, index, bytes, entry);
            }
            None => self.exhausted = true,
        }
        Ok(())
    }

    /// Loads the next block in the walk's direction; false after the last.
    /// On error nothing changes.
    fn load_next_block(&mut self) -> Result<bool> {
        let Some(index) = self.next_block else {
            return Ok(false);
        };
        let upper = as_ref_bound(&self.upper);
        let lower = as_ref_bound(&self.lower);
        match &mut self.walk {
            Walk::Forward {
                block, previous, ..
            } => {
                let bytes = self.file.block_bytes(index)?;
                let start = BlockCursor::new(&bytes)
                    .map_err(self.file.damaged_block(index))?
                    .position();
                self.block_within_end = within_upper(self.file.last_key(index)?, upper);
                *block = Some((index, bytes, start));
                // The entry before the block's first is the previous block's
                // last, whose key the index names.
                *previous = None;
                self.next_block = Some(index + 1).filter(|&i| i < self.file.block_count());
            }
            Walk::Backward {
                block,
                entries,
                next,
                ahead,
            } => {
                // On error the list is left unspecified, but no block is
                // current, so nothing reads it.
                *block = None;
                // The processor does not fetch ahead in this order by
                // itself, and decoding finds each entry from the one
                // before, so unrequested lines arrive one after another.
                // The walk of each block asks for the next block's lines a
                // few per entry (`PREFETCH_PER_ENTRY`); what it did not get
                // to (all of a walk's first block) is asked for here.
                // Asking for a whole page at once instead, both this block
                // and the next one at each load, left the reverse scan of
                // one file 15-20% slower (core bench, alternating builds).
                let rest = match ahead.take() {
                    Some((asked, rest)) if asked == index => rest,
                    _ => self.file.block_head_span(index),
                };
                self.file.prefetch_span(rest);
                *ahead = index
                    .checked_sub(1)
                    .map(|previous| (previous, self.file.block_head_span(previous)));
                let bytes = self.file.block_into(index, entries)?;
                // Every key of block `index` is at or above the previous
                // block's last key.
                self.block_within_end = match index.checked_sub(1) {
                    Some(previous) => within_lower(self.file.last_key(previous)?, lower),
                    None => false,
                };
                *next = entries.len();
                *block = Some((index, bytes));
                self.next_block = index.checked_sub(1);
            }
        }
        Ok(true)
    }
}

/// Bytes of the next block a backward walk asks the processor for with
/// each entry it reads: four cache lines. Spread over the walk of a block
/// (a page of 100-byte entries holds about 30), the requests keep a few
/// loads in flight; a page's 64 requests at once waited for the
/// processor's miss buffers to free up. 512 bytes ran no differently.
const PREFETCH_PER_ENTRY: usize = 256;

/// Whether two keys are equal, deciding on the last eight bytes first:
/// neighbouring keys in a file share their first bytes, so a difference
/// shows up sooner at the end, without a call to `memcmp`.
fn same_key(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    if let (Some(tail_a), Some(tail_b)) = (a.last_chunk::<8>(), b.last_chunk::<8>()) {
        if tail_a != tail_b {
            return false;
        }
    }
    a == b
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{FileSystem, RealFileSystem};
    use crate::snapshot_file::SnapshotFileWriter;
    use std::collections::BTreeMap;

    /// Versions of one key, newest first: (seq, value; `None` a removal).
    type Versions = Vec<(u64, Option<Vec<u8>>)>;

    /// 60 keys with one to five versions each (some removals, a value size
    /// that spreads them over many blocks, one key whose versions span
    /// several blocks), written to one file.
    fn model_file(dir: &std::path::Path) -> (Arc<SnapshotFile>, BTreeMap<Vec<u8>, Versions>) {
        let mut model: BTreeMap<Vec<u8>, Versions> = BTreeMap::new();
        let mut random = crate::test_random(0x2545_f491_4f6c_dd1du64);
        for k in 0..60u64 {
            let count = if k == 30 { 120 } else { 1 + random(5) };
            let mut seqs: Vec<u64> = (0..count).map(|_| 1 + random(400)).collect();
            seqs.sort_unstable_by(|a, b| b.cmp(a));
            seqs.dedup();
            let versions: Versions = seqs
                .into_iter()
                .map(|seq| {
                    let value = (random(4) != 0).then(|| vec![seq as u8; 200]);
                    (seq, value)
                })
                .collect();
            model.insert(format!("key{k:03}").into_bytes(), versions);
        }
        let fs: Arc<dyn FileSystem> = Arc::new(RealFileSystem);
        let path = dir.join("1.snap");
        let mut writer = SnapshotFileWriter::create(&*fs, dir, path.clone()).unwrap();
        for (key, versions) in &model {
            for (seq, value) in versions {
                writer.add(key, *seq, value.as_deref(), 0).unwrap();
            }
        }
        writer.finish().unwrap();
        let file = Arc::new(SnapshotFile::open(fs, &path, 1).unwrap());
        (file, model)
    }

    type Seen = Vec<(Vec<u8>, u64, Option<Vec<u8>>)>;

    fn walk(
        file: &Arc<SnapshotFile>,
        seq: u64,
        direction: Direction,
        lower: &Bound<Bytes>,
        upper: &Bound<Bytes>,
    ) -> Seen {
        let mut cursor =
            FileCursor::new(file.clone(), seq, direction, lower.clone(), upper.clone());
        let mut seen = Vec::new();
        loop {
            cursor.fill().unwrap();
            let Some((key, head_seq)) = cursor.head() else {
                return seen;
            };
            if cursor.head_is_removal() {
                seen.push((key.to_vec(), head_seq, None));
                cursor.skip();
                continue;
            }
            let (key, value) = cursor.take_value().unwrap();
            seen.push((key.to_vec(), head_seq, Some(value.to_vec())));
        }
    }

    fn expected(
        model: &BTreeMap<Vec<u8>, Versions>,
        seq: u64,
        lower: &Bound<Bytes>,
        upper: &Bound<Bytes>,
    ) -> Seen {
        model
            .iter()
            .filter(|(key, _)| {
                within_lower(key, as_ref_bound(lower)) && within_upper(key, as_ref_bound(upper))
            })
            .filter_map(|(key, versions)| {
                let (version_seq, value) = versions.iter().find(|(s, _)| *s <= seq)?;
                Some((key.clone(), *version_seq, value.clone()))
            })
            .collect()
    }

    #[test]
    fn a_walk_yields_each_keys_newest_visible_version_within_bounds() {
        let dir = tempfile::tempdir().unwrap();
        let (file, model) = model_file(dir.path());
        assert!(file.block_count() >= 8, "the keys should span many blocks");
        // Bounds on keys of the file, between them, and outside them.
        let keys = [
            "", "key000", "key017", "key017x", "key030", "key031", "key059", "z",
        ];
        let mut bounds = vec![Bound::Unbounded];
        for key in keys {
            bounds.push(Bound::Included(Bytes::from(key)));
            bounds.push(Bound::Excluded(Bytes::from(key)));
        }
        for seq in [0, 1, 57, 200, 399, u64::MAX] {
            for lower in &bounds {
                for upper in &bounds {
                    let want = expected(&model, seq, lower, upper);
                    let forward = walk(&file, seq, Direction::Forward, lower, upper);
                    assert_eq!(forward, want, "forward at {seq}, {lower:?}..{upper:?}");
                    let mut backward = walk(&file, seq, Direction::Backward, lower, upper);
                    backward.reverse();
                    assert_eq!(backward, want, "backward at {seq}, {lower:?}..{upper:?}");
                }
            }
        }
    }
}
