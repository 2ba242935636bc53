//! The snapshot files of an open database, arranged as the MANIFEST
//! describes them (`format/manifest.md`, "Partitions").
//!
//! Each keyspace's key range is cut into *partitions* by split keys. Every
//! file lies inside one partition, and each partition is a stack of files,
//! newest first: a checkpoint puts one file on top of each partition it has
//! keys for, and a merge replaces the newest files of one partition by one
//! (or, merging all of them, by one file per new partition when the
//! partition has grown too large). Partitions keep each merge small:
//! whatever the database's size, a merge reads and rewrites one partition
//! at most, and needs at most that much extra space.
//!
//! Readers do not see partitions: they read [`FileRun`]s, the *i*-th
//! newest file of every partition of a keyspace, which have disjoint key
//! ranges and together hold exactly what the partitions do.

use std::collections::BTreeMap;
use std::sync::Arc;

use bytes::Bytes;

use crate::proto::{KeyspacePartitions, Manifest, SnapshotFileMeta};
use crate::snapshot_file::SnapshotFile;
use crate::snapshot_file::run::{FileRun, RunFile};

/// An open snapshot file with its MANIFEST entry.
#[derive(Debug, Clone)]
pub(crate) struct LiveFile {
    pub file: Arc<SnapshotFile>,
    pub meta: SnapshotFileMeta,
}

impl LiveFile {
    /// Its size in bytes.
    pub fn size(&self) -> u64 {
        self.file.size()
    }
}

/// One partition of a keyspace: the keys from `lower` (the first
/// partition: from the smallest key) up to the next partition's `lower`.
#[derive(Debug, Clone)]
pub(crate) struct Partition {
    /// Empty for the first partition of a keyspace.
    pub lower: Bytes,
    /// Newest first.
    pub files: Vec<LiveFile>,
}

impl Partition {
    /// The bytes of all its files.
    pub fn size(&self) -> u64 {
        self.files.iter().map(LiveFile::size).sum()
    }
}

/// Every live snapshot file, by keyspace and partition.
#[derive(Debug, Clone, Default)]
pub(crate) struct FileSet {
    /// For each keyspace that has partitions, in key order (never empty).
    keyspaces: BTreeMap<u32, Vec<Partition>>,
}

impl FileSet {
    /// The arrangement `manifest` describes of `files`, which are its
    /// snapshot files, opened, in its order; an `Err` says what in the
    /// MANIFEST is inconsistent (see [`check`]).
    pub fn from_manifest(
        manifest: &Manifest,
        files: Vec<Arc<SnapshotFile>>,
    ) -> Result<FileSet, String> {
        let mut set = FileSet {
            keyspaces: split_partitions(manifest)?,
        };
        for (meta, file) in manifest.snapshot_files.iter().zip(files) {
            let partitions = set.partitions_mut(meta.keyspace);
            let index = place(partitions, meta)?;
            partitions[index].files.push(LiveFile {
                file,
                meta: meta.clone(),
            });
        }
        Ok(set)
    }

    /// Writes the files and the split keys into `manifest`.
    pub fn write_to(&self, manifest: &mut Manifest) {
        manifest.snapshot_files = self.files().map(|live| live.meta.clone()).collect();
        manifest.partitions = self
            .keyspaces
            .iter()
            .filter(|(_, partitions)| partitions.len() > 1)
            .map(|(&keyspace, partitions)| KeyspacePartitions {
                keyspace,
                split_keys: partitions[1..].iter().map(|p| p.lower.clone()).collect(),
            })
            .collect();
    }

    /// Every file: keyspace by keyspace, partition by partition, newest
    /// first within each.
    pub fn files(&self) -> impl Iterator<Item = &LiveFile> {
        self.keyspaces
            .values()
            .flatten()
            .flat_map(|partition| partition.files.iter())
    }

    /// How many files there are.
    pub fn len(&self) -> usize {
        self.files().count()
    }

