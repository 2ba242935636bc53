//! The metrics of [`Db::metrics`] for Prometheus (feature `prometheus`):
//! a collector for a `prometheus-client` [`Registry`], read at each scrape.
//!
//! ```
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! # let dir = tempfile::tempdir().unwrap();
//! use prometheus_client::registry::Registry;
//!
//! let db = mapstore::Db::open(dir.path())?;
//! let mut registry = Registry::default();
//! registry.register_collector(Box::new(mapstore::prometheus::MetricsCollector::new(db.clone())));
//! db.insert("k", "v")?;
//!
//! let mut text = String::new();
//! prometheus_client::encoding::text::encode(&mut text, &registry)?;
//! assert!(text.contains("mapstore_commits_total 1"));
//! # Ok(()) }
//! ```
//!
//! Names follow the Prometheus conventions: a `mapstore_` prefix, base
//! units (`_seconds`, `_bytes`), `_total` on counters. Point reads are one
//! counter with a `source` label; files and bytes one gauge each with a
//! `level` label.
//!
//! [`Registry`]: prometheus_client::registry::Registry

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeMetric, NoLabelSet};
use prometheus_client::metrics::MetricType;
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::ConstGauge;
use prometheus_client::registry::Unit;

use crate::Db;
use crate::metrics::Histogram;

/// Reports a database's [`Metrics`](crate::Metrics) at each scrape of the
/// registry it is registered on. Holds a handle to the database (cheap to
/// clone); after [`Db::close`] it reports the last values.
#[derive(Debug)]
pub struct MetricsCollector {
    db: Db,
}

impl MetricsCollector {
    /// A collector of `db`'s metrics.
    pub fn new(db: Db) -> MetricsCollector {
        MetricsCollector { db }
    }
}

type Out = Result<(), std::fmt::Error>;

fn counter<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> Out
where
    ConstCounter<N>: EncodeMetric,
{
    let metric = ConstCounter::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

fn gauge<N>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    unit: Option<&Unit>,
    value: N,
) -> Out
where
    ConstGauge<N>: EncodeMetric,
{
    let metric = ConstGauge::new(value);
    metric.encode(encoder.encode_descriptor(name, help, unit, metric.metric_type())?)
}

fn histogram(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    histogram: &Histogram,
) -> Out {
    let mut metric =
        encoder.encode_descriptor(name, help, Some(&Unit::Seconds), MetricType::Histogram)?;
    // The encoder adds the buckets up itself: it takes each bucket's own
    // count.
    let mut below = 0;
    let buckets: Vec<(f64, u64)> = histogram
        .buckets
        .iter()
        .map(|&(bound, cumulative)| {
            let own = cumulative - below;
            below = cumulative;
            (bound, own)
        })
        .collect();
    metric.encode_histogram::<NoLabelSet>(histogram.sum_seconds, histogram.count, &buckets, None)
}

fn to_i64(value: u64) -> i64 {
    i64::try_from(value).unwrap_or(i64::MAX)
}

