//! Snapshots shared through a registry (README "More than one host"):
//! host A pushes, host B (another state directory, without the kernel)
//! forks from the registry reference; a second push sends little more
//! than what changed; `skopeo copy` keeps the artifact whole; a tampered
//! chunk is refused by name and nothing is created.

mod common;

use common::oci::{self, Registry};
use common::schema::assert_schema;
use common::*;
use std::process::Command;

/// `skopeo ARGS` against the test registry (plain HTTP, its user).
fn skopeo(registry: &Registry, args: &[&str]) -> String {
    let creds = registry.creds();
    let mut cmd = Command::new("skopeo");
    cmd.arg(args[0]);
    if args[0] == "copy" {
        cmd.args(["--src-tls-verify=false", "--dest-tls-verify=false"])
            .args(["--src-creds", &creds, "--dest-creds", &creds]);
    } else {
        cmd.args(["--tls-verify=false", "--creds", &creds]);
    }
    let out = cmd.args(&args[1..]).output().expect("skopeo");
    let (o, e) = text(&out);
    assert!(out.status.success(), "skopeo {args:?}: {e}");
    o
}

#[test]
fn push_pull_fork_elsewhere_send_only_changes_and_refuse_tampering() {
    if !kvm_available() {
        return;
    }
    let registry = Registry::start();
    let creds = registry.creds();
    let reg = |extra: &[&str]| {
        let mut a: Vec<String> = extra.iter().map(|s| s.to_string()).collect();
        a.extend(["--creds".into(), creds.clone()]);
        a
    };

    // Host A: the suite's busybox image (1 vCPU, 256 MiB, as `checkpoint`
    // boots it, so the boot is warm), a file and a counter that runs on.
    let a = Home::new();
    let layout = oci::script_path("image-busybox.sh");
    a.ok(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--tag",
        "localhost/busybox:latest",
    ]);
    a.ok(&[
        "create",
        "src",
        "--image",
        "localhost/busybox:latest",
        "--memory",
        "256",
    ]);
    a.ok(&["start", "src"]);
    // The counter forks nothing (read -t times out on a FIFO): a process
    // per second would eat the vCPU on PVM.
    // One exec per step: each costs seconds on PVM.
    let out = a.ok(&[
        "exec",
        "src",
        "--",
        "sh",
        "-c",
        "echo made-on-a > /root/file && mkfifo /tmp/tick || exit 1; \
         (i=0; while :; do i=$((i+1)); echo $i > /tmp/count; read -t 1 x <> /tmp/tick; done) \
         </dev/null >/dev/null 2>&1 & read -t 2 x <> /tmp/tick; cat /tmp/count",
    ]);
    let at_snapshot: u64 = out
        .trim()
        .parse()
        .unwrap_or_else(|_| panic!("count: {out:?}"));
    a.ok(&["snapshot", "create", "src", "--tag", "one"]);
    let ref1 = format!("{}/team/src:one", registry.addr);
    let first = a.json(
        &reg(&["snapshot", "push", "src:one", &ref1])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_schema("snapshot-push", &first);
    assert_eq!(first["blobs_pushed"], first["blobs"], "{first}");
    let first_bytes = first["bytes_pushed"].as_u64().unwrap();

    // A second snapshot after ~9.5 MiB written (5 busybox copies: page
    // cache and the disk's delta both change).
    a.ok(&[
        "exec",
        "src",
        "--",
        "sh",
        "-c",
        "cat /bin/busybox /bin/busybox /bin/busybox /bin/busybox /bin/busybox > /root/big && sync",
    ]);
    a.ok(&["snapshot", "create", "src", "--tag", "two"]);
    a.ok(&["halt", "src"]);
    let ref2 = format!("{}/team/src:two", registry.addr);
    let second = a.json(
        &reg(&["snapshot", "push", "src:two", &ref2])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    let changed = 5 * std::fs::metadata("/bin/busybox").map_or(2 << 20, |m| m.len());
    let second_bytes = second["bytes_pushed"].as_u64().unwrap();
    eprintln!(
        "pushed: first {first_bytes} bytes ({} blobs), second {second_bytes} bytes ({} of {} blobs) after {changed} bytes written",
        first["blobs"], second["blobs_pushed"], second["blobs"]
    );
    assert!(
        second_bytes < 3 * changed,
        "the second push sent {second_bytes} bytes for {changed} written: {second}"
    );
    assert!(
        second["blobs_pushed"].as_u64() < second["blobs"].as_u64(),
        "{second}"
    );

    // Host B: empty state and no kernel of its own; forks from the
    // registry: the file is there and the counter goes on from where the
    // snapshot caught it.
    let b = Home::with_private_boot_cache();
    let fork = b
        .cmd()
        .env("MICROAGENT_KERNEL", "/nonexistent/vmlinux")
        .args(reg(&[
            "create",
            "forked",
            "--from-snapshot",
            &ref1,
            "--json",
        ]))
        .output()
        .unwrap();
    let (o, e) = text(&fork);
    assert!(fork.status.success(), "fork from {ref1}: {e}");
    assert_eq!(
        serde_json::from_str::<serde_json::Value>(&o).unwrap()["status"],
        "running"
    );
    // Pulled chunks are guest memory: private like the rest of the state.
    use std::os::unix::fs::PermissionsExt;
    let chunks = std::fs::metadata(b.dir.path().join("cache/chunks")).unwrap();
    assert_eq!(chunks.permissions().mode() & 0o777, 0o700);
    let out = b.ok(&[
        "exec",
        "forked",
        "--",
        "sh",
        "-c",
        // Waits (up to 30 s, without forking) for the counter to move:
        // a guest just restored on PVM faults its pages back in slowly.
        "cat /root/file; read a < /tmp/count; echo $a; n=0; \
         while [ $n -lt 30 ]; do read -t 1 x <> /tmp/tick; read b < /tmp/count; \
         [ \"$b\" != \"$a\" ] && break; n=$((n+1)); done; echo $b",
    ]);
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.first(), Some(&"made-on-a"), "{out}");
    let counts: Vec<u64> = lines[1..].iter().map(|l| l.parse().unwrap()).collect();
    assert!(
        counts[0] >= at_snapshot && counts[0] < at_snapshot + 120,
        "counter was {at_snapshot} at the snapshot, {} after the fork",
        counts[0]
    );
    assert!(counts[1] > counts[0], "the counter stopped: {out}");
    b.ok(&["delete", "forked", "--yes", "--force"]);

    // skopeo copies the artifact byte for byte, to another registry and
    // into an OCI layout; the copy pulls and forks (only the chunks host
    // B lacks are fetched).
    let other = Registry::start();
    let copy = format!("{}/other/copied:v1", other.addr);
    skopeo(
        &registry,
        &[
            "copy",
            &format!("docker://{ref2}"),
            &format!("docker://{copy}"),
        ],
    );
    let raw = |r: &str| skopeo(&registry, &["inspect", "--raw", &format!("docker://{r}")]);
    assert_eq!(raw(&ref2), raw(&copy), "skopeo changed the manifest");
    let oci_dir = b.dir.path().join("layout");
    skopeo(
        &registry,
        &[
            "copy",
            &format!("docker://{copy}"),
            &format!("oci:{}:v1", oci_dir.display()),
        ],
    );
    let digest = second["digest"].as_str().unwrap();
    assert!(
        oci_dir
            .join("blobs/sha256")
            .join(digest.trim_start_matches("sha256:"))
            .is_file(),
        "the OCI layout has no manifest {digest}"
    );
    let pulled = b.json(
        &reg(&["snapshot", "pull", &copy, "copied:kept"])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_schema("snapshot-pull", &pulled);
    assert!(
        pulled["blobs_fetched"].as_u64() < pulled["blobs"].as_u64(),
        "chunks host B already had were fetched again: {pulled}"
    );
    assert_eq!(pulled["digest"], second["digest"]);
    b.ok(&["create", "fromcopy", "--from-snapshot", "copied:kept"]);
    let out = b.ok(&[
        "exec",
        "fromcopy",
        "--",
        "sh",
        "-c",
        "cat /root/file; stat -c %s /root/big",
    ]);
    assert_eq!(
        out.split_whitespace().collect::<Vec<_>>(),
        ["made-on-a", &changed.to_string()]
    );
    b.ok(&["delete", "fromcopy", "--yes", "--force"]);

    // A chunk rewritten in the registry: host C's pull names it and
    // leaves no workspace behind.
    let manifest: serde_json::Value = serde_json::from_str(&raw(&ref1)).unwrap();
    let chunk = manifest["layers"]
        .as_array()
        .unwrap()
        .iter()
        .rev()
        .find(|l| l["mediaType"] == "application/vnd.microagent.snapshot.chunk.v1+zstd")
        .expect("a chunk layer");
    let hex = chunk["digest"]
        .as_str()
        .unwrap()
        .trim_start_matches("sha256:");
    let blob = registry
        .data_dir()
        .join("docker/registry/v2/blobs/sha256")
        .join(&hex[..2])
        .join(hex)
        .join("data");
    let mut bytes = std::fs::read(&blob).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&blob, bytes).unwrap();
    let c = Home::new();
    let (code, _, err) = c.run(
        &reg(&["snapshot", "pull", &ref1])
            .iter()
            .map(String::as_str)
            .collect::<Vec<_>>(),
    );
    assert_ne!(code, 0);
    assert!(
        err.contains(hex),
        "the error does not name the blob {hex}: {err}"
    );
    assert!(
        !c.dir.path().join("workspaces/src").exists(),
        "a refused pull left a workspace"
    );
    assert_eq!(c.ok(&["list", "--json"]).trim(), "[]");
}
