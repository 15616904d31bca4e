//! microagent's guest agent: PID 1 of every workspace. It sets up the
//! basic filesystems, reaps orphans, and serves the host over vsock: exec
//! with streamed stdio, power-off, file copies. Blocking I/O with a thread
//! per stream: on PVM hosts every system call is expensive, and an async
//! runtime would only add wake-up syscalls to a handful of streams.

mod copy;
mod exec;
mod freeze;
mod init;
mod reaper;
mod root;
mod secrets;
mod volumes;
mod zeroing_alloc;

#[global_allocator]
static ALLOC: zeroing_alloc::ZeroOnFree = zeroing_alloc::ZeroOnFree;

use std::fs::File;
use std::sync::{Arc, Mutex};

use guest_agent::vsock;
use guest_agent::{
    read_frame, write_json, Hello, Kind, Request, Response, AGENT_PORT, PROTOCOL_VERSION,
};

fn response(ok: bool, message: String) -> Response {
    Response {
        ok,
        message,
        hostname: init::hostname(),
        uptime_ms: init::uptime_ms(),
    }
}

fn session(conn: File) {
    let Ok(mut reader) = conn.try_clone() else {
        return;
    };
    let w: exec::Writer = Arc::new(Mutex::new(conn));
    let hello = match read_frame(&mut reader) {
        Ok(f) if f.kind == Kind::Hello => f.json::<Hello>(),
        Ok(f) => {
            exec::send_error(&w, format!("expected HELLO, got {:?}", f.kind));
            return;
        }
        Err(_) => return,
    };
    match hello {
        Ok(h) if h.version == PROTOCOL_VERSION => {}
        Ok(h) => {
            exec::send_error(
                &w,
                format!(
                    "unsupported protocol version {} (agent speaks {PROTOCOL_VERSION})",
                    h.version
                ),
            );
            return;
        }
        Err(e) => {
            exec::send_error(&w, e.to_string());
            return;
        }
    }
    {
        let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
        let me = Hello {
            version: PROTOCOL_VERSION,
            role: "agent".into(),
        };
        if write_json(&mut *f, Kind::Hello, &me).is_err() {
            return;
        }
    }
    let req = match read_frame(&mut reader).and_then(|f| f.json::<Request>()) {
        Ok(r) => r,
        Err(e) => {
            exec::send_error(&w, e.to_string());
            return;
        }
    };
    match req {
        Request::Ping => reply(&w, response(true, String::new())),
        Request::Exec(e) => exec::run(e, reader, w),
        Request::Shutdown => {
            reply(&w, response(true, "powering off".into()));
            power_off();
        }
        Request::CopyIn { dest } => copy::copy_in(&dest, reader, &w),
        Request::CopyOut { path } => copy::copy_out(&path, &w),
        Request::ArchivePaths { includes, excludes } => {
            copy::archive_paths(&includes, &excludes, &w)
        }
        Request::Refresh(r) => {
            let msg = init::refresh(&r);
            reply(&w, response(msg.is_empty(), msg));
        }
        Request::SecretsPut { secrets, replace } => {
            let r = secrets::put(&secrets, replace, &mut reader);
            reply(&w, result_response(r));
        }
        Request::SecretsRemove { keys } => reply(&w, result_response(secrets::remove(&keys))),
        Request::SecretsScrub => reply(&w, result_response(secrets::scrub_all())),
        Request::FreezeUpper { timeout_s } => match root::upper() {
            Some(fs) => freeze::serve(fs, timeout_s, reader, |r| {
                reply(&w, result_response_msg(r));
            }),
            None => reply(
                &w,
                response(false, "this workspace has no upper disk to freeze".into()),
            ),
        },
        Request::FreezeVolume { index, timeout_s } => match volumes::get(index) {
            Some(fs) => freeze::serve(fs, timeout_s, reader, |r| {
                reply(&w, result_response_msg(r));
            }),
            None => reply(&w, response(false, format!("no volume {index} is mounted"))),
        },
    }
}

fn result_response(r: Result<(), String>) -> Response {
    match r {
        Ok(()) => response(true, String::new()),
        Err(e) => response(false, e),
    }
}

fn result_response_msg(r: Result<String, String>) -> Response {
    match r {
        Ok(m) => response(true, m),
        Err(e) => response(false, e),
    }
}

fn reply(w: &exec::Writer, r: Response) {
    let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
    let _ = write_json(&mut *f, Kind::Response, &r);
}

/// Stops every process, makes the disk consistent and powers off (through
/// the i8042 reset line, which the VMM treats as power-off).
fn power_off() -> ! {
    // SAFETY: sync/kill/mount/reboot are plain system calls with valid
    // arguments; as PID 1, kill(-1) spares us.
    unsafe {
        libc::sync();
        libc::kill(-1, libc::SIGTERM);
        std::thread::sleep(std::time::Duration::from_millis(500));
        libc::kill(-1, libc::SIGKILL);
        libc::mount(
            std::ptr::null(),
            c"/".as_ptr(),
            std::ptr::null(),
            libc::MS_REMOUNT | libc::MS_RDONLY,
            std::ptr::null(),
        );
        libc::sync();
    }
    // The overlay's remount left the upper writable: freezing it leaves
    // its journal clean, so the host can read a halted workspace's
    // changes (commit, diff) without replaying it.
    if let Some(upper) = root::upper() {
        let _ = freeze::freeze(upper);
    }
    for v in volumes::all() {
        let _ = freeze::freeze(v);
    }
    // SAFETY: as above.
    unsafe {
        libc::reboot(libc::RB_AUTOBOOT);
    }
    loop {
        std::thread::sleep(std::time::Duration::from_secs(1));
    }
}

