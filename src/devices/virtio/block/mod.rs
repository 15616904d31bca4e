//! virtio-blk: read, write, flush (fdatasync), get-id, and a read-only mode.
//! Every descriptor chain is validated before any byte moves: directions,
//! lengths, sector ranges and guest addresses (through vm-memory, which
//! refuses anything outside guest RAM).

pub mod persist;

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Arc;

use crate::devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueOwnedT, QueueT};
use vm_memory::{Address, Bytes, GuestAddress};

use crate::disk::{Chain, ChainError};

use super::{
    chain_segs, read_config_bytes, ActivateError, Interrupt, Seg, VirtioDevice, INT_USED_RING,
    TYPE_BLOCK, VIRTIO_F_VERSION_1,
};

pub const SECTOR_SIZE: u64 = 512;
const QUEUE_SIZE: u16 = 256;
/// Data segments per request we advertise (queue size minus header and status).
const SEG_MAX: u32 = QUEUE_SIZE as u32 - 2;
/// One descriptor moves at most this much; larger ones are refused with
/// IOERR rather than making the VMM allocate whatever the guest asks for.
const MAX_DESCRIPTOR_BYTES: u32 = 4 << 20;
const ID_BYTES: usize = 20;

const VIRTIO_BLK_F_SEG_MAX: u64 = 1 << 2;
const VIRTIO_BLK_F_RO: u64 = 1 << 5;
const VIRTIO_BLK_F_FLUSH: u64 = 1 << 9;

const T_IN: u32 = 0;
const T_OUT: u32 = 1;
const T_FLUSH: u32 = 4;
const T_GET_ID: u32 = 8;

const S_OK: u8 = 0;
const S_IOERR: u8 = 1;
const S_UNSUPP: u8 = 2;

#[derive(Debug, thiserror::Error)]
pub enum BlockError {
    #[error("opening disk {path}: {source}")]
    Open {
        path: String,
        source: std::io::Error,
    },
    #[error("disk {path} is empty or smaller than one sector")]
    TooSmall { path: String },
    #[error("disk chain {path}: {source}")]
    Chain { path: String, source: ChainError },
    #[error("restoring disk {path}: {source}")]
    State {
        path: String,
        source: super::persist::PersistError,
    },
}

/// A parsed request, before execution.
#[derive(Debug, PartialEq)]
struct Request {
    kind: u32,
    sector: u64,
    data: Vec<Seg>,
    status: GuestAddress,
}

#[derive(Debug, PartialEq)]
enum ParseError {
    /// No usable status byte: the chain is returned with nothing written.
    NoStatus,
    /// A status byte exists; the request gets IOERR.
    Bad(GuestAddress),
}

fn parse(segs: &[Seg], mem: &GuestMemoryMmap) -> Result<Request, ParseError> {
    let status = match segs.last() {
        Some(s) if segs.len() >= 2 && s.write_only && s.len >= 1 => s.addr,
        _ => return Err(ParseError::NoStatus),
    };
    let header = segs[0];
    if header.write_only || header.len < 16 {
        return Err(ParseError::Bad(status));
    }
    let kind: u32 = mem
        .read_obj(header.addr)
        .map_err(|_| ParseError::Bad(status))?;
    let sector: u64 = mem
        .read_obj(header.addr.unchecked_add(8))
        .map_err(|_| ParseError::Bad(status))?;
    let data = segs[1..segs.len() - 1].to_vec();
    let want_write_only = matches!(kind, T_IN | T_GET_ID);
    if data
        .iter()
        .any(|s| s.write_only != want_write_only || s.len > MAX_DESCRIPTOR_BYTES)
    {
        return Err(ParseError::Bad(status));
    }
    Ok(Request {
        kind,
        sector,
        data,
        status,
    })
}

/// Where the bytes live: one file, or a copy-on-write chain (the root
/// disk of a workspace, which snapshots freeze instead of copying).
enum Backend {
    File(File),
    Chain(Box<Chain>),
}

impl Backend {
    fn read_at(&self, buf: &mut [u8], off: u64) -> std::io::Result<()> {
        match self {
            Backend::File(f) => f.read_exact_at(buf, off),
            Backend::Chain(c) => c.read_at(buf, off),
        }
    }

    fn write_at(&mut self, buf: &[u8], off: u64) -> std::io::Result<()> {
        match self {
            Backend::File(f) => f.write_all_at(buf, off),
            Backend::Chain(c) => c.write_at(buf, off),
        }
    }

    fn flush(&self) -> std::io::Result<()> {
        match self {
            Backend::File(f) => f.sync_data(),
            Backend::Chain(c) => c.flush(),
        }
    }
}

pub use crate::disk::SNAPSHOT_DISK_DIR;

