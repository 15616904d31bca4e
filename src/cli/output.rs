//! Human and `--json` output. JSON goes to stdout as one document; human
//! messages go to stdout too, errors to stderr (see cli::run).

use serde_json::{json, Value};

use crate::workspace::state::Status;
use crate::workspace::store::{WorkspaceDir, WorkspaceRecord};

pub struct Out {
    pub json: bool,
    pub quiet: bool,
}

impl Out {
    /// Prints `human` or `value`, depending on the mode.
    pub fn done(&self, human: &str, value: Value) {
        if self.json {
            println!("{value}");
        } else if !self.quiet {
            println!("{human}");
        }
    }
}

/// The documented JSON shape of one workspace (README, "JSON output").
pub fn record_json(
    ws: &WorkspaceDir,
    rec: &WorkspaceRecord,
    status: Status,
    crash_reason: Option<&str>,
    pid: Option<u32>,
) -> Value {
    json!({
        "name": rec.name,
        "status": status.name(),
        "crash_reason": crash_reason,
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
        "pid": pid,
        "dir": ws.dir.display().to_string(),
    })
}

pub fn print_record(
    out: &Out,
    ws: &WorkspaceDir,
    rec: &WorkspaceRecord,
    status: Status,
    crash_reason: Option<&str>,
    pid: Option<u32>,
    human: &str,
) {
    out.done(human, record_json(ws, rec, status, crash_reason, pid));
}
