//! Serves a database's metrics at `http://127.0.0.1:9187/metrics` for
//! Prometheus while a thread writes to it.
//!
//! ```sh
//! cargo run --release --example metrics_server --features prometheus [-- DIR [ADDR]]
//! curl http://127.0.0.1:9187/metrics
//! # Or print one scrape and stop (what CI checks with promtool):
//! cargo run --example metrics_server --features prometheus -- --print
//! ```
//!
//! The HTTP side is a few lines of the standard library, enough for a
//! scraper; a real service would use its web framework's router.

use std::io::{BufRead, BufReader, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread::JoinHandle;

use mapstore::prometheus::MetricsCollector;
use prometheus_client::encoding::prometheus_text;
use prometheus_client::registry::Registry;

/// A registry with `db`'s metrics on it.
pub fn registry_for(db: &mapstore::Db) -> Registry {
    let mut registry = Registry::default();
    registry.register_collector(Box::new(MetricsCollector::new(db.clone())));
    registry
}

/// The registry in the Prometheus text format.
pub fn scrape(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing to a String does not fail.
    prometheus_text::encode(&mut text, registry).expect("encoding to a string");
    text
}

/// Answers `GET /metrics` on `listener` until `stop` is set (checked
/// between connections).
pub fn serve(
    listener: TcpListener,
    registry: Arc<Registry>,
    stop: Arc<AtomicBool>,
) -> JoinHandle<()> {
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            if stop.load(Ordering::Relaxed) {
                break;
            }
            if let Ok(stream) = stream {
                // A client that goes away mid-request is no error of ours.
                let _ = answer(stream, &registry);
            }
        }
    })
}

fn answer(stream: TcpStream, registry: &Registry) -> std::io::Result<()> {
    let mut reader = BufReader::new(stream.try_clone()?);
    let mut request_line = String::new();
    reader.read_line(&mut request_line)?;
    // The headers, up to the empty line.
    let mut header = String::new();
    while reader.read_line(&mut header)? > 2 {
        header.clear();
    }
    let mut stream = stream;
    let (status, content_type, body) = if request_line.starts_with("GET /metrics ") {
        ("200 OK", prometheus_text::CONTENT_TYPE, scrape(registry))
    } else {
        ("404 Not Found", "text/plain", "try /metrics\n".to_string())
    };
    write!(
        stream,
        "HTTP/1.1 {status}\r\nContent-Type: {content_type}\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
        body.len()
    )?;
    stream.flush()
}

/// Writes batches until `stop` is set.
pub fn keep_writing(db: mapstore::Db, stop: Arc<AtomicBool>) -> JoinHandle<()> {
    std::thread::spawn(move || {
        let mut n = 0u64;
        while !stop.load(Ordering::Relaxed) {
            let mut batch = mapstore::WriteBatch::new();
            for k in 0..100 {
                batch.insert(
                    format!("key{:08}", (n * 100 + k) % 50_000),
                    format!("value {n}"),
                );
            }
            if db.write(batch).is_err() {
                break;
            }
            let _ = db.get(format!("key{:08}", n % 50_000));
            n += 1;
        }
    })
}

#[allow(dead_code)] // the test includes this file for the functions above
fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let print_once = args.iter().any(|a| a == "--print");
    let args: Vec<&String> = args.iter().filter(|a| *a != "--print").collect();
    let temp = tempfile::tempdir()?;
    let dir = args.first().map_or(temp.path().to_path_buf(), |d| d.into());
    let addr = args.get(1).map_or("127.0.0.1:9187", |a| a.as_str());
    let db = mapstore::Db::open(&dir)?;
    let registry = Arc::new(registry_for(&db));
    let stop = Arc::new(AtomicBool::new(false));
    let writer = keep_writing(db.clone(), stop.clone());
    if print_once {
        std::thread::sleep(std::time::Duration::from_millis(300));
        db.checkpoint()?;
        stop.store(true, Ordering::Relaxed);
        writer.join().ok();
        print!("{}", scrape(&registry));
        return Ok(db.close()?);
    }
    let listener = TcpListener::bind(addr)?;
    println!(
        "serving http://{}/metrics for {}",
        listener.local_addr()?,
        dir.display()
    );
    serve(listener, registry, stop).join().ok();
    Ok(())
}
