//! A bloom filter over user keys: a lookup of a key that is not in a file
//! reads no data block in about 99% of cases (10 bits per key, 7 probes).
//!
//! The filter is *blocked*: one key's probes all fall in one 64-byte line
//! (a CPU cache line), chosen by the high half of its hash, so a lookup
//! costs one cache miss instead of one per probe. That matters because a
//! point read checks the filter of every file newer than the one holding
//! its key. The price is a slightly higher false-positive rate for the same
//! bits. The hash and the probe positions are defined in
//! `format/snapshot.md` so that files stay readable across builds.

/// Bits of filter per key.
pub const BITS_PER_KEY: usize = 10;
/// Probes per key (close to `BITS_PER_KEY * ln 2`, the optimum).
pub const PROBES: u8 = 7;

/// The 64-bit key hash of the format: FNV-1a, then the SplitMix64 finalizer
/// to spread FNV's weak high bits.
pub fn key_hash(key: &[u8]) -> u64 {
    let mut hash: u64 = 0xcbf2_9ce4_8422_2325;
    for &byte in key {
        hash ^= u64::from(byte);
        hash = hash.wrapping_mul(0x0000_0100_0000_01b3);
    }
    hash ^= hash >> 30;
    hash = hash.wrapping_mul(0xbf58_476d_1ce4_e5b9);
    hash ^= hash >> 27;
    hash = hash.wrapping_mul(0x94d0_49bb_1331_11eb);
    hash ^ (hash >> 31)
}

/// Bytes in one line of the filter; a filter is a whole number of lines.
pub const LINE_BYTES: usize = 64;
const LINE_BITS: u64 = LINE_BYTES as u64 * 8;

/// The line of a filter of `line_count` lines that `hash` uses, and the bit
/// positions within that line.
fn probes(hash: u64, probe_count: u8, line_count: usize) -> (usize, impl Iterator<Item = u64>) {
    // Maps the high 32 bits onto 0..line_count without a division.
    let line = (((hash >> 32) * line_count as u64) >> 32) as usize;
    let first = hash % LINE_BITS;
    // An odd step visits distinct positions modulo the (power of two) line.
    let step = ((hash >> 9) % LINE_BITS) | 1;
    let bits = (0..u64::from(probe_count)).map(move |i| (first + i * step) % LINE_BITS);
    (line, bits)
}

/// Builds the filter bytes for the given key hashes.
pub fn build(hashes: &[u64]) -> Vec<u8> {
    let bit_count = (hashes.len() * BITS_PER_KEY).max(1);
    let line_count = bit_count.div_ceil(LINE_BITS as usize);
    let mut bits = vec![0u8; line_count * LINE_BYTES];
    for &hash in hashes {
        let (line, positions) = probes(hash, PROBES, line_count);
        let line = &mut bits[line * LINE_BYTES..(line + 1) * LINE_BYTES];
        for bit in positions {
            line[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    }
    bits
}

/// Whether a key with `hash` may be in the set the filter `bits` was built
/// from (false means certainly not). An empty filter admits everything;
/// `bits` must be a whole number of lines (`decode_bloom` checks it).
pub fn may_contain(bits: &[u8], probe_count: u8, hash: u64) -> bool {
    let line_count = bits.len() / LINE_BYTES;
    if line_count == 0 {
        return true;
    }
    let (line, mut positions) = probes(hash, probe_count, line_count);
    let line = &bits[line * LINE_BYTES..(line + 1) * LINE_BYTES];
    positions.all(|bit| line[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn no_false_negatives_and_few_false_positives() {
        let hashes: Vec<u64> = (0..10_000u32).map(|i| key_hash(&i.to_be_bytes())).collect();
        let bits = build(&hashes);
        assert!(hashes.iter().all(|&h| may_contain(&bits, PROBES, h)));
        let false_positives = (10_000..110_000u32)
            .filter(|i| may_contain(&bits, PROBES, key_hash(&i.to_be_bytes())))
            .count();
        // About 1% expected at 10 bits per key in 64-byte lines.
        assert!(
            false_positives < 2_000,
            "{false_positives} false positives in 100,000"
        );
    }

    #[test]
    fn the_hash_is_stable() {
        // Files written by earlier builds must keep working: pin the values
        // (computed independently from the definition in format/snapshot.md).
        assert_eq!(key_hash(b""), 0xf52a_15e9_a9b5_e89b);
        assert_eq!(key_hash(b"mapstore"), 0x5a4e_f8fc_7b6e_993c);
    }
}