    /// The keyspaces that have files or partitions.
    pub fn keyspaces(&self) -> Vec<u32> {
        self.keyspaces.keys().copied().collect()
    }

    /// The partitions of `keyspace` (one, empty, if it has none).
    pub fn partitions(&self, keyspace: u32) -> &[Partition] {
        match self.keyspaces.get(&keyspace) {
            Some(partitions) => partitions,
            None => &[],
        }
    }

    fn partitions_mut(&mut self, keyspace: u32) -> &mut Vec<Partition> {
        self.keyspaces.entry(keyspace).or_insert_with(|| {
            vec![Partition {
                lower: Bytes::new(),
                files: Vec::new(),
            }]
        })
    }

    /// The keys at which a checkpoint cuts its file of `keyspace`: every
    /// partition's lower bound but the first's.
    pub fn split_keys(&self, keyspace: u32) -> Vec<Bytes> {
        self.partitions(keyspace)
            .iter()
            .skip(1)
            .map(|partition| partition.lower.clone())
            .collect()
    }

    /// Puts a checkpoint's file on top of the partition holding its keys
    /// (the checkpoint cut its files at [`split_keys`](Self::split_keys)).
    pub fn add_newest(&mut self, live: LiveFile) {
        let partitions = self.partitions_mut(live.meta.keyspace);
        let index = partition_index(partitions, &live.meta.smallest_key);
        partitions[index].files.insert(0, live);
    }

    /// Replaces the `count` newest files of partition `index` of
    /// `keyspace` by `output` (a merge's, at most one file), and returns the
    /// replaced files.
    pub fn replace_newest(
        &mut self,
        keyspace: u32,
        index: usize,
        count: usize,
        output: Option<LiveFile>,
    ) -> Vec<LiveFile> {
        let partition = &mut self.partitions_mut(keyspace)[index];
        let count = count.min(partition.files.len());
        let replaced: Vec<LiveFile> = partition.files.drain(..count).collect();
        if let Some(output) = output {
            partition.files.insert(0, output);
        }
        replaced
    }

    /// Replaces every file of partition `index` of `keyspace` by `outputs`
    /// (a merge of all of them, in key order), each of which becomes a
    /// partition of its own when there are several; returns the replaced
    /// files.
    pub fn replace_partition(
        &mut self,
        keyspace: u32,
        index: usize,
        outputs: Vec<LiveFile>,
    ) -> Vec<LiveFile> {
        let partitions = self.partitions_mut(keyspace);
        let lower = partitions[index].lower.clone();
        let replaced = std::mem::take(&mut partitions[index].files);
        let mut new = Vec::with_capacity(outputs.len().max(1));
        for (position, output) in outputs.into_iter().enumerate() {
            let lower = if position == 0 {
                lower.clone()
            } else {
                output.meta.smallest_key.clone()
            };
            new.push(Partition {
                lower,
                files: vec![output],
            });
        }
        if new.is_empty() {
            new.push(Partition {
                lower,
                files: Vec::new(),
            });
        }
        partitions.splice(index..=index, new);
        replaced
    }

    /// Takes every keyspace `exists` rejects out of the set, with its
    /// partitions; returns its files.
    pub fn retain_keyspaces(&mut self, exists: impl Fn(u32) -> bool) -> Vec<LiveFile> {
        let gone: Vec<u32> = self
            .keyspaces
            .keys()
            .copied()
            .filter(|&keyspace| !exists(keyspace))
            .collect();
        gone.into_iter()
            .filter_map(|keyspace| self.keyspaces.remove(&keyspace))
            .flatten()
            .flat_map(|partition| partition.files)
            .collect()
    }

    /// The bytes of `keyspace`'s files.
    pub fn keyspace_size(&self, keyspace: u32) -> u64 {
        self.partitions(keyspace).iter().map(Partition::size).sum()
    }

