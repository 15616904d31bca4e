use std::collections::BTreeMap;
use std::io::Read;
use std::os::unix::fs::symlink;
use std::path::Path;

use super::*;
use crate::ext4::tests::{mkfs, xattr_set};

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// An upper disk as overlayfs leaves it: `upper/` with changes, whiteouts
/// and an opaque directory, `work/`, and what the agent wrote at boot.
fn upper_disk(dir: &Path) -> std::fs::File {
    let tree = dir.join("tree");
    let up = tree.join("upper");
    for d in ["etc", "opt/opaque", "tmp", "run", "work", ".microagent"] {
        std::fs::create_dir_all(up.join(d)).unwrap();
    }
    std::fs::create_dir_all(tree.join("work/work")).unwrap();
    std::fs::write(up.join("etc/hostname"), "ws\n").unwrap();
    std::fs::write(up.join("etc/app.conf"), "x=1\n").unwrap();
    std::fs::write(up.join("opt/opaque/new"), "new\n").unwrap();
    std::fs::write(up.join("tmp/scratch"), "no\n").unwrap();
    std::fs::write(up.join("opt/a"), "linked\n").unwrap();
    std::fs::hard_link(up.join("opt/a"), up.join("opt/b")).unwrap();
    symlink("a", up.join("opt/link")).unwrap();
    xattr_set(&up.join("etc/app.conf"), "user.origin", b"test");
    if is_root() {
        use nix::sys::stat::{mknod, Mode, SFlag};
        mknod(&up.join("opt/gone"), SFlag::S_IFCHR, Mode::empty(), 0).unwrap();
        xattr_set(&up.join("opt/opaque"), "trusted.overlay.opaque", b"y");
    }
    let image = dir.join("upper.ext4");
    mkfs(&tree, &image, 32);
    std::fs::File::open(&image).unwrap()
}

#[test]
fn the_upper_becomes_an_oci_layer() {
    let tmp = tempfile::tempdir().unwrap();
    let fs = Ext4::open(upper_disk(tmp.path())).unwrap();
    let mut tar_bytes = Vec::new();
    let written = write_layer(&fs, &mut tar_bytes, 1 << 30).unwrap();
    assert_eq!(written.size, tar_bytes.len() as u64);
    assert_eq!(written.diff_id, Digest::of_bytes(&tar_bytes));

    type Xattrs = Vec<(String, Vec<u8>)>;
    let mut seen: BTreeMap<String, (tar::EntryType, Vec<u8>, Xattrs)> = BTreeMap::new();
    let mut archive = tar::Archive::new(tar_bytes.as_slice());
    for entry in archive.entries().unwrap() {
        let mut e = entry.unwrap();
        let path = String::from_utf8(e.path_bytes().into_owned()).unwrap();
        let kind = e.header().entry_type();
        let xattrs = e
            .pax_extensions()
            .unwrap()
            .map(|exts| {
                exts.map(|x| {
                    let x = x.unwrap();
                    (x.key().unwrap().to_string(), x.value_bytes().to_vec())
                })
                .collect()
            })
            .unwrap_or_default();
        let body = if kind == tar::EntryType::Link {
            e.link_name_bytes().unwrap().into_owned()
        } else {
            let mut b = Vec::new();
            e.read_to_end(&mut b).unwrap();
            b
        };
        seen.insert(path, (kind, body, xattrs));
    }
    // Runtime directories and the agent's identity files stay out.
    for absent in ["tmp", "tmp/scratch", "run", ".microagent", "etc/hostname"] {
        assert!(!seen.contains_key(absent), "{absent} in {:?}", seen.keys());
    }
    assert_eq!(seen["etc/app.conf"].1, b"x=1\n");
    assert_eq!(
        seen["etc/app.conf"].2,
        [("SCHILY.xattr.user.origin".to_string(), b"test".to_vec())]
    );
    assert_eq!(seen["opt/a"].1, b"linked\n");
    assert_eq!(seen["opt/b"].0, tar::EntryType::Link);
    assert_eq!(seen["opt/b"].1, b"opt/a");
    assert_eq!(seen["opt/link"].0, tar::EntryType::Symlink);
    if is_root() {
        assert_eq!(seen["opt/.wh.gone"].0, tar::EntryType::Regular);
        assert!(!seen.contains_key("opt/gone"));
        assert!(seen.contains_key("opt/opaque/.wh..wh..opq"));
        // overlayfs's own xattrs are never carried.
        assert!(seen["opt/opaque"].2.is_empty());
    }

    // The same walk is `diff`: C where the image has the path.
    let lower: BTreeSet<Vec<u8>> = ["etc", "opt", "opt/gone", "opt/opaque"]
        .iter()
        .map(|p| p.as_bytes().to_vec())
        .collect();
    let changes = changes(&fs, &lower).unwrap();
    let find = |p: &str| changes.iter().find(|(_, path)| path == p).map(|(c, _)| *c);
    assert_eq!(find("/etc"), Some(Change::Changed));
    assert_eq!(find("/etc/app.conf"), Some(Change::Added));
    assert_eq!(find("/tmp"), None);
    if is_root() {
        assert_eq!(find("/opt/gone"), Some(Change::Deleted));
        assert_eq!(find("/opt/opaque"), Some(Change::Changed));
    }

    // A limit below the content refuses the layer.
    let err = write_layer(&fs, std::io::sink(), 100).unwrap_err();
    assert!(matches!(err, UpperError::TooLarge { .. }), "{err}");
}
