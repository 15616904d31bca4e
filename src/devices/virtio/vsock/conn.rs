//! One host-initiated stream between a Unix-socket client and a guest port,
//! with virtio-vsock credit-based flow control in both directions.

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::unix::net::UnixStream;

use super::packet::{
    Header, OP_CREDIT_UPDATE, OP_REQUEST, OP_RST, OP_RW, OP_SHUTDOWN, SHUTDOWN_RCV, SHUTDOWN_SEND,
    TYPE_STREAM,
};

/// Receive buffer we advertise to the guest, per connection. The guest may
/// never have more than this in flight towards us.
pub const BUF_ALLOC: u32 = 256 * 1024;
/// Host-to-guest bytes staged per connection before the guest takes them.
const STAGE_MAX: usize = 64 * 1024;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConnState {
    /// REQUEST sent; waiting for the guest's RESPONSE.
    Connecting,
    Connected,
    /// Told to go away; flush what the Unix side still has to get, then drop.
    Closing,
}

pub struct Conn {
    pub stream: UnixStream,
    pub local_port: u32,
    pub peer_port: u32,
    pub state: ConnState,
    /// Guest's receive buffer and how much of what we sent it has consumed.
    peer_buf_alloc: u32,
    peer_fwd_cnt: u32,
    /// Bytes we have sent the guest (wrapping, like the spec's counters).
    tx_cnt: u32,
    /// Bytes from the guest we have delivered to the Unix side.
    fwd_cnt: u32,
    last_fwd_cnt_sent: u32,
    /// Guest-to-host bytes the Unix side has not taken yet.
    to_unix: VecDeque<u8>,
    /// Host-to-guest bytes read from the Unix side, not yet in an RX packet.
    to_guest: VecDeque<u8>,
    pub unix_eof: bool,
    pub eof_sent: bool,
    pub guest_done_sending: bool,
    pub credit_update_due: bool,
}

impl Conn {
    pub fn new(stream: UnixStream, local_port: u32, peer_port: u32) -> Conn {
        Conn {
            stream,
            local_port,
            peer_port,
            state: ConnState::Connecting,
            peer_buf_alloc: 0,
            peer_fwd_cnt: 0,
            tx_cnt: 0,
            fwd_cnt: 0,
            last_fwd_cnt_sent: 0,
            to_unix: VecDeque::new(),
            to_guest: VecDeque::new(),
            unix_eof: false,
            eof_sent: false,
            guest_done_sending: false,
            credit_update_due: false,
        }
    }

    /// A header from us (host CID, our port) to the guest for this stream.
    pub fn header(
        &mut self,
        host_cid: u64,
        guest_cid: u64,
        op: u16,
        len: u32,
        flags: u32,
    ) -> Header {
        self.last_fwd_cnt_sent = self.fwd_cnt;
        Header {
            src_cid: host_cid,
            dst_cid: guest_cid,
            src_port: self.local_port,
            dst_port: self.peer_port,
            len,
            type_: TYPE_STREAM,
            op,
            flags,
            buf_alloc: BUF_ALLOC,
            fwd_cnt: self.fwd_cnt,
        }
    }

    pub fn request_header(&mut self, host_cid: u64, guest_cid: u64) -> Header {
        self.header(host_cid, guest_cid, OP_REQUEST, 0, 0)
    }

    /// Records the guest's view of its buffer, carried by every packet.
    pub fn update_peer_credit(&mut self, h: &Header) {
        self.peer_buf_alloc = h.buf_alloc;
        self.peer_fwd_cnt = h.fwd_cnt;
    }

    /// How many more bytes the guest can take right now.
    pub fn peer_credit(&self) -> u32 {
        let in_flight = self.tx_cnt.wrapping_sub(self.peer_fwd_cnt);
        self.peer_buf_alloc.saturating_sub(in_flight)
    }

    /// Takes guest data for the Unix side. False if the guest overran the
    /// credit we gave it (a protocol violation: the caller resets).
    pub fn push_from_guest(&mut self, data: &[u8]) -> bool {
        if self.to_unix.len() + data.len() > BUF_ALLOC as usize {
            return false;
        }
        self.to_unix.extend(data);
        true
    }

