//! virtio-vsock in userspace (this host has no vhost-vsock), exposed on the
//! host Firecracker-style as a Unix socket: a client connects, writes
//! `CONNECT <port>\n`, gets `OK <local port>\n` once the guest accepts, and
//! then has a byte stream to that guest port.

mod conn;
pub mod packet;
pub mod persist;

use std::collections::{HashMap, VecDeque};
use std::io::{ErrorKind, Read, Write};
use std::os::fd::{AsRawFd, RawFd};
use std::os::unix::net::{UnixListener, UnixStream};
use std::path::Path;
use std::sync::Arc;

use crate::devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::Bytes;
use vmm_sys_util::epoll::{ControlOperation, Epoll, EpollEvent, EventSet};

use super::{
    chain_segs, quiet, read_config_bytes, rearm, ActivateError, Activated, Interrupt, VirtioDevice,
    INT_USED_RING, VIRTIO_F_VERSION_1, VIRTIO_RING_F_EVENT_IDX,
};
use conn::{Conn, ConnState};
use packet::{
    read_packet, rx_capacity, write_packet, Header, OP_CREDIT_REQUEST, OP_CREDIT_UPDATE,
    OP_REQUEST, OP_RESPONSE, OP_RST, OP_RW, OP_SHUTDOWN, TYPE_STREAM,
};

pub const TYPE_VSOCK: u32 = 19;
pub const HOST_CID: u64 = 2;
const QUEUE_SIZE: u16 = 256;
const RX: usize = 0;
const TX: usize = 1;
const EVENT: usize = 2;
/// Open streams plus clients still sending their CONNECT line.
const MAX_CLIENTS: usize = 1024;
/// A CONNECT line longer than this is not one.
const MAX_CONNECT_LINE: usize = 64;
/// Resets owed to the guest for stray packets it sent: a guest that sends
/// faster than it posts RX buffers would otherwise grow this queue without
/// bound. A reset not sent only leaves the guest's own socket to time out.
const MAX_STRAY_RESETS: usize = 256;
const LISTENER_TOKEN: u64 = u64::MAX;
/// Host-side ports handed to streams start here, away from guest services.
const FIRST_LOCAL_PORT: u32 = 1 << 30;
const VIRTIO_VSOCK_EVENT_TRANSPORT_RESET: u32 = 0;

#[derive(Debug, thiserror::Error)]
pub enum VsockError {
    #[error("vsock socket {path}: {source}")]
    Listen {
        path: String,
        source: std::io::Error,
    },
    #[error("vsock event loop: {0}")]
    Epoll(std::io::Error),
    #[error("restoring the vsock: {0}")]
    State(#[from] super::persist::PersistError),
}

struct Pending {
    stream: UnixStream,
    line: Vec<u8>,
}

type Active = Activated;

pub struct Vsock {
    pub(super) guest_cid: u64,
    config: [u8; 8],
    listener: UnixListener,
    epoll: Epoll,
    pending: HashMap<RawFd, Pending>,
    conns: HashMap<u32, Conn>,
    fd_port: HashMap<RawFd, u32>,
    next_port: u32,
    /// Packets owed to the guest that belong to no live stream (RSTs, REQUESTs).
    rx_control: VecDeque<Header>,
    pub(super) active: Option<Active>,
}

impl Vsock {
    pub fn new(guest_cid: u64, socket: &Path) -> Result<Vsock, VsockError> {
        let listen_err = |source| VsockError::Listen {
            path: socket.display().to_string(),
            source,
        };
        let _ = std::fs::remove_file(socket);
        let listener = UnixListener::bind(socket).map_err(listen_err)?;
        listener.set_nonblocking(true).map_err(listen_err)?;
        let epoll = Epoll::new().map_err(VsockError::Epoll)?;
        epoll
            .ctl(
                ControlOperation::Add,
                listener.as_raw_fd(),
                EpollEvent::new(EventSet::IN, LISTENER_TOKEN),
            )
            .map_err(VsockError::Epoll)?;
        Ok(Vsock {
            guest_cid,
            config: guest_cid.to_le_bytes(),
            listener,
            epoll,
            pending: HashMap::new(),
            conns: HashMap::new(),
            fd_port: HashMap::new(),
            next_port: FIRST_LOCAL_PORT,
            rx_control: VecDeque::new(),
            active: None,
        })
    }

    fn alloc_port(&mut self) -> u32 {
        loop {
            let p = self.next_port;
            self.next_port = self.next_port.checked_add(1).unwrap_or(FIRST_LOCAL_PORT);
            if !self.conns.contains_key(&p) {
                return p;
            }
        }
    }

    fn set_interest(&self, fd: RawFd, events: EventSet) {
        let _ = self.epoll.ctl(
            ControlOperation::Modify,
            fd,
            EpollEvent::new(events, fd as u64),
        );
    }

