//! Copying files and directories between the host and a running
//! workspace, as tar streams over the guest agent. Modes are preserved.

use std::io::Read;
use std::path::{Path, PathBuf};
use std::time::Duration;

use guest_agent::{read_frame, write_frame, Kind, Request, CHUNK};

use super::{conflict, invalid, Context, Engine, IoContext, Result};
use crate::agent::{error_text, AgentConn, AgentError};
use crate::workspace::state::{reconcile, Status};
use crate::workspace::store::StateDir;

fn connect(state: &StateDir, name: &str) -> Result<AgentConn> {
    let ws = state.existing(name)?;
    let rec = ws.read()?;
    match reconcile(&ws, &rec).0 {
        Status::Running => {}
        s => {
            return Err(conflict(
                name,
                format!("workspace {name} is {s}; it must be running"),
            ))
        }
    }
    let conn = AgentConn::connect(&ws.vsock_socket(), Duration::from_secs(30))
        .ctx(|| format!("workspace {name}"))?;
    conn.stream
        .set_read_timeout(None)
        .io_ctx(|| "agent connection".into())?;
    Ok(conn)
}

/// Reads the agent's answer after a copy: EXIT 0 or an ERROR.
fn outcome(conn: &mut AgentConn) -> Result<()> {
    loop {
        let f = read_frame(&mut conn.stream)
            .map_err(|e| AgentError::Protocol(format!("reading the guest agent's answer: {e}")))?;
        match f.kind {
            Kind::Exit => return Ok(()),
            Kind::Error => return Err(AgentError::Remote(error_text(&f)).into()),
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

pub(crate) fn copy_in(state: &StateDir, src: &Path, name: &str, dest: &str) -> Result<()> {
    let meta = std::fs::symlink_metadata(src).io_ctx(|| format!("{}", src.display()))?;
    let entry = src
        .canonicalize()
        .ok()
        .and_then(|p| p.file_name().map(PathBuf::from))
        .ok_or_else(|| invalid(format!("{} has no name to copy under", src.display())))?;
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
        .io_ctx(|| format!("archiving {}", src.display()))?;
        builder.finish().io_ctx(|| "sending the archive".into())?;
    }
    write_frame(&mut conn.stream, Kind::Stdin, &[]).io_ctx(|| "ending the archive".into())?;
    outcome(&mut conn).ctx(|| format!("copying into {name}:{dest}"))
}

pub(crate) fn copy_out(state: &StateDir, name: &str, path: &str, dest: &Path) -> Result<()> {
    std::fs::create_dir_all(dest).io_ctx(|| format!("creating {}", dest.display()))?;
    let request = Request::CopyOut {
        path: path.to_string(),
    };
    read_archive(state, name, &request, |stream| {
        unpack_untrusted(stream, dest)
    })
    .ctx(|| format!("copying {name}:{path} into {}", dest.display()))
}

/// Sends `request` to workspace `name`'s agent and hands the tar stream
/// it answers with to `read`. The guest's own error, if it sent one, wins
/// over `read`'s (which then only saw a cut stream).
pub(crate) fn read_archive<T>(
    state: &StateDir,
    name: &str,
    request: &Request,
    read: impl FnOnce(&mut dyn Read) -> std::io::Result<T>,
) -> Result<T> {
    let mut conn = connect(state, name)?;
    conn.send(request)?;
    let mut stream = FrameStream {
        conn: &mut conn,
        buf: Vec::new(),
        pos: 0,
        done: None,
    };
    let result = read(&mut stream);
    // Drain to the final EXIT/ERROR.
    let mut rest = Vec::new();
    let _ = stream.read_to_end(&mut rest);
    if let Some(Err(e)) = stream.done.take() {
        return Err(AgentError::Remote(e).into());
    }
    result.io_ctx(|| format!("reading workspace {name}'s archive"))
}

/// Unpacks a guest's archive into `dest`. It is untrusted: entries that
/// would escape `dest` are refused (`unpack_in`), so are device nodes and
/// FIFOs (a guest's root could otherwise plant a node for a host disk),
/// and setuid, setgid and sticky bits are dropped (only rwx is kept).
fn unpack_untrusted(stream: &mut dyn Read, dest: &Path) -> std::io::Result<()> {
    let mut archive = tar::Archive::new(stream);
    archive.set_preserve_permissions(false);
    archive.set_overwrite(true);
    for entry in archive.entries()? {
        let mut entry = entry?;
        use tar::EntryType::*;
        match entry.header().entry_type() {
            Regular | Continuous | Directory | Symlink | Link | XGlobalHeader | XHeader => {}
            other => {
                return Err(std::io::Error::other(format!(
                    "the guest's archive holds {:?}, a {other:?} entry: only files, directories and links are copied out",
                    String::from_utf8_lossy(&entry.path_bytes())
                )))
            }
        }
        if !entry.unpack_in(dest)? {
            return Err(std::io::Error::other(format!(
                "the guest's archive entry {:?} points outside {}",
                String::from_utf8_lossy(&entry.path_bytes()),
                dest.display()
            )));
        }
    }
    Ok(())
}

impl Engine {
    /// Puts host file or directory `src` inside guest directory `dest`
    /// (created if missing).
    pub fn copy_in(&self, src: &Path, name: &str, dest: &str) -> Result<()> {
        copy_in(&self.state, src, name, dest)
    }

    /// Puts guest `path` inside host directory `dest`. The guest's archive
    /// is untrusted: entries that would escape `dest` are refused.
    pub fn copy_out(&self, name: &str, path: &str, dest: &Path) -> Result<()> {
        copy_out(&self.state, name, path, dest)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    fn archive(entries: &[(&str, tar::EntryType, u32)]) -> Vec<u8> {
        let mut b = tar::Builder::new(Vec::new());
        for (name, kind, mode) in entries {
            let mut h = tar::Header::new_gnu();
            h.set_entry_type(*kind);
            h.set_mode(*mode);
            h.set_uid(0);
            h.set_gid(0);
            h.set_size(if *kind == tar::EntryType::Regular {
                2
            } else {
                0
            });
            if *kind == tar::EntryType::Char {
                h.set_device_major(8).unwrap();
                h.set_device_minor(0).unwrap();
            }
            let body: &[u8] = if *kind == tar::EntryType::Regular {
                b"hi"
            } else {
                b""
            };
            b.append_data(&mut h, name, body).unwrap();
        }
        b.into_inner().unwrap()
    }

    #[test]
    fn guest_archives_lose_set_id_bits_and_cannot_plant_devices() {
        let dir = tempfile::tempdir().unwrap();
        let data = archive(&[("suid", tar::EntryType::Regular, 0o6755)]);
        unpack_untrusted(&mut data.as_slice(), dir.path()).unwrap();
        let mode = std::fs::metadata(dir.path().join("suid"))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o7777, 0o755);

        let data = archive(&[("disk", tar::EntryType::Char, 0o666)]);
        let e = unpack_untrusted(&mut data.as_slice(), dir.path())
            .unwrap_err()
            .to_string();
        assert!(e.contains("\"disk\"") && e.contains("Char"), "{e}");
        assert!(!dir.path().join("disk").exists());
    }
}
