//! exec, shell and cp through the guest agent and our virtio-vsock, on one
//! booted workspace (a boot costs about a minute on PVM hosts).

mod common;

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::process::Stdio;
use std::time::{Duration, Instant};

use common::*;
use sha2::{Digest, Sha256};

fn hex(d: &[u8]) -> String {
    d.iter().map(|b| format!("{b:02x}")).collect()
}

fn exec(home: &Home, args: &[&str]) -> (i32, Vec<u8>, String) {
    let mut a = vec!["exec"];
    a.extend_from_slice(args);
    let out = home.cmd().args(&a).output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        out.stdout,
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn sh(home: &Home, script: &str) -> (i32, String, String) {
    let (c, o, e) = exec(home, &["ws", "--", "sh", "-c", script]);
    (c, String::from_utf8_lossy(&o).into_owned(), e)
}

#[test]
fn exec_shell_and_cp_on_one_workspace() {
    if !kvm_available() {
        return;
    }
    let home = Home::new();
    let shared = SharedConfig::new(home.dir.path());
    home.ok(&shared.create_args("ws", &[]));
    // Exec into a workspace that is not running is a clear error.
    let (code, _, err) = sh(&home, "true");
    assert_eq!(code, 1);
    assert!(
        err.contains("workspace ws is created; start it first"),
        "{err}"
    );

    // start returns only once the agent answers: exec works right away.
    home.ok(&["start", "ws"]);

    // Echo round trip and hostname from the workspace name.
    let (code, out, _) = sh(&home, "echo hello; hostname");
    assert_eq!((code, out.as_str()), (0, "hello\nws\n"));

    // Exit codes, including death by signal (128 + N).
    for (script, want) in [
        ("exit 0", 0),
        ("exit 1", 1),
        ("exit 42", 42),
        ("kill -TERM $$", 143),
        ("kill -9 $$", 137),
    ] {
        assert_eq!(sh(&home, script).0, want, "{script}");
    }
    let (code, _, err) = exec(&home, &["ws", "--", "no-such-command"]);
    assert_eq!(code, 127);
    assert!(err.contains("no-such-command: command not found"), "{err}");

    // stdout and stderr are kept apart.
    let (code, out, err) = sh(&home, "echo to-out; echo to-err >&2; echo more-out");
    assert_eq!(code, 0);
    assert_eq!(out, "to-out\nmore-out\n");
    assert!(err.contains("to-err") && !err.contains("to-out"), "{err}");

    // env, cwd and user.
    let (_, out, _) = exec(
        &home,
        &[
            "ws",
            "-e",
            "GREETING=hi there",
            "-w",
            "/tmp",
            "-u",
            "1234",
            "--",
            "sh",
            "-c",
            "echo \"$GREETING|$(pwd)|$(id -u)\"",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out), "hi there|/tmp|1234\n");

    // -t gives a terminal; without it there is none.
    let (_, out, _) = exec(
        &home,
        &[
            "ws",
            "-t",
            "--",
            "sh",
            "-c",
            "test -t 0 && test -t 1 && echo tty",
        ],
    );
    assert_eq!(String::from_utf8_lossy(&out).trim(), "tty");
    let (_, out, _) = sh(&home, "test -t 1 && echo tty || echo pipe");
    assert_eq!(out, "pipe\n");

    // 4 MiB of stdout (16 times the VMM's 256 KiB vsock buffer), hashed by the
    // guest and by us. The generator writes in large blocks: on PVM every
    // guest system call costs ~0.3 ms, so a line-at-a-time writer like `yes`
    // would take minutes; and every byte crosses the emulated guest kernel
    // three times, so 32 MiB here cost CI four minutes.
    // A MiB of busybox's own bytes (the guest kernel's /dev/urandom and
    // busybox `head -c` each take minutes on PVM).
    let (code, _, _) = sh(
        &home,
        "dd if=/bin/busybox of=/tmp/r1m bs=1M count=1 2>/dev/null",
    );
    assert_eq!(code, 0);
    let gen = "cat /tmp/r1m /tmp/r1m /tmp/r1m /tmp/r1m";
    let (code, guest_sum, _) = sh(&home, &format!("{gen} | sha256sum"));
    assert_eq!(code, 0);
    let (code, big, _) = exec(&home, &["ws", "--", "sh", "-c", gen]);
    assert_eq!(code, 0);
    assert_eq!(big.len(), 4 << 20);
    assert_eq!(
        guest_sum.split_whitespace().next().unwrap(),
        hex(&Sha256::digest(&big))
    );

    // 2 MiB through stdin and back, unchanged.
    let input: Vec<u8> = (0..2u32 << 20)
        .map(|i| (i.wrapping_mul(2_654_435_761) >> 13) as u8)
        .collect();
    let mut child = home
        .cmd()
        .args(["exec", "-i", "ws", "--", "cat"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let data = input.clone();
    let writer = std::thread::spawn(move || stdin.write_all(&data));
    let out = child.wait_with_output().unwrap();
    writer.join().unwrap().unwrap();
    assert!(out.status.success());
    assert_eq!(out.stdout.len(), input.len());
    assert!(out.stdout == input, "stdin round trip corrupted the data");

    // 8 concurrent execs, each with its own answer.
    let children: Vec<_> = (0..8)
        .map(|i| {
            home.cmd()
                .args([
                    "exec",
                    "ws",
                    "--",
                    "sh",
                    "-c",
                    &format!("echo $(({i} * {i}))"),
                ])
                .stdout(Stdio::piped())
                .spawn()
                .unwrap()
        })
        .collect();
    for (i, c) in children.into_iter().enumerate() {
        let out = c.wait_with_output().unwrap();
        assert!(out.status.success());
        assert_eq!(String::from_utf8_lossy(&out.stdout), format!("{}\n", i * i));
    }

    // Killing the CLI mid-exec ends the guest process.
    let mut victim = home
        .cmd()
        .args([
            "exec",
            "ws",
            "--",
            "sh",
            "-c",
            "echo $$ > /tmp/victim.pid; exec sleep 1000",
        ])
        .spawn()
        .unwrap();
    let t = Instant::now();
    while sh(&home, "cat /tmp/victim.pid").1.trim().is_empty() {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "victim never started"
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    victim.kill().unwrap();
    let _ = victim.wait();
    let t = Instant::now();
    loop {
        let (_, out, _) = sh(
            &home,
            "kill -0 $(cat /tmp/victim.pid) 2>/dev/null && echo alive || echo gone",
        );
        if out.trim() == "gone" {
            break;
        }
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "guest process outlived its CLI"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // A malformed or hostile frame does not kill the agent.
    let sock = home.workspace_dir("ws").join("vsock.sock");
    for junk in [
        &[0xffu8, 0xff, 0xff, 0xff, 2][..],
        &b"\x05\x00\x00\x00\x01{not"[..],
        &b"this is not a frame at all"[..],
    ] {
        let mut s = UnixStream::connect(&sock).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(30))).unwrap();
        s.write_all(b"CONNECT 52\n").unwrap();
        let mut ok = [0u8; 3];
        s.read_exact(&mut ok).unwrap();
        assert_eq!(&ok, b"OK ");
        s.write_all(junk).unwrap();
        let mut rest = Vec::new();
        let _ = s.read_to_end(&mut rest);
    }
    // A CONNECT line that is not one is refused by the VMM, which lives on.
    let mut s = UnixStream::connect(&sock).unwrap();
    s.write_all(b"GIMME EVERYTHING\n").unwrap();
    let mut rest = Vec::new();
    let _ = s.read_to_end(&mut rest);
    assert!(rest.is_empty());
    assert_eq!(sh(&home, "echo still-alive").1, "still-alive\n");

    // cp both directions, modes and content preserved.
    let src = home.dir.path().join("payload");
    std::fs::create_dir_all(src.join("sub")).unwrap();
    let blob: Vec<u8> = (0..300_000u32).map(|i| (i * 7 + 3) as u8).collect();
    std::fs::write(src.join("sub/blob.bin"), &blob).unwrap();
    std::fs::write(src.join("tool.sh"), "#!/bin/sh\necho tool\n").unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(src.join("tool.sh"), std::fs::Permissions::from_mode(0o751)).unwrap();
    home.ok(&["cp", src.to_str().unwrap(), "ws:/root/in"]);
    let (_, out, _) = sh(&home, "sha256sum /root/in/payload/sub/blob.bin; stat -c %a /root/in/payload/tool.sh; /root/in/payload/tool.sh");
    let want = hex(&Sha256::digest(&blob));
    assert_eq!(
        out,
        format!("{want}  /root/in/payload/sub/blob.bin\n751\ntool\n")
    );
    let back = home.dir.path().join("back");
    home.ok(&["cp", "ws:/root/in/payload", back.to_str().unwrap()]);
    assert_eq!(
        std::fs::read(back.join("payload/sub/blob.bin")).unwrap(),
        blob
    );
    let mode = std::fs::metadata(back.join("payload/tool.sh"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o777, 0o751);
    // What a guest's root can put in an archive never lands on the host
    // as set-id bits or device nodes.
    sh(
        &home,
        "mkdir -p /root/out && cp /bin/busybox /root/out/suid && chmod 6755 /root/out/suid && mknod /root/dev c 8 0",
    );
    home.ok(&["cp", "ws:/root/out", back.to_str().unwrap()]);
    let mode = std::fs::metadata(back.join("out/suid"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(mode & 0o7777, 0o755, "set-id bits kept: {mode:o}");
    let (code, _, err) = home.run(&["cp", "ws:/root/dev", back.to_str().unwrap()]);
    assert_eq!(code, 1, "a device node was copied out: {err}");
    assert!(!back.join("dev").exists());
    let (code, _, err) = home.run(&["cp", "ws:/no/such/path", back.to_str().unwrap()]);
    assert_eq!(code, 1);
    assert!(err.contains("/no/such/path"), "{err}");

    // Graceful halt goes through the agent (guest powers off by itself).
    home.ok(&["halt", "ws"]);
    let exit = std::fs::read_to_string(home.workspace_dir("ws").join("vmm-exit.json")).unwrap();
    assert!(
        exit.contains("i8042 reset"),
        "halt was not a guest power-off: {exit}"
    );
}
