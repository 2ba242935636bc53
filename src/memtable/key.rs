//! How memtable entries are keyed and ordered: a version's key is its
//! user key and sequence number, ordered by key ascending and then by
//! sequence number descending, with the key's first sixteen bytes inline
//! so that most comparisons are integer compares.

use std::borrow::Borrow;
use std::cmp::Ordering;

use bytes::Bytes;

/// A key and the sequence number of one of its versions.
///
/// `prefix` holds the key's first sixteen bytes (zero-padded, big-endian), so
/// that most comparisons in the skiplist decide on integer compares,
/// without following `user_key` to its bytes (a likely cache miss) or
/// calling `memcmp`.
#[derive(Clone, Debug)]
pub(crate) struct InternalKey {
    pub(super) prefix: Prefix,
    pub seq: u64,
    pub user_key: Bytes,
}

impl InternalKey {
    /// Whether this version and `other` are of the same user key. The
    /// inline prefix and length settle it for keys of up to sixteen bytes,
    /// so a scan's walk over versions does not wait on the keys' bytes (a
    /// cache miss per key in a large memtable; [`HeldKey`] has them
    /// loaded while the walk goes on).
    #[inline]
    pub(super) fn same_user_key(&self, other: &InternalKey) -> bool {
        self.prefix == other.prefix
            && self.user_key.len() == other.user_key.len()
            && (self.user_key.len() <= 16 || self.user_key == other.user_key)
    }
}

/// The first sixteen bytes of `key` as big-endian words, zero-padded.
///
/// Ordering by prefix agrees with ordering by key: where two prefixes
/// differ, either both keys have a byte there and the bytes differ the same
/// way, or the shorter key ran out (its padding is 0) and is a prefix of the
/// other up to there, so it sorts first. Equal prefixes say nothing, and the
/// full keys are compared.
pub(crate) fn key_prefix(key: &[u8]) -> Prefix {
    prefix_of_head(key_head(key))
}

/// The first sixteen bytes of `key`, zero-padded: what a [`Prefix`] is made
/// of, and how snapshot files store one.
pub(crate) fn key_head(key: &[u8]) -> [u8; 16] {
    // A key of 16 bytes or more is read in one load; a shorter one is
    // copied into zeros (a copy of variable length is a call to memcpy).
    match key.first_chunk::<16>() {
        Some(head) => *head,
        None => {
            let mut bytes = [0u8; 16];
            bytes[..key.len()].copy_from_slice(key);
            bytes
        }
    }
}

/// The [`Prefix`] of a key whose [`key_head`] is `head`.
pub(crate) fn prefix_of_head(head: [u8; 16]) -> Prefix {
    let word = |i: usize| {
        u64::from_be_bytes([
            head[i],
            head[i + 1],
            head[i + 2],
            head[i + 3],
            head[i + 4],
            head[i + 5],
            head[i + 6],
            head[i + 7],
        ])
    };
    [word(0), word(8)]
}

/// A key's first sixteen bytes as two big-endian words: sixteen, because
/// keys often share their first eight (a table prefix, a zero high half of
/// a counter); two words rather than a `u128`, whose 16-byte alignment
/// would pad every skiplist node. Measured on 1,000,000 sequential 16-byte
/// keys: fill +11% over an 8-byte prefix, for 6 more bytes per entry.
pub(crate) type Prefix = [u64; 2];

/// The ordering of versions, shared by owned keys and borrowed probes, so
/// lookups need not allocate an `InternalKey`.
pub(crate) trait KeyView {
    /// The key's prefix (see [`key_prefix`]), the key and the sequence number.
    fn parts(&self) -> (Prefix, &[u8], u64);
}

impl KeyView for InternalKey {
    fn parts(&self) -> (Prefix, &[u8], u64) {
        (self.prefix, &self.user_key, self.seq)
    }
}

/// A borrowed probe: "the newest version of `key` at or below `seq`".
pub(crate) struct Probe<'a> {
    prefix: Prefix,
    key: &'a [u8],
    seq: u64,
}

impl Probe<'_> {
    pub fn new(key: &[u8], seq: u64) -> Probe<'_> {
        Probe {
            prefix: key_prefix(key),
            key,
            seq,
        }
    }
}

impl KeyView for Probe<'_> {
    fn parts(&self) -> (Prefix, &[u8], u64) {
        (self.prefix, self.key, self.seq)
    }
}

/// Generic rather than over `&dyn KeyView`, so that comparing two values of
/// a known type (the skiplist's inserts, a replayed run's sort) calls
/// `parts` directly and inlines; a `dyn` probe still works.
#[inline]
pub(crate) fn compare<A, B>(a: &A, b: &B) -> Ordering
where
    A: KeyView + ?Sized,
    B: KeyView + ?Sized,
{
    let (a_prefix, a_key, a_seq) = a.parts();
    let (b_prefix, b_key, b_seq) = b.parts();
    a_prefix
        .cmp(&b_prefix)
        .then_with(|| a_key.cmp(b_key))
        // Newer versions first.
        .then_with(|| b_seq.cmp(&a_seq))
}

impl<'a> Borrow<dyn KeyView + 'a> for InternalKey {
    fn borrow(&self) -> &(dyn KeyView + 'a) {
        self
    }
}

impl PartialEq for dyn KeyView + '_ {
    fn eq(&self, other: &Self) -> bool {
        compare(self, other) == Ordering::Equal
    }
}
impl Eq for dyn KeyView + '_ {}
impl PartialOrd for dyn KeyView + '_ {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for dyn KeyView + '_ {
    fn cmp(&self, other: &Self) -> Ordering {
        compare(self, other)
    }
}

impl PartialEq for InternalKey {
    fn eq(&self, other: &Self) -> bool {
        compare(self, other) == Ordering::Equal
    }
}
impl Eq for InternalKey {}
impl PartialOrd for InternalKey {
    fn partial_cmp(&self, other: &Self) -> Option<Ordering> {
        Some(self.cmp(other))
    }
}
impl Ord for InternalKey {
    fn cmp(&self, other: &Self) -> Ordering {
        compare(self, other)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn prefix_order_agrees_with_key_order() {
        let mut keys: Vec<Vec<u8>> = vec![
            vec![],
            vec![0],
            vec![0, 0],
            b"a".to_vec(),
            b"a\0".to_vec(),
            b"a\0\x01".to_vec(),
            b"ab".to_vec(),
            vec![0xff; 8],
            vec![0xff; 9],
            vec![0xff; 17],
        ];
        for len in [7, 8, 9, 15, 16, 17, 24] {
            for last in [0u8, 1, 0x80, 0xff] {
                let mut key = vec![7u8; len];
                key[len - 1] = last;
                keys.push(key);
            }
        }
        for a in &keys {
            for b in &keys {
                let by_prefix = key_prefix(a).cmp(&key_prefix(b));
                if by_prefix.is_ne() {
                    assert_eq!(by_prefix, a.cmp(b), "{a:?} vs {b:?}");
                }
                let (pa, pb) = (Probe::new(a, 5), Probe::new(b, 5));
                assert_eq!(compare(&pa, &pb), a.cmp(b), "{a:?} vs {b:?}");
            }
        }
    }
}