    fn accept_clients(&mut self) {
        loop {
            match self.listener.accept() {
                Ok((stream, _)) => {
                    // Whoever connects runs commands as root in the guest.
                    if self.pending.len() + self.conns.len() >= MAX_CLIENTS
                        || !crate::util::peer::trusted(&stream)
                        || stream.set_nonblocking(true).is_err()
                    {
                        continue; // Dropping the stream closes it.
                    }
                    let fd = stream.as_raw_fd();
                    if self
                        .epoll
                        .ctl(
                            ControlOperation::Add,
                            fd,
                            EpollEvent::new(EventSet::IN, fd as u64),
                        )
                        .is_ok()
                    {
                        self.pending.insert(
                            fd,
                            Pending {
                                stream,
                                line: Vec::new(),
                            },
                        );
                    }
                }
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => return,
            }
        }
    }

    /// Reads a client's `CONNECT <port>\n`; on a full line, opens the stream.
    fn read_connect_line(&mut self, fd: RawFd) {
        let Some(p) = self.pending.get_mut(&fd) else {
            return;
        };
        let mut buf = [0u8; MAX_CONNECT_LINE];
        let outcome = loop {
            match p
                .stream
                .read(&mut buf[..MAX_CONNECT_LINE - p.line.len().min(MAX_CONNECT_LINE - 1)])
            {
                Ok(0) => break Err(()),
                Ok(n) => {
                    p.line.extend_from_slice(&buf[..n]);
                    if let Some(pos) = p.line.iter().position(|b| *b == b'\n') {
                        break Ok(parse_connect(&p.line[..pos]));
                    }
                    if p.line.len() >= MAX_CONNECT_LINE {
                        break Err(());
                    }
                }
                Err(e) if e.kind() == ErrorKind::WouldBlock => return,
                Err(e) if e.kind() == ErrorKind::Interrupted => {}
                Err(_) => break Err(()),
            }
        };
        let Some(p) = self.pending.remove(&fd) else {
            return;
        };
        let _ = self
            .epoll
            .ctl(ControlOperation::Delete, fd, EpollEvent::default());
        let Ok(Some(peer_port)) = outcome else { return };
        let local_port = self.alloc_port();
        let mut c = Conn::new(p.stream, local_port, peer_port);
        let req = c.request_header(HOST_CID, self.guest_cid);
        self.rx_control.push_back(req);
        if self
            .epoll
            .ctl(
                ControlOperation::Add,
                fd,
                EpollEvent::new(EventSet::empty(), fd as u64),
            )
            .is_ok()
        {
            self.fd_port.insert(fd, local_port);
            self.conns.insert(local_port, c);
        }
    }

    fn drop_conn(&mut self, port: u32, send_rst: bool) {
        if let Some(mut c) = self.conns.remove(&port) {
            let fd = c.stream.as_raw_fd();
            let _ = self
                .epoll
                .ctl(ControlOperation::Delete, fd, EpollEvent::default());
            self.fd_port.remove(&fd);
            if send_rst {
                let rst = c.rst_header(HOST_CID, self.guest_cid);
                self.rx_control.push_back(rst);
            }
        }
    }

    fn conn_io(&mut self, port: u32, events: EventSet) {
        let Some(c) = self.conns.get_mut(&port) else {
            return;
        };
        let mut failed = false;
        if events.intersects(EventSet::OUT) && c.flush_to_unix().is_err() {
            failed = true;
        }
        if events.intersects(EventSet::IN | EventSet::HANG_UP) && c.wants_unix_read() {
            if c.fill_from_unix().is_err() {
                failed = true;
            }
        } else if events.intersects(EventSet::HANG_UP | EventSet::ERROR) {
            // epoll reports a hang-up whatever we asked for; a client that
            // is gone while we are not reading would otherwise spin us.
            failed = true;
        }
        if failed {
            self.drop_conn(port, true);
        }
    }

    fn reply_rst(&mut self, to: &Header) {
        if self.rx_control.len() >= MAX_CLIENTS + MAX_STRAY_RESETS {
            return;
        }
        self.rx_control.push_back(Header {
            src_cid: HOST_CID,
            dst_cid: self.guest_cid,
            src_port: to.dst_port,
            dst_port: to.src_port,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_RST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        });
    }

