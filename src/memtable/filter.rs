//! The memtable's key filter: a bloom filter in memory, filled by
//! concurrent writers with atomic bit sets, that lets a lookup of a key
//! the memtable lacks skip the skiplist.

use std::sync::atomic::{AtomicU64, Ordering as AtomicOrdering};

use crate::snapshot_file::bloom;

/// A bloom filter that concurrent writers fill with atomic bit sets, in
/// memory only. It is blocked by 64-bit word: each key sets
/// [`PROBES_PER_WORD`] bits of one word, so an insert is at most one
/// atomic `or` and a lookup one load (with 64-byte lines, as the snapshot
/// files' filter has, an insert took an atomic per word its seven bits
/// fell in, about five; `perf` put a tenth of a sequential fill's
/// writing thread in it). The price is the false-positive rate: about
/// 1.8% at 10 bits per key (measured by the test below), against about
/// 1% with lines.
#[derive(Debug)]
pub(super) struct KeyFilter {
    words: Box<[AtomicU64]>,
}

/// The largest memtable key filter: 8 MiB, 10 bits for each of 6.7 million
/// keys (a 64 MiB memtable of small entries needs under 1 MiB).
const MAX_FILTER_BYTES: usize = 8 << 20;

/// Bits a key sets in its word: the fewest false positives for a word that
/// holds 6.4 keys on average (10 bits per key).
const PROBES_PER_WORD: u32 = 5;

impl KeyFilter {
    /// A filter with `bloom::BITS_PER_KEY` bits per expected key, up to
    /// `MAX_FILTER_BYTES` (a huge `memtable_size` must not allocate a huge
    /// filter up front; past the cap, false positives rise gradually).
    pub(super) fn new(expected_keys: usize) -> KeyFilter {
        let bits = expected_keys
            .max(1)
            .saturating_mul(bloom::BITS_PER_KEY)
            .min(MAX_FILTER_BYTES * 8);
        KeyFilter {
            words: (0..bits.div_ceil(64)).map(|_| AtomicU64::new(0)).collect(),
        }
    }

    /// The key's word, and the bits it sets there: the hash's high half
    /// picks the word (mapped onto the words without a division), six-bit
    /// fields of its low half the bits.
    fn word_and_mask(&self, hash: u64) -> (&AtomicU64, u64) {
        // Below `words.len()`, which is at least 1: `(h * n) >> 32 < n` for
        // any 32-bit `h`.
        let index = (((hash >> 32) * self.words.len() as u64) >> 32) as usize;
        let mut mask = 0u64;
        for probe in 0..PROBES_PER_WORD {
            mask |= 1 << ((hash >> (6 * probe)) & 63);
        }
        (&self.words[index], mask)
    }

    pub(super) fn insert(&self, hash: u64) {
        let (word, mask) = self.word_and_mask(hash);
        // A word that has the bits already needs no atomic write.
        if word.load(AtomicOrdering::Relaxed) & mask != mask {
            word.fetch_or(mask, AtomicOrdering::Relaxed);
        }
    }

    /// Inserts every hash of a batch. The words are loaded first, all of
    /// them, and the missing bits set after: loads of different words wait
    /// for memory together, while an atomic `or` (a locked instruction,
    /// which orders the memory accesses around it) would wait for each
    /// word in turn. The `or`s then find their words in cache.
    pub(super) fn insert_all(&self, hashes: &[u64]) {
        let mut bits_missing = false;
        for &hash in hashes {
            let (word, mask) = self.word_and_mask(hash);
            bits_missing |= word.load(AtomicOrdering::Relaxed) & mask != mask;
        }
        if bits_missing {
            for &hash in hashes {
                self.insert(hash);
            }
        }
    }

    pub(super) fn may_contain(&self, hash: u64) -> bool {
        let (word, mask) = self.word_and_mask(hash);
        word.load(AtomicOrdering::Relaxed) & mask == mask
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_huge_memtable_size_gets_a_capped_filter() {
        let filter = KeyFilter::new(usize::MAX);
        assert_eq!(filter.words.len() * 8, MAX_FILTER_BYTES);
        filter.insert(bloom::key_hash(b"k"));
        assert!(filter.may_contain(bloom::key_hash(b"k")));
    }

    #[test]
    fn key_filter_has_no_false_negatives_and_few_false_positives() {
        let filter = KeyFilter::new(10_000);
        let hash = |i: u32| bloom::key_hash(&i.to_be_bytes());
        std::thread::scope(|scope| {
            for part in 0..4u32 {
                let filter = &filter;
                scope.spawn(move || {
                    (part..10_000)
                        .step_by(4)
                        .for_each(|i| filter.insert(hash(i)))
                });
            }
        });
        assert!((0..10_000).all(|i| filter.may_contain(hash(i))));
        let false_positives = (10_000..110_000)
            .filter(|&i| filter.may_contain(hash(i)))
            .count();
        assert!(
            false_positives < 2_000,
            "{false_positives} false positives in 100,000"
        );
    }
}
