//! Building a snapshot file from versions in sorted order, streamed to disk
//! block by block, and installed durably (temporary name, fsync, rename,
//! directory fsync).

use std::path::{Path, PathBuf};

use super::bloom;
use super::format::{
    BLOCK_ALIGN, BLOCK_TARGET_BYTES, Footer, SNAPSHOT_FORMAT_VERSION, encode_bloom, encode_entry,
    encoded_entry_len, seal_block_into,
};
use super::index::encode_index;
use crate::error::{Error, Result};
use crate::files;
use crate::io::{FileSystem, WritableFile};

/// How many bytes of sealed blocks the writer gathers before one write:
/// enough that the system calls cost little next to copying the data.
const WRITE_CHUNK_BYTES: usize = 1 << 20;

/// What a finished snapshot file holds (recorded in the manifest).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub(crate) struct FileSummary {
    pub size_bytes: u64,
    pub entry_count: u64,
    pub smallest_key: Vec<u8>,
    pub largest_key: Vec<u8>,
    pub smallest_seq: u64,
    pub largest_seq: u64,
    /// The earliest expiry of a value in the file (0: none expires).
    pub earliest_expiry: u64,
}

/// Writes one snapshot file. Versions must be added in key order, and for
/// one key newest (highest sequence number) first.
pub(crate) struct SnapshotFileWriter<'a> {
    fs: &'a dyn FileSystem,
    dir: PathBuf,
    final_path: PathBuf,
    temp_path: PathBuf,
    file: Box<dyn WritableFile>,
    /// Entries of the block being built, and how many.
    block: Vec<u8>,
    block_entries: u32,
    /// File offset where the next block goes (a multiple of `BLOCK_ALIGN`).
    next_offset: u64,
    /// Sealed blocks not yet written, which go at file offset `out_offset`:
    /// written a megabyte at a time, not one system call per 4 KiB block.
    out: Vec<u8>,
    out_offset: u64,
    /// (offset, length, last key) of each written block.
    index: Vec<(u64, u32, Vec<u8>)>,
    key_hashes: Vec<u64>,
    last: Option<(Vec<u8>, u64)>,
    summary: FileSummary,
    /// The keyspace the file holds, written in its footer.
    keyspace: u32,
    /// Whether the file is a merge's output (`merge_output`).
    merged: bool,
}

impl<'a> SnapshotFileWriter<'a> {
    /// Starts writing `path` (under its temporary name).
    pub fn create(fs: &'a dyn FileSystem, dir: &Path, path: PathBuf) -> Result<Self> {
        let name = path
            .file_name()
            .map(|n| n.to_string_lossy().into_owned())
            .unwrap_or_default();
        let temp_path = dir.join(files::temp_name(&name));
        let file = fs
            .create_new(&temp_path)
            .map_err(|e| Error::io("create", &temp_path, e))?;
        Ok(SnapshotFileWriter {
            fs,
            dir: dir.to_path_buf(),
            final_path: path,
            temp_path,
            file,
            block: Vec::with_capacity(BLOCK_ALIGN),
            block_entries: 0,
            next_offset: 0,
            out: Vec::with_capacity(WRITE_CHUNK_BYTES + BLOCK_ALIGN),
            out_offset: 0,
            index: Vec::new(),
            key_hashes: Vec::new(),
            last: None,
            summary: FileSummary {
                smallest_seq: u64::MAX,
                ..FileSummary::default()
            },
            keyspace: 0,
            merged: false,
        })
    }

    /// Makes the file one of keyspace `keyspace` (0, the default, unless
    /// this is called).
    pub fn for_keyspace(mut self, keyspace: u32) -> Self {
        self.keyspace = keyspace;
        self
    }

    /// Marks the file as a full merge's output, whose inputs were every
    /// file of its keyspace numbered below it (in its footer): a repair that
    /// rebuilds the MANIFEST leaves out the older files of its keyspace.
    pub fn merge_output(mut self, merged: bool) -> Self {
        self.merged = merged;
        self
    }

    /// Adds one version (`None` is a tombstone) that expires at `expires`
    /// (microseconds since the Unix epoch; 0: never).
    pub fn add(&mut self, key: &[u8], seq: u64, value: Option<&[u8]>, expires: u64) -> Result<()> {
        let new_key = match &self.last {
            Some((last_key, last_seq)) => {
                let order = last_key.as_slice().cmp(key);
                if order.is_gt() || (order.is_eq() && *last_seq <= seq) {
                    return Err(Error::corruption(
                        &self.temp_path,
                        self.next_offset,
                        "versions given out of order while writing a snapshot file",
                    ));
                }
                order.is_lt()
            }
            None => true,
        };
        if new_key {
            self.key_hashes.push(bloom::key_hash(key));
        }
        // Close the block before this entry if the entry would overflow it.
        // A key's versions may end up in two blocks; readers handle that.
        // (Deciding before encoding keeps one block buffer for the whole
        // file; moving the entry to a fresh buffer cost the checkpoint
        // thread about 6% of a fill's processor time in regrowing it.)
        let expires = if value.is_some() { expires } else { 0 };
        let entry_len = encoded_entry_len(key, value, expires);
        if self.block_entries > 0 && self.block.len() + entry_len > BLOCK_TARGET_BYTES {
            self.flush_block()?;
        }
        encode_entry(&mut self.block, key, seq, value, expires);
        self.block_entries += 1;
        if expires != 0
            && (self.summary.earliest_expiry == 0 || expires < self.summary.earliest_expiry)
        {
            self.summary.earliest_expiry = expires;
        }
        if self.summary.entry_count == 0 {
            self.summary.smallest_key = key.to_vec();
        }
        self.summary.entry_count += 1;
        self.summary.smallest_seq = self.summary.smallest_seq.min(seq);
        self.summary.largest_seq = self.summary.largest_seq.max(seq);
        // The buffer is reused: one allocation per file, not per entry.
        match &mut self.last {
            Some((last_key, last_seq)) => {
                last_key.clear();
                last_key.extend_from_slice(key);
                *last_seq = seq;
            }
            None => self.last = Some((key.to_vec(), seq)),
        }
        Ok(())
    }

