//! User-mode networking with real guests: each VM's own passt, the host's
//! loopback reached through the gateway, published ports, rollback, four
//! concurrent forks with identical addresses, a 2 MiB upload, `--network none`, a
//! killed passt reported by `status`; and six forks at once, twice over,
//! each answering its first inbound connection.

mod common;

use common::*;
use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// The two tests run one after the other: the first-connection test
/// reports latencies, and four forks uploading beside it on a 2-core PVM
/// host would measure the load, not the fix.
static ONE_AT_A_TIME: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// A tiny HTTP/1.0 file server on 127.0.0.1 for the guests to fetch from.
struct HostServer {
    port: u16,
    hits: Arc<AtomicUsize>,
}

fn serve(blob: Arc<Vec<u8>>) -> HostServer {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let hits = Arc::new(AtomicUsize::new(0));
    let h = hits.clone();
    std::thread::spawn(move || {
        for conn in listener.incoming().flatten() {
            let blob = blob.clone();
            let h = h.clone();
            std::thread::spawn(move || {
                let mut conn = conn;
                let mut req = [0u8; 1024];
                let n = conn.read(&mut req).unwrap_or(0);
                let req = String::from_utf8_lossy(&req[..n]);
                let body: &[u8] = if req.starts_with("GET /blob") {
                    &blob
                } else {
                    b"hello from the host\n"
                };
                h.fetch_add(1, Ordering::SeqCst);
                let _ = write!(
                    conn,
                    "HTTP/1.0 200 OK\r\nContent-Length: {}\r\n\r\n",
                    body.len()
                );
                let _ = conn.write_all(body);
            });
        }
    });
    HostServer { port, hits }
}

/// A sink on 127.0.0.1 that takes one upload and reports its length and
/// sha256 once the sender closes.
fn upload_sink() -> (u16, std::sync::mpsc::Receiver<(usize, String)>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let port = listener.local_addr().unwrap().port();
    let (tx, rx) = std::sync::mpsc::channel();
    std::thread::spawn(move || {
        if let Ok((mut conn, _)) = listener.accept() {
            let mut data = Vec::new();
            let _ = conn.read_to_end(&mut data);
            let _ = tx.send((data.len(), sha256_hex(&data)));
        }
    });
    (port, rx)
}

/// Long enough to outlast passt's old 24 s reset at PVM speeds (2 MiB
/// take about 70 s here; 3 MiB took 104 s of CI).
const UPLOAD: usize = 2 << 20;

fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// GET / from a published port on the host, retried while the guest's
/// server comes up.
fn get_published(port: u16) -> String {
    let t = Instant::now();
    loop {
        let attempt = (|| -> std::io::Result<String> {
            let mut s = TcpStream::connect(("127.0.0.1", port))?;
            s.set_read_timeout(Some(Duration::from_secs(30)))?;
            s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
            let mut out = String::new();
            s.read_to_string(&mut out)?;
            Ok(out)
        })();
        match attempt {
            Ok(body) if body.contains("200 OK") => return body,
            other => assert!(
                t.elapsed() < Duration::from_secs(120),
                "published port {port}: {other:?}"
            ),
        }
        std::thread::sleep(Duration::from_millis(500));
    }
}

fn sha256_hex(data: &[u8]) -> String {
    use sha2::{Digest, Sha256};
    Sha256::digest(data)
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect()
}

