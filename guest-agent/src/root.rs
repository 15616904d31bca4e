//! PID 1's first job when the kernel booted the shared, read-only boot
//! disk: find the workspace's own disks by their virtio-blk serial (never
//! by probe order), build its root from them and switch into it.
//!
//! `microagent.layers=N` on the command line selects this path:
//! - N > 0: an image workspace. Layer disks `microagent-layer-0` (lowest)
//!   to `-N-1` are erofs, stacked read-only by overlayfs under the upper
//!   disk `microagent-upper` (ext4), whose `upper/` and `work/` hold the
//!   workspace's changes. `meta/entrypoint.json` beside them is the image's
//!   Entrypoint + Cmd, outside the tree the workspace sees.
//! - N = 0: a whole-disk workspace (`--rootfs`): `microagent-root` (ext4)
//!   is the root.

use std::collections::HashMap;
use std::ffi::CString;
use std::fs::File;
use std::path::Path;
use std::sync::OnceLock;

pub const LAYERS_KEY: &str = "microagent.layers";
const BOOT_SERIAL: &str = "microagent-boot";
const UPPER_SERIAL: &str = "microagent-upper";
const ROOT_SERIAL: &str = "microagent-root";
/// Where the new root and its parts are mounted (a tmpfs on the boot
/// disk's /run; it goes away with the old root).
const STAGE: &str = "/run/microagent";

/// A directory of the mounted upper filesystem, kept open after the
/// switch (its mount is detached then) so it can be frozen.
static UPPER: OnceLock<File> = OnceLock::new();

/// The upper filesystem, in an image workspace.
pub fn upper() -> Option<&'static File> {
    UPPER.get()
}

/// What the assembled root brought with it.
pub struct Assembled {
    /// The image's entrypoint spec (JSON), when the workspace runs it.
    pub entrypoint: Option<Vec<u8>>,
}

fn cstr(s: &str) -> Result<CString, String> {
    CString::new(s).map_err(|_| format!("NUL in {s:?}"))
}

fn mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> Result<(), String> {
    std::fs::create_dir_all(target).map_err(|e| format!("creating {target}: {e}"))?;
    crate::init::try_mount(source, target, fstype, flags, data)
        .map_err(|e| format!("mounting {source} ({fstype}) on {target}: {e}"))
}

/// serial -> /dev/vdX for every virtio-blk disk.
pub fn disks_by_serial() -> Result<HashMap<String, String>, String> {
    let mut out = HashMap::new();
    let rd = std::fs::read_dir("/sys/block").map_err(|e| format!("/sys/block: {e}"))?;
    for entry in rd.flatten() {
        let name = entry.file_name().to_string_lossy().into_owned();
        if !name.starts_with("vd") {
            continue;
        }
        let Ok(serial) = std::fs::read_to_string(entry.path().join("serial")) else {
            continue;
        };
        out.insert(
            serial.trim_end_matches(['\0', '\n']).to_string(),
            format!("/dev/{name}"),
        );
    }
    Ok(out)
}

/// Builds the workspace's root under [`STAGE`]/root and switches into it.
/// `layers` is the command line's `microagent.layers`; /proc and /dev are
/// already mounted (the command line and the console came from them).
pub fn assemble(layers: usize) -> Result<Assembled, String> {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, "")?;
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0700",
    )?;
    let disks = disks_by_serial()?;
    let disk = |serial: &str| {
        disks.get(serial).cloned().ok_or_else(|| {
            let mut found: Vec<_> = disks.keys().cloned().collect();
            found.sort();
            format!("no disk with serial {serial} (found: {})", found.join(", "))
        })
    };
    if !disks.contains_key(BOOT_SERIAL) {
        return Err(format!("booted without a {BOOT_SERIAL} disk"));
    }
    let root = format!("{STAGE}/root");
    let mut entrypoint = None;
    if layers == 0 {
        mount(&disk(ROOT_SERIAL)?, &root, "ext4", 0, "")?;
    } else {
        let upper = format!("{STAGE}/upper");
        mount(&disk(UPPER_SERIAL)?, &upper, "ext4", 0, "")?;
        for d in ["upper", "work"] {
            let p = format!("{upper}/{d}");
            std::fs::create_dir_all(&p).map_err(|e| format!("creating {p}: {e}"))?;
        }
        entrypoint = std::fs::read(format!("{upper}/meta/entrypoint.json")).ok();
        if let Ok(dir) = File::open(&upper) {
            let _ = UPPER.set(dir);
        }
        // overlayfs lists lower directories top first.
        let mut lower = Vec::with_capacity(layers);
        for i in (0..layers).rev() {
            let at = format!("{STAGE}/layer/{i}");
            mount(
                &disk(&format!("microagent-layer-{i}"))?,
                &at,
                "erofs",
                libc::MS_RDONLY,
                "",
            )?;
            lower.push(at);
        }
        let opts = format!(
            "lowerdir={},upperdir={upper}/upper,workdir={upper}/work",
            lower.join(":")
        );
        mount("overlay", &root, "overlay", 0, &opts)?;
    }
    switch_root(Path::new(&root))?;
    Ok(Assembled { entrypoint })
}

/// Makes `new_root` the root and lets go of the boot disk: pivot_root with
/// the old root stacked on the new one, then detached.
fn switch_root(new_root: &Path) -> Result<(), String> {
    // The basics of the boot root go with it; mount_basics remounts them
    // in the new root.
    crate::init::unmount_early();
    std::env::set_current_dir(new_root)
        .map_err(|e| format!("chdir {}: {e}", new_root.display()))?;
    let dot = cstr(".")?;
    // SAFETY: pivot_root(".", ".") stacks the old root on the new one (no
    // put_old directory needed); both pointers are valid C strings.
    let rc = unsafe { libc::syscall(libc::SYS_pivot_root, dot.as_ptr(), dot.as_ptr()) };
    if rc != 0 {
        return Err(format!("pivot_root: {}", std::io::Error::last_os_error()));
    }
    // SAFETY: detaches the old root now stacked on ".", a valid C string.
    if unsafe { libc::umount2(dot.as_ptr(), libc::MNT_DETACH) } != 0 {
        return Err(format!(
            "detaching the boot disk: {}",
            std::io::Error::last_os_error()
        ));
    }
    std::env::set_current_dir("/").map_err(|e| format!("chdir /: {e}"))?;
    Ok(())
}

/// The command line's `microagent.layers`, when the kernel booted the
/// boot disk.
pub fn layers_from_cmdline(cmdline: &str) -> Option<usize> {
    let prefix = format!("{LAYERS_KEY}=");
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix(prefix.as_str()))
        .next_back()
        .and_then(|n| n.parse().ok())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_last_layers_argument_wins_and_junk_is_ignored() {
        assert_eq!(layers_from_cmdline("quiet root=/dev/vda"), None);
        assert_eq!(layers_from_cmdline("microagent.layers=2 x"), Some(2));
        assert_eq!(
            layers_from_cmdline("microagent.layers=1 microagent.layers=3"),
            Some(3)
        );
        assert_eq!(layers_from_cmdline("microagent.layers=x"), None);
    }
}
