//! Who is on the other end of a Unix socket.

use std::os::unix::net::UnixStream;

/// Whether the peer runs as our own user or as root (SO_PEERCRED). The
/// VMM's sockets live in a 0700 directory already; this keeps another
/// user out even if that directory's mode is loosened.
pub fn trusted(stream: &UnixStream) -> bool {
    use nix::sys::socket::{getsockopt, sockopt::PeerCredentials};
    match getsockopt(stream, PeerCredentials) {
        Ok(cred) => {
            let peer = cred.uid();
            peer == 0 || peer == nix::unistd::geteuid().as_raw()
        }
        Err(_) => false,
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn our_own_end_is_trusted() {
        let (a, _b) = std::os::unix::net::UnixStream::pair().unwrap();
        assert!(super::trusted(&a));
    }

    #[test]
    fn another_user_is_not() {
        use std::os::unix::fs::PermissionsExt;
        use std::os::unix::process::CommandExt;
        if !nix::unistd::geteuid().is_root() {
            eprintln!("SKIPPED: needs root to connect as another user");
            return;
        }
        let dir = tempfile::tempdir().unwrap();
        std::fs::set_permissions(dir.path(), std::fs::Permissions::from_mode(0o777)).unwrap();
        let path = dir.path().join("s.sock");
        let listener = std::os::unix::net::UnixListener::bind(&path).unwrap();
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o777)).unwrap();
        let Ok(mut child) = std::process::Command::new("python3")
            .args([
                "-c",
                "import socket,sys,time; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); time.sleep(2)",
            ])
            .arg(&path)
            .uid(65534)
            .gid(65534)
            .spawn()
        else {
            eprintln!("SKIPPED: python3 is needed to connect as another user");
            return;
        };
        let (stream, _) = listener.accept().unwrap();
        assert!(!super::trusted(&stream), "uid 65534 was trusted");
        let _ = child.kill();
        let _ = child.wait();
    }
}
