//! The `tracing` spans (feature `tracing`): an application's subscriber
//! sees recovery, checkpoints, merges, write stalls, backups and repairs,
//! on whichever thread runs them.
#![cfg(feature = "tracing")]

use std::sync::{Arc, Mutex};

use tracing::span::{Attributes, Id};
use tracing_subscriber::layer::{Context, Layer, SubscriberExt};

/// Records the name of every span created.
struct SpanNames(Arc<Mutex<Vec<String>>>);

impl<S: tracing::Subscriber> Layer<S> for SpanNames {
    fn on_new_span(&self, attrs: &Attributes<'_>, _id: &Id, _ctx: Context<'_, S>) {
        self.0
            .lock()
            .unwrap()
            .push(attrs.metadata().name().to_string());
    }
}

#[test]
fn spans_reach_the_applications_subscriber() {
    let names = Arc::new(Mutex::new(Vec::new()));
    let subscriber = tracing_subscriber::registry().with(SpanNames(names.clone()));
    // Global: checkpoints and merges run on the background thread.
    tracing::subscriber::set_global_default(subscriber).unwrap();

    let dir = tempfile::tempdir().unwrap();
    let options = || {
        mapstore::Options::default()
            .memtable_size(16 * 1024)
            .max_frozen_memtables(1)
            .checkpoint_on_close(false)
            .durability(mapstore::Durability::Buffered)
    };
    {
        let db = mapstore::Db::open_with(dir.path().join("db"), options()).unwrap();
        // Enough writes to freeze memtables faster than one checkpoint
        // thread writes them: writers stall.
        // (Until a writer has stalled at least once, within bounds.)
        for round in 0..1000u32 {
            if round >= 40 && db.metrics().write_stalls > 0 {
                break;
            }
            let mut batch = mapstore::WriteBatch::new();
            for i in 0..500u32 {
                batch.insert(format!("key{round:03}-{i:04}"), vec![7u8; 200]);
            }
            db.write(batch).unwrap();
        }
        db.compact().unwrap();
        db.backup_to(dir.path().join("backup")).unwrap();
        db.insert("in the log", "x").unwrap();
        db.close().unwrap();
    }
    mapstore::Db::open_with(dir.path().join("db"), options()).unwrap();
    mapstore::Db::repair(dir.path().join("backup")).unwrap();

    let mut names = names.lock().unwrap().clone();
    names.sort();
    names.dedup();
    for expected in [
        "mapstore::recovery",
        "mapstore::checkpoint",
        "mapstore::merge",
        "mapstore::write_stall",
        "mapstore::backup",
        "mapstore::repair",
    ] {
        assert!(
            names.iter().any(|n| n == expected),
            "no {expected} span in {names:?}"
        );
    }
}
