//! Snapshot files cut into content-addressed chunks, and put back
//! together, for sharing snapshots through registries.
//!
//! A file is sent as its length, its data extents and the bytes of those
//! extents: holes are never read or sent, and come back as holes (in a
//! disk chain file allocation is content, so the extents must come back
//! exactly). The extents' bytes are cut at fixed file offsets, every
//! `chunk_size`, so a window unchanged since an earlier snapshot gives
//! the same bytes and digest and is stored and sent once. A window whose
//! bytes are all zero is not stored at all. Chunks are zstd-compressed
//! and named by the sha256 of the compressed bytes: the digest a
//! registry checks on upload and that is checked again on download.

use std::fs::File;
use std::io;
use std::os::unix::fs::FileExt;
use std::path::Path;

use serde::{Deserialize, Serialize};

/// zstd level: level 3 compresses guest memory to about a third at a
/// few hundred MB/s per core; higher levels cost far more time than they
/// save bytes on a local network.
pub const ZSTD_LEVEL: i32 = 3;
/// Files larger than this are refused (guest memory is capped far lower).
pub const MAX_FILE: u64 = 1 << 40;
/// Extents one file may list: a 4 KiB-fragmented 4 GiB file has 1 Mi.
pub const MAX_EXTENTS: usize = 1 << 20;

/// A file as a list of chunks.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkedFile {
    /// Its name where it belongs (a snapshot's `memory.bin`, `disk/...`).
    pub name: String,
    pub size: u64,
    /// `[start, end)` ranges that hold data, sorted and disjoint.
    pub extents: Vec<[u64; 2]>,
    /// The windows that are not all zero, by index, ascending.
    pub chunks: Vec<ChunkRef>,
}

/// One stored chunk: window `index` of its file.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ChunkRef {
    pub index: u64,
    /// sha256 (hex) of the compressed bytes.
    pub sha256: String,
    /// Compressed bytes.
    pub size: u64,
    /// Bytes it holds once decompressed: the extents' bytes in its window.
    pub len: u64,
}

/// A chunk as it is cut: compressed, with its name.
pub struct Chunk {
    pub index: u64,
    pub sha256: String,
    pub data: Vec<u8>,
    pub len: u64,
}

/// The parts of `extents` inside window `index`, in file order.
fn segments(extents: &[[u64; 2]], index: u64, chunk_size: u64) -> Vec<(u64, u64)> {
    let (lo, hi) = (index * chunk_size, (index + 1) * chunk_size);
    let first = extents.partition_point(|e| e[1] <= lo);
    extents[first..]
        .iter()
        .take_while(|e| e[0] < hi)
        .map(|e| (e[0].max(lo), e[1].min(hi)))
        .filter(|(s, e)| s < e)
        .collect()
}

/// Every window that holds part of an extent, ascending.
fn windows(extents: &[[u64; 2]], chunk_size: u64) -> impl Iterator<Item = u64> + '_ {
    let mut last: Option<u64> = None;
    extents.iter().flat_map(move |e| {
        let first = (e[0] / chunk_size).max(last.map_or(0, |l| l + 1));
        let end = e[1].div_ceil(chunk_size);
        if end > first {
            last = Some(end - 1);
        }
        first..end
    })
}

/// Cuts `path` into chunks of `chunk_size` windows, calling `each` with
/// every window that is not all zero, in file order. `name` is recorded
/// as the file's name.
pub fn cut(
    path: &Path,
    name: &str,
    chunk_size: u64,
    each: &mut dyn FnMut(&Chunk) -> io::Result<()>,
) -> io::Result<ChunkedFile> {
    let f = File::open(path)?;
    let size = f.metadata()?.len();
    let mut extents: Vec<[u64; 2]> = Vec::new();
    for (s, e) in crate::util::copy::data_extents(&f, size)? {
        match extents.last_mut() {
            Some(last) if last[1] == s => last[1] = e,
            _ => extents.push([s, e]),
        }
    }
    let mut chunks = Vec::new();
    let mut buf = Vec::with_capacity(chunk_size as usize);
    let zeros = vec![0u8; chunk_size as usize];
    for index in windows(&extents, chunk_size).collect::<Vec<_>>() {
        buf.clear();
        for (s, e) in segments(&extents, index, chunk_size) {
            let at = buf.len();
            buf.resize(at + (e - s) as usize, 0);
            f.read_exact_at(&mut buf[at..], s)?;
        }
        // Slice equality is a memcmp: fast even in debug builds.
        if buf[..] == zeros[..buf.len()] {
            continue;
        }
        let data = zstd::bulk::compress(&buf, ZSTD_LEVEL)?;
        let chunk = Chunk {
            index,
            sha256: crate::digest::sha256_bytes(&data),
            len: buf.len() as u64,
            data,
        };
        each(&chunk)?;
        chunks.push(ChunkRef {
            index,
            sha256: chunk.sha256,
            size: chunk.data.len() as u64,
            len: chunk.len,
        });
    }
    Ok(ChunkedFile {
        name: name.to_string(),
        size,
        extents,
        chunks,
    })
}

