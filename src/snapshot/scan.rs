//! Proof of scrub: before a snapshot is committed, its files are searched
//! for every secret value, raw and (for values of 8 bytes or more) in
//! base64 and hex. Holes are skipped: they read as zeros.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;

use base64::Engine;
use memchr::memmem::Finder;

use crate::util::copy::data_extents;

/// Shorter values match by chance in a large memory image, so they are
/// scrubbed but not searched for (the caller warns).
pub const MIN_SCANNABLE: usize = 8;
const CHUNK: usize = 8 << 20;

/// Where a secret was found: the key and the file, never the value.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Leak {
    pub key: String,
    pub file: String,
    pub encoding: &'static str,
}

struct Pattern<'a> {
    key: &'a str,
    encoding: &'static str,
    finder: Finder<'static>,
}

fn hex(value: &[u8], upper: bool) -> Vec<u8> {
    let digits: &[u8; 16] = if upper {
        b"0123456789ABCDEF"
    } else {
        b"0123456789abcdef"
    };
    value
        .iter()
        .flat_map(|b| [digits[usize::from(b >> 4)], digits[usize::from(b & 15)]])
        .collect()
}

/// The byte strings that betray `value`.
pub fn encodings(value: &[u8]) -> Vec<(&'static str, Vec<u8>)> {
    if value.len() < MIN_SCANNABLE {
        return Vec::new();
    }
    let b64 = base64::engine::general_purpose::STANDARD.encode(value);
    // Padding depends on what followed; search the unpadded body.
    let b64 = b64.trim_end_matches('=').as_bytes().to_vec();
    vec![
        ("raw", value.to_vec()),
        ("base64", b64),
        ("hex", hex(value, false)),
        ("HEX", hex(value, true)),
    ]
}

/// Guest pages (and disk blocks) that are neighbours in the guest's view
/// need not be in the file: a value written across a page boundary lies
/// in two pages that may be anywhere. So every page's first and last
/// bytes are also matched against the ends of each value.
const PAGE: u64 = 4096;

/// The shortest part of a split value matched at a page edge: shorter
/// ones match by chance. Any split leaves one part of at least half the
/// value, so values of 12 bytes or more are always found.
const MIN_EDGE_PART: usize = 6;

/// Whether a page of `buf` (which starts at file offset `at`) begins with
/// the end of `needle` or ends with its beginning, the larger part of a
/// split (at least half of it, and at least [`MIN_EDGE_PART`] bytes).
fn split_at_page_edge(buf: &[u8], at: u64, needle: &[u8]) -> bool {
    let min = needle.len().div_ceil(2).max(MIN_EDGE_PART);
    if needle.len() <= min {
        return false;
    }
    let first = (at.div_ceil(PAGE) * PAGE - at) as usize;
    let mut edge = first;
    while edge <= buf.len() {
        let (before, after) = buf.split_at(edge);
        for part in min..needle.len() {
            if before.ends_with(&needle[..part])
                || after.starts_with(&needle[needle.len() - part..])
            {
                return true;
            }
        }
        edge += PAGE as usize;
    }
    false
}

