//! What PID 1 must do before anything else: mount the basic filesystems and
//! set the hostname.

use std::ffi::CString;

/// mount(2) of `source` on `target`; names that hold a NUL are refused.
pub fn try_mount(
    source: &str,
    target: &str,
    fstype: &str,
    flags: libc::c_ulong,
    data: &str,
) -> std::io::Result<()> {
    let c = |v: &str| CString::new(v).map_err(|_| std::io::Error::other(format!("NUL in {v:?}")));
    let (s, t, f, d) = (c(source)?, c(target)?, c(fstype)?, c(data)?);
    // SAFETY: all pointers are to NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), f.as_ptr(), flags, d.as_ptr().cast()) };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn mount(source: &str, target: &str, fstype: &str, flags: libc::c_ulong, data: &str) {
    let _ = std::fs::create_dir_all(target);
    if let Err(e) = try_mount(source, target, fstype, flags, data) {
        // Already mounted (e.g. by the kernel) is fine.
        if e.raw_os_error() != Some(libc::EBUSY) {
            eprintln!("microagent-agent: mount {fstype} on {target}: {e}");
        }
    }
}

/// A private tmpfs (nosuid, nodev, noexec) at `target`.
pub fn mount_tmpfs(target: &str, data: &str) -> Result<(), String> {
    let (s, t, d) = (
        CString::new("tmpfs").unwrap_or_default(),
        CString::new(target).map_err(|_| format!("bad mount point {target:?}"))?,
        CString::new(data).unwrap_or_default(),
    );
    let flags = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    // SAFETY: all pointers are to NUL-terminated strings that outlive the call.
    let rc = unsafe { libc::mount(s.as_ptr(), t.as_ptr(), s.as_ptr(), flags, d.as_ptr().cast()) };
    if rc != 0 {
        return Err(format!(
            "mount tmpfs on {target}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(())
}

/// /proc and /dev, for the command line and the console before the root
/// is known (mount_basics mounts them again in the final root).
pub fn mount_early() {
    mount(
        "proc",
        "/proc",
        "proc",
        libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC,
        "",
    );
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
}

/// Lets go of what mount_early mounted (open files, the console, stay
/// valid), so mount_basics mounts the root's own.
pub fn unmount_early() {
    for m in [c"/proc", c"/sys", c"/dev"] {
        // SAFETY: a NUL-terminated path; a path not mounted only fails.
        unsafe { libc::umount2(m.as_ptr(), libc::MNT_DETACH) };
    }
}

pub fn mount_basics() {
    let nosuid_nodev_noexec = libc::MS_NOSUID | libc::MS_NODEV | libc::MS_NOEXEC;
    mount("proc", "/proc", "proc", nosuid_nodev_noexec, "");
    mount("sysfs", "/sys", "sysfs", nosuid_nodev_noexec, "");
    mount("devtmpfs", "/dev", "devtmpfs", libc::MS_NOSUID, "mode=0755");
    mount(
        "devpts",
        "/dev/pts",
        "devpts",
        libc::MS_NOSUID | libc::MS_NOEXEC,
        "gid=5,mode=620,ptmxmode=666",
    );
    mount(
        "tmpfs",
        "/dev/shm",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
    mount(
        "tmpfs",
        "/run",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=0755",
    );
    mount(
        "tmpfs",
        "/tmp",
        "tmpfs",
        libc::MS_NOSUID | libc::MS_NODEV,
        "mode=1777",
    );
}

/// `key=value` from the kernel command line (e.g. microagent.hostname=).
pub fn cmdline_value(key: &str) -> Option<String> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").ok()?;
    let prefix = format!("{key}=");
    cmdline
        .split_whitespace()
        .find_map(|w| w.strip_prefix(prefix.as_str()))
        .map(str::to_string)
}

/// Brings the loopback interface up (the kernel then gives it
/// 127.0.0.1/8). The kernel's `ip=` configuration does it for a workspace
/// with a NIC; one with `--network none` would otherwise have no
/// loopback at all, and services listening on 127.0.0.1 would be
/// unreachable from inside. Best effort: the error goes to the console.
pub fn loopback_up() {
    // SAFETY: a plain socket() call; the fd is closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        eprintln!(
            "microagent-agent: loopback: socket: {}",
            std::io::Error::last_os_error()
        );
        return;
    }
    // SAFETY: ifreq is plain old data; all-zero is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req.ifr_name.iter_mut().zip(b"lo\0") {
        *dst = *src as libc::c_char;
    }
    // SAFETY: SIOCGIFFLAGS/SIOCSIFFLAGS read and write `req`, a valid
    // ifreq naming "lo", through a valid socket fd.
    let rc = unsafe {
        if libc::ioctl(fd, libc::SIOCGIFFLAGS, &mut req) == 0 {
            req.ifr_ifru.ifru_flags |= (libc::IFF_UP | libc::IFF_RUNNING) as libc::c_short;
            libc::ioctl(fd, libc::SIOCSIFFLAGS, &req)
        } else {
            -1
        }
    };
    if rc != 0 {
        eprintln!(
            "microagent-agent: loopback: {}",
            std::io::Error::last_os_error()
        );
    }
    // SAFETY: closes the socket opened above.
    unsafe { libc::close(fd) };
}

