//! Core benchmarks: synced writes (1, 4 and 8 threads, and batches of 1,000)
//! and buffered writes from 8 threads, beside the machine's own fdatasync
//! rates measured in the same run (the baselines the write figures are
//! compared with); random and absent point reads and a full scan, served by
//! the memtable (random gets with and without its read index) and by a
//! snapshot file; and reopening after a checkpoint
//! against replaying the same data from the WAL.
//!
//! `cargo bench --bench core`; `MAPSTORE_BENCH_KEYS` sets the number of keys
//! for the read benchmarks (1,000,000 by default).

use std::fs::OpenOptions;
use std::hint::black_box;
use std::os::unix::fs::FileExt;
use std::sync::Arc;
use std::time::{Duration, Instant};

use criterion::measurement::WallTime;
use criterion::{
    BatchSize, BenchmarkGroup, Criterion, Throughput, criterion_group, criterion_main,
};
use mapstore::{Db, Durability, Options, WriteBatch};

const VALUE_BYTES: usize = 100;

fn key(i: u64) -> [u8; 16] {
    // A fixed permutation of i, so sequential i gives keys in random order.
    let mixed = i.wrapping_mul(0x9E37_79B9_7F4A_7C15).rotate_left(17) ^ 0x5555;
    let mut out = [0u8; 16];
    out[..8].copy_from_slice(&mixed.to_be_bytes());
    out[8..].copy_from_slice(&i.to_be_bytes());
    out
}

fn value(i: u64) -> Vec<u8> {
    let mut state = i.wrapping_add(1).wrapping_mul(0x2545_F491_4F6C_DD1D);
    (0..VALUE_BYTES)
        .map(|_| {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state as u8
        })
        .collect()
}

