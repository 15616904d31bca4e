//! Base, home and personal snapshots and workspace definitions, with real
//! guests. One busybox workspace (a warm start) is the source of all
//! three snapshots; one definition file then makes a workspace over them
//! whose setup runs in a checkpoint (the one cold boot: a new layer set)
//! and is forked. That workspace shows the order (the same paths in base,
//! home and personal), the excludes (one inside an included folder), the
//! default personal snapshot applied, the definition's env, secret and
//! setup. A second host user (uid 65534) reads the same state directory
//! and cannot see or use the personal snapshot. Applying again is a no-op;
//! a changed definition and three malformed ones are refused with their
//! lines.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::schema::assert_schema;
use common::*;

fn busybox_image(home: &Home) -> String {
    let layout = oci::script_path("image-busybox.sh");
    let reference = "localhost/busybox:latest";
    home.ok(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--tag",
        reference,
    ]);
    reference.to_string()
}

fn fails(home: &Home, args: &[&str]) -> String {
    let (code, _, err) = home.run(args);
    assert_ne!(code, 0, "{args:?} should fail");
    err
}

/// `microagent ARGS` as another host user (nobody), on the same state.
fn as_other_user(home: &Home, args: &[&str]) -> (i32, String, String) {
    let out = Command::new("setpriv")
        .args([
            "--reuid",
            "65534",
            "--regid",
            "65534",
            "--clear-groups",
            "--",
        ])
        .arg(env!("CARGO_BIN_EXE_microagent"))
        .args(args)
        .env("MICROAGENT_HOME", home.dir.path())
        .output()
        .expect("running setpriv");
    let (o, e) = text(&out);
    (out.status.code().unwrap_or(-1), o, e)
}

fn names_of(list: &serde_json::Value) -> Vec<(String, String)> {
    list.as_array()
        .unwrap()
        .iter()
        .map(|r| {
            (
                r["kind"].as_str().unwrap().to_string(),
                r["name"].as_str().unwrap().to_string(),
            )
        })
        .collect()
}

fn definition(dir: &Path, token: &Path, memory: u32) -> std::path::PathBuf {
    let path = dir.join("workspaces.yaml");
    let yaml = format!(
        "# the app needs the side workspace up first
workspaces:
- name: dev
  base_snapshot: devbase
  home_snapshot: dots
  memory: {memory}
  env:
    MODE: ci
  secrets:
    TOKEN: {{file: {}}}
  setup:
  - echo built > /root/setup.txt
  - echo \"$MODE\" >> /root/setup.txt
  dependencies: [side]
- name: side
  base_snapshot: oci://localhost/busybox:latest
  personal: false
  memory: 256
",
        token.display()
    );
    std::fs::write(&path, yaml).unwrap();
    path
}