impl ChunkedFile {
    /// Checks a description read from elsewhere: sizes bounded, extents
    /// sorted inside the file, chunks in windows that hold data with the
    /// length those windows hold, compressed sizes zstd could produce.
    pub fn validate(&self, chunk_size: u64) -> Result<(), String> {
        let name = &self.name;
        if self.size > MAX_FILE {
            return Err(format!("{name}: size {} is over 1 TiB", self.size));
        }
        if self.extents.len() > MAX_EXTENTS {
            return Err(format!("{name}: {} extents", self.extents.len()));
        }
        let mut end = 0;
        for (i, e) in self.extents.iter().enumerate() {
            if e[0] >= e[1] || e[1] > self.size || (i > 0 && e[0] <= end) {
                return Err(format!(
                    "{name}: extent [{}, {}) is empty, out of order or past the file's {} bytes",
                    e[0], e[1], self.size
                ));
            }
            end = e[1];
        }
        let mut last = None;
        for c in &self.chunks {
            if last.is_some_and(|l| c.index <= l) {
                return Err(format!("{name}: chunk {} out of order", c.index));
            }
            last = Some(c.index);
            let len: u64 = segments(&self.extents, c.index, chunk_size)
                .iter()
                .map(|(s, e)| e - s)
                .sum();
            if len == 0 || c.len != len {
                return Err(format!(
                    "{name}: chunk {} says {} bytes, its window holds {len}",
                    c.index, c.len
                ));
            }
            if c.size == 0 || c.size > zstd::zstd_safe::compress_bound(len as usize) as u64 {
                return Err(format!(
                    "{name}: chunk {} is {} bytes compressed, impossible for {len} bytes",
                    c.index, c.size
                ));
            }
            if c.sha256.len() != 64 || !c.sha256.bytes().all(|b| b.is_ascii_hexdigit()) {
                return Err(format!("{name}: chunk {} has no sha256", c.index));
            }
        }
        Ok(())
    }
}

/// Writes `file` (validated) at `dest`, a new file, from its chunks:
/// `chunk` returns a chunk's compressed bytes (already checked against
/// its sha256), which must decompress to exactly the length recorded.
/// Windows without a chunk are zeros, written so they stay allocated.
pub fn assemble(
    dest: &Path,
    file: &ChunkedFile,
    chunk_size: u64,
    chunk: &mut dyn FnMut(&ChunkRef) -> io::Result<Vec<u8>>,
) -> io::Result<()> {
    let f = std::fs::OpenOptions::new()
        .write(true)
        .create_new(true)
        .open(dest)?;
    f.set_len(file.size)?;
    let mut stored = file.chunks.iter().peekable();
    let zeros = vec![0u8; chunk_size as usize];
    for index in windows(&file.extents, chunk_size).collect::<Vec<_>>() {
        let segs = segments(&file.extents, index, chunk_size);
        let bytes = match stored.next_if(|c| c.index == index) {
            Some(c) => {
                let data = zstd::bulk::decompress(&chunk(c)?, c.len as usize)?;
                if data.len() as u64 != c.len {
                    return Err(io::Error::new(
                        io::ErrorKind::InvalidData,
                        format!(
                            "chunk sha256:{} holds {} bytes, {} expected",
                            c.sha256,
                            data.len(),
                            c.len
                        ),
                    ));
                }
                data
            }
            None => zeros.clone(),
        };
        let mut at = 0;
        for (s, e) in segs {
            let n = (e - s) as usize;
            f.write_all_at(&bytes[at..at + n], s)?;
            at += n;
        }
    }
    f.sync_all()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn cut_and_assemble_keep_bytes_and_holes() {
        let dir = tempfile::tempdir().unwrap();
        let src = dir.path().join("src");
        let f = File::create(&src).unwrap();
        let cs = 64 << 10;
        f.set_len(10 * cs + 123).unwrap();
        // Data across a window boundary, a window of allocated zeros, and
        // a short tail; holes between.
        f.write_all_at(&vec![7u8; 8192], cs - 4096).unwrap();
        f.write_all_at(&vec![0u8; 8192], 4 * cs).unwrap();
        f.write_all_at(b"tail", 10 * cs + 100).unwrap();
        f.sync_all().unwrap();
        let mut store = std::collections::HashMap::new();
        let file = cut(&src, "x", cs, &mut |c| {
            store.insert(c.sha256.clone(), c.data.clone());
            Ok(())
        })
        .unwrap();
        file.validate(cs).unwrap();
        // Windows 0 and 1 hold the 7s, 10 the tail; window 4 is zeros.
        let indexes: Vec<u64> = file.chunks.iter().map(|c| c.index).collect();
        assert_eq!(indexes, vec![0, 1, 10]);
        let dest = dir.path().join("dest");
        assemble(&dest, &file, cs, &mut |c| Ok(store[&c.sha256].clone())).unwrap();
        assert_eq!(std::fs::read(&src).unwrap(), std::fs::read(&dest).unwrap());
        let back = cut(&dest, "x", cs, &mut |_| Ok(())).unwrap();
        assert_eq!(
            back.extents, file.extents,
            "holes and allocated zeros come back"
        );
    }

    #[test]
    fn hostile_descriptions_are_refused() {
        let cs = 1 << 20;
        let good = ChunkedFile {
            name: "m".into(),
            size: 3 << 20,
            extents: vec![[0, 4096], [2 << 20, 3 << 20]],
            chunks: vec![ChunkRef {
                index: 2,
                sha256: "a".repeat(64),
                size: 100,
                len: 1 << 20,
            }],
        };
        good.validate(cs).unwrap();
        let mut bad = good.clone();
        bad.extents = vec![[2 << 20, 3 << 20], [0, 4096]];
        assert!(bad.validate(cs).is_err(), "unsorted");
        let mut bad = good.clone();
        bad.extents[1][1] = 4 << 20;
        assert!(bad.validate(cs).is_err(), "past the end");
        let mut bad = good.clone();
        bad.chunks[0].len = 4 << 20;
        assert!(bad.validate(cs).is_err(), "wrong length (a bomb)");
        let mut bad = good.clone();
        bad.chunks[0].index = 1;
        assert!(bad.validate(cs).is_err(), "a window without data");
        let mut bad = good;
        bad.chunks[0].sha256 = "../x".into();
        assert!(bad.validate(cs).is_err(), "a name that is no digest");
    }
}