fn keys_for_reads() -> u64 {
    std::env::var("MAPSTORE_BENCH_KEYS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(1_000_000)
}

/// The machine's limits: 4 KiB append + fdatasync, and 4 KiB overwrite of a
/// zero-filled (preallocated) file + fdatasync.
fn bench_fdatasync_baselines(c: &mut Criterion) {
    let mut group = c.benchmark_group("baseline");
    group.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().unwrap();
    let page = vec![0xA5u8; 4096];

    let path = dir.path().join("append");
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let mut offset = 0u64;
    group.bench_function("fdatasync_append_4k", |b| {
        b.iter(|| {
            file.write_all_at(&page, offset).unwrap();
            file.sync_data().unwrap();
            offset += 4096;
        })
    });

    let path = dir.path().join("overwrite");
    let file = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(&path)
        .unwrap();
    let size = 64u64 << 20;
    let zeros = vec![0u8; 1 << 20];
    for chunk in 0..size / zeros.len() as u64 {
        file.write_all_at(&zeros, chunk * zeros.len() as u64)
            .unwrap();
    }
    file.sync_all().unwrap();
    let mut offset = 0u64;
    group.bench_function("fdatasync_overwrite_4k", |b| {
        b.iter(|| {
            file.write_all_at(&page, offset).unwrap();
            file.sync_data().unwrap();
            offset = (offset + 4096) % size;
        })
    });
    group.finish();
}

/// The cost of the `FileSystem` trait the engine routes every file
/// operation through: 4 KiB writes in the page cache, and 4 KiB overwrite +
/// fdatasync, each through `std::fs` directly and through the trait object.
fn bench_io_layer(c: &mut Criterion) {
    use mapstore::testing::{FileSystem, RealFileSystem};
    let mut group = c.benchmark_group("io_layer");
    group.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().unwrap();
    let page = vec![0x5Au8; 4096];
    let span = 16u64 << 20;

    let direct = OpenOptions::new()
        .create(true)
        .write(true)
        .truncate(true)
        .open(dir.path().join("direct"))
        .unwrap();
    let fs: Arc<dyn FileSystem> = Arc::new(RealFileSystem);
    let mut via_trait = fs.create_new(&dir.path().join("trait")).unwrap();
    for offset in (0..span).step_by(4096) {
        direct.write_all_at(&page, offset).unwrap();
        via_trait.write_all_at(offset, &page).unwrap();
    }
    direct.sync_all().unwrap();
    via_trait.sync_all().unwrap();

    let mut offset = 0u64;
    group.bench_function("pwrite_4k_std", |b| {
        b.iter(|| {
            direct.write_all_at(&page, offset).unwrap();
            offset = (offset + 4096) % span;
        })
    });
    group.bench_function("pwrite_4k_trait", |b| {
        b.iter(|| {
            via_trait.write_all_at(offset, &page).unwrap();
            offset = (offset + 4096) % span;
        })
    });
    group.bench_function("overwrite_fdatasync_4k_std", |b| {
        b.iter(|| {
            direct.write_all_at(&page, offset).unwrap();
            direct.sync_data().unwrap();
            offset = (offset + 4096) % span;
        })
    });
    group.bench_function("overwrite_fdatasync_4k_trait", |b| {
        b.iter(|| {
            via_trait.write_all_at(offset, &page).unwrap();
            via_trait.sync_data().unwrap();
            offset = (offset + 4096) % span;
        })
    });
    group.finish();
}

fn open_db(dir: &std::path::Path) -> Db {
    Db::open_with(dir, Options::default().durability(Durability::Sync)).unwrap()
}

fn bench_synced_writes(c: &mut Criterion) {
    let mut group = c.benchmark_group("synced_writes");
    group.throughput(Throughput::Elements(1));
    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path());
    let mut i = 0u64;
    group.bench_function("insert_1_thread", |b| {
        b.iter(|| {
            db.insert(key(i), value(i)).unwrap();
            i += 1;
        })
    });
    report_stats("insert_1_thread", &db);
    drop(db);

    // The buffered inserts show the cost of the hand-offs between writers
    // alone, without an fsync to share.
    for (threads, durability, name) in [
        (4u64, Durability::Sync, "insert_4_threads"),
        (8, Durability::Sync, "insert_8_threads"),
        (8, Durability::Buffered, "buffered_insert_8_threads"),
    ] {
        let dir = tempfile::tempdir().unwrap();
        let db =
            Arc::new(Db::open_with(dir.path(), Options::default().durability(durability)).unwrap());
        let next = Arc::new(std::sync::atomic::AtomicU64::new(0));
        group.bench_function(name, |b| {
            b.iter_custom(|iters| {
                // `iters` inserts split over the threads; the elapsed time is
                // for all of them, so the throughput is the aggregate rate.
                let per_thread = iters.div_ceil(threads);
                let start = Instant::now();
                std::thread::scope(|scope| {
                    for _ in 0..threads {
                        let db = db.clone();
                        let next = next.clone();
                        scope.spawn(move || {
                            for _ in 0..per_thread {
                                let i = next.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
                                db.insert(key(i), value(i)).unwrap();
                            }
                        });
                    }
                });
                start
                    .elapsed()
                    .mul_f64(iters as f64 / (per_thread * threads) as f64)
            })
        });
        report_stats(name, &db);
    }

    let dir = tempfile::tempdir().unwrap();
    let db = open_db(dir.path());
    let mut i = 0u64;
    group.throughput(Throughput::Elements(1000));
    group.bench_function("batch_1000", |b| {
        b.iter_batched(
            || {
                let mut batch = WriteBatch::new();
                for _ in 0..1000 {
                    batch.insert(key(i), value(i));
                    i += 1;
                }
                batch
            },
            |batch| db.write(batch).unwrap(),
            BatchSize::SmallInput,
        )
    });
    group.finish();
}

fn report_stats(name: &str, db: &Db) {
    let stats = db.commit_stats();
    eprintln!(
        "{name}: {} commits in {} WAL writes ({} fsyncs) = {:.2} commits per write; \
         {} waits ended without sleep",
        stats.commits,
        stats.groups,
        stats.wal_syncs,
        stats.commits as f64 / stats.groups.max(1) as f64,
        stats.waits_without_sleep
    );
}

/// Writes keys `0..n` in batches of 10,000 without fsyncs.
fn load(db: &Db, n: u64) {
    for start in (0..n).step_by(10_000) {
        let mut batch = WriteBatch::new();
        for i in start..(start + 10_000).min(n) {
            batch.insert(key(i), value(i));
        }
        db.write(batch).unwrap();
    }
}

