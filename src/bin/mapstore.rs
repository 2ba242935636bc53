//! The `mapstore` command: inspect, read, write, dump, load and verify a
//! database directory (cargo feature `cli`;
//! `cargo install --path . --features cli`).
//!
//! Commands that only read open the database read-only, so they can run
//! beside other readers; a database that a writer holds is refused with
//! one line on stderr. Every error is one line on stderr and exit status
//! 1 (2 for bad arguments, from clap).

use std::io::{BufRead, BufWriter, Write};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::time::Duration;

use base64::Engine as _;
use base64::engine::general_purpose::STANDARD as BASE64;
use clap::{Parser, Subcommand, ValueEnum};
use indicatif::{ProgressBar, ProgressStyle};
use mapstore::{ChangeOp, Db, Keyspace, Slice, WriteBatch};

/// Inspect and work with a mapstore database directory.
#[derive(Parser)]
#[command(name = "mapstore", version, about)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

/// How keys and values are written on the command line and printed.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, ValueEnum)]
enum Encoding {
    /// UTF-8 text; on output, other bytes are escaped (`\xNN`).
    #[default]
    Text,
    /// Hexadecimal.
    Hex,
    /// Standard base64.
    Base64,
}

#[derive(clap::Args)]
struct Target {
    /// The database directory.
    dir: PathBuf,
    /// The keyspace (the default one if left out).
    #[arg(long, short)]
    keyspace: Option<String>,
    /// How keys and values are given and printed.
    #[arg(long, value_enum, default_value_t)]
    encoding: Encoding,
}

#[derive(Subcommand)]
enum Command {
    /// Files, keyspaces, entry counts, sequence numbers and WAL state.
    Stat {
        /// The database directory.
        dir: PathBuf,
        /// Print one JSON object instead of text.
        #[arg(long)]
        json: bool,
    },
    /// Print the value of a key.
    Get {
        #[command(flatten)]
        target: Target,
        key: String,
    },
    /// Set a key to a value (durable when the command returns); creates
    /// the database if there is none.
    Put {
        #[command(flatten)]
        target: Target,
        key: String,
        value: String,
    },
    /// Remove a key.
    Rm {
        #[command(flatten)]
        target: Target,
        key: String,
    },
    /// Print entries in key order, one `key<TAB>value` per line.
    Scan {
        #[command(flatten)]
        target: Target,
        /// Only keys that start with this.
        #[arg(long)]
        prefix: Option<String>,
        /// In descending key order.
        #[arg(long)]
        reverse: bool,
        /// At most this many entries.
        #[arg(long)]
        limit: Option<usize>,
    },
    /// Write every entry of every keyspace to stdout as JSON lines.
    Dump { dir: PathBuf },
    /// Read JSON lines (as `dump` writes them) from stdin into the database
    /// (created if there is none), in batches of 1,000.
    Load { dir: PathBuf },
    /// Check every checksum of every file; exit status 1 if anything is damaged.
    Verify { dir: PathBuf },
    /// Print a WAL segment's records: offset, seqs, commit time, operations.
    WalDump {
        /// The segment file (`{number}.wal`).
        file: PathBuf,
    },
    /// Print a snapshot file's keyspace, block count and entries.
    FileDump {
        /// The snapshot file (`{number}.snap`).
        file: PathBuf,
    },
    /// Write the memtable to a snapshot file.
    Checkpoint { dir: PathBuf },
    /// Checkpoint, then merge every snapshot file.
    Compact { dir: PathBuf },
    /// Rebuild a damaged or missing MANIFEST, keep the readable blocks of
    /// damaged snapshot files, cut the WAL at its first damage; prints what
    /// was lost (the database must not be open).
    Repair { dir: PathBuf },
    /// Write a point-in-time copy of DIR into DEST (hard links where the
    /// file system allows; a second backup to DEST brings only new files).
    Backup { dir: PathBuf, dest: PathBuf },
    /// Print the commits after a sequence number that the log still holds.
    Watch {
        dir: PathBuf,
        /// Start after this sequence number (the history start if left out).
        #[arg(long)]
        from: Option<u64>,
        /// Only keys that start with this.
        #[arg(long)]
        prefix: Option<String>,
    },
    /// Print what changed between two sequence numbers, in key order.
    Diff {
        #[command(flatten)]
        target: Target,
        from: u64,
        to: u64,
    },
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match run(cli.command) {
        Ok(code) => code,
        Err(message) => {
            eprintln!("mapstore: {message}");
            ExitCode::FAILURE
        }
    }
}