    /// Handles one packet the guest sent.
    fn handle_tx(&mut self, hdr: Header, payload: Vec<u8>) {
        if hdr.src_cid != self.guest_cid || hdr.dst_cid != HOST_CID {
            return; // Not addressed to us: drop silently, as the spec says.
        }
        if hdr.type_ != TYPE_STREAM {
            if hdr.op != OP_RST {
                self.reply_rst(&hdr);
            }
            return;
        }
        let port = hdr.dst_port;
        let known = self
            .conns
            .get(&port)
            .is_some_and(|c| c.peer_port == hdr.src_port);
        if !known {
            // Guest-initiated streams to the host are not offered; stray
            // packets for closed streams get a reset.
            if hdr.op != OP_RST {
                self.reply_rst(&hdr);
            }
            return;
        }
        let Some(c) = self.conns.get_mut(&port) else {
            return;
        };
        c.update_peer_credit(&hdr);
        match hdr.op {
            OP_RESPONSE if c.state == ConnState::Connecting => {
                c.state = ConnState::Connected;
                let ok = format!("OK {port}\n");
                if c.stream.write_all(ok.as_bytes()).is_err() {
                    self.drop_conn(port, true);
                }
            }
            OP_RW if c.state == ConnState::Connected || c.state == ConnState::Closing => {
                if !c.push_from_guest(&payload) || c.flush_to_unix().is_err() {
                    self.drop_conn(port, true);
                }
            }
            OP_CREDIT_UPDATE => {}
            OP_CREDIT_REQUEST => c.credit_update_due = true,
            OP_SHUTDOWN => c.guest_shutdown(hdr.flags),
            OP_RST => self.drop_conn(port, false),
            OP_REQUEST | OP_RESPONSE | OP_RW => self.drop_conn(port, true),
            _ => self.drop_conn(port, true),
        }
    }

    /// Takes what the guest sent, a ring's worth at a time, with kicks off
    /// while we drain: one kick can bring a whole burst of packets.
    fn process_tx(&mut self) {
        loop {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let mem = active.mem.clone();
            let q = &mut active.queues[TX];
            quiet(q, &mem);
            let mut packets = Vec::new();
            let mut used = false;
            while let Some(chain) = q.pop_descriptor_chain(&mem) {
                let head = chain.head_index();
                let segs = chain_segs(chain);
                // Malformed packets are consumed and dropped.
                if let Ok(p) = read_packet(&mem, &segs) {
                    packets.push(p);
                }
                let _ = q.add_used(&mem, head, 0);
                used = true;
                if packets.len() >= usize::from(QUEUE_SIZE) {
                    break; // Bounds what one round holds in memory.
                }
            }
            let more = rearm(q, &mem);
            if used && q.needs_notification(&mem).unwrap_or(true) {
                active.interrupt.signal(INT_USED_RING);
            }
            for (hdr, payload) in packets {
                self.handle_tx(hdr, payload);
            }
            // A round that found nothing although the ring said "more" is
            // a ring we cannot read: stop rather than spin on it.
            if !more || !used {
                return;
            }
        }
    }

    /// Next packet for the guest, given the payload room of an RX buffer.
    fn next_rx_packet(&mut self, room: usize) -> Option<(Header, Vec<u8>)> {
        if let Some(h) = self.rx_control.pop_front() {
            return Some((h, Vec::new()));
        }
        let (host, guest) = (HOST_CID, self.guest_cid);
        for c in self.conns.values_mut() {
            if let Some(h) = c.pending_control(host, guest) {
                return Some((h, Vec::new()));
            }
        }
        for c in self.conns.values_mut() {
            if c.state == ConnState::Connected && c.has_data_for_guest() && room > 0 {
                let data = c.take_for_guest(room);
                let h = c.rw_header(host, guest, data.len() as u32);
                return Some((h, data));
            }
        }
        None
    }

    /// Moves everything owed to the guest into RX buffers while it has
    /// some. Kicks for new RX buffers are wanted only while something
    /// waits for one; otherwise the driver refills the ring without a trap.
    fn process_rx(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        quiet(&mut active.queues[RX], &mem);
        let (mut delivered, mut retried) = (false, false);
        loop {
            let Some(active) = self.active.as_mut() else {
                return;
            };
            let Some(chain) = active.queues[RX].pop_descriptor_chain(&mem) else {
                // One more look if buffers came in as we re-armed; a ring
                // that still yields none is one we cannot read.
                let waiting = !retried && self.has_rx_work();
                retried = true;
                if waiting
                    && self
                        .active
                        .as_mut()
                        .is_some_and(|a| rearm(&mut a.queues[RX], &mem))
                {
                    continue;
                }
                break;
            };
            retried = false;
            let head = chain.head_index();
            let segs = chain_segs(chain);
            let Some((hdr, data)) = self.next_rx_packet(rx_capacity(&segs)) else {
                if let Some(a) = self.active.as_mut() {
                    a.queues[RX].go_to_previous_position();
                }
                break;
            };
            let len = write_packet(&mem, &segs, &hdr, &data).unwrap_or(0);
            if let Some(a) = self.active.as_mut() {
                let _ = a.queues[RX].add_used(&mem, head, len);
            }
            delivered = true;
        }
        if let Some(a) = self.active.as_mut() {
            if delivered && a.queues[RX].needs_notification(&mem).unwrap_or(true) {
                a.interrupt.signal(INT_USED_RING);
            }
        }
    }