pub struct Block {
    log: crate::devices::LogBudget,
    disk: Backend,
    read_only: bool,
    capacity_sectors: u64,
    id: [u8; ID_BYTES],
    config: Vec<u8>,
    active: Option<Active>,
    /// Where a snapshot's staging directory gets this chain's frozen
    /// state ([`SNAPSHOT_DISK_DIR`] unless the VM has several chains).
    frozen_dir: String,
}

pub(super) struct Active {
    mem: GuestMemoryMmap,
    interrupt: Arc<Interrupt>,
    queue: Queue,
}

impl Block {
    /// Makes everything the guest wrote durable (before a snapshot copies
    /// the disk).
    pub fn flush(&self) -> std::io::Result<()> {
        if self.read_only {
            Ok(())
        } else {
            self.disk.flush()
        }
    }

    /// A copy-on-write chain (a directory holding `chain.json`).
    /// A chain's disk; `read_only` shows a writable chain to the guest as
    /// read-only (it can still be frozen, and stays as it is).
    pub fn open_chain(dir: &Path, id: &str, read_only: bool) -> Result<Block, BlockError> {
        let chain = Chain::open(dir).map_err(|source| BlockError::Chain {
            path: dir.display().to_string(),
            source,
        })?;
        let read_only = read_only || !chain.writable();
        let capacity_sectors = chain.size() / SECTOR_SIZE;
        Ok(Block::with(
            Backend::Chain(Box::new(chain)),
            read_only,
            capacity_sectors,
            id,
        ))
    }

    pub fn open(path: &Path, read_only: bool, id: &str) -> Result<Block, BlockError> {
        let disk = std::fs::OpenOptions::new()
            .read(true)
            .write(!read_only)
            .open(path)
            .map_err(|source| BlockError::Open {
                path: path.display().to_string(),
                source,
            })?;
        let len = disk
            .metadata()
            .map_err(|source| BlockError::Open {
                path: path.display().to_string(),
                source,
            })?
            .len();
        let capacity_sectors = len / SECTOR_SIZE;
        if capacity_sectors == 0 {
            return Err(BlockError::TooSmall {
                path: path.display().to_string(),
            });
        }
        Ok(Block::with(
            Backend::File(disk),
            read_only,
            capacity_sectors,
            id,
        ))
    }

    fn with(disk: Backend, read_only: bool, capacity_sectors: u64, id: &str) -> Block {
        let mut idb = [0u8; ID_BYTES];
        let n = id.len().min(ID_BYTES);
        idb[..n].copy_from_slice(&id.as_bytes()[..n]);
        // struct virtio_blk_config: capacity (le64), size_max (le32), seg_max (le32).
        let mut config = Vec::with_capacity(16);
        config.extend_from_slice(&capacity_sectors.to_le_bytes());
        config.extend_from_slice(&0u32.to_le_bytes());
        config.extend_from_slice(&SEG_MAX.to_le_bytes());
        Block {
            log: crate::devices::LogBudget::new(8),
            disk,
            read_only,
            capacity_sectors,
            id: idb,
            config,
            active: None,
            frozen_dir: SNAPSHOT_DISK_DIR.to_string(),
        }
    }

    /// Snapshots describe this chain's frozen state in `staging/<dir>`.
    pub fn frozen_into(mut self, dir: &str) -> Block {
        self.frozen_dir = dir.to_string();
        self
    }

    /// Before a snapshot, with the guest paused: a chain freezes its top
    /// (continuing on a new one) and describes the frozen chain in
    /// `staging/disk` (or the directory [`Block::frozen_into`] named; the
    /// engine links its files there); a read-only file has nothing to
    /// save; a writable plain file cannot be captured without a copy, so
    /// it is refused.
    pub fn snapshot_disk(&mut self, staging: &Path) -> std::io::Result<()> {
        match &mut self.disk {
            Backend::Chain(chain) if chain.writable() => {
                let dir = staging.join(&self.frozen_dir);
                std::fs::create_dir(&dir)?;
                chain
                    .freeze(Some(&dir))
                    .map(|_| ())
                    .map_err(|e| std::io::Error::other(e.to_string()))
            }
            Backend::Chain(_) => Ok(()),
            Backend::File(_) if self.read_only => Ok(()),
            Backend::File(_) => Err(std::io::Error::new(
                std::io::ErrorKind::Unsupported,
                "a writable plain disk file cannot be snapshotted (workspace disks are chains)",
            )),
        }
    }

    fn in_range(&self, sector: u64, bytes: u64) -> bool {
        bytes % SECTOR_SIZE == 0
            && sector
                .checked_add(bytes / SECTOR_SIZE)
                .is_some_and(|end| end <= self.capacity_sectors)
    }

