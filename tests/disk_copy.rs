//! Workspace disks are private copies: reflink where the filesystem shares
//! extents (XFS here, loop-mounted by the test), sparse copy elsewhere (this
//! host's ext4).

use std::io::{Seek, SeekFrom, Write};
use std::os::unix::fs::MetadataExt;
use std::path::Path;
use std::process::Command;

use microagent::workspace::disk::{copy_disk, CopyMethod};

fn write_sparse_image(path: &Path) {
    let mut f = std::fs::File::create(path).unwrap();
    f.set_len(256 << 20).unwrap();
    for (i, off) in [0u64, 17 << 20, 200 << 20].iter().enumerate() {
        f.seek(SeekFrom::Start(*off)).unwrap();
        f.write_all(&vec![i as u8 + 1; 1 << 20]).unwrap();
    }
    f.sync_all().unwrap();
}

fn is_root() -> bool {
    // SAFETY: geteuid has no preconditions.
    unsafe { libc::geteuid() == 0 }
}

#[test]
fn sparse_copy_on_this_filesystem_keeps_holes() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    write_sparse_image(&src);
    let dst = dir.path().join("dst.img");
    let method = copy_disk(&src, &dst).unwrap();
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    if method == CopyMethod::Sparse {
        let used = std::fs::metadata(&dst).unwrap().blocks() * 512;
        assert!(
            used <= 4 << 20,
            "sparse copy allocated {used} bytes for 3 MiB of data"
        );
    }
}

/// Unmounts and detaches on drop, whatever the test did.
struct Mount(std::path::PathBuf);
impl Drop for Mount {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg(&self.0).status();
    }
}

#[test]
fn reflink_copy_on_xfs() {
    if !is_root() {
        eprintln!("!!! SKIPPING reflink test: needs root to loop-mount an XFS image !!!");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("xfs.img");
    std::fs::File::create(&img)
        .unwrap()
        .set_len(512 << 20)
        .unwrap();
    let mkfs = Command::new("mkfs.xfs")
        .args(["-q", "-m", "reflink=1"])
        .arg(&img)
        .output()
        .expect("mkfs.xfs (apt-get install xfsprogs; scripts/setup.sh does)");
    assert!(
        mkfs.status.success(),
        "{}",
        String::from_utf8_lossy(&mkfs.stderr)
    );
    let mnt = dir.path().join("mnt");
    std::fs::create_dir(&mnt).unwrap();
    let m = Command::new("mount")
        .args(["-o", "loop"])
        .arg(&img)
        .arg(&mnt)
        .output()
        .unwrap();
    assert!(
        m.status.success(),
        "mount: {}",
        String::from_utf8_lossy(&m.stderr)
    );
    let _mount = Mount(mnt.clone());

    let src = mnt.join("src.img");
    write_sparse_image(&src);
    let dst = mnt.join("dst.img");
    assert_eq!(copy_disk(&src, &dst).unwrap(), CopyMethod::Reflink);
    assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dst).unwrap());
    // The copy is private: writing to it leaves the source alone.
    let mut f = std::fs::OpenOptions::new().write(true).open(&dst).unwrap();
    f.write_all(b"diverged").unwrap();
    drop(f);
    assert_eq!(std::fs::read(&src).unwrap()[..8], [1u8; 8]);
}
