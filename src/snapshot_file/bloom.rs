//! A bloom filter over user keys: a lookup of a key that is not in a file
//! reads no data block in about 99% of cases (10 bits per key, 7 probes).
//!
//! Probes use double hashing of one 64-bit hash (`h1 + i * h2`); the hash is
//! defined in `format/snapshot.md` so that files stay readable across builds.

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

/// The bit positions a key hash sets, in a filter of `bit_count` bits.
fn probes(hash: u64, probe_count: u8, bit_count: u64) -> impl Iterator<Item = u64> {
    let h1 = hash;
    // An odd step visits distinct positions modulo any power of two and
    // rarely repeats otherwise.
    let h2 = hash.rotate_left(32) | 1;
    (0..u64::from(probe_count)).map(move |i| h1.wrapping_add(i.wrapping_mul(h2)) % bit_count)
}

/// Builds the filter bytes for the given key hashes.
pub fn build(hashes: &[u64]) -> Vec<u8> {
    let bit_count = (hashes.len() * BITS_PER_KEY).max(64) as u64;
    let mut bits = vec![0u8; bit_count.div_ceil(8) as usize];
    let bit_count = bits.len() as u64 * 8;
    for &hash in hashes {
        for bit in probes(hash, PROBES, bit_count) {
            bits[(bit / 8) as usize] |= 1 << (bit % 8);
        }
    }
    bits
}

/// Whether a key with `hash` may be in the set the filter `bits` was built
/// from (false means certainly not). An empty filter admits everything.
pub fn may_contain(bits: &[u8], probe_count: u8, hash: u64) -> bool {
    if bits.is_empty() {
        return true;
    }
    let bit_count = bits.len() as u64 * 8;
    probes(hash, probe_count, bit_count).all(|bit| bits[(bit / 8) as usize] & (1 << (bit % 8)) != 0)
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
        // About 0.8% expected at 10 bits per key.
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
