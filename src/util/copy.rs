//! Copying files without moving what need not move: reflink (FICLONE)
//! where the filesystem shares extents, otherwise only the data extents
//! (SEEK_DATA/SEEK_HOLE), leaving holes as holes.

use std::fs::File;
use std::os::fd::AsRawFd;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum CopyMethod {
    Reflink,
    Sparse,
}

// _IOW(0x94, 9, int)
const FICLONE: libc::c_ulong = 0x4004_9409;

pub fn reflink(src: &File, dst: &File) -> std::io::Result<()> {
    // SAFETY: FICLONE takes the source fd as its argument and touches no
    // memory of ours; both fds are open for the duration of the call.
    let rc = unsafe { libc::ioctl(dst.as_raw_fd(), FICLONE, src.as_raw_fd()) };
    if rc == 0 {
        Ok(())
    } else {
        Err(std::io::Error::last_os_error())
    }
}

fn seek(fd: &File, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
    // SAFETY: lseek on an fd we own.
    let r = unsafe { libc::lseek(fd.as_raw_fd(), offset as libc::off_t, whence) };
    if r >= 0 {
        return Ok(Some(r as u64));
    }
    let e = std::io::Error::last_os_error();
    if e.raw_os_error() == Some(libc::ENXIO) {
        Ok(None) // No more data past `offset`.
    } else {
        Err(e)
    }
}

fn copy_range(src: &File, dst: &File, mut offset: u64, end: u64) -> std::io::Result<()> {
    while offset < end {
        let mut off_in = offset as libc::loff_t;
        let mut off_out = offset as libc::loff_t;
        let len = (end - offset).min(1 << 30) as usize;
        // SAFETY: copy_file_range between two fds we own, with offsets we
        // pass by pointer to locals that outlive the call.
        let n = unsafe {
            libc::copy_file_range(
                src.as_raw_fd(),
                &mut off_in,
                dst.as_raw_fd(),
                &mut off_out,
                len,
                0,
            )
        };
        if n < 0 {
            let e = std::io::Error::last_os_error();
            if e.kind() == std::io::ErrorKind::Interrupted {
                continue;
            }
            return Err(e);
        }
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "source shrank during copy",
            ));
        }
        offset += n as u64;
    }
    Ok(())
}

/// The `[start, end)` ranges of `file` (of length `len`) that hold data;
/// holes read as zeros and are skipped.
pub fn data_extents(file: &File, len: u64) -> std::io::Result<Vec<(u64, u64)>> {
    let mut extents = Vec::new();
    let mut pos = 0;
    while pos < len {
        let Some(data) = seek(file, pos, libc::SEEK_DATA)? else {
            break;
        };
        let hole = seek(file, data, libc::SEEK_HOLE)?.unwrap_or(len).min(len);
        if hole > data {
            extents.push((data, hole));
        }
        pos = hole.max(data + 1);
    }
    Ok(extents)
}

pub fn sparse_copy(src: &File, dst: &File, len: u64) -> std::io::Result<()> {
    dst.set_len(len)?;
    for (data, hole) in data_extents(src, len)? {
        copy_range(src, dst, data, hole)?;
    }
    Ok(())
}

/// Copies open file `s` into empty open file `d`: a reflink where the
/// filesystem has them, else only the data extents (holes stay holes).
/// Not synced.
pub fn copy_file_into(s: &File, d: &File) -> std::io::Result<CopyMethod> {
    let len = s.metadata()?.len();
    match reflink(s, d) {
        Ok(()) => Ok(CopyMethod::Reflink),
        Err(_) => {
            sparse_copy(s, d, len)?;
            Ok(CopyMethod::Sparse)
        }
    }
}

/// Bytes a file really occupies (sparse files hold less than their length).
pub fn allocated_bytes(path: &std::path::Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map_or(0, |m| m.blocks() * 512)
}
