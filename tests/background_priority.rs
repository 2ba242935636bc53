//! The background checkpoint thread runs at the priority
//! `Options::background_nice` asks for (Linux, where each thread has its own
//! nice value).
//!
//! This file holds a single test on purpose: it finds the checkpoint thread
//! by name among the threads of its process, so no other database may be
//! open in the process at the same time.

#![cfg(target_os = "linux")]

use std::time::{Duration, Instant};

use mapstore::{Db, Options};

/// The nice value of thread `task` of this process, from
/// `/proc/self/task/{task}/stat` (field 19; the command name, field 2, is
/// in parentheses and may hold spaces, so fields are counted after it).
fn nice_of(task: &str) -> Option<i32> {
    let stat = std::fs::read_to_string(format!("/proc/self/task/{task}/stat")).ok()?;
    let after_name = &stat[stat.rfind(')')? + 1..];
    after_name.split_whitespace().nth(16)?.parse().ok()
}

/// The nice values of this process's threads named like the checkpoint
/// thread (the kernel keeps the first 15 bytes of a name).
fn checkpoint_thread_nices() -> Vec<i32> {
    let mut nices = Vec::new();
    for task in std::fs::read_dir("/proc/self/task").unwrap().flatten() {
        let task = task.file_name().into_string().unwrap();
        let comm =
            std::fs::read_to_string(format!("/proc/self/task/{task}/comm")).unwrap_or_default();
        if comm.trim_end() == "mapstore-checkp" {
            nices.extend(nice_of(&task));
        }
    }
    nices
}

#[test]
fn the_checkpoint_thread_runs_as_many_nice_levels_lower_as_asked() {
    let own = nice_of(&this_thread_id()).expect("this thread's nice value");
    for levels in [10u8, 3, 0] {
        let dir = tempfile::tempdir().unwrap();
        let db = Db::open_with(dir.path(), Options::default().background_nice(levels)).unwrap();
        // A checkpoint that has returned means the thread is past the point
        // where it sets its priority.
        db.insert("key", "value").unwrap();
        db.checkpoint().unwrap();
        let expected = (own + i32::from(levels)).min(19);
        assert_eq!(
            checkpoint_thread_nices(),
            vec![expected],
            "background_nice({levels}) from a thread at nice {own}"
        );
        db.close().unwrap();
        drop(db);
        // The thread is gone once the database is closed, before the next
        // round looks for it.
        let deadline = Instant::now() + Duration::from_secs(10);
        while !checkpoint_thread_nices().is_empty() {
            assert!(
                Instant::now() < deadline,
                "the checkpoint thread outlived close"
            );
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

/// This thread's id, as `/proc/thread-self` names it.
fn this_thread_id() -> String {
    std::fs::read_link("/proc/thread-self")
        .unwrap()
        .file_name()
        .unwrap()
        .to_string_lossy()
        .into_owned()
}
