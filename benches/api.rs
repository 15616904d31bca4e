//! HTTP API benchmark on one booted workspace, one JSON line per figure:
//! - `api_request_ms` for a status call and for a `snapshots/latest`
//!   call over the unix socket (median, and p99 in the line);
//! - exec stdout throughput over the API (NDJSON) beside `microagent
//!   exec` (the CLI), from the same guest producer.
//!
//! Runs: MICROAGENT_BENCH_RUNS requests per call (default 200), and
//! MICROAGENT_BENCH_RUNS/40 (at least 3) streams per exec figure.

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/stats.rs"]
mod stats;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;
use std::process::{Child, Stdio};
use std::time::{Duration, Instant};

use serde_json::json;

/// Printable bytes (JSON carries them unescaped): zeros turned into 'x'.
const STREAM_MIB: usize = 2;

fn producer() -> String {
    format!("dd if=/dev/zero bs=1M count={STREAM_MIB} 2>/dev/null | tr '\\0' x")
}

/// One request over the unix socket; the whole response.
fn request(sock: &Path, method: &str, path: &str, body: &str) -> Vec<u8> {
    let mut s = UnixStream::connect(sock).unwrap();
    write!(
        s,
        "{method} {path} HTTP/1.1\r\nHost: b\r\nConnection: close\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    )
    .unwrap();
    let mut out = Vec::new();
    s.read_to_end(&mut out).unwrap();
    assert!(
        out.starts_with(b"HTTP/1.1 2"),
        "{}",
        String::from_utf8_lossy(&out[..out.len().min(300)])
    );
    out
}

fn percentile(samples: &mut [f64], p: f64) -> f64 {
    samples.sort_by(f64::total_cmp);
    samples[((samples.len() as f64 - 1.0) * p).round() as usize]
}

fn timed_requests(sock: &Path, runs: usize, path: &str, metric_call: &str) {
    let mut samples: Vec<f64> = (0..runs)
        .map(|_| {
            let t = Instant::now();
            request(sock, "GET", path, "");
            t.elapsed().as_secs_f64() * 1000.0
        })
        .collect();
    let p99 = percentile(&mut samples, 0.99);
    stats::emit(
        "api",
        "microagent",
        "api_request_ms",
        "ms",
        samples,
        json!({"call": metric_call, "p99": (p99 * 1000.0).round() / 1000.0}),
    );
}

fn main() {
    if std::env::args().any(|a| a == "--list") {
        return;
    }
    if !common::kvm_available() {
        stats::skipped("api", "microagent", "/dev/kvm not available");
        return;
    }
    let runs: usize = std::env::var("MICROAGENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(200);
    let home = common::Home::new();
    let shared = common::SharedConfig::new(home.dir.path());
    home.ok(&shared.create_args("bench", &["--auto-snapshot-on-stop", "false"]));
    home.ok(&["start", "bench"]);
    home.ok(&["snapshot", "create", "bench", "--tag", "one"]);
    let sock = home.dir.path().join("api.sock");
    let mut server: Child = home
        .cmd()
        .arg("serve")
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while UnixStream::connect(&sock).is_err() {
        assert!(
            t.elapsed() < Duration::from_secs(20),
            "serve did not listen"
        );
        std::thread::sleep(Duration::from_millis(20));
    }

    timed_requests(&sock, runs, "/v1/workspaces/bench", "status");
    timed_requests(
        &sock,
        runs,
        "/v1/workspaces/bench/snapshots/latest",
        "snapshot_latest",
    );

    let streams = (runs / 40).max(3);
    let bytes = (STREAM_MIB << 20) as f64;
    let body = json!({"argv": ["sh", "-c", producer()]}).to_string();
    // One figure per path, from the same guest producer: `stream` runs it
    // once and returns the bytes it got.
    let throughput = |via: &str, stream: &dyn Fn() -> usize| {
        let samples = (0..streams)
            .map(|_| {
                let t = Instant::now();
                let got = stream();
                assert!(got as f64 >= bytes, "short stream via {via}: {got} bytes");
                bytes / 1e6 / t.elapsed().as_secs_f64()
            })
            .collect();
        stats::emit(
            "api",
            "microagent",
            "exec_stdout_mb_s",
            "MB/s",
            samples,
            json!({"via": via, "bytes": bytes}),
        );
    };
    throughput("api", &|| {
        request(&sock, "POST", "/v1/workspaces/bench/exec", &body).len()
    });
    throughput("cli", &|| {
        let o = home
            .cmd()
            .args(["exec", "bench", "--", "sh", "-c", &producer()])
            .output()
            .unwrap();
        assert_eq!(o.stdout.len(), STREAM_MIB << 20);
        o.stdout.len()
    });

    // SAFETY: signalling the server this bench spawned.
    unsafe { libc::kill(server.id() as i32, libc::SIGTERM) };
    let _ = server.wait();
    home.ok(&["delete", "bench", "--yes", "--force"]);
}
