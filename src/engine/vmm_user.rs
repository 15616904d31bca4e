//! Who a jailed VMM runs as, what it is given to write, and taking back
//! what it wrote.
//!
//! When the engine runs as root, every VMM drops root once its VM is
//! built (`vmm::jail::drop_to`) to the user `MICROAGENT_VMM_USER` names
//! (a user name, or `UID:GID`): by default the `microagent-vmm` system
//! user, created with `useradd` on first use. `root` keeps the VMM root (a
//! debugging aid; the VMM's log says so). An engine run by another user
//! cannot change user: its VMM runs as that user.
//!
//! The dropped VMM still writes in its own workspace directory, which the
//! VMM prepares before it drops ([`give_workspace`]):
//! - the workspace directory and `snapshots/` become group-writable for
//!   the VMM's group with the sticky bit (mode 1770): it can create files
//!   there (a rotated console log, a snapshot's staging directory) but can
//!   neither rename nor remove what is not its own (records, secrets,
//!   snapshots, the VMM log);
//! - its chain directory `disk/` becomes its own: a freeze creates a delta
//!   and replaces `chain.json` there;
//! - `console.log` becomes its own, so it can rotate it.
//!
//! What it hands back (a staging directory) goes through [`take_back`]
//! before the engine reads or keeps any of it, and every root-run read of
//! a record or chain file refuses a symbolic link (`util::fs`, `disk`).

use std::os::unix::fs::{lchown, DirBuilderExt, MetadataExt, PermissionsExt};
use std::path::Path;

use nix::unistd::{Uid, User};

use super::{invalid, Error, Result};
use crate::vmm::jail::RunAs;
use crate::workspace::store::WorkspaceDir;

pub const VMM_USER_ENV: &str = "MICROAGENT_VMM_USER";
pub const DEFAULT_VMM_USER: &str = "microagent-vmm";

/// The user this engine's VMMs drop to; `None` when they cannot (the
/// engine is not root) or must not (`MICROAGENT_VMM_USER=root`).
pub fn resolve() -> Result<Option<RunAs>> {
    if !Uid::effective().is_root() {
        return Ok(None);
    }
    let name = std::env::var(VMM_USER_ENV).unwrap_or_else(|_| DEFAULT_VMM_USER.to_string());
    if matches!(name.as_str(), "root" | "0" | "0:0") {
        return Ok(None);
    }
    if let Ok(who) = name.parse::<RunAs>() {
        return Ok(Some(who));
    }
    let lookup = || {
        User::from_name(&name)
            .map_err(|e| invalid(format!("{VMM_USER_ENV}={name}: looking the user up: {e}")))
    };
    let user = match lookup()? {
        Some(user) => user,
        None if name == DEFAULT_VMM_USER => {
            create_system_user(&name)?;
            lookup()?.ok_or_else(|| {
                invalid(format!(
                    "the VMM user {name} is missing right after useradd made it"
                ))
            })?
        }
        None => {
            return Err(invalid(format!(
                "{VMM_USER_ENV}={name}: no such user (give a user name, UID:GID, or root)"
            )))
        }
    };
    if user.uid.is_root() || user.gid.as_raw() == 0 {
        return Err(invalid(format!(
            "{VMM_USER_ENV}={name}: uid {} gid {} is root's: the VMM would not drop anything",
            user.uid, user.gid
        )));
    }
    Ok(Some(RunAs {
        uid: user.uid.as_raw(),
        gid: user.gid.as_raw(),
    }))
}

/// `useradd --system`: no home, no login, its own group. A concurrent
/// engine may have made it first (useradd's status 9), which is fine.
fn create_system_user(name: &str) -> Result<()> {
    let useradd = ["/usr/sbin/useradd", "/sbin/useradd"]
        .into_iter()
        .find(|p| Path::new(p).exists())
        .unwrap_or("useradd");
    let out = std::process::Command::new(useradd)
        .args(["--system", "--user-group", "--no-create-home"])
        .args(["--home-dir", "/nonexistent", "--shell", "/usr/sbin/nologin"])
        .args(["--comment", "microagent VMM (unprivileged)", name])
        .output()
        .map_err(|e| {
            invalid(format!(
                "creating the VMM user {name}: running {useradd}: {e}"
            ))
        })?;
    match out.status.code() {
        Some(0) | Some(9) => Ok(()),
        _ => Err(invalid(format!(
            "creating the VMM user {name}: {useradd} failed ({}): {}; set {VMM_USER_ENV} \
             to an existing user, UID:GID, or root",
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        ))),
    }
}

