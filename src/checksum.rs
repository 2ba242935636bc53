//! Comparing stored checksums with computed ones.
//!
//! Under `cfg(fuzzing)` (set by `cargo fuzz`) every checksum is accepted, so
//! that the fuzzer, which cannot forge CRC32s, reaches the decoding behind
//! them; the decoders must stay safe on any bytes anyway. Normal builds
//! always compare.

/// Whether a stored checksum matches the one computed from the data.
pub(crate) fn matches(stored: u32, computed: u32) -> bool {
    cfg!(fuzzing) || stored == computed
}