/// Points stdio at the console: the kernel may have found no /dev/console
/// on the root disk before devtmpfs was mounted.
fn console_stdio() {
    if let Ok(c) = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open("/dev/console")
    {
        use std::os::fd::AsRawFd;
        for fd in 0..3 {
            // SAFETY: dup2 onto the standard fds.
            unsafe { libc::dup2(c.as_raw_fd(), fd) };
        }
    }
}

/// Starts the workspace's own init/entrypoint (microagent.init=PATH) as a
/// child, with the console as its stdio.
/// `spec` is the entrypoint the assembled root brought; without it, a
/// root disk made before layered disks may hold one at ENTRYPOINT_PATH.
fn start_entrypoint(spec: Option<Vec<u8>>) {
    let mut cmd;
    let path;
    if let Some(p) = init::cmdline_value("microagent.init") {
        cmd = std::process::Command::new(&p);
        cmd.current_dir("/");
        path = p;
    } else {
        // The image's own Entrypoint + Cmd, when the workspace asked for it.
        let Some(bytes) = spec.or_else(|| std::fs::read(guest_agent::ENTRYPOINT_PATH).ok()) else {
            return;
        };
        let spec: guest_agent::EntrypointSpec = match serde_json::from_slice(&bytes) {
            Ok(s) => s,
            Err(e) => {
                eprintln!(
                    "microagent-agent: bad {}: {e}",
                    guest_agent::ENTRYPOINT_PATH
                );
                return;
            }
        };
        let Some((prog, args)) = spec.argv.split_first() else {
            return;
        };
        cmd = std::process::Command::new(prog);
        cmd.args(args)
            .current_dir(spec.cwd.as_deref().unwrap_or("/"));
        for kv in &spec.env {
            if let Some((k, v)) = kv.split_once('=') {
                cmd.env(k, v);
            }
        }
        if let Some(user) = spec.user.as_deref() {
            use std::os::unix::process::CommandExt;
            match exec::lookup_user(user.split(':').next().unwrap_or(user)) {
                Some(u) => {
                    cmd.uid(u.uid).gid(u.gid).env("HOME", &u.home);
                }
                None => {
                    eprintln!("microagent-agent: entrypoint user {user:?} not found");
                    return;
                }
            }
        }
        path = spec.argv.join(" ");
    }
    let spawned = reaper::spawn_watched(move || {
        let child = cmd.spawn()?;
        let pid = child.id() as i32;
        Ok((child, pid))
    });
    match spawned {
        Ok((_, rx)) => {
            std::thread::spawn(move || {
                if let Ok(st) = rx.recv() {
                    eprintln!("microagent-agent: entrypoint {path} exited: {st:?}");
                }
            });
        }
        Err(e) => eprintln!("microagent-agent: starting entrypoint {path}: {e}"),
    }
}

/// Booted from the shared boot disk: build the workspace's root and move
/// into it. A root that cannot be built is fatal: say why on the console
/// and power off, so the host reports it instead of waiting.
fn assemble_root() -> Option<Vec<u8>> {
    init::mount_early();
    console_stdio();
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    let Some(layers) = root::layers_from_cmdline(&cmdline) else {
        init::unmount_early();
        return None;
    };
    match root::assemble(layers) {
        Ok(a) => a.entrypoint,
        Err(e) => {
            eprintln!("microagent-agent: FATAL: assembling the workspace root: {e}");
            std::thread::sleep(std::time::Duration::from_millis(200));
            // SAFETY: reboot with a valid command; the VMM treats the
            // reset as power-off.
            unsafe { libc::reboot(libc::RB_AUTOBOOT) };
            None
        }
    }
}

fn main() {
    let mut entrypoint = None;
    if std::process::id() == 1 {
        entrypoint = assemble_root();
        init::mount_basics();
        console_stdio();
        if let Err(e) = volumes::mount_all() {
            // Like a root that cannot be built: the host reports why.
            eprintln!("microagent-agent: FATAL: mounting volumes: {e}");
            std::thread::sleep(std::time::Duration::from_millis(200));
            // SAFETY: reboot with a valid command; the VMM treats the
            // reset as power-off.
            unsafe { libc::reboot(libc::RB_AUTOBOOT) };
        }
        let name =
            init::cmdline_value("microagent.hostname").unwrap_or_else(|| "microagent".into());
        init::set_hostname(&name);
        init::loopback_up();
        // With a NIC the VMM names passt's DNS forwarder; point the
        // resolver at it (as Docker does, the image's file is replaced).
        if let Some(dns) = init::cmdline_value("microagent.dns") {
            if dns.parse::<std::net::Ipv4Addr>().is_ok() {
                let _ = std::fs::write("/etc/resolv.conf", format!("nameserver {dns}\n"));
            }
        }
    }
    reaper::spawn();
    start_entrypoint(entrypoint);
    let listener = loop {
        match vsock::Listener::bind(AGENT_PORT) {
            Ok(l) => break l,
            Err(e) => {
                eprintln!("microagent-agent: vsock port {AGENT_PORT}: {e}; retrying");
                std::thread::sleep(std::time::Duration::from_secs(1));
            }
        }
    };
    println!("microagent-agent: ready on vsock port {AGENT_PORT}");
    loop {
        match listener.accept() {
            Ok(conn) => {
                let _ = std::thread::Builder::new()
                    .name("session".into())
                    .spawn(move || session(conn));
            }
            Err(e) => {
                eprintln!("microagent-agent: accept: {e}");
                std::thread::sleep(std::time::Duration::from_millis(100));
            }
        }
    }
}
