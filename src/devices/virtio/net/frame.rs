//! passt's socket protocol: a stream of Ethernet frames, each preceded by
//! its length as a 32-bit big-endian integer (what QEMU's `-netdev stream`
//! speaks). The stream comes from another process: lengths are bounded and
//! a bad one ends the link instead of being trusted.

/// Largest frame either side may send: passt's 65520-byte MTU plus the
/// Ethernet header, rounded up.
pub const MAX_FRAME: usize = 65_536;

#[derive(Debug, PartialEq, Eq, thiserror::Error)]
pub enum FrameError {
    #[error("frame length {0} from passt is out of range (1..={MAX_FRAME})")]
    BadLength(usize),
}

/// Reassembles frames from whatever chunks the socket returns.
#[derive(Default)]
pub struct FrameReader {
    buf: Vec<u8>,
}

impl FrameReader {
    pub fn push(&mut self, data: &[u8]) {
        self.buf.extend_from_slice(data);
    }

    /// The next complete frame, None if more bytes are needed.
    pub fn next_frame(&mut self) -> Result<Option<Vec<u8>>, FrameError> {
        let Some(len) = self.buf.get(..4) else {
            return Ok(None);
        };
        let len = u32::from_be_bytes([len[0], len[1], len[2], len[3]]) as usize;
        if len == 0 || len > MAX_FRAME {
            return Err(FrameError::BadLength(len));
        }
        if self.buf.len() < 4 + len {
            return Ok(None);
        }
        let frame = self.buf[4..4 + len].to_vec();
        self.buf.drain(..4 + len);
        Ok(Some(frame))
    }
}

/// Appends one frame, length-prefixed, to `out`.
pub fn encode(frame: &[u8], out: &mut Vec<u8>) {
    out.extend_from_slice(&(frame.len() as u32).to_be_bytes());
    out.extend_from_slice(frame);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_split_anywhere_reassemble() {
        let mut wire = Vec::new();
        encode(b"first frame", &mut wire);
        encode(&[7u8; 1514], &mut wire);
        let mut r = FrameReader::default();
        let mut got = Vec::new();
        for chunk in wire.chunks(5) {
            r.push(chunk);
            while let Some(f) = r.next_frame().unwrap() {
                got.push(f);
            }
        }
        assert_eq!(got, vec![b"first frame".to_vec(), vec![7u8; 1514]]);
        assert_eq!(r.next_frame(), Ok(None), "nothing left over");
    }

    #[test]
    fn hostile_lengths_are_refused() {
        for len in [0u32, MAX_FRAME as u32 + 1, u32::MAX] {
            let mut r = FrameReader::default();
            r.push(&len.to_be_bytes());
            assert_eq!(r.next_frame(), Err(FrameError::BadLength(len as usize)));
        }
    }
}
