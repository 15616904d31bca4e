//! Warm starts from the boot snapshot cache, with real guests: the first
//! start of a boot key cold-boots and caches, equal workspaces then resume
//! that snapshot with their own identity; --cold and a damaged entry boot
//! cold, a changed input changes the key; `cache prune` frees the space.

mod common;

use common::*;
use serde_json::Value;
use std::path::{Path, PathBuf};

const INIT: &str = "#!/bin/sh\necho booted > /run/init-ran\nexec sleep 100000\n";

fn create(home: &Home, name: &str, rootfs: &Path, memory: &str) {
    home.ok(&[
        "create",
        name,
        "--rootfs",
        rootfs.to_str().unwrap(),
        "--kernel",
        vmlinux().to_str().unwrap(),
        "--memory",
        memory,
        "--init",
        "/init",
    ]);
}

/// `start NAME --json ARGS`: (the JSON, stderr).
fn start(home: &Home, name: &str, extra: &[&str]) -> (Value, String) {
    let mut args = vec!["start", name, "--json"];
    args.extend_from_slice(extra);
    let (code, out, err) = home.run(&args);
    assert_eq!(code, 0, "start {name} failed: {err}");
    let v: Value = serde_json::from_str(&out).unwrap_or_else(|e| panic!("{e}: {out}"));
    (v, err)
}

fn boot_key(home: &Home, name: &str) -> String {
    let rec: Value = serde_json::from_slice(
        &std::fs::read(home.workspace_dir(name).join("workspace.json")).unwrap(),
    )
    .unwrap();
    rec["boot_key"].as_str().expect("no boot_key").to_string()
}

fn cache_keys(home: &Home) -> Vec<String> {
    let v = home.json(&["cache", "ls"]);
    let mut keys: Vec<String> = v
        .as_array()
        .unwrap()
        .iter()
        .map(|e| e["key"].as_str().unwrap().to_string())
        .collect();
    keys.sort();
    keys
}

fn cache_dir(home: &Home) -> PathBuf {
    home.dir.path().join("cache/boot")
}

#[test]
fn warm_starts_share_one_boot_and_differ_in_identity() {
    if !kvm_available() {
        return;
    }
    let home = Home::with_private_boot_cache();
    let rootfs = busybox_rootfs(home.dir.path(), INIT);

    // The first start of a key boots the kernel and caches the booted guest.
    create(&home, "a", &rootfs, "256");
    let (a, _) = start(&home, "a", &[]);
    assert_eq!(a["boot"], "cold", "{a}");
    let key = boot_key(&home, "a");
    assert_eq!(cache_keys(&home), vec![key.clone()]);

    // In parallel: an equal workspace warm-starts and --cold boots anyway.
    // Another memory size is another key (a miss boots cold, as the
    // damaged entry below shows; each cold boot costs CI over a minute).
    for n in ["b", "c"] {
        create(&home, n, &rootfs, "256");
    }
    create(&home, "d", &rootfs, "320");
    assert_eq!(boot_key(&home, "b"), key, "equal inputs, equal key");
    assert_ne!(boot_key(&home, "d"), key, "memory is part of the key");
    let (b, c) = std::thread::scope(|s| {
        let b = s.spawn(|| start(&home, "b", &[]));
        let c = s.spawn(|| start(&home, "c", &["--cold"]));
        (b.join().unwrap(), c.join().unwrap())
    });
    assert_eq!(b.0["boot"], "warm", "{}", b.1);
    assert_eq!(c.0["boot"], "cold");
    eprintln!(
        "start ms: cold {} warm {} (--cold in parallel: {})",
        a["start_ms"], b.0["start_ms"], c.0["start_ms"]
    );
    let want = vec![key.clone()];
    assert_eq!(cache_keys(&home), want, "--cold caches nothing");

    // Same files and processes, different identity.
    let probe = "cat /run/init-ran; pidof sleep >/dev/null && echo sleeping; md5sum /init /bin/busybox | cut -d' ' -f1";
    let seen_a = sh(&home, "a", probe);
    assert!(seen_a.starts_with("booted\nsleeping\n"), "{seen_a}");
    let ident = "hostname; cat /etc/machine-id; head -c 16 /dev/urandom | od -An -tx1";
    let id_a = sh(&home, "a", ident);
    for n in ["b", "c"] {
        assert_eq!(sh(&home, n, probe), seen_a, "{n} differs from a");
        let id = sh(&home, n, ident);
        let (la, ln): (Vec<&str>, Vec<&str>) = (id_a.lines().collect(), id.lines().collect());
        assert_eq!((la[0], ln[0]), ("a", n), "hostnames");
        assert_eq!(ln[1].len(), 32, "machine-id {:?}", ln[1]);
        assert_ne!(la[1], ln[1], "machine-ids of a and {n}");
        assert_ne!(la[2], ln[2], "random bytes of a and {n}");
    }

    // A damaged entry: detected, removed, replaced by a cold boot.
    let vmstate = cache_dir(&home).join(&key).join("vmstate.bin");
    let mut bytes = std::fs::read(&vmstate).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0x40;
    std::fs::write(&vmstate, bytes).unwrap();
    create(&home, "e", &rootfs, "256");
    let (e, err) = start(&home, "e", &[]);
    assert_eq!(e["boot"], "cold", "{err}");
    assert!(
        err.contains("is unusable") && err.contains("cold-booting workspace e"),
        "{err}"
    );
    assert_eq!(sh(&home, "e", "cat /run/init-ran"), "booted");
    assert_eq!(cache_keys(&home), want, "the entry was cached again");
    create(&home, "f", &rootfs, "256");
    let (f, err) = start(&home, "f", &[]);
    assert_eq!(f["boot"], "warm", "the new entry is sound: {err}");

    // Prune frees the space; the next first start boots cold again.
    let (code, _, err) = home.run(&["cache", "prune"]);
    assert_eq!(code, 2, "prune without --yes and no terminal: {err}");
    let pruned = home.json(&["cache", "prune", "--yes"]);
    assert_eq!(pruned["removed"].as_array().unwrap().len(), 1, "{pruned}");
    assert!(
        pruned["freed_bytes"].as_u64().unwrap() > 10 << 20,
        "{pruned}"
    );
    assert!(cache_keys(&home).is_empty());
    let left: u64 = std::fs::read_dir(cache_dir(&home))
        .unwrap()
        .flatten()
        .filter(|e| e.path().is_dir())
        .count() as u64;
    assert_eq!(left, 0, "nothing but the lock file stays");
    // The running warm-started workspaces do not need the entry any more.
    assert_eq!(sh(&home, "b", "hostname"), "b");
}