/// Run by the VMM, still root, just before it drops to `who`: gives that
/// user what it writes from then on (see the module doc).
pub fn give_workspace(ws: &WorkspaceDir, who: RunAs) -> std::io::Result<()> {
    let shared = |dir: &Path| -> std::io::Result<()> {
        std::fs::DirBuilder::new()
            .mode(0o700)
            .recursive(true)
            .create(dir)?;
        lchown(dir, None, Some(who.gid))?;
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o1770))
    };
    shared(&ws.dir)?;
    shared(&ws.snapshots())?;
    let disk = ws.disk_dir();
    lchown(&disk, Some(who.uid), Some(who.gid))?;
    std::fs::set_permissions(&disk, std::fs::Permissions::from_mode(0o700))?;
    match lchown(ws.console_log(), Some(who.uid), Some(who.gid)) {
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(()),
        other => other,
    }
}

/// The same for a volume's chain directory `disk`, which the VMM freezes
/// (a new top and `chain.json`) when it snapshots the workspace.
pub fn give_volume(disk: &Path, who: RunAs) -> std::io::Result<()> {
    lchown(disk, Some(who.uid), Some(who.gid))?;
    std::fs::set_permissions(disk, std::fs::Permissions::from_mode(0o700))
}

/// Checks and takes back a directory tree the VMM wrote (a staging
/// directory, with the frozen chain's files linked in): only directories
/// and regular files are accepted, since a link would steer the engine's
/// later reads, and, when the engine is root, everything becomes root's,
/// so no VMM can change a snapshot afterwards, nor the frozen deltas its
/// workspace shares with snapshots and forks. `what` names the tree in
/// the refusal.
pub(crate) fn take_back(dir: &Path, what: &str) -> Result<()> {
    let root = Uid::effective().is_root();
    let refuse = |path: &Path, why: String| Error::SnapshotDamaged {
        message: format!("{what}: {}: {why}", path.display()),
    };
    let mut pending = vec![dir.to_path_buf()];
    while let Some(path) = pending.pop() {
        let md = std::fs::symlink_metadata(&path).map_err(|e| refuse(&path, e.to_string()))?;
        if md.is_dir() {
            let entries = std::fs::read_dir(&path).map_err(|e| refuse(&path, e.to_string()))?;
            for entry in entries {
                pending.push(entry.map_err(|e| refuse(&path, e.to_string()))?.path());
            }
        } else if !md.is_file() {
            return Err(refuse(
                &path,
                "not a regular file or directory; the VMM's output is refused".into(),
            ));
        }
        if root && (md.uid() != 0 || md.gid() != 0) {
            lchown(&path, Some(0), Some(0)).map_err(|e| refuse(&path, e.to_string()))?;
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn take_back_refuses_links_and_makes_files_roots() {
        let dir = tempfile::tempdir().unwrap();
        let t = dir.path().join("staging");
        std::fs::create_dir_all(t.join("disk")).unwrap();
        std::fs::write(t.join("memory.bin"), b"m").unwrap();
        std::fs::write(t.join("disk/d-1.delta"), b"d").unwrap();
        if Uid::effective().is_root() {
            lchown(t.join("disk/d-1.delta"), Some(65534), Some(65534)).unwrap();
        }
        take_back(&t, "test").unwrap();
        if Uid::effective().is_root() {
            let md = std::fs::metadata(t.join("disk/d-1.delta")).unwrap();
            assert_eq!((md.uid(), md.gid()), (0, 0));
        }
        std::os::unix::fs::symlink("/etc/passwd", t.join("disk/chain.json")).unwrap();
        let err = take_back(&t, "the VMM's snapshot").unwrap_err().to_string();
        assert!(
            err.contains("chain.json") && err.contains("not a regular file"),
            "{err}"
        );
    }
}
