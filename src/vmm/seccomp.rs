//! Per-thread seccomp filters for the VMM, in the manner of Firecracker's:
//! once setup is done (KVM, memory, disks, sockets, passt all opened), each
//! thread kind installs the allowlist of what it still needs. A call
//! outside it raises SIGSYS; the handler writes `seccomp violation
//! (syscall NAME)` to the VMM's log and ends the process with
//! [`EXIT_SECCOMP`], which the supervisor turns into the crash reason.
//! Where SIGSYS is blocked at that moment the kernel kills the process
//! outright, and the supervisor names the syscall from the kernel's audit
//! record instead ([`audited_violation`]).
//!
//! The lists were read off `strace -ff` of VMMs (filters in log mode)
//! serving a cold boot with its boot-cache snapshot, warm and snapshot
//! restores, exec with stdin, cp both ways, published ports, pause and
//! resume, snapshots, fork and halts with automatic snapshots; plus what
//! other glibc versions than Debian 12's may call instead (clone vs
//! clone3, the fstat family).

use std::collections::BTreeMap;
use std::os::unix::fs::OpenOptionsExt;
use std::sync::OnceLock;

use seccompiler::{
    BpfProgram, SeccompAction, SeccompCmpArgLen, SeccompCmpOp, SeccompCondition, SeccompFilter,
    SeccompRule, TargetArch,
};

/// The exit status of a VMM killed by its filter (Firecracker's too).
pub const EXIT_SECCOMP: i32 = 148;

/// Debugging aids: `0` runs the VMM without filters, `log` lets every
/// call through but has the kernel log those outside the lists (audit
/// lines in dmesg). The VMM logs either.
pub const SECCOMP_ENV: &str = "MICROAGENT_VMM_SECCOMP";

/// What a filter does with a call outside its list.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mode {
    Off,
    Log,
    Enforce,
}

/// The mode `MICROAGENT_VMM_SECCOMP` asks for (default: enforce).
pub fn mode() -> Mode {
    match std::env::var(SECCOMP_ENV).as_deref() {
        Ok("0") | Ok("off") => Mode::Off,
        Ok("log") => Mode::Log,
        _ => Mode::Enforce,
    }
}

/// Test switch (documented in the README): syscall names, comma separated,
/// that every filter leaves out, so a test can make the VMM violate its
/// filter on demand. It only removes; it never adds.
pub const DENY_ENV: &str = "MICROAGENT_TEST_SECCOMP_DENY";

/// What a thread does, which decides what it may call.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ThreadKind {
    /// Runs KVM_RUN and the device register accesses it exits on.
    Vcpu,
    /// The main thread's device event loop: queues, disks, vsock, passt.
    EventLoop,
    /// The control socket's threads: pause, snapshot, halt, status.
    Control,
}

impl ThreadKind {
    pub const ALL: [ThreadKind; 3] = [ThreadKind::Vcpu, ThreadKind::EventLoop, ThreadKind::Control];

