//! The MANIFEST file (specified in `format/manifest.md`): the state of the
//! database that is not in the WAL, as one protobuf `Manifest` behind a
//! binary header with magic number, format version, length and checksum.
//!
//! It is replaced whole: written under a temporary name, fsynced, renamed
//! over `MANIFEST`, and the directory fsynced. A crash at any point leaves
//! either the old manifest or the new one, both complete.
//!
//! Two copies are kept, `MANIFEST` and `MANIFEST.copy`, each replaced the
//! same way, one after the other, so that one damaged sector cannot make
//! the database unopenable: a reader takes the valid copy with the larger
//! `generation`. Files a new manifest stops naming are deleted only after
//! both copies are durable, so the older copy, which a crash between the
//! two replacements leaves, still names only files that exist.

use std::path::{Path, PathBuf};

use prost::Message;

use crate::error::{Error, Result};
use crate::files;
use crate::io::FileSystem;
use crate::proto::Manifest;
use crate::wal::format::le_u32;

/// First 8 bytes of the MANIFEST file.
pub const MANIFEST_MAGIC: [u8; 8] = *b"mapstMAN";
/// The manifest format version this build writes and the newest it reads.
pub const MANIFEST_FORMAT_VERSION: u32 = 5;
/// The oldest manifest format version this build reads (version 1 had no
/// keyspaces; its files all hold the default keyspace).
pub const OLDEST_READABLE_MANIFEST_VERSION: u32 = 1;
/// Bytes before the protobuf payload.
pub const MANIFEST_HEADER_BYTES: usize = 20;
/// Largest manifest payload accepted (it lists files; 64 MiB is far beyond
/// any real database and keeps a hostile length from driving allocation).
pub const MAX_MANIFEST_PAYLOAD_BYTES: usize = 64 << 20;

/// Encodes a manifest into the bytes of a MANIFEST file.
pub fn encode(manifest: &Manifest) -> Vec<u8> {
    let payload = manifest.encode_to_vec();
    let mut out = Vec::with_capacity(MANIFEST_HEADER_BYTES + payload.len());
    out.extend_from_slice(&MANIFEST_MAGIC);
    out.extend_from_slice(&MANIFEST_FORMAT_VERSION.to_le_bytes());
    // The payload is a few kilobytes; the reader refuses anything over the limit.
    out.extend_from_slice(&(payload.len() as u32).to_le_bytes());
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&out[8..16]);
    hasher.update(&payload);
    out.extend_from_slice(&hasher.finalize().to_le_bytes());
    out.extend_from_slice(&payload);
    out
}

/// Why MANIFEST bytes were refused.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum DecodeError {
    /// Damaged or not a manifest; the offset of the problem and what it is.
    Corrupt(u64, String),
    /// A valid manifest of a newer format version.
    UnsupportedVersion(u32),
}

/// Decodes the bytes of a MANIFEST file, checking everything.
pub fn decode(bytes: &[u8]) -> Result<Manifest, DecodeError> {
    if bytes.len() < MANIFEST_HEADER_BYTES {
        return Err(DecodeError::Corrupt(
            0,
            format!("{} bytes is shorter than the header", bytes.len()),
        ));
    }
    if bytes[0..8] != MANIFEST_MAGIC {
        return Err(DecodeError::Corrupt(0, "wrong magic number".into()));
    }
    let length = le_u32(&bytes[12..16]) as usize;
    if length > MAX_MANIFEST_PAYLOAD_BYTES || length != bytes.len() - MANIFEST_HEADER_BYTES {
        return Err(DecodeError::Corrupt(
            12,
            format!(
                "payload length {length} does not match the file ({} bytes after the header)",
                bytes.len() - MANIFEST_HEADER_BYTES
            ),
        ));
    }
    let payload = &bytes[MANIFEST_HEADER_BYTES..];
    let mut hasher = crc32fast::Hasher::new();
    hasher.update(&bytes[8..16]);
    hasher.update(payload);
    if !crate::checksum::matches(le_u32(&bytes[16..20]), hasher.finalize()) {
        return Err(DecodeError::Corrupt(16, "checksum mismatch".into()));
    }
    // Checked after the checksum, which covers it: a flipped bit in the
    // version field is corruption, not a newer format.
    let version = le_u32(&bytes[8..12]);
    if !(OLDEST_READABLE_MANIFEST_VERSION..=MANIFEST_FORMAT_VERSION).contains(&version) {
        return Err(DecodeError::UnsupportedVersion(version));
    }
    let manifest = Manifest::decode(payload).map_err(|e| {
        DecodeError::Corrupt(
            MANIFEST_HEADER_BYTES as u64,
            format!("payload does not decode: {e}"),
        )
    })?;
    if manifest.next_file_number == 0 {
        return Err(DecodeError::Corrupt(
            MANIFEST_HEADER_BYTES as u64,
            "next file number is 0".into(),
        ));
    }
    Ok(manifest)
}

/// The two copies of the manifest, in the order they are replaced.
pub const COPIES: [&str; 2] = [files::MANIFEST, files::MANIFEST_COPY];

/// The manifest a directory holds, as [`read`] found it.
#[derive(Debug)]
pub struct Found {
    /// The valid copy with the larger generation.
    pub manifest: Manifest,
    /// Both copies are valid and of that generation. When not, the other
    /// copy should be written again (a crash between the two replacements,
    /// a damaged copy, or a database from before version 4 with one copy).
    pub both_copies: bool,
    /// The copies that could not be read.
    pub damaged: Vec<PathBuf>,
}

