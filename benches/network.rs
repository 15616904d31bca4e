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
//! Where QEMU is installed, the same figures for QEMU microvm behind the
//! same passt, in the same run.
//!
//! Runs: MICROAGENT_BENCH_RUNS (default 3).

#[path = "../tests/common/mod.rs"]
mod common;
#[path = "support/qemu.rs"]
mod qemu;
#[path = "support/stats.rs"]
mod stats;

use std::io::{Read, Write};
use std::net::TcpListener;
use std::time::Instant;

/// Enough to reach steady state on PVM (~0.2 MB/s there), not minutes per run.
const BYTES: usize = 4 << 20;
const REQUESTS: usize = 10;

fn line(vmm: &str, metric: &str, unit: &str, v: Vec<f64>) {
    stats::emit("network", vmm, metric, unit, v, serde_json::json!({}));
}

/// Per run, the wget loop's time per request less the same loop's time
/// with `true`: the network's share, comparable across the two VMMs
/// whatever the loop was timed around (an exec for ours, console markers
/// for QEMU's).
fn net_share(wget: &[f64], baseline: &[f64]) -> Vec<f64> {
    wget.iter().zip(baseline).map(|(w, b)| w - b).collect()
}

/// A sink and a source on the host's loopback, for either VMM's guest.
struct HostServers {
    sink_port: u16,
    source_port: u16,
    /// (bytes, seconds from first to last byte) per upload received.
    uploads: std::sync::mpsc::Receiver<(usize, f64)>,
}

fn host_servers() -> HostServers {
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

    HostServers {
        sink_port,
        source_port,
        uploads: rx,
    }
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
    home.ok(&shared.create_args("bench", &["--auto-snapshot-on-stop", "false"]));
    home.ok(&["start", "bench"]);

    let host = host_servers();
    let (sink_port, source_port) = (host.sink_port, host.source_port);
    let rx = &host.uploads;

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
    line("microagent", "guest_to_host_tcp_throughput", "MB/s", up);

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
    line("microagent", "host_to_guest_tcp_throughput", "MB/s", down);

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
    line(
        "microagent",
        "wget_request_net_ms",
        "ms",
        net_share(&wget, &spawn),
    );
    // Raw loops, timed around `exec`: each includes the exec round trip.
    line("microagent", "exec_wget_loop_per_request_ms", "ms", wget);
    line("microagent", "exec_true_loop_per_iteration_ms", "ms", spawn);
    home.ok(&["halt", "bench"]);

    if qemu::available() {
        theirs(runs, &host);
    } else {
        stats::skipped(
            "network",
            "qemu-microvm",
            "qemu-system-x86_64 not installed",
        );
    }
}

