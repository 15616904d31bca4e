//! virtio-blk's saved state. The disk itself is not in it: the snapshot
//! holds the disk file, and restore opens the workspace's copy and checks
//! it is the disk the guest knew (same size, same mode).

use std::path::Path;
use std::sync::Arc;

use crate::devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};

use super::{Active, Block, BlockError};
use crate::devices::virtio::persist::{expect_eq, restore_queues, PersistError, TransportState};
use crate::devices::virtio::Interrupt;

#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct BlockState {
    pub capacity_sectors: u64,
    pub read_only: bool,
}

impl Block {
    pub fn save_state(&self) -> BlockState {
        BlockState {
            capacity_sectors: self.capacity_sectors,
            read_only: self.read_only,
        }
    }

    /// Opens the disk and rebuilds the device as the snapshot left it,
    /// its queue taken straight from the validated state: no activation,
    /// no request processed. Returns the queues the transport keeps (all of
    /// them when the driver had not activated the device yet).
    pub fn restore(
        mut block: Block,
        path: &Path,
        mem: &GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        transport: &TransportState,
        st: &BlockState,
    ) -> Result<(Block, Vec<Queue>), BlockError> {
        let read_only = block.read_only;
        let state_err = |source| BlockError::State {
            path: path.display().to_string(),
            source,
        };
        expect_eq(
            "disk size (sectors)",
            st.capacity_sectors,
            block.capacity_sectors,
        )
        .and_then(|_| expect_eq("read-only", st.read_only, read_only))
        .map_err(state_err)?;
        let mut queues = restore_queues(&block, transport, mem).map_err(state_err)?;
        if !transport.activated {
            return Ok((block, queues));
        }
        let queue = queues.pop().filter(|q| q.ready()).ok_or_else(|| {
            state_err(PersistError::Queue {
                index: 0,
                reason: "activated but not ready".into(),
            })
        })?;
        block.active = Some(Active {
            mem: mem.clone(),
            interrupt,
            queue,
        });
        Ok((block, Vec::new()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::devices::virtio::{QueueSnap, VirtioDevice, TYPE_BLOCK, VIRTIO_F_VERSION_1};
    use vm_memory::{Address, Bytes, GuestAddress};
    use vmm_sys_util::eventfd::EventFd;

    const DESC: u64 = 0x10000;
    const AVAIL: u64 = 0x20000;
    const USED: u64 = 0x30000;

    fn mem() -> GuestMemoryMmap {
        GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap()
    }

    fn interrupt() -> Arc<Interrupt> {
        Arc::new(Interrupt::new(EventFd::new(0).unwrap()))
    }

    fn transport(activated: bool, used_ring: u64) -> TransportState {
        TransportState {
            device_type: TYPE_BLOCK,
            status: if activated { 0xf } else { 0x3 },
            acked_features: VIRTIO_F_VERSION_1,
            queue_sel: 0,
            device_features_sel: 0,
            driver_features_sel: 0,
            activated,
            interrupt_status: 0,
            queues: vec![QueueSnap {
                max_size: 256,
                next_avail: 0,
                next_used: 0,
                event_idx_enabled: false,
                size: 16,
                ready: true,
                desc_table: DESC,
                avail_ring: AVAIL,
                used_ring,
            }],
        }
    }

    /// One GET_ID request (header, 20-byte id buffer, status) in the avail ring.
    fn pending_get_id(m: &GuestMemoryMmap) {
        let desc = |i: u64, addr: u64, len: u32, flags: u16, next: u16| {
            let at = GuestAddress(DESC + i * 16);
            m.write_obj(addr, at).unwrap();
            m.write_obj(len, at.unchecked_add(8)).unwrap();
            m.write_obj(flags, at.unchecked_add(12)).unwrap();
            m.write_obj(next, at.unchecked_add(14)).unwrap();
        };
        const NEXT: u16 = 1;
        const WRITE: u16 = 2;
        desc(0, 0x1000, 16, NEXT, 1);
        desc(1, 0x2000, 20, NEXT | WRITE, 2);
        desc(2, 0x3000, 1, WRITE, 0);
        m.write_obj(8u32, GuestAddress(0x1000)).unwrap(); // T_GET_ID
        m.write_obj(0u16, GuestAddress(AVAIL + 4)).unwrap(); // ring[0] = desc 0
        m.write_obj(1u16, GuestAddress(AVAIL + 2)).unwrap(); // avail idx
    }

    fn used_idx(m: &GuestMemoryMmap) -> u16 {
        m.read_obj(GuestAddress(USED + 2)).unwrap()
    }

    fn disk(sectors: u64) -> tempfile::NamedTempFile {
        let f = tempfile::NamedTempFile::new().unwrap();
        f.as_file().set_len(sectors * 512).unwrap();
        f
    }

    #[test]
    fn restore_takes_the_queue_without_processing_it() {
        let m = mem();
        pending_get_id(&m);
        let f = disk(8);
        let st = BlockState {
            capacity_sectors: 8,
            read_only: false,
        };
        let (mut b, kept) = Block::restore(
            Block::open(f.path(), false, "test-disk").unwrap(),
            f.path(),
            &m,
            interrupt(),
            &transport(true, USED),
            &st,
        )
        .unwrap();
        assert!(kept.is_empty(), "an activated device owns its queue");
        assert_eq!(b.save_state(), st);
        assert_eq!(used_idx(&m), 0, "a request was processed during restore");
        // Once the vCPUs run, the queue is looked at.
        b.process_queue(0);
        assert_eq!(used_idx(&m), 1);
        let mut id = [0u8; 9];
        m.read_slice(&mut id, GuestAddress(0x2000)).unwrap();
        assert_eq!(&id, b"test-disk");
    }

    #[test]
    fn restore_refuses_state_that_does_not_fit() {
        let m = mem();
        let f = disk(8);
        let st = BlockState {
            capacity_sectors: 8,
            read_only: false,
        };
        let err = |r: Result<(Block, Vec<Queue>), BlockError>| match r {
            Ok(_) => panic!("restored"),
            Err(e) => e.to_string(),
        };
        // The disk changed size since the snapshot.
        let grown = BlockState {
            capacity_sectors: 16,
            ..st.clone()
        };
        let e = err(Block::restore(
            Block::open(f.path(), false, "d").unwrap(),
            f.path(),
            &m,
            interrupt(),
            &transport(true, USED),
            &grown,
        ));
        assert!(
            e.contains("disk size (sectors) is 16 in the snapshot, 8 here"),
            "{e}"
        );
        // Rings outside guest memory.
        let e = err(Block::restore(
            Block::open(f.path(), false, "d").unwrap(),
            f.path(),
            &m,
            interrupt(),
            &transport(true, 1 << 40),
            &st,
        ));
        assert!(e.contains("rings outside guest memory"), "{e}");
        // Features the device never offered.
        let mut t = transport(true, USED);
        t.acked_features |= 1 << 40;
        let e = err(Block::restore(
            Block::open(f.path(), false, "d").unwrap(),
            f.path(),
            &m,
            interrupt(),
            &t,
            &st,
        ));
        assert!(e.contains("never offered"), "{e}");
        // Another device's type, and a queue count the device does not have.
        let mut t = transport(false, USED);
        t.device_type = 19;
        let e = err(Block::restore(
            Block::open(f.path(), false, "d").unwrap(),
            f.path(),
            &m,
            interrupt(),
            &t,
            &st,
        ));
        assert!(e.contains("device type 19"), "{e}");
        let mut t = transport(false, USED);
        t.queues.push(t.queues[0]);
        let e = err(Block::restore(
            Block::open(f.path(), false, "d").unwrap(),
            f.path(),
            &m,
            interrupt(),
            &t,
            &st,
        ));
        assert!(e.contains("2 queues in the snapshot"), "{e}");
        // Not yet activated: the transport keeps the queues.
        let (_, kept) = Block::restore(
            Block::open(f.path(), false, "d").unwrap(),
            f.path(),
            &m,
            interrupt(),
            &transport(false, USED),
            &st,
        )
        .unwrap();
        assert_eq!(kept.len(), 1);
    }
}
