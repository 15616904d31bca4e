//! `cp`: copy files and directories between the host and a running
//! workspace, as tar streams over the guest agent. Modes are preserved.
//!
//! `cp SRC NAME:DIR` puts SRC (file or directory) inside DIR in the guest
//! (DIR is created if missing); `cp NAME:PATH DIR` puts PATH inside the
//! host directory DIR.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use anyhow::{bail, Context, Result};
use clap::Args;
use guest_agent::{read_frame, write_frame, Kind, Request, CHUNK};

use crate::agent::{error_text, AgentConn};
use crate::workspace::state::{reconcile, Status};
use crate::workspace::store::{validate_name, StateDir};

#[derive(Args)]
pub struct CpArgs {
    /// HOST_PATH or NAME:GUEST_PATH
    src: String,
    /// NAME:GUEST_DIR or HOST_DIR
    dst: String,
}

/// `name:path` when `name` is a valid workspace name and the path is absolute.
fn split_remote(s: &str) -> Option<(&str, &str)> {
    let (name, path) = s.split_once(':')?;
    (validate_name(name).is_ok() && path.starts_with('/')).then_some((name, path))
}

fn connect(state: &StateDir, name: &str) -> Result<AgentConn> {
    let ws = state.existing(name)?;
    let rec = ws.read()?;
    match reconcile(&ws, &rec).0 {
        Status::Running => {}
        s => bail!("workspace {name} is {s}; it must be running"),
    }
    let conn = AgentConn::connect(&ws.vsock_socket(), Duration::from_secs(30))
        .with_context(|| format!("workspace {name}"))?;
    conn.stream.set_read_timeout(None)?;
    Ok(conn)
}

/// Reads the agent's answer after a copy: EXIT 0 or an ERROR.
fn outcome(conn: &mut AgentConn) -> Result<()> {
    loop {
        let f = read_frame(&mut conn.stream).context("reading the guest agent's answer")?;
        match f.kind {
            Kind::Exit => return Ok(()),
            Kind::Error => bail!("{}", error_text(&f)),
            _ => {}
        }
    }
}

struct FrameStream<'a> {
    conn: &'a mut AgentConn,
    buf: Vec<u8>,
    pos: usize,
    done: Option<Result<(), String>>,
}

impl Read for FrameStream<'_> {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.done.is_some() {
                return Ok(0);
            }
            let f = read_frame(&mut self.conn.stream).map_err(|e| {
                std::io::Error::new(std::io::ErrorKind::UnexpectedEof, e.to_string())
            })?;
            match f.kind {
                Kind::Stdout => {
                    self.buf = f.payload;
                    self.pos = 0;
                }
                Kind::Exit => self.done = Some(Ok(())),
                Kind::Error => self.done = Some(Err(error_text(&f))),
                _ => {}
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

struct FrameSink<'a>(&'a mut AgentConn);

impl std::io::Write for FrameSink<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK);
        write_frame(&mut self.0.stream, Kind::Stdin, &data[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn copy_in(state: &StateDir, src: &Path, name: &str, dest: &str) -> Result<()> {
    let meta = std::fs::symlink_metadata(src).with_context(|| format!("{}", src.display()))?;
    let entry = src
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(PathBuf::from))
        .with_context(|| format!("{} has no name to copy under", src.display()))?;
    let mut conn = connect(state, name)?;
    conn.send(&Request::CopyIn {
        dest: dest.to_string(),
    })?;
    {
        let mut builder = tar::Builder::new(FrameSink(&mut conn));
        builder.follow_symlinks(false);
        if meta.is_dir() {
            builder.append_dir_all(&entry, src)
        } else {
            builder.append_path_with_name(src, &entry)
        }
        .with_context(|| format!("archiving {}", src.display()))?;
        builder.finish().context("sending the archive")?;
    }
    write_frame(&mut conn.stream, Kind::Stdin, &[])?;
    outcome(&mut conn).with_context(|| format!("copying into {name}:{dest}"))
}

fn copy_out(state: &StateDir, name: &str, path: &str, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).with_context(|| format!("creating {}", dest.display()))?;
    let mut conn = connect(state, name)?;
    conn.send(&Request::CopyOut {
        path: path.to_string(),
    })?;
    let mut stream = FrameStream {
        conn: &mut conn,
        buf: Vec::new(),
        pos: 0,
        done: None,
    };
    let unpacked = {
        let mut archive = tar::Archive::new(&mut stream);
        archive.set_preserve_permissions(true);
        archive.set_overwrite(true);
        // The guest's archive is untrusted: unpack refuses entries that
        // would escape `dest`.
        archive.unpack(dest)
    };
    // Drain to the final EXIT/ERROR.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    if let Some(Err(e)) = stream.done.take() {
        bail!("copying {name}:{path}: {e}");
    }
    unpacked.with_context(|| format!("unpacking {name}:{path} into {}", dest.display()))?;
    Ok(())
}

pub fn cp(state: &StateDir, args: CpArgs, out: &super::output::Out) -> Result<i32> {
    match (split_remote(&args.src), split_remote(&args.dst)) {
        (None, Some((name, dir))) => copy_in(state, Path::new(&args.src), name, dir)?,
        (Some((name, path)), None) => copy_out(state, name, path, Path::new(&args.dst))?,
        (Some(_), Some(_)) => {
            bail!("copying between two workspaces is not supported; go through the host")
        }
        (None, None) => bail!("one side of cp must be NAME:/absolute/path"),
    }
    // Like cp(1), silent on success unless --json asks.
    if out.json {
        println!(
            "{}",
            serde_json::json!({"source": args.src, "destination": args.dst})
        );
    }
    Ok(0)
}

#[cfg(test)]
mod tests {
    use super::split_remote;

    #[test]
    fn remote_paths() {
        assert_eq!(split_remote("builder:/root"), Some(("builder", "/root")));
        assert_eq!(split_remote("./a:b"), None);
        assert_eq!(split_remote("builder:relative"), None);
        assert_eq!(split_remote("/tmp/x"), None);
        assert_eq!(split_remote("Bad:/x"), None);
    }
}
