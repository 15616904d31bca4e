//! `POST /v1/workspaces/{name}/exec`: the command's output streamed as it
//! comes, as NDJSON (one JSON object per line), then its exit status:
//!
//! ```text
//! {"stream":"stdout","data":"hello\n"}
//! {"stream":"stderr","data_base64":"/w=="}      (bytes that are not UTF-8)
//! {"exit_code":0}
//! ```
//!
//! A client that goes away mid-stream gets its guest process killed.

use std::collections::BTreeMap;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use axum::body::Bytes;
use axum::extract::{Path, State};
use axum::response::{IntoResponse, Response};
use base64::Engine as _;
use guest_agent::ExecRequest;
use serde::Deserialize;
use serde_json::{json, Value};
use tokio::sync::mpsc;

use super::error::{ApiError, Body};
use super::routes::blocking;
use crate::engine::exec::{ExecInput, Output, EXIT_LOST};

/// SIGKILL: what a vanished client's command gets.
const KILL: i32 = 9;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
pub(super) struct ExecBody {
    argv: Vec<String>,
    #[serde(default)]
    env: BTreeMap<String, String>,
    cwd: Option<String>,
    user: Option<String>,
    /// Everything the command reads on stdin (then EOF); without it,
    /// stdin is /dev/null.
    stdin: Option<String>,
}

/// One output chunk as an NDJSON line.
fn chunk_line(stream: &str, bytes: Vec<u8>) -> Value {
    match String::from_utf8(bytes) {
        Ok(text) => json!({"stream": stream, "data": text}),
        Err(e) => json!({
            "stream": stream,
            "data_base64": base64::engine::general_purpose::STANDARD.encode(e.into_bytes()),
        }),
    }
}

/// Kills the guest command when the response body is dropped before the
/// exit status was sent (the client disconnected).
struct KillUnlessDone {
    input: ExecInput,
    done: Arc<AtomicBool>,
}

impl Drop for KillUnlessDone {
    fn drop(&mut self) {
        if !self.done.load(Ordering::SeqCst) {
            self.input.signal(KILL);
        }
    }
}

pub(super) async fn exec(
    State(s): State<super::State>,
    Path(name): Path<String>,
    Body(b): Body<ExecBody>,
) -> Result<Response, ApiError> {
    if b.argv.is_empty() {
        return Err(ApiError::bad_request("argv: give the command to run"));
    }
    let req = ExecRequest {
        argv: b.argv,
        env: b.env.into_iter().collect(),
        cwd: b.cwd,
        user: b.user,
        stdin: b.stdin.is_some(),
        ..Default::default()
    };
    // Refusals (unknown workspace, not running) answer before any stream.
    let mut session = blocking(&s, move |e| e.exec(&name, req)).await?;
    let input = session.input();
    if let Some(data) = b.stdin {
        input.stdin(data.as_bytes());
        input.stdin(&[]);
    }
    let done = Arc::new(AtomicBool::new(false));
    let (tx, rx) = mpsc::channel::<Value>(32);
    let (reader_input, reader_done) = (input.clone(), done.clone());
    std::thread::spawn(move || loop {
        let (line, last) = match session.next_output() {
            Output::Stdout(b) => (chunk_line("stdout", b), false),
            Output::Stderr(b) => (chunk_line("stderr", b), false),
            Output::Exit(code) => (json!({"exit_code": code}), true),
            Output::Failed(msg, code) => (json!({"error": msg, "exit_code": code}), true),
            Output::Lost(why) => (
                json!({"error": format!("connection to the guest agent lost: {why}"), "exit_code": EXIT_LOST}),
                true,
            ),
        };
        if last {
            reader_done.store(true, Ordering::SeqCst);
        }
        if tx.blocking_send(line).is_err() {
            // The client is gone: so is its command.
            if !last {
                reader_input.signal(KILL);
            }
            return;
        }
        if last {
            return;
        }
    });
    let guard = KillUnlessDone { input, done };
    let stream = futures_util::stream::unfold((rx, guard), |(mut rx, guard)| async move {
        let v = rx.recv().await?;
        let mut line = v.to_string().into_bytes();
        line.push(b'\n');
        Some((Ok::<_, std::io::Error>(Bytes::from(line)), (rx, guard)))
    });
    Ok((
        [(axum::http::header::CONTENT_TYPE, "application/x-ndjson")],
        axum::body::Body::from_stream(stream),
    )
        .into_response())
}
