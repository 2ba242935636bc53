//! [`Slice`]: the key and value type that reads return.

use std::borrow::Borrow;
use std::fmt;
use std::ops::Deref;

use bytes::Bytes;

/// An immutable byte string returned by reads: cheap to clone (a reference
/// count), dereferences to `[u8]`.
///
/// A `Slice` shares the buffer it was read from (the batch that wrote it, or
/// later a mapped snapshot file), so holding one keeps that buffer alive.
/// Copy it with `to_vec()` to keep a small part of a large buffer.
///
/// ```
/// let value = mapstore::Slice::from("hello");
/// assert_eq!(&value[..], b"hello");
/// assert_eq!(value, "hello");
/// ```
#[derive(Clone, Default, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub struct Slice(Bytes);

impl Slice {
    /// Copies `bytes` into a new `Slice`.
    pub fn copy_from(bytes: &[u8]) -> Self {
        Slice(Bytes::copy_from_slice(bytes))
    }

    /// Wraps a `Bytes` without copying.
    pub(crate) fn from_bytes(bytes: Bytes) -> Self {
        Slice(bytes)
    }
}

impl Deref for Slice {
    type Target = [u8];
    fn deref(&self) -> &[u8] {
        &self.0
    }
}

impl AsRef<[u8]> for Slice {
    fn as_ref(&self) -> &[u8] {
        &self.0
    }
}

impl Borrow<[u8]> for Slice {
    fn borrow(&self) -> &[u8] {
        &self.0
    }
}

impl fmt::Debug for Slice {
    /// Prints the bytes as an escaped byte string: `b"key\x00"`.
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "b\"{}\"", self.0.escape_ascii())
    }
}

impl From<Vec<u8>> for Slice {
    fn from(bytes: Vec<u8>) -> Self {
        Slice(Bytes::from(bytes))
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
        slice.0.to_vec()
    }
}

impl PartialEq<[u8]> for Slice {
    fn eq(&self, other: &[u8]) -> bool {
        self.0 == other
    }
}

impl PartialEq<&[u8]> for Slice {
    fn eq(&self, other: &&[u8]) -> bool {
        self.0 == *other
    }
}

impl<const N: usize> PartialEq<[u8; N]> for Slice {
    fn eq(&self, other: &[u8; N]) -> bool {
        self.0 == other[..]
    }
}

impl<const N: usize> PartialEq<&[u8; N]> for Slice {
    fn eq(&self, other: &&[u8; N]) -> bool {
        self.0 == other[..]
    }
}

impl PartialEq<Vec<u8>> for Slice {
    fn eq(&self, other: &Vec<u8>) -> bool {
        self.0 == other[..]
    }
}

impl PartialEq<str> for Slice {
    fn eq(&self, other: &str) -> bool {
        self.0 == other.as_bytes()
    }
}

impl PartialEq<&str> for Slice {
    fn eq(&self, other: &&str) -> bool {
        self.0 == other.as_bytes()
    }
}