/// Options that keep every write in the memtable (no checkpoint runs).
fn memtable_only() -> Options {
    Options::default()
        .durability(Durability::Buffered)
        .memtable_size(usize::MAX)
        .max_wal_bytes(u64::MAX)
}

/// Gets of random keys of `0..n`, all present in `db`.
fn bench_random_get(group: &mut BenchmarkGroup<'_, WallTime>, name: &str, db: &Db, n: u64) {
    let mut state = 1u64;
    group.bench_function(name, |b| {
        b.iter(|| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            let i = (state >> 33) % n;
            black_box(db.get(key(i)).unwrap().unwrap());
        })
    });
}

/// Random get, absent get and full scans (forward and reverse) over `db`,
/// holding keys `0..n`.
fn read_benches(c: &mut Criterion, group_name: &str, db: &Db, n: u64) {
    let mut group = c.benchmark_group(group_name);
    group.throughput(Throughput::Elements(1));
    bench_random_get(&mut group, &format!("random_get_{n}_keys"), db, n);
    let mut state = 1u64;
    group.bench_function("absent_get", |b| {
        b.iter(|| {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            black_box(db.get(key(n + (state >> 33) % n)).unwrap());
        })
    });
    group.throughput(Throughput::Elements(n));
    group.measurement_time(Duration::from_secs(10));
    group.sample_size(10);
    group.bench_function(format!("full_scan_{n}_keys"), |b| {
        b.iter(|| {
            let mut count = 0u64;
            for entry in db.iter() {
                black_box(entry.unwrap());
                count += 1;
            }
            assert_eq!(count, n);
        })
    });
    group.bench_function(format!("full_scan_reverse_{n}_keys"), |b| {
        b.iter(|| {
            let mut count = 0u64;
            for entry in db.iter().rev() {
                black_box(entry.unwrap());
                count += 1;
            }
            assert_eq!(count, n);
        })
    });
    group.finish();
}

/// Reads served by the memtable.
fn bench_reads(c: &mut Criterion) {
    let n = keys_for_reads();
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), memtable_only()).unwrap();
    load(&db, n);
    read_benches(c, "reads", &db, n);
    drop(db);

    // The same random gets searching the skiplist: without the read index
    // the memtable builds once reads go on with no write between them
    // (which the gets above are served from, after criterion's warm-up).
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), memtable_only().memtable_read_index(false)).unwrap();
    load(&db, n);
    let mut group = c.benchmark_group("reads");
    group.throughput(Throughput::Elements(1));
    bench_random_get(&mut group, &format!("random_get_{n}_keys_skiplist"), &db, n);
    group.finish();
}

/// The same reads served by one snapshot file (after a compaction the
/// memtable is empty).
fn bench_file_reads(c: &mut Criterion) {
    let n = keys_for_reads();
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), memtable_only()).unwrap();
    load(&db, n);
    db.compact().unwrap();
    assert_eq!(db.memtable_bytes(), 0);
    assert_eq!(db.checkpoint_stats().snapshot_files, 1);
    read_benches(c, "file_reads", &db, n);
}

/// Reads of 1 MiB values from a snapshot file. Both hand each value out in
/// place, without reading it, so they should cost about what reads of
/// small values do: a read that touches the whole value (a prefetch of an
/// oversized block, say) shows here as a seventyfold slowdown.
fn bench_large_value_reads(c: &mut Criterion) {
    const KEYS: u64 = 16;
    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(dir.path(), memtable_only()).unwrap();
    for i in 0..KEYS {
        db.insert(key(i), vec![i as u8; 1 << 20]).unwrap();
    }
    db.compact().unwrap();
    assert_eq!(db.memtable_bytes(), 0);
    let mut group = c.benchmark_group("large_value_reads");
    group.throughput(Throughput::Elements(1));
    let mut i = 0;
    group.bench_function("get_1mib_value", |b| {
        b.iter(|| {
            i = (i + 1) % KEYS;
            black_box(db.get(key(i)).unwrap().unwrap());
        })
    });
    group.throughput(Throughput::Elements(KEYS));
    group.bench_function("reverse_scan_1mib_values", |b| {
        b.iter(|| {
            let mut count = 0;
            for entry in db.iter().rev() {
                black_box(entry.unwrap());
                count += 1;
            }
            assert_eq!(count, KEYS as usize);
        })
    });
    group.finish();
}

