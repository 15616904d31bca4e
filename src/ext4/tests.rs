use std::collections::BTreeMap;
use std::os::unix::fs::{symlink, MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use super::*;

/// `mkfs.ext4 -d tree` into a new `mib`-MiB image (test fixtures).
pub(crate) fn mkfs(tree: &Path, image: &Path, mib: u64) {
    let out = Command::new("mkfs.ext4")
        .args(["-q", "-F", "-b", "4096", "-d"])
        .arg(tree)
        .arg(image)
        .arg(format!("{mib}M"))
        .output()
        .expect("mkfs.ext4 (e2fsprogs) runs");
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

#[derive(Debug, PartialEq)]
enum Seen {
    File(Vec<u8>, u16, u32),
    Dir(u16),
    Link(Vec<u8>),
    Dev(u32, u32),
}

fn walk(fs: &Ext4<std::fs::File>, ino: u32, path: String, out: &mut BTreeMap<String, Seen>) {
    let inode = fs.inode(ino).unwrap();
    let seen = match inode.kind {
        Kind::Dir => {
            for e in fs.read_dir(&inode).unwrap() {
                let name = String::from_utf8(e.name).unwrap();
                if name != "lost+found" {
                    walk(fs, e.ino, format!("{path}/{name}"), out);
                }
            }
            Seen::Dir(inode.perm)
        }
        Kind::File => {
            let mut data = Vec::new();
            fs.read_data(&inode, &mut |b| {
                data.extend_from_slice(b);
                Ok(())
            })
            .unwrap();
            Seen::File(data, inode.perm, inode.uid)
        }
        Kind::Symlink => Seen::Link(fs.read_link(&inode).unwrap()),
        Kind::Char => {
            let (ma, mi) = inode.rdev();
            Seen::Dev(ma, mi)
        }
        k => panic!("unexpected {k:?}"),
    };
    out.insert(path, seen);
}

fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

#[test]
fn reads_back_what_mkfs_wrote() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("etc/many")).unwrap();
    std::fs::write(tree.join("etc/small"), b"hello\n").unwrap();
    std::fs::set_permissions(
        tree.join("etc/small"),
        std::fs::Permissions::from_mode(0o4755),
    )
    .unwrap();
    // Several extents' worth of varied bytes, and a sparse file.
    let big: Vec<u8> = (0..3_000_000u32).map(|i| (i * 7 % 251) as u8).collect();
    std::fs::write(tree.join("big"), &big).unwrap();
    let sparse = std::fs::File::create(tree.join("sparse")).unwrap();
    sparse.set_len(10 << 20).unwrap();
    std::os::unix::fs::FileExt::write_all_at(&sparse, b"tail", (10 << 20) - 4).unwrap();
    for i in 0..600 {
        std::fs::write(
            tree.join(format!("etc/many/entry-with-a-long-name-{i:04}")),
            [],
        )
        .unwrap();
    }
    symlink("small", tree.join("etc/fast")).unwrap();
    let long_target = "x/".repeat(50) + "end";
    symlink(&long_target, tree.join("slow")).unwrap();
    std::fs::hard_link(tree.join("etc/small"), tree.join("hard")).unwrap();
    xattr_set(&tree.join("etc"), "user.colour", b"blue");
    if is_root() {
        nix::sys::stat::mknod(
            &tree.join("gone"),
            nix::sys::stat::SFlag::S_IFCHR,
            nix::sys::stat::Mode::empty(),
            0,
        )
        .unwrap();
        xattr_set(&tree.join("etc/many"), "trusted.overlay.opaque", b"y");
    }
    let image = tmp.path().join("disk.ext4");
    mkfs(&tree, &image, 64);

    let fs = Ext4::open(std::fs::File::open(&image).unwrap()).unwrap();
    let mut seen = BTreeMap::new();
    walk(&fs, ROOT_INO, String::new(), &mut seen);
    assert_eq!(
        seen["/big"],
        Seen::File(big, 0o644, nix::unistd::geteuid().as_raw())
    );
    let Seen::File(sparse_data, ..) = &seen["/sparse"] else {
        panic!("sparse is a file")
    };
    assert_eq!(sparse_data.len(), 10 << 20);
    assert!(sparse_data[..(10 << 20) - 4].iter().all(|&b| b == 0));
    assert_eq!(&sparse_data[(10 << 20) - 4..], b"tail");
    assert_eq!(
        seen["/etc/small"],
        Seen::File(b"hello\n".to_vec(), 0o4755, nix::unistd::geteuid().as_raw())
    );
    assert_eq!(seen["/etc/fast"], Seen::Link(b"small".to_vec()));
    assert_eq!(seen["/slow"], Seen::Link(long_target.into_bytes()));
    let many = seen.keys().filter(|k| k.starts_with("/etc/many/")).count();
    assert_eq!(many, 600);

    // Hard links share an inode.
    let root = fs.inode(ROOT_INO).unwrap();
    let ino_of = |name: &[u8]| {
        fs.read_dir(&root)
            .unwrap()
            .into_iter()
            .find(|e| e.name == name)
            .unwrap()
            .ino
    };
    let etc = fs.inode(ino_of(b"etc")).unwrap();
    let small = fs
        .read_dir(&etc)
        .unwrap()
        .into_iter()
        .find(|e| e.name == b"small")
        .unwrap();
    assert_eq!(small.ino, ino_of(b"hard"));
    assert_eq!(fs.inode(small.ino).unwrap().links, 2);
    let xattrs = fs.xattrs(&etc).unwrap();
    assert!(xattrs.contains(&Xattr {
        name: "user.colour".into(),
        value: b"blue".to_vec()
    }));
    let mtime = std::fs::metadata(tree.join("etc/small")).unwrap().mtime();
    assert_eq!(fs.inode(small.ino).unwrap().mtime, mtime);
    if is_root() {
        assert_eq!(seen["/gone"], Seen::Dev(0, 0));
        let many = fs
            .read_dir(&etc)
            .unwrap()
            .into_iter()
            .find(|e| e.name == b"many")
            .unwrap();
        let many = fs.inode(many.ino).unwrap();
        assert!(fs.xattrs(&many).unwrap().contains(&Xattr {
            name: "trusted.overlay.opaque".into(),
            value: b"y".to_vec()
        }));
    }
}

