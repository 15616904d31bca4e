//! One read-only filesystem image per image layer, for stacking under
//! overlayfs instead of flattening: the layer is unpacked alone, its OCI
//! whiteouts and opaque markers kept in overlayfs's form (a 0/0 character
//! device, a `trusted.overlay.opaque=y` xattr), and `mkfs.ext4 -d` builds
//! the disk from that tree (e2fsprogs copies device nodes and xattrs).
//!
//! The first step of the layered-image design (README, Storage): layer
//! disks keyed by `diff_id` are what images will share read-only.

use std::path::Path;

use super::build::{measure, mkfs};
use super::digest::Digest;
use super::unpack::{LayerStats, Unpacker};
use super::{ImageError, Result};

/// Unpacks the (possibly compressed) layer in `blob` into `scratch` (which
/// must not exist; it is removed) and builds its disk at `disk`; the
/// uncompressed stream must match `diff_id`. Returns the disk's size.
pub fn build_layer_disk(
    blob: &Path,
    diff_id: &Digest,
    scratch: &Path,
    disk: &Path,
    budget: u64,
) -> Result<(u64, LayerStats)> {
    std::fs::create_dir(scratch).map_err(ImageError::io(scratch))?;
    let result = (|| {
        use std::os::unix::fs::PermissionsExt;
        std::fs::set_permissions(scratch, std::fs::Permissions::from_mode(0o755))
            .map_err(ImageError::io(scratch))?;
        let file = std::fs::File::open(blob).map_err(ImageError::io(blob))?;
        let stats = Unpacker::overlay_form(scratch, budget).apply(
            file,
            &diff_id.to_string(),
            Some(diff_id),
        )?;
        let (content, inodes) = measure(scratch)?;
        let size = mkfs(scratch, disk, content, inodes)?;
        Ok((size, stats))
    })();
    let _ = std::fs::remove_dir_all(scratch);
    result
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::process::Command;
    use tar::EntryType;

    fn tar(entries: &[(&str, EntryType, &str)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, data) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_uid(0);
            h.set_gid(0);
            h.set_mtime(1_700_000_000);
            h.set_mode(if *kind == EntryType::Directory {
                0o755
            } else {
                0o644
            });
            let body = if *kind == EntryType::Regular {
                data.as_bytes()
            } else {
                b""
            };
            h.set_size(body.len() as u64);
            if *kind == EntryType::Link {
                h.set_link_name(data).unwrap();
            }
            b.append_data(&mut h, name, body).unwrap();
        }
        b.into_inner().unwrap()
    }

    fn diff_id(data: &[u8]) -> Digest {
        Digest::from_hex(crate::digest::sha256_bytes(data)).unwrap()
    }

    struct Mounts(Vec<std::path::PathBuf>);
    impl Drop for Mounts {
        fn drop(&mut self) {
            for m in self.0.iter().rev() {
                let _ = Command::new("umount").arg(m).status();
            }
        }
    }

    fn mount(args: &[&str], at: &Path) -> bool {
        std::fs::create_dir_all(at).unwrap();
        Command::new("mount")
            .args(args)
            .arg(at)
            .status()
            .is_ok_and(|s| s.success())
    }

    /// Two layer disks stacked by the host's own overlayfs: a whiteout
    /// across layers, an opaque directory, a hard link, a file replaced.
    #[test]
    fn layer_disks_stack_with_overlay_semantics() {
        // SAFETY: geteuid has no preconditions.
        if unsafe { libc::geteuid() } != 0 {
            eprintln!("SKIPPED: layer disks need root to mount");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let lower = tar(&[
            ("etc/", EntryType::Directory, ""),
            ("etc/gone", EntryType::Regular, "old"),
            ("etc/kept", EntryType::Regular, "kept"),
            ("cache/", EntryType::Directory, ""),
            ("cache/stale", EntryType::Regular, "stale"),
            ("bin/", EntryType::Directory, ""),
            ("bin/tool", EntryType::Regular, "v1"),
            ("bin/alias", EntryType::Link, "bin/tool"),
        ]);
        let upper = tar(&[
            ("etc/.wh.gone", EntryType::Regular, ""),
            ("cache/.wh..wh..opq", EntryType::Regular, ""),
            ("cache/fresh", EntryType::Regular, "fresh"),
            ("bin/tool", EntryType::Regular, "v2"),
        ]);
        let mut disks = Vec::new();
        for (i, layer) in [&lower, &upper].iter().enumerate() {
            let blob = dir.path().join(format!("l{i}.tar"));
            std::fs::write(&blob, layer).unwrap();
            let disk = dir.path().join(format!("l{i}.img"));
            build_layer_disk(
                &blob,
                &diff_id(layer),
                &dir.path().join(format!("tree{i}")),
                &disk,
                1 << 30,
            )
            .unwrap();
            assert!(!dir.path().join(format!("tree{i}")).exists());
            disks.push(disk);
        }
        let mut mounts = Mounts(Vec::new());
        let mut lowers = Vec::new();
        for (i, disk) in disks.iter().enumerate() {
            let at = dir.path().join(format!("m{i}"));
            if !mount(&["-o", "loop,ro", disk.to_str().unwrap()], &at) {
                eprintln!("SKIPPED: cannot loop-mount ext4 here");
                return;
            }
            mounts.0.push(at.clone());
            lowers.insert(0, at.display().to_string());
        }
        let merged = dir.path().join("merged");
        let opts = format!("lowerdir={}", lowers.join(":"));
        assert!(
            mount(&["-t", "overlay", "overlay", "-o", &opts], &merged),
            "overlay mount failed"
        );
        mounts.0.push(merged.clone());
        let read = |p: &str| std::fs::read_to_string(merged.join(p)).ok();
        assert_eq!(read("etc/gone"), None, "whiteout across layers");
        assert_eq!(read("etc/kept").as_deref(), Some("kept"));
        assert_eq!(read("cache/stale"), None, "opaque directory");
        assert_eq!(read("cache/fresh").as_deref(), Some("fresh"));
        assert_eq!(read("bin/tool").as_deref(), Some("v2"), "upper wins");
        assert_eq!(
            read("bin/alias").as_deref(),
            Some("v1"),
            "hard link kept its inode"
        );
        let names: Vec<String> = std::fs::read_dir(merged.join("cache"))
            .unwrap()
            .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
            .collect();
        assert_eq!(names, vec!["fresh".to_string()]);
    }

    #[test]
    fn whiteouts_that_name_a_parent_are_refused() {
        for (name, hidden) in [("etc/.wh..", "\".\""), ("etc/.wh...", "\"..\"")] {
            let dir = tempfile::tempdir().unwrap();
            let layer = tar(&[
                ("etc/", EntryType::Directory, ""),
                (name, EntryType::Regular, ""),
            ]);
            let blob = dir.path().join("l.tar");
            std::fs::write(&blob, &layer).unwrap();
            let e = build_layer_disk(
                &blob,
                &diff_id(&layer),
                &dir.path().join("tree"),
                &dir.path().join("l.img"),
                1 << 30,
            )
            .unwrap_err()
            .to_string();
            assert!(e.contains(&format!("whiteout of {hidden}")), "{e}");
        }
    }
}