fn split_name(encoding: &'static str) -> &'static str {
    match encoding {
        "raw" => "raw, split across pages",
        "base64" => "base64, split across pages",
        "hex" => "hex, split across pages",
        _ => "HEX, split across pages",
    }
}

/// Searches `files` for every secret; the first hit is returned.
pub fn scan(
    files: &[&Path],
    secrets: &[(String, impl AsRef<[u8]>)],
) -> std::io::Result<Option<Leak>> {
    let mut patterns = Vec::new();
    for (key, value) in secrets {
        for (encoding, bytes) in encodings(value.as_ref()) {
            patterns.push(Pattern {
                key,
                encoding,
                finder: Finder::new(&bytes).into_owned(),
            });
        }
    }
    if patterns.is_empty() {
        return Ok(None);
    }
    let overlap = patterns
        .iter()
        .map(|p| p.finder.needle().len())
        .max()
        .unwrap_or(1)
        - 1;
    for path in files {
        let file = File::open(path)?;
        let len = file.metadata()?.len();
        let mut buf = vec![0u8; CHUNK + overlap];
        for (start, end) in data_extents(&file, len)? {
            let mut pos = start;
            while pos < end {
                let n = ((end - pos) as usize).min(CHUNK + overlap);
                file.read_exact_at(&mut buf[..n], pos)?;
                let whole = patterns.iter().find(|p| p.finder.find(&buf[..n]).is_some());
                let found = whole.map(|p| (p, p.encoding)).or_else(|| {
                    patterns
                        .iter()
                        .find(|p| split_at_page_edge(&buf[..n], pos, p.finder.needle()))
                        .map(|p| (p, split_name(p.encoding)))
                });
                if let Some((p, encoding)) = found {
                    return Ok(Some(Leak {
                        key: p.key.to_string(),
                        file: path
                            .file_name()
                            .map(|f| f.to_string_lossy().into_owned())
                            .unwrap_or_default(),
                        encoding,
                    }));
                }
                if pos + n as u64 >= end {
                    break;
                }
                pos += CHUNK as u64;
            }
        }
    }
    Ok(None)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn file_with(dir: &Path, name: &str, at: u64, bytes: &[u8]) -> std::path::PathBuf {
        let p = dir.join(name);
        let f = File::create(&p).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(bytes, at).unwrap();
        p
    }

    #[test]
    fn finds_raw_base64_and_hex_across_chunk_edges() {
        let dir = tempfile::tempdir().unwrap();
        let secret = b"s3cr3t-value-0123".to_vec();
        let secrets = vec![("API_TOKEN".to_string(), secret.clone())];
        // Straddles the boundary between two read chunks.
        let raw = file_with(dir.path(), "memory.bin", CHUNK as u64 - 5, &secret);
        let leak = scan(&[&raw], &secrets).unwrap().unwrap();
        assert_eq!(
            (leak.key.as_str(), leak.file.as_str(), leak.encoding),
            ("API_TOKEN", "memory.bin", "raw")
        );
        let b64 = base64::engine::general_purpose::STANDARD.encode(&secret);
        let p = file_with(dir.path(), "rootfs.ext4", 40 << 20, b64.as_bytes());
        assert_eq!(scan(&[&p], &secrets).unwrap().unwrap().encoding, "base64");
        let p = file_with(dir.path(), "vmstate.bin", 7, &hex(&secret, true));
        assert_eq!(scan(&[&p], &secrets).unwrap().unwrap().encoding, "HEX");
        let clean = file_with(dir.path(), "clean.bin", 100, b"nothing to see");
        assert_eq!(scan(&[&clean], &secrets).unwrap(), None);
        // A value split across two pages that are far apart in the file,
        // as a guest's virtually contiguous buffer can be.
        let split = dir.path().join("split.bin");
        let f = File::create(&split).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&secret[..4], 3 * PAGE - 4).unwrap();
        f.write_all_at(&secret[4..], 9000 * PAGE).unwrap();
        let leak = scan(&[&split], &secrets).unwrap().unwrap();
        assert_eq!(leak.encoding, "raw, split across pages");
        f.write_all_at(&[0; 32], 9000 * PAGE).unwrap();
        f.write_all_at(&secret[..12], 20 * PAGE - 12).unwrap();
        let leak = scan(&[&split], &secrets).unwrap().unwrap();
        assert_eq!(leak.encoding, "raw, split across pages");
        // Half a value is no leak.
        f.write_all_at(&[0; 12], 20 * PAGE - 12).unwrap();
        f.write_all_at(&secret[..8], 20 * PAGE - 8).unwrap();
        assert_eq!(scan(&[&split], &secrets).unwrap(), None);
        // Too short to search for without false alarms.
        assert!(encodings(b"1234567").is_empty());
    }
}
