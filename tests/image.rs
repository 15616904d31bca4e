//! OCI images end to end: a real local registry with htpasswd auth, imports
//! from layout / oci-archive / docker-archive, hostile layers and blobs, and
//! one boot of a Debian minbase image with whiteout and opaque layers on top.

mod common;

use std::path::Path;
use std::process::Command;
use std::time::Instant;

use common::oci::{self, tar_bytes, Registry};
use common::schema::{assert_each, assert_schema};
use common::{kvm_available, vmlinux, Home};
use serde_json::json;
use tar::EntryType::{Directory as D, Regular as F, Symlink as S};

fn image_dirs(home: &Home) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(home.dir.path().join("images"))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n.len() == 64)
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

/// The sorted names in a directory of the home (none if it is missing).
fn names_in(home: &Home, dir: &str) -> Vec<String> {
    let mut v: Vec<String> = std::fs::read_dir(home.dir.path().join(dir))
        .map(|rd| {
            rd.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    v.sort();
    v
}

fn blobs(home: &Home) -> Vec<String> {
    names_in(home, "images/blobs/sha256")
}

fn tmp_is_empty(home: &Home) -> bool {
    std::fs::read_dir(home.dir.path().join("images/tmp"))
        .map(|mut rd| rd.next().is_none())
        .unwrap_or(true)
}

/// A home whose HOME has no docker config, unless a test writes one.
fn isolated(home: &Home, args: &[&str], docker_config: Option<&Path>) -> (i32, String, String) {
    let mut c = home.cmd();
    c.env("HOME", home.dir.path())
        .env_remove("MICROAGENT_REGISTRY_CREDS");
    match docker_config {
        Some(d) => c.env("DOCKER_CONFIG", d),
        None => c.env_remove("DOCKER_CONFIG"),
    };
    let out = c.args(args).output().unwrap();
    let (o, e) = common::text(&out);
    (out.status.code().unwrap_or(-1), o, e)
}

#[test]
fn registry_pull_with_auth_and_image_store() {
    let home = Home::new();
    let busybox = oci::script_path("image-busybox.sh");
    let registry = Registry::start();
    let reference = registry.push(&busybox, "latest", "test/busybox:1");

    // No credentials, then wrong ones: clear errors, nothing stored.
    let (code, _, err) = isolated(&home, &["image", "pull", &reference], None);
    assert_eq!(code, 1, "{err}");
    assert!(
        err.contains("authentication failed") && err.contains(&registry.addr),
        "{err}"
    );
    let (code, _, err) = isolated(
        &home,
        &["image", "pull", &reference, "--creds", "tester:wrong"],
        None,
    );
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("authentication failed"), "{err}");
    assert!(image_dirs(&home).is_empty() && blobs(&home).is_empty());

    // With --creds: pulled, verified, built.
    let creds = registry.creds();
    let (code, out, err) = isolated(
        &home,
        &["image", "pull", &reference, "--creds", &creds, "--json"],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(v["cached"], false);
    assert_eq!(v["refs"], json!([reference]));
    assert_eq!(v["config"]["cmd"], json!(["/bin/sh"]));
    let digest = v["digest"].as_str().unwrap().to_string();
    let dir = home.dir.path().join("images");
    assert!(dir
        .join(digest.trim_start_matches("sha256:"))
        .join("image.json")
        .is_file());
    assert_eq!(layer_disks(&home).len(), 1);
    // Progress went to stderr as JSON lines, one per blob.
    assert!(err.contains(r#""event":"blob""#), "{err}");

    // Credentials from a Docker config.json; the built disk is reused.
    let cfg_dir = home.dir.path().join("docker");
    std::fs::create_dir_all(&cfg_dir).unwrap();
    let auth = base64_encode(&creds);
    std::fs::write(
        cfg_dir.join("config.json"),
        format!(r#"{{"auths":{{"{}":{{"auth":"{auth}"}}}}}}"#, registry.addr),
    )
    .unwrap();
    let (code, out, err) = isolated(
        &home,
        &["image", "pull", &reference, "--json"],
        Some(&cfg_dir),
    );
    assert_eq!(code, 0, "{err}");
    let v: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(
        (v["cached"].clone(), v["digest"].as_str()),
        (json!(true), Some(digest.as_str()))
    );

    // ls, then rm removes the image and its blobs.
    let ls = home.json(&["image", "ls"]);
    assert_eq!(ls.as_array().unwrap().len(), 1);
    assert_eq!(ls[0]["refs"], json!([reference]));
    home.ok(&["image", "rm", &reference]);
    assert!(image_dirs(&home).is_empty() && layer_disks(&home).is_empty());
    assert!(blobs(&home).is_empty(), "{:?}", blobs(&home));
    let (code, _, err) = home.run(&["image", "rm", &reference]);
    assert_eq!(code, 1);
    assert!(err.contains("no image"), "{err}");
}

fn base64_encode(s: &str) -> String {
    let out = Command::new("base64")
        .arg("-w0")
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    use std::io::Write;
    out.stdin.as_ref().unwrap().write_all(s.as_bytes()).unwrap();
    let o = out.wait_with_output().unwrap();
    String::from_utf8(o.stdout).unwrap()
}

#[test]
fn import_layout_oci_archive_and_docker_archive() {
    let home = Home::new();
    let busybox = oci::script_path("image-busybox.sh");
    let work = tempfile::tempdir().unwrap();

    let v = home.json(&[
        "image",
        "import",
        busybox.to_str().unwrap(),
        "--tag",
        "localhost/bb:layout",
    ]);
    assert_eq!(
        (v["source"].as_str(), v["cached"].as_bool()),
        (Some("oci-layout"), Some(false))
    );
    let layout_digest = v["digest"].clone();

    // oci-archive: the same layout as a tarball -> the same image.
    let archive = work.path().join("bb-oci.tar");
    let st = Command::new("tar")
        .arg("-C")
        .arg(&busybox)
        .arg("-cf")
        .arg(&archive)
        .arg(".")
        .status()
        .unwrap();
    assert!(st.success());
    let v = home.json(&[
        "image",
        "import",
        archive.to_str().unwrap(),
        "--tag",
        "localhost/bb:archive",
    ]);
    assert_eq!(v["digest"], layout_digest);
    assert_eq!(v["cached"], true);
    assert_eq!(
        v["refs"],
        json!(["localhost/bb:layout", "localhost/bb:archive"])
    );

    // docker-archive, written by skopeo like `docker save` would; its own
    // RepoTags name the image.
    let docker = work.path().join("bb-docker.tar");
    let out = Command::new("skopeo")
        .args(["copy", "--quiet"])
        .arg(format!("oci:{}:latest", busybox.display()))
        .arg(format!(
            "docker-archive:{}:localhost/bb:docker",
            docker.display()
        ))
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let v = home.json(&["image", "import", docker.to_str().unwrap()]);
    assert_eq!(v["source"], "docker-archive");
    assert_eq!(v["refs"], json!(["localhost/bb:docker"]));
    assert_eq!(v["config"]["cmd"], json!(["/bin/sh"]));

    // Something that is none of these: a clear error.
    let junk = work.path().join("junk.tar");
    std::fs::write(&junk, tar_bytes(&[("hello", F, "x")])).unwrap();
    let (code, _, err) = home.run(&["image", "import", junk.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("neither an oci-archive"), "{err}");
    assert!(tmp_is_empty(&home));
}

#[test]
fn hostile_layers_and_blobs_are_refused_and_leave_nothing() {
    let home = Home::new();
    let work = tempfile::tempdir().unwrap();
    let outside = work.path().join("outside");
    std::fs::create_dir(&outside).unwrap();

    // `..` in a name.
    let dotdot = work.path().join("dotdot");
    let evil = format!("../../../../../../..{}/escaped", outside.display());
    oci::layout(
        &dotdot,
        None,
        &[tar_bytes(&[("etc/", D, ""), (&evil, F, "x")])],
        json!({}),
        "latest",
    );
    let (code, _, err) = home.run(&["image", "import", dotdot.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains(&evil) && err.contains(".."), "{err}");

    // A symlink pointing out, then a file written through it.
    let link = work.path().join("symlink");
    let target = outside.display().to_string();
    oci::layout(
        &link,
        None,
        &[tar_bytes(&[("evil", S, &target), ("evil/pwned", F, "x")])],
        json!({}),
        "latest",
    );
    let (code, _, err) = home.run(&["image", "import", link.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("evil/pwned") && err.contains("symlink"),
        "{err}"
    );
    assert!(
        std::fs::read_dir(&outside).unwrap().next().is_none(),
        "something escaped"
    );

    // A blob whose content does not match its digest.
    let busybox = oci::script_path("image-busybox.sh");
    let tampered = work.path().join("tampered");
    let st = Command::new("cp")
        .arg("-a")
        .arg(&busybox)
        .arg(&tampered)
        .status()
        .unwrap();
    assert!(st.success());
    let layer = oci::first_layer(&tampered);
    let mut bytes = std::fs::read(&layer).unwrap();
    let mid = bytes.len() / 2;
    bytes[mid] ^= 0xff;
    std::fs::write(&layer, bytes).unwrap();
    let (code, _, err) = home.run(&["image", "import", tampered.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(
        err.contains("not the digest it was announced with"),
        "{err}"
    );

    // Nothing of any of them is in the store.
    assert!(image_dirs(&home).is_empty());
    let layer_hex = layer.file_name().unwrap().to_string_lossy().into_owned();
    assert!(!blobs(&home).contains(&layer_hex));
    assert!(tmp_is_empty(&home));
    assert_eq!(home.json(&["image", "ls"]), json!([]));
}

/// A .deb with no dependencies, built on the host with dpkg-deb.
fn probe_deb(dir: &Path) -> std::path::PathBuf {
    let root = dir.join("probe");
    std::fs::create_dir_all(root.join("DEBIAN")).unwrap();
    std::fs::create_dir_all(root.join("usr/share/microagent-probe")).unwrap();
    std::fs::write(
        root.join("DEBIAN/control"),
        "Package: microagent-probe\nVersion: 1.0\nArchitecture: all\nMaintainer: microagent tests <t@localhost>\nDescription: probe package\n",
    )
    .unwrap();
    std::fs::write(root.join("usr/share/microagent-probe/hello"), "installed\n").unwrap();
    let deb = dir.join("microagent-probe.deb");
    let st = Command::new("dpkg-deb")
        .args(["--build", "--root-owner-group"])
        .arg(&root)
        .arg(&deb)
        .output()
        .unwrap();
    assert!(
        st.status.success(),
        "{}",
        String::from_utf8_lossy(&st.stderr)
    );
    deb
}

/// The image's layers in the store: their layer disks' file names.
fn layer_disks(home: &Home) -> Vec<String> {
    names_in(home, "images/layers")
}

/// One boot of a Debian minbase image (debootstrap) pulled from the
/// registry with nine layers on top (ten in all: over the cap of eight, so
/// the lowest three share one merged disk): whiteouts inside the merged
/// disk and across disks, an opaque directory, hard links; then changes in
/// the upper, a package installed with dpkg, and snapshot, fork, rollback
/// and `image rm` against what they use.
#[test]
fn debian_image_from_registry_boots_with_overlay_semantics() {
    if !kvm_available() {
        return;
    }
    let home = Home::new();
    let debian = oci::script_path("image-debian.sh");
    let work = tempfile::tempdir().unwrap();
    let derived = work.path().join("derived");
    let names: Vec<String> = (1..=7).map(|i| format!("opt/layers/{i}")).collect();
    let mut fillers: Vec<Vec<u8>> = Vec::new();
    for (i, name) in names.iter().enumerate() {
        let mut entries = vec![
            ("opt/", D, ""),
            ("opt/layers/", D, ""),
            (name.as_str(), F, "x"),
        ];
        match i + 1 {
            // Made by layer 1, removed by layer 2: both in the merged disk.
            1 => entries.extend([("opt/merged_gone", F, "x"), ("opt/cross_gone", F, "x")]),
            2 => entries.push(("opt/.wh.merged_gone", F, "")),
            // Removed by layer 5 (its own disk) from the merged disk.
            5 => entries.push(("opt/.wh.cross_gone", F, "")),
            _ => {}
        }
        fillers.push(tar_bytes(&entries));
    }
    let lower = tar_bytes(&[
        ("opt/", D, ""),
        ("opt/gone", F, "deleted by the next layer"),
        ("opt/stay", F, "kept"),
        ("opt/opaque/", D, ""),
        ("opt/opaque/lower", F, "hidden by the opaque marker"),
        ("opt/hl/", D, ""),
        ("opt/hl/a", F, "linked"),
        ("opt/hl/b", tar::EntryType::Link, "opt/hl/a"),
    ]);
    let upper = tar_bytes(&[
        ("opt/.wh.gone", F, ""),
        ("opt/opaque/.wh..wh..opq", F, ""),
        ("opt/opaque/upper", F, "visible"),
    ]);
    fillers.extend([lower, upper]);
    oci::layout(
        &derived,
        Some(&debian),
        &fillers,
        json!({"Env": ["PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin", "IMAGE_GREETING=hello from the image"],
               "WorkingDir": "/opt",
               "Entrypoint": ["/bin/sh", "-c"],
               "Cmd": ["echo \"$IMAGE_GREETING in $(pwd)\" > /run/entrypoint.out; exec sleep 100000"]}),
        "12",
    );
    let registry = Registry::start();
    let reference = registry.push(&derived, "12", "test/debian:12");
    let kernel = vmlinux();

    let start = Instant::now();
    let (code, _, err) = isolated(
        &home,
        &[
            "create",
            "deb",
            "--image",
            &reference,
            "--creds",
            &registry.creds(),
            "--run-entrypoint",
            "--kernel",
            kernel.to_str().unwrap(),
            "--memory",
            "256",
            // The snapshots this test rolls back to and counts as users
            // of the image are the ones it makes by hand.
            "--auto-snapshot-on-stop",
            "false",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let first = start.elapsed();
    assert!(
        err.contains("building layer disk 1/8: layers 1-3 merged")
            && err.contains("building layer disk 8/8"),
        "{err}"
    );
    assert_eq!(layer_disks(&home).len(), 8);

    // A second workspace of the same image reuses the built layer disks.
    let disk = home
        .dir
        .path()
        .join("images/layers")
        .join(&layer_disks(&home)[0]);
    let before = std::fs::metadata(&disk).unwrap().modified().unwrap();
    let start = Instant::now();
    let (code, _, err) = isolated(
        &home,
        &[
            "create",
            "deb2",
            "--image",
            &reference,
            "--kernel",
            kernel.to_str().unwrap(),
        ],
        None,
    );
    assert_eq!(code, 0, "{err}");
    let second = start.elapsed();
    assert!(
        !err.contains("pulling") && !err.contains("building"),
        "{err}"
    );
    assert_eq!(
        std::fs::metadata(&disk).unwrap().modified().unwrap(),
        before
    );
    eprintln!("create --image: first (pull+unpack+mkfs) {first:?}, cached {second:?}");
    home.ok(&["delete", "deb2", "--yes"]);

    home.ok(&["start", "deb"]);
    let exec = |script: &str| {
        let (code, out, err) = home.run(&["exec", "deb", "--", "sh", "-c", script]);
        assert_eq!(code, 0, "{script}: {out} {err}");
        out
    };
    let out = exec("cat /etc/os-release");
    assert!(out.contains("Debian GNU/Linux 12"), "{out}");
    // Whiteouts (inside the merged disk, across disks), an opaque
    // directory and hard links, as the guest sees them.
    assert_eq!(
        exec("ls /opt; ls /opt/opaque; ls /opt/layers | tr '\\n' ' '"),
        "hl\nlayers\nopaque\nstay\nupper\n1 2 3 4 5 6 7 "
    );
    assert_eq!(
        exec("[ $(stat -c %i /opt/hl/a) = $(stat -c %i /opt/hl/b) ] && cat /opt/hl/b"),
        "linked"
    );
    // Changes land in the upper: a lower file deleted, a directory renamed,
    // a lower file modified (its copy-up parts it from its old hard link).
    assert_eq!(
        exec(
            "rm /opt/stay && mv /opt/opaque /opt/renamed && echo changed > /opt/hl/a && \
              ls /opt; ls /opt/renamed; cat /opt/hl/a /opt/hl/b"
        ),
        "hl\nlayers\nrenamed\nupper\nchanged\nlinked"
    );
    // The image's Env and WorkingDir are exec's defaults.
    assert_eq!(
        exec("echo $IMAGE_GREETING; pwd"),
        "hello from the image\n/opt\n"
    );
    // The agent started the image's Entrypoint + Cmd with its Env and WorkingDir.
    assert_eq!(
        exec("for i in $(seq 60); do [ -s /run/entrypoint.out ] && break; sleep 1; done; cat /run/entrypoint.out"),
        "hello from the image in /opt\n"
    );
    // glibc and the image's package manager work: install a package,
    // snapshot, fork (the fork has it), remove it, roll back (it is back).
    // dpkg itself, not apt-get: apt's cache builds took 383 s to install
    // and 229 s to remove on PVM, for nothing this test checks.
    let deb = probe_deb(work.path());
    home.ok(&["cp", deb.to_str().unwrap(), "deb:/root"]);
    let out = exec("dpkg -i /root/microagent-probe.deb 2>&1 && sync && echo INSTALLED");
    assert!(out.contains("INSTALLED"), "{out}");
    let probe = "dpkg-query -W -f='${Status}' microagent-probe 2>&1; echo; cat /usr/share/microagent-probe/hello 2>&1";
    let installed = "install ok installed\ninstalled\n";
    assert_eq!(exec(probe), installed);
    home.ok(&["snapshot", "create", "deb", "--tag", "pkg"]);
    home.ok(&["create", "debfork", "--from-snapshot", "deb:pkg"]);
    let (code, out, err) = home.run(&["exec", "debfork", "--", "sh", "-c", probe]);
    assert_eq!((code, out.as_str()), (0, installed), "{err}");
    exec("dpkg -r microagent-probe >/dev/null 2>&1; sync");
    let (_, out, _) = home.run(&["exec", "deb", "--", "sh", "-c", probe]);
    assert!(out.contains("no packages found"), "{out}");
    home.ok(&["halt", "deb"]);
    home.ok(&["start", "deb", "--from-snapshot", "pkg"]);
    assert_eq!(exec(probe), installed);

    // Deleting the snapshot takes nothing from the fork standing on its
    // deltas: the installed file, read from disk again (the shell's own
    // `read`: every binary is evicted too, and dpkg-query took 75 s to
    // fault back in).
    home.ok(&["snapshot", "delete", "deb", "pkg", "--yes"]);
    let (code, out, err) = home.run(&[
        "exec",
        "debfork",
        "--",
        "sh",
        "-c",
        "echo 3 > /proc/sys/vm/drop_caches; read l < /usr/share/microagent-probe/hello && echo $l",
    ]);
    assert_eq!((code, out.as_str()), (0, "installed\n"), "{err}");
    home.ok(&["snapshot", "create", "deb", "--tag", "pkg"]);

    let committed = commit_push_and_fork_elsewhere(&home, &registry, &reference, &exec, probe);

    // References: the image stays while anything stands on it, and says who.
    let (code, out, err) = home.run(&["image", "rm", &reference, "--json"]);
    assert_eq!(code, 1, "{out}");
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["error"]["code"], "state_conflict", "{out} {err}");
    assert_eq!(
        e["error"]["used_by"],
        json!(["workspace deb", "snapshot deb:pkg", "workspace debfork"])
    );
    // The image's 8, and the committed image's own: its layer and, over
    // 8 layers, its merged lowest disk.
    assert_eq!(layer_disks(&home).len(), 10);
    home.ok(&["delete", "debfork", "--yes", "--force"]);
    home.ok(&["delete", "deb", "--yes", "--force"]);
    home.ok(&["image", "rm", &committed]);
    home.ok(&["image", "rm", &reference]);
    assert!(layer_disks(&home).is_empty(), "{:?}", layer_disks(&home));
}

/// Runs `microagent commit` in the background until the workspace reports
/// `committing`; returns the child (None if it finished before that).
fn commit_in_background(home: &Home, ws: &str, to: &str) -> Option<std::process::Child> {
    let mut child = home
        .cmd()
        .args(["commit", ws, to, "--json"])
        .stdout(std::process::Stdio::piped())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    while child.try_wait().unwrap().is_none() {
        if home.json(&["status", ws])["status"] == "committing" {
            return Some(child);
        }
        std::thread::sleep(std::time::Duration::from_millis(20));
    }
    None
}

/// Seed 000's flow on the running Debian workspace `deb` (a package
/// installed, /opt/stay deleted, /opt/opaque renamed, /opt/hl/a changed):
/// diff, a commit refused for a secret, lifecycle refused during a commit,
/// a killed commit that leaves nothing, a commit, a push, a pull into a
/// second state directory and a workspace there with the changes, a
/// chained commit, and refusals by state. Returns the committed reference.
fn commit_push_and_fork_elsewhere(
    home: &Home,
    registry: &Registry,
    reference: &str,
    exec: &dyn Fn(&str) -> String,
    probe: &str,
) -> String {
    exec("echo committed > /opt/new-file && sync");
    let diff = home.json(&["diff", "deb"]);
    assert_schema("diff", &diff);
    let changes = diff["changes"].as_array().unwrap();
    let has = |kind: &str, path: &str| {
        changes
            .iter()
            .any(|c| c["kind"] == kind && c["path"] == path)
    };
    for (kind, path) in [
        ("C", "/opt"),
        ("D", "/opt/stay"),
        ("D", "/opt/opaque"),
        ("A", "/opt/renamed"),
        ("A", "/opt/new-file"),
        ("C", "/opt/hl/a"),
        ("A", "/usr/share/microagent-probe/hello"),
    ] {
        assert!(has(kind, path), "no {kind} {path} in {diff}");
    }
    assert!(
        !changes.iter().any(|c| {
            let p = c["path"].as_str().unwrap();
            p.starts_with("/tmp/") || p.starts_with("/run/") || p == "/etc/hostname"
        }),
        "{diff}"
    );

    // A secret copied into the filesystem is never committed.
    let repo = reference.rsplit_once(':').unwrap().0;
    let committed = format!("{repo}:committed");
    let set = home
        .cmd()
        .env("MA_TEST_SECRET", "commit-secret-7f3a9c51")
        .args([
            "secret",
            "set",
            "deb",
            "TOKEN",
            "--from-env",
            "MA_TEST_SECRET",
        ])
        .output()
        .unwrap();
    assert!(
        set.status.success(),
        "{}",
        String::from_utf8_lossy(&set.stderr)
    );
    exec("cp /run/secrets/TOKEN /root/leak && sync");
    let images = home.json(&["image", "ls"]);
    let (code, out, err) = home.run(&["commit", "deb", &committed, "--json"]);
    assert_eq!(code, 1, "{out} {err}");
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["error"]["code"], "secret_leak", "{out}");
    assert_eq!(e["error"]["secret_key"], "TOKEN", "{out}");
    assert_eq!(e["error"]["file"], "/root/leak", "{out}");
    assert_eq!(home.json(&["image", "ls"]), images);
    exec("rm /root/leak && sync");

    // A commit killed midway leaves no image, and the workspace runs on.
    if let Some(mut child) = commit_in_background(home, "deb", &format!("{repo}:killed")) {
        child.kill().unwrap();
        child.wait().unwrap();
    }
    assert_eq!(home.json(&["image", "ls"]), images);
    assert_eq!(
        exec("echo alive > /root/alive && cat /root/alive"),
        "alive\n"
    );

    // While a commit runs, the workspace says so and lifecycle commands
    // are refused, naming the commit.
    let child = commit_in_background(home, "deb", &committed)
        .expect("the commit finished before status reported committing");
    let (code, _, err) = home.run(&["pause", "deb"]);
    assert_eq!(code, 1, "{err}");
    assert!(err.contains("is committing"), "{err}");
    let ls = home.json(&["image", "ls"]);
    assert_each("image", &ls);
    assert!(
        ls.as_array()
            .unwrap()
            .iter()
            .any(|i| i["state"] == "building" && i["refs"] == json!([committed])),
        "{ls}"
    );
    let done = child.wait_with_output().unwrap();
    let (out, err) = common::text(&done);
    assert!(done.status.success(), "{err}");
    let c: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_schema("image-commit", &c);
    assert_eq!(c["refs"], json!([committed]), "{out}");
    assert_eq!(c["layers"], 11, "{out}");
    assert_eq!(c["source"], "commit", "{out}");
    assert!(c["new_layer"]["entries"].as_u64().unwrap() > 5, "{out}");
    assert!(c["paused_ms"].is_u64(), "{out}");
    eprintln!("commit: {}", c["duration_ms"]);

    // Push: the image's own layers are in the registry already.
    let creds = registry.creds();
    let p = home.json(&["image", "push", &committed, "--creds", &creds]);
    assert_schema("image-push", &p);
    assert_eq!(
        (p["blobs_pushed"].as_u64(), p["blobs_skipped"].as_u64()),
        (Some(2), Some(10)),
        "{p}"
    );
    let skopeo = |args: &[&str]| {
        let out = Command::new("skopeo").args(args).output().unwrap();
        assert!(
            out.status.success(),
            "skopeo {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let remote = format!("docker://{committed}");
    let inspect: serde_json::Value = serde_json::from_str(&skopeo(&[
        "inspect",
        "--tls-verify=false",
        "--creds",
        &creds,
        &remote,
    ]))
    .unwrap();
    assert_eq!(inspect["Layers"].as_array().unwrap().len(), 11, "{inspect}");
    let layout = tempfile::tempdir().unwrap();
    skopeo(&[
        "copy",
        "--quiet",
        "--src-tls-verify=false",
        "--src-creds",
        &creds,
        &remote,
        &format!("oci:{}:committed", layout.path().display()),
    ]);

    // The other host: pull, create, and the changes are there.
    let other = Home::new();
    other.ok(&["image", "pull", &committed, "--creds", &creds]);
    let kernel = vmlinux();
    other.ok(&[
        "create",
        "copy",
        "--image",
        &committed,
        "--kernel",
        kernel.to_str().unwrap(),
        "--memory",
        "256",
    ]);
    other.ok(&["start", "copy"]);
    let (code, out, err) = other.run(&[
        "exec", "copy", "--", "sh", "-c",
        &format!("cat /opt/new-file; test -e /opt/stay || echo stay-gone; ls /opt/renamed; cat /opt/hl/a; echo $IMAGE_GREETING; pwd; {probe}"),
    ]);
    assert_eq!(code, 0, "{err}");
    assert_eq!(
        out,
        "committed\nstay-gone\nupper\nchanged\nhello from the image\n/opt\ninstall ok installed\ninstalled\n"
    );
    // A commit of a workspace made from a committed image adds one more;
    // a halted one's upper is read as its agent left it at power-off.
    other.ok(&["halt", "copy"]);
    let chained = other.json(&["commit", "copy"]);
    assert_eq!(chained["layers"], 12, "{chained}");
    let tag = chained["refs"][0].as_str().unwrap();
    assert!(tag.starts_with(&format!("{repo}:20")), "{chained}");
    // Refused by state, naming it.
    other.ok(&[
        "create",
        "fresh",
        "--image",
        &committed,
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    let (code, out, _) = other.run(&["commit", "fresh", "--json"]);
    assert_eq!(code, 1, "{out}");
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_eq!(e["error"]["code"], "state_conflict", "{out}");
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is created"),
        "{out}"
    );
    other.ok(&["delete", "fresh", "--yes"]);
    other.ok(&["delete", "copy", "--yes", "--force"]);

    // So is a crashed one.
    let pid = home.json(&["status", "deb"])["pid"].as_i64().unwrap();
    // SAFETY: sending a signal to the VMM process this test started.
    unsafe { libc::kill(pid as i32, libc::SIGKILL) };
    let t = Instant::now();
    while home.json(&["status", "deb"])["status"] != "crashed" {
        assert!(t.elapsed().as_secs() < 20, "never crashed");
        std::thread::sleep(std::time::Duration::from_millis(100));
    }
    let (code, out, _) = home.run(&["commit", "deb", "--json"]);
    assert_eq!(code, 1, "{out}");
    let e: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("is crashed"),
        "{out}"
    );
    committed
}

/// `cache prune` collects the boot disks no workspace or snapshot names
/// and layer disks no image names (left by an interrupted removal), and
/// keeps what is in use. No VM boots.
#[test]
fn cache_prune_collects_shared_disks_nothing_uses() {
    let home = Home::with_private_boot_cache();
    let busybox = oci::script_path("image-busybox.sh");
    home.ok(&[
        "image",
        "import",
        busybox.to_str().unwrap(),
        "--tag",
        "localhost/bb:prune",
    ]);
    let kernel = vmlinux();
    home.ok(&[
        "create",
        "p1",
        "--image",
        "localhost/bb:prune",
        "--kernel",
        kernel.to_str().unwrap(),
    ]);
    let boot_dir = home.dir.path().join("cache/bootdisks");
    let boot_disks = || std::fs::read_dir(&boot_dir).map_or(0, |r| r.count());
    assert_eq!(boot_disks(), 1);
    let orphan = home
        .dir
        .path()
        .join("images/layers")
        .join(format!("{}.erofs", "0".repeat(64)));
    std::fs::write(&orphan, b"left by an interrupted removal").unwrap();

    let p = home.json(&["cache", "prune", "--yes"]);
    assert_eq!(p["shared_disks_removed"], 1, "{p}");
    assert!(!orphan.exists());
    assert_eq!((boot_disks(), layer_disks(&home).len()), (1, 1));

    home.ok(&["delete", "p1", "--yes"]);
    let p = home.json(&["cache", "prune", "--yes"]);
    assert_eq!(p["shared_disks_removed"], 1, "{p}");
    assert_eq!((boot_disks(), layer_disks(&home).len()), (0, 1));
}
