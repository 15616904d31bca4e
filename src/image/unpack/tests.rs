//! Layer application: overlay semantics and hostile entries.

use super::*;
use std::io::Write;

/// Builds a tar from (name, kind, data-or-link) without the tar crate's own
/// path checks, so hostile names can be written.
fn tar(entries: &[(&str, EntryType, &str)]) -> Vec<u8> {
    let mut b = tar::Builder::new(Vec::new());
    for (name, kind, data) in entries {
        let mut h = tar::Header::new_gnu();
        {
            let raw = &mut h.as_old_mut().name;
            raw.fill(0);
            raw[..name.len()].copy_from_slice(name.as_bytes());
        }
        h.set_entry_type(*kind);
        h.set_mode(if *kind == EntryType::Directory {
            0o755
        } else {
            0o644
        });
        h.set_mtime(1_700_000_000);
        h.set_uid(0);
        h.set_gid(0);
        let body: &[u8] = match kind {
            EntryType::Regular => data.as_bytes(),
            _ => b"",
        };
        if matches!(kind, EntryType::Symlink | EntryType::Link) {
            let raw = &mut h.as_old_mut().linkname;
            raw.fill(0);
            raw[..data.len()].copy_from_slice(data.as_bytes());
        }
        h.set_size(body.len() as u64);
        h.set_cksum();
        b.append(&h, body).unwrap();
    }
    b.into_inner().unwrap()
}

fn apply(root: &Path, entries: &[(&str, EntryType, &str)]) -> Result<LayerStats> {
    Unpacker::new(root, 1 << 30).apply(&tar(entries)[..], "sha256:test", None)
}

use EntryType::{Directory as D, Link as L, Regular as F, Symlink as S};

#[test]
fn whiteout_removes_lower_file_and_opaque_hides_lower_dir() {
    let t = tempfile::tempdir().unwrap();
    let root = t.path();
    apply(
        root,
        &[
            ("etc/", D, ""),
            ("etc/lower", F, "old"),
            ("etc/keep", F, "keep"),
            ("opq/", D, ""),
            ("opq/a", F, "a"),
            ("opq/sub/", D, ""),
            ("opq/sub/deep", F, "deep"),
        ],
    )
    .unwrap();
    // The opaque marker comes after this layer's own file: order must not matter.
    apply(
        root,
        &[
            ("etc/.wh.lower", F, ""),
            ("opq/b", F, "b"),
            ("opq/sub/new", F, "new"),
            ("opq/.wh..wh..opq", F, ""),
        ],
    )
    .unwrap();
    assert!(!root.join("etc/lower").exists());
    assert!(root.join("etc/keep").exists());
    assert!(!root.join("opq/a").exists());
    assert!(!root.join("opq/sub/deep").exists());
    assert_eq!(std::fs::read_to_string(root.join("opq/b")).unwrap(), "b");
    assert!(root.join("opq/sub/new").exists());
    assert!(!root.join("opq/.wh..wh..opq").exists());
}

#[test]
fn whiteout_does_not_remove_same_layer_file() {
    let t = tempfile::tempdir().unwrap();
    apply(t.path(), &[("x", F, "1"), (".wh.x", F, "")]).unwrap();
    assert!(t.path().join("x").exists());
}

#[test]
fn whiteouts_of_dot_and_dot_dot_are_refused_and_remove_nothing() {
    let t = tempfile::tempdir().unwrap();
    apply(t.path(), &[("d/", D, ""), ("d/keep", F, "1")]).unwrap();
    for name in ["d/.wh..", "d/.wh..."] {
        let err = apply(t.path(), &[(name, F, "")]).unwrap_err().to_string();
        assert!(err.contains("whiteout of"), "{err}");
    }
    assert!(t.path().join("d/keep").exists());
}

#[test]
fn dot_dot_and_absolute_names_are_refused() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    std::fs::create_dir(&root).unwrap();
    for name in ["../escape", "a/../../escape", "/escape"] {
        let err = apply(&root, &[(name, F, "x")]).unwrap_err().to_string();
        assert!(err.contains(name), "error names the entry: {err}");
    }
    assert!(!outer.path().join("escape").exists());
}

