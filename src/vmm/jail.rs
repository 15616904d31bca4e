//! The VMM's jail, in the manner of Firecracker's jailer: once the VM is
//! set up (KVM, memory, disks, sockets and passt all open), the VMM's main
//! thread, before it starts any other thread, enters its own mount,
//! network and IPC namespaces and pivots into a new root, a small read-only tmpfs where
//! only the workspace directory is visible, at its own path. Every path
//! the VMM still uses (snapshot files, the console log's rotation, the
//! disk chain's next delta and chain.json) lies in that directory, so
//! none changes; everything else on the host (other workspaces, the image
//! store, /proc, /dev, /etc) is gone from its view. Threads started
//! afterwards inherit the namespace and root.
//!
//! Then, still alone, it drops root for good ([`drop_to`]): to the VMM
//! user the engine chose (by default the `microagent-vmm` system user),
//! with no supplementary groups and no capabilities left. The engine gave
//! that user what the VMM writes from then on (see
//! `engine::vmm_user`); the VMM's fds (KVM, memory, disks, sockets, passt)
//! were opened before and stay usable.
//!
//! Both need root: a VMM run by another user with access to /dev/kvm
//! skips them and keeps its seccomp filters and no_new_privs.

use std::path::Path;

use nix::mount::{mount, umount2, MntFlags, MsFlags};
use nix::sched::{unshare, CloneFlags};

/// `0` leaves the VMM in the host's mount namespace (a debugging aid; the
/// VMM's log says so).
pub const JAIL_ENV: &str = "MICROAGENT_VMM_JAIL";

/// The empty directory of the workspace the new root is mounted on (only
/// in the VMM's namespace: the host sees an empty directory).
pub const MOUNTPOINT: &str = ".jail";

/// The unprivileged identity a jailed VMM drops to: `UID:GID` on the
/// command line the engine builds.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct RunAs {
    pub uid: u32,
    pub gid: u32,
}

impl std::str::FromStr for RunAs {
    type Err = String;
    fn from_str(s: &str) -> Result<RunAs, String> {
        let bad = || format!("{s:?} is not UID:GID (two numbers, neither 0)");
        let (u, g) = s.split_once(':').ok_or_else(bad)?;
        let (uid, gid) = (u.parse().map_err(|_| bad())?, g.parse().map_err(|_| bad())?);
        if uid == 0 || gid == 0 {
            return Err(bad());
        }
        Ok(RunAs { uid, gid })
    }
}

impl std::fmt::Display for RunAs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "{}:{}", self.uid, self.gid)
    }
}

/// Drops root for good: no supplementary groups, then real, effective
/// and saved gid and uid (which also clears every capability), then a
/// check that root cannot be had back. Must run while the process has
/// one thread, like [`enter`].
pub fn drop_to(who: RunAs) -> Result<(), JailError> {
    use nix::unistd::{setgroups, setresgid, setresuid, Gid, Uid};
    let (uid, gid) = (Uid::from_raw(who.uid), Gid::from_raw(who.gid));
    // A change of credentials clears the parent-death signal (the VMM
    // must die with its supervisor): re-armed below.
    let death = nix::sys::prctl::get_pdeathsig().map_err(at("reading the parent-death signal"))?;
    let parent = nix::unistd::getppid();
    setgroups(&[]).map_err(at("setgroups([])"))?;
    setresgid(gid, gid, gid).map_err(at(format!("setresgid({gid})")))?;
    setresuid(uid, uid, uid).map_err(at(format!("setresuid({uid})")))?;
    if nix::unistd::setuid(Uid::from_raw(0)).is_ok() {
        return Err(at("checking the drop")(std::io::Error::other(
            "setuid(0) still succeeds",
        )));
    }
    if let Some(signal) = death {
        nix::sys::prctl::set_pdeathsig(signal).map_err(at("re-arming the parent-death signal"))?;
        // The parent may have died while it was off.
        if nix::unistd::getppid() != parent {
            return Err(at("re-arming the parent-death signal")(
                std::io::Error::other("the parent process is gone"),
            ));
        }
    }
    Ok(())
}

#[derive(Debug, thiserror::Error)]
#[error("entering the VMM's jail: {step}: {source}")]
pub struct JailError {
    step: String,
    source: std::io::Error,
}

fn at<E: Into<std::io::Error>>(step: impl Into<String>) -> impl FnOnce(E) -> JailError {
    let step = step.into();
    move |e| JailError {
        step,
        source: e.into(),
    }
}

