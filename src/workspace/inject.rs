//! Puts the guest agent into a workspace's ext4 root disk at a fixed path,
//! without mounting it (debugfs from e2fsprogs), whatever the image holds.

use std::io::Write;
use std::path::Path;
use std::process::{Command, Stdio};

#[derive(Debug, thiserror::Error)]
#[error("injecting the guest agent into {disk}: {reason}")]
pub struct InjectError {
    pub disk: String,
    pub reason: String,
}

fn debugfs(disk: &Path, write: bool, script: &str) -> Result<String, String> {
    let mut cmd = Command::new("debugfs");
    if write {
        cmd.arg("-w");
    }
    let mut child = cmd
        .arg("-f")
        .arg("-")
        .arg(disk)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("running debugfs (apt-get install e2fsprogs): {e}"))?;
    if let Some(mut stdin) = child.stdin.take() {
        stdin
            .write_all(script.as_bytes())
            .map_err(|e| e.to_string())?;
    }
    let out = child.wait_with_output().map_err(|e| e.to_string())?;
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).trim().to_string());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Writes `agent` to `guest_path` (e.g. /.microagent/agent) as root:root 0755.
pub fn inject_agent(disk: &Path, agent: &Path, guest_path: &str) -> Result<(), InjectError> {
    inject_file(disk, agent, guest_path, 0o755)
}

/// Writes the host file `agent` (any file) to `guest_path` as root:root with `mode`.
pub fn inject_file(
    disk: &Path,
    agent: &Path,
    guest_path: &str,
    mode: u32,
) -> Result<(), InjectError> {
    let err = |reason: String| InjectError {
        disk: disk.display().to_string(),
        reason,
    };
    let (dir, _) = guest_path
        .rsplit_once('/')
        .ok_or_else(|| err(format!("bad guest path {guest_path}")))?;
    let size = std::fs::metadata(agent)
        .map_err(|e| err(format!("agent {}: {e}", agent.display())))?
        .len();
    let agent_str = agent
        .to_str()
        .ok_or_else(|| err("agent path is not UTF-8".into()))?;
    if agent_str.contains(char::is_whitespace) || guest_path.contains(char::is_whitespace) {
        return Err(err("paths with spaces cannot be passed to debugfs".into()));
    }
    // Existing entries (re-injection) are replaced; mkdir of an existing
    // directory is harmless.
    let script = format!(
        "mkdir {dir}\nrm {guest_path}\nwrite {agent_str} {guest_path}\n\
         set_inode_field {guest_path} mode 0100{mode:o}\nset_inode_field {guest_path} uid 0\n\
         set_inode_field {guest_path} gid 0\n"
    );
    debugfs(disk, true, &script).map_err(err)?;
    // debugfs reports most failures only as text: check the result.
    let stat = debugfs(disk, false, &format!("stat {guest_path}\n")).map_err(err)?;
    let want = format!("Size: {size}");
    if !stat.contains(&want) || !stat.contains(&format!("Mode:  0{mode:o}")) {
        return Err(err(format!(
            "the written file does not match (disk full or not ext4?): {}",
            stat.lines().take(3).collect::<Vec<_>>().join(" / ")
        )));
    }
    Ok(())
}
