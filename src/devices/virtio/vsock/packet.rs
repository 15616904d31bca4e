//! virtio-vsock packets (virtio spec 1.2, 5.10.6): the 44-byte little-endian
//! header and reading/writing packets through descriptor chains. Everything
//! here treats the guest's bytes as hostile.

use crate::devices::GuestMemoryMmap;
use vm_memory::Bytes;

pub const HDR_LEN: usize = 44;
/// Largest payload we accept from the guest in one packet (Linux sends at
/// most 64 KiB).
pub const MAX_PAYLOAD: usize = 64 * 1024;

pub const TYPE_STREAM: u16 = 1;

pub const OP_REQUEST: u16 = 1;
pub const OP_RESPONSE: u16 = 2;
pub const OP_RST: u16 = 3;
pub const OP_SHUTDOWN: u16 = 4;
pub const OP_RW: u16 = 5;
pub const OP_CREDIT_UPDATE: u16 = 6;
pub const OP_CREDIT_REQUEST: u16 = 7;

pub const SHUTDOWN_RCV: u32 = 1;
pub const SHUTDOWN_SEND: u32 = 2;

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Header {
    pub src_cid: u64,
    pub dst_cid: u64,
    pub src_port: u32,
    pub dst_port: u32,
    pub len: u32,
    pub type_: u16,
    pub op: u16,
    pub flags: u32,
    pub buf_alloc: u32,
    pub fwd_cnt: u32,
}

impl Header {
    pub fn parse(b: &[u8]) -> Option<Header> {
        if b.len() < HDR_LEN {
            return None;
        }
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap_or([0; 8]));
        let u32_at = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap_or([0; 4]));
        let u16_at = |o: usize| u16::from_le_bytes(b[o..o + 2].try_into().unwrap_or([0; 2]));
        Some(Header {
            src_cid: u64_at(0),
            dst_cid: u64_at(8),
            src_port: u32_at(16),
            dst_port: u32_at(20),
            len: u32_at(24),
            type_: u16_at(28),
            op: u16_at(30),
            flags: u32_at(32),
            buf_alloc: u32_at(36),
            fwd_cnt: u32_at(40),
        })
    }

    pub fn to_bytes(self) -> [u8; HDR_LEN] {
        let mut b = [0u8; HDR_LEN];
        b[0..8].copy_from_slice(&self.src_cid.to_le_bytes());
        b[8..16].copy_from_slice(&self.dst_cid.to_le_bytes());
        b[16..20].copy_from_slice(&self.src_port.to_le_bytes());
        b[20..24].copy_from_slice(&self.dst_port.to_le_bytes());
        b[24..28].copy_from_slice(&self.len.to_le_bytes());
        b[28..30].copy_from_slice(&self.type_.to_le_bytes());
        b[30..32].copy_from_slice(&self.op.to_le_bytes());
        b[32..36].copy_from_slice(&self.flags.to_le_bytes());
        b[36..40].copy_from_slice(&self.buf_alloc.to_le_bytes());
        b[40..44].copy_from_slice(&self.fwd_cnt.to_le_bytes());
        b
    }
}

pub use super::super::Seg;

#[derive(Debug, PartialEq)]
pub enum PacketError {
    ShortHeader,
    PayloadTooLarge(u32),
    Truncated { want: u32, have: usize },
    Memory,
}

/// Reads a TX packet (header + payload) from the chain's readable
/// descriptors, refusing lengths the chain does not back.
pub fn read_packet(mem: &GuestMemoryMmap, segs: &[Seg]) -> Result<(Header, Vec<u8>), PacketError> {
    let readable: usize = segs
        .iter()
        .filter(|s| !s.write_only)
        .map(|s| s.len as usize)
        .sum();
    let mut bytes = Vec::with_capacity(readable.min(HDR_LEN + MAX_PAYLOAD));
    for s in segs.iter().filter(|s| !s.write_only) {
        let take = (s.len as usize).min(HDR_LEN + MAX_PAYLOAD - bytes.len());
        if take == 0 {
            break;
        }
        let start = bytes.len();
        bytes.resize(start + take, 0);
        mem.read_slice(&mut bytes[start..], s.addr)
            .map_err(|_| PacketError::Memory)?;
    }
    let hdr = Header::parse(&bytes).ok_or(PacketError::ShortHeader)?;
    if hdr.len as usize > MAX_PAYLOAD {
        return Err(PacketError::PayloadTooLarge(hdr.len));
    }
    let have = bytes.len() - HDR_LEN;
    if (hdr.len as usize) > have {
        return Err(PacketError::Truncated {
            want: hdr.len,
            have,
        });
    }
    bytes.truncate(HDR_LEN + hdr.len as usize);
    let payload = bytes.split_off(HDR_LEN);
    Ok((hdr, payload))
}

