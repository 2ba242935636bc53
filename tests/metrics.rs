//! `Db::metrics`, and (feature `prometheus`) its exposition: parsed with a
//! real exposition-format parser, and scraped over HTTP from
//! examples/metrics_server.rs with a real HTTP client.

use mapstore::{Db, Options, WriteBatch};

#[test]
fn metrics_count_commits_reads_by_source_and_background_work() {
    let dir = tempfile::tempdir().unwrap();
    let options = || Options::default().checkpoint_on_close(false);
    {
        let db = Db::open_with(dir.path(), options()).unwrap();
        db.insert("in-log", "x").unwrap();
        db.close().unwrap();
    }
    let db = Db::open_with(dir.path(), options()).unwrap();
    let opened = db.metrics();
    assert!(opened.open_seconds > 0.0);
    assert_eq!(opened.commits, 0, "counters count since open");
    // From what the log replay recovered.
    assert!(db.get("in-log").unwrap().is_some());
    assert_eq!(db.metrics().gets_from_replayed_log, 1);

    let mut batch = WriteBatch::new();
    for i in 0..100 {
        batch.insert(format!("a{i:03}"), "1");
    }
    db.write(batch).unwrap();
    db.insert("b", "2").unwrap();
    db.get("b").unwrap();
    db.checkpoint().unwrap();
    db.insert("c", "3").unwrap();
    db.checkpoint().unwrap();
    db.get("a001").unwrap(); // in the older file: the newer one's filter skips it
    for i in 0..50 {
        db.get(format!("absent{i}")).unwrap();
    }
    let snapshot = db.snapshot();
    let iterated = snapshot.iter().count();
    assert_eq!(iterated, 103);

    let m = db.metrics();
    assert_eq!(m.commits, 3);
    assert_eq!(m.commit_groups, 3);
    assert_eq!(m.commit_latency.count, 3);
    assert_eq!(m.wal_write_latency.count, 3);
    assert!(m.wal_bytes >= 3 * 4096, "{}", m.wal_bytes);
    assert_eq!(m.gets_from_memtable, 1);
    assert_eq!(m.gets_from_file, 1);
    assert_eq!(m.gets_absent, 50);
    // Absent keys pass no filter but about 1% of the time; "a001" passes
    // the older file's and is ruled out by the newer one's.
    assert!(m.bloom_skips >= 90, "{}", m.bloom_skips);
    assert!(m.iterators >= 1);
    assert_eq!(m.live_snapshots, 1);
    // The two asked for, and the one of what the replay recovered.
    assert_eq!(m.checkpoints, 3);
    assert_eq!(m.checkpoint_duration.count, 3);
    assert!(m.checkpoint_bytes > 0);
    assert_eq!(
        m.files_per_level.iter().map(|l| l.1).sum::<u64>(),
        3,
        "{:?}",
        m.files_per_level
    );
    assert_eq!(m.visible_seq, db.snapshot().seq());
    drop(snapshot);
    assert_eq!(db.metrics().live_snapshots, 0);

    db.compact().unwrap();
    let m = db.metrics();
    assert_eq!(m.merges, 1);
    assert_eq!(m.merge_duration.count, 1);
    assert!(m.merge_bytes_read > 0 && m.merge_bytes_written > 0);
    let level_one = m.files_per_level.iter().find(|l| l.0 == 1).unwrap();
    assert_eq!(level_one.1, 1, "a merge's output is at level 1");
    assert!(m.commit_latency.quantile_upper_bound(0.99).unwrap() > 0.0);
}

#[cfg(feature = "prometheus")]
#[path = "../examples/metrics_server.rs"]
mod metrics_server;

#[cfg(feature = "prometheus")]
#[test]
fn the_example_server_serves_prometheus_text_that_parses() {
    use std::sync::Arc;
    use std::sync::atomic::{AtomicBool, Ordering};

    let dir = tempfile::tempdir().unwrap();
    let db = Db::open(dir.path()).unwrap();
    let registry = Arc::new(metrics_server::registry_for(&db));
    let stop = Arc::new(AtomicBool::new(false));
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/metrics", listener.local_addr().unwrap());
    let server = metrics_server::serve(listener, registry, stop.clone());
    let writer = metrics_server::keep_writing(db.clone(), stop.clone());

    let scrape = || -> prometheus_parse::Scrape {
        let mut response = ureq::get(&url).call().unwrap();
        assert_eq!(response.status(), 200);
        let content_type = response
            .headers()
            .get("content-type")
            .unwrap()
            .to_str()
            .unwrap()
            .to_string();
        assert!(
            content_type.starts_with("text/plain; version=0.0.4"),
            "{content_type}"
        );
        let body = response.body_mut().read_to_string().unwrap();
        prometheus_parse::Scrape::parse(body.lines().map(|l| Ok(l.to_string()))).unwrap()
    };
    let value = |scrape: &prometheus_parse::Scrape, name: &str| -> f64 {
        let sample = scrape
            .samples
            .iter()
            .find(|s| s.metric == name)
            .unwrap_or_else(|| panic!("no {name}"));
        match sample.value {
            prometheus_parse::Value::Counter(v)
            | prometheus_parse::Value::Gauge(v)
            | prometheus_parse::Value::Untyped(v) => v,
            ref other => panic!("{name}: {other:?}"),
        }
    };
    // Wait for some commits, then scrape twice: the counters move.
    while db.metrics().commits < 20 {
        std::thread::sleep(std::time::Duration::from_millis(5));
    }
    let first = scrape();
    std::thread::sleep(std::time::Duration::from_millis(50));
    let second = scrape();
    assert!(value(&first, "mapstore_commits_total") >= 20.0);
    assert!(value(&second, "mapstore_commits_total") > value(&first, "mapstore_commits_total"));
    assert!(value(&second, "mapstore_wal_written_bytes_total") > 0.0);
    // The histogram: its count agrees with its +Inf bucket.
    let latency = second
        .samples
        .iter()
        .find(|s| s.metric == "mapstore_commit_latency_seconds")
        .unwrap();
    let prometheus_parse::Value::Histogram(buckets) = &latency.value else {
        panic!("{:?}", latency.value)
    };
    let infinite = buckets
        .iter()
        .find(|b| b.less_than == f64::INFINITY)
        .unwrap();
    assert!(infinite.count >= 20.0);
    assert!(
        buckets.windows(2).all(|w| w[0].count <= w[1].count),
        "cumulative"
    );
    // Labels: point reads by source.
    assert!(
        second.samples.iter().any(
            |s| s.metric == "mapstore_gets_total" && s.labels.get("source") == Some("memtable")
        )
    );
    // Another path is a 404.
    let other = ureq::get(url.replace("/metrics", "/other")).call();
    assert!(
        matches!(other, Err(ureq::Error::StatusCode(404))),
        "{other:?}"
    );

    stop.store(true, Ordering::Relaxed);
    writer.join().unwrap();
    // One more connection lets the server see the stop.
    let _ = ureq::get(&url).call();
    server.join().unwrap();
}
