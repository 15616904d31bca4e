//! Volumes with a real database: Redis from Debian's packages in its own
//! workspace, its data on a volume. One workspace and two cold boots
//! carry the whole story (a workspace with volumes never warm-starts):
//! attach and mount (read-write and read-only), a dependency snapshot
//! taken while Redis runs (the guest freezes the filesystem), changes,
//! a volume kept out of a commit, a memory snapshot that brings the
//! volume back with the memory, a fork with its own copy-on-write clone,
//! a container snapshot refused on mismatched volumes, and the revert of
//! the dependency snapshot that Redis then serves.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::oci;
use common::schema::{assert_each, assert_schema};
use common::{kvm_available, sh, Home};
use serde_json::json;

/// Starts Redis on the volume (no background saves: the test saves by
/// hand; DEBUG for `DEBUG RELOAD`, which reads the file back).
fn start_redis(home: &Home, ws: &str) {
    let t = Instant::now();
    sh(
        home,
        ws,
        "redis-server --dir /data --save '' --appendonly no --daemonize yes \
         --protected-mode no --enable-debug-command yes --logfile /data/redis.log",
    );
    assert_eq!(redis(home, ws, &["PING"]), ["PONG"]);
    eprintln!(
        "redis in {ws} answered {:.1} s after the start",
        t.elapsed().as_secs_f64()
    );
}

/// Sends Redis commands over one connection from one bash in the guest
/// (its /dev/tcp: a redis-cli per command would cost seconds each on an
/// emulated guest kernel), retrying the connect for up to 120 s while the
/// server starts. Returns each reply: a status or error line, or a bulk
/// string's value (`nil` when there is none).
fn redis(home: &Home, ws: &str, cmds: &[&str]) -> Vec<String> {
    let mut script = String::from(
        "until exec 3<>/dev/tcp/127.0.0.1/6379; do (( SECONDS > 120 )) && exit 1; done 2>/dev/null\n\
         send() { printf '%s\\r\\n' \"$1\" >&3; IFS= read -r l <&3; l=${l%$'\\r'}; \
           case $l in '$-1') echo nil;; '$'*) IFS= read -r v <&3; echo \"${v%$'\\r'}\";; \
           *) echo \"$l\";; esac; }\n",
    );
    for c in cmds {
        script.push_str(&format!("send '{c}'\n"));
    }
    let (code, out, err) = home.run(&["exec", ws, "--", "bash", "-c", &script]);
    assert_eq!(code, 0, "redis {cmds:?} in {ws}: {err}");
    out.lines()
        .map(|l| l.trim_start_matches('+').to_string())
        .collect()
}

fn err_of(home: &Home, args: &[&str]) -> String {
    let (code, _, err) = home.run(args);
    assert_eq!(code, 1, "{args:?} should fail: {err}");
    err
}

