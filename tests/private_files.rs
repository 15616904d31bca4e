//! Run as an unprivileged user with the most permissive umask,
//! microagent leaves nothing under its state directory that another local
//! user can reach: a workspace with a secret, its disk chain, records and
//! caches, all the user's own. No guest boots
//! (the user has no /dev/kvm here); guest memory, state and console files
//! are covered by the 0600/0700 checks of the VM tests, run as root.

mod common;

use std::os::unix::fs::{MetadataExt, PermissionsExt};
use std::path::Path;
use std::process::Command;

use common::*;

/// `nobody`, as Debian numbers it.
const NOBODY: u32 = 65534;

fn walk(dir: &Path, out: &mut Vec<(String, u32, u32)>) {
    for e in std::fs::read_dir(dir).unwrap().flatten() {
        let md = e.path().symlink_metadata().unwrap();
        out.push((e.path().display().to_string(), md.mode(), md.uid()));
        if md.is_dir() {
            walk(&e.path(), out);
        }
    }
}

#[test]
fn an_unprivileged_users_state_is_private() {
    // SAFETY: geteuid has no preconditions.
    if unsafe { libc::geteuid() } != 0 {
        eprintln!("skipped: switching to an unprivileged user needs root");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // The user's own home for the test (the tempdir's parent is only
    // traversable), holding a copy of the inputs it must read.
    let home = dir.path().join("home");
    std::fs::create_dir(&home).unwrap();
    let rootfs = busybox_rootfs(&home, "#!/bin/sh\nexec sleep 100000\n");
    let kernel = home.join("vmlinux");
    std::fs::copy(vmlinux(), &kernel).unwrap();
    let secret = home.join("token");
    std::fs::write(&secret, "s3cret-value-for-the-test").unwrap();
    std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o711)).unwrap();
    let chown = Command::new("chown")
        .args(["-R", &format!("{NOBODY}:{NOBODY}")])
        .arg(&home)
        .status()
        .unwrap();
    assert!(chown.success());
    ensure_agent();

    let state = home.join("state");
    let out = Command::new("setpriv")
        .args([
            &format!("--reuid={NOBODY}"),
            &format!("--regid={NOBODY}"),
            "--clear-groups",
            "--",
            // The most permissive umask: modes must be ours, not the
            // caller's.
            "sh",
            "-c",
            "umask 000; exec \"$@\"",
            "sh",
        ])
        .arg(env!("CARGO_BIN_EXE_microagent"))
        .args(["create", "w", "--rootfs"])
        .arg(&rootfs)
        .arg("--kernel")
        .arg(&kernel)
        .args(["--memory", "256", "--init", "/init", "--secret"])
        .arg(format!("API_TOKEN=@{}", secret.display()))
        .env("MICROAGENT_HOME", &state)
        .env("HOME", &home)
        .env_remove("MICROAGENT_BOOT_CACHE")
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "create as nobody: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let mut entries = Vec::new();
    walk(&state, &mut entries);
    assert!(
        entries.iter().any(|(p, _, _)| p.ends_with("workspaces/w")),
        "{entries:?}"
    );
    let foreign: Vec<_> = entries
        .iter()
        .filter(|(_, _, uid)| *uid != NOBODY)
        .collect();
    assert!(foreign.is_empty(), "not the user's own: {foreign:?}");
    // The doors are shut whatever the umask: the state directory, the
    // workspaces and each workspace are 0700, secrets 0600.
    let mode = |p: &Path| std::fs::metadata(p).unwrap().mode() & 0o7777;
    assert_eq!(mode(&state), 0o700, "the state directory");
    assert_eq!(mode(&state.join("workspaces")), 0o700);
    assert_eq!(mode(&state.join("workspaces/w")), 0o700);
    let secrets: Vec<_> = entries
        .iter()
        .filter(|(p, m, _)| p.contains("secret") && m & 0o170000 == 0o100000)
        .collect();
    assert!(!secrets.is_empty(), "no secret file found: {entries:?}");
    for (p, m, _) in &secrets {
        assert_eq!(m & 0o777, 0o600, "{p}");
    }
    // So nothing below is reachable, let alone readable, by others: a
    // path is open to them only if every directory above it is.
    let reachable = |p: &Path| {
        p.ancestors()
            .skip(1)
            .take_while(|a| a.starts_with(&state))
            .all(|a| mode(a) & 0o001 != 0)
    };
    let readable: Vec<_> = entries
        .iter()
        .filter(|(p, m, _)| m & 0o004 != 0 && reachable(Path::new(p)))
        .collect();
    assert!(readable.is_empty(), "readable by others: {readable:?}");
    // Inside those directories, files still take the caller's umask (here
    // 000); say which, so the gap stays visible until every mode is ours.
    let umask_modes: Vec<_> = entries
        .iter()
        .filter(|(_, m, _)| m & 0o170000 != 0o120000 && m & 0o007 != 0)
        .map(|(p, m, _)| {
            format!(
                "{:o} {}",
                m & 0o777,
                p.trim_start_matches(state.to_str().unwrap())
            )
        })
        .collect();
    eprintln!("modes left to the umask (behind 0700): {umask_modes:#?}");
}
