//! The `mapstore` command, driven as a real process (feature `cli`):
//! each command, bad arguments, a locked and a damaged database.
#![cfg(feature = "cli")]

use std::io::Write;
use std::path::Path;
use std::process::{Command, Output, Stdio};

fn mapstore(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_mapstore"))
        .args(args)
        .output()
        .unwrap()
}

fn stdout(output: &Output) -> String {
    String::from_utf8(output.stdout.clone()).unwrap()
}

fn stderr(output: &Output) -> String {
    String::from_utf8(output.stderr.clone()).unwrap()
}

fn path(dir: &Path) -> &str {
    dir.to_str().unwrap()
}

#[test]
fn put_get_rm_scan_and_encodings() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("db");
    let d = path(&dir);
    assert!(mapstore(&["put", d, "user/1", "ada"]).status.success());
    assert!(mapstore(&["put", d, "user/2", "grace"]).status.success());
    assert!(
        mapstore(&["put", d, "--encoding", "hex", "00ff", "0a0b"])
            .status
            .success()
    );
    let got = mapstore(&["get", d, "user/1"]);
    assert!(got.status.success());
    assert_eq!(stdout(&got), "ada\n");
    // Bytes that are not printable text come out escaped, or as asked.
    let raw = mapstore(&["scan", d, "--limit", "1"]);
    assert_eq!(stdout(&raw), "\\x00\\xff\t\\n\\x0b\n");
    let hex = mapstore(&["get", d, "--encoding", "hex", "00ff"]);
    assert_eq!(stdout(&hex), "0a0b\n");
    let b64 = mapstore(&["get", d, "--encoding", "base64", "AP8="]);
    assert_eq!(stdout(&b64), "Cgs=\n");
    let scan = mapstore(&["scan", d, "--prefix", "user/", "--reverse"]);
    assert_eq!(stdout(&scan), "user/2\tgrace\nuser/1\tada\n");
    assert!(mapstore(&["rm", d, "user/1"]).status.success());
    let gone = mapstore(&["get", d, "user/1"]);
    assert_eq!(gone.status.code(), Some(1));
    assert_eq!(stderr(&gone), "mapstore: no such key\n");
    // Keyspaces: one that does not exist is an error, not a creation.
    let missing = mapstore(&["get", d, "--keyspace", "nope", "k"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(
        stderr(&missing).contains("no keyspace"),
        "{}",
        stderr(&missing)
    );
    let bad_hex = mapstore(&["get", d, "--encoding", "hex", "zz"]);
    assert_eq!(bad_hex.status.code(), Some(1));
    assert_eq!(stderr(&bad_hex).lines().count(), 1);
}

#[test]
fn dump_and_load_round_trip_every_keyspace() {
    let temp = tempfile::tempdir().unwrap();
    let source = temp.path().join("source");
    {
        let db = mapstore::Db::open(&source).unwrap();
        db.insert([0u8, 1, 2], [255u8; 3]).unwrap();
        db.insert("plain", "").unwrap();
        let users = db.keyspace("users").unwrap();
        for i in 0..2500 {
            users.insert(format!("u{i:05}"), format!("{i}")).unwrap();
        }
        drop(users);
        db.close().unwrap();
    }
    let dump = mapstore(&["dump", path(&source)]);
    assert!(dump.status.success(), "{}", stderr(&dump));
    assert_eq!(stdout(&dump).lines().count(), 2502);
    let target = temp.path().join("target");
    let mut load = Command::new(env!("CARGO_BIN_EXE_mapstore"))
        .args(["load", path(&target)])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    load.stdin.take().unwrap().write_all(&dump.stdout).unwrap();
    let loaded = load.wait_with_output().unwrap();
    assert!(loaded.status.success(), "{}", stderr(&loaded));
    assert_eq!(stdout(&mapstore(&["dump", path(&target)])), stdout(&dump));
    let db = mapstore::Db::open_read_only(&target).unwrap();
    assert_eq!(db.get([0u8, 1, 2]).unwrap().unwrap(), [255u8; 3][..]);
    assert_eq!(db.keyspace("users").unwrap().iter().count(), 2500);
}

#[test]
fn stat_watch_diff_checkpoint_and_compact() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("db");
    let (first, second);
    {
        let db = mapstore::Db::open_with(
            &dir,
            mapstore::Options::default().history(mapstore::History::Commits(1_000)),
        )
        .unwrap();
        first = db.insert("a", "1").unwrap();
        db.insert("b", "2").unwrap();
        second = db.insert("a", "10").unwrap();
        db.close().unwrap();
    }
    let d = path(&dir);
    let stat = mapstore(&["stat", d, "--json"]);
    assert!(stat.status.success(), "{}", stderr(&stat));
    let json: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    assert_eq!(json["seq"], second);
    assert_eq!(json["entries"], 2);
    let text = stdout(&mapstore(&["stat", d]));
    assert!(text.contains("sequence number 3"), "{text}");
    let watch = mapstore(&["watch", d, "--from", "0"]);
    assert_eq!(
        stdout(&watch),
        "1\tput a = 1\n2\tput b = 2\n3\tput a = 10\n"
    );
    let diff = mapstore(&["diff", d, &first.to_string(), &second.to_string()]);
    assert_eq!(stdout(&diff), "a\t1\t10\nb\t-\t2\n");
    assert!(mapstore(&["checkpoint", d]).status.success());
    assert!(mapstore(&["compact", d]).status.success());
    assert_eq!(stdout(&mapstore(&["get", d, "a"])), "10\n");
    // After the merge: one file at level 1, and the live data ("a" = "10",
    // "b" = "2": 5 bytes of keys and values).
    let stat = mapstore(&["stat", d, "--json"]);
    let json: serde_json::Value = serde_json::from_slice(&stat.stdout).unwrap();
    assert_eq!(json["live_bytes"], 5);
    assert_eq!(json["levels"][0]["level"], 1, "{json}");
    assert_eq!(json["levels"][0]["files"], 1, "{json}");
    assert_eq!(json["partitions"], 1, "{json}");
    assert_eq!(json["most_files_in_a_partition"], 1, "{json}");
    let text = stdout(&mapstore(&["stat", d]));
    assert!(text.contains("  level 1 (merged) 1 files, "), "{text}");
    assert!(
        text.contains("partitions      1 (at most 1 files in one)"),
        "{text}"
    );
    assert!(text.contains("x the live data"), "{text}");
}