/// The tar entries of the committed layer blob `digest` in the store.
fn layer_entries(home: &Home, digest: &str) -> String {
    let hex = digest.trim_start_matches("sha256:");
    let out = Command::new("find")
        .arg(home.dir.path())
        .args(["-name", hex, "-type", "f"])
        .output()
        .unwrap();
    let path = String::from_utf8_lossy(&out.stdout)
        .lines()
        .next()
        .unwrap_or_else(|| panic!("layer blob {hex} not in the store"))
        .to_string();
    let out = Command::new("tar").arg("tzf").arg(&path).output().unwrap();
    assert!(out.status.success(), "listing {path}");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn redis_image(home: &Home, work: &Path) -> String {
    let debian = oci::script_path("image-debian.sh");
    let tree = oci::script_path("redis-tree.sh");
    let tar = Command::new("tar")
        .arg("-C")
        .arg(&tree)
        .args(["--numeric-owner", "--sort=name", "-cf", "-", "."])
        .output()
        .unwrap();
    assert!(tar.status.success());
    let layout = work.join("redis");
    oci::layout(&layout, Some(&debian), &[tar.stdout], json!({}), "redis");
    let img = home.json(&["image", "import", layout.to_str().unwrap()]);
    img["id"].as_str().unwrap().to_string()
}

#[test]
fn a_redis_volume_through_snapshots_commit_fork_and_revert() {
    if !kvm_available() {
        return;
    }
    let home = Home::new();
    let work = tempfile::tempdir().unwrap();
    let image = redis_image(&home, work.path());

    let v = home.json(&["volume", "create", "redisdata", "--size", "256M"]);
    assert_schema("volume", &v);
    assert_eq!(v["size"], 256 << 20);
    home.ok(&["volume", "create", "spare", "--size", "32M"]);
    let err = err_of(&home, &["volume", "create", "spare"]);
    assert!(err.contains("volume spare already exists"), "{err}");
    // Bad mounts are refused before anything is made.
    let base = ["create", "db", "--image", &image, "--network", "none"];
    let with = |extra: &[&'static str]| [&base[..], extra].concat();
    let err = err_of(&home, &with(&["-v", "nope:/data"]));
    assert!(err.contains("volume nope does not exist"), "{err}");
    let err = err_of(&home, &with(&["-v", "redisdata:data"]));
    assert!(err.contains("must be absolute"), "{err}");
    let err = err_of(&home, &with(&["-v", "redisdata:/a", "-v", "redisdata:/b"]));
    assert!(err.contains("attached twice"), "{err}");
    assert!(!home.workspace_dir("db").exists());

    let ws = home.json(&with(&[
        "--vcpus",
        "2",
        "--memory",
        "256",
        "--auto-snapshot-on-stop",
        "false",
        "-v",
        "redisdata:/data",
        "-v",
        "spare:/spare:ro",
    ]));
    assert_schema("workspace", &ws);
    assert_eq!(
        ws["volumes"],
        json!([{"volume": "redisdata", "path": "/data", "read_only": false},
               {"volume": "spare", "path": "/spare", "read_only": true}])
    );
    let t = Instant::now();
    home.ok(&["start", "db"]);
    eprintln!("cold boot: {:.1} s", t.elapsed().as_secs_f64());
    start_redis(&home, "db");
    // Loopback works without a NIC; the read-only volume refuses writes.
    assert_eq!(redis(&home, "db", &["SET k v1", "SAVE"]), ["OK", "OK"]);
    let mounts = sh(
        &home,
        "db",
        "while read -r d m t o r; do case \"$m\" in /data|/spare) echo \"$m $t ${o%%,*}\";; esac; \
         done < /proc/mounts; true 2>/dev/null > /spare/x || echo spare refuses writes",
    );
    assert_eq!(
        mounts,
        "/data ext4 rw\n/spare ext4 ro\nspare refuses writes"
    );

    // The dependency snapshot, taken while Redis runs.
    let snap = home.json(&["volume", "snapshot", "redisdata", "--tag", "seed"]);
    assert_schema("volume-snapshot", &snap);
    assert_eq!(
        (snap["consistency"].as_str(), snap["workspace"].as_str()),
        (Some("frozen"), Some("db"))
    );
    assert_eq!(
        redis(&home, "db", &["SET k v2", "SAVE", "GET k"]),
        ["OK", "OK", "v2"]
    );
    let err = err_of(&home, &["volume", "rm", "redisdata", "--yes"]);
    assert!(
        err.contains("in use by workspace db (running, at /data)"),
        "{err}"
    );
    let err = err_of(&home, &["volume", "revert", "redisdata", "seed"]);
    assert!(err.contains("halt it before reverting"), "{err}");

    // Volumes are never part of a commit: only the empty mount points.
    let committed = home.json(&["commit", "db", "localhost/db:1"]);
    let entries = layer_entries(&home, committed["new_layer"]["digest"].as_str().unwrap());
    assert!(
        !entries.contains("dump.rdb") && !entries.contains("redis.log"),
        "volume files in the committed layer: {entries}"
    );

    // A memory snapshot holds the volume too: the rollback brings back
    // Redis's memory and its file together.
    home.ok(&["snapshot", "create", "db", "--tag", "m1"]);
    assert_eq!(redis(&home, "db", &["SET k v3", "SAVE"]), ["OK", "OK"]);
    home.ok(&["halt", "db"]);
    home.ok(&["start", "db", "--from-snapshot", "m1"]);
    // Redis's memory, then its file read back from the volume: both v2.
    assert_eq!(
        redis(&home, "db", &["GET k", "DEBUG RELOAD NOSAVE", "GET k"]),
        ["v2", "OK", "v2"]
    );

    // A fork gets a copy-on-write clone of the volume, its own from then on.
    home.ok(&["create", "dbfork", "--from-snapshot", "db:m1"]);
    assert_eq!(
        redis(&home, "dbfork", &["GET k", "SET k fork", "SAVE", "GET k"]),
        ["v2", "OK", "OK", "fork"]
    );
    assert_eq!(
        redis(&home, "db", &["DEBUG RELOAD NOSAVE", "GET k"]),
        ["OK", "v2"]
    );
    let vols = home.json(&["volume", "ls"]);
    assert_each("volume", &vols);
    let clone = vols
        .as_array()
        .unwrap()
        .iter()
        .find(|v| v["name"] == "dbfork-redisdata")
        .unwrap_or_else(|| panic!("no clone in {vols}"));
    assert_eq!(clone["attached"][0]["workspace"], "dbfork");
    home.ok(&["delete", "dbfork", "--force", "--yes"]);
    // They outlive their workspace (the read-only one was cloned too).
    for clone in ["dbfork-redisdata", "dbfork-spare"] {
        home.ok(&["volume", "inspect", clone]);
        home.ok(&["volume", "rm", clone, "--yes"]);
    }

    // A container snapshot: both volumes at one moment; it restores only
    // to the same volume names in the same order, and never under a
    // running guest.
    let c = home.json(&["snapshot", "create", "db", "--volumes", "--tag", "c1"]);
    assert_schema("container-snapshot", &c);
    assert_eq!(c["volumes"], json!(["redisdata", "spare"]));
    assert_eq!(c["consistency"], "frozen");
    assert_each(
        "container-snapshot",
        &home.json(&["snapshot", "list", "db", "--volumes"]),
    );
    home.ok(&[
        "create",
        "other",
        "--image",
        &image,
        "--network",
        "none",
        "-v",
        "spare:/spare",
    ]);
    let err = err_of(
        &home,
        &["snapshot", "restore-volumes", "other", "--from", "db:c1"],
    );
    assert!(
        err.contains("holds volumes [redisdata, spare]; workspace other attaches [spare]"),
        "{err}"
    );
    let err = err_of(
        &home,
        &["snapshot", "restore-volumes", "db", "--from", "c1"],
    );
    assert!(err.contains("halt it before restoring"), "{err}");
    home.ok(&["delete", "other", "--yes"]);

    // The dependency snapshot's revert, and Redis serves the old data.
    home.ok(&["halt", "db"]);
    let reverted = home.json(&["volume", "revert", "redisdata", "seed"]);
    assert_schema("volume", &reverted);
    let t = Instant::now();
    home.ok(&["start", "db"]);
    eprintln!("cold boot: {:.1} s", t.elapsed().as_secs_f64());
    start_redis(&home, "db");
    assert_eq!(redis(&home, "db", &["GET k"]), ["v1"]);

    home.ok(&["delete", "db", "--force", "--yes"]);
    home.ok(&["volume", "rm", "redisdata", "--yes"]);
    home.ok(&["volume", "rm", "spare", "--yes"]);
    assert_eq!(home.json(&["volume", "ls"]), json!([]));
}

/// A 4 KiB block of a 16 MiB volume that its empty ext4 leaves unused.
const FREE_BLOCK: u64 = 15 << 20;

/// Writes `byte` over [`FREE_BLOCK`] of volume `name`'s disk, through its
/// chain as the VMM would, and flushes.
fn write_block(home: &Home, name: &str, byte: u8) {
    let dir = home.dir.path().join("volumes").join(name).join("disk");
    let mut chain = microagent::disk::Chain::open(&dir).unwrap();
    chain.write_at(&[byte; 4096], FREE_BLOCK).unwrap();
    chain.flush().unwrap();
}

fn first_byte(home: &Home, name: &str) -> u8 {
    let dir = home.dir.path().join("volumes").join(name).join("disk");
    let chain = microagent::disk::Chain::open(&dir).unwrap();
    let mut buf = [0u8; 4096];
    chain.read_at(&mut buf, FREE_BLOCK).unwrap();
    assert!(buf.iter().all(|b| *b == buf[0]));
    buf[0]
}

/// What needs no guest: snapshots of a volume no VM runs on, revert,
/// clones, and their bookkeeping; the volume's blocks are written through
/// its chain directly.
#[test]
fn volume_snapshots_revert_and_clone_without_a_guest() {
    let home = Home::new();
    home.ok(&["volume", "create", "data", "--size", "16M"]);
    assert_eq!(first_byte(&home, "data"), 0);
    write_block(&home, "data", 1);
    let s = home.json(&["volume", "snapshot", "data", "--tag", "one"]);
    assert_schema("volume-snapshot", &s);
    assert_eq!(s["consistency"], "detached");
    assert_eq!(s["workspace"], serde_json::Value::Null);
    let err = err_of(&home, &["volume", "snapshot", "data", "--tag", "one"]);
    assert!(
        err.contains("volume snapshot data:one already exists"),
        "{err}"
    );
    write_block(&home, "data", 2);
    let clone = home.json(&["volume", "create", "copy", "--from-snapshot", "data:one"]);
    assert_eq!(clone["from_snapshot"], "data:one");
    assert_eq!(first_byte(&home, "copy"), 1);
    write_block(&home, "copy", 3);
    assert_eq!(first_byte(&home, "data"), 2);
    home.ok(&["volume", "revert", "data", "one"]);
    assert_eq!(first_byte(&home, "data"), 1);
    assert_eq!(first_byte(&home, "copy"), 3);
    // The snapshot can go; the clone keeps its own links to the blocks.
    let rm = home.json(&["volume", "rm-snapshot", "data", "one"]);
    assert_schema("volume-snapshot-rm", &rm);
    assert_eq!(first_byte(&home, "copy"), 3);
    let err = err_of(&home, &["volume", "revert", "data", "one"]);
    assert!(
        err.contains("volume snapshot data:one does not exist"),
        "{err}"
    );
    for bad in [
        &["volume", "create", "Bad"][..],
        &["volume", "create", "x", "--size", "1M"],
        &["volume", "create", "y", "--from-snapshot", "data"],
        &["volume", "snapshot", "data", "--tag", "-x"],
    ] {
        let (code, _, err) = home.run(bad);
        assert_ne!(code, 0, "{bad:?}: {err}");
    }
    let (code, _, err) = home.run(&["volume", "rm", "data"]);
    assert_eq!(code, 2, "no terminal, no --yes: {err}");
    let rm = home.json(&["volume", "rm", "data", "--yes"]);
    assert_schema("volume-rm", &rm);
    assert_eq!(first_byte(&home, "copy"), 3);
    let left = home.json(&["volume", "ls"]);
    assert_each("volume", &left);
    assert_eq!(left.as_array().unwrap().len(), 1);
}
