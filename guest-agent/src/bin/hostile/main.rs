//! A hostile guest program, for the test that proves the VMM's bounds on
//! what a guest can make the host hold (tests/hostile_guest.rs copies it
//! into a guest; no image ships it). For SECONDS it floods vsock with
//! connection requests to host ports nobody listens on (each one makes
//! the VMM queue a reset), on another thread writes to the console as
//! fast as it can, and on a third kicks the devices' registers and breaks
//! the network device's queues (`mmio.rs`); then it prints what it did as
//! one JSON line.

mod mmio;

use std::io::Write;
use std::time::{Duration, Instant};

/// The agent's port, which the flood leaves alone.
use guest_agent::AGENT_PORT;

/// The host's vsock CID.
const HOST_CID: u32 = 2;

/// One connection request to `port` of the host, abandoned at once.
/// Returns whether the guest kernel sent it.
fn knock(port: u32) -> bool {
    guest_agent::vsock::connect_nonblocking(HOST_CID, port).is_ok()
}

fn spam_console(until: Instant) -> u64 {
    let Ok(mut console) = std::fs::OpenOptions::new().write(true).open("/dev/console") else {
        return 0;
    };
    let line = b"hostile: console spam, as fast as the guest can write it .......\n";
    let block: Vec<u8> = line.iter().copied().cycle().take(4096).collect();
    let mut bytes = 0u64;
    while Instant::now() < until {
        match console.write(&block) {
            Ok(n) => bytes += n as u64,
            Err(_) => break,
        }
    }
    bytes
}

fn main() {
    let secs: u64 = std::env::args()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or(60);
    let started = Instant::now();
    let until = started + Duration::from_secs(secs);
    let console = std::thread::spawn(move || spam_console(until));
    let kicks = std::thread::spawn(move || mmio::kick(until));
    let (mut sent, mut failed) = (0u64, 0u64);
    let mut port = 1024u32;
    while Instant::now() < until {
        port = if port >= 65_000 { 1024 } else { port + 1 };
        if port == AGENT_PORT {
            continue;
        }
        if knock(port) {
            sent += 1;
        } else {
            failed += 1;
        }
    }
    let console_bytes = console.join().unwrap_or(0);
    let mmio = kicks.join().unwrap_or_default();
    let mmio_error = match mmio.error {
        Some(e) => serde_json::Value::String(e),
        None => serde_json::Value::Null,
    };
    println!(
        "{}",
        serde_json::json!({
            "seconds": (started.elapsed().as_secs_f64() * 10.0).round() / 10.0,
            "vsock_requests": sent,
            "vsock_failed": failed,
            "console_bytes": console_bytes,
            "mmio_devices": mmio.devices,
            "mmio_kicks": mmio.kicks,
            "bogus_activations": mmio.bogus_activations,
            "mmio_error": mmio_error,
        })
    );
}
