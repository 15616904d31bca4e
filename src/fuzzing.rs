//! Fuzz targets: one function per parser of untrusted input, each taking
//! arbitrary bytes. A target may return errors for anything; it must never
//! panic, hang or touch anything outside what it was given. The `fuzz/`
//! crate drives them with AFL++ (`scripts/fuzz.sh`), and
//! `tests/fuzz_corpus.rs` replays the corpora in `fuzz/corpus/` and a few
//! thousand mutations of them on every test run.
//!
//! Inputs that carry their own checksum (vmstate.bin) are also fed behind
//! a valid header, or mutations would never get past it.

use std::path::Path;
use std::sync::Arc;

use crate::devices::GuestMemoryMmap;
use virtio_queue::{Queue, QueueT};
use vm_memory::{Bytes, GuestAddress};
use vmm_sys_util::eventfd::{EventFd, EFD_NONBLOCK};

use crate::devices::virtio::block::Block;
use crate::devices::virtio::vsock::Vsock;
use crate::devices::virtio::{Interrupt, VirtioDevice};

/// A fuzz target: any bytes in, and it must return.
pub type Target = fn(&[u8]);

/// Every target by name (the fuzz binary's argument, the corpus folder).
pub const TARGETS: &[(&str, Target)] = &[
    ("vmstate", vmstate),
    ("manifest", manifest),
    ("control", control),
    ("agent_frames", agent_frames),
    ("oci", oci),
    ("tar_layer", tar_layer),
    ("virtio_block", virtio_block),
    ("virtio_vsock", virtio_vsock),
    ("virtio_net", virtio_net),
    ("snapshot_artifact", snapshot_artifact),
];

pub fn target(name: &str) -> Option<Target> {
    TARGETS.iter().find(|(n, _)| *n == name).map(|(_, f)| *f)
}

/// `vmstate.bin` as read on restore: the raw file, and the bytes as the
/// body behind a valid header (what a forged state file would hold).
pub fn vmstate(data: &[u8]) {
    use crate::snapshot::format;
    use crate::vmm::snapshot::VmSnapshot;
    let _ = format::decode::<VmSnapshot>(data);
    let _ = format::decode::<VmSnapshot>(&format::with_header(data));
}

/// `manifest.json`, then the compatibility check a restore runs on it.
pub fn manifest(data: &[u8]) {
    use crate::snapshot::manifest::{validate_tag, HostCpu, Manifest};
    static HOST: std::sync::OnceLock<HostCpu> = std::sync::OnceLock::new();
    if let Ok(m) = serde_json::from_slice::<Manifest>(data) {
        let host = HOST.get_or_init(HostCpu::current);
        let _ = m.check_compatible("0", "pvm-safe", host, Some(1_000_000), None);
        for f in &m.files {
            let _ = m.file(&f.name);
        }
    }
    if let Ok(s) = std::str::from_utf8(data) {
        let _ = validate_tag(s);
    }
}

/// One control-socket request line.
pub fn control(data: &[u8]) {
    let _ = crate::vmm::control::parse_request(data);
}

/// A stream of agent frames, decoded as either end decodes them: the
/// guest's requests, the host's responses, exits and errors.
pub fn agent_frames(data: &[u8]) {
    use guest_agent::{read_frame, ErrorMsg, ExitStatus, Hello, Request, Response};
    let mut r = std::io::Cursor::new(data);
    for _ in 0..64 {
        let Ok(f) = read_frame(&mut r) else { break };
        let _ = f.json::<Hello>();
        let _ = f.json::<Request>();
        let _ = f.json::<Response>();
        let _ = f.json::<ExitStatus>();
        let _ = f.json::<ErrorMsg>();
    }
}

/// Registry and layout content: the first line as a reference and as a
/// digest, the whole as a manifest, an index and a config.
pub fn oci(data: &[u8]) {
    use crate::image::{config, digest::Digest, reference};
    let first = data.split(|b| *b == b'\n').next().unwrap_or_default();
    if let Ok(s) = std::str::from_utf8(first) {
        let _ = reference::parse(s);
        let _ = Digest::parse(s);
    }
    if let Ok(m) = config::parse_manifest(data) {
        if let Ok(c) = config::parse_config(data) {
            let _ = config::check_pair(&m, &c);
        }
    }
    if let Ok(entries) = config::parse_index(data) {
        let _ = config::select_platform(&entries);
    }
    let _ = config::parse_config(data);
}

