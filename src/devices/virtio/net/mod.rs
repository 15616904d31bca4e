//! virtio-net in userspace, backed by a per-VM passt (user-mode TCP/IP:
//! no root network set-up, no tap device, no vhost-net on this host).
//!
//! One RX and one TX queue, no offloads and no mergeable buffers (every
//! chain carries one whole frame, at most the MTU we offer), MAC and MTU in
//! config.
//! Frames go to passt length-prefixed over a socketpair, one frame per
//! write (see `flush_tx` for why). Backpressure both
//! ways: TX chains stay in the ring while passt's socket is full, and we
//! stop reading passt while the guest has posted no RX buffers, so neither
//! side drops frames in a busy loop.

pub mod config;
mod frame;
mod passt;
pub mod persist;

use std::collections::VecDeque;
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::UnixStream;
use std::process::Child;
use std::sync::{Arc, Mutex};

use crate::devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{
    chain_segs, quiet, read_config_bytes, rearm, ActivateError, Activated, Interrupt, Seg,
    VirtioDevice, INT_USED_RING, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
pub use config::NetConfig;
use frame::{encode, FrameReader, MAX_FRAME};
pub use passt::PasstError;

pub const TYPE_NET: u32 = 1;
const VIRTIO_NET_F_MTU: u64 = 1 << 3;
const VIRTIO_NET_F_MAC: u64 = 1 << 5;
/// passt's own MTU. Offered to the guest, it makes Linux post ~64 KiB
/// receive buffers and send 64 KiB segments: far fewer frames, which is
/// what costs (every frame is an interrupt or a kick, and on PVM hosts
/// the guest's network stack is emulated per frame).
const GUEST_MTU: u16 = 65_520;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
/// virtio_net_hdr_v1 (VERSION_1 always has num_buffers).
const HDR_LEN: usize = 12;
/// Frames from passt held for the guest before we stop reading passt.
const MAX_RX_BACKLOG: usize = 256;
/// Bytes for passt held before TX chains are left in the ring.
const MAX_TX_BACKLOG: usize = 1 << 20;

/// The link as `status` reports it: up, or why not.
pub type LinkState = Arc<Mutex<Result<(), String>>>;

type Active = Activated;

pub struct Net {
    /// mac[6], status (unused), max_virtqueue_pairs (unused), mtu.
    pub(super) config: [u8; 12],
    passt: UnixStream,
    /// None when the other end is not a passt we started (fuzzing).
    child: Option<Child>,
    epoll: Epoll,
    link: LinkState,
    reader: FrameReader,
    rx_backlog: VecDeque<Vec<u8>>,
    /// Encoded frames (length prefix + frame) waiting for passt's socket.
    tx_backlog: VecDeque<Vec<u8>>,
    /// Bytes in `tx_backlog`, less what has gone of its front frame.
    tx_bytes: usize,
    /// Bytes of the front frame already written.
    tx_sent: usize,
    pub(super) active: Option<Active>,
}

/// Why a TX chain is dropped rather than sent.
#[derive(Debug, PartialEq, Eq)]
enum TxError {
    WriteOnly,
    Size(usize),
}

/// The frame a TX chain carries (header stripped), validated first: only
/// device-readable descriptors, a whole header, a bounded frame.
fn read_tx(mem: &GuestMemoryMmap, segs: &[Seg]) -> Result<Vec<u8>, TxError> {
    if segs.iter().any(|s| s.write_only) {
        return Err(TxError::WriteOnly);
    }
    let total: usize = segs.iter().map(|s| s.len as usize).sum();
    if total <= HDR_LEN || total > HDR_LEN + MAX_FRAME {
        return Err(TxError::Size(total));
    }
    let mut buf = vec![0u8; total];
    let mut at = 0;
    for s in segs {
        let n = s.len as usize;
        mem.read_slice(&mut buf[at..at + n], s.addr)
            .map_err(|_| TxError::Size(total))?;
        at += n;
    }
    buf.drain(..HDR_LEN);
    Ok(buf)
}

/// Writes header + frame into an RX chain; Some(bytes written) or None if
/// the chain is unusable (not writable, too small, bad addresses).
fn write_rx(mem: &GuestMemoryMmap, segs: &[Seg], frame: &[u8]) -> Option<u32> {
    if segs.is_empty() || segs.iter().any(|s| !s.write_only) {
        return None;
    }
    let room: usize = segs.iter().map(|s| s.len as usize).sum();
    let mut data = vec![0u8; HDR_LEN];
    // num_buffers = 1: no mergeable buffers, one chain per frame.
    data[10] = 1;
    data.extend_from_slice(frame);
    if room < data.len() {
        return None;
    }
    let mut at = 0;
    for s in segs {
        if at == data.len() {
            break;
        }
        let n = (s.len as usize).min(data.len() - at);
        mem.write_slice(&data[at..at + n], s.addr).ok()?;
        at += n;
    }
    Some(data.len() as u32)
}

impl Net {
    /// Starts this VM's passt and the device in front of it.
    pub fn new(cfg: &NetConfig, link: LinkState) -> Result<Net, PasstError> {
        let (passt, child) = passt::spawn(cfg)?;
        Net::over(passt, Some(child), link)
    }

    /// The device in front of `passt`, a non-blocking stream that speaks
    /// passt's framing: the one [`Net::new`] started, or, for the fuzz
    /// harness, any socket (`child` None).
    pub fn over(
        passt: UnixStream,
        child: Option<Child>,
        link: LinkState,
    ) -> Result<Net, PasstError> {
        let epoll = Epoll::new().map_err(PasstError::Socket)?;
        epoll
            .ctl(
                ControlOperation::Add,
                passt.as_raw_fd(),
                EpollEvent::new(EventSet::IN, 0),
            )
            .map_err(PasstError::Socket)?;
        *link.lock().unwrap_or_else(|e| e.into_inner()) = Ok(());
        let mut cfg_space = [0u8; 12];
        cfg_space[..6].copy_from_slice(&config::GUEST_MAC);
        cfg_space[10..].copy_from_slice(&GUEST_MTU.to_le_bytes());
        // passt learns where the guest is from the first frame it gets:
        // give it one now, so inbound connections reach a guest that has
        // not transmitted since this passt started (see guest_announcement).
        let mut hello = Vec::new();
        encode(&config::guest_announcement(), &mut hello);
        let mut net = Net {
            config: cfg_space,
            passt,
            child,
            epoll,
            link,
            reader: FrameReader::default(),
            rx_backlog: VecDeque::new(),
            tx_backlog: VecDeque::new(),
            tx_bytes: 0,
            tx_sent: 0,
            active: None,
        };
        net.tx_bytes = hello.len();
        net.tx_backlog.push_back(hello);
        net.flush_tx();
        Ok(net)
    }

    fn passt_exit_reason(&mut self) -> String {
        match &mut self.child {
            Some(child) => passt::exit_reason(child),
            None => "the backend closed its socket".into(),
        }
    }

    fn is_up(&self) -> bool {
        self.link.lock().map(|l| l.is_ok()).unwrap_or(false)
    }

    /// passt is gone (or spoke nonsense): the link goes down for good and
    /// the guest's frames are dropped from now on, never spun on.
    fn link_down(&mut self, why: String) {
        if !self.is_up() {
            return;
        }
        eprintln!("microagent: network down: {why}");
        *self.link.lock().unwrap_or_else(|e| e.into_inner()) = Err(why);
        let _ = self.epoll.ctl(
            ControlOperation::Delete,
            self.passt.as_raw_fd(),
            EpollEvent::default(),
        );
        let _ = self.passt.shutdown(std::net::Shutdown::Both);
        self.rx_backlog.clear();
        self.clear_tx();
    }

    fn clear_tx(&mut self) {
        self.tx_backlog.clear();
        self.tx_bytes = 0;
        self.tx_sent = 0;
    }

    /// Reads what passt sent, while the guest can take it.
    fn read_passt(&mut self) {
        let mut buf = [0u8; 64 * 1024];
        while self.is_up() && self.rx_backlog.len() < MAX_RX_BACKLOG {
            match self.passt.read(&mut buf) {
                Ok(0) => {
                    let why = self.passt_exit_reason();
                    self.link_down(why);
                }
                Ok(n) => {
                    self.reader.push(&buf[..n]);
                    loop {
                        match self.reader.next_frame() {
                            Ok(Some(f)) => self.rx_backlog.push_back(f),
                            Ok(None) => break,
                            Err(e) => {
                                self.link_down(e.to_string());
                                break;
                            }
                        }
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = format!("reading from passt: {e}");
                    self.link_down(why);
                }
            }
        }
    }

    /// Writes queued frames to passt, one frame per write() and the rest
    /// of a half-written frame before anything else.
    ///
    /// Why not one big write: passt (Debian 12's 2023-03 build) reads its
    /// socket in chunks and only copes with a chunk that ends inside a
    /// frame if the rest of that frame then arrives in one piece, and it
    /// drops a chunk that ends inside a 4-byte length. The kernel queues a
    /// unix-stream write in pieces of ~36 KiB, and a reader can run between
    /// them. A write that starts at a frame's length and holds only that
    /// frame (at most 64 KiB: two pieces) can only be cut between its two
    /// pieces, and the second arrives whole. Batched writes were cut
    /// anywhere: passt lost its framing and reset the guest's TCP
    /// connections after about a megabyte of upload.
    fn flush_tx(&mut self) {
        while self.is_up() {
            let Some(front) = self.tx_backlog.front() else {
                break;
            };
            match self.passt.write(&front[self.tx_sent..]) {
                Ok(n) => {
                    self.tx_sent += n;
                    self.tx_bytes -= n;
                    if self.tx_sent == front.len() {
                        self.tx_backlog.pop_front();
                        self.tx_sent = 0;
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => break,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(e) => {
                    let why = match e.kind() {
                        ErrorKind::BrokenPipe => self.passt_exit_reason(),
                        _ => format!("writing to passt: {e}"),
                    };
                    self.link_down(why);
                }
            }
        }
    }

    /// Guest -> passt, one chain per frame, while passt keeps up; kicks
    /// are off while we drain, and re-armed only once the ring is empty
    /// (a full backlog brings us back through passt's socket instead).
    fn process_tx(&mut self) {
        let up = self.is_up();
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let q = &mut active.queues[TX];
        quiet(q, &mem);
        let mut used = false;
        loop {
            let (mut drained, mut popped) = (false, false);
            while !up || self.tx_bytes < MAX_TX_BACKLOG {
                let Some(chain) = q.pop_descriptor_chain(&mem) else {
                    drained = true;
                    break;
                };
                popped = true;
                let head = chain.head_index();
                let segs = chain_segs(chain);
                // A malformed chain is consumed and dropped; so is everything
                // once passt is gone.
                if let (Ok(frame), true) = (read_tx(&mem, &segs), up) {
                    let mut wire = Vec::with_capacity(frame.len() + 4);
                    encode(&frame, &mut wire);
                    self.tx_bytes += wire.len();
                    self.tx_backlog.push_back(wire);
                }
                let _ = q.add_used(&mem, head, 0);
                used = true;
            }
            // A round that found nothing after a re-arm said "more" is a
            // ring we cannot read: stop rather than spin on it.
            if !drained || !rearm(q, &mem) || !popped {
                break;
            }
        }
        if used && q.needs_notification(&mem).unwrap_or(true) {
            active.interrupt.signal(INT_USED_RING);
        }
        self.flush_tx();
    }

    /// passt -> guest, while the guest has posted buffers; a kick for new
    /// buffers is wanted only while frames wait for one.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let q = &mut active.queues[RX];
        quiet(q, &mem);
        let (mut used, mut retried) = (false, false);
        while let Some(frame) = self.rx_backlog.front() {
            let Some(chain) = q.pop_descriptor_chain(&mem) else {
                // One more look if buffers came in as we re-armed; a ring
                // that still yields none is one we cannot read.
                if !retried && rearm(q, &mem) {
                    retried = true;
                    continue;
                }
                break;
            };
            retried = false;
            let head = chain.head_index();
            let segs = chain_segs(chain);
            // A buffer that cannot take the frame is returned empty and the
            // frame dropped (the guest's buffers are all alike: no later
            // one would take it either).
            let len = write_rx(&mem, &segs, frame).unwrap_or(0);
            let _ = q.add_used(&mem, head, len);
            self.rx_backlog.pop_front();
            used = true;
        }
        if used && q.needs_notification(&mem).unwrap_or(true) {
            active.interrupt.signal(INT_USED_RING);
        }
    }

    /// Polls passt's socket for what we can use now.
    fn set_interest(&self) {
        if !self.is_up() {
            return;
        }
        let mut ev = EventSet::empty();
        if self.rx_backlog.len() < MAX_RX_BACKLOG {
            ev |= EventSet::IN;
        }
        if !self.tx_backlog.is_empty() {
            ev |= EventSet::OUT;
        }
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            self.passt.as_raw_fd(),
            EpollEvent::new(ev, 0),
        );
    }

    fn pump(&mut self) {
        self.process_tx();
        self.read_passt();
        self.process_rx();
        // Delivering may have made room to read more.
        self.read_passt();
        self.process_rx();
        self.set_interest();
    }
}

impl Drop for Net {
    fn drop(&mut self) {
        // passt exits once its socket closes; don't leave it to chance.
        if let Some(child) = &mut self.child {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

impl VirtioDevice for Net {
    fn device_type(&self) -> u32 {
        TYPE_NET
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 2]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX | VIRTIO_NET_F_MAC | VIRTIO_NET_F_MTU
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        queues: Vec<Queue>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        self.active = Some(Activated::new(mem, interrupt, queues, 2)?);
        self.pump();
        Ok(())
    }

    fn process_queue(&mut self, _index: usize) {
        self.pump();
    }

    fn reset(&mut self) {
        self.active = None;
        self.rx_backlog.clear();
        // A half-written frame must still be finished, or passt's framing
        // breaks; whole frames not yet started can go.
        let partial = (self.tx_sent > 0)
            .then(|| self.tx_backlog.pop_front())
            .flatten();
        let sent = self.tx_sent;
        self.clear_tx();
        if let Some(f) = partial {
            self.tx_bytes = f.len() - sent;
            self.tx_sent = sent;
            self.tx_backlog.push_back(f);
        }
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        Activated::states(self.active.as_ref())
    }

    fn save(&self) -> super::persist::DeviceKindState {
        super::persist::DeviceKindState::Net(self.save_state())
    }

    fn after_restore(&mut self) {
        self.pump();
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_backend(&mut self) {
        let mut events = [EpollEvent::default(); 4];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            let set = ev.event_set();
            if set.contains(EventSet::OUT) {
                self.flush_tx();
            }
            if set.intersects(EventSet::HANG_UP | EventSet::ERROR) && !set.contains(EventSet::IN) {
                let why = self.passt_exit_reason();
                self.link_down(why);
            }
        }
        self.pump();
    }
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

    #[test]
    fn tx_chains_are_validated_before_use() {
        let m = mem();
        m.write_slice(&[0u8; HDR_LEN], GuestAddress(0x1000))
            .unwrap();
        m.write_slice(b"frame-bytes", GuestAddress(0x2000)).unwrap();
        let ok = [seg(0x1000, HDR_LEN as u32, false), seg(0x2000, 11, false)];
        assert_eq!(read_tx(&m, &ok).unwrap(), b"frame-bytes");
        assert_eq!(
            read_tx(&m, &[seg(0x1000, 20, true)]),
            Err(TxError::WriteOnly)
        );
        assert!(matches!(
            read_tx(&m, &[seg(0x1000, HDR_LEN as u32, false)]),
            Err(TxError::Size(_))
        ));
        assert!(matches!(
            read_tx(&m, &[seg(0x1000, (HDR_LEN + MAX_FRAME + 1) as u32, false)]),
            Err(TxError::Size(_))
        ));
        // Outside guest memory: refused, not a crash.
        assert!(read_tx(&m, &[seg(0xff_fff0, 64, false)]).is_err());
    }

    #[test]
    fn rx_frames_land_whole_or_not_at_all() {
        let m = mem();
        let frame = vec![0xabu8; 100];
        let segs = [seg(0x3000, 8, true), seg(0x4000, 200, true)];
        assert_eq!(write_rx(&m, &segs, &frame), Some((HDR_LEN + 100) as u32));
        let mut hdr = [0u8; 8];
        m.read_slice(&mut hdr, GuestAddress(0x3000)).unwrap();
        assert_eq!(hdr, [0u8; 8]);
        let mut rest = [0u8; 4];
        m.read_slice(&mut rest, GuestAddress(0x4000)).unwrap();
        assert_eq!(rest, [0, 0, 1, 0], "num_buffers = 1");
        assert_eq!(
            write_rx(&m, &[seg(0x3000, 50, true)], &frame),
            None,
            "too small"
        );
        assert_eq!(
            write_rx(&m, &[seg(0x3000, 500, false)], &frame),
            None,
            "read-only"
        );
        assert_eq!(write_rx(&m, &[], &frame), None);
    }
}
