//! Human and `--json` output. JSON goes to stdout as one document; human
//! messages go to stdout too; progress, warnings and errors to stderr.

use serde_json::{json, Value};

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

/// The documented JSON shape of one workspace (docs/json.md, "workspace").
pub fn record_json(v: &WorkspaceView) -> Value {
    let rec = &v.record;
    json!({
        "name": rec.name,
        "status": v.status.name(),
        "crash_reason": v.crash_reason,
        "image": rec.image,
        "image_digest": rec.image_digest,
        "rootfs_source": rec.rootfs_source,
        "vcpus": rec.vcpus,
        "memory_mib": rec.memory_mib,
        "kernel": rec.kernel,
        "kernel_sha256": rec.kernel_sha256,
        "cmdline": rec.cmdline,
        "cpu_template": rec.cpu_template,
        "network": rec.network.name(),
        "ports": rec.ports.iter().map(|p| p.to_string()).collect::<Vec<_>>(),
        "created": rec.created,
        "pid": v.pid,
        "dir": v.dir.dir.display().to_string(),
    })
}

pub fn print_record(out: &Out, v: &WorkspaceView, human: &str) {
    out.done(human, record_json(v));
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
