//! Side-by-side comparison of mapstore with redb, fjall and sled.
//!
//! ```text
//! cargo bench --features compare --bench compare
//! ```
//!
//! Every engine runs the same workloads on the same keys (16 bytes) and values
//! (100 incompressible bytes), from a fixed seed, in temporary directories on
//! the same file system. Each engine runs in its own child process, so that
//! its peak resident memory is its own and one engine's background threads
//! cannot slow the next. The run also measures the machine's own limits,
//! and, for mapstore alone, two more reopens after a crash: with a full
//! memtable's worth of log and with the most log one memtable gets.
//! Beside the synced writes it reports what each write cost the block
//! device (writes of data, KiB and cache flushes, from the kernel's
//! counters for the device; shown without a ratio): a flush per write is a
//! device round trip.
//!
//! Environment:
//! - `MAPSTORE_COMPARE_KEYS`: keys in the fills (1,000,000 by default);
//! - `MAPSTORE_COMPARE_SECONDS`: length of each timed workload (2 by default);
//! - `MAPSTORE_COMPARE_ENGINES`: a comma-separated subset of
//!   `mapstore,redb,fjall,sled`;
//! - `MAPSTORE_COMPARE_OUT`: where `compare.md` and `compare.json` go
//!   (`target/compare` by default). `benches/compare_chart.py` draws the chart.
//!
//! `cargo bench --features compare --bench compare -- --scale` runs the
//! scale comparison instead (`MAPSTORE_SCALE_KEYS` keys, 20,000,000 by
//! default, about 2.3 GB live): each engine ingests them in random order
//! in synced batches of 1,000, timed by tenths, with the device's bytes
//! written per user byte, the directory's size during and after, and the
//! peak resident and anonymous memory; then random and absent gets, a full
//! scan, gets beside a synced writer with their p99 latency, and a reopen.
//! Then 256 MiB of 4 KiB values and of 64 KiB values
//! (`MAPSTORE_LARGE_VALUE_BYTES`), filled in synced batches of 1 MiB and
//! read at random. It writes `scale.md` and `scale.json`.
//!
//! Beside the synced writes, mapstore's synced `compare_and_swap` and
//! `insert_if_absent` from 16 threads (set beside its own plain inserts),
//! and a transfer workload for the engines with transactions: 16 threads
//! move money between 10,000 accounts in synced read-modify-write
//! transactions (mapstore's, redb's write transactions, fjall's optimistic
//! ones), retrying conflicts; the share of attempts refused is reported.
//! And mapstore's random fill and gets through a named keyspace, beside the
//! same through its default keyspace (taking turns, each the better of two).
//!
//! Synced workloads run each peer in its documented durable mode, written down
//! beside each adapter below.

use std::collections::BTreeMap;
use std::fs::OpenOptions;
use std::io::Write as _;
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

const KEY_BYTES: usize = 16;
const VALUE_BYTES: usize = 100;
const BATCH: usize = 1000;
const ENGINES: [&str; 4] = ["mapstore", "redb", "fjall", "sled"];
/// Full scans per direction in each round; the figure is their median.
const SCANS_PER_ROUND: usize = 7;

// ---------------------------------------------------------------------------
// Keys and values

/// The key of item `i`: a fixed permutation of `i` first, so that items in
/// order `0, 1, 2, ...` arrive in random key order ("random fill").
fn random_key(i: u64) -> [u8; KEY_BYTES] {
    let mixed = splitmix(i);
    let mut out = [0u8; KEY_BYTES];
    out[..8].copy_from_slice(&mixed.to_be_bytes());
    out[8..].copy_from_slice(&i.to_be_bytes());
    out
}

/// Keys in ascending order of `i` ("sequential fill").
fn sequential_key(i: u64) -> [u8; KEY_BYTES] {
    let mut out = [0u8; KEY_BYTES];
    out[8..].copy_from_slice(&i.to_be_bytes());
    out
}

/// A key no fill ever writes: random keys end in `i < n`, these in `u64::MAX - i`.
fn absent_key(i: u64) -> [u8; KEY_BYTES] {
    random_key(u64::MAX - i)
}

/// 100 bytes of xorshift output seeded by `i` and `round`: incompressible, and
/// different on each overwrite.
fn value(i: u64, round: u64) -> [u8; VALUE_BYTES] {
    let mut state = splitmix(i ^ (round << 48)) | 1;
    let mut out = [0u8; VALUE_BYTES];
    for chunk in out.chunks_mut(8) {
        state ^= state << 13;
        state ^= state >> 7;
        state ^= state << 17;
        chunk.copy_from_slice(&state.to_le_bytes()[..chunk.len()]);
    }
    out
}

