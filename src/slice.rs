//! [`Slice`]: the key and value type that reads return.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

/// An immutable byte string returned by reads: cheap to clone, dereferences
/// to `[u8]`.
///
/// A `Slice` of more than 22 bytes shares the buffer it was read from (the
/// batch that wrote it, or later a mapped snapshot file) through a
/// reference count, so holding one keeps that buffer alive; copy it with
/// `to_vec()` to keep a small part of a large buffer. A shorter one holds
/// its bytes inline: copying a short key costs less than the atomic
/// reference count, which matters on a scan that makes one per entry.
///
/// ```
/// let value = mapstore::Slice::from("hello");
/// assert_eq!(&value[..], b"hello");
/// assert_eq!(value, "hello");
/// ```
#[derive(Clone)]
pub struct Slice(Repr);

/// Bytes a `Slice` holds inline: with the length byte and the enum's tag,
/// an inline `Slice` is no larger than a shared one.
const INLINE_BYTES: usize = 22;

#[derive(Clone)]
enum Repr {
    Inline { len: u8, bytes: [u8; INLINE_BYTES] },
    Shared(Bytes),
}

impl Slice {
    /// Copies `bytes` into a new `Slice`.
    pub fn copy_from(bytes: &[u8]) -> Self {
        Slice::inline(bytes).unwrap_or_else(|| Slice(Repr::Shared(Bytes::copy_from_slice(bytes))))
    }

    /// Wraps a `Bytes` without copying (or copies it inline when short).
    pub(crate) fn from_bytes(bytes: Bytes) -> Self {
        Slice::inline(&bytes).unwrap_or(Slice(Repr::Shared(bytes)))
    }

    /// `range` of `buffer`: copied inline when short, otherwise shared
    /// (one reference count, where `buffer.slice(range)` then `from_bytes`
    /// would take one and drop it again for a short slice).
    #[inline]
    pub(crate) fn from_part(buffer: &Bytes, range: std::ops::Range<usize>) -> Self {
        let len = range.len();
        if len <= INLINE_BYTES {
            // A copy of a fixed size is a few moves, where one of the
            // part's own length is a call to `memcpy`. The bytes past the
            // part that it takes along are never read.
            if let Some(chunk) = buffer
                .get(range.start..)
                .and_then(|rest| rest.first_chunk::<INLINE_BYTES>())
            {
                return Slice(Repr::Inline {
                    // At most INLINE_BYTES, checked above.
                    len: len as u8,
                    bytes: *chunk,
                });
            }
        }
        Slice::inline(&buffer[range.clone()])
            .unwrap_or_else(|| Slice(Repr::Shared(buffer.slice(range))))
    }

    /// Shares `bytes` (or copies them inline when short).
    pub(crate) fn from_shared(bytes: &Bytes) -> Self {
        Slice::inline(bytes).unwrap_or_else(|| Slice(Repr::Shared(bytes.clone())))
    }

    fn inline(bytes: &[u8]) -> Option<Self> {
        if bytes.len() > INLINE_BYTES {
            return None;
        }
        let mut inline = [0u8; INLINE_BYTES];
        inline[..bytes.len()].copy_from_slice(bytes);
        Some(Slice(Repr::Inline {
            // At most INLINE_BYTES, checked above.
            len: bytes.len() as u8,
            bytes: inline,
        }))
    }

    fn as_bytes(&self) -> &[u8] {
        match &self.0 {
            Repr::Inline { len, bytes } => &bytes[..usize::from(*len)],
            Repr::Shared(bytes) => bytes,
        }
    }
}

impl Default for Slice {
    fn default() -> Self {
        Slice::copy_from(&[])
    }
}