#[test]
fn user_networking_ports_rollback_forks_and_passt_death() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    let home = Home::new();
    let shared = SharedConfig::new(home.dir.path());
    let blob: Vec<u8> = (0..1_000_000u32)
        .map(|i| (i.wrapping_mul(7919) >> 3) as u8)
        .collect();
    let blob_sha = sha256_hex(&blob);
    let host = serve(Arc::new(blob));
    let published = free_port();

    let publish = format!("{published}:8080");
    home.ok(&shared.create_args("net", &["-p", &publish]));
    home.ok(&shared.create_args("isolated", &["--network", "none"]));
    let v = home.json(&["status", "net"]);
    assert_eq!(v["network"], "user");
    assert_eq!(v["ports"][0], format!("127.0.0.1:{published}:8080"));
    // `isolated` cold-boots (a configuration of its own) on the other core
    // while `net` starts and works.
    let isolated = home
        .cmd()
        .args(["start", "isolated"])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    home.ok(&["start", "net"]);

    // The guest reaches the host's loopback through the gateway.
    let fetch = format!(
        "wget -q -O - http://10.0.2.2:{}/blob | sha256sum",
        host.port
    );
    let got = sh(&home, "net", &fetch);
    assert!(
        got.starts_with(&blob_sha),
        "guest saw {got}, host has {blob_sha}"
    );
    assert_eq!(
        sh(&home, "net", "cat /etc/resolv.conf"),
        "nameserver 10.0.2.3"
    );

    // A sustained upload to a host peer that sends nothing back arrives
    // whole (Debian 12's own passt reset such connections after 24 s).
    // The bytes come from busybox `yes` in guest userspace: the guest
    // kernel's /dev/urandom is far too slow under PVM.
    let (sink_port, uploaded) = upload_sink();
    let upload = format!("yes 0123456789abcdef | head -c {UPLOAD} | nc 10.0.2.2 {sink_port}");
    sh(&home, "net", &upload);
    let (len, host_sha) = uploaded
        .recv_timeout(Duration::from_secs(300))
        .expect("the host sink saw the upload end");
    let expected: Vec<u8> = b"0123456789abcdef\n"
        .iter()
        .copied()
        .cycle()
        .take(UPLOAD)
        .collect();
    assert_eq!(len, UPLOAD, "bytes the host received");
    assert_eq!(host_sha, sha256_hex(&expected), "the upload's content");
    assert_eq!(home.json(&["status", "net"])["network_state"], "up");

    // A published port reaches a server inside the guest.
    sh(
        &home,
        "net",
        "mkdir -p /www && echo guest-says-hi > /www/index.html && httpd -p 8080 -h /www",
    );
    assert!(get_published(published).contains("guest-says-hi"));

    // --network none: loopback only.
    let started = isolated.wait_with_output().unwrap();
    assert!(
        started.status.success(),
        "start isolated: {}",
        String::from_utf8_lossy(&started.stderr)
    );
    assert_eq!(sh(&home, "isolated", "ls /sys/class/net"), "lo");

    // Rollback: a fresh passt, and new connections work.
    home.ok(&["snapshot", "create", "net", "--tag", "base"]);
    home.ok(&["halt", "net"]);
    home.ok(&["start", "net", "--from-snapshot", "base"]);
    assert!(sh(&home, "net", &fetch).starts_with(&blob_sha));
    assert!(get_published(published).contains("guest-says-hi"));

    // Four forks with the same MAC and IP, each on its own passt, at once;
    // one publishes the guest's server on a port of its own.
    let fork_port = free_port();
    // Each fork restores on the 2 host cores with the others (a 2-vCPU
    // restore costs ~8 CPU-seconds on PVM): four show the point.
    const FORKS: usize = 4;
    let hits_before = host.hits.load(Ordering::SeqCst);
    std::thread::scope(|s| {
        for i in 0..FORKS {
            let home = &home;
            let port = fork_port.to_string();
            s.spawn(move || {
                let name = format!("f{i}");
                let mut args = vec!["create", &name, "--from-snapshot", "net:base"];
                let publish = format!("{port}:8080");
                if i == 0 {
                    args.extend(["-p", &publish]);
                }
                home.ok(&args);
            });
        }
    });
    let hello = format!("wget -q -O - http://10.0.2.2:{}/hello", host.port);
    // One after the other: all running at once, they are (the forks are
    // up and serving together), but 8 vCPUs on 2 host cores make each
    // guest process start take ~20 s instead of ~3.
    for i in 0..FORKS {
        let name = format!("f{i}");
        assert_eq!(
            sh(
                &home,
                &name,
                &format!("{hello}; ip -4 addr show eth0 | grep -o 10.0.2.15/24")
            ),
            "hello from the host\n10.0.2.15/24"
        );
    }
    assert!(host.hits.load(Ordering::SeqCst) >= hits_before + FORKS);
    assert!(get_published(fork_port).contains("guest-says-hi"));
    let f1 = home.json(&["status", "f1"]);
    assert_eq!(
        f1["ports"].as_array().unwrap().len(),
        0,
        "ports are never inherited"
    );

    // A killed passt is noticed and reported, and nothing hangs.
    let vmm = home.json(&["status", "f1"])["pid"].as_u64().unwrap();
    let killed = std::process::Command::new("pkill")
        .args(["-9", "-f", &format!("microagent-passt-{vmm}-")])
        .status()
        .unwrap();
    assert!(killed.success(), "no passt found for VMM {vmm}");
    let t = Instant::now();
    loop {
        let state = home.json(&["status", "f1"])["network_state"].clone();
        if state
            .as_str()
            .is_some_and(|s| s.starts_with("down: passt killed by signal 9"))
        {
            break;
        }
        assert!(t.elapsed() < Duration::from_secs(30), "status says {state}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let (code, _, _) = home.run(&[
        "exec",
        "f1",
        "--",
        "sh",
        "-c",
        // `timeout`, not wget's -T, which segfaults in Debian 12's busybox
        // (so this check used to pass whatever the network did).
        &format!("timeout 5 wget -q -O - http://10.0.2.2:{}/hello", host.port),
    ]);
    assert_ne!(code, 0, "no network after passt died");
    assert_eq!(sh(&home, "f1", "echo still-here"), "still-here");
    assert_eq!(
        sh(&home, "f2", &hello),
        "hello from the host",
        "other forks unaffected"
    );
}