    /// Whether anything waits for an RX buffer (see `next_rx_packet`).
    fn has_rx_work(&self) -> bool {
        !self.rx_control.is_empty()
            || self.conns.values().any(|c| {
                c.state == ConnState::Connected && (c.owes_control() || c.has_data_for_guest())
            })
    }

    /// Closes finished streams and refreshes what each Unix socket is polled for.
    fn settle(&mut self) {
        let mut finished = Vec::new();
        for (port, c) in self.conns.iter_mut() {
            if c.guest_done_sending && !c.has_unix_backlog() {
                let _ = c.stream.shutdown(std::net::Shutdown::Write);
            }
            if c.state == ConnState::Closing && !c.has_unix_backlog() {
                finished.push(*port);
            }
        }
        for port in finished {
            self.drop_conn(port, true);
        }
        for c in self.conns.values() {
            let mut ev = EventSet::empty();
            if c.wants_unix_read() {
                ev |= EventSet::IN;
            }
            if c.has_unix_backlog() {
                ev |= EventSet::OUT;
            }
            self.set_interest(c.stream.as_raw_fd(), ev);
        }
    }

    fn pump(&mut self) {
        self.process_tx();
        self.process_rx();
        self.settle();
        // Settling may have queued RSTs or credit updates.
        self.process_rx();
    }

    /// Tells the guest its transport was reset (after a snapshot restore):
    /// all streams are gone, listeners survive. Returns false if the guest
    /// has posted no event buffer.
    pub fn transport_reset(&mut self) -> bool {
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        for p in ports {
            self.drop_conn(p, false);
        }
        self.rx_control.clear();
        let Some(active) = self.active.as_mut() else {
            return false;
        };
        let mem = active.mem.clone();
        let Some(chain) = active.queues[EVENT].pop_descriptor_chain(&mem) else {
            return false;
        };
        let head = chain.head_index();
        let segs = chain_segs(chain);
        let Some(s) = segs.iter().find(|s| s.write_only && s.len >= 4) else {
            let _ = active.queues[EVENT].add_used(&mem, head, 0);
            return false;
        };
        let ok = mem
            .write_obj(VIRTIO_VSOCK_EVENT_TRANSPORT_RESET.to_le(), s.addr)
            .is_ok();
        let _ = active.queues[EVENT].add_used(&mem, head, if ok { 4 } else { 0 });
        active.interrupt.signal(INT_USED_RING);
        ok
    }
}

/// `CONNECT <port>` (the newline already stripped).
fn parse_connect(line: &[u8]) -> Option<u32> {
    let s = std::str::from_utf8(line).ok()?.trim_end_matches('\r');
    let port = s.strip_prefix("CONNECT ")?;
    port.trim().parse().ok()
}

impl VirtioDevice for Vsock {
    fn device_type(&self) -> u32 {
        TYPE_VSOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE; 3]
    }

    fn features(&self) -> u64 {
        VIRTIO_F_VERSION_1 | VIRTIO_RING_F_EVENT_IDX
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
        self.active = Some(Activated::new(mem, interrupt, queues, 3)?);
        self.pump();
        Ok(())
    }

    fn process_queue(&mut self, _index: usize) {
        self.pump();
    }

    fn reset(&mut self) {
        self.active = None;
        let ports: Vec<u32> = self.conns.keys().copied().collect();
        for p in ports {
            self.drop_conn(p, false);
        }
        self.rx_control.clear();
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        Activated::states(self.active.as_ref())
    }

    fn save(&self) -> super::persist::DeviceKindState {
        super::persist::DeviceKindState::Vsock(self.save_state())
    }

    fn after_restore(&mut self) {
        self.transport_reset();
        self.pump();
    }

    fn backend_fd(&self) -> Option<RawFd> {
        Some(self.epoll.as_raw_fd())
    }

    fn process_backend(&mut self) {
        let mut events = [EpollEvent::default(); 64];
        let n = self.epoll.wait(0, &mut events).unwrap_or(0);
        for ev in &events[..n] {
            let token = ev.data();
            if token == LISTENER_TOKEN {
                self.accept_clients();
                continue;
            }
            let fd = token as RawFd;
            if self.pending.contains_key(&fd) {
                self.read_connect_line(fd);
            } else if let Some(port) = self.fd_port.get(&fd).copied() {
                self.conn_io(port, ev.event_set());
            }
        }
        self.pump();
    }
}

#[cfg(test)]
mod tests;