/// Whether this VMM jails itself: it can (root) and was not told not to.
pub fn wanted() -> bool {
    nix::unistd::Uid::effective().is_root() && std::env::var(JAIL_ENV).as_deref() != Ok("0")
}

/// Enters the jail of workspace directory `dir` (see the module doc).
/// Must run while the process has one thread: other threads would stay
/// in the host's namespace.
/// `also` are further directories shown at their own paths (the chain
/// directories of the workspace's volumes, which the VMM freezes too).
pub fn enter(dir: &Path, also: &[std::path::PathBuf]) -> Result<(), JailError> {
    let dir = std::fs::canonicalize(dir).map_err(at(format!("resolving {}", dir.display())))?;
    let also = also
        .iter()
        .map(|d| std::fs::canonicalize(d).map_err(at(format!("resolving {}", d.display()))))
        .collect::<Result<Vec<_>, _>>()?;
    // Its own network and IPC namespaces too, where they cost nothing: the
    // VMM's sockets (control, vsock, passt's socketpair) are open already
    // and it opens no other (its seccomp filters refuse socket() anyway).
    // A pid namespace would do nothing: the VMM starts no process after
    // this point.
    unshare(CloneFlags::CLONE_NEWNS | CloneFlags::CLONE_NEWNET | CloneFlags::CLONE_NEWIPC)
        .map_err(at("unshare(CLONE_NEWNS | CLONE_NEWNET | CLONE_NEWIPC)"))?;
    // Nothing mounted from here on may reach the host's namespace.
    let none = None::<&str>;
    mount(none, "/", none, MsFlags::MS_REC | MsFlags::MS_PRIVATE, none)
        .map_err(at("making / private"))?;
    let root = dir.join(MOUNTPOINT);
    match std::fs::create_dir(&root) {
        Err(e) if e.kind() != std::io::ErrorKind::AlreadyExists => {
            return Err(at(format!("mkdir {}", root.display()))(e))
        }
        _ => {}
    }
    // mount() follows links: what a dropped VMM may have planted in its
    // workspace directory must not steer it.
    let md = std::fs::symlink_metadata(&root).map_err(at(format!("stat {}", root.display())))?;
    if !md.is_dir() {
        return Err(at(format!("{}", root.display()))(std::io::Error::other(
            "not a directory",
        )));
    }
    let hardened = MsFlags::MS_NOSUID | MsFlags::MS_NODEV | MsFlags::MS_NOEXEC;
    mount(
        Some("tmpfs"),
        &root,
        Some("tmpfs"),
        hardened,
        Some("size=64k,mode=0755"),
    )
    .map_err(at("mounting the new root (tmpfs)"))?;
    // The workspace (and its volumes), at their own paths inside the new root.
    for d in std::iter::once(&dir).chain(&also) {
        // Every directory must be a real one: mount() follows links.
        let md = std::fs::symlink_metadata(d).map_err(at(format!("stat {}", d.display())))?;
        if !md.is_dir() {
            return Err(at(format!("{}", d.display()))(std::io::Error::other(
                "not a directory",
            )));
        }
        let inside = root.join(d.strip_prefix("/").unwrap_or(d));
        // Traversable by the VMM user it may drop to, whatever the umask (the
        // VMM's is 077); the tmpfs holds nothing but these directories.
        use nix::sys::stat::{umask, Mode};
        let old_umask = umask(Mode::from_bits_truncate(0o022));
        let made = std::fs::create_dir_all(&inside);
        umask(old_umask);
        made.map_err(at(format!("mkdir {}", inside.display())))?;
        mount(Some(d.as_path()), &inside, none, MsFlags::MS_BIND, none)
            .map_err(at(format!("bind-mounting {}", d.display())))?;
        mount(
            none,
            &inside,
            none,
            MsFlags::MS_REMOUNT | MsFlags::MS_BIND | hardened,
            none,
        )
        .map_err(at(format!("hardening the mount of {}", d.display())))?;
    }
    let old = root.join("old");
    std::fs::create_dir(&old).map_err(at("mkdir old root"))?;
    nix::unistd::pivot_root(&root, &old).map_err(at("pivot_root"))?;
    nix::unistd::chdir("/").map_err(at("chdir /"))?;
    umount2("/old", MntFlags::MNT_DETACH).map_err(at("detaching the old root"))?;
    std::fs::remove_dir("/old").map_err(at("rmdir /old"))?;
    // The new root's own directories become read-only (the workspace
    // mount keeps its own flags).
    mount(
        none,
        "/",
        none,
        MsFlags::MS_REMOUNT | MsFlags::MS_BIND | MsFlags::MS_RDONLY | hardened,
        none,
    )
    .map_err(at("making the new root read-only"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    #[test]
    fn run_as_parses_two_nonzero_ids() {
        assert_eq!(
            "998:997".parse::<super::RunAs>(),
            Ok(super::RunAs { uid: 998, gid: 997 })
        );
        for bad in ["0:5", "5:0", "5", "a:b", "5:6:7", ""] {
            assert!(bad.parse::<super::RunAs>().is_err(), "{bad}");
        }
    }

    #[test]
    fn the_drop_leaves_no_way_back_to_root() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: dropping privileges needs root");
            return;
        }
        // SAFETY: as in the jail test below: the child only makes syscalls
        // and reads a file, and ends with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let who = super::RunAs {
                    uid: 65534,
                    gid: 65534,
                };
                let _ = nix::sys::prctl::set_pdeathsig(nix::sys::signal::Signal::SIGKILL);
                let code = match super::drop_to(who) {
                    Err(_) => 2,
                    Ok(()) => {
                        let status =
                            std::fs::read_to_string("/proc/self/status").unwrap_or_default();
                        let field = |name: &str| {
                            status
                                .lines()
                                .find_map(|l| l.strip_prefix(name))
                                .map(|v| v.split_whitespace().collect::<Vec<_>>().join(" "))
                                .unwrap_or_default()
                        };
                        let ok = field("Uid:") == "65534 65534 65534 65534"
                            && field("Gid:") == "65534 65534 65534 65534"
                            && field("Groups:").is_empty()
                            && field("CapEff:") == "0000000000000000"
                            && field("CapPrm:") == "0000000000000000"
                            && nix::unistd::setgid(nix::unistd::Gid::from_raw(0)).is_err()
                            // Still dies with its parent (the supervisor).
                            && nix::sys::prctl::get_pdeathsig()
                                == Ok(Some(nix::sys::signal::Signal::SIGKILL));
                        if ok {
                            0
                        } else {
                            1
                        }
                    }
                };
                // SAFETY: ends the child without running the harness's exit.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
    }

    #[test]
    fn the_jail_shows_the_workspace_and_nothing_else() {
        if !nix::unistd::Uid::effective().is_root() {
            eprintln!("SKIPPED: the jail needs root (CAP_SYS_ADMIN)");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        let ws = dir.path().join("w");
        std::fs::create_dir(&ws).unwrap();
        std::fs::write(ws.join("console.log"), b"x").unwrap();
        let host_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
        let host_port = host_listener.local_addr().unwrap();
        // A child process: the jail is for good.
        // SAFETY: the child touches no lock of the harness's threads but
        // malloc's, which glibc's fork holds across the fork for the child,
        // and ends with _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                let code = match super::enter(&ws, &[]) {
                    Err(_) => 2,
                    Ok(()) => {
                        let sees_ws = ws.join("console.log").is_file();
                        let sees_host = std::path::Path::new("/etc").exists()
                            || std::path::Path::new("/proc/self").exists()
                            || std::path::Path::new("/dev/kvm").exists();
                        // The new root is read-only; the workspace is not.
                        let root_ro = std::fs::write("/planted", b"x").is_err();
                        let ws_rw = std::fs::write(ws.join("new"), b"x").is_ok();
                        // A new network namespace: the host's listener
                        // is not there.
                        let own_net = std::net::TcpStream::connect(host_port).is_err();
                        if sees_ws && !sees_host && root_ro && ws_rw && own_net {
                            0
                        } else {
                            1
                        }
                    }
                };
                // SAFETY: ends the child without running the harness's exit.
                unsafe { libc::_exit(code) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(status, nix::sys::wait::WaitStatus::Exited(child, 0));
            }
        }
        // The host saw none of it, but the workspace's write.
        assert!(ws.join("new").is_file());
        assert!(ws.join(super::MOUNTPOINT).is_dir());
        assert_eq!(
            std::fs::read_dir(ws.join(super::MOUNTPOINT))
                .unwrap()
                .count(),
            0
        );
    }
}