type Outcome = Result<ExitCode, String>;

fn run(command: Command) -> Outcome {
    match command {
        Command::Stat { dir, json } => stat(&dir, json),
        Command::Get { target, key } => {
            let db = read_only(&target.dir)?;
            let key = decode(&key, target.encoding)?;
            match keyspace_of(&db, &target)? {
                Some(ks) => ks.get(&key),
                None => db.get(&key),
            }
            .map_err(text)?
            .map_or_else(
                || {
                    eprintln!("mapstore: no such key");
                    Ok(ExitCode::FAILURE)
                },
                |value| {
                    println!("{}", encode(&value, target.encoding));
                    Ok(ExitCode::SUCCESS)
                },
            )
        }
        Command::Put { target, key, value } => {
            let db = writable(&target.dir, true)?;
            let (key, value) = (
                decode(&key, target.encoding)?,
                decode(&value, target.encoding)?,
            );
            let seq = match keyspace_of(&db, &target)? {
                Some(ks) => ks.insert(&key, &value),
                None => db.insert(&key, &value),
            }
            .map_err(text)?;
            println!("{seq}");
            db.close().map_err(text)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Rm { target, key } => {
            let db = writable(&target.dir, false)?;
            let key = decode(&key, target.encoding)?;
            let seq = match keyspace_of(&db, &target)? {
                Some(ks) => ks.remove(&key),
                None => db.remove(&key),
            }
            .map_err(text)?;
            println!("{seq}");
            db.close().map_err(text)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Scan {
            target,
            prefix,
            reverse,
            limit,
        } => scan(&target, prefix, reverse, limit),
        Command::Dump { dir } => dump(&dir),
        Command::Load { dir } => load(&dir),
        Command::Verify { dir } => verify(&dir),
        Command::WalDump { file } => wal_dump(&file),
        Command::FileDump { file } => file_dump(&file),
        Command::Checkpoint { dir } => {
            let db = writable(&dir, false)?;
            db.checkpoint().map_err(text)?;
            db.close().map_err(text)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Repair { dir } => {
            let spinner = spinner("repairing");
            let report = Db::repair(&dir).map_err(text)?;
            spinner.finish_and_clear();
            if report.manifest_rebuilt {
                println!("MANIFEST rebuilt from the files present");
            }
            println!(
                "{} snapshot files checked, {} rewritten ({} versions kept from them); last seq {}",
                report.snapshot_files_checked,
                report.snapshot_files_rewritten,
                report.versions_salvaged,
                report.last_seq
            );
            for (id, name) in &report.keyspaces_renamed {
                println!("keyspace {id} had lost its name; it is now {name:?}");
            }
            for lost in &report.lost {
                println!("lost: {}", describe_loss(lost));
            }
            if report.lost_nothing() {
                println!("nothing was lost");
            }
            Ok(ExitCode::SUCCESS)
        }
        Command::Backup { dir, dest } => {
            let db = writable(&dir, false)?;
            let spinner = spinner("backing up");
            let info = db.backup_to(&dest).map_err(text)?;
            spinner.finish_and_clear();
            db.close().map_err(text)?;
            println!(
                "backup of seq {} in {}: {} files, {} bytes ({} kept, {} linked, {} copied: {} bytes)",
                info.seq,
                dest.display(),
                info.files,
                info.bytes,
                info.files_kept,
                info.files_linked,
                info.files_copied,
                info.bytes_copied
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Compact { dir } => {
            let db = writable(&dir, false)?;
            let spinner = spinner("compacting");
            db.compact().map_err(text)?;
            spinner.finish_and_clear();
            db.close().map_err(text)?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Watch { dir, from, prefix } => watch(&dir, from, prefix),
        Command::Diff { target, from, to } => {
            let db = read_only(&target.dir)?;
            let (older, newer) = (
                db.snapshot_at(from).map_err(text)?,
                db.snapshot_at(to).map_err(text)?,
            );
            let changes = match keyspace_of(&db, &target)? {
                Some(ks) => older.diff_in(&ks, &newer),
                None => older.diff(&newer),
            };
            let mut out = BufWriter::new(std::io::stdout().lock());
            for change in changes {
                let change = change.map_err(text)?;
                let show =
                    |v: Option<Slice>| v.map_or("-".to_string(), |v| encode(&v, target.encoding));
                writeln!(
                    out,
                    "{}\t{}\t{}",
                    encode(&change.key, target.encoding),
                    show(change.old),
                    show(change.new)
                )
                .map_err(text)?;
            }
            Ok(ExitCode::SUCCESS)
        }
    }
}

fn text(error: impl std::fmt::Display) -> String {
    error.to_string()
}

/// One line about data a repair could not keep.
fn describe_loss(lost: &mapstore::Lost) -> String {
    let key = |key: &Option<Vec<u8>>, open: &str| {
        key.as_deref()
            .map_or(open.to_string(), |k| encode(k, Encoding::Text))
    };
    match lost {
        mapstore::Lost::Versions {
            path,
            keyspace,
            from_key,
            to_key,
            seqs,
            reason,
        } => format!(
            "versions of keyspace {keyspace}, keys {} to {}, seqs {}..={}, in {} ({reason})",
            key(from_key, "(first)"),
            key(to_key, "(last)"),
            seqs.start(),
            seqs.end(),
            path.display()
        ),
        mapstore::Lost::File { path, reason } => {
            format!("all of {} ({reason})", path.display())
        }
        mapstore::Lost::Commits {
            segment,
            after_seq,
            moved_to,
        } => format!(
            "commits after seq {after_seq}: the log was damaged in {}; the rest is kept in {}",
            segment.display(),
            moved_to
                .iter()
                .map(|p| p.display().to_string())
                .collect::<Vec<_>>()
                .join(", ")
        ),
        other => format!("{other:?}"),
    }
}

fn read_only(dir: &Path) -> Result<Db, String> {
    Db::open_read_only(dir).map_err(text)
}

/// Opens `dir` for writing; with `create`, a database is made if there
/// is none (`put`, `load`), else a typo in a path must not make one.
fn writable(dir: &Path, create: bool) -> Result<Db, String> {
    if !create && !dir.join("MANIFEST").exists() {
        return Err(format!("no database in {}", dir.display()));
    }
    Db::open(dir).map_err(text)
}

/// The keyspace `target` names, if any (it must exist).
fn keyspace_of(db: &Db, target: &Target) -> Result<Option<Keyspace>, String> {
    let Some(name) = &target.keyspace else {
        return Ok(None);
    };
    if !db.keyspace_names().map_err(text)?.contains(name) {
        return Err(format!("no keyspace is named {name:?}"));
    }
    db.keyspace(name).map(Some).map_err(text)
}

fn decode(given: &str, encoding: Encoding) -> Result<Vec<u8>, String> {
    match encoding {
        Encoding::Text => Ok(given.as_bytes().to_vec()),
        Encoding::Hex => {
            if given.len() % 2 != 0 {
                return Err(format!("{given:?} is not hexadecimal (odd length)"));
            }
            (0..given.len())
                .step_by(2)
                .map(|i| {
                    u8::from_str_radix(&given[i..i + 2], 16)
                        .map_err(|_| format!("{given:?} is not hexadecimal"))
                })
                .collect()
        }
        Encoding::Base64 => BASE64
            .decode(given)
            .map_err(|e| format!("{given:?} is not base64: {e}")),
    }
}

fn encode(bytes: &[u8], encoding: Encoding) -> String {
    match encoding {
        Encoding::Text => match std::str::from_utf8(bytes) {
            Ok(text) if !text.chars().any(|c| c.is_control()) => text.to_string(),
            _ => bytes.escape_ascii().to_string(),
        },
        Encoding::Hex => bytes.iter().map(|b| format!("{b:02x}")).collect(),
        Encoding::Base64 => BASE64.encode(bytes),
    }
}

fn spinner(message: &'static str) -> ProgressBar {
    let bar = ProgressBar::new_spinner().with_message(message);
    bar.enable_steady_tick(Duration::from_millis(100));
    bar
}

fn stat(dir: &Path, json: bool) -> Outcome {
    let db = read_only(dir)?;
    let snapshot = db.snapshot();
    // Entries and their key and value bytes: the live data.
    let measure = |iter: mapstore::Iter| -> Result<(usize, u64), String> {
        let mut count = 0;
        let mut bytes = 0;
        for entry in iter {
            let (key, value) = entry.map_err(text)?;
            count += 1;
            bytes += (key.len() + value.len()) as u64;
        }
        Ok((count, bytes))
    };
    let mut keyspaces = vec![(None, measure(snapshot.iter())?)];
    for name in db.keyspace_names().map_err(text)? {
        let ks = db.keyspace(&name).map_err(text)?;
        keyspaces.push((Some(name), measure(snapshot.iter_in(&ks))?));
    }
    let stats = db.checkpoint_stats();
    let metrics = db.metrics();
    let (mut wal_segments, mut wal_bytes) = (0u64, 0u64);
    for entry in std::fs::read_dir(dir).map_err(text)? {
        let entry = entry.map_err(text)?;
        if entry.path().extension().is_some_and(|ext| ext == "wal") {
            wal_segments += 1;
            wal_bytes += entry.metadata().map_err(text)?.len();
        }
    }
    let report = db.recovery_report();
    let live: usize = keyspaces.iter().map(|(_, (count, _))| count).sum();
    let live_bytes: u64 = keyspaces.iter().map(|(_, (_, bytes))| bytes).sum();
    let disk_bytes = stats.snapshot_file_bytes + wal_bytes;
    if json {
        let keyspaces: Vec<_> = keyspaces
            .iter()
            .map(|(name, (count, bytes))| {
                serde_json::json!({"keyspace": name, "entries": count, "live_bytes": bytes})
            })
            .collect();
        let levels: Vec<_> = metrics
            .files_per_level
            .iter()
            .map(|(level, files, bytes)| {
                serde_json::json!({"level": level, "files": files, "bytes": bytes})
            })
            .collect();
        let out = serde_json::json!({
            "path": dir.display().to_string(),
            "seq": snapshot.seq(),
            "history_start": db.history_start().map_err(text)?,
            "entries": live,
            "keyspaces": keyspaces,
            "live_bytes": live_bytes,
            "disk_bytes": disk_bytes,
            "snapshot_files": stats.snapshot_files,
            "snapshot_file_bytes": stats.snapshot_file_bytes,
            "levels": levels,
            "partitions": metrics.partitions,
            "most_files_in_a_partition": metrics.most_files_in_a_partition,
            "wal_segments": wal_segments,
            "wal_bytes": wal_bytes,
            "wal_batches_to_replay": report.batches_replayed,
            "torn_tail": report.torn_tail.as_ref().map(|(path, offset, _)| {
                serde_json::json!({"path": path.display().to_string(), "offset": offset})
            }),
        });
        println!("{out}");
    } else {
        println!("database        {}", dir.display());
        println!("sequence number {}", snapshot.seq());
        println!("history start   {}", db.history_start().map_err(text)?);
        println!("entries         {live} ({live_bytes} bytes of keys and values)");
        for (name, (count, bytes)) in &keyspaces {
            println!(
                "  {:<14}{count} ({bytes} bytes)",
                name.as_deref().unwrap_or("(default)")
            );
        }
        println!(
            "snapshot files  {} ({} bytes)",
            stats.snapshot_files, stats.snapshot_file_bytes
        );
        for (level, files, bytes) in &metrics.files_per_level {
            let what = if *level == 0 { "checkpoints" } else { "merged" };
            println!("  level {level} ({what}) {files} files, {bytes} bytes");
        }
        println!(
            "partitions      {} (at most {} files in one)",
            metrics.partitions, metrics.most_files_in_a_partition
        );
        println!("WAL segments    {wal_segments} ({wal_bytes} bytes)");
        if live_bytes > 0 {
            println!(
                "space           {disk_bytes} bytes on disk, {:.2}x the live data",
                disk_bytes as f64 / live_bytes as f64
            );
        }
        println!(
            "WAL to replay   {} commits, {} bytes",
            report.batches_replayed, report.wal_bytes_replayed
        );
        if let Some((path, offset, reason)) = &report.torn_tail {
            println!(
                "torn tail       {} at byte {offset}: {reason}",
                path.display()
            );
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn scan(target: &Target, prefix: Option<String>, reverse: bool, limit: Option<usize>) -> Outcome {
    let db = read_only(&target.dir)?;
    let prefix = prefix
        .map(|p| decode(&p, target.encoding))
        .transpose()?
        .unwrap_or_default();
    let snapshot = db.snapshot();
    let entries = match keyspace_of(&db, target)? {
        Some(ks) => snapshot.prefix_in(&ks, &prefix),
        None => snapshot.prefix(&prefix),
    };
    let entries: Box<dyn Iterator<Item = _>> = if reverse {
        Box::new(entries.rev())
    } else {
        Box::new(entries)
    };
    let mut out = BufWriter::new(std::io::stdout().lock());
    for entry in entries.take(limit.unwrap_or(usize::MAX)) {
        let (key, value) = entry.map_err(text)?;
        writeln!(
            out,
            "{}\t{}",
            encode(&key, target.encoding),
            encode(&value, target.encoding)
        )
        .map_err(text)?;
    }
    Ok(ExitCode::SUCCESS)
}

fn dump(dir: &Path) -> Outcome {
    let db = read_only(dir)?;
    let snapshot = db.snapshot();
    let progress = ProgressBar::new_spinner().with_style(
        ProgressStyle::with_template("{spinner} {pos} entries ({per_sec})").map_err(text)?,
    );
    let mut out = BufWriter::new(std::io::stdout().lock());
    let mut write = |keyspace: Option<&str>, key: &[u8], value: &[u8]| {
        let line = serde_json::json!({
            "keyspace": keyspace,
            "key": BASE64.encode(key),
            "value": BASE64.encode(value),
        });
        progress.inc(1);
        writeln!(out, "{line}").map_err(text)
    };
    for entry in snapshot.iter() {
        let (key, value) = entry.map_err(text)?;
        write(None, &key, &value)?;
    }
    for name in db.keyspace_names().map_err(text)? {
        let ks = db.keyspace(&name).map_err(text)?;
        for entry in snapshot.iter_in(&ks) {
            let (key, value) = entry.map_err(text)?;
            write(Some(&name), &key, &value)?;
        }
    }
    progress.finish_and_clear();
    Ok(ExitCode::SUCCESS)
}

fn load(dir: &Path) -> Outcome {
    let db = writable(dir, true)?;
    let stdin = std::io::stdin();
    // With a file on stdin its size gives the bar a length, so a rate and
    // an ETA; from a pipe, a count and a rate.
    let total = std::fs::metadata("/dev/stdin")
        .map(|m| m.len())
        .unwrap_or(0);
    let progress = if total > 0 {
        ProgressBar::new(total).with_style(
            ProgressStyle::with_template(
                "{bar:40} {bytes}/{total_bytes} ({bytes_per_sec}, {eta} left)",
            )
            .map_err(text)?,
        )
    } else {
        ProgressBar::new_spinner().with_style(
            ProgressStyle::with_template("{spinner} {bytes} ({bytes_per_sec})").map_err(text)?,
        )
    };
    let mut batch = WriteBatch::new();
    let mut keyspaces: std::collections::HashMap<String, Keyspace> = Default::default();
    let mut loaded = 0u64;
    for (number, line) in stdin.lock().lines().enumerate() {
        let line = line.map_err(text)?;
        progress.inc(line.len() as u64 + 1);
        if line.trim().is_empty() {
            continue;
        }
        let bad = |why: &str| format!("line {}: {why}", number + 1);
        let entry: serde_json::Value =
            serde_json::from_str(&line).map_err(|e| bad(&e.to_string()))?;
        let field = |name: &str| -> Result<Vec<u8>, String> {
            let encoded = entry[name]
                .as_str()
                .ok_or_else(|| bad(&format!("no \"{name}\" string")))?;
            BASE64.decode(encoded).map_err(|e| bad(&e.to_string()))
        };
        let (key, value) = (field("key")?, field("value")?);
        match entry["keyspace"].as_str() {
            None => batch.insert(&key, &value),
            Some(name) => {
                if !keyspaces.contains_key(name) {
                    keyspaces.insert(name.to_string(), db.keyspace(name).map_err(text)?);
                }
                batch.insert_in(&keyspaces[name], &key, &value);
            }
        }
        loaded += 1;
        if batch.len() == 1_000 {
            db.write(std::mem::take(&mut batch)).map_err(text)?;
        }
    }
    db.write(batch).map_err(text)?;
    progress.finish_and_clear();
    drop(keyspaces);
    db.close().map_err(text)?;
    eprintln!("loaded {loaded} entries");
    Ok(ExitCode::SUCCESS)
}

fn verify(dir: &Path) -> Outcome {
    let db = read_only(dir)?;
    let spinner = spinner("verifying");
    let report = db.verify().map_err(text)?;
    spinner.finish_and_clear();
    println!(
        "{} snapshot files, {} blocks; {} WAL segments, {} records",
        report.snapshot_files, report.blocks, report.wal_segments, report.wal_records
    );
    for damage in &report.damage {
        println!(
            "damaged: {} at byte {}: {}",
            damage.path.display(),
            damage.offset,
            damage.reason
        );
    }
    Ok(if report.is_ok() {
        println!("no damage found");
        ExitCode::SUCCESS
    } else {
        ExitCode::FAILURE
    })
}

fn watch(dir: &Path, from: Option<u64>, prefix: Option<String>) -> Outcome {
    let db = read_only(dir)?;
    let from = match from {
        Some(from) => from,
        None => db.history_start().map_err(text)?,
    };
    let newest = db.snapshot().seq();
    let mut feed = db.changes_since(from).map_err(text)?;
    if let Some(prefix) = prefix {
        feed = feed.prefix(prefix);
    }
    let mut out = BufWriter::new(std::io::stdout().lock());
    while feed.position() < newest {
        let Some(commit) = feed.next_timeout(Duration::ZERO).map_err(text)? else {
            break;
        };
        for op in &commit.ops {
            let keyspace = |ks: &Option<std::sync::Arc<str>>| {
                ks.as_deref()
                    .map_or(String::new(), |name| format!("{name}/"))
            };
            let line = match op {
                ChangeOp::Put {
                    keyspace: ks,
                    key,
                    value,
                } => format!(
                    "put {}{} = {}",
                    keyspace(ks),
                    encode(key, Encoding::Text),
                    encode(value, Encoding::Text)
                ),
                ChangeOp::Remove { keyspace: ks, key } => {
                    format!("remove {}{}", keyspace(ks), encode(key, Encoding::Text))
                }
                ChangeOp::Expire { keyspace: ks, key } => {
                    format!("expire {}{}", keyspace(ks), encode(key, Encoding::Text))
                }
                ChangeOp::KeyspaceCreated { name } => format!("create keyspace {name}"),
                ChangeOp::KeyspaceDropped { name } => format!("drop keyspace {name}"),
                _ => "(an operation this build does not name)".to_string(),
            };
            writeln!(out, "{}\t{line}", commit.seq).map_err(text)?;
        }
    }
    Ok(ExitCode::SUCCESS)
}

fn wal_dump(file: &Path) -> Outcome {
    let segment = mapstore::inspect::wal_segment(file).map_err(text)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    for record in &segment.records {
        let micros = record
            .time
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |since| since.as_micros());
        writeln!(
            out,
            "record at byte {}: seq {}..={}, time {} us",
            record.offset,
            record.first_seq,
            record.first_seq + record.ops.len() as u64 - 1,
            micros
        )
        .map_err(text)?;
        for op in &record.ops {
            let ttl = if op.ttl_micros == 0 {
                String::new()
            } else {
                format!(", ttl {} us", op.ttl_micros)
            };
            writeln!(
                out,
                "  {} keyspace {} key {} ({} value bytes{ttl})",
                op.kind,
                op.keyspace,
                encode(&op.key, Encoding::Text),
                op.value_len
            )
            .map_err(text)?;
        }
    }
    writeln!(out, "end: {}", segment.end).map_err(text)?;
    Ok(ExitCode::SUCCESS)
}

fn file_dump(file: &Path) -> Outcome {
    let dump = mapstore::inspect::snapshot_file(file).map_err(text)?;
    let mut out = BufWriter::new(std::io::stdout().lock());
    writeln!(
        out,
        "keyspace {}, {} blocks, {} entries",
        dump.keyspace,
        dump.blocks,
        dump.entries.len()
    )
    .map_err(text)?;
    for entry in &dump.entries {
        let value = entry
            .value
            .as_ref()
            .map_or("(removed)".to_string(), |v| encode(v, Encoding::Text));
        let expiry = if entry.expires_micros == 0 {
            String::new()
        } else {
            format!("\texpires at {} us", entry.expires_micros)
        };
        writeln!(
            out,
            "{}\t{}\t{value}{expiry}",
            encode(&entry.key, Encoding::Text),
            entry.seq
        )
        .map_err(text)?;
    }
    Ok(ExitCode::SUCCESS)
}
