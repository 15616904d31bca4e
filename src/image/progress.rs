//! Per-layer progress: bars on a terminal (indicatif), JSON lines on stderr
//! when output is for scripts, nothing when asked to be quiet.

use std::io::IsTerminal;

use indicatif::{MultiProgress, ProgressBar, ProgressStyle};

pub enum Progress {
    Bars(MultiProgress),
    JsonLines,
    /// Plain lines on stderr, for logs that are not a terminal.
    Lines,
    Silent,
}

impl Progress {
    pub fn for_output(json: bool, quiet: bool) -> Progress {
        if quiet {
            Progress::Silent
        } else if json {
            Progress::JsonLines
        } else if !std::io::stderr().is_terminal() {
            Progress::Lines
        } else {
            Progress::Bars(MultiProgress::new())
        }
    }

    pub fn blob(&self, what: &str, digest: &str, size: u64) -> BlobProgress {
        match self {
            Progress::Bars(m) => {
                let bar = m.add(ProgressBar::new(size));
                bar.set_style(
                    ProgressStyle::with_template(
                        "{prefix:>8} {msg:14} [{bar:30}] {bytes:>10}/{total_bytes:10} {bytes_per_sec}",
                    )
                    .unwrap_or_else(|_| ProgressStyle::default_bar())
                    .progress_chars("=> "),
                );
                bar.set_prefix(what.to_string());
                bar.set_message(short(digest).to_string());
                BlobProgress::Bar(bar)
            }
            Progress::JsonLines => BlobProgress::Json(what.to_string(), digest.to_string(), size),
            Progress::Lines => BlobProgress::Line(what.to_string(), digest.to_string(), size),
            Progress::Silent => BlobProgress::None,
        }
    }

    /// A one-line status message (unpacking, building the disk…).
    pub fn step(&self, msg: &str) {
        match self {
            Progress::Bars(m) => {
                let _ = m.println(msg);
            }
            Progress::JsonLines => {
                eprintln!("{}", serde_json::json!({ "event": "step", "message": msg }));
            }
            Progress::Lines => eprintln!("{msg}"),
            Progress::Silent => {}
        }
    }
}

fn short(digest: &str) -> &str {
    let hex = digest.strip_prefix("sha256:").unwrap_or(digest);
    &hex[..hex.len().min(12)]
}

pub enum BlobProgress {
    Bar(ProgressBar),
    Json(String, String, u64),
    Line(String, String, u64),
    None,
}

impl BlobProgress {
    pub fn advance(&self, n: u64) {
        if let BlobProgress::Bar(b) = self {
            b.inc(n);
        }
    }

    pub fn done(&self, cached: bool) {
        match self {
            BlobProgress::Bar(b) => {
                if cached {
                    b.set_position(b.length().unwrap_or(0));
                    b.finish_with_message(format!("{} cached", short(&b.message())));
                } else {
                    b.finish();
                }
            }
            BlobProgress::Json(what, digest, size) => eprintln!(
                "{}",
                serde_json::json!({ "event": "blob", "kind": what, "digest": digest,
                    "size": size, "cached": cached })
            ),
            BlobProgress::Line(what, digest, size) => eprintln!(
                "{what} {} {size} bytes{}",
                short(digest),
                if cached { " (cached)" } else { " done" }
            ),
            BlobProgress::None => {}
        }
    }

    pub fn fail(&self) {
        if let BlobProgress::Bar(b) = self {
            b.abandon();
        }
    }
}