    /// The runs readers search, newest first within each keyspace.
    pub fn runs(&self) -> Vec<Arc<FileRun>> {
        let mut runs = Vec::new();
        for (&keyspace, partitions) in &self.keyspaces {
            let depth = partitions.iter().map(|p| p.files.len()).max().unwrap_or(0);
            for position in 0..depth {
                let files = partitions
                    .iter()
                    .filter_map(|partition| partition.files.get(position))
                    .map(|live| RunFile {
                        file: live.file.clone(),
                        smallest_key: live.meta.smallest_key.clone(),
                        largest_key: live.meta.largest_key.clone(),
                    })
                    .collect();
                runs.push(Arc::new(FileRun::new(keyspace, files)));
            }
        }
        runs
    }
}

/// Checks what `manifest` says of partitions (format version 5): split
/// keys strictly ascending and non-empty, each keyspace listed once, and
/// every file inside one partition. What the fuzzer's MANIFEST target
/// runs after decoding; opening a database checks the same.
pub(crate) fn check(manifest: &Manifest) -> Result<(), String> {
    let partitions = split_partitions(manifest)?;
    for meta in &manifest.snapshot_files {
        if let Some(partitions) = partitions.get(&meta.keyspace) {
            place(partitions, meta)?;
        }
    }
    Ok(())
}

/// The empty partitions of each keyspace `manifest` lists split keys for.
fn split_partitions(manifest: &Manifest) -> Result<BTreeMap<u32, Vec<Partition>>, String> {
    let mut keyspaces = BTreeMap::new();
    for entry in &manifest.partitions {
        let mut partitions = vec![Partition {
            lower: Bytes::new(),
            files: Vec::new(),
        }];
        for split in &entry.split_keys {
            let previous = &partitions[partitions.len() - 1].lower;
            if split.is_empty() || split <= previous {
                return Err(format!(
                    "the split keys of keyspace {} are not ascending and non-empty",
                    entry.keyspace
                ));
            }
            partitions.push(Partition {
                lower: split.clone(),
                files: Vec::new(),
            });
        }
        if keyspaces.insert(entry.keyspace, partitions).is_some() {
            return Err(format!(
                "keyspace {} has its partitions listed twice",
                entry.keyspace
            ));
        }
    }
    Ok(keyspaces)
}

/// The partition a file whose MANIFEST entry is `meta` lies in; an `Err`
/// if its key range crosses a split key.
fn place(partitions: &[Partition], meta: &SnapshotFileMeta) -> Result<usize, String> {
    let index = partition_index(partitions, &meta.smallest_key);
    if partitions.len() > 1 {
        if meta.largest_key < meta.smallest_key {
            return Err(format!(
                "snapshot file {} has its largest key below its smallest",
                meta.file_number
            ));
        }
        if partitions
            .get(index + 1)
            .is_some_and(|next| meta.largest_key >= next.lower)
        {
            return Err(format!(
                "snapshot file {} crosses a partition's split key",
                meta.file_number
            ));
        }
    }
    Ok(index)
}

