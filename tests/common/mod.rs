//! Helpers shared by the integration tests.
#![allow(dead_code)]

use std::collections::BTreeMap;
use std::fs;
use std::path::Path;

use mapstore::{Durability, Options};

/// A small deterministic random number generator (SplitMix64), so that every
/// randomized test is reproducible from its seed.
#[derive(Clone, Debug)]
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// A number in `0..n`.
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }

    pub fn chance(&mut self, percent: u64) -> bool {
        self.below(100) < percent
    }

    pub fn bytes(&mut self, max_len: usize) -> Vec<u8> {
        let len = self.below(max_len as u64 + 1) as usize;
        (0..len).map(|_| self.next_u64() as u8).collect()
    }
}

/// A seed from the environment variable `name`, or `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// Options for tests: small WAL segments so that rotation happens, and the
/// given durability.
pub fn small_options(durability: Durability) -> Options {
    Options::default()
        .durability(durability)
        .wal_segment_bytes(64 * 1024)
}

/// Every entry of an iterator, panicking on errors.
pub fn collect(
    iter: impl Iterator<Item = mapstore::Result<(mapstore::Slice, mapstore::Slice)>>,
) -> Vec<(Vec<u8>, Vec<u8>)> {
    iter.map(|entry| {
        let (key, value) = entry.expect("iteration failed");
        (key.to_vec(), value.to_vec())
    })
    .collect()
}

/// The model's entries in order.
pub fn model_entries(model: &BTreeMap<Vec<u8>, Vec<u8>>) -> Vec<(Vec<u8>, Vec<u8>)> {
    model.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Every file in `dir` with its contents, sorted by name: two listings are
/// equal only if nothing in the directory changed.
pub fn directory_listing(dir: &Path) -> Vec<(String, Vec<u8>)> {
    let mut listing: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| {
            let entry = entry.unwrap();
            // A subdirectory lists as empty contents.
            let contents = fs::read(entry.path()).unwrap_or_default();
            (entry.file_name().to_string_lossy().into_owned(), contents)
        })
        .collect();
    listing.sort();
    listing
}

/// Runs the test `test` of this test binary again as a child process, with
/// the environment `env` (which tells the test to act as the child), waits
/// until it prints a line containing "ready", lets it run for `run_for`,
/// kills it with SIGKILL, and returns the lines it printed (a line the kill
/// cut short is among them, as far as it got).
pub fn run_child_until_killed(
    test: &str,
    env: &[(&str, String)],
    run_for: std::time::Duration,
) -> Vec<String> {
    use std::io::{BufRead, BufReader};
    use std::process::{Command, Stdio};
    use std::time::{Duration, Instant};

    let mut child = Command::new(std::env::current_exe().unwrap())
        .args([test, "--exact", "--nocapture"])
        .envs(env.iter().map(|(name, value)| (name, value)))
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (lines, received) = std::sync::mpsc::channel();
    let reader = std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines() {
            let Ok(line) = line else { break };
            if lines.send(line).is_err() {
                break;
            }
        }
    });
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let left = deadline.saturating_duration_since(Instant::now());
        let line = received
            .recv_timeout(left)
            .expect("the child did not report ready");
        if line.contains("ready") {
            break;
        }
    }
    std::thread::sleep(run_for);
    child.kill().unwrap(); // SIGKILL
    child.wait().unwrap();
    reader.join().unwrap();
    received.try_iter().collect()
}

/// The files in `dir` whose names end in `.{extension}`, sorted.
pub fn files_with_extension(dir: &std::path::Path, extension: &str) -> Vec<std::path::PathBuf> {
    let mut found: Vec<_> = fs::read_dir(dir)
        .unwrap()
        .map(|entry| entry.unwrap().path())
        .filter(|path| path.extension().is_some_and(|ext| ext == extension))
        .collect();
    found.sort();
    found
}