    /// Executes a request; returns its status and the bytes written to the
    /// guest's data buffers.
    fn execute(&mut self, req: &Request, mem: &GuestMemoryMmap) -> (u8, u32) {
        let total: u64 = req.data.iter().map(|s| u64::from(s.len)).sum();
        match req.kind {
            T_IN | T_OUT if !self.in_range(req.sector, total) => (S_IOERR, 0),
            T_IN => {
                let mut offset = req.sector * SECTOR_SIZE;
                let mut written = 0u32;
                for s in &req.data {
                    let mut buf = vec![0u8; s.len as usize];
                    if self.disk.read_at(&mut buf, offset).is_err()
                        || mem.write_slice(&buf, s.addr).is_err()
                    {
                        return (S_IOERR, written);
                    }
                    offset += u64::from(s.len);
                    written += s.len;
                }
                (S_OK, written)
            }
            T_OUT if self.read_only => (S_IOERR, 0),
            T_OUT => {
                let mut offset = req.sector * SECTOR_SIZE;
                for s in &req.data {
                    let mut buf = vec![0u8; s.len as usize];
                    if mem.read_slice(&mut buf, s.addr).is_err()
                        || self.disk.write_at(&buf, offset).is_err()
                    {
                        return (S_IOERR, 0);
                    }
                    offset += u64::from(s.len);
                }
                (S_OK, 0)
            }
            T_FLUSH if self.read_only => (S_OK, 0),
            T_FLUSH => match self.disk.flush() {
                Ok(()) => (S_OK, 0),
                Err(_) => (S_IOERR, 0),
            },
            T_GET_ID => {
                let Some(s) = req.data.first() else {
                    return (S_IOERR, 0);
                };
                let n = (s.len as usize).min(ID_BYTES);
                match mem.write_slice(&self.id[..n], s.addr) {
                    Ok(()) => (S_OK, n as u32),
                    Err(_) => (S_IOERR, 0),
                }
            }
            _ => (S_UNSUPP, 0),
        }
    }

    fn process(&mut self) {
        let Some(active) = self.active.as_mut() else {
            return;
        };
        let mem = active.mem.clone();
        let mut completed = Vec::new();
        match active.queue.iter(&mem) {
            Ok(iter) => {
                for chain in iter {
                    let head = chain.head_index();
                    completed.push((head, chain_segs(chain)));
                }
            }
            Err(e) => {
                self.log
                    .log(format_args!("virtio-blk: queue unusable: {e}"));
                return;
            }
        }
        if completed.is_empty() {
            return;
        }
        let mut results = Vec::with_capacity(completed.len());
        for (head, segs) in &completed {
            let used_len = match parse(segs, &mem) {
                Ok(req) => {
                    let (status, written) = self.execute(&req, &mem);
                    let _ = mem.write_obj(status, req.status);
                    written + 1
                }
                Err(ParseError::Bad(status)) => {
                    let _ = mem.write_obj(S_IOERR, status);
                    1
                }
                Err(ParseError::NoStatus) => 0,
            };
            results.push((*head, used_len));
        }
        let Some(active) = self.active.as_mut() else {
            return;
        };
        for (head, len) in results {
            if let Err(e) = active.queue.add_used(&mem, head, len) {
                self.log.log(format_args!("virtio-blk: add_used: {e}"));
            }
        }
        if active.queue.needs_notification(&mem).unwrap_or(true) {
            active.interrupt.signal(INT_USED_RING);
        }
    }
}

impl VirtioDevice for Block {
    fn device_type(&self) -> u32 {
        TYPE_BLOCK
    }

    fn queue_max_sizes(&self) -> &[u16] {
        &[QUEUE_SIZE]
    }

    fn features(&self) -> u64 {
        let mut f = VIRTIO_F_VERSION_1 | VIRTIO_BLK_F_FLUSH | VIRTIO_BLK_F_SEG_MAX;
        if self.read_only {
            f |= VIRTIO_BLK_F_RO;
        }
        f
    }

    fn read_config(&self, offset: u64, data: &mut [u8]) {
        read_config_bytes(&self.config, offset, data);
    }

    fn write_config(&mut self, _offset: u64, _data: &[u8]) {}

    fn activate(
        &mut self,
        mem: GuestMemoryMmap,
        interrupt: Arc<Interrupt>,
        mut queues: Vec<Queue>,
        _acked_features: u64,
    ) -> Result<(), ActivateError> {
        let queue = queues
            .pop()
            .ok_or(ActivateError::InvalidQueue { index: 0 })?;
        if !queue.ready() {
            return Err(ActivateError::InvalidQueue { index: 0 });
        }
        self.active = Some(Active {
            mem,
            interrupt,
            queue,
        });
        Ok(())
    }

    fn process_queue(&mut self, _index: usize) {
        self.process();
    }

    fn queue_states(&self) -> Vec<virtio_queue::QueueState> {
        self.active.iter().map(|a| a.queue.state()).collect()
    }

    fn prepare_snapshot(&mut self, staging: &Path) -> std::io::Result<()> {
        self.flush()?;
        self.snapshot_disk(staging)
    }

    fn save(&self) -> super::persist::DeviceKindState {
        super::persist::DeviceKindState::Block(self.save_state())
    }

    fn reset(&mut self) {
        self.active = None;
    }
}

#[cfg(test)]
mod tests;