    /// Writes pending guest data to the Unix side. Err means the client is
    /// gone.
    pub fn flush_to_unix(&mut self) -> std::io::Result<()> {
        while !self.to_unix.is_empty() {
            let (a, _) = self.to_unix.as_slices();
            match self.stream.write(a) {
                Ok(0) => return Err(ErrorKind::WriteZero.into()),
                Ok(n) => {
                    self.to_unix.drain(..n);
                    self.fwd_cnt = self.fwd_cnt.wrapping_add(n as u32);
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        // Tell the guest about freed space before it stalls on credit.
        if self.fwd_cnt.wrapping_sub(self.last_fwd_cnt_sent) >= BUF_ALLOC / 4 {
            self.credit_update_due = true;
        }
        Ok(())
    }

    pub fn has_unix_backlog(&self) -> bool {
        !self.to_unix.is_empty()
    }

    /// Reads from the Unix side into the staging buffer while there is room.
    pub fn fill_from_unix(&mut self) -> std::io::Result<()> {
        let mut buf = [0u8; 16 * 1024];
        while !self.unix_eof && self.to_guest.len() < STAGE_MAX {
            let room = (STAGE_MAX - self.to_guest.len()).min(buf.len());
            match self.stream.read(&mut buf[..room]) {
                Ok(0) => self.unix_eof = true,
                Ok(n) => self.to_guest.extend(&buf[..n]),
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Whether the Unix side should be polled for reading.
    pub fn wants_unix_read(&self) -> bool {
        self.state == ConnState::Connected && !self.unix_eof && self.to_guest.len() < STAGE_MAX
    }

    /// Takes up to `max` staged bytes that the guest has credit for.
    pub fn take_for_guest(&mut self, max: usize) -> Vec<u8> {
        let n = self
            .to_guest
            .len()
            .min(max)
            .min(self.peer_credit() as usize);
        let data: Vec<u8> = self.to_guest.drain(..n).collect();
        self.tx_cnt = self.tx_cnt.wrapping_add(n as u32);
        data
    }

    pub fn has_data_for_guest(&self) -> bool {
        !self.to_guest.is_empty() && self.peer_credit() > 0
    }

    /// Whether `pending_control` has a packet to give.
    pub fn owes_control(&self) -> bool {
        (self.unix_eof && self.to_guest.is_empty() && !self.eof_sent) || self.credit_update_due
    }

    /// The next control packet this stream owes the guest, if any.
    pub fn pending_control(&mut self, host_cid: u64, guest_cid: u64) -> Option<Header> {
        if self.state != ConnState::Connected {
            return None;
        }
        if self.unix_eof && self.to_guest.is_empty() && !self.eof_sent {
            self.eof_sent = true;
            return Some(self.header(host_cid, guest_cid, OP_SHUTDOWN, 0, SHUTDOWN_SEND));
        }
        if self.credit_update_due {
            self.credit_update_due = false;
            return Some(self.header(host_cid, guest_cid, OP_CREDIT_UPDATE, 0, 0));
        }
        None
    }

    pub fn rw_header(&mut self, host_cid: u64, guest_cid: u64, len: u32) -> Header {
        self.header(host_cid, guest_cid, OP_RW, len, 0)
    }

    pub fn rst_header(&mut self, host_cid: u64, guest_cid: u64) -> Header {
        self.header(host_cid, guest_cid, OP_RST, 0, 0)
    }

    /// SHUTDOWN from the guest: with both flags the stream is over once the
    /// Unix side has everything.
    pub fn guest_shutdown(&mut self, flags: u32) {
        if flags & SHUTDOWN_SEND != 0 {
            self.guest_done_sending = true;
        }
        if flags & (SHUTDOWN_SEND | SHUTDOWN_RCV) == (SHUTDOWN_SEND | SHUTDOWN_RCV) {
            self.state = ConnState::Closing;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn conn() -> (Conn, UnixStream) {
        let (a, b) = UnixStream::pair().unwrap();
        a.set_nonblocking(true).unwrap();
        let mut c = Conn::new(a, 1 << 30, 52);
        c.state = ConnState::Connected;
        (c, b)
    }

    #[test]
    fn never_sends_beyond_the_guests_credit() {
        let (mut c, mut peer) = conn();
        c.update_peer_credit(&Header {
            buf_alloc: 10,
            fwd_cnt: 0,
            ..Default::default()
        });
        peer.write_all(&[7u8; 100]).unwrap();
        c.fill_from_unix().unwrap();
        assert_eq!(c.take_for_guest(4096).len(), 10);
        assert_eq!(c.peer_credit(), 0);
        assert!(c.take_for_guest(4096).is_empty());
        // The guest consumed 6 bytes.
        c.update_peer_credit(&Header {
            buf_alloc: 10,
            fwd_cnt: 6,
            ..Default::default()
        });
        assert_eq!(c.take_for_guest(4096).len(), 6);
    }

    #[test]
    fn guest_overrunning_our_buffer_is_detected() {
        let (mut c, _peer) = conn();
        assert!(c.push_from_guest(&vec![0u8; BUF_ALLOC as usize]));
        assert!(!c.push_from_guest(&[0u8]));
    }

    #[test]
    fn delivered_bytes_advance_fwd_cnt_and_trigger_credit_updates() {
        let (mut c, mut peer) = conn();
        assert!(c.push_from_guest(&vec![1u8; (BUF_ALLOC / 2) as usize]));
        // The peer drains concurrently so the socket buffer never blocks.
        let reader = std::thread::spawn(move || {
            let mut got = vec![0u8; (BUF_ALLOC / 2) as usize];
            peer.read_exact(&mut got).unwrap();
            got
        });
        while c.has_unix_backlog() {
            c.flush_to_unix().unwrap();
        }
        assert_eq!(reader.join().unwrap().len(), (BUF_ALLOC / 2) as usize);
        let h = c.pending_control(2, 3).unwrap();
        assert_eq!(h.op, OP_CREDIT_UPDATE);
        assert_eq!(h.fwd_cnt, BUF_ALLOC / 2);
    }

    #[test]
    fn unix_eof_becomes_one_shutdown() {
        let (mut c, peer) = conn();
        drop(peer);
        c.fill_from_unix().unwrap();
        assert!(c.unix_eof);
        let h = c.pending_control(2, 3).unwrap();
        assert_eq!((h.op, h.flags), (OP_SHUTDOWN, SHUTDOWN_SEND));
        assert!(c.pending_control(2, 3).is_none());
    }
}