#[test]
fn home_and_personal_snapshots_and_definitions() {
    if !kvm_available() {
        return;
    }
    let home = Home::new();
    let image = busybox_image(&home);
    let work = tempfile::tempdir().unwrap();
    // The second user reads the state directory (not the workspaces).
    std::fs::set_permissions(
        home.dir.path(),
        std::os::unix::fs::PermissionsExt::from_mode(0o755),
    )
    .unwrap();

    home.ok(&["create", "src", "--image", &image, "--memory", "256"]);
    home.ok(&["start", "src"]);
    sh(
        &home,
        "src",
        "cd /root && for f in f1 f2 f3; do echo base > $f; done",
    );
    let base = home.json(&["snapshot", "create", "src", "--base", "devbase"]);
    assert_schema("named-snapshot", &base);
    assert_eq!(base["kind"], "base");

    // The home snapshot: an exclude inside an included folder, a listed
    // path the guest does not have.
    sh(
        &home,
        "src",
        "cd /root && echo home > f2 && echo home > f3 && mkdir -p proj/sub .snapshot .snapshot.personal \
         && echo keep > proj/a && echo secret > proj/sub/key \
         && printf 'f2\\n# a comment\\n./f3\\nproj\\nnot-here\\n' > .snapshot/includes.txt \
         && echo proj/sub > .snapshot/excludes.txt \
         && printf 'f3\\n../../etc/shadow\\n' > .snapshot.personal/includes.txt",
    );
    let made = home.json(&["snapshot", "create", "src", "--home", "dots"]);
    assert_schema("home-snapshot", &made);
    assert_eq!(made["home"], "/root");
    assert_eq!(made["missing"], serde_json::json!(["/root/not-here"]));
    // root/, f2, f3, proj/, proj/a.
    assert_eq!(made["entries"], 5, "{made}");
    let err = fails(&home, &["snapshot", "create", "src", "--home", "devbase"]);
    assert!(
        err.contains("snapshot name devbase is taken by the base snapshot"),
        "{err}"
    );

    // A personal list line that leaves the home is refused, naming it.
    let err = fails(&home, &["snapshot", "create", "src", "--personal", "mine"]);
    assert!(
        err.contains(
            "/root/.snapshot.personal/includes.txt line 2: \"../../etc/shadow\" escapes /root"
        ),
        "{err}"
    );
    sh(
        &home,
        "src",
        "cd /root && echo f3 > .snapshot.personal/includes.txt && echo personal > f3",
    );
    let mine = home.json(&[
        "snapshot",
        "create",
        "src",
        "--personal",
        "mine",
        "--set-personal-default",
    ]);
    assert_eq!(
        (mine["kind"].as_str(), mine["default"].as_bool()),
        (Some("personal"), Some(true))
    );

    let list = home.json(&["snapshot", "list"]);
    common::schema::assert_each("snapshot-catalog-row", &list);
    assert_eq!(
        names_of(&list),
        [("base", "devbase"), ("home", "dots"), ("personal", "mine")]
            .map(|(k, n)| (k.to_string(), n.to_string()))
    );
    assert_eq!(list[2]["default"], true);

    // Another host user sees the shared names, not the personal one, and
    // cannot use or remove it.
    let (code, out, err) = as_other_user(&home, &["snapshot", "list", "--json"]);
    assert_eq!(code, 0, "{err}");
    let theirs: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        names_of(&theirs),
        [("base", "devbase"), ("home", "dots")].map(|(k, n)| (k.to_string(), n.to_string()))
    );
    for args in [
        &["snapshot", "default", "mine"][..],
        &["snapshot", "delete", "mine", "--personal", "--yes"],
    ] {
        let (code, _, err) = as_other_user(&home, args);
        assert_ne!(code, 0, "{args:?}");
        assert!(
            err.contains("personal snapshot mine does not exist"),
            "{err}"
        );
    }

    // The definition: dev over devbase + dots + (default) mine, its setup
    // run once in a checkpoint; side first.
    let token = work.path().join("token");
    std::fs::write(&token, "tok-123").unwrap();
    let file = definition(work.path(), &token, 256);
    let file_s = file.to_str().unwrap();
    let t = Instant::now();
    let applied = home.json(&["apply", "-f", file_s]);
    eprintln!("first apply: {:.1} s", t.elapsed().as_secs_f64());
    assert_schema("apply", &applied);
    let names: Vec<&str> = applied["workspaces"]
        .as_array()
        .unwrap()
        .iter()
        .map(|w| w["name"].as_str().unwrap())
        .collect();
    assert_eq!(names, ["side", "dev"]);
    assert_eq!(applied["workspaces"][1]["setup_cached"], false);
    let probe = "cd /root; for f in f1 f2 f3 proj/a proj/sub/key not-here setup.txt; do \
                 echo \"$f=$(cat $f 2>/dev/null | tr '\\n' ' ')\"; done; echo \"MODE=$MODE\"; \
                 cat /run/secrets/TOKEN";
    assert_eq!(
        sh(&home, "dev", probe),
        "f1=base \nf2=home \nf3=personal \nproj/a=keep \nproj/sub/key=\nnot-here=\n\
         setup.txt=built ci \nMODE=ci\ntok-123"
    );
    let dev = home.json(&["status", "dev"]);
    assert_schema("workspace-status", &dev);
    assert_eq!(
        dev["image"],
        "localhost/snapshot/devbase:latest + home:dots + personal:mine"
    );
    let side = home.json(&["status", "side"]);
    assert_eq!(side["image"], "localhost/busybox:latest");

    // Again: nothing to do. Changed: refused, naming the field.
    let again = home.json(&["apply", "-f", file_s]);
    for w in again["workspaces"].as_array().unwrap() {
        assert_eq!(
            (w["action"].as_str(), w["started"].as_bool()),
            (Some("unchanged"), Some(false))
        );
    }
    let changed = definition(work.path(), &token, 384);
    let err = fails(&home, &["apply", "-f", changed.to_str().unwrap()]);
    assert!(
        err.contains("workspace dev differs from its definition in: memory"),
        "{err}"
    );
    let err = fails(&home, &["create", "-f", file_s]);
    assert!(err.contains("workspace side already exists"), "{err}");

    // Malformed definitions: the file, the line, the field.
    for (yaml, want) in [
        (
            "workspaces:\n- name: a\n  base_snapshot: devbase\n  cpus: 2\n",
            ":4: workspaces[0]: unknown field `cpus`",
        ),
        (
            "workspaces:\n- name: a\n  base_snapshot: devbase\n  volumes:\n  - data:/data\n  - cache:tmp\n",
            ":6: workspaces[0].volumes[1]: volume \"cache:tmp\"",
        ),
        (
            "workspaces:\n- name: a\n  base_snapshot: devbase\n  dependencies: [b]\n- name: b\n  base_snapshot: Dev\n",
            ":6: workspaces[1].base_snapshot: \"Dev\" is neither a snapshot name",
        ),
    ] {
        let bad = work.path().join("bad.yaml");
        std::fs::write(&bad, yaml).unwrap();
        let err = fails(&home, &["apply", "-f", bad.to_str().unwrap()]);
        assert!(err.contains(&format!("{}{want}", bad.display())), "{want}: {err}");
    }
    assert!(!home.workspace_dir("a").exists());

    // A named snapshot removed: its workspaces keep running.
    home.ok(&["snapshot", "delete", "dots", "--yes"]);
    let list = home.json(&["snapshot", "list"]);
    assert!(!names_of(&list).iter().any(|(_, n)| n == "dots"));
    assert_eq!(sh(&home, "dev", "cat /root/f2"), "home");
}
