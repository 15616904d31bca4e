//! `microagent serve` with real guests and real HTTP clients: curl (as a
//! user would type it) and a small Rust client over the unix socket. One
//! workspace, warm-started from the suite's shared boot, carries every
//! route: lifecycle, exec streaming and a disconnect, snapshots with the
//! seed 002 curl lines verbatim, automatic snapshots rotated over 7
//! restarts with a process that survives them, 50 concurrent requests,
//! secrets, commit, fork, auth refusals, and a server stop that leaves the
//! VM running.

mod common;

use std::io::{BufRead, BufReader, Read, Write};
use std::os::unix::net::UnixStream;
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use common::schema::{assert_each, assert_schema};
use common::*;
use serde_json::{json, Value};

/// One `microagent serve` process.
struct Server {
    child: Child,
}

impl Server {
    fn start(home: &Home, args: &[&str], ready: impl Fn() -> bool) -> Server {
        let child = home
            .cmd()
            .arg("serve")
            .args(args)
            .stdout(Stdio::null())
            .stderr(Stdio::inherit())
            .spawn()
            .unwrap();
        let t = Instant::now();
        while !ready() {
            assert!(
                t.elapsed() < Duration::from_secs(20),
                "serve {args:?} did not listen"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        Server { child }
    }

    /// SIGTERM, and its exit status.
    fn stop(mut self) -> i32 {
        // SAFETY: signalling the child this test spawned.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        self.child.wait().unwrap().code().unwrap_or(-1)
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

fn free_port() -> u16 {
    std::net::TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// The test's own HTTP/1.1 client over the unix socket.
struct Api {
    sock: PathBuf,
}

struct Resp {
    status: u16,
    body: Vec<u8>,
}

impl Resp {
    fn json(&self) -> Value {
        serde_json::from_slice(&self.body)
            .unwrap_or_else(|e| panic!("{e}: {}", String::from_utf8_lossy(&self.body)))
    }
}

/// Undoes `Transfer-Encoding: chunked`.
fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let nl = b
            .windows(2)
            .position(|w| w == b"\r\n")
            .expect("chunk size line");
        let size =
            usize::from_str_radix(std::str::from_utf8(&b[..nl]).unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[nl + 2 + size + 2..];
    }
}

impl Api {
    fn request(&self, method: &str, path: &str, body: Option<&[u8]>) -> Resp {
        let mut s = UnixStream::connect(&self.sock).unwrap();
        let body = body.unwrap_or(b"");
        write!(
            s,
            "{method} {path} HTTP/1.1\r\nHost: microagent\r\nConnection: close\r\nContent-Length: {}\r\n\r\n",
            body.len()
        )
        .unwrap();
        // A server refusing a body by its length answers before reading
        // it and closes: a broken pipe here still leaves its answer.
        let _ = s.write_all(body);
        let mut raw = Vec::new();
        if let Err(e) = s.read_to_end(&mut raw) {
            assert!(!raw.is_empty(), "{method} {path}: {e}");
        }
        let split = raw
            .windows(4)
            .position(|w| w == b"\r\n\r\n")
            .expect("headers");
        let head = String::from_utf8_lossy(&raw[..split]).to_lowercase();
        let status = head[9..12].parse().unwrap();
        let rest = &raw[split + 4..];
        let body = if head.contains("transfer-encoding: chunked") {
            dechunk(rest)
        } else {
            rest.to_vec()
        };
        Resp { status, body }
    }

    fn call(&self, method: &str, path: &str, body: Value) -> Resp {
        self.request(method, path, Some(body.to_string().as_bytes()))
    }

    /// A call that must answer `want`; its JSON.
    fn expect(&self, want: u16, method: &str, path: &str, body: Value) -> Value {
        let r = self.call(method, path, body);
        assert_eq!(
            r.status,
            want,
            "{method} {path}: {}",
            String::from_utf8_lossy(&r.body)
        );
        r.json()
    }

    /// Exec: the NDJSON lines.
    fn exec(&self, ws: &str, body: Value) -> Vec<Value> {
        let r = self.call("POST", &format!("/v1/workspaces/{ws}/exec"), body);
        assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
        String::from_utf8(r.body)
            .unwrap()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    }

    /// Exec of `sh -c script`: (stdout, exit code).
    fn sh(&self, ws: &str, script: &str) -> (String, i64) {
        let lines = self.exec(ws, json!({"argv": ["sh", "-c", script]}));
        let out: String = lines
            .iter()
            .filter(|l| l["stream"] == "stdout")
            .map(|l| l["data"].as_str().unwrap())
            .collect();
        let code = lines.last().unwrap()["exit_code"].as_i64().unwrap();
        (out, code)
    }
}

/// curl ARGS: (HTTP status, body).
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl (apt-get install curl)");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap();
    (code.parse().unwrap_or(0), body.to_string())
}

fn tags(api: &Api, ws: &str) -> Vec<String> {
    let v = api.expect(
        200,
        "GET",
        &format!("/v1/workspaces/{ws}/snapshots"),
        json!(null),
    );
    assert_each("snapshot-entry", &v);
    v.as_array()
        .unwrap()
        .iter()
        .map(|e| e["tag"].as_str().unwrap().to_string())
        .collect()
}

#[test]
fn api_serves_the_engine_with_real_guests() {
    if !kvm_available() {
        return;
    }
    let home = Home::new();
    let shared = SharedConfig::new(home.dir.path());
    let sock = home.dir.path().join("api.sock");
    let api = Api { sock: sock.clone() };
    let server = Server::start(&home, &[], || UnixStream::connect(&sock).is_ok());
    use std::os::unix::fs::PermissionsExt;
    assert_eq!(
        std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777,
        0o600
    );

    // Refusals before any VM: bad JSON, unknown fields, unknown names,
    // bodies over the limit, and the OpenAPI document itself.
    let r = api.request("POST", "/v1/workspaces", Some(b"{not json"));
    assert_eq!(r.status, 400);
    assert_eq!(r.json()["error"]["code"], "invalid_input");
    let e = api.expect(
        400,
        "POST",
        "/v1/workspaces",
        json!({"name": "x", "imag": "busybox"}),
    );
    assert!(
        e["error"]["message"].as_str().unwrap().contains("imag"),
        "{e}"
    );
    let e = api.expect(404, "GET", "/v1/workspaces/nope", json!(null));
    assert_schema("error", &e);
    let big = vec![b'x'; 2 << 20];
    assert_eq!(
        api.request("PUT", "/v1/workspaces/nope/secrets/K", Some(&big))
            .status,
        413
    );
    let doc = api.expect(200, "GET", "/v1/openapi.json", json!(null));
    assert_eq!(doc["openapi"], "3.0.3");

    // Volumes need no VM: create, snapshot, clone, revert, refusals, rm.
    let v = api.expect(
        201,
        "POST",
        "/v1/volumes",
        json!({"name": "vol", "size": 16 << 20}),
    );
    assert_schema("volume", &v);
    let snap = api.expect(
        201,
        "POST",
        "/v1/volumes/vol/snapshots",
        json!({"tag": "t"}),
    );
    assert_schema("volume-snapshot", &snap);
    assert_eq!(snap["consistency"], "detached");
    let clone = api.expect(
        201,
        "POST",
        "/v1/volumes",
        json!({"name": "vol2", "from_snapshot": "vol:t"}),
    );
    assert_eq!(clone["from_snapshot"], "vol:t");
    let reverted = api.expect(
        200,
        "POST",
        "/v1/volumes/vol/snapshots/t/revert",
        json!(null),
    );
    assert_schema("volume", &reverted);
    let e = api.expect(400, "POST", "/v1/volumes", json!({"name": "v", "sise": 1}));
    assert!(
        e["error"]["message"].as_str().unwrap().contains("sise"),
        "{e}"
    );
    let e = api.expect(
        400,
        "POST",
        "/v1/workspaces",
        json!({"name": "x", "image": "busybox", "volumes": ["vol"]}),
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("VOLUME:/PATH"),
        "{e}"
    );
    let rm = api.expect(200, "DELETE", "/v1/volumes/vol/snapshots/t", json!(null));
    assert_schema("volume-snapshot-rm", &rm);
    // Snapshots of every kind (none yet) and a definition refused with
    // its line and field, before anything is made.
    assert_eq!(
        api.expect(200, "GET", "/v1/snapshots", json!(null)),
        json!([])
    );
    let yaml = "workspaces:\n- name: a\n  base_snapshot: b\n  memory: 12\n";
    let e = api.expect(400, "POST", "/v1/apply", json!({ "yaml": yaml }));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .starts_with("definition:4: workspaces[0].memory: 12: give 64 to 65536"),
        "{e}"
    );
    api.expect(400, "POST", "/v1/apply", json!({ "yml": yaml }));
    for name in ["vol", "vol2"] {
        let rm = api.expect(200, "DELETE", &format!("/v1/volumes/{name}"), json!(null));
        assert_schema("volume-rm", &rm);
    }
    api.expect(404, "GET", "/v1/volumes/vol", json!(null));
    assert_eq!(
        api.expect(200, "GET", "/v1/volumes", json!(null)),
        json!([])
    );

    // Create with the suite's shared configuration (so the start is warm).
    let rootfs = shared.create_args("api", &[])[3].to_string();
    let body = json!({
        "name": "api", "rootfs": rootfs, "kernel": vmlinux(), "vcpus": 2,
        "memory_mib": 256, "init": "/init",
    });
    let v = api.expect(201, "POST", "/v1/workspaces", body.clone());
    assert_schema("workspace", &v);
    assert_eq!(
        (
            v["auto_snapshot_on_stop"].clone(),
            v["max_snapshots"].clone()
        ),
        (json!(true), json!(5))
    );
    let e = api.expect(409, "POST", "/v1/workspaces", body);
    assert_eq!(e["error"]["code"], "already_exists");
    let e = api.expect(
        409,
        "POST",
        "/v1/workspaces/api/exec",
        json!({"argv": ["true"]}),
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("start it first"),
        "{e}"
    );
    let v = api.expect(200, "POST", "/v1/workspaces/api/start", json!({}));
    assert_schema("workspace-start", &v);
    assert_eq!(v["status"], "running");

    // Exec: streamed stdout and stderr, stdin, the exit status.
    let lines = api.exec(
        "api",
        json!({"argv": ["sh", "-c", "echo out; echo err >&2; cat; exit 3"], "stdin": "from stdin\n", "env": {"A": "1"}}),
    );
    let text = |s: &str| -> String {
        lines
            .iter()
            .filter(|l| l["stream"] == s)
            .map(|l| l["data"].as_str().unwrap())
            .collect()
    };
    assert_eq!(text("stdout"), "out\nfrom stdin\n");
    assert_eq!(text("stderr"), "err\n");
    assert_eq!(lines.last().unwrap(), &json!({"exit_code": 3}));
    assert_eq!(
        api.sh("api", "echo ${A:-unset}; hostname"),
        ("unset\napi\n".to_string(), 0)
    );

    // A client that goes away mid-stream gets its command killed, and the
    // server keeps serving.
    {
        let mut s = UnixStream::connect(&sock).unwrap();
        let body = json!({"argv": ["sh", "-c", "echo $$ > /run/looper; while :; do echo tick; sleep 1; done"]})
            .to_string();
        write!(
            s,
            "POST /v1/workspaces/api/exec HTTP/1.1\r\nHost: m\r\nContent-Length: {}\r\n\r\n{body}",
            body.len()
        )
        .unwrap();
        let mut r = BufReader::new(s);
        let mut line = String::new();
        while !line.contains("tick") {
            line.clear();
            assert!(r.read_line(&mut line).unwrap() > 0, "stream ended early");
        }
    }
    let t = Instant::now();
    while api
        .sh(
            "api",
            "kill -0 $(cat /run/looper) 2>/dev/null && echo alive || echo gone",
        )
        .0
        != "gone\n"
    {
        assert!(
            t.elapsed() < Duration::from_secs(60),
            "the command outlived its client"
        );
        std::thread::sleep(Duration::from_millis(500));
    }

    // A process that must survive every restart below (memory snapshots).
    api.sh(
        "api",
        "setsid sh -c 'i=0; while :; do i=$((i+1)); echo $i > /run/count; sleep 1; done' </dev/null >/dev/null 2>&1 & echo $! > /run/counter",
    );
    let counter = api.sh("api", "cat /run/counter").0;

    // Pause and resume; exec is refused while paused.
    assert_eq!(
        api.expect(200, "POST", "/v1/workspaces/api/pause", json!(null))["status"],
        "paused"
    );
    let e = api.expect(
        409,
        "POST",
        "/v1/workspaces/api/exec",
        json!({"argv": ["true"]}),
    );
    assert_eq!(e["error"]["code"], "state_conflict");
    assert_eq!(
        api.expect(200, "POST", "/v1/workspaces/api/resume", json!(null))["status"],
        "running"
    );
    let v = api.expect(200, "GET", "/v1/workspaces/api", json!(null));
    assert_schema("workspace-status", &v);

    // Secrets: write-only values.
    let r = api.request(
        "PUT",
        "/v1/workspaces/api/secrets/API_KEY",
        Some(b"value-for-the-api-1234"),
    );
    assert_eq!(r.status, 200, "{}", String::from_utf8_lossy(&r.body));
    assert_schema("secret-set", &r.json());
    assert_eq!(
        api.sh("api", "cat /run/secrets/API_KEY").0,
        "value-for-the-api-1234"
    );
    let v = api.expect(200, "GET", "/v1/workspaces/api/secrets", json!(null));
    assert_schema("secret-ls", &v);
    assert!(!v.to_string().contains("value-for"), "{v}");
    assert_schema(
        "secret-rm",
        &api.expect(
            200,
            "DELETE",
            "/v1/workspaces/api/secrets/API_KEY",
            json!(null),
        ),
    );

    // Snapshots: create, get, latest, the reserved tag, a clash.
    let c = api.expect(
        201,
        "POST",
        "/v1/workspaces/api/snapshots",
        json!({"tag": "manual1"}),
    );
    assert_schema("snapshot-create", &c);
    assert_eq!(
        api.expect(
            200,
            "GET",
            "/v1/workspaces/api/snapshots/manual1",
            json!(null)
        )["tag"],
        "manual1"
    );
    assert_eq!(
        api.expect(
            200,
            "GET",
            "/v1/workspaces/api/snapshots/latest",
            json!(null)
        )["tag"],
        "manual1"
    );
    api.expect(
        400,
        "POST",
        "/v1/workspaces/api/snapshots",
        json!({"tag": "latest"}),
    );
    let v = api.expect(
        200,
        "POST",
        "/v1/workspaces/api/snapshots/manual1/verify",
        json!(null),
    );
    assert_schema("snapshot-verify", &v);
    api.expect(
        404,
        "POST",
        "/v1/workspaces/api/snapshots/nope/verify",
        json!(null),
    );
    assert_eq!(
        api.expect(
            409,
            "POST",
            "/v1/workspaces/api/snapshots",
            json!({"tag": "manual1"})
        )["error"]["code"],
        "already_exists"
    );
    // Rollback of a running workspace is a conflict; a fork is not.
    let e = api.expect(
        409,
        "POST",
        "/v1/workspaces/api/snapshots/manual1/rollback",
        json!(null),
    );
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("already running"),
        "{e}"
    );
    let f = api.expect(
        201,
        "POST",
        "/v1/workspaces/api/snapshots/manual1/fork",
        json!({"name": "apifork"}),
    );
    assert_schema("workspace", &f);
    assert_eq!(api.sh("apifork", "hostname").0, "apifork\n");
    api.expect(409, "DELETE", "/v1/workspaces/apifork", json!(null));
    assert_schema(
        "delete",
        &api.expect(
            200,
            "DELETE",
            "/v1/workspaces/apifork?force=true",
            json!(null),
        ),
    );

    // The seed's curl lines, verbatim, against a loopback TCP listener.
    let port = free_port();
    let seed = Server::start(&home, &["--listen", &format!("127.0.0.1:{port}")], || {
        std::net::TcpStream::connect(("127.0.0.1", port)).is_ok()
    });
    let host = format!("http://127.0.0.1:{port}");
    let (code, body) = curl(&["-X", "POST", &format!("{host}/api/vps/snapshots/api")]);
    assert_eq!(code, 201, "{body}");
    let made: Value = serde_json::from_str(&body).unwrap();
    assert_schema("snapshot-create", &made);
    let (code, body) = curl(&[&format!("{host}/api/vps/snapshots/api")]);
    assert_eq!(code, 200, "{body}");
    assert_each("snapshot-entry", &serde_json::from_str(&body).unwrap());
    let (code, body) = curl(&[&format!("{host}/api/vps/snapshots/api/latest")]);
    assert_eq!(code, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["tag"],
        made["tag"]
    );
    let (code, body) = curl(&[
        "-X",
        "DELETE",
        &format!(
            "{host}/api/vps/snapshots/api/{}",
            made["tag"].as_str().unwrap()
        ),
    ]);
    assert_eq!(code, 200, "{body}");
    assert_schema("snapshot-delete", &serde_json::from_str(&body).unwrap());
    assert_eq!(tags(&api, "api"), ["manual1"]);

    // 50 concurrent requests on one workspace: each answered, lifecycle
    // operations serialised, every conflict a clear 409.
    let answers: Vec<(usize, u16, Value)> = std::thread::scope(|s| {
        let api = &api;
        let handles: Vec<_> = (0..50)
            .map(|i| {
                s.spawn(move || {
                    let r = match i % 3 {
                        0 => api.call(
                            "POST",
                            "/v1/workspaces/api/snapshots",
                            json!({"tag": format!("c{i}")}),
                        ),
                        1 => api.call(
                            "POST",
                            "/v1/workspaces/api/exec",
                            json!({"argv": ["echo", i.to_string()]}),
                        ),
                        _ => api.call("GET", "/v1/workspaces/api", json!(null)),
                    };
                    let v = if i % 3 == 1 && r.status == 200 {
                        let lines: Vec<Value> = String::from_utf8(r.body)
                            .unwrap()
                            .lines()
                            .map(|l| serde_json::from_str(l).unwrap())
                            .collect();
                        Value::Array(lines)
                    } else {
                        r.json()
                    };
                    (i, r.status, v)
                })
            })
            .collect();
        handles.into_iter().map(|h| h.join().unwrap()).collect()
    });
    let mut snapshotted = vec!["manual1".to_string()];
    for (i, status, v) in &answers {
        match (i % 3, status) {
            (0, 201) => snapshotted.push(format!("c{i}")),
            (1, 200) => assert_eq!(
                v,
                &json!([{"stream": "stdout", "data": format!("{i}\n")}, {"exit_code": 0}])
            ),
            (2, 200) => assert_schema("workspace-status", v),
            (_, 409) => {
                assert_eq!(v["error"]["code"], "state_conflict", "{v}");
                assert!(
                    v["error"]["message"].as_str().unwrap().contains("snapshot"),
                    "{v}"
                );
            }
            _ => panic!("request {i} answered {status}: {v}"),
        }
    }
    assert!(
        snapshotted.len() > 1,
        "no concurrent snapshot succeeded: {answers:?}"
    );
    let mut now = tags(&api, "api");
    now.sort();
    snapshotted.sort();
    assert_eq!(now, snapshotted);
    for t in now.iter().filter(|t| t.starts_with('c')) {
        api.expect(
            200,
            "DELETE",
            &format!("/v1/workspaces/api/snapshots/{t}"),
            json!(null),
        );
    }

    // Automatic snapshots: 7 halts (6 seed restarts and one CLI halt)
    // keep the newest 5 auto- tags and every manual one; each restart
    // resumes the newest, so the counter process lives on.
    for i in 0..6 {
        let v = if i == 0 {
            let (code, body) = curl(&["-X", "POST", &format!("{host}/api/vps/restart/api")]);
            assert_eq!(code, 200, "{body}");
            serde_json::from_str(&body).unwrap()
        } else {
            api.expect(200, "POST", "/api/vps/restart", json!({"task_id": "api"}))
        };
        assert_schema("workspace-start", &v);
        assert_eq!(v["boot"], "snapshot");
    }
    let h = home.json(&["halt", "api"]);
    assert_schema("workspace-halt", &h);
    let last_auto = h["auto_snapshot"].as_str().unwrap().to_string();
    assert!(last_auto.starts_with("auto-"), "{h}");
    assert_eq!(h["rotated_out"].as_array().unwrap().len(), 1, "{h}");
    let v = home.json(&["start", "api", "--from-snapshot", "latest"]);
    assert_eq!(v["boot"], "snapshot");
    let all = tags(&api, "api");
    assert_eq!(
        all.iter().filter(|t| t.starts_with("auto-")).count(),
        5,
        "{all:?}"
    );
    assert!(
        all.contains(&"manual1".to_string()) && all.contains(&last_auto),
        "{all:?}"
    );
    let (alive, code) = api.sh("api", "kill -0 $(cat /run/counter) && cat /run/counter");
    assert_eq!((alive, code), (counter.clone(), 0));

    // Settings: shown, changed, and off means no snapshot on halt.
    let v = api.expect(
        200,
        "PATCH",
        "/v1/workspaces/api",
        json!({"auto_snapshot_on_stop": false, "max_snapshots": 3}),
    );
    assert_eq!(
        (
            v["auto_snapshot_on_stop"].clone(),
            v["max_snapshots"].clone()
        ),
        (json!(false), json!(3))
    );
    api.expect(
        400,
        "PATCH",
        "/v1/workspaces/api",
        json!({"max_snapshots": 0}),
    );

    // Images: import, list, push to a registry and pull back; commit of a
    // rootfs workspace is refused by name.
    let layout = common::oci::script_path("image-busybox.sh");
    let v = api.expect(
        200,
        "POST",
        "/v1/images/import",
        json!({"path": layout, "tag": "localhost/api-busybox:1"}),
    );
    assert_schema("image-fetch", &v);
    assert_each("image", &api.expect(200, "GET", "/v1/images", json!(null)));
    let registry = common::oci::Registry::start();
    let dest = format!("{}/api/busybox:1", registry.addr);
    let v = api.expect(
        200,
        "POST",
        "/v1/images/push",
        json!({"image": "localhost/api-busybox:1", "dest": dest, "creds": registry.creds()}),
    );
    assert_schema("image-push", &v);
    let v = api.expect(
        200,
        "POST",
        "/v1/images/pull",
        json!({"ref": dest, "creds": registry.creds()}),
    );
    assert_schema("image-fetch", &v);
    // Snapshots through the registry: the newest pushed, then pulled back
    // as a new halted workspace (tests/share.rs forks them elsewhere).
    let snap = format!("{}/api/snapshot:1", registry.addr);
    let v = api.expect(
        200,
        "POST",
        "/v1/workspaces/api/snapshots/latest/push",
        json!({"dest": snap, "creds": registry.creds()}),
    );
    assert_schema("snapshot-push", &v);
    let v = api.expect(
        201,
        "POST",
        "/v1/snapshots/pull",
        json!({"ref": snap, "into": "pulled", "creds": registry.creds()}),
    );
    assert_schema("snapshot-pull", &v);
    assert_eq!(home.json(&["status", "pulled"])["status"], "halted");
    home.ok(&["delete", "pulled", "--yes"]);
    let e = api.expect(400, "POST", "/v1/workspaces/api/commit", json!({}));
    assert!(
        e["error"]["message"]
            .as_str()
            .unwrap()
            .contains("workspace api"),
        "{e}"
    );

    // Auth: a TCP listener with a token refuses requests without it.
    let token = home.dir.path().join("token");
    std::fs::write(&token, "0123456789abcdef-token\n").unwrap();
    let port2 = free_port();
    let authed = Server::start(
        &home,
        &[
            "--listen",
            &format!("127.0.0.1:{port2}"),
            "--token-file",
            token.to_str().unwrap(),
        ],
        || std::net::TcpStream::connect(("127.0.0.1", port2)).is_ok(),
    );
    let url = format!("http://127.0.0.1:{port2}/v1/workspaces/api");
    let (code, body) = curl(&[&url]);
    assert_eq!(code, 401, "{body}");
    assert_schema("error", &serde_json::from_str(&body).unwrap());
    assert_eq!(
        curl(&["-H", "Authorization: Bearer wrong-token-0123456", &url]).0,
        401
    );
    let (code, body) = curl(&["-H", "Authorization: Bearer 0123456789abcdef-token", &url]);
    assert_eq!(code, 200, "{body}");
    let (code, _, err) = home.run(&["serve", "--listen", "0.0.0.0:0"]);
    assert_eq!(code, 1);
    assert!(err.contains("needs a bearer token"), "{err}");

    // Stopping the servers leaves the VM running.
    assert_eq!(authed.stop(), 0);
    assert_eq!(seed.stop(), 0);
    assert_eq!(server.stop(), 0);
    assert!(!sock.exists(), "the socket outlived its server");
    assert_eq!(home.json(&["status", "api"])["status"], "running");
    let server = Server::start(&home, &[], || UnixStream::connect(&sock).is_ok());
    assert_eq!(api.sh("api", "echo still").0, "still\n");
    drop(server);
    let h = home.json(&["halt", "api"]);
    assert_eq!(h["auto_snapshot"], Value::Null);
    home.ok(&["delete", "api", "--yes"]);
}