impl Collector for MetricsCollector {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let m = self.db.metrics();
        let e = &mut encoder;
        let bytes = Some(&Unit::Bytes);
        let seconds = Some(&Unit::Seconds);
        counter(e, "mapstore_commits", "Batches committed.", None, m.commits)?;
        counter(
            e,
            "mapstore_commit_groups",
            "Groups written to the WAL, one write each for many commits.",
            None,
            m.commit_groups,
        )?;
        counter(
            e,
            "mapstore_wal_syncs",
            "fsyncs of the WAL.",
            None,
            m.wal_syncs,
        )?;
        counter(
            e,
            "mapstore_wal_written",
            "Bytes written to the WAL, page padding included.",
            bytes,
            m.wal_bytes,
        )?;
        histogram(
            e,
            "mapstore_commit_latency",
            "Time from a commit's call to its return.",
            &m.commit_latency,
        )?;
        histogram(
            e,
            "mapstore_wal_write_latency",
            "Time to write a group to the WAL, its fsync included when synced.",
            &m.wal_write_latency,
        )?;
        counter(
            e,
            "mapstore_write_stalls",
            "Times writers waited for a checkpoint.",
            None,
            m.write_stalls,
        )?;
        counter(
            e,
            "mapstore_write_stall",
            "Time writers spent waiting for a checkpoint.",
            seconds,
            m.write_stall_seconds,
        )?;
        gauge(
            e,
            "mapstore_memtable",
            "Bytes in the active memtable.",
            bytes,
            to_i64(m.memtable_bytes),
        )?;
        gauge(
            e,
            "mapstore_frozen_memtables",
            "Memtables waiting for a checkpoint.",
            None,
            to_i64(m.frozen_memtables),
        )?;
        counter(
            e,
            "mapstore_checkpoints",
            "Checkpoints done.",
            None,
            m.checkpoints,
        )?;
        histogram(
            e,
            "mapstore_checkpoint_duration",
            "Duration of checkpoints.",
            &m.checkpoint_duration,
        )?;
        counter(
            e,
            "mapstore_checkpoint_written",
            "Bytes of snapshot files checkpoints wrote.",
            bytes,
            m.checkpoint_bytes,
        )?;
        counter(
            e,
            "mapstore_merges",
            "Merges of snapshot files done.",
            None,
            m.merges,
        )?;
        histogram(
            e,
            "mapstore_merge_duration",
            "Duration of merges.",
            &m.merge_duration,
        )?;
        counter(
            e,
            "mapstore_merge_read",
            "Bytes of snapshot files merges read.",
            bytes,
            m.merge_bytes_read,
        )?;
        counter(
            e,
            "mapstore_merge_written",
            "Bytes of snapshot files merges wrote.",
            bytes,
            m.merge_bytes_written,
        )?;
        counter(
            e,
            "mapstore_versions_dropped",
            "Versions checkpoints and merges dropped.",
            None,
            m.versions_dropped,
        )?;
        {
            let mut files = e.encode_descriptor(
                "mapstore_snapshot_files",
                "Snapshot files per level.",
                None,
                MetricType::Gauge,
            )?;
            for &(level, count, _) in &m.files_per_level {
                let labels = [("level", level.to_string())];
                ConstGauge::new(to_i64(count)).encode(files.encode_family(&labels)?)?;
            }
        }
        {
            let mut sizes = e.encode_descriptor(
                "mapstore_snapshot_files",
                "Bytes of snapshot files per level.",
                bytes,
                MetricType::Gauge,
            )?;
            for &(level, _, size) in &m.files_per_level {
                let labels = [("level", level.to_string())];
                ConstGauge::new(to_i64(size)).encode(sizes.encode_family(&labels)?)?;
            }
        }
        gauge(
            e,
            "mapstore_partitions",
            "Partitions of the keyspaces' key ranges.",
            None,
            to_i64(m.partitions),
        )?;
        gauge(
            e,
            "mapstore_partition_files_max",
            "The most snapshot files one partition holds.",
            None,
            to_i64(m.most_files_in_a_partition),
        )?;
        gauge(
            e,
            "mapstore_wal_segments",
            "Bytes of WAL segments on disk.",
            bytes,
            to_i64(m.wal_bytes_on_disk),
        )?;
        {
            let mut gets = e.encode_descriptor(
                "mapstore_gets",
                "Point reads, by where the answer was found.",
                None,
                MetricType::Counter,
            )?;
            for (source, value) in [
                ("memtable", m.gets_from_memtable),
                ("replayed_log", m.gets_from_replayed_log),
                ("file", m.gets_from_file),
                ("absent", m.gets_absent),
            ] {
                let labels = [("source", source)];
                ConstCounter::new(value).encode(gets.encode_family(&labels)?)?;
            }
        }
        counter(
            e,
            "mapstore_bloom_skips",
            "Snapshot files a point read skipped by their bloom filter.",
            None,
            m.bloom_skips,
        )?;
        counter(
            e,
            "mapstore_iterators",
            "Iterators created.",
            None,
            m.iterators,
        )?;
        gauge(
            e,
            "mapstore_live_snapshots",
            "Snapshots the application holds.",
            None,
            to_i64(m.live_snapshots),
        )?;
        gauge(
            e,
            "mapstore_visible_seq",
            "The newest sequence number readers see.",
            None,
            to_i64(m.visible_seq),
        )?;
        gauge(
            e,
            "mapstore_open_duration",
            "How long opening the database took, recovery included.",
            seconds,
            m.open_seconds,
        )?;
        Ok(())
    }
}
