//! `vmstate.bin`: a fixed little-endian header, then the serde (JSON) body.
//!
//! Header (56 bytes): magic "MAGTVMST" | major u16 | minor u16 | reserved
//! u32 | body length u64 | body sha256 (32 bytes). One version for the whole
//! body: any change bumps it. Unknown majors are refused with a clear
//! error; so are truncated, oversized or corrupted files.

use sha2::{Digest, Sha256};

pub const MAGIC: &[u8; 8] = b"MAGTVMST";
pub const FORMAT_MAJOR: u16 = 2;
/// 1.1: the manifest records the guest's CPUID. 1.2: devices save their
/// own state. 1.3: the root disk is a frozen copy-on-write chain in
/// `disk/`, not a flat `rootfs.ext4` (1.x snapshots with one still restore).
/// 2.0: memory may be layered (a diff over its parent's memory files); a
/// 1.x reader would restore only the top layer, so it must refuse these.
pub const FORMAT_MINOR: u16 = 0;
/// The oldest major this build still reads.
pub const OLDEST_MAJOR: u16 = 1;
pub const HEADER_LEN: usize = 56;
/// Bodies are a few hundred KiB at most (per-vCPU state); anything near
/// this is not ours.
pub const MAX_BODY: u64 = 64 << 20;

#[derive(Debug, thiserror::Error, PartialEq)]
pub enum FormatError {
    #[error("not a microagent vmstate file (bad magic)")]
    BadMagic,
    #[error("vmstate file is truncated ({0} bytes)")]
    Truncated(usize),
    #[error("vmstate format {found}.x is not supported (this build reads {OLDEST_MAJOR}.x to {FORMAT_MAJOR}.x)")]
    UnsupportedMajor { found: u16 },
    #[error("vmstate body of {0} bytes exceeds the {MAX_BODY}-byte limit")]
    TooLarge(u64),
    #[error("vmstate body length {header} does not match the file ({actual} bytes)")]
    LengthMismatch { header: u64, actual: u64 },
    #[error("vmstate body is corrupted (sha256 mismatch)")]
    Checksum,
    #[error("vmstate body: {0}")]
    Body(String),
}

pub fn encode<T: serde::Serialize>(body: &T) -> Result<Vec<u8>, FormatError> {
    let json = serde_json::to_vec(body).map_err(|e| FormatError::Body(e.to_string()))?;
    if json.len() as u64 > MAX_BODY {
        return Err(FormatError::TooLarge(json.len() as u64));
    }
    Ok(with_header(&json))
}

/// `body` behind this build's header: its length and sha256. Bounds are
/// the caller's (`encode`); the fuzz target frames arbitrary bodies.
pub fn with_header(body: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(HEADER_LEN + body.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_MAJOR.to_le_bytes());
    out.extend_from_slice(&FORMAT_MINOR.to_le_bytes());
    out.extend_from_slice(&0u32.to_le_bytes());
    out.extend_from_slice(&(body.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(body));
    out.extend_from_slice(body);
    out
}

/// Validates the header and checksum, then parses the body.
pub fn decode<T: serde::de::DeserializeOwned>(bytes: &[u8]) -> Result<T, FormatError> {
    if bytes.len() < HEADER_LEN {
        if bytes.len() >= 8 && &bytes[..8] != MAGIC {
            return Err(FormatError::BadMagic);
        }
        return Err(FormatError::Truncated(bytes.len()));
    }
    if &bytes[..8] != MAGIC {
        return Err(FormatError::BadMagic);
    }
    let major = u16::from_le_bytes([bytes[8], bytes[9]]);
    if !(OLDEST_MAJOR..=FORMAT_MAJOR).contains(&major) {
        return Err(FormatError::UnsupportedMajor { found: major });
    }
    let mut len8 = [0u8; 8];
    len8.copy_from_slice(&bytes[16..24]);
    let len = u64::from_le_bytes(len8);
    if len > MAX_BODY {
        return Err(FormatError::TooLarge(len));
    }
    let actual = (bytes.len() - HEADER_LEN) as u64;
    if len != actual {
        return Err(FormatError::LengthMismatch {
            header: len,
            actual,
        });
    }
    let body = &bytes[HEADER_LEN..];
    if Sha256::digest(body).as_slice() != &bytes[24..56] {
        return Err(FormatError::Checksum);
    }
    serde_json::from_slice(body).map_err(|e| FormatError::Body(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[derive(serde::Serialize, serde::Deserialize, PartialEq, Debug)]
    struct Body {
        a: u32,
        b: Vec<u8>,
    }

    fn sample() -> Vec<u8> {
        encode(&Body {
            a: 7,
            b: vec![1, 2, 3],
        })
        .unwrap()
    }

    #[test]
    fn round_trips() {
        assert_eq!(
            decode::<Body>(&sample()).unwrap(),
            Body {
                a: 7,
                b: vec![1, 2, 3]
            }
        );
    }

    #[test]
    fn damaged_files_are_refused_with_the_reason() {
        let good = sample();
        let mut bad = good.clone();
        bad[0] = b'X';
        assert_eq!(decode::<Body>(&bad), Err(FormatError::BadMagic));
        let mut bad = good.clone();
        bad[8] = 9;
        let e = decode::<Body>(&bad).unwrap_err();
        assert_eq!(e, FormatError::UnsupportedMajor { found: 9 });
        assert!(e.to_string().contains("format 9.x is not supported"));
        assert!(matches!(
            decode::<Body>(&good[..40]),
            Err(FormatError::Truncated(40))
        ));
        assert!(matches!(
            decode::<Body>(&good[..good.len() - 1]),
            Err(FormatError::LengthMismatch { .. })
        ));
        let mut bad = good.clone();
        let last = bad.len() - 2;
        bad[last] ^= 1;
        assert_eq!(decode::<Body>(&bad), Err(FormatError::Checksum));
        let mut bad = good.clone();
        bad[16..24].copy_from_slice(&u64::MAX.to_le_bytes());
        assert!(matches!(
            decode::<Body>(&bad),
            Err(FormatError::TooLarge(_))
        ));
    }
}