/// Reads and checks both copies of the manifest in `dir`; `None` if
/// neither exists. If neither is valid, the error is the first copy's (or
/// the second's, if the first is missing).
pub fn read(fs: &dyn FileSystem, dir: &Path) -> Result<Option<Found>> {
    let mut valid: Vec<Manifest> = Vec::new();
    let mut damaged = Vec::new();
    let mut errors = Vec::new();
    let mut present = 0;
    for name in COPIES {
        let path = dir.join(name);
        if fs
            .entry_kind(&path)
            .map_err(|e| Error::io("stat", &path, e))?
            .is_none()
        {
            continue;
        }
        present += 1;
        match read_copy(fs, &path) {
            Ok(manifest) => valid.push(manifest),
            // A newer format is not damage: the other copy is of it too.
            Err(error @ Error::UnsupportedFormatVersion { .. }) => return Err(error),
            Err(error) => {
                damaged.push(path);
                errors.push(error);
            }
        }
    }
    // The first of the largest generation: with equal generations both
    // copies hold the same manifest.
    let mut newest: Option<Manifest> = None;
    for manifest in valid.iter() {
        if newest
            .as_ref()
            .is_none_or(|best| manifest.generation > best.generation)
        {
            newest = Some(manifest.clone());
        }
    }
    match newest {
        Some(manifest) => {
            let both_copies = valid.len() == 2 && valid[0].generation == valid[1].generation;
            Ok(Some(Found {
                manifest,
                both_copies,
                damaged,
            }))
        }
        None if present == 0 => Ok(None),
        None => Err(errors.swap_remove(0)),
    }
}

/// Reads and checks one copy.
fn read_copy(fs: &dyn FileSystem, path: &Path) -> Result<Manifest> {
    let bytes = fs.read(path).map_err(|e| Error::io("read", path, e))?;
    decode(&bytes).map_err(|error| match error {
        DecodeError::Corrupt(offset, reason) => Error::corruption(path, offset, reason),
        DecodeError::UnsupportedVersion(found) => Error::UnsupportedFormatVersion {
            path: path.to_path_buf(),
            found,
            supported: MANIFEST_FORMAT_VERSION,
        },
    })
}

/// Replaces both copies of the manifest in `dir` with `manifest`, one
/// generation above the one it replaces (its `generation` is raised).
/// Each copy is replaced atomically and durably: write the temporary file,
/// fsync it, rename it over the copy, fsync the directory. The first
/// copy's rename is the moment the new state takes effect.
pub fn write(fs: &dyn FileSystem, dir: &Path, manifest: &mut Manifest) -> Result<()> {
    manifest.generation += 1;
    let bytes = encode(manifest);
    for name in COPIES {
        write_copy(fs, dir, name, &bytes)?;
    }
    Ok(())
}

fn write_copy(fs: &dyn FileSystem, dir: &Path, name: &str, bytes: &[u8]) -> Result<()> {
    let path = dir.join(name);
    let temp = dir.join(files::temp_name(name));
    if fs
        .entry_kind(&temp)
        .map_err(|e| Error::io("stat", &temp, e))?
        .is_some()
    {
        // Left by a failed earlier attempt of this process.
        fs.remove_file(&temp)
            .map_err(|e| Error::io("remove", &temp, e))?;
    }
    let mut file = fs
        .create_new(&temp)
        .map_err(|e| Error::io("create", &temp, e))?;
    file.write_all_at(0, bytes)
        .map_err(|e| Error::io("write", &temp, e))?;
    file.sync_all().map_err(|e| Error::io("fsync", &temp, e))?;
    drop(file);
    fs.rename(&temp, &path)
        .map_err(|e| Error::io("rename", &temp, e))?;
    fs.sync_dir(dir)
        .map_err(|e| Error::io("fsync directory", dir, e))
}

/// A new database's identity: 16 bytes that differ between databases
/// (from the standard library's randomly keyed hasher, the time and the
/// process id; not secret, only unlikely to repeat).
pub fn new_database_id() -> Vec<u8> {
    use std::hash::{BuildHasher, Hasher};
    let nanos = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos());
    let mut id = Vec::with_capacity(16);
    for half in 0..2u8 {
        let mut hasher = std::collections::hash_map::RandomState::new().build_hasher();
        hasher.write_u128(nanos);
        hasher.write_u32(std::process::id());
        hasher.write_u8(half);
        id.extend_from_slice(&hasher.finish().to_le_bytes());
    }
    id
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Manifest {
        Manifest {
            checkpoint_seq: 77,
            wal_start_segment: 3,
            next_file_number: 9,
            snapshot_files: Vec::new(),
            keyspaces: vec![crate::proto::KeyspaceMeta {
                id: 3,
                name: "users".into(),
                created_seq: 12,
            }],
            next_keyspace_id: 4,
            history_start: Some(70),
            database_id: vec![7; 16].into(),
            generation: 5,
            partitions: vec![crate::proto::KeyspacePartitions {
                keyspace: 3,
                split_keys: vec![bytes::Bytes::from_static(b"m")],
            }],
        }
    }

    #[test]
    fn round_trips() {
        assert_eq!(decode(&encode(&sample())), Ok(sample()));
    }

    #[test]
    fn every_flip_and_cut_is_refused() {
        let bytes = encode(&sample());
        for i in 0..bytes.len() {
            for bit in 0..8 {
                let mut damaged = bytes.clone();
                damaged[i] ^= 1 << bit;
                assert!(
                    decode(&damaged).is_err(),
                    "flip of bit {bit} at byte {i} accepted"
                );
            }
        }
        for len in 0..bytes.len() {
            assert!(decode(&bytes[..len]).is_err(), "cut at {len} accepted");
        }
    }
}