/// Sets an xattr on a host file (test trees for mkfs.ext4 -d).
pub(crate) fn xattr_set(path: &Path, name: &str, value: &[u8]) {
    let p = std::ffi::CString::new(path.as_os_str().as_encoded_bytes()).unwrap();
    let n = std::ffi::CString::new(name).unwrap();
    // SAFETY: valid C strings and a value slice with its length.
    let rc = unsafe {
        libc::setxattr(
            p.as_ptr(),
            n.as_ptr(),
            value.as_ptr().cast(),
            value.len(),
            0,
        )
    };
    assert_eq!(
        rc,
        0,
        "setxattr {name}: {}",
        std::io::Error::last_os_error()
    );
}

/// Damaged metadata must give errors, never a panic or a hang: flip bytes
/// across the metadata blocks and read everything reachable.
#[test]
fn damaged_metadata_is_refused_without_panics() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(tree.join("d/e")).unwrap();
    for i in 0..40 {
        std::fs::write(tree.join(format!("d/f{i}")), vec![i as u8; 5000]).unwrap();
    }
    symlink("f1", tree.join("d/l")).unwrap();
    let image = tmp.path().join("disk.ext4");
    mkfs(&tree, &image, 8);
    let clean = std::fs::read(&image).unwrap();
    let mut seed = 0x2545_f491_4f6c_dd1du64;
    let mut next = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    // Metadata (superblock, descriptors, bitmaps, inode table, first
    // directory blocks) is in the first few hundred KiB of a fresh fs.
    for _ in 0..300 {
        let mut bytes = clean.clone();
        for _ in 0..8 {
            let at = 1024 + (next() % (600 << 10)) as usize;
            bytes[at] = next() as u8;
        }
        let damaged = tmp.path().join("damaged.ext4");
        std::fs::write(&damaged, &bytes).unwrap();
        let Ok(fs) = Ext4::open(std::fs::File::open(&damaged).unwrap()) else {
            continue;
        };
        let mut stack = vec![ROOT_INO];
        let mut visited = std::collections::HashSet::new();
        while let Some(ino) = stack.pop() {
            if !visited.insert(ino) {
                continue;
            }
            let Ok(inode) = fs.inode(ino) else { continue };
            match inode.kind {
                Kind::Dir => {
                    if let Ok(entries) = fs.read_dir(&inode) {
                        stack.extend(entries.iter().map(|e| e.ino));
                    }
                }
                Kind::Symlink => {
                    let _ = fs.read_link(&inode);
                }
                _ if inode.size < 64 << 20 => {
                    let _ = fs.read_data(&inode, &mut |_| Ok(()));
                }
                _ => {}
            }
            let _ = fs.xattrs(&inode);
        }
    }
}

#[test]
fn an_unclean_journal_is_refused() {
    let tmp = tempfile::tempdir().unwrap();
    let tree = tmp.path().join("tree");
    std::fs::create_dir_all(&tree).unwrap();
    let image = tmp.path().join("disk.ext4");
    mkfs(&tree, &image, 8);
    let mut bytes = std::fs::read(&image).unwrap();
    let incompat = u32_at(&bytes, 1024 + 0x60) | INCOMPAT_RECOVER;
    bytes[1024 + 0x60..1024 + 0x64].copy_from_slice(&incompat.to_le_bytes());
    std::fs::write(&image, &bytes).unwrap();
    let err = Ext4::open(std::fs::File::open(&image).unwrap())
        .err()
        .unwrap();
    assert!(matches!(err, Ext4Error::NeedsRecovery), "{err}");
}