/// Opening a database whose data is in a snapshot file, against opening
/// one that replays the same data from the WAL.
fn bench_reopen(c: &mut Criterion) {
    let n = keys_for_reads();
    let checkpointed = tempfile::tempdir().unwrap();
    let db = Db::open_with(checkpointed.path(), memtable_only()).unwrap();
    load(&db, n);
    db.checkpoint().unwrap();
    db.close().unwrap();
    let logged = tempfile::tempdir().unwrap();
    let db = Db::open_with(logged.path(), memtable_only()).unwrap();
    load(&db, n);
    db.close().unwrap();

    let mut group = c.benchmark_group("reopen");
    group.sample_size(10);
    group.measurement_time(Duration::from_secs(10));
    for (name, dir) in [
        ("after_checkpoint", &checkpointed),
        ("replaying_wal", &logged),
    ] {
        group.bench_function(format!("{name}_{n}_keys"), |b| {
            b.iter(|| {
                let db = Db::open_with(dir.path(), memtable_only()).unwrap();
                black_box(db.get(key(n / 2)).unwrap().unwrap());
                db.close().unwrap();
            })
        });
    }
    group.finish();
}

/// The history's reads: point reads from a file whose every value has a
/// TTL beside the same without (`get_with_ttls`, `get_without_ttls`), a
/// diff of two snapshots 1,000 commits apart after a checkpoint of `n`
/// keys, and the change feed reading 1,000 commits back from the WAL.
fn bench_history(c: &mut Criterion) {
    let n = keys_for_reads();
    let mut group = c.benchmark_group("history");
    for with_ttl in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_with(
            dir.path(),
            Options::default().durability(Durability::Buffered),
        )
        .unwrap();
        for start in (0..n).step_by(10_000) {
            let mut batch = WriteBatch::new();
            for i in start..(start + 10_000).min(n) {
                if with_ttl {
                    batch.insert_with_ttl(key(i), value(i), Duration::from_secs(3600));
                } else {
                    batch.insert(key(i), value(i));
                }
            }
            db.write(batch).unwrap();
        }
        db.compact().unwrap();
        group.throughput(Throughput::Elements(1));
        let name = if with_ttl {
            "get_with_ttls"
        } else {
            "get_without_ttls"
        };
        bench_random_get(&mut group, name, &db, n);
    }

    let dir = tempfile::tempdir().unwrap();
    let db = Db::open_with(
        dir.path(),
        Options::default()
            .durability(Durability::Buffered)
            .history(mapstore::History::Commits(u64::MAX)),
    )
    .unwrap();
    load(&db, n);
    db.compact().unwrap();
    let before = db.snapshot();
    for i in 0..1_000u64 {
        db.insert(key(i * 97 % n), value(i + 1)).unwrap();
    }
    db.checkpoint().unwrap();
    let after = db.snapshot();
    group.throughput(Throughput::Elements(1_000));
    group.bench_function("diff_1000_commits", |b| {
        b.iter(|| assert_eq!(before.diff(&after).count(), 1_000))
    });
    group.bench_function("feed_1000_commits", |b| {
        b.iter(|| {
            let mut feed = db.changes_since(before.seq()).unwrap();
            for _ in 0..1_000 {
                black_box(feed.next_timeout(Duration::ZERO).unwrap().unwrap());
            }
        })
    });
    group.finish();
}

criterion_group! {
    name = benches;
    config = Criterion::default().measurement_time(Duration::from_secs(5)).warm_up_time(Duration::from_secs(1));
    targets = bench_fdatasync_baselines, bench_io_layer, bench_synced_writes, bench_reads, bench_file_reads, bench_large_value_reads, bench_reopen, bench_history
}
criterion_main!(benches);