/// A snapshot artifact's manifest and config as a pull reads them from a
/// registry (the config's files, extents and chunks validated), and the
/// check that the manifest lists every blob the config uses.
pub fn snapshot_artifact(data: &[u8]) {
    use crate::image::artifact::{check_listed, parse_manifest, ArtifactConfig};
    let layers = parse_manifest(data).map(|(_, l)| l).unwrap_or_default();
    if let Ok(config) = ArtifactConfig::parse(data) {
        let _ = check_listed(&config, &layers);
        let _ = config.blobs();
    }
}

/// One layer (tar, maybe compressed) unpacked into a fresh directory, in
/// both forms; nothing may appear beside that directory.
pub fn tar_layer(data: &[u8]) {
    use crate::image::unpack::Unpacker;
    let Ok(outer) = tempfile::tempdir() else {
        return;
    };
    let root = outer.path().join("root");
    if std::fs::create_dir(&root).is_err() {
        return;
    }
    let budget = 4 << 20;
    let mut unpacker = if data.first().is_some_and(|b| b & 1 == 1) {
        Unpacker::overlay_form(&root, budget)
    } else {
        Unpacker::new(&root, budget)
    };
    let _ = unpacker.apply(data, "fuzz", None);
    assert_only_root(outer.path());
}

fn assert_only_root(outer: &Path) {
    let names: Vec<_> = std::fs::read_dir(outer)
        .map(|d| d.flatten().map(|e| e.file_name()).collect())
        .unwrap_or_default();
    assert_eq!(names, ["root"], "a layer wrote beside its root");
}

/// Guest memory as the harness lays it out: the input copied from
/// address 0, so it holds the queues' descriptor tables and rings (at
/// fixed places below) and the buffers they point at.
const MEM_BYTES: usize = 0x4000;

fn guest_memory(data: &[u8]) -> GuestMemoryMmap {
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), MEM_BYTES)])
        .expect("16 KiB of anonymous memory");
    let n = data.len().min(MEM_BYTES);
    mem.write_slice(&data[..n], GuestAddress(0))
        .expect("the input fits the memory");
    mem
}

/// Queue `i` of `size` entries: its table at `i * 0x200`, its available
/// ring 0x80 and its used ring 0x100 above that.
fn queue(i: u64, size: u16) -> Queue {
    let base = i * 0x200;
    let mut q = Queue::new(size).expect("a power-of-two queue size");
    q.set_size(size);
    q.set_desc_table_address(Some(base as u32), Some(0));
    q.set_avail_ring_address(Some((base + 0x80) as u32), Some(0));
    q.set_used_ring_address(Some((base + 0x100) as u32), Some(0));
    q.set_ready(true);
    q
}

fn interrupt() -> Arc<Interrupt> {
    Arc::new(Interrupt::new(
        EventFd::new(EFD_NONBLOCK).expect("an eventfd"),
    ))
}

/// Runs a device's queues over the input's guest memory twice (the second
/// pass sees what the first wrote back); returns that memory.
fn drive(dev: &mut dyn VirtioDevice, data: &[u8]) -> GuestMemoryMmap {
    let mem = guest_memory(data);
    let queues = (0..dev.queue_max_sizes().len() as u64)
        .map(|i| queue(i, 8))
        .collect();
    let features = dev.features();
    if dev
        .activate(mem.clone(), interrupt(), queues, features)
        .is_ok()
    {
        for _ in 0..2 {
            for i in 0..dev.queue_max_sizes().len() {
                dev.process_queue(i);
            }
        }
    }
    mem
}

/// Queue `i`'s used-ring index in `mem`: how many chains the device
/// returned.
#[cfg(test)]
fn used_idx(mem: &GuestMemoryMmap, i: u64) -> u16 {
    mem.read_obj(GuestAddress(i * 0x200 + 0x102)).unwrap()
}

/// virtio-blk requests over a 16-sector disk file.
pub fn virtio_block(data: &[u8]) {
    let _ = block_run(data);
}