pub fn set_hostname(name: &str) {
    // SAFETY: the pointer and length describe `name`'s bytes.
    let rc = unsafe { libc::sethostname(name.as_ptr().cast(), name.len()) };
    if rc != 0 {
        eprintln!(
            "microagent-agent: sethostname: {}",
            std::io::Error::last_os_error()
        );
    }
    let _ = std::fs::write("/etc/hostname", format!("{name}\n"));
}

pub fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_default()
}

pub fn uptime_ms() -> u64 {
    std::fs::read_to_string("/proc/uptime")
        .ok()
        .and_then(|s| {
            s.split_whitespace()
                .next()
                .and_then(|f| f.parse::<f64>().ok())
        })
        .map_or(0, |s| (s * 1000.0) as u64)
}

fn hex_bytes(s: &str) -> Vec<u8> {
    (0..s.len() / 2)
        .filter_map(|i| u8::from_str_radix(s.get(2 * i..2 * i + 2)?, 16).ok())
        .collect()
}

// _IOW('R', 0x03, int[2]) and _IO('R', 0x07) from <linux/random.h>.
const RNDADDENTROPY: libc::c_ulong = 0x4008_5203;
const RNDRESEEDCRNG: libc::c_ulong = 0x5207;

/// Gives a restored or forked guest its own identity: hostname, wall
/// clock, machine-id, and a CRNG reseeded with host entropy. Returns "" on
/// success, else what failed.
pub fn refresh(r: &guest_agent::Refresh) -> String {
    let mut errors = Vec::new();
    if !r.hostname.is_empty() {
        set_hostname(&r.hostname);
    }
    let ts = libc::timespec {
        tv_sec: (r.unix_time_ns / 1_000_000_000) as libc::time_t,
        tv_nsec: (r.unix_time_ns % 1_000_000_000) as libc::c_long,
    };
    // SAFETY: clock_settime reads a timespec we own.
    if unsafe { libc::clock_settime(libc::CLOCK_REALTIME, &ts) } != 0 {
        errors.push(format!(
            "setting the clock: {}",
            std::io::Error::last_os_error()
        ));
    }
    let entropy = hex_bytes(&r.entropy_hex);
    match std::fs::OpenOptions::new().write(true).open("/dev/urandom") {
        Ok(f) => {
            use std::os::fd::AsRawFd;
            // struct rand_pool_info { int entropy_count; int buf_size; u32 buf[]; }
            let mut info = Vec::with_capacity(8 + entropy.len());
            info.extend_from_slice(&((entropy.len() * 8) as i32).to_ne_bytes());
            info.extend_from_slice(&(entropy.len() as i32).to_ne_bytes());
            info.extend_from_slice(&entropy);
            // SAFETY: the buffer holds a complete rand_pool_info of the
            // sizes it declares; RNDRESEEDCRNG takes no argument.
            unsafe {
                if libc::ioctl(f.as_raw_fd(), RNDADDENTROPY, info.as_ptr()) != 0 {
                    errors.push(format!(
                        "adding entropy: {}",
                        std::io::Error::last_os_error()
                    ));
                }
                if libc::ioctl(f.as_raw_fd(), RNDRESEEDCRNG) != 0 {
                    errors.push(format!("reseeding: {}", std::io::Error::last_os_error()));
                }
            }
        }
        Err(e) => errors.push(format!("/dev/urandom: {e}")),
    }
    if r.machine_id.len() == 32 && r.machine_id.bytes().all(|b| b.is_ascii_hexdigit()) {
        let _ = std::fs::write("/etc/machine-id", format!("{}\n", r.machine_id));
    }
    // The host may snapshot right after this (a boot snapshot): the disk
    // copy must hold what the guest's page cache believes is written.
    // SAFETY: sync takes no arguments and cannot fail.
    unsafe { libc::sync() };
    errors.join("; ")
}
