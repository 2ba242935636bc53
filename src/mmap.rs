//! Read-only memory maps of immutable files. This is the only module of
//! mapstore with `unsafe` code.
//!
//! A map is wrapped in [`Bytes`], so keys and values read from a snapshot
//! file are zero-copy slices that keep the mapping alive for as long as any
//! of them is held, even after the file is deleted (on Unix, an unlinked
//! file stays readable through an existing map).

use std::fs::File;
use std::io;
use std::path::Path;

use bytes::Bytes;

/// Maps the whole file at `path` read-only.
///
/// Only for files that are never modified once written: mapstore writes a
/// snapshot file under a temporary name, fsyncs and renames it, and never
/// opens it for writing again.
pub(crate) fn map_read_only(path: &Path) -> io::Result<Bytes> {
    let file = File::open(path)?;
    if file.metadata()?.len() == 0 {
        // mmap refuses empty files; an empty map has nothing to read anyway.
        return Ok(Bytes::new());
    }
    // SAFETY: `Mmap::map` is unsafe because the mapped memory changes (or, if
    // the file shrinks, faults) when another process modifies the file. The
    // files mapped here are immutable by construction: they were fully
    // written and fsynced under a temporary name before being renamed into
    // place, mapstore never opens them for writing, and the directory lock
    // keeps a second mapstore instance out. Editing a database's files by
    // hand while it is open is outside what any embedded engine can defend
    // against. The map is read-only, so no `&mut` aliasing can arise.
    let map = unsafe { memmap2::Mmap::map(&file)? };
    Ok(Bytes::from_owner(map))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_contents_and_outlives_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("f");
        std::fs::write(&path, b"hello, map").unwrap();
        let bytes = map_read_only(&path).unwrap();
        let slice = bytes.slice(7..);
        drop(bytes);
        std::fs::remove_file(&path).unwrap();
        assert_eq!(&slice[..], b"map");
    }

    #[test]
    fn an_empty_file_maps_to_no_bytes() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("empty");
        std::fs::write(&path, b"").unwrap();
        assert!(map_read_only(&path).unwrap().is_empty());
        assert!(map_read_only(&dir.path().join("missing")).is_err());
    }
}