/// `n` ports that are free now, below Linux's ephemeral range (32768 on),
/// so no outgoing connection of this host or another test takes one before
/// a fork's passt binds it (`free_port`'s can be). `from` spreads callers.
fn free_ports_below_ephemeral(n: usize, from: u16) -> Vec<u16> {
    (from..32768)
        .filter(|p| TcpListener::bind(("127.0.0.1", *p)).is_ok())
        .take(n)
        .collect()
}

/// One GET / on a published port, no retry: the body, or why it failed,
/// and how long it took.
fn first_get(port: u16, timeout: Duration) -> (Result<String, String>, Duration) {
    let t = Instant::now();
    let got = (|| -> std::io::Result<String> {
        let mut s = TcpStream::connect_timeout(&([127, 0, 0, 1], port).into(), timeout)?;
        s.set_read_timeout(Some(timeout))?;
        s.write_all(b"GET / HTTP/1.0\r\n\r\n")?;
        let mut out = String::new();
        s.read_to_string(&mut out)?;
        Ok(out)
    })()
    .map_err(|e| e.to_string());
    (got, t.elapsed())
}

/// Issue: a fork (or rollback) of a guest that serves but has sent nothing
/// since its fresh passt started got no inbound connection until it
/// happened to transmit (every time: the bug was not a race). Six forks
/// at once, twice over: each one's first connection is answered; so is a
/// rollback's; and a fork's first outbound request works. (Twenty forks
/// five times over cost CI 25 minutes here: a 2-vCPU restore takes ~8
/// CPU-seconds on PVM and the host has two cores.)
#[test]
fn forks_and_rollbacks_serve_from_their_first_connection() {
    if !kvm_available() {
        return;
    }
    let _one = ONE_AT_A_TIME.lock().unwrap_or_else(|p| p.into_inner());
    const FORKS: usize = 6;
    const ROUNDS: usize = 2;
    // The bug this guards against left the first connection unanswered
    // for as long as the guest sent nothing: indefinitely. Twenty guests
    // just resumed on two cores answered in about 1 to 2 s (the
    // rounds are printed); the bound only has to tell that from never.
    const FIRST_ANSWER: Duration = Duration::from_secs(10);
    let home = Home::new();
    let shared = SharedConfig::new(home.dir.path());
    let host = serve(Arc::new(Vec::new()));
    // The source publishes nothing (the case that failed); the rollback
    // case needs a port of its own.
    // Each round's ports come from a range of their own.
    let base = 20_000 + (std::process::id() % 1000) as u16 * 4;
    let rollback_port = free_ports_below_ephemeral(1, base)[0];
    let publish = format!("{rollback_port}:8080");
    home.ok(&shared.create_args("srv", &[]));
    home.ok(&shared.create_args("rb", &["-p", &publish]));
    std::thread::scope(|s| {
        s.spawn(|| home.ok(&["start", "rb"]));
        home.ok(&["start", "srv"]);
    });
    let httpd = "mkdir -p /www && echo served-page > /www/index.html && httpd -p 8080 -h /www && wget -q -O - http://127.0.0.1:8080/";
    assert_eq!(sh(&home, "srv", httpd), "served-page");
    assert_eq!(sh(&home, "rb", httpd), "served-page");
    home.ok(&["snapshot", "create", "srv", "--tag", "serving"]);
    home.ok(&["snapshot", "create", "rb", "--tag", "serving"]);

    let mut slowest = Duration::ZERO;
    for round in 0..ROUNDS {
        let mut round_slowest = Duration::ZERO;
        let ports = free_ports_below_ephemeral(FORKS, base + 1 + 2000 * round as u16);
        std::thread::scope(|s| {
            for (i, port) in ports.iter().enumerate() {
                let home = &home;
                s.spawn(move || {
                    let name = format!("f{round}-{i}");
                    let publish = format!("{port}:8080");
                    home.ok(&[
                        "create",
                        &name,
                        "--from-snapshot",
                        "srv:serving",
                        "-p",
                        &publish,
                    ]);
                });
            }
        });
        for (i, port) in ports.iter().enumerate() {
            let (got, took) = first_get(*port, FIRST_ANSWER);
            let got = got.unwrap_or_else(|e| {
                panic!("round {round}: fork f{round}-{i}'s first connection: {e} after {took:?}")
            });
            assert!(got.contains("served-page"), "f{round}-{i}: {got}");
            round_slowest = round_slowest.max(took);
        }
        eprintln!("round {round}: slowest first answer {round_slowest:?}");
        slowest = slowest.max(round_slowest);
        // Outbound from a fork that has not sent anything yet.
        // `timeout`, not wget's -T: Debian 12's busybox wget segfaults with -T.
        let out = format!(
            "timeout 30 wget -q -O - http://10.0.2.2:{}/hello",
            host.port
        );
        assert_eq!(
            sh(&home, &format!("f{round}-0"), &out),
            "hello from the host"
        );
        // A rollback of the serving workspace answers at once too.
        home.ok(&["halt", "rb"]);
        home.ok(&["start", "rb", "--from-snapshot", "serving"]);
        let (got, took) = first_get(rollback_port, FIRST_ANSWER);
        let got = got.unwrap_or_else(|e| {
            panic!("round {round}: the rollback's first connection: {e} after {took:?}")
        });
        assert!(got.contains("served-page"), "rollback: {got}");
        std::thread::scope(|s| {
            for i in 0..FORKS {
                let home = &home;
                s.spawn(move || home.ok(&["delete", &format!("f{round}-{i}"), "--yes", "--force"]));
            }
        });
    }
    eprintln!("slowest first answer over {ROUNDS} rounds of {FORKS} forks: {slowest:?}");
}