    pub fn name(self) -> &'static str {
        match self {
            ThreadKind::Vcpu => "vcpu",
            ThreadKind::EventLoop => "event loop",
            ThreadKind::Control => "control",
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum SeccompError {
    #[error("building the {kind} seccomp filter: {source}")]
    Build {
        kind: &'static str,
        source: seccompiler::BackendError,
    },
    #[error("installing the {kind} seccomp filter: {source}")]
    Install {
        kind: &'static str,
        source: std::io::Error,
    },
    #[error("{DENY_ENV}: unknown syscall name {0:?}")]
    UnknownSyscall(String),
    #[error("installing the SIGSYS handler: {0}")]
    Handler(std::io::Error),
}

/// What every thread needs: memory, locks, signals, its own end, time,
/// and reading and writing descriptors it was given.
const COMMON: &[i64] = &[
    libc::SYS_read,
    libc::SYS_write,
    libc::SYS_readv,
    libc::SYS_writev,
    libc::SYS_close,
    libc::SYS_futex,
    libc::SYS_mmap,
    libc::SYS_munmap,
    libc::SYS_mprotect,
    libc::SYS_mremap,
    libc::SYS_madvise,
    libc::SYS_brk,
    libc::SYS_rt_sigreturn,
    libc::SYS_rt_sigprocmask,
    libc::SYS_sigaltstack,
    libc::SYS_exit,
    libc::SYS_exit_group,
    libc::SYS_restart_syscall,
    libc::SYS_sched_yield,
    libc::SYS_sched_getaffinity,
    libc::SYS_clock_gettime,
    libc::SYS_clock_nanosleep,
    libc::SYS_nanosleep,
    libc::SYS_gettid,
    libc::SYS_getpid,
    libc::SYS_getrandom,
    libc::SYS_rseq,
    libc::SYS_fstat,
    libc::SYS_newfstatat,
    libc::SYS_statx,
    libc::SYS_lseek,
    // Rotating console.log (vCPUs run the serial port) and the log lines
    // any thread may write about its device.
    libc::SYS_openat,
    libc::SYS_rename,
    libc::SYS_renameat,
    libc::SYS_renameat2,
    libc::SYS_fcntl,
];

/// Positioned reads and writes and flushes of disks and snapshot files:
/// every kind serves some (vCPUs: see [`VCPU`]).
const FILE_IO: &[i64] = &[
    libc::SYS_pread64,
    libc::SYS_pwrite64,
    libc::SYS_preadv,
    libc::SYS_pwritev,
    libc::SYS_fsync,
    libc::SYS_fdatasync,
];

/// A vCPU exits to device code: register writes activate devices (the
/// vsock then registers and reads its host sockets), and a queue notify
/// that misses its ioeventfd (a write of another width) is served inline,
/// disk I/O included.
const VCPU: &[i64] = &[
    libc::SYS_tgkill,
    libc::SYS_epoll_ctl,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
];

/// Disk I/O, the vsock and passt sockets, eventfds, and the end of the
/// run (stopping vCPUs, reaping passt).
const EVENT_LOOP: &[i64] = &[
    libc::SYS_epoll_create1,
    libc::SYS_epoll_wait,
    libc::SYS_epoll_pwait,
    libc::SYS_epoll_ctl,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_recvmsg,
    libc::SYS_sendmsg,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_tgkill,
    libc::SYS_kill,
    libc::SYS_wait4,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
];

/// Snapshots (files in the workspace's snapshot directory, the disk
/// chain's new delta), pause and resume, and a thread per client.
const CONTROL: &[i64] = &[
    libc::SYS_accept4,
    libc::SYS_recvfrom,
    libc::SYS_sendto,
    libc::SYS_shutdown,
    libc::SYS_getsockopt,
    libc::SYS_setsockopt,
    libc::SYS_clone,
    libc::SYS_clone3,
    libc::SYS_set_robust_list,
    libc::SYS_prctl,
    libc::SYS_tgkill,
    libc::SYS_fallocate,
    libc::SYS_ftruncate,
    libc::SYS_mkdir,
    libc::SYS_mkdirat,
    libc::SYS_unlink,
    libc::SYS_unlinkat,
    libc::SYS_rmdir,
    libc::SYS_getdents64,
    libc::SYS_fchmod,
    // No linkat: the engine links a snapshot's frozen chain, not the VMM.
];

/// ioctl numbers whose type byte is KVM's (`0xAE`): the only ioctls any
/// VMM thread makes once running.
const KVM_IOCTL_TYPE: u64 = 0xAE;

fn ioctl_rules(kind: ThreadKind) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let on_type = |ty: u64| {
        SeccompCondition::new(
            1,
            SeccompCmpArgLen::Dword,
            SeccompCmpOp::MaskedEq(0xff00),
            ty << 8,
        )
    };
    let exact = |req: u64| SeccompCondition::new(1, SeccompCmpArgLen::Dword, SeccompCmpOp::Eq, req);
    let mut rules = vec![SeccompRule::new(vec![on_type(KVM_IOCTL_TYPE)?])?];
    if kind != ThreadKind::Vcpu {
        // std's set_nonblocking and set_cloexec on accepted sockets.
        for req in [libc::FIONBIO, libc::FIOCLEX] {
            rules.push(SeccompRule::new(vec![exact(req)?])?);
        }
    }
    Ok(rules)
}

/// Signals go to this process's own threads (tgkill) or to one process
/// by pid (kill: passt at teardown), never to a process group or to
/// every process (-1), which as root would reach the whole host.
fn signal_rules(syscall: i64) -> Result<Vec<SeccompRule>, seccompiler::BackendError> {
    let arg0 = |op, v| SeccompCondition::new(0, SeccompCmpArgLen::Dword, op, v);
    let rule = if syscall == libc::SYS_tgkill {
        vec![arg0(SeccompCmpOp::Eq, u64::from(std::process::id()))?]
    } else {
        // pid_t is signed: as a Dword, -1 and groups are above PID_MAX.
        const PID_MAX_LIMIT: u64 = 1 << 22;
        vec![
            arg0(SeccompCmpOp::Gt, 0)?,
            arg0(SeccompCmpOp::Le, PID_MAX_LIMIT)?,
        ]
    };
    Ok(vec![SeccompRule::new(rule)?])
}

fn syscalls(kind: ThreadKind) -> impl Iterator<Item = i64> {
    let own = match kind {
        ThreadKind::Vcpu => VCPU,
        ThreadKind::EventLoop => EVENT_LOOP,
        ThreadKind::Control => CONTROL,
    };
    COMMON.iter().chain(FILE_IO).chain(own).copied()
}

/// The number of syscalls `kind` may make (ioctl counted once).
pub fn allowlist_len(kind: ThreadKind) -> usize {
    let mut all: Vec<i64> = syscalls(kind).collect();
    all.push(libc::SYS_ioctl);
    all.sort_unstable();
    all.dedup();
    all.len()
}

fn denied() -> Result<Vec<i64>, SeccompError> {
    let names = std::env::var(DENY_ENV).unwrap_or_default();
    names
        .split(',')
        .map(str::trim)
        .filter(|n| !n.is_empty())
        .map(|n| {
            n.parse::<syscalls::Sysno>()
                .map(|s| i64::from(s.id()))
                .map_err(|_| SeccompError::UnknownSyscall(n.to_string()))
        })
        .collect()
}

fn build(
    kind: ThreadKind,
    deny: &[i64],
    mismatch: SeccompAction,
) -> Result<BpfProgram, SeccompError> {
    let err = |source| SeccompError::Build {
        kind: kind.name(),
        source,
    };
    let mut rules: BTreeMap<i64, Vec<SeccompRule>> = syscalls(kind)
        .filter(|s| !deny.contains(s))
        .map(|s| (s, Vec::new()))
        .collect();
    if !deny.contains(&libc::SYS_ioctl) {
        rules.insert(libc::SYS_ioctl, ioctl_rules(kind).map_err(err)?);
    }
    for signal in [libc::SYS_tgkill, libc::SYS_kill] {
        if let Some(r) = rules.get_mut(&signal) {
            *r = signal_rules(signal).map_err(err)?;
        }
    }
    let filter = SeccompFilter::new(rules, mismatch, SeccompAction::Allow, TargetArch::x86_64)
        .map_err(err)?;
    filter.try_into().map_err(err)
}

struct Filters {
    vcpu: BpfProgram,
    event_loop: BpfProgram,
    control: BpfProgram,
}

static FILTERS: OnceLock<Filters> = OnceLock::new();

/// Builds every thread kind's filter and installs the SIGSYS handler, so
/// [`confine`] only has to load a filter. Call once, before the VMM's
/// threads start. Without it (or with [`Mode::Off`]) confine does nothing.
pub fn prepare(mode: Mode) -> Result<(), SeccompError> {
    let mismatch = match mode {
        Mode::Off => return Ok(()),
        Mode::Log => SeccompAction::Log,
        Mode::Enforce => SeccompAction::Trap,
    };
    let deny = denied()?;
    let filters = Filters {
        vcpu: build(ThreadKind::Vcpu, &deny, mismatch.clone())?,
        event_loop: build(ThreadKind::EventLoop, &deny, mismatch.clone())?,
        control: build(ThreadKind::Control, &deny, mismatch)?,
    };
    install_sigsys_handler()?;
    let _ = FILTERS.set(filters);
    Ok(())
}

/// Installs `kind`'s filter on the calling thread (and sets
/// no_new_privs); threads it spawns inherit it. A no-op unless
/// [`prepare`] ran.
pub fn confine(kind: ThreadKind) -> Result<(), SeccompError> {
    let Some(f) = FILTERS.get() else {
        return Ok(());
    };
    let prog = match kind {
        ThreadKind::Vcpu => &f.vcpu,
        ThreadKind::EventLoop => &f.event_loop,
        ThreadKind::Control => &f.control,
    };
    apply_logged(prog).map_err(|source| SeccompError::Install {
        kind: kind.name(),
        source,
    })
}

/// seccompiler's apply_filter, plus SECCOMP_FILTER_FLAG_LOG: the kernel
/// then also logs trapped calls (an audit line naming the syscall and the
/// pid). That is how a violation is named when the SIGSYS handler cannot
/// run: glibc blocks every signal around some calls (pthread_kill's
/// tgkill), and a blocked SIGSYS from seccomp kills the process outright.
fn apply_logged(prog: &BpfProgram) -> std::io::Result<()> {
    nix::sys::prctl::set_no_new_privs()?;
    let fprog = libc::sock_fprog {
        len: u16::try_from(prog.len()).map_err(std::io::Error::other)?,
        // seccompiler's sock_filter is #[repr(C)] with libc's layout.
        filter: prog.as_ptr().cast::<libc::sock_filter>().cast_mut(),
    };
    // SAFETY: the kernel copies the program from `fprog`, which points at
    // `prog`'s live instructions for the duration of the call.
    let rc = unsafe {
        libc::syscall(
            libc::SYS_seccomp,
            libc::SECCOMP_SET_MODE_FILTER,
            libc::SECCOMP_FILTER_FLAG_LOG,
            &fprog as *const libc::sock_fprog,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// The syscall the kernel's audit log says killed process `pid` (an
/// audit line `type=1326 … pid=PID … syscall=N`), read from /dev/kmsg:
/// for a VMM killed by SIGSYS without its handler. None when the log is
/// not readable (not root, dmesg_restrict) or has no such line.
pub fn audited_violation(pid: u32) -> Option<&'static str> {
    use std::io::Read;
    let mut kmsg = std::fs::OpenOptions::new()
        .read(true)
        .custom_flags(libc::O_NONBLOCK)
        .open("/dev/kmsg")
        .ok()?;
    let mut found = None;
    // One record per read; EAGAIN at the end. Bounded, whatever the
    // buffer holds.
    let mut record = vec![0u8; 8192];
    for _ in 0..100_000 {
        match kmsg.read(&mut record) {
            Ok(0) => break,
            Ok(n) => {
                if let Some(nr) = audit_syscall(&String::from_utf8_lossy(&record[..n]), pid) {
                    found = Some(nr);
                }
            }
            // EPIPE: records overwritten while reading; go on.
            Err(e) if e.raw_os_error() == Some(libc::EPIPE) => continue,
            Err(_) => break,
        }
    }
    let nr = usize::try_from(found?).ok()?;
    syscalls::Sysno::new(nr).map(|s| s.name())
}

/// The syscall number of a seccomp audit record about `pid`.
fn audit_syscall(record: &str, pid: u32) -> Option<i64> {
    if !record.contains("type=1326") {
        return None;
    }
    let field = |key: &str| {
        record
            .split_whitespace()
            .find_map(|w| w.strip_prefix(key))
            .map(str::to_string)
    };
    if field("pid=")? != pid.to_string() {
        return None;
    }
    field("syscall=")?.parse().ok()
}

/// `si_code` of a SIGSYS raised by a seccomp filter.
const SYS_SECCOMP: i32 = 1;

extern "C" fn on_sigsys(_: libc::c_int, info: *mut libc::siginfo_t, _: *mut libc::c_void) {
    // SAFETY: the kernel passes a valid siginfo to an SA_SIGINFO handler.
    // For SIGSYS its union holds `_sigsys`: the call address (8 bytes at
    // offset 16), then the syscall number (an int at offset 24).
    let (code, nr) = unsafe { ((*info).si_code, *(info as *const u8).add(24).cast::<i32>()) };
    if code != SYS_SECCOMP {
        return;
    }
    let name = usize::try_from(nr)
        .ok()
        .and_then(syscalls::Sysno::new)
        .map_or("unknown", |s| s.name());
    // Only async-signal-safe calls from here on: one write(2) (so the line
    // is not interleaved with other threads' log lines), then _exit(2).
    let mut line = [0u8; 96];
    let mut len = 0;
    for part in [b"seccomp violation (syscall ", name.as_bytes(), b")\n"] {
        let n = part.len().min(line.len() - len);
        line[len..len + n].copy_from_slice(&part[..n]);
        len += n;
    }
    // SAFETY: writing a live stack buffer to stderr (the VMM's log).
    unsafe { libc::write(2, line.as_ptr().cast(), len) };
    // SAFETY: _exit ends the process without running anything else.
    unsafe { libc::_exit(EXIT_SECCOMP) };
}

fn install_sigsys_handler() -> Result<(), SeccompError> {
    use nix::sys::signal::{sigaction, SaFlags, SigAction, SigHandler, SigSet, Signal};
    let action = SigAction::new(
        SigHandler::SigAction(on_sigsys),
        SaFlags::SA_SIGINFO,
        SigSet::all(),
    );
    // SAFETY: the handler only makes async-signal-safe calls.
    unsafe { sigaction(Signal::SIGSYS, &action) }
        .map(drop)
        .map_err(|e| SeccompError::Handler(e.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_builds_and_denying_removes() {
        for kind in ThreadKind::ALL {
            let full = build(kind, &[], SeccompAction::Trap).unwrap();
            let less = build(kind, &[libc::SYS_write], SeccompAction::Trap).unwrap();
            assert!(less.len() < full.len(), "{kind:?}");
        }
        // The README's table of allowlist sizes.
        let sizes = ThreadKind::ALL.map(allowlist_len);
        assert_eq!(sizes, [48, 61, 63], "update the README's seccomp table");
    }

    /// Runs `probe` in a child under `kind`'s filter (the filter and
    /// SIGSYS must not touch the test harness) and asserts the filter
    /// ended it: `probe` must make a call outside the list.
    fn assert_probe_is_stopped(kind: ThreadKind, probe: fn()) {
        let prog = build(kind, &[], SeccompAction::Trap).unwrap();
        // SAFETY: the child makes only async-signal-safe calls (sigaction,
        // prctl, seccomp, the probe's syscalls) before _exit.
        match unsafe { nix::unistd::fork() }.unwrap() {
            nix::unistd::ForkResult::Child => {
                install_sigsys_handler().unwrap();
                apply_logged(&prog).unwrap();
                probe();
                // SAFETY: only reached if the filter let the probe through.
                unsafe { libc::_exit(0) };
            }
            nix::unistd::ForkResult::Parent { child } => {
                let status = nix::sys::wait::waitpid(child, None).unwrap();
                assert_eq!(
                    status,
                    nix::sys::wait::WaitStatus::Exited(child, EXIT_SECCOMP)
                );
            }
        }
    }

    #[test]
    fn signals_reach_only_our_threads_and_single_pids() {
        assert_probe_is_stopped(ThreadKind::EventLoop, || {
            // SAFETY: signal 0 only checks that the pid exists.
            unsafe { libc::kill(std::process::id() as i32, 0) };
            // SAFETY: signal 0 again; kill(-1) is refused before it reaches
            // anyone.
            unsafe { libc::kill(-1, 0) };
        });
    }

    #[test]
    fn audit_records_name_the_syscall_of_their_pid_only() {
        let line = "6,1234,5678,-;audit: type=1326 audit(1796090266.858:83): auid=4294967295 \
                    uid=0 gid=0 ses=4294967295 pid=24459 comm=\"control-conn\" exe=\"/x\" \
                    sig=31 arch=c000003e syscall=234 compat=0 ip=0x7f code=0x30000";
        assert_eq!(audit_syscall(line, 24459), Some(234));
        assert_eq!(audit_syscall(line, 2445), None);
        assert_eq!(audit_syscall("audit: type=1300 pid=1 syscall=2", 1), None);
        assert_eq!(syscalls::Sysno::new(234).map(|s| s.name()), Some("tgkill"));
    }

    #[test]
    fn a_filtered_thread_is_stopped_at_the_first_call_outside_its_list() {
        assert_probe_is_stopped(ThreadKind::Vcpu, || {
            // mkdir is on no vCPU's list.
            // SAFETY: a plain syscall with a static path.
            unsafe { libc::mkdir(c"/nonexistent-seccomp-probe".as_ptr(), 0o700) };
        });
    }
}