/// The partition holding `key`.
fn partition_index(partitions: &[Partition], key: &[u8]) -> usize {
    partitions
        .partition_point(|partition| &partition.lower[..] <= key)
        .saturating_sub(1)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::io::{FileSystem, RealFileSystem};
    use crate::snapshot_file::SnapshotFileWriter;

    /// A file of keyspace 0 holding `keys` (one version each).
    fn live_file(dir: &std::path::Path, number: u64, keys: &[&str]) -> LiveFile {
        let fs: Arc<dyn FileSystem> = Arc::new(RealFileSystem);
        let path = dir.join(format!("{number}.snap"));
        let mut writer = SnapshotFileWriter::create(&*fs, dir, path.clone()).unwrap();
        for (seq, key) in keys.iter().enumerate() {
            writer
                .add(key.as_bytes(), number * 100 + seq as u64, Some(b"v"), 0)
                .unwrap();
        }
        let summary = writer.finish().unwrap();
        LiveFile {
            file: Arc::new(SnapshotFile::open(fs, &path, number).unwrap()),
            meta: crate::checkpoint::file_meta(number, 0, &summary, 0),
        }
    }

    fn numbers(run: &FileRun) -> Vec<u64> {
        run.files().map(|file| file.number()).collect()
    }

    #[test]
    fn runs_take_the_nth_newest_file_of_every_partition() {
        let dir = tempfile::tempdir().unwrap();
        let mut set = FileSet::default();
        // A whole-partition merge that split the keyspace in two.
        set.add_newest(live_file(dir.path(), 1, &["a", "z"]));
        let outputs = vec![
            live_file(dir.path(), 2, &["a", "b"]),
            live_file(dir.path(), 3, &["m", "z"]),
        ];
        set.replace_partition(0, 0, outputs);
        assert_eq!(set.split_keys(0), vec![Bytes::from_static(b"m")]);
        // A checkpoint cut at "m", then one with keys on one side only.
        set.add_newest(live_file(dir.path(), 4, &["c"]));
        set.add_newest(live_file(dir.path(), 5, &["n"]));
        set.add_newest(live_file(dir.path(), 6, &["x"]));
        let runs = set.runs();
        let runs: Vec<Vec<u64>> = runs.iter().map(|run| numbers(run)).collect();
        assert_eq!(runs, vec![vec![4, 6], vec![2, 5], vec![3]]);
        let first = &set.runs()[0];
        assert_eq!(first.file_for(b"c").map(|f| f.number()), Some(4));
        assert_eq!(first.file_for(b"x").map(|f| f.number()), Some(6));
        assert_eq!(first.file_for(b"d").map(|f| f.number()), None);
        assert_eq!(first.file_for(b"w").map(|f| f.number()), None);

        // The MANIFEST says the same.
        let mut manifest = Manifest::default();
        set.write_to(&mut manifest);
        let order: Vec<u64> = manifest
            .snapshot_files
            .iter()
            .map(|m| m.file_number)
            .collect();
        assert_eq!(order, vec![4, 2, 6, 5, 3]);
        let files = set.files().map(|live| live.file.clone()).collect();
        let again = FileSet::from_manifest(&manifest, files).unwrap();
        let runs: Vec<Vec<u64>> = again.runs().iter().map(|run| numbers(run)).collect();
        assert_eq!(runs, vec![vec![4, 6], vec![2, 5], vec![3]]);

        // A merge of the newest two files of the second partition.
        let replaced = set.replace_newest(0, 1, 2, Some(live_file(dir.path(), 7, &["n", "x"])));
        let replaced: Vec<u64> = replaced.iter().map(|live| live.meta.file_number).collect();
        assert_eq!(replaced, vec![6, 5]);
        let runs: Vec<Vec<u64>> = set.runs().iter().map(|run| numbers(run)).collect();
        assert_eq!(runs, vec![vec![4, 7], vec![2, 3]]);
    }

    #[test]
    fn a_manifest_whose_files_cross_a_split_key_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let file = live_file(dir.path(), 1, &["a", "z"]);
        let manifest = Manifest {
            snapshot_files: vec![file.meta.clone()],
            partitions: vec![KeyspacePartitions {
                keyspace: 0,
                split_keys: vec![Bytes::from_static(b"m")],
            }],
            ..Manifest::default()
        };
        let error = FileSet::from_manifest(&manifest, vec![file.file.clone()]).unwrap_err();
        assert!(error.contains("crosses"), "{error}");
        let unordered = Manifest {
            partitions: vec![KeyspacePartitions {
                keyspace: 0,
                split_keys: vec![Bytes::from_static(b"m"), Bytes::from_static(b"c")],
            }],
            ..Manifest::default()
        };
        let error = FileSet::from_manifest(&unordered, Vec::new()).unwrap_err();
        assert!(error.contains("ascending"), "{error}");
    }
}
