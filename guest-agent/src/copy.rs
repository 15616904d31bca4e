//! cp in and out of the guest: tar streams carried in STDIN (in) and
//! STDOUT (out) frames. Unpacking uses the tar crate's checks: entries
//! with `..` or that would land outside the destination are refused.

use std::fs::File;
use std::io::{Read, Write};
use std::path::Path;

use guest_agent::{read_frame, write_json, ExitStatus, Kind, CHUNK};

use crate::exec::{send, send_error, Writer};

/// Reads the payloads of STDIN frames as one byte stream; an empty STDIN
/// frame (or the connection ending) is EOF.
struct FrameReader {
    conn: File,
    buf: Vec<u8>,
    pos: usize,
    eof: bool,
}

impl Read for FrameReader {
    fn read(&mut self, out: &mut [u8]) -> std::io::Result<usize> {
        while self.pos == self.buf.len() {
            if self.eof {
                return Ok(0);
            }
            match read_frame(&mut self.conn) {
                Ok(f) if f.kind == Kind::Stdin => {
                    if f.payload.is_empty() {
                        self.eof = true;
                    }
                    self.buf = f.payload;
                    self.pos = 0;
                }
                Ok(_) => {}
                Err(e) => {
                    return Err(std::io::Error::new(
                        std::io::ErrorKind::UnexpectedEof,
                        e.to_string(),
                    ))
                }
            }
        }
        let n = out.len().min(self.buf.len() - self.pos);
        out[..n].copy_from_slice(&self.buf[self.pos..self.pos + n]);
        self.pos += n;
        Ok(n)
    }
}

/// Writes a byte stream as STDOUT frames of at most CHUNK bytes.
struct FrameWriter<'a> {
    w: &'a Writer,
}

impl Write for FrameWriter<'_> {
    fn write(&mut self, data: &[u8]) -> std::io::Result<usize> {
        let n = data.len().min(CHUNK);
        send(self.w, Kind::Stdout, &data[..n])?;
        Ok(n)
    }
    fn flush(&mut self) -> std::io::Result<()> {
        Ok(())
    }
}

fn finish(w: &Writer, result: Result<(), String>) {
    match result {
        Ok(()) => {
            let mut f = w.lock().unwrap_or_else(|p| p.into_inner());
            let _ = write_json(&mut *f, Kind::Exit, &ExitStatus::Code(0));
        }
        Err(e) => send_error(w, e),
    }
}

pub fn copy_in(dest: &str, conn: File, w: &Writer) {
    let result = (|| {
        std::fs::create_dir_all(dest).map_err(|e| format!("creating {dest}: {e}"))?;
        let reader = FrameReader {
            conn,
            buf: Vec::new(),
            pos: 0,
            eof: false,
        };
        let mut archive = tar::Archive::new(reader);
        archive.set_preserve_permissions(true);
        archive.set_preserve_ownerships(true);
        archive.set_overwrite(true);
        archive
            .unpack(dest)
            .map_err(|e| format!("unpacking into {dest}: {e}"))
    })();
    finish(w, result);
}

pub fn copy_out(path: &str, w: &Writer) {
    let result = (|| {
        let p = Path::new(path);
        let meta = std::fs::symlink_metadata(p).map_err(|e| format!("{path}: {e}"))?;
        let name = p
            .file_name()
            .map(|n| n.to_os_string())
            .unwrap_or_else(|| std::ffi::OsString::from("root"));
        let mut builder = tar::Builder::new(FrameWriter { w });
        builder.follow_symlinks(false);
        if meta.is_dir() {
            builder.append_dir_all(&name, p)
        } else {
            builder.append_path_with_name(p, &name)
        }
        .map_err(|e| format!("archiving {path}: {e}"))?;
        builder
            .finish()
            .map_err(|e| format!("archiving {path}: {e}"))
    })();
    finish(w, result);
}

/// Whether `path` is at or under one of `excludes` (all absolute).
fn excluded(path: &Path, excludes: &[&Path]) -> bool {
    excludes.iter().any(|e| path.starts_with(e))
}

/// `path` (and, for a directory, everything under it not excluded) into
/// `builder`, named relative to `/`; depth-first, names sorted, symlinks
/// not followed.
fn append_tree(
    builder: &mut tar::Builder<FrameWriter<'_>>,
    path: &Path,
    excludes: &[&Path],
    seen: &mut std::collections::BTreeSet<std::path::PathBuf>,
) -> Result<(), String> {
    if excluded(path, excludes) || !seen.insert(path.to_path_buf()) {
        return Ok(());
    }
    let meta = std::fs::symlink_metadata(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let name = path.strip_prefix("/").unwrap_or(path);
    builder
        .append_path_with_name(path, name)
        .map_err(|e| format!("archiving {}: {e}", path.display()))?;
    if meta.is_dir() {
        let mut names: Vec<_> = std::fs::read_dir(path)
            .map_err(|e| format!("{}: {e}", path.display()))?
            .filter_map(|e| e.ok().map(|e| e.path()))
            .collect();
        names.sort();
        for child in names {
            append_tree(builder, &child, excludes, seen)?;
        }
    }
    Ok(())
}

/// `ArchivePaths`: what a home snapshot captures. The directories above
/// each path come first, header only, so their owners and modes travel
/// with the files (a layer's directory hides the one below it).
pub fn archive_paths(includes: &[String], excludes: &[String], w: &Writer) {
    let result = (|| {
        let excludes: Vec<&Path> = excludes.iter().map(Path::new).collect();
        let mut builder = tar::Builder::new(FrameWriter { w });
        builder.follow_symlinks(false);
        let mut seen = std::collections::BTreeSet::new();
        for inc in includes {
            let p = Path::new(inc);
            if !p.is_absolute() || std::fs::symlink_metadata(p).is_err() {
                continue;
            }
            let mut above = std::path::PathBuf::from("/");
            for part in p.parent().into_iter().flat_map(|d| d.components().skip(1)) {
                above.push(part);
                if seen.insert(above.clone()) {
                    let name = above.strip_prefix("/").unwrap_or(&above);
                    builder
                        .append_path_with_name(&above, name)
                        .map_err(|e| format!("archiving {}: {e}", above.display()))?;
                }
            }
            append_tree(&mut builder, p, &excludes, &mut seen)?;
        }
        builder
            .finish()
            .map_err(|e| format!("archiving the listed paths: {e}"))
    })();
    finish(w, result);
}
