//! Which files of a partition to merge, and when (`format/snapshot.md`,
//! "Merge policy").
//!
//! Within a partition the policy is *size-tiered*: files are merged in
//! groups of similar size, so each version is rewritten about once per
//! growth of its file by the merge width, a number of times that grows
//! with the logarithm of the partition's size and not with the database's.
//! A merge always takes the newest files of its partition (so the output
//! takes their place in the stack and the stack stays in age order), and
//! it takes all of them when the older files are no bigger than the newer
//! ones put together: that merge drops removals, and splits a partition
//! grown past its bound. The simulation below, and `tests/partitions.rs`
//! on a real database, measure the write amplification this gives.

/// The smallest number of files a size-tiered merge takes.
pub(crate) const MERGE_WIDTH: usize = 4;

/// A partition is split by its next whole merge once its files are larger
/// than this share of its keyspace: the number of partitions stays near
/// this, so a checkpoint writes that many files at most, whatever the
/// database's size.
pub(crate) const PARTITIONS_PER_KEYSPACE: u64 = 16;

/// What the policy chose for one partition.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum MergeChoice {
    /// Merge the newest `count` files (fewer than all) into one.
    Newest(usize),
    /// Merge every file of the partition: removals no reader needs are
    /// dropped, and the output is cut into pieces of `piece_bytes` (each a
    /// partition of its own) when it would be larger than the bound.
    Whole { piece_bytes: u64 },
}

/// The bounds the policy keeps.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MergePolicy {
    /// At most this many files per partition (`Options::max_snapshot_files`):
    /// the files a point read may have to look at.
    pub max_files: usize,
    /// A partition larger than this is split
    /// (`Options::partition_bytes`), unless its keyspace is so large that
    /// its share ([`PARTITIONS_PER_KEYSPACE`]) is larger.
    pub partition_bytes: u64,
}

impl MergePolicy {
    /// The size above which the partition starting at `lower` of a
    /// keyspace of `keyspace_bytes` is split: the bound, times a factor
    /// from 0.75 to 1.25 that the partition's lower bound picks. Random
    /// keys make all partitions grow alike; without the factor, partitions
    /// made by one split would all reach the bound, and be rewritten,
    /// together (a burst of merges that stalled writers in the 20M-key
    /// run).
    pub fn split_bytes(&self, keyspace_bytes: u64, lower: &[u8]) -> u64 {
        let bound = self
            .partition_bytes
            .max(keyspace_bytes / PARTITIONS_PER_KEYSPACE)
            .max(1);
        let spread = crate::snapshot_file::bloom::key_hash(lower) % 1024;
        let factor = 768 + spread / 2;
        (u128::from(bound) * u128::from(factor) / 1024) as u64
    }

