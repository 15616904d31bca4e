//! User-mode network figures on one booted workspace, as JSON lines:
//! - guest -> host TCP throughput: the guest streams N bytes with busybox
//!   `nc` to a sink on the host's loopback (via the gateway address), timed
//!   on the host from first to last byte;
//! - host -> guest: the guest fetches N bytes from the host with `wget`;
//! - connection latency: a loop of `wget` of a tiny file, per request
//!   (timed on the host over one exec), next to the same loop spawning
//!   `true` (the process cost, which on PVM is most of it): the difference
//!   is the network's share.
//!
//! Runs: MICROAGENT_BENCH_RUNS (default 3).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/stats.rs"]
mod stats;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Instant;

/// Enough to reach steady state on PVM (~0.2 MB/s there), not minutes per run.
const BYTES: usize = 4 << 20;
const REQUESTS: usize = 10;

fn line(metric: &str, unit: &str, v: Vec<f64>) {
    stats::emit(
        "network",
        "microagent",
        metric,
        unit,
        v,
        serde_json::json!({}),
    );
}

fn main() {
    if !common::kvm_available() {
        stats::skipped("network", "microagent", "/dev/kvm not available");
        return;
    }
    let runs: usize = std::env::var("MICROAGENT_BENCH_RUNS")
        .ok()
        .and_then(|v| v.parse().ok())
        .unwrap_or(3);
    let home = common::Home::new();
    let shared = common::SharedConfig::new(home.dir.path());
    home.ok(&shared.create_args("bench", &[]));
    home.ok(&["start", "bench"]);

    // A sink and a source on the host's loopback.
    let sink = TcpListener::bind("127.0.0.1:0").unwrap();
    let sink_port = sink.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        for conn in sink.incoming().flatten() {
            let mut conn = conn;
            let mut buf = vec![0u8; 1 << 16];
            let mut got = 0usize;
            let mut first = None;
            while got < BYTES {
                match conn.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => {
                        first.get_or_insert_with(Instant::now);
                        got += n;
                    }
                }
            }
            let secs = first.map_or(0.0, |t| t.elapsed().as_secs_f64());
            let _ = tx.send((got, secs));
        }
    });
    let source = TcpListener::bind("127.0.0.1:0").unwrap();
    let source_port = source.local_addr().unwrap().port();
    std::thread::spawn(move || {
        let body = vec![0x5au8; BYTES];
        for conn in source.incoming().flatten() {
            let mut conn = conn;
            let mut req = [0u8; 512];
            let n = conn.read(&mut req).unwrap_or(0);
            let big = String::from_utf8_lossy(&req[..n]).starts_with("GET /big");
            let data: &[u8] = if big { &body } else { b"ok\n" };
            let _ = write!(
                conn,
                "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                data.len()
            );
            let _ = conn.write_all(data);
        }
    });

    let mut up = Vec::new();
    for _ in 0..runs {
        let out = home
            .cmd()
            .args(["exec", "bench", "--", "sh", "-c"])
            .arg(format!(
                "head -c {BYTES} /dev/zero | nc 10.0.2.2 {sink_port}"
            ))
            .output();
        if let Ok(o) = &out {
            if !o.status.success() {
                eprintln!(
                    "guest nc: {:?}: {}",
                    o.status,
                    String::from_utf8_lossy(&o.stderr)
                );
            }
        }
        // nc may exit with data still in the guest's socket buffer: the
        // host sink, timing first to last byte, is the judge.
        match rx.recv_timeout(std::time::Duration::from_secs(600)) {
            Ok((got, secs)) if got == BYTES && secs > 0.0 => up.push(got as f64 / 1e6 / secs),
            other => eprintln!("host sink: {other:?}"),
        }
    }
    line("guest_to_host_tcp_throughput", "MB/s", up);

    let mut down = Vec::new();
    for _ in 0..runs {
        let t = Instant::now();
        let out = home
            .cmd()
            .args(["exec", "bench", "--", "sh", "-c"])
            .arg(format!(
                "wget -q -O - http://10.0.2.2:{source_port}/big | wc -c"
            ))
            .output();
        if out.is_ok_and(|o| String::from_utf8_lossy(&o.stdout).trim() == BYTES.to_string()) {
            down.push(BYTES as f64 / 1e6 / t.elapsed().as_secs_f64());
        }
    }
    line("host_to_guest_tcp_throughput", "MB/s", down);

    // Per-request time of a loop run inside the guest, timed on the host
    // (busybox `date` has no sub-second format), against the same loop
    // spawning `true`: the difference is the network's share.
    let per_request = |body: &str| -> Option<f64> {
        let script =
            format!("i=0; while [ $i -lt {REQUESTS} ]; do {body} || exit 1; i=$((i+1)); done");
        let t = Instant::now();
        let o = home
            .cmd()
            .args(["exec", "bench", "--", "sh", "-c", &script])
            .output()
            .ok()?;
        o.status
            .success()
            .then(|| t.elapsed().as_secs_f64() * 1000.0 / REQUESTS as f64)
    };
    let (mut wget, mut spawn) = (Vec::new(), Vec::new());
    for _ in 0..runs {
        wget.extend(per_request(&format!(
            "wget -q -O /dev/null http://10.0.2.2:{source_port}/ok"
        )));
        spawn.extend(per_request("true"));
    }
    line("wget_request_ms", "ms", wget);
    line("process_spawn_baseline_ms", "ms", spawn);
    home.ok(&["halt", "bench"]);
}
