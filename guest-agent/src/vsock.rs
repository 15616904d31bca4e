//! AF_VSOCK stream sockets through libc (std has none).

use std::fs::File;
use std::io;
use std::os::fd::{FromRawFd, RawFd};

#[repr(C)]
struct SockaddrVm {
    family: libc::sa_family_t,
    reserved1: u16,
    port: u32,
    cid: u32,
    zero: [u8; 4],
}

const VMADDR_CID_ANY: u32 = u32::MAX;

impl SockaddrVm {
    fn new(cid: u32, port: u32) -> SockaddrVm {
        SockaddrVm {
            family: libc::AF_VSOCK as libc::sa_family_t,
            reserved1: 0,
            port,
            cid,
            zero: [0; 4],
        }
    }
}

/// Starts a connection to `cid:port` without waiting for it: the socket,
/// whose connect is in progress (or done). Used by the hostile test
/// program, which abandons it at once.
pub fn connect_nonblocking(cid: u32, port: u32) -> io::Result<std::os::fd::OwnedFd> {
    use std::os::fd::FromRawFd;
    // SAFETY: plain socket creation; the fd is owned from here on.
    let fd = unsafe {
        libc::socket(
            libc::AF_VSOCK,
            libc::SOCK_STREAM | libc::SOCK_NONBLOCK | libc::SOCK_CLOEXEC,
            0,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: a fresh fd, owned by nothing else.
    let owned = unsafe { std::os::fd::OwnedFd::from_raw_fd(fd) };
    let addr = SockaddrVm::new(cid, port);
    // SAFETY: addr is a valid sockaddr_vm of the size we pass.
    let rc = unsafe {
        libc::connect(
            fd,
            (&addr as *const SockaddrVm).cast(),
            std::mem::size_of::<SockaddrVm>() as libc::socklen_t,
        )
    };
    let e = io::Error::last_os_error();
    if rc == 0 || e.raw_os_error() == Some(libc::EINPROGRESS) {
        Ok(owned)
    } else {
        Err(e)
    }
}

pub struct Listener(RawFd);

impl Listener {
    pub fn bind(port: u32) -> io::Result<Listener> {
        // SAFETY: plain socket creation; the fd is owned by the Listener.
        let fd = unsafe { libc::socket(libc::AF_VSOCK, libc::SOCK_STREAM | libc::SOCK_CLOEXEC, 0) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let addr = SockaddrVm::new(VMADDR_CID_ANY, port);
        // SAFETY: addr is a valid sockaddr_vm of the size we pass.
        let rc = unsafe {
            libc::bind(
                fd,
                (&addr as *const SockaddrVm).cast(),
                std::mem::size_of::<SockaddrVm>() as libc::socklen_t,
            )
        };
        // SAFETY: listen on the fd we just bound.
        if rc != 0 || unsafe { libc::listen(fd, 128) } != 0 {
            let e = io::Error::last_os_error();
            // SAFETY: closing the fd we own.
            unsafe { libc::close(fd) };
            return Err(e);
        }
        Ok(Listener(fd))
    }

    /// Blocks for the next connection.
    pub fn accept(&self) -> io::Result<File> {
        loop {
            // SAFETY: accept4 without an address buffer.
            let fd = unsafe {
                libc::accept4(
                    self.0,
                    std::ptr::null_mut(),
                    std::ptr::null_mut(),
                    libc::SOCK_CLOEXEC,
                )
            };
            if fd >= 0 {
                // SAFETY: a fresh fd from accept4, owned by the File from now on.
                return Ok(unsafe { File::from_raw_fd(fd) });
            }
            let e = io::Error::last_os_error();
            if e.kind() != io::ErrorKind::Interrupted {
                return Err(e);
            }
        }
    }
}