    /// Seals the current block and writes it at the next aligned offset.
    fn flush_block(&mut self) -> Result<()> {
        if self.block_entries == 0 {
            return Ok(());
        }
        let Some(last_key) = self.last.as_ref().map(|(key, _)| key.clone()) else {
            return Ok(());
        };
        // Zeros up to the block's aligned offset, then the block.
        let block_start = (self.next_offset - self.out_offset) as usize;
        self.out.resize(block_start, 0);
        seal_block_into(&mut self.out, self.block_entries, &self.block);
        let sealed_len = self.out.len() - block_start;
        // A block is at most one entry over the target; entries are bounded
        // by the key and value limits, far below 4 GiB.
        let len = u32::try_from(sealed_len).map_err(|_| Error::InvalidOptions {
            reason: "snapshot file block over 4 GiB".into(),
        })?;
        self.index.push((self.next_offset, len, last_key));
        self.next_offset = (self.next_offset + sealed_len as u64).div_ceil(BLOCK_ALIGN as u64)
            * BLOCK_ALIGN as u64;
        self.block.clear();
        self.block_entries = 0;
        if self.out.len() >= WRITE_CHUNK_BYTES {
            self.write_out()?;
        }
        Ok(())
    }

    /// Writes the buffered blocks, and asks for them to start going to the
    /// device. The zeros that pad the last one up to the next block's
    /// alignment are not in the buffer yet: the next block adds them in
    /// front of itself, and after the last block the index follows
    /// directly.
    ///
    /// Without the request, the kernel would hold most of the file until
    /// the fsync in [`finish`](Self::finish), then send it all at once (35
    /// MB for a 64 MiB memtable), and a WAL write queued behind it would
    /// wait for all of it: in a fill of a million keys in synced batches
    /// of 1,000, the batch that met a checkpoint's fsync took 17-26 ms
    /// instead of about 0.2 ms. With it, a megabyte at a time goes out
    /// while the next is encoded.
    fn write_out(&mut self) -> Result<()> {
        self.file
            .write_all_at(self.out_offset, &self.out)
            .map_err(|e| Error::io("write", &self.temp_path, e))?;
        // Only a hint, changing nothing on disk: if the kernel refuses it,
        // the fsync in `finish` still writes, and checks, every byte.
        let _ = self
            .file
            .start_writeback(self.out_offset, self.out.len() as u64);
        self.out_offset += self.out.len() as u64;
        self.out.clear();
        Ok(())
    }

    /// How many versions were added.
    pub fn entries(&self) -> u64 {
        self.summary.entry_count
    }

    /// The bytes of the blocks so far, the one being built included.
    pub fn bytes_so_far(&self) -> u64 {
        self.next_offset + self.block.len() as u64
    }

    /// Writes the index, filter and footer, makes the file durable and
    /// renames it into place; returns what it holds.
    pub fn finish(mut self) -> Result<FileSummary> {
        self.flush_block()?;
        self.write_out()?;
        let index = encode_index(&self.index);
        let bloom_section = encode_bloom(bloom::PROBES, &bloom::build(&self.key_hashes));
        // The index follows the last block directly; padding to the block
        // alignment would only waste space.
        let index_offset = match self.index.last() {
            Some((offset, len, _)) => offset + u64::from(*len),
            None => 0,
        };
        let footer = Footer {
            version: SNAPSHOT_FORMAT_VERSION,
            index_offset,
            index_len: index.len() as u64,
            bloom_offset: index_offset + index.len() as u64,
            bloom_len: bloom_section.len() as u64,
            entry_count: self.summary.entry_count,
            keyspace: self.keyspace,
            merged: self.merged,
        };
        let mut tail = index;
        tail.extend_from_slice(&bloom_section);
        tail.extend_from_slice(&footer.encode());
        self.file
            .write_all_at(index_offset, &tail)
            .map_err(|e| Error::io("write", &self.temp_path, e))?;
        // Zero padding written after the last block is not part of the file.
        let size = index_offset + tail.len() as u64;
        self.file
            .set_len(size)
            .map_err(|e| Error::io("truncate", &self.temp_path, e))?;
        self.file
            .sync_all()
            .map_err(|e| Error::io("fsync", &self.temp_path, e))?;
        self.fs
            .rename(&self.temp_path, &self.final_path)
            .map_err(|e| Error::io("rename", &self.temp_path, e))?;
        self.fs
            .sync_dir(&self.dir)
            .map_err(|e| Error::io("fsync directory", &self.dir, e))?;
        self.summary.size_bytes = size;
        if let Some((key, _)) = self.last.take() {
            self.summary.largest_key = key;
        }
        if self.summary.entry_count == 0 {
            self.summary.smallest_seq = 0;
        }
        Ok(self.summary)
    }

    /// Gives up on the file and removes its temporary.
    pub fn abandon(self) {
        let _ = self.fs.remove_file(&self.temp_path);
    }
}
