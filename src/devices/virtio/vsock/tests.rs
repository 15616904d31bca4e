use super::packet::OP_RW;
use super::*;

#[test]
fn stray_packets_cannot_grow_the_reset_queue_without_bound() {
    let dir = tempfile::tempdir().unwrap();
    let mut v = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
    for port in 0..100_000u32 {
        v.handle_tx(
            Header {
                src_cid: 3,
                dst_cid: HOST_CID,
                src_port: port,
                dst_port: 7,
                len: 0,
                type_: TYPE_STREAM,
                op: OP_RW,
                flags: 0,
                buf_alloc: 0,
                fwd_cnt: 0,
            },
            Vec::new(),
        );
    }
    assert!(v.rx_control.len() <= MAX_CLIENTS + MAX_STRAY_RESETS);
    assert!(!v.rx_control.is_empty(), "strays still get resets");
}

#[test]
fn connect_lines() {
    assert_eq!(parse_connect(b"CONNECT 52"), Some(52));
    assert_eq!(parse_connect(b"CONNECT 52\r"), Some(52));
    assert_eq!(parse_connect(b"CONNECT"), None);
    assert_eq!(parse_connect(b"CONNECT -1"), None);
    assert_eq!(parse_connect(b"CONNECT 99999999999"), None);
    assert_eq!(parse_connect(b"connect 52"), None);
    assert_eq!(parse_connect(b"\xff\xfe"), None);
}

mod rings {
    use super::super::packet::{HDR_LEN, OP_REQUEST, OP_RST};
    use super::*;
    use virtio_queue::desc::{split::Descriptor, RawDescriptor};
    use virtio_queue::mock::MockSplitQueue;
    use vm_memory::{Address, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const LEN: u16 = 16;
    const BUFS: u64 = 0x10_0000;

    /// Where the device asks for the next kick (`avail_event`, after the
    /// used ring's entries).
    fn avail_event(m: &GuestMemoryMmap, q: &MockSplitQueue<GuestMemoryMmap>) -> u16 {
        m.read_obj(q.used_addr().unchecked_add(4 + 8 * u64::from(LEN)))
            .unwrap()
    }

    fn activated<'a>(
        v: &mut Vsock,
        m: &'a GuestMemoryMmap,
    ) -> [MockSplitQueue<'a, GuestMemoryMmap>; 3] {
        let rings = [0x0, 0x1_0000, 0x2_0000]
            .map(|base| MockSplitQueue::create(m, GuestAddress(base), LEN));
        let queues = rings
            .iter()
            .map(|r| {
                let mut q: Queue = r.create_queue().unwrap();
                q.set_event_idx(true);
                q
            })
            .collect();
        let irq = Arc::new(Interrupt::new(EventFd::new(0).unwrap()));
        v.active = Some(Activated::new(m.clone(), irq, queues, 3).unwrap());
        rings
    }

    fn request_to_nobody() -> Header {
        Header {
            src_cid: 3,
            dst_cid: HOST_CID,
            src_port: 1234,
            dst_port: 7,
            len: 0,
            type_: TYPE_STREAM,
            op: OP_REQUEST,
            flags: 0,
            buf_alloc: 0,
            fwd_cnt: 0,
        }
    }

    #[test]
    fn kicks_are_rearmed_after_a_drain_and_wanted_for_rx_only_while_something_waits() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let [rx, tx, _event] = activated(&mut v, &m);
        // The guest sends a REQUEST to a port nobody listens on: it is owed
        // a reset, and has posted no RX buffer yet.
        m.write_slice(&request_to_nobody().to_bytes(), GuestAddress(BUFS))
            .unwrap();
        let hdr = RawDescriptor::from(Descriptor::new(BUFS, HDR_LEN as u32, 0, 0));
        tx.add_desc_chains(&[hdr], 0).unwrap();
        v.pump();
        assert_eq!(tx.used().idx().load(), 1, "the packet was taken");
        assert_eq!(avail_event(&m, &tx), 1, "TX kicks re-armed past it");
        assert_eq!(v.rx_control.len(), 1, "a reset waits for the guest");
        assert_eq!(avail_event(&m, &rx), 0, "RX asks for the next buffer");

        // The guest posts one RX buffer: the reset goes out, nothing more
        // waits, so its next buffers need no kick.
        let buf = RawDescriptor::from(Descriptor::new(
            BUFS + 0x1000,
            4096,
            virtio_bindings::virtio_ring::VRING_DESC_F_WRITE as u16,
            0,
        ));
        rx.add_desc_chains(&[buf], 0).unwrap();
        v.pump();
        assert_eq!(rx.used().idx().load(), 1);
        let mut out = [0u8; HDR_LEN];
        m.read_slice(&mut out, GuestAddress(BUFS + 0x1000)).unwrap();
        assert_eq!(Header::parse(&out).unwrap().op, OP_RST);
        assert!(v.rx_control.is_empty());
        assert_eq!(avail_event(&m, &rx), 0, "no kick wanted while idle");
    }

    #[test]
    fn a_ring_claiming_more_buffers_than_it_holds_ends_the_pass() {
        let dir = tempfile::tempdir().unwrap();
        let mut v = Vsock::new(3, &dir.path().join("v.sock")).unwrap();
        let m = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x20_0000)]).unwrap();
        let [rx, tx, _event] = activated(&mut v, &m);
        v.rx_control.push_back(request_to_nobody());
        // A hostile driver: avail idx far past the ring's size on both
        // queues, so every pop fails while "more" stays true.
        tx.avail().idx().store(1000);
        rx.avail().idx().store(1000);
        v.pump(); // Returning at all is the test.
        assert_eq!(tx.used().idx().load(), 0);
        assert_eq!(rx.used().idx().load(), 0);
    }
}
