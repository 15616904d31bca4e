//! Human and `--json` output. JSON goes to stdout as one document; human
//! messages go to stdout too; progress, warnings and errors to stderr.

use serde_json::Value;

use crate::engine::{Reporter, WorkspaceView};
use crate::image::progress::Progress;

pub struct Out {
    pub json: bool,
    pub quiet: bool,
    progress: Progress,
}

impl Out {
    pub fn new(json: bool, quiet: bool) -> Out {
        Out {
            json,
            quiet,
            progress: Progress::for_output(json, quiet),
        }
    }

    /// Prints `human` or `value`, depending on the mode.
    pub fn done(&self, human: &str, value: Value) {
        if self.json {
            println!("{value}");
        } else if !self.quiet {
            println!("{human}");
        }
    }
}

impl Reporter for Out {
    fn warn(&self, message: &str) {
        if !self.quiet {
            eprintln!("warning: {message}");
        }
    }

    fn step(&self, message: &str) {
        if !self.quiet && !self.json {
            eprintln!("{message}");
        }
    }

    fn image_progress(&self) -> &Progress {
        &self.progress
    }
}

pub fn print_record(out: &Out, v: &WorkspaceView, human: &str) {
    out.done(human, crate::render::workspace(v));
}

pub fn human_size(bytes: u64) -> String {
    const UNITS: [&str; 5] = ["B", "KiB", "MiB", "GiB", "TiB"];
    let mut v = bytes as f64;
    let mut u = 0;
    while v >= 1024.0 && u < UNITS.len() - 1 {
        v /= 1024.0;
        u += 1;
    }
    if u == 0 {
        format!("{bytes}B")
    } else {
        format!("{v:.1}{}", UNITS[u])
    }
}

#[cfg(test)]
mod tests {
    use super::human_size;

    #[test]
    fn sizes() {
        assert_eq!(human_size(512), "512B");
        assert_eq!(human_size(1536 << 20), "1.5GiB");
    }
}
