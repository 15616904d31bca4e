//! `checkpoint` with real guests, through the worked example
//! (scripts/examples/ci-checkpoint.sh): a miss that runs the setup, then
//! three parallel jobs that hit and fork. Then what the example does not
//! show: changed inputs miss and prune beyond --keep, a failing setup keeps
//! nothing and passes its status through, and the `--json` of every
//! command that needs a running guest matches docs/json.md.

mod common;

use common::schema::{assert_each, assert_schema};
use common::*;
use std::process::Command;

fn busybox_image(home: &Home) -> String {
    let layout = oci::script_path("image-busybox.sh");
    let layout = layout.to_str().unwrap();
    let reference = "localhost/busybox:latest";
    let v = home.json(&["image", "import", layout, "--tag", reference]);
    assert_schema("image-fetch", &v);
    reference.to_string()
}

fn example(home: &Home, image: &str) -> (i32, String, String) {
    let out = Command::new("bash")
        .arg(repo_root().join("scripts/examples/ci-checkpoint.sh"))
        .arg(image)
        .env("MICROAGENT", env!("CARGO_BIN_EXE_microagent"))
        .env("MICROAGENT_HOME", home.dir.path())
        .env("MICROAGENT_BOOT_CACHE", shared_dir("boot-cache"))
        .env("MICROAGENT_KERNEL", vmlinux())
        .output()
        .unwrap();
    let (o, e) = text(&out);
    (out.status.code().unwrap_or(-1), o, e)
}

/// The setup the direct calls below checkpoint.
const SETUP: &str = "cat deps.lock > /root/deps && echo set-up";

/// `checkpoint ci …` as the example calls it, with `deps` as deps.lock and
/// `setup` run by `sh -c`.
fn checkpoint(
    home: &Home,
    dir: &std::path::Path,
    deps: &str,
    setup: &str,
    extra: &[&str],
) -> (i32, String, String) {
    let lock = dir.join("deps.lock");
    std::fs::write(&lock, deps).unwrap();
    let mut args = vec![
        "checkpoint",
        "ci",
        "--image",
        "localhost/busybox:latest",
        "--memory",
        "256",
        "--keep",
        "2",
        "--file",
        lock.to_str().unwrap(),
    ];
    args.extend_from_slice(extra);
    args.extend(["--", "sh", "-c", setup]);
    home.run(&args)
}

#[test]
fn checkpoint_miss_hit_forks_prune_and_json() {
    if !kvm_available() {
        return;
    }
    let home = Home::new();
    let image = busybox_image(&home);

    // The worked example: one miss, three hits that fork, jobs pass.
    let (code, out, err) = example(&home, &image);
    assert_eq!(code, 0, "example failed:\n{out}\n{err}");
    assert_eq!(out.matches("cache miss").count(), 1, "{out}");
    for i in 1..=3 {
        assert!(out.contains(&format!("job {i}: exit 0")), "{out}");
    }
    let holders = home.json(&["list", "--prefix", "ci-"]);
    let holders: Vec<&str> = holders
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(holders.len(), 1, "only the checkpoint stays: {holders:?}");
    assert!(holders[0].starts_with("ci-") && holders[0].len() == 15);
    // The second run of the example hits from the start.
    let (code, out, err) = example(&home, &image);
    assert_eq!(code, 0, "second run failed:\n{out}\n{err}");
    assert!(!out.contains("cache miss"), "{out}");
    assert!(out.contains("cache hit"), "{out}");

    // Changed inputs miss; with --keep 2, the third checkpoint of `ci`
    // prunes the oldest. Each holder is halted, its snapshot kept.
    let dir = tempfile::tempdir().unwrap();
    let (code, out, err) = checkpoint(&home, dir.path(), "dep-a 1.1\n", SETUP, &["--json"]);
    assert_eq!(code, 0, "{err}");
    let second: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_schema("checkpoint", &second);
    assert_eq!(second["cache"], "miss");
    assert!(second["setup_ms"].as_u64().is_some());
    assert_eq!(second["pruned"].as_array().unwrap().len(), 0);
    assert_eq!(
        home.json(&["status", second["workspace"].as_str().unwrap()])["status"],
        "halted"
    );
    let (code, out, err) = checkpoint(&home, dir.path(), "dep-a 1.2\n", SETUP, &["--json"]);
    assert_eq!(code, 0, "{err}");
    let third: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(third["pruned"], serde_json::json!([holders[0]]), "{third}");
    assert!(!home.workspace_dir(holders[0]).exists());

    // A hit forks; the fork sees what the setup left.
    let (code, out, err) = checkpoint(
        &home,
        dir.path(),
        "dep-a 1.1\n",
        SETUP,
        &["--json", "--fork", "job"],
    );
    assert_eq!(code, 0, "{err}");
    let hit: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_schema("checkpoint", &hit);
    assert_eq!(hit["cache"], "hit");
    assert_eq!(hit["key"], second["key"], "same inputs, same key");
    assert_eq!(hit["setup_ms"], serde_json::Value::Null);
    assert_eq!(hit["fork"], "job");
    assert_eq!(sh(&home, "job", "cat /root/deps"), "dep-a 1.1");

    // A failing setup passes its status through and keeps nothing.
    let before = home.json(&["list"]).as_array().unwrap().len();
    let (code, out, err) = checkpoint(
        &home,
        dir.path(),
        "dep-a 1.1\n",
        "echo failing >&2; exit 7",
        &["--json"],
    );
    assert_eq!(code, 7, "{err}");
    assert!(
        err.contains("exited with status 7; nothing was kept"),
        "{err}"
    );
    let failed: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_schema("error", &failed);
    assert_eq!(failed["error"]["code"], "setup_failed", "{failed}");
    assert_eq!(failed["error"]["setup_exit"], 7);
    assert_eq!(home.json(&["list"]).as_array().unwrap().len(), before);

    // --json of the commands that need a running guest.
    assert_each("workspace", &home.json(&["list", "--status", "running"]));
    assert_schema("workspace-status", &home.json(&["status", "job"]));
    assert_schema("workspace", &home.json(&["pause", "job"]));
    assert_schema("workspace", &home.json(&["resume", "job"]));
    let snap = home.json(&["snapshot", "create", "job", "--tag", "t1"]);
    assert_schema("snapshot-create", &snap);
    assert_each("snapshot-entry", &home.json(&["snapshot", "list", "job"]));
    assert_eq!(
        home.json(&["snapshot", "list", "job", "--prefix", "zz"]),
        serde_json::json!([]),
        "filtered out"
    );
    let lock = dir.path().join("deps.lock");
    let cp = home.json(&["cp", lock.to_str().unwrap(), "job:/tmp"]);
    assert_schema("cp", &cp);
    assert_eq!(sh(&home, "job", "cat /tmp/deps.lock"), "dep-a 1.1");
    assert_schema("workspace-halt", &home.json(&["halt", "job"]));
    let started = home.json(&["start", "job", "--from-snapshot", "t1"]);
    assert_schema("workspace-start", &started);
    assert_eq!(started["boot"], "snapshot");
    assert_schema(
        "workspace",
        &home.json(&["create", "job2", "--from-snapshot", "job:t1"]),
    );
    assert_schema(
        "snapshot-delete",
        &home.json(&["snapshot", "delete", "job", "t1", "--yes"]),
    );
    assert_schema(
        "delete",
        &home.json(&["delete", "job2", "--yes", "--force"]),
    );
    assert_each("cache-entry", &home.json(&["cache", "ls"]));
}