#[test]
fn writing_through_a_symlink_is_refused() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    let victim = outer.path().join("victim");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::create_dir_all(&victim).unwrap();
    let err = apply(
        &root,
        &[
            ("link", S, victim.to_str().unwrap()),
            ("link/pwned", F, "x"),
        ],
    )
    .unwrap_err()
    .to_string();
    assert!(
        err.contains("link/pwned") && err.contains("symlink"),
        "{err}"
    );
    assert!(std::fs::read_dir(&victim).unwrap().next().is_none());

    // A relative symlink pointing up and out, then a file over it: the
    // symlink is replaced, never followed.
    let root2 = outer.path().join("root2");
    std::fs::create_dir_all(&root2).unwrap();
    std::fs::write(outer.path().join("target"), "original").unwrap();
    apply(&root2, &[("f", S, "../target")]).unwrap();
    apply(&root2, &[("f", F, "replaced")]).unwrap();
    assert_eq!(
        std::fs::read_to_string(outer.path().join("target")).unwrap(),
        "original"
    );
    assert_eq!(
        std::fs::read_to_string(root2.join("f")).unwrap(),
        "replaced"
    );
}

#[test]
fn hard_links_stay_inside() {
    let outer = tempfile::tempdir().unwrap();
    let root = outer.path().join("root");
    std::fs::create_dir_all(&root).unwrap();
    std::fs::write(outer.path().join("secret"), "s").unwrap();
    apply(&root, &[("a", F, "data"), ("b", L, "a")]).unwrap();
    use std::os::unix::fs::MetadataExt;
    assert_eq!(
        std::fs::metadata(root.join("a")).unwrap().ino(),
        std::fs::metadata(root.join("b")).unwrap().ino()
    );
    let err = apply(&root, &[("c", L, "../secret")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"c\"") && err.contains(".."), "{err}");
    apply(&root, &[("d", S, "/")]).unwrap();
    let err = apply(&root, &[("e", L, "d/etc/passwd")])
        .unwrap_err()
        .to_string();
    assert!(err.contains("\"e\""), "{err}");
}

#[test]
fn file_replaces_directory_and_modes_survive() {
    let t = tempfile::tempdir().unwrap();
    apply(t.path(), &[("x/", D, ""), ("x/y", F, "1")]).unwrap();
    apply(t.path(), &[("x", F, "now a file")]).unwrap();
    assert!(t.path().join("x").is_file());
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(t.path().join("x"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o644);
}

#[test]
fn compressed_layers_and_diff_id() {
    let t = tempfile::tempdir().unwrap();
    let plain = tar(&[("g", F, "gzip"), ("z", F, "zstd")]);
    let diff_id = Digest::of_bytes(&plain);
    let mut gz = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::fast());
    gz.write_all(&plain).unwrap();
    let gz = gz.finish().unwrap();
    let zs = zstd::encode_all(&plain[..], 1).unwrap();
    let mut u = Unpacker::new(t.path(), 1 << 20);
    u.apply(&gz[..], "sha256:gz", Some(&diff_id)).unwrap();
    u.apply(&zs[..], "sha256:zs", Some(&diff_id)).unwrap();
    let other = Digest::of_bytes(b"not it");
    let err = u.apply(&gz[..], "sha256:gz", Some(&other)).unwrap_err();
    assert!(matches!(err, ImageError::DiffIdMismatch { .. }), "{err}");
}

#[test]
fn size_budget_is_enforced() {
    let t = tempfile::tempdir().unwrap();
    let data = "x".repeat(2048);
    let err = Unpacker::new(t.path(), 1024)
        .apply(&tar(&[("big", F, &data)])[..], "sha256:big", None)
        .unwrap_err();
    assert!(matches!(err, ImageError::TooLarge { .. }), "{err}");
}