/// Bytes of payload an RX chain can carry after the header.
pub fn rx_capacity(segs: &[Seg]) -> usize {
    let writable: usize = segs
        .iter()
        .filter(|s| s.write_only)
        .map(|s| s.len as usize)
        .sum();
    writable.saturating_sub(HDR_LEN)
}

/// Writes header + payload across the chain's writable descriptors; returns
/// the bytes written (the used length).
pub fn write_packet(
    mem: &GuestMemoryMmap,
    segs: &[Seg],
    hdr: &Header,
    payload: &[u8],
) -> Result<u32, PacketError> {
    let hdr_bytes = hdr.to_bytes();
    let mut src = hdr_bytes.iter().chain(payload.iter()).copied();
    let total = HDR_LEN + payload.len();
    let writable: usize = segs
        .iter()
        .filter(|s| s.write_only)
        .map(|s| s.len as usize)
        .sum();
    if writable < total {
        return Err(PacketError::Truncated {
            want: total as u32,
            have: writable,
        });
    }
    let mut written = 0usize;
    let mut chunk = Vec::new();
    for s in segs.iter().filter(|s| s.write_only) {
        if written == total {
            break;
        }
        chunk.clear();
        chunk.extend(src.by_ref().take((s.len as usize).min(total - written)));
        mem.write_slice(&chunk, s.addr)
            .map_err(|_| PacketError::Memory)?;
        written += chunk.len();
    }
    Ok(written as u32)
}

#[cfg(test)]
mod tests {
    use super::*;
    use vm_memory::GuestAddress;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn seg(addr: u64, len: u32, write_only: bool) -> Seg {
        Seg {
            addr: GuestAddress(addr),
            len,
            write_only,
        }
    }

    fn hdr(len: u32) -> Header {
        Header {
            src_cid: 3,
            dst_cid: 2,
            src_port: 1234,
            dst_port: 52,
            len,
            type_: TYPE_STREAM,
            op: OP_RW,
            flags: 0,
            buf_alloc: 4096,
            fwd_cnt: 7,
        }
    }

    #[test]
    fn header_round_trips() {
        let h = hdr(5);
        assert_eq!(Header::parse(&h.to_bytes()), Some(h));
        assert_eq!(Header::parse(&[0u8; 43]), None);
    }

    #[test]
    fn split_header_and_payload_descriptors_are_read() {
        let m = mem();
        m.write_slice(&hdr(5).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        m.write_slice(b"hello", GuestAddress(0x2000)).unwrap();
        let (h, p) = read_packet(&m, &[seg(0x1000, 44, false), seg(0x2000, 5, false)]).unwrap();
        assert_eq!(h.len, 5);
        assert_eq!(p, b"hello");
    }

    #[test]
    fn hostile_packets_are_refused() {
        let m = mem();
        // Header claims more payload than the chain carries.
        m.write_slice(&hdr(100).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            read_packet(&m, &[seg(0x1000, 44, false), seg(0x2000, 10, false)]),
            Err(PacketError::Truncated {
                want: 100,
                have: 10
            })
        );
        // Absurd length.
        m.write_slice(&hdr(u32::MAX).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        assert_eq!(
            read_packet(&m, &[seg(0x1000, 44, false)]),
            Err(PacketError::PayloadTooLarge(u32::MAX))
        );
        // Too short for a header, or only writable descriptors.
        assert_eq!(
            read_packet(&m, &[seg(0x1000, 20, false)]),
            Err(PacketError::ShortHeader)
        );
        assert_eq!(
            read_packet(&m, &[seg(0x1000, 44, true)]),
            Err(PacketError::ShortHeader)
        );
        // Descriptor pointing outside guest memory.
        assert_eq!(
            read_packet(&m, &[seg(0xff_ffff_0000, 44, false)]),
            Err(PacketError::Memory)
        );
        // A huge descriptor does not make us allocate its length.
        m.write_slice(&hdr(0).to_bytes(), GuestAddress(0x1000))
            .unwrap();
        let (h, p) =
            read_packet(&m, &[seg(0x1000, 44, false), seg(0x2000, u32::MAX, false)]).unwrap();
        assert_eq!((h.len, p.len()), (0, 0));
    }

    #[test]
    fn rx_packets_span_descriptors_and_respect_capacity() {
        let m = mem();
        let segs = [seg(0x1000, 44, true), seg(0x2000, 8, true)];
        assert_eq!(rx_capacity(&segs), 8);
        assert_eq!(write_packet(&m, &segs, &hdr(6), b"abcdef").unwrap(), 50);
        let mut back = [0u8; 6];
        m.read_slice(&mut back, GuestAddress(0x2000)).unwrap();
        assert_eq!(&back, b"abcdef");
        assert!(write_packet(&m, &segs, &hdr(9), b"too long!").is_err());
        assert!(write_packet(&m, &[seg(0x1000, 44, false)], &hdr(0), b"").is_err());
    }
}