#[test]
fn verify_reports_damage_and_fails() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("db");
    {
        let db = mapstore::Db::open(&dir).unwrap();
        for i in 0..3000 {
            db.insert(format!("k{i:05}"), "some value").unwrap();
        }
        db.close().unwrap();
    }
    let clean = mapstore(&["verify", path(&dir)]);
    assert!(clean.status.success(), "{}", stdout(&clean));
    assert!(stdout(&clean).contains("no damage found"));
    let snap = std::fs::read_dir(&dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .find(|p| p.extension().is_some_and(|e| e == "snap"))
        .unwrap();
    let mut bytes = std::fs::read(&snap).unwrap();
    bytes[4096 + 50] ^= 1;
    std::fs::write(&snap, bytes).unwrap();
    let damaged = mapstore(&["verify", path(&dir)]);
    assert_eq!(damaged.status.code(), Some(1));
    let report = stdout(&damaged);
    assert!(
        report.contains(&format!("damaged: {} at byte 4096", snap.display())),
        "{report}"
    );
}

#[test]
fn a_locked_database_missing_paths_and_bad_arguments_are_one_line_errors() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("db");
    let db = mapstore::Db::open(&dir).unwrap();
    db.insert("k", "v").unwrap();
    for args in [
        vec!["get", path(&dir), "k"],
        vec!["put", path(&dir), "k", "w"],
    ] {
        let locked = mapstore(&args);
        assert_eq!(locked.status.code(), Some(1));
        let message = stderr(&locked);
        assert_eq!(message.lines().count(), 1, "{message}");
        assert!(message.contains("already open"), "{message}");
    }
    drop(db);
    let nowhere = temp.path().join("nowhere");
    let missing = mapstore(&["rm", path(&nowhere), "k"]);
    assert_eq!(missing.status.code(), Some(1));
    assert!(!nowhere.exists());
    let read_missing = mapstore(&["scan", path(&nowhere)]);
    assert_eq!(read_missing.status.code(), Some(1));
    assert!(stderr(&read_missing).contains("no database"));
    let bad = mapstore(&["frobnicate"]);
    assert_eq!(bad.status.code(), Some(2));
    let no_dir = mapstore(&["get"]);
    assert_eq!(no_dir.status.code(), Some(2));
}