fn block_run(data: &[u8]) -> Option<(GuestMemoryMmap, Vec<u8>)> {
    let dir = tempfile::tempdir().ok()?;
    let disk = dir.path().join("disk");
    std::fs::write(&disk, vec![0x5a; 16 * 512]).ok()?;
    let read_only = data.first().is_some_and(|b| b & 1 == 1);
    let mut blk = Block::open(&disk, read_only, "fuzz").ok()?;
    let mem = drive(&mut blk, data);
    Some((mem, std::fs::read(&disk).ok()?))
}

/// virtio-vsock packets from the guest (TX), and the RX and event queues.
pub fn virtio_vsock(data: &[u8]) {
    let _ = vsock_run(data);
}

fn vsock_run(data: &[u8]) -> Option<GuestMemoryMmap> {
    let dir = tempfile::tempdir().ok()?;
    let mut v = Vsock::new(3, &dir.path().join("v.sock")).ok()?;
    Some(drive(&mut v, data))
}

/// virtio-net: the guest's RX and TX rings in the input's first 16 KiB
/// (the guest memory), and what passt sends after that (its framing:
/// 4-byte big-endian lengths, then frames), on a socket whose other end
/// the harness holds.
pub fn virtio_net(data: &[u8]) {
    let _ = net_run(data);
}

fn net_run(data: &[u8]) -> Option<(GuestMemoryMmap, Vec<u8>)> {
    use crate::devices::virtio::net::Net;
    use std::io::{Read, Write};
    let (ours, mut theirs) = std::os::unix::net::UnixStream::pair().ok()?;
    ours.set_nonblocking(true).ok()?;
    theirs.set_nonblocking(true).ok()?;
    let (memory, from_passt) = data.split_at(data.len().min(MEM_BYTES));
    // Within the socket's buffer: the write never blocks.
    theirs
        .write_all(&from_passt[..from_passt.len().min(64 << 10)])
        .ok()?;
    let link = Arc::new(std::sync::Mutex::new(Ok(())));
    let mut net = Net::over(ours, None, link).ok()?;
    let mem = drive(&mut net, memory);
    let mut sent = Vec::new();
    let _ = theirs.read_to_end(&mut sent);
    Some((mem, sent))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn seed(target: &str, name: &str) -> Vec<u8> {
        let p = Path::new(env!("CARGO_MANIFEST_DIR"))
            .join("fuzz/corpus")
            .join(target)
            .join(name);
        std::fs::read(&p).unwrap_or_else(|e| panic!("{}: {e}", p.display()))
    }

    /// The harness reaches the devices' request handling: the seeds'
    /// requests are carried out and returned, not refused at the queue.
    #[test]
    fn device_seeds_are_served() {
        let (mem, disk) = block_run(&seed("virtio_block", "read-write")).unwrap();
        assert_eq!(used_idx(&mem, 0), 2, "both block requests returned");
        assert_eq!(&disk[1024..1536], &[b'w'; 512][..], "sector 2 written");
        let mut read = [0u8; 512];
        mem.read_slice(&mut read, GuestAddress(0x1100)).unwrap();
        assert_eq!(read, [0x5a; 512], "sector 1 read into the guest");
        let mem = vsock_run(&seed("virtio_vsock", "request-rw")).unwrap();
        assert_eq!(used_idx(&mem, 1), 2, "both TX packets consumed");
        assert_eq!(used_idx(&mem, 0), 1, "the refused connection got a reset");
        let (mem, sent) = net_run(&seed("virtio_net", "frames-both-ways")).unwrap();
        assert_eq!(used_idx(&mem, 1), 1, "the TX frame consumed");
        assert_eq!(
            used_idx(&mem, 0),
            1,
            "passt's frame delivered to the RX buffer"
        );
        let mut delivered = [0u8; 14];
        mem.read_slice(&mut delivered, GuestAddress(0x1000 + 12))
            .unwrap();
        assert_eq!(&delivered, b"\xff\xff\xff\xff\xff\xffpassts\x08\x06");
        // The device's announcement, then the guest's frame, framed.
        assert!(
            memchr::memmem::find(&sent, b"guestTX-frame").is_some(),
            "{sent:?}"
        );
    }

    #[test]
    fn a_layer_cannot_write_beside_its_root() {
        tar_layer(&seed("tar_layer", "escape.tar"));
        tar_layer(&seed("tar_layer", "layer.tar.gz"));
    }
}