fn splitmix(mut x: u64) -> u64 {
    x = x.wrapping_add(0x9E37_79B9_7F4A_7C15);
    x = (x ^ (x >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    x ^ (x >> 31)
}

/// A small fast random stream for picking keys to read.
struct Rng(u64);
impl Rng {
    fn below(&mut self, n: u64) -> u64 {
        self.0 = self.0.wrapping_add(1);
        splitmix(self.0) % n
    }
}

// ---------------------------------------------------------------------------
// The engines

/// What a workload needs from an engine. Every method panics on error: a
/// failing engine ends the comparison rather than reporting a false figure.
trait Engine: Send + Sync {
    /// One key, durable when this returns.
    fn insert_synced(&self, key: &[u8], value: &[u8]);
    /// A batch committed atomically; durable when this returns if `synced`.
    fn write_batch(&self, items: &[([u8; KEY_BYTES], [u8; VALUE_BYTES])], synced: bool);
    /// [`write_batch`](Engine::write_batch) with values of any length (the
    /// four compared engines; the mapstore variants measured alone do not
    /// need it).
    fn write_large(&self, _items: &[([u8; KEY_BYTES], Vec<u8>)], _synced: bool) {
        panic!("this engine adapter takes values of 100 bytes only");
    }
    /// The length of the value of `key`, if present.
    fn get(&self, key: &[u8]) -> Option<usize>;
    /// Visits every entry in key order (or reverse); returns how many.
    fn scan(&self, reverse: bool) -> u64;
    /// Moves what is held in memory to the engine's on-disk structure.
    fn checkpoint(&self);
    /// The engine's own call for reclaiming space, where it has one.
    fn compact(&mut self);
    /// Closes cleanly.
    fn close(self: Box<Self>);
    /// Bytes of log the last open replayed, where the engine says.
    fn wal_bytes_replayed(&self) -> Option<u64> {
        None
    }
}

/// Walks `entries` forward or in reverse, reading each entry's key and
/// value lengths through `lengths` (so the engine must produce them);
/// returns how many entries there were.
fn count_scan<T>(
    entries: impl DoubleEndedIterator<Item = T>,
    reverse: bool,
    lengths: impl Fn(T) -> (usize, usize),
) -> u64 {
    let visit = |count: u64, entry: T| {
        std::hint::black_box(lengths(entry));
        count + 1
    };
    if reverse {
        entries.rev().fold(0, visit)
    } else {
        entries.fold(0, visit)
    }
}

fn open_engine(name: &str, dir: &Path) -> Box<dyn Engine> {
    std::fs::create_dir_all(dir).unwrap();
    match name {
        "mapstore" => Box::new(MapstoreEngine::open(dir)),
        "redb" => Box::new(RedbEngine::open(dir)),
        "fjall" => Box::new(FjallEngine::open(dir)),
        "sled" => Box::new(SledEngine::open(dir)),
        other => panic!("unknown engine {other}"),
    }
}

/// mapstore with its default options: `Durability::Sync`, so every commit is
/// fdatasynced before it returns (group commit shares one fsync).
struct MapstoreEngine(mapstore::Db);

impl MapstoreEngine {
    fn open(dir: &Path) -> Self {
        MapstoreEngine(mapstore::Db::open(dir).unwrap())
    }
}

impl MapstoreEngine {
    fn write_items<V: AsRef<[u8]>>(&self, items: &[([u8; KEY_BYTES], V)], synced: bool) {
        // Sized up front, as fjall's batch is: filling it then copies nothing.
        let bytes = items.iter().map(|(k, v)| k.len() + v.as_ref().len()).sum();
        let mut batch = mapstore::WriteBatch::with_capacity(items.len(), bytes);
        for (key, value) in items {
            batch.insert(key, value);
        }
        let durability = if synced {
            mapstore::Durability::Sync
        } else {
            mapstore::Durability::Buffered
        };
        self.0.write_with_durability(batch, durability).unwrap();
    }
}

impl Engine for MapstoreEngine {
    fn insert_synced(&self, key: &[u8], value: &[u8]) {
        self.0.insert(key, value).unwrap();
    }
    fn write_batch(&self, items: &[([u8; KEY_BYTES], [u8; VALUE_BYTES])], synced: bool) {
        self.write_items(items, synced);
    }
    fn write_large(&self, items: &[([u8; KEY_BYTES], Vec<u8>)], synced: bool) {
        self.write_items(items, synced);
    }
    fn get(&self, key: &[u8]) -> Option<usize> {
        self.0.get(key).unwrap().map(|v| v.len())
    }
    fn scan(&self, reverse: bool) -> u64 {
        count_scan(self.0.iter(), reverse, |entry| {
            let (key, value) = entry.unwrap();
            (key.len(), value.len())
        })
    }
    fn checkpoint(&self) {
        self.0.checkpoint().unwrap();
    }
    fn compact(&mut self) {
        self.0.compact().unwrap();
    }
    fn close(self: Box<Self>) {
        self.0.close().unwrap();
    }
    fn wal_bytes_replayed(&self) -> Option<u64> {
        Some(self.0.recovery_report().wal_bytes_replayed)
    }
}

use redb::{ReadableDatabase as _, ReadableTable as _};

const REDB_TABLE: redb::TableDefinition<&[u8], &[u8]> = redb::TableDefinition::new("data");

/// redb with its default `Durability::Immediate`: "guaranteed to be persistent
/// as soon as `WriteTransaction::commit` returns". One write transaction per
/// synced insert, one per batch.
struct RedbEngine(redb::Database);

impl RedbEngine {
    fn open(dir: &Path) -> Self {
        let db = redb::Database::create(dir.join("redb")).unwrap();
        let txn = db.begin_write().unwrap();
        txn.open_table(REDB_TABLE).unwrap();
        txn.commit().unwrap();
        RedbEngine(db)
    }
}

impl RedbEngine {
    fn write_items<V: AsRef<[u8]>>(&self, items: &[([u8; KEY_BYTES], V)], synced: bool) {
        let mut txn = self.0.begin_write().unwrap();
        if !synced {
            txn.set_durability(redb::Durability::None).unwrap();
        }
        {
            let mut table = txn.open_table(REDB_TABLE).unwrap();
            for (key, value) in items {
                table.insert(&key[..], value.as_ref()).unwrap();
            }
        }
        txn.commit().unwrap();
    }
}

impl Engine for RedbEngine {
    fn insert_synced(&self, key: &[u8], value: &[u8]) {
        let txn = self.0.begin_write().unwrap();
        txn.open_table(REDB_TABLE)
            .unwrap()
            .insert(key, value)
            .unwrap();
        txn.commit().unwrap();
    }
    fn write_batch(&self, items: &[([u8; KEY_BYTES], [u8; VALUE_BYTES])], synced: bool) {
        self.write_items(items, synced);
    }
    fn write_large(&self, items: &[([u8; KEY_BYTES], Vec<u8>)], synced: bool) {
        self.write_items(items, synced);
    }
    fn get(&self, key: &[u8]) -> Option<usize> {
        let txn = self.0.begin_read().unwrap();
        let table = txn.open_table(REDB_TABLE).unwrap();
        table.get(key).unwrap().map(|v| v.value().len())
    }
    fn scan(&self, reverse: bool) -> u64 {
        let txn = self.0.begin_read().unwrap();
        let table = txn.open_table(REDB_TABLE).unwrap();
        count_scan(table.iter().unwrap(), reverse, |entry| {
            let (key, value) = entry.unwrap();
            (key.value().len(), value.value().len())
        })
    }
    fn checkpoint(&self) {
        // A redb commit is already in its B-tree file.
    }
    fn compact(&mut self) {
        // `compact` returns whether another call could reclaim more.
        while self.0.compact().unwrap() {}
    }
    fn close(self: Box<Self>) {
        drop(self.0);
    }
}

/// fjall with `PersistMode::SyncData` after each synced insert, and batches
/// committed with `durability(Some(PersistMode::SyncData))`: fjall's documented
/// way to make a write durable (SyncData is the cheaper of its two durable
/// modes).
struct FjallEngine {
    db: fjall::Database,
    keyspace: fjall::Keyspace,
}

impl FjallEngine {
    fn open(dir: &Path) -> Self {
        let db = fjall::Database::builder(dir.join("fjall")).open().unwrap();
        let keyspace = db
            .keyspace("data", fjall::KeyspaceCreateOptions::default)
            .unwrap();
        FjallEngine { db, keyspace }
    }
}

impl FjallEngine {
    fn write_items<V: AsRef<[u8]>>(&self, items: &[([u8; KEY_BYTES], V)], synced: bool) {
        let mode = synced.then_some(fjall::PersistMode::SyncData);
        // Sized up front, as mapstore's batch is.
        let mut batch =
            fjall::OwnedWriteBatch::with_capacity(self.db.clone(), items.len()).durability(mode);
        for (key, value) in items {
            batch.insert(&self.keyspace, &key[..], value.as_ref());
        }
        batch.commit().unwrap();
    }
}

impl Engine for FjallEngine {
    fn insert_synced(&self, key: &[u8], value: &[u8]) {
        self.keyspace.insert(key, value).unwrap();
        self.db.persist(fjall::PersistMode::SyncData).unwrap();
    }
    fn write_batch(&self, items: &[([u8; KEY_BYTES], [u8; VALUE_BYTES])], synced: bool) {
        self.write_items(items, synced);
    }
    fn write_large(&self, items: &[([u8; KEY_BYTES], Vec<u8>)], synced: bool) {
        self.write_items(items, synced);
    }
    fn get(&self, key: &[u8]) -> Option<usize> {
        self.keyspace.get(key).unwrap().map(|v| v.len())
    }
    fn scan(&self, reverse: bool) -> u64 {
        count_scan(self.keyspace.iter(), reverse, |guard| {
            let (key, value) = guard.into_inner().unwrap();
            (key.len(), value.len())
        })
    }
    fn checkpoint(&self) {
        self.keyspace.rotate_memtable_and_wait().unwrap();
    }
    fn compact(&mut self) {
        self.keyspace.major_compact().unwrap();
    }
    fn close(self: Box<Self>) {
        self.db.persist(fjall::PersistMode::SyncAll).unwrap();
    }
}

/// sled with `Db::flush()` after each synced insert and batch: sled's
/// documented call to make previous writes durable. (On Linux sled's log
/// writes end in `sync_file_range`, which does not flush the drive's write
/// cache, so this is a weaker promise than the others' `fdatasync`; it is
/// still what sled documents, so it is what is measured.)
struct SledEngine(sled::Db);

impl SledEngine {
    fn open(dir: &Path) -> Self {
        SledEngine(sled::open(dir.join("sled")).unwrap())
    }
}

impl SledEngine {
    fn write_items<V: AsRef<[u8]>>(&self, items: &[([u8; KEY_BYTES], V)], synced: bool) {
        let mut batch = sled::Batch::default();
        for (key, value) in items {
            batch.insert(&key[..], value.as_ref());
        }
        self.0.apply_batch(batch).unwrap();
        if synced {
            self.0.flush().unwrap();
        }
    }
}

impl Engine for SledEngine {
    fn insert_synced(&self, key: &[u8], value: &[u8]) {
        self.0.insert(key, value).unwrap();
        self.0.flush().unwrap();
    }
    fn write_batch(&self, items: &[([u8; KEY_BYTES], [u8; VALUE_BYTES])], synced: bool) {
        self.write_items(items, synced);
    }
    fn write_large(&self, items: &[([u8; KEY_BYTES], Vec<u8>)], synced: bool) {
        self.write_items(items, synced);
    }
    fn get(&self, key: &[u8]) -> Option<usize> {
        self.0.get(key).unwrap().map(|v| v.len())
    }
    fn scan(&self, reverse: bool) -> u64 {
        count_scan(self.0.iter(), reverse, |entry| {
            let (key, value) = entry.unwrap();
            (key.len(), value.len())
        })
    }
    fn checkpoint(&self) {
        self.0.flush().unwrap();
    }
    fn compact(&mut self) {
        // sled has no compaction call; its log is rewritten in the background.
    }
    fn close(self: Box<Self>) {
        self.0.flush().unwrap();
    }
}

// ---------------------------------------------------------------------------
// Workloads (run in the child process of one engine)

struct Settings {
    keys: u64,
    seconds: f64,
    /// How many times each workload (and the overwrite baseline) runs,
    /// the engines taking turns; the table shows medians.
    rounds: usize,
}

impl Settings {
    fn from_env() -> Settings {
        Settings {
            keys: env_or("MAPSTORE_COMPARE_KEYS", 1_000_000),
            seconds: env_or("MAPSTORE_COMPARE_SECONDS", 2.0),
            rounds: env_or("MAPSTORE_COMPARE_ROUNDS", 3).max(1),
        }
    }
    fn budget(&self) -> Duration {
        Duration::from_secs_f64(self.seconds)
    }
}

/// Prints one result for the parent to collect.
fn report(metric: &str, value: f64) {
    println!("RESULT {metric} {value}");
    eprintln!("  {metric} = {value:.1}");
}

fn median(values: &mut [f64]) -> f64 {
    values.sort_by(f64::total_cmp);
    values.get(values.len() / 2).copied().unwrap_or(0.0)
}

fn percentile(sorted: &[Duration], fraction: f64) -> f64 {
    if sorted.is_empty() {
        return 0.0;
    }
    let index = ((sorted.len() as f64 - 1.0) * fraction).round() as usize;
    sorted[index].as_secs_f64() * 1e6
}

/// What the block device holding a directory has completed so far, from
/// its `/sys/dev/block/MAJOR:MINOR/stat` (Linux): the difference over a
/// workload shows what each of its commits cost the device.
struct DeviceCounters {
    write_requests: u64,
    sectors_written: u64,
    cache_flushes: u64,
}

impl DeviceCounters {
    /// The counters of the device `path` lies on; `None` where the kernel
    /// does not give them (not Linux, or a file system with no block
    /// device, such as tmpfs).
    fn of(path: &Path) -> Option<DeviceCounters> {
        use std::os::unix::fs::MetadataExt;
        let dev = std::fs::metadata(path).ok()?.dev();
        // glibc's encoding of a dev_t into major and minor numbers.
        let major = ((dev >> 8) & 0xfff) | ((dev >> 32) & !0xfff);
        let minor = (dev & 0xff) | ((dev >> 12) & !0xff);
        let stat = std::fs::read_to_string(format!("/sys/dev/block/{major}:{minor}/stat")).ok()?;
        // Fields (Documentation/block/stat.rst): 5 write requests,
        // 7 sectors written (of 512 bytes), 16 flush requests.
        let fields: Vec<u64> = stat
            .split_whitespace()
            .map(|f| f.parse().ok())
            .collect::<Option<_>>()?;
        Some(DeviceCounters {
            write_requests: *fields.get(4)?,
            sectors_written: *fields.get(6)?,
            cache_flushes: *fields.get(15)?,
        })
    }

    /// Reports the device work per operation since `before`, as
    /// `{name}_device_*_per_op`.
    fn report_since(&self, before: &DeviceCounters, name: &str, ops: usize) {
        let per_op = |now: u64, then: u64| now.saturating_sub(then) as f64 / ops.max(1) as f64;
        let flushes = per_op(self.cache_flushes, before.cache_flushes);
        // The kernel counts each flush as a write request too (one of no
        // sectors): leave them out, so that the figure is writes of data.
        let writes = per_op(self.write_requests, before.write_requests) - flushes;
        let kib = per_op(self.sectors_written, before.sectors_written) / 2.0;
        report(&format!("{name}_device_writes_per_op"), writes);
        report(&format!("{name}_device_kib_per_op"), kib);
        report(&format!("{name}_device_flushes_per_op"), flushes);
    }
}

/// Synced single-key inserts from `threads` threads for the time budget,
/// in `dir` (an engine's directory, for the device's counters).
fn synced_writes(engine: &dyn Engine, dir: &Path, threads: usize, settings: &Settings) {
    timed_synced_ops(&format!("write_{threads}t"), dir, threads, settings, |_| {
        |i| engine.insert_synced(&random_key(i), &value(i, 0))
    });
}

/// Runs synced operations from `threads` threads for the time budget and
/// reports their rate and latencies as `{name}_...`: each thread makes its
/// operation with `per_thread(thread)` and calls it with item numbers of
/// its own (`thread << 40` on). `dir` is the engine's directory, for the
/// device's counters. Returns how many operations ran.
fn timed_synced_ops<F: FnMut(u64)>(
    name: &str,
    dir: &Path,
    threads: usize,
    settings: &Settings,
    per_thread: impl Fn(u64) -> F + Sync,
) -> usize {
    let device_before = DeviceCounters::of(dir);
    let stop_at = Instant::now() + settings.budget();
    let start = Instant::now();
    let per_thread = &per_thread;
    let mut latencies: Vec<Duration> = std::thread::scope(|scope| {
        let handles: Vec<_> = (0..threads as u64)
            .map(|thread| {
                scope.spawn(move || {
                    let mut op = per_thread(thread);
                    let mut latencies = Vec::new();
                    let mut i = thread << 40;
                    while Instant::now() < stop_at {
                        let begun = Instant::now();
                        op(i);
                        latencies.push(begun.elapsed());
                        i += 1;
                    }
                    latencies
                })
            })
            .collect();
        handles
            .into_iter()
            .flat_map(|h| h.join().unwrap())
            .collect()
    });
    let elapsed = start.elapsed().as_secs_f64();
    let device_after = DeviceCounters::of(dir);
    latencies.sort();
    report(&format!("{name}_ops"), latencies.len() as f64 / elapsed);
    report(&format!("{name}_p50_us"), percentile(&latencies, 0.50));
    report(&format!("{name}_p99_us"), percentile(&latencies, 0.99));
    if let (Some(before), Some(after)) = (device_before, device_after) {
        after.report_since(&before, name, latencies.len());
    }
    latencies.len()
}

/// Writes `keys` items in batches of 1,000; returns keys per second.
fn fill(engine: &dyn Engine, keys: u64, key_of: fn(u64) -> [u8; KEY_BYTES], round: u64) -> f64 {
    let start = Instant::now();
    let mut items = Vec::with_capacity(BATCH);
    let mut i = 0;
    while i < keys {
        items.clear();
        let end = (i + BATCH as u64).min(keys);
        items.extend((i..end).map(|j| (key_of(j), value(j, round))));
        engine.write_batch(&items, true);
        i = end;
    }
    keys as f64 / start.elapsed().as_secs_f64()
}

/// Random point reads from `threads` threads for the time budget; returns
/// reads per second. `present` says whether the keys were written.
fn point_reads(
    engine: &dyn Engine,
    threads: usize,
    keys: u64,
    present: bool,
    settings: &Settings,
) -> f64 {
    let stop = AtomicBool::new(false);
    let total = AtomicU64::new(0);
    let start = Instant::now();
    std::thread::scope(|scope| {
        for thread in 0..threads as u64 {
            let (stop, total) = (&stop, &total);
            scope.spawn(move || {
                let mut rng = Rng(thread * 7919 + 1);
                let mut done = 0u64;
                while !stop.load(Ordering::Relaxed) {
                    for _ in 0..256 {
                        let i = rng.below(keys);
                        let key = if present {
                            random_key(i)
                        } else {
                            absent_key(i)
                        };
                        let found = engine.get(&key);
                        assert_eq!(found.is_some(), present, "read of item {i}");
                    }
                    done += 256;
                }
                total.fetch_add(done, Ordering::Relaxed);
            });
        }
        std::thread::sleep(settings.budget());
        stop.store(true, Ordering::Relaxed);
    });
    total.load(Ordering::Relaxed) as f64 / start.elapsed().as_secs_f64()
}

fn disk_bytes(path: &Path) -> u64 {
    let mut total = 0;
    if let Ok(entries) = std::fs::read_dir(path) {
        for entry in entries.flatten() {
            let Ok(meta) = entry.metadata() else { continue };
            if meta.is_dir() {
                total += disk_bytes(&entry.path());
            } else {
                // Allocated blocks, so sparse or preallocated files count as
                // what they really occupy.
                use std::os::unix::fs::MetadataExt;
                total += meta.blocks() * 512;
            }
        }
    }
    total
}

/// A memory figure of this process from `/proc/self/status` (the line
/// starting `field`, in kB), in bytes; 0 where the kernel does not say.
fn process_status_bytes(field: &str) -> u64 {
    let status = std::fs::read_to_string("/proc/self/status").unwrap_or_default();
    status
        .lines()
        .find_map(|line| line.strip_prefix(field))
        .and_then(|rest| {
            rest.trim()
                .trim_end_matches("kB")
                .trim()
                .parse::<u64>()
                .ok()
        })
        .map_or(0, |kib| kib * 1024)
}

/// The process's peak resident set (VmHWM), in bytes.
fn peak_rss() -> f64 {
    process_status_bytes("VmHWM:") as f64
}

/// Resets VmHWM to the current resident set (Linux 4.0 and later).
fn reset_peak_rss() {
    let _ = std::fs::write("/proc/self/clear_refs", "5");
}

/// The median rates of `scans` full scans forward and as many in reverse,
/// taking turns; each must see `keys` entries.
fn scan_rates(engine: &dyn Engine, keys: u64, scans: usize) -> (f64, f64) {
    let mut rates = [Vec::new(), Vec::new()];
    for _ in 0..scans {
        for (reverse, rates) in [false, true].into_iter().zip(&mut rates) {
            let start = Instant::now();
            let seen = engine.scan(reverse);
            assert_eq!(seen, keys, "scan, reverse: {reverse}");
            rates.push(seen as f64 / start.elapsed().as_secs_f64());
        }
    }
    let [mut forward, mut reverse] = rates;
    (median(&mut forward), median(&mut reverse))
}

fn run_engine(name: &str, settings: &Settings) {
    let keys = settings.keys;
    let scratch = tempfile::tempdir().unwrap();

    // 1 and 2 run in children of their own (`run_synced_writes`).
    settle();
    // 3 and 9: the random fill, with its peak memory and footprint.
    let dir = scratch.path().join("random");
    reset_peak_rss();
    let engine = open_engine(name, &dir);
    report(
        "fill_random_keys_per_s",
        fill(&*engine, keys, random_key, 0),
    );
    report("peak_rss_fill_bytes", peak_rss());
    report("disk_after_fill_bytes", disk_bytes(&dir) as f64);

    // 4: reads as the fill left the engine: for the LSM engines, the
    // memtable plus whatever the fill already moved to files.
    report(
        "get_after_fill_1t",
        point_reads(&*engine, 1, keys, true, settings),
    );
    report(
        "get_after_fill_2t",
        point_reads(&*engine, 2, keys, true, settings),
    );

    // Scans of the recent writes: straight after the fill, no checkpoint
    // (for the LSM engines, the memtable and whatever the fill moved to
    // files; the median of three per direction, taking turns).
    let (forward, reverse) = scan_rates(&*engine, keys, 3);
    report("scan_after_fill_forward_keys_per_s", forward);
    report("scan_after_fill_reverse_keys_per_s", reverse);

    // 8: reopen after a clean close, without an explicit checkpoint first.
    let engine = reopen(engine, name, &dir, "reopen_clean_ms");

    // 4, 5, 6: reads and scans after a checkpoint.
    engine.checkpoint();
    report(
        "get_checkpointed_1t",
        point_reads(&*engine, 1, keys, true, settings),
    );
    report(
        "get_checkpointed_2t",
        point_reads(&*engine, 2, keys, true, settings),
    );
    report(
        "get_absent_1t",
        point_reads(&*engine, 1, keys, false, settings),
    );
    // A scan is short (a fraction of a second for the fastest engines), and
    // one alone swung by a third between runs: each figure is the median of
    // seven, forward and reverse taking turns so that a slow moment of the
    // machine falls on both.
    let (forward, reverse) = scan_rates(&*engine, keys, SCANS_PER_ROUND);
    report("scan_forward_keys_per_s", forward);
    report("scan_reverse_keys_per_s", reverse);

    // 8: reopen after an explicit checkpoint.
    let mut engine = reopen(engine, name, &dir, "reopen_checkpointed_ms");

    // 7: reads while one thread overwrites in unsynced batches.
    let stop = AtomicBool::new(false);
    let written = AtomicU64::new(0);
    let reads = std::thread::scope(|scope| {
        let writer = &*engine;
        let (stop, written) = (&stop, &written);
        scope.spawn(move || {
            let mut rng = Rng(424_242);
            let mut items = Vec::with_capacity(BATCH);
            while !stop.load(Ordering::Relaxed) {
                items.clear();
                items.extend((0..BATCH).map(|_| {
                    let i = rng.below(keys);
                    (random_key(i), value(i, 1))
                }));
                writer.write_batch(&items, false);
                written.fetch_add(BATCH as u64, Ordering::Relaxed);
            }
        });
        let reads = point_reads(&*engine, 1, keys, true, settings);
        stop.store(true, Ordering::Relaxed);
        reads
    });
    report("get_while_writing_1t", reads);
    report(
        "writes_beside_reads_keys_per_s",
        written.load(Ordering::Relaxed) as f64 / settings.seconds,
    );

    // 9: overwrite every key once, then the engine's own compaction.
    fill(&*engine, keys, random_key, 2);
    report("disk_after_overwrite_bytes", disk_bytes(&dir) as f64);
    engine.checkpoint();
    engine.compact();
    report("disk_after_compact_bytes", disk_bytes(&dir) as f64);
    drop(engine);

    // 3: sequential fill into a fresh directory.
    settle();
    let dir = scratch.path().join("sequential");
    let engine = open_engine(name, &dir);
    report(
        "fill_sequential_keys_per_s",
        fill(&*engine, keys, sequential_key, 0),
    );
    engine.close();
}

/// Workloads 1 and 2, each on a fresh directory, after the page cache's
/// dirty data from earlier work is written back (it would compete with
/// the fsyncs).
fn run_synced_writes(name: &str, settings: &Settings) {
    let scratch = tempfile::tempdir().unwrap();
    for threads in [1, 4, 16] {
        settle();
        let dir = scratch.path().join(format!("writes_{threads}"));
        let engine = open_engine(name, &dir);
        synced_writes(&*engine, &dir, threads, settings);
        engine.close();
    }
    if name == "mapstore" {
        conditional_writes(scratch.path(), settings);
    }
}

/// mapstore's synced conditional writes from 16 threads, each on keys of
/// its own, to set beside its plain synced inserts from 16 threads in the
/// same child: `compare_and_swap` of one key per thread, each swap at the
/// version the last one returned (so every swap succeeds, and is checked),
/// and `insert_if_absent` of new keys (every one stores).
fn conditional_writes(scratch: &Path, settings: &Settings) {
    settle();
    let dir = scratch.join("cas_16");
    let db = mapstore::Db::open(&dir).unwrap();
    timed_synced_ops("cas_16t", &dir, 16, settings, |thread| {
        let db = &db;
        let key = random_key(thread << 40);
        let mut version = None;
        move |i| version = Some(db.compare_and_swap(key, version, value(i, 0)).unwrap())
    });
    db.close().unwrap();
    settle();
    let dir = scratch.join("insert_if_absent_16");
    let db = mapstore::Db::open(&dir).unwrap();
    timed_synced_ops("insert_if_absent_16t", &dir, 16, settings, |_| {
        let db = &db;
        move |i| {
            let present = db.insert_if_absent(random_key(i), value(i, 0)).unwrap();
            assert!(present.is_none());
        }
    });
    db.close().unwrap();
}

// ---------------------------------------------------------------------------
// mapstore's keyspaces against its default keyspace

/// The fill and the point reads, through a named keyspace of mapstore
/// (`Keyspace` handle, `WriteBatch::insert_in`) rather than the default
/// keyspace.
struct KeyspaceEngine {
    db: mapstore::Db,
    keyspace: mapstore::Keyspace,
}

impl Engine for KeyspaceEngine {
    fn insert_synced(&self, key: &[u8], value: &[u8]) {
        self.keyspace.insert(key, value).unwrap();
    }
    fn write_batch(&self, items: &[([u8; KEY_BYTES], [u8; VALUE_BYTES])], synced: bool) {
        let mut batch = mapstore::WriteBatch::with_capacity(
            items.len(),
            items.len() * (KEY_BYTES + VALUE_BYTES),
        );
        for (key, value) in items {
            batch.insert_in(&self.keyspace, key, value);
        }
        let durability = if synced {
            mapstore::Durability::Sync
        } else {
            mapstore::Durability::Buffered
        };
        self.db.write_with_durability(batch, durability).unwrap();
    }
    fn get(&self, key: &[u8]) -> Option<usize> {
        self.keyspace.get(key).unwrap().map(|v| v.len())
    }
    fn scan(&self, reverse: bool) -> u64 {
        count_scan(self.keyspace.iter(), reverse, |entry| {
            let (key, value) = entry.unwrap();
            (key.len(), value.len())
        })
    }
    fn checkpoint(&self) {
        self.db.checkpoint().unwrap();
    }
    fn compact(&mut self) {
        self.db.compact().unwrap();
    }
    fn close(self: Box<Self>) {
        self.db.close().unwrap();
    }
}

/// The random fill, then random gets on one thread, through mapstore's
/// default keyspace and through a named one, each on a fresh database,
/// taking turns twice; reports each figure's better run of the two as
/// `{default,keyspace}_{fill_keys_per_s,get_1t}`.
fn run_keyspace_overhead(settings: &Settings) {
    let scratch = tempfile::tempdir().unwrap();
    let mut results: BTreeMap<&str, (f64, f64)> = BTreeMap::new();
    for turn in 0..4 {
        let named = turn % 2 == 1;
        let dir = scratch.path().join(format!("turn{turn}"));
        settle();
        let db = mapstore::Db::open(&dir).unwrap();
        let engine: Box<dyn Engine> = if named {
            let keyspace = db.keyspace("data").unwrap();
            Box::new(KeyspaceEngine { db, keyspace })
        } else {
            Box::new(MapstoreEngine(db))
        };
        let fill = fill(&*engine, settings.keys, random_key, 0);
        let reads = point_reads(&*engine, 1, settings.keys, true, settings);
        engine.close();
        let best = results
            .entry(if named { "keyspace" } else { "default" })
            .or_insert((0.0, 0.0));
        *best = (best.0.max(fill), best.1.max(reads));
    }
    for (name, (fill, reads)) in results {
        report(&format!("{name}_fill_keys_per_s"), fill);
        report(&format!("{name}_get_1t"), reads);
    }
}

// ---------------------------------------------------------------------------
// History: what keeping it costs writes, the feed's latency, diff, TTL reads

/// mapstore whose batches write every value with a TTL of an hour (so that
/// none expires during the run): reads then judge expiry on every value.
struct TtlEngine(MapstoreEngine);

impl Engine for TtlEngine {
    fn insert_synced(&self, key: &[u8], value: &[u8]) {
        self.0.0.insert_with_ttl(key, value, HOUR).unwrap();
    }
    fn write_batch(&self, items: &[([u8; KEY_BYTES], [u8; VALUE_BYTES])], synced: bool) {
        let mut batch = mapstore::WriteBatch::with_capacity(
            items.len(),
            items.len() * (KEY_BYTES + VALUE_BYTES + 8),
        );
        for (key, value) in items {
            batch.insert_with_ttl(key, value, HOUR);
        }
        let durability = if synced {
            mapstore::Durability::Sync
        } else {
            mapstore::Durability::Buffered
        };
        self.0.0.write_with_durability(batch, durability).unwrap();
    }
    fn get(&self, key: &[u8]) -> Option<usize> {
        self.0.get(key)
    }
    fn scan(&self, reverse: bool) -> u64 {
        self.0.scan(reverse)
    }
    fn checkpoint(&self) {
        self.0.checkpoint();
    }
    fn compact(&mut self) {
        self.0.compact();
    }
    fn close(self: Box<Self>) {
        Box::new(self.0).close();
    }
}

const HOUR: Duration = Duration::from_secs(3600);

/// The history's costs, each against mapstore without it in the same run
/// (alternating turns, best of each):
///
/// - synced writes from 16 threads and the batch fill with
///   `History::Duration(1h)` against `History::None`;
/// - point reads of a database whose every value has a TTL against one
///   without TTLs;
/// - the change feed: a live consumer beside 16 synced writer threads,
///   the time from a write's return to the consumer holding its commit
///   (median and p99; negative when the consumer had it first), and how
///   far behind it is when the writers stop;
/// - `diff` of two snapshots 1,000 commits apart in a checkpointed
///   database of `keys` keys, with the commits in the memtable and after
///   their checkpoint.
fn run_history(settings: &Settings) {
    let scratch = tempfile::tempdir().unwrap();
    let history = mapstore::History::Duration(HOUR);
    let mut best: BTreeMap<String, f64> = BTreeMap::new();
    let mut keep_best = |name: String, value: f64| {
        let entry = best.entry(name).or_insert(0.0);
        *entry = entry.max(value);
    };
    for turn in 0..4 {
        let on = turn % 2 == 1;
        let label = if on { "history_on" } else { "history_off" };
        let options = || {
            let options = mapstore::Options::default();
            if on {
                options.history(history)
            } else {
                options
            }
        };
        let dir = scratch.path().join(format!("writes{turn}"));
        settle();
        let db = mapstore::Db::open_with(&dir, options()).unwrap();
        let start = Instant::now();
        let ops = timed_synced_ops(&format!("{label}_write_16t"), &dir, 16, settings, |_| {
            let db = db.clone();
            move |i| {
                db.insert(random_key(i), value(i, 0)).unwrap();
            }
        });
        keep_best(
            format!("{label}_write_16t_ops"),
            ops as f64 / start.elapsed().as_secs_f64(),
        );
        db.close().unwrap();
        let dir = scratch.path().join(format!("fill{turn}"));
        settle();
        let engine = MapstoreEngine(mapstore::Db::open_with(&dir, options()).unwrap());
        keep_best(
            format!("{label}_fill_keys_per_s"),
            fill(&engine, settings.keys, random_key, 0),
        );
        Box::new(engine).close();

        // Reads with and without TTLs.
        let dir = scratch.path().join(format!("ttl{turn}"));
        settle();
        let db = mapstore::Db::open(&dir).unwrap();
        let engine: Box<dyn Engine> = if on {
            Box::new(TtlEngine(MapstoreEngine(db)))
        } else {
            Box::new(MapstoreEngine(db))
        };
        fill(&*engine, settings.keys, random_key, 0);
        let name = if on { "ttl" } else { "no_ttl" };
        keep_best(
            format!("{name}_get_1t"),
            point_reads(&*engine, 1, settings.keys, true, settings),
        );
        engine.checkpoint();
        keep_best(
            format!("{name}_get_1t_from_files"),
            point_reads(&*engine, 1, settings.keys, true, settings),
        );
        engine.close();
    }
    for (name, value) in best {
        report(&name, value);
    }
    feed_latency(scratch.path(), settings);
    diff_times(scratch.path(), settings);
}

/// A live change-feed consumer beside 16 synced writer threads.
fn feed_latency(scratch: &Path, settings: &Settings) {
    let dir = scratch.join("feed");
    settle();
    let db = mapstore::Db::open_with(
        &dir,
        mapstore::Options::default().history(mapstore::History::Duration(HOUR)),
    )
    .unwrap();
    let stop_at = Instant::now() + settings.budget();
    let mut feed = db.changes_since(db.snapshot().seq()).unwrap();
    let (returned, delivered, lag) = std::thread::scope(|scope| {
        let consumer = scope.spawn(move || {
            let mut delivered: Vec<(u64, Instant)> = Vec::new();
            while let Ok(Some(commit)) = feed.next_timeout(Duration::from_secs(2)) {
                delivered.push((commit.seq, Instant::now()));
            }
            delivered
        });
        let writers: Vec<_> = (0..16u64)
            .map(|thread| {
                let db = db.clone();
                scope.spawn(move || {
                    let mut returned = Vec::new();
                    let mut i = thread << 40;
                    while Instant::now() < stop_at {
                        let seq = db.insert(random_key(i), value(i, 0)).unwrap();
                        returned.push((seq, Instant::now()));
                        i += 1;
                    }
                    returned
                })
            })
            .collect();
        let returned: Vec<(u64, Instant)> = writers
            .into_iter()
            .flat_map(|w| w.join().unwrap())
            .collect();
        let writers_done = Instant::now();
        let delivered = consumer.join().unwrap();
        let newest = returned.iter().map(|(seq, _)| *seq).max().unwrap_or(0);
        let caught_up = delivered
            .iter()
            .find(|(seq, _)| *seq == newest)
            .map_or(f64::NAN, |(_, at)| {
                at.saturating_duration_since(writers_done).as_secs_f64() * 1e3
            });
        (returned, delivered, caught_up)
    });
    let delivered: BTreeMap<u64, Instant> = delivered.into_iter().collect();
    let mut gaps: Vec<f64> = returned
        .iter()
        .filter_map(|(seq, at)| {
            let got = delivered.get(seq)?;
            Some(if got >= at {
                got.duration_since(*at).as_secs_f64() * 1e6
            } else {
                -(at.duration_since(*got).as_secs_f64() * 1e6)
            })
        })
        .collect();
    assert_eq!(gaps.len(), returned.len(), "the feed missed commits");
    gaps.sort_by(f64::total_cmp);
    report(
        "feed_commits_per_s",
        returned.len() as f64 / settings.seconds,
    );
    report("feed_delivery_after_return_p50_us", gaps[gaps.len() / 2]);
    report(
        "feed_delivery_after_return_p99_us",
        gaps[gaps.len() * 99 / 100],
    );
    report("feed_caught_up_after_writers_ms", lag);
    db.close().unwrap();
}

/// `diff` of two snapshots 1,000 commits apart in a checkpointed database.
fn diff_times(scratch: &Path, settings: &Settings) {
    let dir = scratch.join("diff");
    let engine = MapstoreEngine(mapstore::Db::open(&dir).unwrap());
    fill(&engine, settings.keys, random_key, 0);
    engine.0.compact().unwrap();
    let db = &engine.0;
    let older = db.snapshot();
    for i in 0..1_000u64 {
        let key = random_key(splitmix(i) % settings.keys);
        db.write_with_durability(
            {
                let mut batch = mapstore::WriteBatch::new();
                batch.insert(key, value(i, 1));
                batch
            },
            mapstore::Durability::Buffered,
        )
        .unwrap();
    }
    let newer = db.snapshot();
    let time_diff = |name: &str| {
        let mut times: Vec<f64> = (0..7)
            .map(|_| {
                let start = Instant::now();
                let changes = older.diff(&newer).count();
                assert!(changes > 900, "{changes} changes");
                start.elapsed().as_secs_f64() * 1e3
            })
            .collect();
        report(name, median(&mut times));
    };
    time_diff("diff_1000_commits_in_memtable_ms");
    db.checkpoint().unwrap();
    time_diff("diff_1000_commits_checkpointed_ms");
    Box::new(engine).close();
}

// ---------------------------------------------------------------------------
// Transfers: read-modify-write transactions

/// Accounts of the transfer workload, and each one's opening balance.
const ACCOUNTS: u64 = 10_000;
const OPENING_BALANCE: u64 = 1_000_000;
const TRANSFER_THREADS: usize = 16;

/// An account's value: its balance in the first 8 bytes (little-endian),
/// padded to the usual value size.
fn balance_value(balance: u64) -> [u8; VALUE_BYTES] {
    let mut out = [0u8; VALUE_BYTES];
    out[..8].copy_from_slice(&balance.to_le_bytes());
    out
}

fn balance_of(value: &[u8]) -> u64 {
    u64::from_le_bytes(value[..8].try_into().unwrap())
}

/// An engine's transactions, for the transfer workload.
trait Bank: Send + Sync {
    /// Moves 1 from `from` to `to` in one synced transaction that reads
    /// both balances and writes both; `false` if it was refused for a
    /// conflict (nothing written; the caller tries again).
    fn transfer(&self, from: &[u8], to: &[u8]) -> bool;
    /// The balance of `account`.
    fn balance(&self, account: &[u8]) -> u64;
}

/// mapstore: a snapshot-isolation `Transaction`, committed with
/// `Durability::Sync` (the default), group-committed with the others.
impl Bank for mapstore::Db {
    fn transfer(&self, from: &[u8], to: &[u8]) -> bool {
        let mut tx = self.transaction();
        let from_balance = balance_of(&tx.get(from).unwrap().unwrap());
        let to_balance = balance_of(&tx.get(to).unwrap().unwrap());
        tx.insert(from, balance_value(from_balance - 1)).unwrap();
        tx.insert(to, balance_value(to_balance + 1)).unwrap();
        match tx.commit() {
            Ok(_) => true,
            Err(mapstore::Error::Conflict { .. }) => false,
            Err(error) => panic!("{error}"),
        }
    }
    fn balance(&self, account: &[u8]) -> u64 {
        balance_of(&self.get(account).unwrap().unwrap())
    }
}

/// redb: one write transaction per transfer (redb runs them one at a
/// time), `Durability::Immediate` (the default).
impl Bank for redb::Database {
    fn transfer(&self, from: &[u8], to: &[u8]) -> bool {
        let txn = self.begin_write().unwrap();
        {
            let mut table = txn.open_table(REDB_TABLE).unwrap();
            let from_balance = balance_of(table.get(from).unwrap().unwrap().value());
            let to_balance = balance_of(table.get(to).unwrap().unwrap().value());
            table
                .insert(from, &balance_value(from_balance - 1)[..])
                .unwrap();
            table
                .insert(to, &balance_value(to_balance + 1)[..])
                .unwrap();
        }
        txn.commit().unwrap();
        true
    }
    fn balance(&self, account: &[u8]) -> u64 {
        let txn = self.begin_read().unwrap();
        let table = txn.open_table(REDB_TABLE).unwrap();
        balance_of(table.get(account).unwrap().unwrap().value())
    }
}

/// fjall: its optimistic transactions (`OptimisticTxDatabase`), each
/// committed with `durability(Some(PersistMode::SyncData))`.
struct FjallBank {
    db: fjall::OptimisticTxDatabase,
    keyspace: fjall::OptimisticTxKeyspace,
}

impl Bank for FjallBank {
    fn transfer(&self, from: &[u8], to: &[u8]) -> bool {
        use fjall::Readable as _;
        let mut tx = self
            .db
            .write_tx()
            .unwrap()
            .durability(Some(fjall::PersistMode::SyncData));
        let from_balance = balance_of(&tx.get(&self.keyspace, from).unwrap().unwrap());
        let to_balance = balance_of(&tx.get(&self.keyspace, to).unwrap().unwrap());
        tx.insert(&self.keyspace, from, balance_value(from_balance - 1));
        tx.insert(&self.keyspace, to, balance_value(to_balance + 1));
        tx.commit().unwrap().is_ok()
    }
    fn balance(&self, account: &[u8]) -> u64 {
        balance_of(&self.keyspace.get(account).unwrap().unwrap())
    }
}

/// The transfer workload, for the engines that have transactions: 16
/// threads each move 1 between two random accounts of 10,000, retrying a
/// transfer refused for a conflict, for the time budget. Reports committed
/// transfers per second and the share of attempts refused, then checks
/// that the balances still add up.
fn run_transfers(name: &str, settings: &Settings) {
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("bank");
    std::fs::create_dir_all(&dir).unwrap();
    let funding: Vec<_> = (0..ACCOUNTS)
        .map(|i| (random_key(i), balance_value(OPENING_BALANCE)))
        .collect();
    let bank: Box<dyn Bank> = match name {
        "mapstore" => {
            let db = MapstoreEngine::open(&dir);
            db.write_batch(&funding, true);
            Box::new(db.0)
        }
        "redb" => {
            let db = RedbEngine::open(&dir);
            db.write_batch(&funding, true);
            Box::new(db.0)
        }
        "fjall" => {
            let db = fjall::OptimisticTxDatabase::builder(dir.join("fjall"))
                .open()
                .unwrap();
            let keyspace = db
                .keyspace("data", fjall::KeyspaceCreateOptions::default)
                .unwrap();
            for (key, value) in &funding {
                keyspace.insert(&key[..], &value[..]).unwrap();
            }
            db.persist(fjall::PersistMode::SyncAll).unwrap();
            Box::new(FjallBank { db, keyspace })
        }
        _ => return,
    };
    settle();
    let conflicts = AtomicU64::new(0);
    let (bank, conflicts_ref) = (&*bank, &conflicts);
    let committed = timed_synced_ops("transfer_16t", &dir, TRANSFER_THREADS, settings, |_| {
        move |i| {
            let mut rng = Rng(i);
            let from = rng.below(ACCOUNTS);
            let to = (from + 1 + rng.below(ACCOUNTS - 1)) % ACCOUNTS;
            while !bank.transfer(&random_key(from), &random_key(to)) {
                conflicts_ref.fetch_add(1, Ordering::Relaxed);
            }
        }
    });
    let total: u64 = (0..ACCOUNTS).map(|i| bank.balance(&random_key(i))).sum();
    assert_eq!(
        total,
        ACCOUNTS * OPENING_BALANCE,
        "{name}: money was made or lost"
    );
    // The share of attempts refused for a conflict (redb's one writer at
    // a time has none).
    let refused = conflicts.load(Ordering::Relaxed) as f64;
    report(
        "transfer_16t_conflict_percent",
        100.0 * refused / (refused + committed as f64),
    );
}

/// Writes back every dirty page of the machine (`sync(1)`), so that one
/// workload's leftover writeback does not slow the next one's fsyncs.
fn settle() {
    let _ = Command::new("sync").status();
}

/// Closes `engine` (it must be the last handle) and times opening it again
/// plus its first read.
fn reopen(engine: Box<dyn Engine>, name: &str, dir: &Path, metric: &str) -> Box<dyn Engine> {
    engine.close();
    let start = Instant::now();
    let engine = open_engine(name, dir);
    assert!(engine.get(&random_key(0)).is_some());
    report(metric, start.elapsed().as_secs_f64() * 1e3);
    engine
}

/// The child that "crashes": fills `dir` then exits without closing, as a
/// kill -9 would (the OS keeps what was written; nothing else is flushed).
fn crash_fill(name: &str, dir: &Path, settings: &Settings) {
    let engine = open_engine(name, dir);
    fill(&*engine, settings.keys, random_key, 0);
    std::mem::forget(engine);
    std::process::exit(0);
}

/// The child that opens the crashed directory; its figures are named
/// with `prefix`.
fn crash_reopen(name: &str, dir: &Path, prefix: &str) {
    let start = Instant::now();
    let engine = open_engine(name, dir);
    assert!(engine.get(&random_key(0)).is_some());
    let elapsed = start.elapsed().as_secs_f64();
    report(&format!("{prefix}reopen_after_crash_ms"), elapsed * 1e3);
    if let Some(bytes) = engine.wal_bytes_replayed() {
        report(&format!("{prefix}wal_replayed_bytes"), bytes as f64);
        report(
            &format!("{prefix}wal_replay_mb_per_s"),
            bytes as f64 / 1e6 / elapsed,
        );
    }
    engine.close();
}

/// The child that "crashes" with a full memtable's worth of log (mapstore
/// only): fills a fresh database in synced batches until one more batch
/// would fill its memtable (which would freeze it for a checkpoint), then
/// exits without closing. Every write is then in the WAL alone.
fn crash_full_memtable(dir: &Path) {
    let memtable_size = 64 << 20; // the default
    let options = mapstore::Options::default().memtable_size(memtable_size);
    let db = mapstore::Db::open_with(dir, options).unwrap();
    let mut i = 0;
    let mut grown_by_last_batch = 0;
    while db.memtable_bytes() + 2 * grown_by_last_batch < memtable_size {
        let before = db.memtable_bytes();
        let mut batch = mapstore::WriteBatch::new();
        for j in i..i + BATCH as u64 {
            batch.insert(random_key(j), value(j, 0));
        }
        db.write(batch).unwrap();
        i += BATCH as u64;
        grown_by_last_batch = db.memtable_bytes() - before;
    }
    exit_before_any_checkpoint(db, i);
}

/// The child that "crashes" with the longest log one memtable gets at the
/// default settings (mapstore only): lone synced inserts from one thread,
/// each of which takes a page of log for a hundred-odd bytes of record,
/// until a few more would reach `max_wal_bytes` (which would freeze the
/// memtable for a checkpoint); then it exits without closing.
fn crash_full_wal(dir: &Path) {
    // The defaults, spelled out for the arithmetic below.
    let (page_bytes, max_wal_bytes) = (4096, 256 << 20);
    let options = mapstore::Options::default()
        .wal_page_bytes(page_bytes)
        .max_wal_bytes(max_wal_bytes);
    let db = mapstore::Db::open_with(dir, options).unwrap();
    let inserts = max_wal_bytes / page_bytes as u64 - 64;
    for i in 0..inserts {
        db.insert(random_key(i), value(i, 0)).unwrap();
    }
    exit_before_any_checkpoint(db, inserts);
}

/// Checks that `db`, just written with `keys` keys, has frozen no memtable
/// (so all of it is in the WAL alone), then exits without closing it.
fn exit_before_any_checkpoint(db: mapstore::Db, keys: u64) {
    let stats = db.checkpoint_stats();
    assert_eq!(
        (stats.checkpoints, stats.frozen_memtables),
        (0, 0),
        "the memtable was frozen before the log was written"
    );
    eprintln!(
        "  {keys} keys, memtable {:.1} MB",
        db.memtable_bytes() as f64 / 1e6
    );
    std::mem::forget(db);
    std::process::exit(0);
}

// ---------------------------------------------------------------------------
// The machine's limits (parent process)

fn machine_limits(settings: &Settings) -> BTreeMap<String, f64> {
    let dir = tempfile::tempdir().unwrap();
    let page = [0xA5u8; 4096];
    let mut out = BTreeMap::new();
    let open = |name: &str| {
        OpenOptions::new()
            .create(true)
            .write(true)
            .truncate(true)
            .open(dir.path().join(name))
            .unwrap()
    };

    // 4 KiB appends, each followed by fdatasync.
    let file = open("append");
    let mut latencies = Vec::new();
    let stop_at = Instant::now() + settings.budget();
    while Instant::now() < stop_at {
        let begun = Instant::now();
        file.write_all_at(&page, latencies.len() as u64 * 4096)
            .unwrap();
        file.sync_data().unwrap();
        latencies.push(begun.elapsed());
    }
    latencies.sort();
    out.insert(
        "append_fdatasync_per_s".into(),
        latencies.len() as f64 / settings.seconds,
    );
    out.insert(
        "append_fdatasync_p50_us".into(),
        percentile(&latencies, 0.5),
    );

    // The in-place overwrite rate is measured in every round of the synced
    // writes instead (`overwrite_fdatasync_per_s`), next to them in time.

    // Sequential bandwidth: 256 MiB in 1 MiB writes, one fdatasync at the end.
    let file = open("sequential");
    let chunk: Vec<u8> = (0..1u32 << 20).map(|i| splitmix(i as u64) as u8).collect();
    let start = Instant::now();
    for offset in (0..256u64 << 20).step_by(chunk.len()) {
        file.write_all_at(&chunk, offset).unwrap();
    }
    file.sync_data().unwrap();
    out.insert(
        "sequential_write_mb_per_s".into(),
        256.0 / start.elapsed().as_secs_f64(),
    );
    out
}

/// 4 KiB in-place overwrites of a preallocated, synced file, each followed
/// by fdatasync, for the time budget: what a preallocated WAL can reach.
/// Returns overwrites per second.
fn overwrite_fdatasync_rate(settings: &Settings) -> f64 {
    let dir = tempfile::tempdir().unwrap();
    let file = OpenOptions::new()
        .create_new(true)
        .write(true)
        .open(dir.path().join("overwrite"))
        .unwrap();
    let page = [0xA5u8; 4096];
    let size = 64u64 << 20;
    let zeros = vec![0u8; 1 << 20];
    for offset in (0..size).step_by(zeros.len()) {
        file.write_all_at(&zeros, offset).unwrap();
    }
    file.sync_all().unwrap();
    settle();
    let mut done = 0u64;
    let start = Instant::now();
    while start.elapsed() < settings.budget() {
        file.write_all_at(&page, (done * 4096) % size).unwrap();
        file.sync_data().unwrap();
        done += 1;
    }
    done as f64 / start.elapsed().as_secs_f64()
}

// ---------------------------------------------------------------------------
// Parent: run each engine in a child, then write the table and the JSON.

/// Runs this binary as a child with `args`; returns the results it printed.
fn run_child(args: &[&str]) -> BTreeMap<String, f64> {
    let exe = std::env::current_exe().unwrap();
    let output = Command::new(exe)
        .args(args)
        .stderr(std::process::Stdio::inherit())
        .output()
        .unwrap();
    assert!(
        output.status.success(),
        "child {args:?} failed: {}",
        output.status
    );
    String::from_utf8_lossy(&output.stdout)
        .lines()
        .filter_map(|line| {
            let mut parts = line.strip_prefix("RESULT ")?.split(' ');
            Some((parts.next()?.to_string(), parts.next()?.parse().ok()?))
        })
        .collect()
}

/// Which way a metric is better, for the ratio shown beside a peer's figure.
#[derive(Clone, Copy, PartialEq)]
enum Better {
    Higher,
    Lower,
    /// A figure that describes how an engine works rather than how well
    /// (what a write costs the device): shown without a ratio, and left
    /// out of the chart.
    Neither,
}

/// How each metric is shown: its label (with unit), and which way is better.
const METRICS: &[(&str, &str, Better)] = &[
    (
        "write_1t_ops",
        "synced writes, 1 thread (ops/s)",
        Better::Higher,
    ),
    ("write_1t_p50_us", "  latency p50 (us)", Better::Lower),
    ("write_1t_p99_us", "  latency p99 (us)", Better::Lower),
    (
        "write_1t_device_writes_per_op",
        "  device data writes per write",
        Better::Neither,
    ),
    (
        "write_1t_device_kib_per_op",
        "  KiB written to the device per write",
        Better::Neither,
    ),
    (
        "write_1t_device_flushes_per_op",
        "  device cache flushes per write",
        Better::Neither,
    ),
    (
        "write_4t_ops",
        "synced writes, 4 threads (ops/s)",
        Better::Higher,
    ),
    (
        "write_16t_ops",
        "synced writes, 16 threads (ops/s)",
        Better::Higher,
    ),
    (
        "write_16t_p99_us",
        "  16 threads, latency p99 (us)",
        Better::Lower,
    ),
    (
        "write_16t_device_flushes_per_op",
        "  16 threads, device cache flushes per write",
        Better::Neither,
    ),
    (
        "cas_16t_ops",
        "synced compare_and_swap, 16 threads, a key each (ops/s)",
        Better::Higher,
    ),
    (
        "insert_if_absent_16t_ops",
        "synced insert_if_absent, 16 threads, new keys (ops/s)",
        Better::Higher,
    ),
    (
        "transfer_16t_ops",
        "transfers, 16 threads, synced transactions (commits/s)",
        Better::Higher,
    ),
    ("transfer_16t_p99_us", "  latency p99 (us)", Better::Lower),
    (
        "transfer_16t_conflict_percent",
        "  attempts refused for a conflict (%)",
        Better::Neither,
    ),
    (
        "default_fill_keys_per_s",
        "fill, random, default keyspace (keys/s)",
        Better::Higher,
    ),
    (
        "keyspace_fill_keys_per_s",
        "  the same through a named keyspace (keys/s)",
        Better::Higher,
    ),
    (
        "default_get_1t",
        "random get, 1 thread, default keyspace (reads/s)",
        Better::Higher,
    ),
    (
        "keyspace_get_1t",
        "  the same through a named keyspace (reads/s)",
        Better::Higher,
    ),
    (
        "history_off_write_16t_ops",
        "synced writes, 16 threads, History::None (ops/s)",
        Better::Higher,
    ),
    (
        "history_on_write_16t_ops",
        "  the same keeping History::Duration(1h) (ops/s)",
        Better::Higher,
    ),
    (
        "history_off_fill_keys_per_s",
        "fill, random, History::None (keys/s)",
        Better::Higher,
    ),
    (
        "history_on_fill_keys_per_s",
        "  the same keeping History::Duration(1h) (keys/s)",
        Better::Higher,
    ),
    (
        "no_ttl_get_1t_from_files",
        "random get from files, 1 thread, no TTLs (reads/s)",
        Better::Higher,
    ),
    (
        "ttl_get_1t_from_files",
        "  the same, every value with a TTL (reads/s)",
        Better::Higher,
    ),
    (
        "feed_delivery_after_return_p50_us",
        "change feed beside 16 synced writers: delivery after the write returns, p50 (us)",
        Better::Lower,
    ),
    (
        "feed_delivery_after_return_p99_us",
        "  p99 (us)",
        Better::Lower,
    ),
    (
        "diff_1000_commits_checkpointed_ms",
        "diff of two snapshots 1,000 commits apart, checkpointed (ms)",
        Better::Lower,
    ),
    (
        "fill_sequential_keys_per_s",
        "fill, synced batches of 1,000, sequential (keys/s)",
        Better::Higher,
    ),
    (
        "fill_random_keys_per_s",
        "fill, synced batches of 1,000, random (keys/s)",
        Better::Higher,
    ),
    (
        "get_after_fill_1t",
        "random get after fill, 1 thread (reads/s)",
        Better::Higher,
    ),
    (
        "get_after_fill_2t",
        "random get after fill, 2 threads (reads/s)",
        Better::Higher,
    ),
    (
        "scan_after_fill_forward_keys_per_s",
        "full scan right after the fill, forward (keys/s)",
        Better::Higher,
    ),
    (
        "scan_after_fill_reverse_keys_per_s",
        "full scan right after the fill, reverse (keys/s)",
        Better::Higher,
    ),
    (
        "get_checkpointed_1t",
        "random get after checkpoint, 1 thread (reads/s)",
        Better::Higher,
    ),
    (
        "get_checkpointed_2t",
        "random get after checkpoint, 2 threads (reads/s)",
        Better::Higher,
    ),
    (
        "get_absent_1t",
        "absent get, 1 thread (reads/s)",
        Better::Higher,
    ),
    (
        "scan_forward_keys_per_s",
        "full scan, forward (keys/s)",
        Better::Higher,
    ),
    (
        "scan_reverse_keys_per_s",
        "full scan, reverse (keys/s)",
        Better::Higher,
    ),
    (
        "get_while_writing_1t",
        "random get while a thread writes (reads/s)",
        Better::Higher,
    ),
    (
        "writes_beside_reads_keys_per_s",
        "  the writer, unsynced batches (keys/s)",
        Better::Higher,
    ),
    (
        "reopen_clean_ms",
        "reopen after clean close (ms)",
        Better::Lower,
    ),
    (
        "reopen_checkpointed_ms",
        "reopen after checkpoint + close (ms)",
        Better::Lower,
    ),
    (
        "reopen_after_crash_ms",
        "reopen after a crash (kill) at end of fill (ms)",
        Better::Lower,
    ),
    (
        "wal_replayed_bytes",
        "  WAL replayed by that reopen (MB)",
        Better::Lower,
    ),
    (
        "wal_replay_mb_per_s",
        "  WAL replayed per second of that reopen (MB/s)",
        Better::Higher,
    ),
    (
        "full_memtable_reopen_after_crash_ms",
        "reopen after a crash with a full memtable's worth of WAL (ms)",
        Better::Lower,
    ),
    (
        "full_memtable_wal_replayed_bytes",
        "  WAL replayed by that reopen (MB)",
        Better::Lower,
    ),
    (
        "full_memtable_wal_replay_mb_per_s",
        "  WAL replayed per second of that reopen (MB/s)",
        Better::Higher,
    ),
    (
        "full_wal_reopen_after_crash_ms",
        "reopen after a crash with a full WAL of lone synced inserts (ms)",
        Better::Lower,
    ),
    (
        "full_wal_wal_replayed_bytes",
        "  WAL replayed by that reopen (MB)",
        Better::Lower,
    ),
    (
        "full_wal_wal_replay_mb_per_s",
        "  WAL replayed per second of that reopen (MB/s)",
        Better::Higher,
    ),
    (
        "disk_after_fill_bytes",
        "disk after fill (MB)",
        Better::Lower,
    ),
    (
        "disk_after_overwrite_bytes",
        "disk after overwriting every key (MB)",
        Better::Lower,
    ),
    (
        "disk_after_compact_bytes",
        "  then checkpoint + compact (MB)",
        Better::Lower,
    ),
    (
        "peak_rss_fill_bytes",
        "peak resident memory of the fill (MB)",
        Better::Lower,
    ),
];

fn show(metric: &str, value: f64) -> String {
    if metric.ends_with("_bytes") {
        format!("{:.1}", value / 1e6)
    } else if value >= 100.0 {
        let whole = value.round() as u64;
        let digits = whole.to_string();
        let mut out = String::new();
        for (i, c) in digits.chars().enumerate() {
            if i > 0 && (digits.len() - i) % 3 == 0 {
                out.push(',');
            }
            out.push(c);
        }
        out
    } else {
        format!("{value:.2}")
    }
}

fn markdown(
    engines: &[&str],
    results: &BTreeMap<String, BTreeMap<String, f64>>,
    limits: &BTreeMap<String, f64>,
    settings: &Settings,
) -> String {
    let mut out = String::new();
    out.push_str(&format!(
        "{} keys of {KEY_BYTES} bytes, values of {VALUE_BYTES} bytes; timed workloads run {} s. \
         Every figure is the median of {} rounds, in each of which the engines take turns, a \
         different one first each time (the synced writes and the overwrite baseline run first, \
         in rounds of their own); a scan's figure in a round is itself the median of seven.\n\n",
        show("", settings.keys as f64),
        settings.seconds,
        settings.rounds
    ));
    out.push_str("| workload |");
    for engine in engines {
        out.push_str(&format!(" {engine} |"));
    }
    out.push_str("\n|---|");
    out.push_str(&"---:|".repeat(engines.len()));
    out.push('\n');
    let mapstore = results.get("mapstore");
    for (metric, label, better) in METRICS {
        out.push_str(&format!("| {label} |"));
        for engine in engines {
            let value = results.get(*engine).and_then(|r| r.get(*metric));
            let ours = mapstore.and_then(|r| r.get(*metric));
            let cell = match (value, ours) {
                (Some(v), _) if *engine == "mapstore" => show(metric, *v),
                (Some(v), Some(o)) if *o > 0.0 && *v > 0.0 && *better != Better::Neither => {
                    // The peer's figure as a multiple of mapstore's, oriented
                    // so that < 1.00x always means "worse than mapstore".
                    let ratio = if *better == Better::Higher {
                        v / o
                    } else {
                        o / v
                    };
                    let digits = if ratio < 0.05 { 3 } else { 2 };
                    format!("{} ({ratio:.digits$}x)", show(metric, *v))
                }
                (Some(v), _) => show(metric, *v),
                (None, _) => "-".into(),
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out.push_str(&format!(
        "\nLive data: {:.1} MB. In parentheses: the peer as a multiple of mapstore, oriented so that below 1.00x means worse than mapstore.\n\n",
        settings.keys as f64 * (KEY_BYTES + VALUE_BYTES) as f64 / 1e6
    ));
    out.push_str("Machine limits, same run:\n\n");
    for (name, value) in limits {
        out.push_str(&format!("- {name}: {}\n", show(name, *value)));
    }
    out
}

fn json(
    engines: &[&str],
    results: &BTreeMap<String, BTreeMap<String, f64>>,
    limits: &BTreeMap<String, f64>,
    settings: &Settings,
) -> String {
    let object = |map: &BTreeMap<String, f64>| {
        let fields: Vec<String> = map.iter().map(|(k, v)| format!("\"{k}\": {v}")).collect();
        format!("{{{}}}", fields.join(", "))
    };
    let mut engine_fields = Vec::new();
    for engine in engines {
        if let Some(r) = results.get(*engine) {
            engine_fields.push(format!("    \"{engine}\": {}", object(r)));
        }
    }
    let labels: Vec<String> = METRICS
        .iter()
        .map(|(m, l, better)| {
            // Labels keep their leading spaces: they mark a row that
            // details the one above it. A descriptive metric has no better
            // direction: `null`.
            let h = match better {
                Better::Higher => "true",
                Better::Lower => "false",
                Better::Neither => "null",
            };
            format!("    \"{m}\": {{\"label\": \"{l}\", \"higher_is_better\": {h}}}")
        })
        .collect();
    let unix_time = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    format!(
        "{{\n  \"unix_time\": {unix_time},\n  \"keys\": {},\n  \"seconds\": {},\n  \"rounds\": {},\n  \"cpus\": {},\n  \"machine\": {},\n  \"engines\": {{\n{}\n  }},\n  \"metrics\": {{\n{}\n  }}\n}}\n",
        settings.keys,
        settings.seconds,
        settings.rounds,
        std::thread::available_parallelism().map_or(1, |n| n.get()),
        object(limits),
        engine_fields.join(",\n"),
        labels.join(",\n")
    )
}

// ---------------------------------------------------------------------------
// Scale (`--scale`): a long ingest, then reads at that size

/// Keys the scale run ingests (`MAPSTORE_SCALE_KEYS`, 20,000,000 by default).
fn scale_keys() -> u64 {
    env_or("MAPSTORE_SCALE_KEYS", 20_000_000)
}

/// The environment variable `name` as a number, or `default`.
fn env_or<T: std::str::FromStr>(name: &str, default: T) -> T {
    std::env::var(name)
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(default)
}

/// The process's anonymous resident memory (RssAnon: heap and stacks, not
/// mapped file pages), in bytes.
fn anon_rss() -> u64 {
    process_status_bytes("RssAnon:")
}

/// The scale run of one engine (a child process): `keys` random keys in
/// synced batches of 1,000, timed by tenths, with the device's bytes
/// written, the directory's size (sampled every 200 ms) and the anonymous
/// memory (likewise) alongside; then reads at that size and a reopen.
fn run_scale_engine(name: &str, settings: &Settings) {
    let keys = scale_keys();
    let live = keys as f64 * (KEY_BYTES + VALUE_BYTES) as f64;
    let scratch = tempfile::tempdir().unwrap();
    let dir = scratch.path().join("scale");
    settle();
    reset_peak_rss();
    let engine = open_engine(name, &dir);
    let device_before = DeviceCounters::of(&dir);
    let stop = AtomicBool::new(false);
    let (most_disk, most_anon) = (AtomicU64::new(0), AtomicU64::new(0));
    let tenths = std::thread::scope(|scope| {
        scope.spawn(|| {
            while !stop.load(Ordering::Relaxed) {
                most_disk.fetch_max(disk_bytes(&dir), Ordering::Relaxed);
                most_anon.fetch_max(anon_rss(), Ordering::Relaxed);
                std::thread::sleep(Duration::from_millis(200));
            }
        });
        let mut tenths = Vec::with_capacity(10);
        let mut items = Vec::with_capacity(BATCH);
        for tenth in 0..10 {
            let (first, end) = (keys * tenth / 10, keys * (tenth + 1) / 10);
            let start = Instant::now();
            let mut i = first;
            while i < end {
                items.clear();
                let batch_end = (i + BATCH as u64).min(end);
                items.extend((i..batch_end).map(|j| (random_key(j), value(j, 0))));
                engine.write_batch(&items, true);
                i = batch_end;
            }
            let rate = (end - first) as f64 / start.elapsed().as_secs_f64();
            eprintln!("  tenth {}: {rate:.0} keys/s", tenth + 1);
            tenths.push(rate);
        }
        stop.store(true, Ordering::Relaxed);
        tenths
    });
    let ingest: f64 = keys as f64
        / tenths
            .iter()
            .map(|rate| keys as f64 / 10.0 / rate)
            .sum::<f64>();
    report("scale_ingest_keys_per_s", ingest);
    for (tenth, rate) in tenths.iter().enumerate() {
        report(
            &format!("scale_ingest_tenth_{}_keys_per_s", tenth + 1),
            *rate,
        );
    }
    report("scale_last_over_first_tenth", tenths[9] / tenths[0]);
    if let (Some(before), Some(after)) = (device_before, DeviceCounters::of(&dir)) {
        let written = after.sectors_written.saturating_sub(before.sectors_written) as f64 * 512.0;
        report("scale_write_amplification", written / live);
    }
    report("scale_peak_rss_bytes", peak_rss());
    report(
        "scale_peak_anon_rss_bytes",
        most_anon.load(Ordering::Relaxed) as f64,
    );
    let disk_after = disk_bytes(&dir) as f64;
    report(
        "scale_disk_most_over_live",
        most_disk.load(Ordering::Relaxed).max(disk_after as u64) as f64 / live,
    );
    report("scale_disk_after_over_live", disk_after / live);

    // Reads at that size, as the ingest left the engine.
    report(
        "scale_get_1t",
        point_reads(&*engine, 1, keys, true, settings),
    );
    report(
        "scale_get_2t",
        point_reads(&*engine, 2, keys, true, settings),
    );
    report(
        "scale_get_absent_1t",
        point_reads(&*engine, 1, keys, false, settings),
    );
    let start = Instant::now();
    assert_eq!(engine.scan(false), keys);
    report(
        "scale_scan_keys_per_s",
        keys as f64 / start.elapsed().as_secs_f64(),
    );

    // Gets while one thread overwrites in synced batches (which makes the
    // LSM engines flush and merge), with each get's latency.
    let stop = AtomicBool::new(false);
    let (gets, mut latencies) = std::thread::scope(|scope| {
        let writer = &*engine;
        let stop = &stop;
        scope.spawn(move || {
            let mut rng = Rng(99);
            let mut items = Vec::with_capacity(BATCH);
            while !stop.load(Ordering::Relaxed) {
                items.clear();
                items.extend((0..BATCH).map(|_| {
                    let i = rng.below(keys);
                    (random_key(i), value(i, 1))
                }));
                writer.write_batch(&items, true);
            }
        });
        let mut rng = Rng(7);
        let mut latencies = Vec::new();
        let start = Instant::now();
        while start.elapsed() < settings.budget() * 3 {
            let key = random_key(rng.below(keys));
            let began = Instant::now();
            assert!(engine.get(&key).is_some());
            latencies.push(began.elapsed());
        }
        stop.store(true, Ordering::Relaxed);
        (
            latencies.len() as f64 / start.elapsed().as_secs_f64(),
            latencies,
        )
    });
    latencies.sort_unstable();
    report("scale_get_while_writing_1t", gets);
    report(
        "scale_get_while_writing_p99_us",
        percentile(&latencies, 0.99),
    );

    // Reopen after a clean close.
    reopen(engine, name, &dir, "scale_reopen_ms").close();
}

/// Fill and random gets with large values (a child process): for 4 KiB
/// and 64 KiB values, 256 MiB of them in synced batches of 1 MiB
/// (`MAPSTORE_LARGE_VALUE_BYTES` for another total), then random gets.
fn run_large_values(name: &str, settings: &Settings) {
    let total: u64 = env_or("MAPSTORE_LARGE_VALUE_BYTES", 256 << 20);
    for value_bytes in [4096u64, 65536] {
        let keys = total / value_bytes;
        let per_batch = ((1u64 << 20) / value_bytes) as usize;
        let scratch = tempfile::tempdir().unwrap();
        let dir = scratch.path().join("large");
        settle();
        let engine = open_engine(name, &dir);
        // Values cut from 8 MiB of random bytes at varying offsets:
        // incompressible, and cheap to make inside the timed loop.
        let mut rng = Rng(value_bytes);
        let pool: Vec<u8> = (0..8 << 20).map(|_| rng.below(256) as u8).collect();
        let start = Instant::now();
        let mut items = Vec::with_capacity(per_batch);
        for first in (0..keys).step_by(per_batch) {
            items.clear();
            items.extend((first..(first + per_batch as u64).min(keys)).map(|i| {
                let offset = (splitmix(i) % (pool.len() as u64 - value_bytes)) as usize;
                (
                    random_key(i),
                    pool[offset..offset + value_bytes as usize].to_vec(),
                )
            }));
            engine.write_large(&items, true);
        }
        let kib = value_bytes / 1024;
        report(
            &format!("large_{kib}k_fill_mb_per_s"),
            total as f64 / 1e6 / start.elapsed().as_secs_f64(),
        );
        report(
            &format!("large_{kib}k_disk_over_live"),
            disk_bytes(&dir) as f64 / total as f64,
        );
        report(
            &format!("large_{kib}k_get_1t"),
            point_reads(&*engine, 1, keys, true, settings),
        );
        engine.close();
    }
}

/// The scale table: each metric by engine, with mapstore's figure over the
/// peer's where higher is better (and the peer's over mapstore's where
/// lower is).
fn scale_markdown(engines: &[&str], results: &BTreeMap<String, BTreeMap<String, f64>>) -> String {
    let rows: &[(&str, &str, Better)] = &[
        (
            "scale_ingest_keys_per_s",
            "ingest, synced batches of 1,000 (keys/s)",
            Better::Higher,
        ),
        (
            "scale_ingest_tenth_1_keys_per_s",
            "  first tenth (keys/s)",
            Better::Higher,
        ),
        (
            "scale_ingest_tenth_10_keys_per_s",
            "  last tenth (keys/s)",
            Better::Higher,
        ),
        (
            "scale_last_over_first_tenth",
            "  last tenth / first tenth",
            Better::Higher,
        ),
        (
            "scale_write_amplification",
            "  device bytes written / user bytes",
            Better::Lower,
        ),
        (
            "scale_disk_most_over_live",
            "  most disk during the ingest / live bytes",
            Better::Lower,
        ),
        (
            "scale_disk_after_over_live",
            "  disk after / live bytes",
            Better::Lower,
        ),
        (
            "scale_peak_rss_bytes",
            "  peak RSS (MB, mapped file pages included)",
            Better::Lower,
        ),
        (
            "scale_peak_anon_rss_bytes",
            "  peak anonymous RSS (MB)",
            Better::Lower,
        ),
        (
            "scale_get_1t",
            "random get, 1 thread (reads/s)",
            Better::Higher,
        ),
        (
            "scale_get_2t",
            "random get, 2 threads (reads/s)",
            Better::Higher,
        ),
        (
            "scale_get_absent_1t",
            "absent get, 1 thread (reads/s)",
            Better::Higher,
        ),
        (
            "scale_scan_keys_per_s",
            "full scan (keys/s)",
            Better::Higher,
        ),
        (
            "scale_get_while_writing_1t",
            "random get beside a synced writer (reads/s)",
            Better::Higher,
        ),
        (
            "scale_get_while_writing_p99_us",
            "  its p99 latency (us)",
            Better::Lower,
        ),
        (
            "scale_reopen_ms",
            "reopen after a clean close (ms)",
            Better::Lower,
        ),
        (
            "large_4k_fill_mb_per_s",
            "4 KiB values: fill, synced 1 MiB batches (MB/s)",
            Better::Higher,
        ),
        (
            "large_4k_disk_over_live",
            "  disk / live bytes",
            Better::Lower,
        ),
        (
            "large_4k_get_1t",
            "  random get, 1 thread (reads/s)",
            Better::Higher,
        ),
        (
            "large_64k_fill_mb_per_s",
            "64 KiB values: fill, synced 1 MiB batches (MB/s)",
            Better::Higher,
        ),
        (
            "large_64k_disk_over_live",
            "  disk / live bytes",
            Better::Lower,
        ),
        (
            "large_64k_get_1t",
            "  random get, 1 thread (reads/s)",
            Better::Higher,
        ),
    ];
    let mut out = format!(
        "{} keys of 16 bytes, values of 100 bytes ({:.2} GB live), inserted in random order.\n\n| workload | {} |\n|---|{}\n",
        scale_keys(),
        scale_keys() as f64 * (KEY_BYTES + VALUE_BYTES) as f64 / 1e9,
        engines.join(" | "),
        "---:|".repeat(engines.len()),
    );
    for (metric, label, better) in rows {
        let ours = results
            .get("mapstore")
            .and_then(|r| r.get(*metric))
            .copied();
        out.push_str(&format!("| {label} |"));
        for engine in engines {
            let cell = match results.get(*engine).and_then(|r| r.get(*metric)) {
                None => "-".to_string(),
                Some(value) => {
                    let shown = show(metric, *value);
                    match ours {
                        Some(ours) if *engine != "mapstore" && *value > 0.0 && ours > 0.0 => {
                            let ratio = match better {
                                Better::Lower => ours / value,
                                _ => value / ours,
                            };
                            format!("{shown} ({ratio:.2}x)")
                        }
                        _ => shown,
                    }
                }
            };
            out.push_str(&format!(" {cell} |"));
        }
        out.push('\n');
    }
    out
}

/// `--scale`: each engine's scale run in its own child, one after the
/// other; writes `scale.md` and `scale.json` beside the regular results.
fn run_scale(engines: &[&str], out_dir: &Path) {
    let mut results: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();
    for engine in engines {
        eprintln!("scale: {engine}");
        let mut measured = run_child(&["--scale-engine", engine]);
        measured.extend(run_child(&["--large-values", engine]));
        results.insert(engine.to_string(), measured);
    }
    let table = scale_markdown(engines, &results);
    println!("\n{table}");
    std::fs::create_dir_all(out_dir).unwrap();
    std::fs::write(out_dir.join("scale.md"), &table).unwrap();
    let json: Vec<String> = results
        .iter()
        .map(|(engine, metrics)| {
            let fields: Vec<String> = metrics
                .iter()
                .map(|(m, v)| format!("\"{m}\": {v}"))
                .collect();
            format!("\"{engine}\": {{{}}}", fields.join(", "))
        })
        .collect();
    std::fs::write(
        out_dir.join("scale.json"),
        format!("{{{}}}\n", json.join(", ")),
    )
    .unwrap();
    eprintln!("wrote {}/scale.md and scale.json", out_dir.display());
}

fn main() {
    let args: Vec<String> = std::env::args()
        .skip(1)
        .filter(|a| a != "--bench")
        .collect();
    let settings = Settings::from_env();
    match args
        .iter()
        .map(String::as_str)
        .collect::<Vec<_>>()
        .as_slice()
    {
        ["--engine", name] => return run_engine(name, &settings),
        ["--synced-writes", name] => return run_synced_writes(name, &settings),
        ["--transfers", name] => return run_transfers(name, &settings),
        ["--keyspace-overhead"] => return run_keyspace_overhead(&settings),
        ["--history"] => return run_history(&settings),
        ["--crash-fill", name, dir] => return crash_fill(name, Path::new(dir), &settings),
        ["--crash-reopen", name, dir] => return crash_reopen(name, Path::new(dir), ""),
        ["--crash-reopen", name, dir, prefix] => {
            return crash_reopen(name, Path::new(dir), prefix);
        }
        ["--crash-full-memtable", dir] => return crash_full_memtable(Path::new(dir)),
        ["--crash-full-wal", dir] => return crash_full_wal(Path::new(dir)),
        ["--scale-engine", name] => return run_scale_engine(name, &settings),
        ["--large-values", name] => return run_large_values(name, &settings),
        _ => {}
    }

    let wanted = std::env::var("MAPSTORE_COMPARE_ENGINES").unwrap_or_default();
    let engines: Vec<&str> = ENGINES
        .iter()
        .copied()
        .filter(|e| wanted.is_empty() || wanted.split(',').any(|w| w.trim() == *e))
        .collect();
    let out_dir = std::env::var("MAPSTORE_COMPARE_OUT")
        .map(PathBuf::from)
        .unwrap_or_else(|_| PathBuf::from("target/compare"));
    if args.iter().any(|arg| arg == "--scale") {
        return run_scale(&engines, &out_dir);
    }
    eprintln!("machine limits");
    let limits = machine_limits(&settings);
    for (name, value) in &limits {
        eprintln!("  {name} = {value:.1}");
    }
    let mut limits = limits;
    let mut results: BTreeMap<String, BTreeMap<String, f64>> = BTreeMap::new();

    // Synced writes depend most on what else the machine's disk is doing,
    // so they run in rounds: the overwrite baseline, then each engine in
    // turn, each round starting with the next engine (the one right after
    // the baseline may meet its writeback); the table shows the median of
    // each figure over the rounds.
    let mut baseline = Vec::new();
    let mut write_rounds: BTreeMap<&str, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for round in 1..=settings.rounds {
        eprintln!("synced writes, round {round} of {}", settings.rounds);
        baseline.push(overwrite_fdatasync_rate(&settings));
        eprintln!(
            "  overwrite_fdatasync_per_s = {:.1}",
            baseline[baseline.len() - 1]
        );
        for turn in 0..engines.len() {
            let engine = &engines[(round - 1 + turn) % engines.len()];
            eprintln!("{engine}");
            let mut measured = run_child(&["--synced-writes", engine]);
            measured.extend(run_child(&["--transfers", engine]));
            for (metric, value) in measured {
                let per_engine = write_rounds.entry(engine).or_default();
                per_engine.entry(metric).or_default().push(value);
            }
        }
    }
    limits.insert("overwrite_fdatasync_per_s".into(), median(&mut baseline));
    for (engine, metrics) in write_rounds {
        let medians = results.entry(engine.to_string()).or_default();
        for (metric, mut values) in metrics {
            medians.insert(metric, median(&mut values));
        }
    }

    // The other workloads run in rounds too, for the same reason: on a
    // shared machine a slow minute would otherwise fall on one engine.
    let mut engine_rounds: BTreeMap<&str, BTreeMap<String, Vec<f64>>> = BTreeMap::new();
    for round in 1..=settings.rounds {
        eprintln!("other workloads, round {round} of {}", settings.rounds);
        for turn in 0..engines.len() {
            let engine = &engines[(round - 1 + turn) % engines.len()];
            eprintln!("{engine}");
            let mut measured = run_child(&["--engine", engine]);
            let crashed = tempfile::tempdir().unwrap();
            let dir = crashed.path().to_str().unwrap();
            run_child(&["--crash-fill", engine, dir]);
            measured.extend(run_child(&["--crash-reopen", engine, dir]));
            if *engine == "mapstore" {
                measured.extend(run_child(&["--keyspace-overhead"]));
                measured.extend(run_child(&["--history"]));
                for (crash, prefix) in [
                    ("--crash-full-memtable", "full_memtable_"),
                    ("--crash-full-wal", "full_wal_"),
                ] {
                    let crashed = tempfile::tempdir().unwrap();
                    let dir = crashed.path().to_str().unwrap();
                    run_child(&[crash, dir]);
                    measured.extend(run_child(&["--crash-reopen", engine, dir, prefix]));
                }
            }
            let per_engine = engine_rounds.entry(engine).or_default();
            for (metric, value) in measured {
                per_engine.entry(metric).or_default().push(value);
            }
        }
    }
    for (engine, metrics) in engine_rounds {
        let medians = results.entry(engine.to_string()).or_default();
        for (metric, mut values) in metrics {
            medians.insert(metric, median(&mut values));
        }
    }

    std::fs::create_dir_all(&out_dir).unwrap();
    let table = markdown(&engines, &results, &limits, &settings);
    println!("\n{table}");
    std::fs::File::create(out_dir.join("compare.md"))
        .and_then(|mut f| f.write_all(table.as_bytes()))
        .unwrap();
    std::fs::write(
        out_dir.join("compare.json"),
        json(&engines, &results, &limits, &settings),
    )
    .unwrap();
    eprintln!("wrote {}/compare.md and compare.json", out_dir.display());
}
