//! Volumes: separate disks the host attaches (`microagent-vol-N`, found by
//! serial like every disk), mounted where the command line's
//! `microagent.volumes=/path[:ro],...` says, in the workspace's root,
//! before anything else runs. The host checked the paths; they are
//! checked again here (a command line is input too).

use std::fs::File;
use std::sync::OnceLock;

pub const VOLUMES_KEY: &str = "microagent.volumes";

/// Each mounted volume's root directory, by index, kept open so the host
/// can have it frozen (FIFREEZE) for a consistent volume snapshot.
static MOUNTED: OnceLock<Vec<File>> = OnceLock::new();

/// The mounted volume `index`, if there is one.
pub fn get(index: u32) -> Option<&'static File> {
    MOUNTED.get()?.get(index as usize)
}

/// Every mounted volume.
pub fn all() -> &'static [File] {
    MOUNTED.get().map_or(&[], Vec::as_slice)
}

/// `/a,/b:ro` → [("/a", false), ("/b", true)]; None when a path is not
/// absolute and plain.
pub fn parse(list: &str) -> Option<Vec<(String, bool)>> {
    list.split(',')
        .map(|item| {
            let (path, ro) = match item.strip_suffix(":ro") {
                Some(p) => (p, true),
                None => (item, false),
            };
            let plain = path.starts_with('/')
                && path.len() > 1
                && path
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b"._-/".contains(&b))
                && !path.split('/').any(|c| c == "." || c == "..");
            plain.then(|| (path.to_string(), ro))
        })
        .collect()
}

/// Mounts the volumes the command line names (after the root is built
/// and /sys is mounted). An error names the volume and the path.
pub fn mount_all() -> Result<(), String> {
    let Some(list) = crate::init::cmdline_value(VOLUMES_KEY) else {
        return Ok(());
    };
    let wanted = parse(&list)
        .ok_or_else(|| format!("{VOLUMES_KEY}={list}: not a list of plain absolute paths"))?;
    let disks = crate::root::disks_by_serial()?;
    let mut mounted = Vec::with_capacity(wanted.len());
    for (i, (path, ro)) in wanted.iter().enumerate() {
        let serial = format!("microagent-vol-{i}");
        let dev = disks
            .get(&serial)
            .ok_or_else(|| format!("volume {i} ({path}): no disk with serial {serial}"))?;
        std::fs::create_dir_all(path).map_err(|e| format!("volume {i}: creating {path}: {e}"))?;
        // A read-only disk cannot replay a journal: `noload` mounts what
        // was last written whole (the host froze or cleanly stopped it).
        let (flags, data) = match ro {
            true => (libc::MS_RDONLY | libc::MS_NODEV | libc::MS_NOSUID, "noload"),
            false => (libc::MS_NODEV | libc::MS_NOSUID, ""),
        };
        crate::init::try_mount(dev, path, "ext4", flags, data)
            .map_err(|e| format!("volume {i}: mounting {dev} on {path}: {e}"))?;
        mounted.push(File::open(path).map_err(|e| format!("volume {i}: opening {path}: {e}"))?);
    }
    let _ = MOUNTED.set(mounted);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn volume_lists_parse_and_anything_else_is_refused() {
        assert_eq!(
            parse("/data,/srv/c:ro"),
            Some(vec![("/data".into(), false), ("/srv/c".into(), true)])
        );
        for bad in ["data", "/", "/a/../b", "/a b", "/a,", ""] {
            assert_eq!(parse(bad), None, "{bad}");
        }
    }
}
