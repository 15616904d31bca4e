//! `--json` of the commands that need no guest, checked against
//! docs/json.md in both directions (tests/checkpoint.rs covers the ones
//! that need a running guest), the list filters, and destructive commands
//! refusing without --yes when there is no terminal to ask.

mod common;

use common::schema::{assert_each, assert_schema};
use common::*;
use serde_json::json;

#[test]
fn json_outputs_match_the_documented_schemas() {
    let home = Home::with_private_boot_cache();
    let dir = tempfile::tempdir().unwrap();
    let rootfs = dir.path().join("root.ext4");
    mkfs_ext4(&rootfs, "16M", None);
    let rootfs = rootfs.to_str().unwrap();
    // No guest boots here: any file does as the kernel.
    let ws = home.json(&["create", "plain", "--rootfs", rootfs, "--kernel", "/bin/sh"]);
    assert_schema("workspace", &ws);
    assert_eq!(ws["status"], "created");

    let layout = oci::script_path("image-busybox.sh");
    let imported = home.json(&[
        "image",
        "import",
        layout.to_str().unwrap(),
        "--tag",
        "localhost/busybox:json",
    ]);
    assert_schema("image-fetch", &imported);
    assert_each("image", &home.json(&["image", "ls"]));
    let from_image = home.json(&[
        "create",
        "boxed",
        "--image",
        "localhost/busybox:json",
        "--kernel",
        "/bin/sh",
    ]);
    assert_schema("workspace", &from_image);

    // list and its filters.
    assert_each("workspace", &home.json(&["list"]));
    let names = |v: serde_json::Value| -> Vec<String> {
        v.as_array()
            .unwrap()
            .iter()
            .map(|w| w["name"].as_str().unwrap().to_string())
            .collect()
    };
    assert_eq!(
        names(home.json(&["list", "--image", "localhost/busybox:json"])),
        ["boxed"]
    );
    let digest = imported["digest"].as_str().unwrap();
    assert_eq!(
        names(home.json(&["list", "--image", &digest[..19]])),
        ["boxed"]
    );
    assert_eq!(names(home.json(&["list", "--prefix", "pl"])), ["plain"]);
    assert_eq!(
        names(home.json(&["list", "--status", "running"])),
        Vec::<String>::new()
    );
    assert_schema("workspace-status", &home.json(&["status", "plain"]));
    assert_eq!(home.json(&["snapshot", "list", "plain"]), json!([]));

    // Secrets on a workspace that is not running.
    let value = dir.path().join("token");
    std::fs::write(&value, "s3cret-value-for-json").unwrap();
    let set = home.json(&[
        "secret",
        "set",
        "plain",
        "TOKEN",
        "--from-file",
        value.to_str().unwrap(),
    ]);
    assert_schema("secret-set", &set);
    assert_eq!(set["delivered"], false);
    assert_schema("secret-ls", &home.json(&["secret", "ls", "plain"]));
    assert_schema("secret-rm", &home.json(&["secret", "rm", "plain", "TOKEN"]));

    // Errors are JSON too, with the exit code scripts expect.
    let (code, out, _) = home.run(&["status", "missing", "--json"]);
    assert_eq!(code, 1);
    let err: serde_json::Value = serde_json::from_str(&out).unwrap();
    assert_schema("error", &err);
    assert_eq!(err["error"]["code"], "not_found", "{err}");
    assert_eq!(err["error"]["kind"], "workspace", "{err}");
    assert!(
        err["error"]["message"]
            .as_str()
            .unwrap()
            .contains("missing"),
        "{err}"
    );

    // Destructive commands: no terminal and no --yes means exit 2 and
    // nothing removed.
    for args in [&["delete", "plain"][..], &["cache", "prune"]] {
        let (code, out, err) = home.run(&[args, &["--json"]].concat());
        assert_eq!(code, 2, "{args:?}: {err}");
        assert!(err.contains("--yes"), "{args:?}: {err}");
        let v: serde_json::Value = serde_json::from_str(&out).unwrap();
        assert_schema("error", &v);
        assert_eq!(v["error"]["code"], "confirmation_required", "{v}");
    }
    assert!(home.workspace_dir("plain").exists());
    assert_schema("cache-prune", &home.json(&["cache", "prune", "--yes"]));
    assert_schema("delete", &home.json(&["delete", "plain", "--yes"]));
    assert_schema("delete", &home.json(&["delete", "boxed", "--yes"]));
    assert_schema(
        "image",
        &home.json(&["image", "rm", "localhost/busybox:json"]),
    );
}

#[test]
fn the_schema_check_catches_extra_and_missing_fields() {
    assert_schema("delete", &json!({"name": "w", "deleted": true}));
    let extra = std::panic::catch_unwind(|| {
        assert_schema("delete", &json!({"name": "w", "deleted": true, "oops": 1}))
    });
    assert!(extra.is_err(), "an undocumented field passed");
    let missing = std::panic::catch_unwind(|| assert_schema("delete", &json!({"name": "w"})));
    assert!(missing.is_err(), "a missing field passed");
    // Inherited fields count: workspace-start has workspace's, and more.
    let start = std::panic::catch_unwind(|| {
        assert_schema(
            "workspace-start",
            &json!({"boot": "cold", "running_ms": 1, "start_ms": 1}),
        )
    });
    assert!(start.is_err(), "workspace's own fields were not required");
    // Optional fields may be absent.
    assert_schema(
        "error",
        &json!({"error": {"code": "internal", "message": "x"}}),
    );
    let bad_code = std::panic::catch_unwind(|| {
        assert_schema("error", &json!({"error": {"code": "oops", "message": "x"}}))
    });
    assert!(bad_code.is_err(), "an undocumented error code passed");
}