    /// What to merge in a partition whose files have `sizes` (newest
    /// first), which is split past `split_bytes`; `None`: nothing yet.
    pub fn choose(&self, sizes: &[u64], split_bytes: u64) -> Option<MergeChoice> {
        let count = sizes.len();
        let total: u64 = sizes.iter().sum();
        let whole = MergeChoice::Whole {
            // Pieces of half the bound, so a piece grows a while before
            // it is split again.
            piece_bytes: (split_bytes / 2).max(1),
        };
        if total > split_bytes && count >= 2 {
            return Some(whole);
        }
        // The longest stretch of newest files in which each file is no
        // larger than the ones before it put together.
        let mut taken = 1;
        let mut taken_bytes = sizes.first().copied().unwrap_or(0);
        while taken < count && sizes[taken] <= taken_bytes {
            taken_bytes += sizes[taken];
            taken += 1;
        }
        let choice = |taken: usize| {
            if taken >= count {
                whole
            } else {
                MergeChoice::Newest(taken)
            }
        };
        if taken >= MERGE_WIDTH {
            return Some(choice(taken));
        }
        if count > self.max_files {
            // Too many files for reads: the stretch of similar files if
            // there is one, else the newest ones, enough to come back to
            // one below the bound.
            let newest = (count + 2).saturating_sub(self.max_files).max(2);
            return Some(choice(if taken >= 2 { taken } else { newest }));
        }
        None
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const POLICY: MergePolicy = MergePolicy {
        max_files: 8,
        partition_bytes: 1000,
    };

    #[test]
    fn similar_files_merge_four_at_a_time() {
        assert_eq!(POLICY.choose(&[10, 10, 10], 1000), None);
        assert_eq!(
            POLICY.choose(&[10, 10, 10, 10, 100], 1000),
            Some(MergeChoice::Newest(4))
        );
        // The older file is no larger than the newer ones together.
        assert_eq!(
            POLICY.choose(&[10, 10, 10, 10, 40], 1000),
            Some(MergeChoice::Whole { piece_bytes: 500 })
        );
        // Three files are too few, and a larger older file waits for
        // newer ones as large.
        assert_eq!(POLICY.choose(&[10, 10, 100], 1000), None);
        assert_eq!(POLICY.choose(&[10, 10, 10, 100, 100], 1000), None);
    }

    #[test]
    fn too_many_files_merge_a_stretch_of_similar_ones_or_the_newest() {
        let sizes = [1, 2, 4, 8, 16, 32, 64, 128, 256];
        assert_eq!(POLICY.choose(&sizes, 1000), Some(MergeChoice::Newest(3)));
        // Not a large newer file with the two small ones before it.
        let sizes = [3, 3, 57, 3, 3, 3, 3, 3, 130];
        assert_eq!(POLICY.choose(&sizes, 1000), Some(MergeChoice::Newest(2)));
    }

    #[test]
    fn a_partition_past_its_bound_is_merged_whole_and_split() {
        assert_eq!(
            POLICY.choose(&[10, 995], 1000),
            Some(MergeChoice::Whole { piece_bytes: 500 })
        );
        // One file alone is never rewritten.
        assert_eq!(POLICY.choose(&[5000], 1000), None);
    }

    #[test]
    fn the_bound_is_spread_over_partitions_and_grows_with_the_keyspace() {
        let bounds: Vec<u64> = (0..64u32)
            .map(|i| POLICY.split_bytes(0, &i.to_be_bytes()))
            .collect();
        assert!(
            bounds.iter().all(|&b| (750..=1250).contains(&b)),
            "{bounds:?}"
        );
        let (low, high) = (bounds.iter().min().unwrap(), bounds.iter().max().unwrap());
        assert!(high - low > 300, "{low}..{high}");
        // A keyspace of 160,000 bytes: a sixteenth is 10,000.
        let large = POLICY.split_bytes(160_000, b"k");
        assert!((7500..=12500).contains(&large), "{large}");
    }

    /// Simulates a steady stream of checkpoints of random keys into one
    /// keyspace and returns the bytes merges wrote per byte checkpointed,
    /// and the most files a partition held.
    fn simulate(policy: MergePolicy, checkpoint: u64, checkpoints: u64) -> (f64, usize) {
        // Each partition: its lower bound, its share of the key range and
        // its file sizes.
        let mut partitions: Vec<(Vec<u8>, f64, Vec<u64>)> = vec![(Vec::new(), 1.0, Vec::new())];
        let (mut merged, mut most_files, mut next_lower) = (0u64, 0usize, 0u64);
        for _ in 0..checkpoints {
            for (_, share, files) in &mut partitions {
                files.insert(0, ((checkpoint as f64) * *share) as u64);
            }
            loop {
                let total: u64 = partitions.iter().flat_map(|(_, _, f)| f).sum();
                let Some((index, choice)) =
                    partitions
                        .iter()
                        .enumerate()
                        .find_map(|(i, (lower, _, files))| {
                            let split_bytes = policy.split_bytes(total, lower);
                            policy.choose(files, split_bytes).map(|c| (i, c))
                        })
                else {
                    break;
                };
                let (lower, share, files) = partitions[index].clone();
                match choice {
                    MergeChoice::Newest(count) => {
                        let bytes: u64 = files[..count].iter().sum();
                        merged += bytes;
                        let mut rest = files[count..].to_vec();
                        rest.insert(0, bytes);
                        partitions[index].2 = rest;
                    }
                    MergeChoice::Whole { piece_bytes } => {
                        let bytes: u64 = files.iter().sum();
                        merged += bytes;
                        let pieces = bytes.div_ceil(piece_bytes).max(1);
                        let new = (0..pieces)
                            .map(|piece| {
                                let lower = if piece == 0 {
                                    lower.clone()
                                } else {
                                    next_lower += 1;
                                    next_lower.to_be_bytes().to_vec()
                                };
                                (lower, share / pieces as f64, vec![bytes / pieces])
                            })
                            .collect::<Vec<_>>();
                        partitions.splice(index..=index, new);
                    }
                }
            }
            let most = partitions.iter().map(|(_, _, f)| f.len()).max().unwrap();
            most_files = most_files.max(most);
        }
        (
            merged as f64 / (checkpoint * checkpoints) as f64,
            most_files,
        )
    }

    #[test]
    fn merges_rewrite_each_byte_a_few_times_whatever_the_size() {
        let policy = MergePolicy {
            max_files: 8,
            partition_bytes: 256 << 20,
        };
        // 64 MiB checkpoints: 2.3 GB (the 20M-key benchmark), then 10x that.
        let (small, small_files) = simulate(policy, 64 << 20, 36);
        let (large, large_files) = simulate(policy, 64 << 20, 360);
        println!(
            "merges wrote {small:.2}x at 2.3 GB, {large:.2}x at 23 GB; at most {small_files} and {large_files} files per partition"
        );
        assert!(small < 3.0, "{small}");
        assert!(large < 4.5, "{large}");
        assert!(small_files <= 8 && large_files <= 8);
    }
}
