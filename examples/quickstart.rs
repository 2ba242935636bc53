//! Opens a database directory, writes, closes, reopens and reads back.
//!
//! `cargo run --release --example quickstart [DIR]` (default: a new temporary directory).

use mapstore::{Db, WriteBatch};

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let temp = tempfile::tempdir()?;
    let path = match std::env::args().nth(1) {
        Some(dir) => std::path::PathBuf::from(dir),
        None => temp.path().join("quickstart-db"),
    };

    let db = Db::open(&path)?;
    println!(
        "opened {} (created: {})",
        path.display(),
        db.recovery_report().created
    );
    db.insert("fruit/apple", "red")?;
    db.insert("fruit/banana", "yellow")?;
    let mut batch = WriteBatch::new();
    batch.insert("fruit/cherry", "dark red");
    batch.insert("veg/kale", "green");
    batch.remove("fruit/apple");
    let seq = db.write(batch)?;
    println!(
        "wrote 2 inserts and an atomic batch of 3 operations (last sequence number {seq}), each synced to disk"
    );
    db.close()?;
    println!("closed");

    let db = Db::open(&path)?;
    let report = db.recovery_report();
    println!(
        "reopened: replayed {} batches from {} WAL segment(s), last sequence number {}",
        report.batches_replayed, report.segments_replayed, report.last_seq
    );
    println!("get fruit/apple  -> {:?}", db.get("fruit/apple")?);
    println!("get fruit/banana -> {:?}", db.get("fruit/banana")?);
    println!("prefix scan \"fruit/\":");
    for entry in db.prefix("fruit/") {
        let (key, value) = entry?;
        println!("  {key:?} = {value:?}");
    }
    println!("all keys in reverse:");
    for entry in db.iter().rev() {
        let (key, _) = entry?;
        println!("  {key:?}");
    }
    assert_eq!(db.get("fruit/banana")?.as_deref(), Some(&b"yellow"[..]));
    assert_eq!(db.get("fruit/apple")?, None);
    db.close()?;
    Ok(())
}