/// The same workload in QEMU microvm, behind the same passt (over its
/// unix socket, `-netdev stream`), with the same MTU, addresses and
/// kernel. QEMU has no guest agent here, so the guest's init runs the
/// loops and prints markers; the host times the markers as they arrive on
/// the serial console (and the uploads at its sink, as for ours).
fn theirs(runs: usize, host: &HostServers) {
    use std::io::BufRead;
    let pvm = common::is_pvm_host();
    let dir = tempfile::tempdir().unwrap();
    let init = format!(
        r#"#!/bin/sh
mount -t proc proc /proc
mount -t devtmpfs dev /dev 2>/dev/null
for a in $(cat /proc/cmdline); do
  case $a in bench.sink=*) SINK=${{a#*=}};; bench.src=*) SRC=${{a#*=}};; esac
done
i=0; while [ $i -lt {runs} ]; do head -c {BYTES} /dev/zero | nc 10.0.2.2 $SINK; i=$((i+1)); done
i=0; while [ $i -lt {runs} ]; do
  echo MARK_DOWN_START; wget -q -O - http://10.0.2.2:$SRC/big | wc -c; echo MARK_DOWN_END
  echo MARK_REQ_START; j=0; while [ $j -lt {REQUESTS} ]; do wget -q -O /dev/null http://10.0.2.2:$SRC/ok; j=$((j+1)); done; echo MARK_REQ_END
  echo MARK_SPAWN_START; j=0; while [ $j -lt {REQUESTS} ]; do true; j=$((j+1)); done; echo MARK_SPAWN_END
  i=$((i+1))
done
echo MARK_BENCH_DONE
reboot -f
"#
    );
    let rootfs = common::busybox_rootfs(dir.path(), &init);
    let sock = dir.path().join("passt.sock");
    let mut passt = std::process::Command::new(microagent::paths::passt_binary())
        .args(["--foreground", "--quiet", "--ipv4-only", "--socket"])
        .arg(&sock)
        .args(["--address", "10.0.2.15", "--netmask", "24"])
        .args(["--gateway", "10.0.2.2", "--dns-forward", "10.0.2.3"])
        .args(["--tcp-ports", "none", "--udp-ports", "none"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let t = Instant::now();
    while !sock.exists() && t.elapsed().as_secs() < 10 {
        std::thread::sleep(std::time::Duration::from_millis(10));
    }
    let args = format!(
        "quiet root=/dev/vda rw init=/init{} {} bench.sink={} bench.src={}",
        qemu::vmm_guest_args(pvm),
        microagent::devices::virtio::net::config::kernel_ip_arg(),
        host.sink_port,
        host.source_port
    );
    let mut vm = qemu::microvm(&common::vmlinux(), &rootfs, 256, &args)
        .arg("-netdev")
        .arg(format!(
            "stream,id=n0,server=off,addr.type=unix,addr.path={}",
            sock.display()
        ))
        .args([
            "-device",
            "virtio-net-device,netdev=n0,mac=52:54:00:12:34:56,host_mtu=65520",
        ])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::null())
        .spawn()
        .unwrap();
    let mut up = Vec::new();
    for _ in 0..runs {
        match host
            .uploads
            .recv_timeout(std::time::Duration::from_secs(900))
        {
            Ok((got, secs)) if got == BYTES && secs > 0.0 => up.push(got as f64 / 1e6 / secs),
            other => eprintln!("qemu guest upload: {other:?}"),
        }
    }
    let (mut down, mut wget, mut spawn) = (Vec::new(), Vec::new(), Vec::new());
    let mut started = Instant::now();
    let stdout = vm.stdout.take().unwrap();
    for l in std::io::BufReader::new(stdout)
        .lines()
        .map_while(Result::ok)
    {
        let l = l.trim();
        let elapsed_ms = || started.elapsed().as_secs_f64() * 1000.0;
        match l {
            "MARK_DOWN_START" | "MARK_REQ_START" | "MARK_SPAWN_START" => started = Instant::now(),
            "MARK_DOWN_END" => down.push(BYTES as f64 / 1e3 / elapsed_ms()),
            "MARK_REQ_END" => wget.push(elapsed_ms() / REQUESTS as f64),
            "MARK_SPAWN_END" => spawn.push(elapsed_ms() / REQUESTS as f64),
            "MARK_BENCH_DONE" => break,
            _ => {}
        }
    }
    let _ = vm.kill();
    let _ = vm.wait();
    let _ = passt.kill();
    let _ = passt.wait();
    line("qemu-microvm", "guest_to_host_tcp_throughput", "MB/s", up);
    line("qemu-microvm", "host_to_guest_tcp_throughput", "MB/s", down);
    line(
        "qemu-microvm",
        "wget_request_net_ms",
        "ms",
        net_share(&wget, &spawn),
    );
    // Raw loops, timed between console markers.
    line(
        "qemu-microvm",
        "console_wget_loop_per_request_ms",
        "ms",
        wget,
    );
    line(
        "qemu-microvm",
        "console_true_loop_per_iteration_ms",
        "ms",
        spawn,
    );
}