impl PartialEq for Slice {
    fn eq(&self, other: &Slice) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl Eq for Slice {}

impl PartialOrd for Slice {
    fn partial_cmp(&self, other: &Slice) -> Option<std::cmp::Ordering> {
        Some(self.cmp(other))
    }
}

impl Ord for Slice {
    fn cmp(&self, other: &Slice) -> std::cmp::Ordering {
        self.as_bytes().cmp(other.as_bytes())
    }
}

impl std::hash::Hash for Slice {
    fn hash<H: std::hash::Hasher>(&self, state: &mut H) {
        // The same as `[u8]`'s, as `Borrow<[u8]>` requires.
        self.as_bytes().hash(state)
    }
}

impl Deref for Slice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl AsRef<[u8]> for Slice {
    fn as_ref(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl Borrow<[u8]> for Slice {
    fn borrow(&self) -> &[u8] {
        self.as_bytes()
    }
}

impl fmt::Debug for Slice {
    /// Prints the bytes as an escaped byte string: `b"key\x00"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.as_bytes().escape_ascii())
    }
}

impl From<Vec<u8>> for Slice {
    fn from(bytes: Vec<u8>) -> Self {
        Slice::inline(&bytes).unwrap_or_else(|| Slice(Repr::Shared(Bytes::from(bytes))))
    }
}

impl From<&[u8]> for Slice {
    fn from(bytes: &[u8]) -> Self {
        Slice::copy_from(bytes)
    }
}

impl From<&str> for Slice {
    fn from(text: &str) -> Self {
        Slice::copy_from(text.as_bytes())
    }
}

impl From<Slice> for Vec<u8> {
    fn from(slice: Slice) -> Self {
        slice.as_bytes().to_vec()
    }
}

impl PartialEq<[u8]> for Slice {
    fn eq(&self, other: &[u8]) -> bool {
        *self.as_bytes() == *other
    }
}

impl PartialEq<&[u8]> for Slice {
    fn eq(&self, other: &&[u8]) -> bool {
        self.as_bytes() == *other
    }
}

impl<const N: usize> PartialEq<[u8; N]> for Slice {
    fn eq(&self, other: &[u8; N]) -> bool {
        *self.as_bytes() == other[..]
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Slice {
    fn eq(&self, other: &&[u8; N]) -> bool {
        *self.as_bytes() == other[..]
    }
}

impl PartialEq<Vec<u8>> for Slice {
    fn eq(&self, other: &Vec<u8>) -> bool {
        *self.as_bytes() == other[..]
    }
}

impl PartialEq<str> for Slice {
    fn eq(&self, other: &str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

impl PartialEq<&str> for Slice {
    fn eq(&self, other: &&str) -> bool {
        self.as_bytes() == other.as_bytes()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::collections::hash_map::DefaultHasher;
    use std::hash::{Hash, Hasher};

    fn hash_of<T: Hash + ?Sized>(value: &T) -> u64 {
        let mut hasher = DefaultHasher::new();
        value.hash(&mut hasher);
        hasher.finish()
    }

    /// Inline and shared slices of the same bytes compare, order and hash
    /// as those bytes do, on both sides of the inline limit.
    #[test]
    fn representation_does_not_show() {
        for len in [0, 1, INLINE_BYTES - 1, INLINE_BYTES, INLINE_BYTES + 1, 100] {
            let bytes: Vec<u8> = (0..len as u8).collect();
            let buffer = Bytes::from(bytes.clone());
            let inline_or_not = Slice::from_part(&buffer, 0..len);
            let shared = Slice(Repr::Shared(buffer.clone()));
            assert_eq!(&inline_or_not[..], &bytes[..]);
            assert_eq!(inline_or_not, shared);
            assert_eq!(inline_or_not.cmp(&shared), std::cmp::Ordering::Equal);
            assert_eq!(hash_of(&inline_or_not), hash_of(&bytes[..]));
            assert_eq!(hash_of(&shared), hash_of(&bytes[..]));
            assert_eq!(Slice::from_shared(&buffer), shared);
            assert_eq!(Slice::from(bytes.clone()), shared);
            assert_eq!(Vec::from(inline_or_not), bytes);
            let is_inline = matches!(Slice::from_part(&buffer, 0..len).0, Repr::Inline { .. });
            assert_eq!(is_inline, len <= INLINE_BYTES, "length {len}");
        }
        let short = Slice::from("ab");
        let long = Slice::from(&[b'a'; 40][..]);
        assert!(short > long, "byte order, not representation or length");
        assert_eq!(Slice::default(), Slice::from(""));
    }

    /// A short part of a longer buffer is copied with the bytes after it;
    /// those never show in what the slice compares, orders or hashes as.
    #[test]
    fn a_part_shows_only_its_own_bytes() {
        let buffer = Bytes::from((0..64u8).collect::<Vec<u8>>());
        for start in [0, 1, 30, 42, 50, 63, 64] {
            for len in [0, 1, 7, 16, INLINE_BYTES] {
                let Some(bytes) = buffer.get(start..start + len) else {
                    continue;
                };
                let part = Slice::from_part(&buffer, start..start + len);
                assert_eq!(&part[..], bytes, "{start}+{len}");
                assert_eq!(part, Slice::copy_from(bytes));
                assert_eq!(hash_of(&part), hash_of(bytes));
                assert_eq!(
                    part.clone().cmp(&Slice::copy_from(bytes)),
                    std::cmp::Ordering::Equal
                );
                assert!(buffer.is_unique(), "a short part took a reference");
            }
        }
    }

    /// A short part does not keep its buffer alive; a long part does.
    #[test]
    fn only_long_parts_share_the_buffer() {
        let buffer = Bytes::from(vec![7u8; 64]);
        let short = Slice::from_part(&buffer, 0..INLINE_BYTES);
        assert!(buffer.is_unique(), "a short part took a reference");
        let long = Slice::from_part(&buffer, 0..INLINE_BYTES + 1);
        assert!(!buffer.is_unique(), "a long part copied");
        assert_eq!(short.len() + 1, long.len());
    }
}