#[test]
fn wal_dump_and_file_dump_show_records_and_entries() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("db");
    {
        let db = mapstore::Db::open_with(
            &dir,
            mapstore::Options::default().checkpoint_on_close(false),
        )
        .unwrap();
        let mut batch = mapstore::WriteBatch::new();
        batch.insert("a", "1");
        batch.remove("b");
        db.write(batch).unwrap();
        db.insert_with_ttl("t", "x", std::time::Duration::from_secs(60))
            .unwrap();
        db.checkpoint().unwrap();
        db.insert("after", "checkpoint").unwrap();
        db.close().unwrap();
    }
    let with_extension = |extension: &str| {
        let mut files: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.extension().is_some_and(|e| e == extension))
            .collect();
        files.sort();
        files
    };
    let wal = with_extension("wal");
    let last = mapstore(&["wal-dump", path(wal.last().unwrap())]);
    assert!(last.status.success(), "{}", stderr(&last));
    let text = stdout(&last);
    assert!(text.contains("seq 4..=4"), "{text}");
    assert!(
        text.contains("put keyspace 0 key after (10 value bytes)"),
        "{text}"
    );
    assert!(text.ends_with("end: clean\n"), "{text}");
    let snap = with_extension("snap");
    let file = mapstore(&["file-dump", path(&snap[0])]);
    assert!(file.status.success(), "{}", stderr(&file));
    let text = stdout(&file);
    assert!(
        text.starts_with("keyspace 0, 1 blocks, 3 entries\n"),
        "{text}"
    );
    assert!(text.contains("a\t1\t1\n"), "{text}");
    assert!(text.contains("b\t2\t(removed)\n"), "{text}");
    assert!(text.contains("t\t3\tx\texpires at "), "{text}");
    let bad = mapstore(&["wal-dump", path(&snap[0])]);
    assert_eq!(bad.status.code(), Some(1));
}

#[test]
fn backup_writes_a_copy_that_opens_and_refuses_a_bad_destination() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("db");
    let dest = temp.path().join("backup");
    let d = path(&dir);
    assert!(mapstore(&["put", d, "k", "v1"]).status.success());
    let backup = mapstore(&["backup", d, path(&dest)]);
    assert!(backup.status.success(), "{}", stderr(&backup));
    assert!(
        stdout(&backup).starts_with("backup of seq 1 in "),
        "{}",
        stdout(&backup)
    );
    assert!(mapstore(&["put", d, "k", "v2"]).status.success());
    let got = mapstore(&["get", path(&dest), "k"]);
    assert_eq!(stdout(&got), "v1\n");
    // Into itself: one line on stderr, exit status 1.
    let itself = mapstore(&["backup", d, d]);
    assert_eq!(itself.status.code(), Some(1));
    assert!(
        stderr(&itself).contains("own directory"),
        "{}",
        stderr(&itself)
    );
    assert_eq!(stderr(&itself).lines().count(), 1);
}

#[test]
fn repair_rebuilds_a_lost_manifest_and_says_so() {
    let temp = tempfile::tempdir().unwrap();
    let dir = temp.path().join("db");
    let d = path(&dir);
    assert!(mapstore(&["put", d, "k", "v"]).status.success());
    assert!(mapstore(&["checkpoint", d]).status.success());
    std::fs::remove_file(dir.join("MANIFEST")).unwrap();
    std::fs::remove_file(dir.join("MANIFEST.copy")).unwrap();
    assert_eq!(mapstore(&["get", d, "k"]).status.code(), Some(1));
    let repair = mapstore(&["repair", d]);
    assert!(repair.status.success(), "{}", stderr(&repair));
    let text = stdout(&repair);
    assert!(text.starts_with("MANIFEST rebuilt"), "{text}");
    assert!(text.ends_with("nothing was lost\n"), "{text}");
    assert_eq!(stdout(&mapstore(&["get", d, "k"])), "v\n");
    let none = mapstore(&["repair", path(temp.path())]);
    assert_eq!(none.status.code(), Some(1));
    assert!(stderr(&none).contains("no database"), "{}", stderr(&none));
}
