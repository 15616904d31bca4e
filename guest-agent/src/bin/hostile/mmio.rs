//! What a compromised guest kernel can do to the VMM's virtio-mmio
//! devices, done from guest user space through `/dev/mem` (the guest
//! kernel has it without the strict filter): kicks of queues that do not
//! exist, and the network device reset and re-driven over rings this
//! program owns and fills with garbage (descriptor chains that loop, point
//! outside RAM or claim huge lengths; available indexes that jump), plus
//! activations with rings outside guest memory, which the VMM must refuse
//! and log within its budget. The block and vsock devices only get
//! spurious kicks: the guest's disk and the agent's channel must survive
//! for the test to check the VMM still serves.

use std::fs::OpenOptions;
use std::io::{Read, Seek, SeekFrom};
use std::os::fd::AsRawFd;
use std::time::Instant;

const PAGE: usize = 4096;
// The virtio-mmio register layout (virtio 1.2, 4.2.2). The VMM's side is
// src/devices/virtio/mmio.rs, in a crate this static guest program does
// not link.
const REG_DEVICE_ID: usize = 0x008;
const REG_DRIVER_FEATURES: usize = 0x020;
const REG_DRIVER_FEATURES_SEL: usize = 0x024;
const REG_QUEUE_SEL: usize = 0x030;
const REG_QUEUE_NUM: usize = 0x038;
const REG_QUEUE_READY: usize = 0x044;
const REG_QUEUE_NOTIFY: usize = 0x050;
const REG_STATUS: usize = 0x070;
const REG_QUEUE_DESC: usize = 0x080;
const REG_QUEUE_AVAIL: usize = 0x090;
const REG_QUEUE_USED: usize = 0x0a0;
const DEVICE_NET: u32 = 1;
const QUEUE_SIZE: u16 = 16;
/// Each of the net device's two queues gets half of the ring page:
/// descriptors at 0, available ring at 256, used ring at 512.
const QUEUE_SPAN: usize = PAGE / 2;
/// Far above any guest's RAM: what a descriptor or ring points at when it
/// should point at nothing.
const NOWHERE: u64 = 0x7f_0000_0000;

/// What the program did, for its JSON report.
#[derive(Default)]
pub struct Report {
    pub devices: usize,
    pub kicks: u64,
    pub bogus_activations: u64,
    pub error: Option<String>,
}

/// One device's register window, mapped from `/dev/mem`.
struct Window(*mut u32);

impl Window {
    fn read(&self, reg: usize) -> u32 {
        // SAFETY: reg < PAGE and 4-aligned; the mapping is PAGE long and
        // lives as long as the program (never unmapped).
        unsafe { self.0.add(reg / 4).read_volatile() }
    }

    fn write(&self, reg: usize, v: u32) {
        // SAFETY: as in `read`.
        unsafe { self.0.add(reg / 4).write_volatile(v) }
    }

    fn write64(&self, reg: usize, v: u64) {
        self.write(reg, v as u32);
        self.write(reg + 4, (v >> 32) as u32);
    }
}

/// `virtio_mmio.device=4K@0xd0000000:5` entries of the kernel command line.
fn windows_on_cmdline() -> Vec<u64> {
    let cmdline = std::fs::read_to_string("/proc/cmdline").unwrap_or_default();
    cmdline
        .split_whitespace()
        .filter_map(|w| w.strip_prefix("virtio_mmio.device="))
        .filter_map(|d| d.split_once('@'))
        .filter_map(|(_, rest)| rest.split(':').next())
        .filter_map(|a| u64::from_str_radix(a.trim_start_matches("0x"), 16).ok())
        .collect()
}

fn map(mem: &std::fs::File, phys: u64, len: usize) -> Result<*mut u8, String> {
    // SAFETY: a fresh shared mapping of /dev/mem; nothing else refers to
    // the returned range.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            len,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_SHARED,
            mem.as_raw_fd(),
            phys as libc::off_t,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!(
            "mmap /dev/mem at {phys:#x}: {}",
            std::io::Error::last_os_error()
        ));
    }
    Ok(p.cast())
}

/// A locked page of this process and its guest-physical address (from
/// /proc/self/pagemap, which gives frame numbers to root).
fn ring_page() -> Result<(*mut u8, u64), String> {
    // SAFETY: a fresh anonymous mapping, populated and locked so its frame
    // stays put while the device uses it.
    let p = unsafe {
        libc::mmap(
            std::ptr::null_mut(),
            PAGE,
            libc::PROT_READ | libc::PROT_WRITE,
            libc::MAP_PRIVATE | libc::MAP_ANONYMOUS | libc::MAP_POPULATE | libc::MAP_LOCKED,
            -1,
            0,
        )
    };
    if p == libc::MAP_FAILED {
        return Err(format!("ring page: {}", std::io::Error::last_os_error()));
    }
    let mut pagemap = std::fs::File::open("/proc/self/pagemap").map_err(|e| e.to_string())?;
    let mut entry = [0u8; 8];
    pagemap
        .seek(SeekFrom::Start((p as u64 / PAGE as u64) * 8))
        .and_then(|_| pagemap.read_exact(&mut entry))
        .map_err(|e| format!("pagemap: {e}"))?;
    let entry = u64::from_le_bytes(entry);
    let pfn = entry & ((1 << 55) - 1);
    if entry >> 63 == 0 || pfn == 0 {
        return Err("pagemap gave no frame (not root?)".into());
    }
    Ok((p.cast(), pfn * PAGE as u64))
}

/// xorshift64: garbage that differs every round.
struct Garbage(u64);

impl Garbage {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
}

/// Drives the net device as its driver would, but over our rings at
/// `rings` (or, when `bogus`, rings outside guest memory).
fn activate_net(w: &Window, rings: u64, bogus: bool) {
    w.write(REG_STATUS, 0);
    w.write(REG_STATUS, 1 | 2);
    w.write(REG_DRIVER_FEATURES_SEL, 1);
    w.write(REG_DRIVER_FEATURES, 1); // VIRTIO_F_VERSION_1 (bit 32)
    w.write(REG_STATUS, 1 | 2 | 8);
    for q in 0..2u32 {
        let base = if bogus {
            NOWHERE
        } else {
            rings + u64::from(q) * QUEUE_SPAN as u64
        };
        w.write(REG_QUEUE_SEL, q);
        w.write(REG_QUEUE_NUM, u32::from(QUEUE_SIZE));
        w.write64(REG_QUEUE_DESC, base);
        w.write64(REG_QUEUE_AVAIL, base + 256);
        w.write64(REG_QUEUE_USED, base + 512);
        w.write(REG_QUEUE_READY, 1);
    }
    w.write(REG_STATUS, 1 | 2 | 8 | 4);
}

/// Fills both queues' descriptors and available rings with garbage that
/// can only point into the ring page itself (short buffers) or outside
/// RAM, so the guest's own memory is never written by the device.
fn scribble(page: *mut u8, phys: u64, g: &mut Garbage) {
    for q in 0..2 {
        let base = q * QUEUE_SPAN;
        for d in 0..usize::from(QUEUE_SIZE) {
            let r = g.next();
            let (addr, len) = if r & 1 == 0 {
                (phys + (r >> 8) % 3000, (r >> 32) as u32 % 64)
            } else {
                (NOWHERE + (r >> 16), (r >> 32) as u32)
            };
            let flags = (r >> 4) as u16 & 0x7; // NEXT, WRITE, INDIRECT
            let next = (r >> 48) as u16 % (QUEUE_SIZE + 4);
            let mut desc = [0u8; 16];
            desc[..8].copy_from_slice(&addr.to_le_bytes());
            desc[8..12].copy_from_slice(&len.to_le_bytes());
            desc[12..14].copy_from_slice(&flags.to_le_bytes());
            desc[14..].copy_from_slice(&next.to_le_bytes());
            // SAFETY: base + d * 16 + 16 <= base + 256 < PAGE.
            unsafe { std::ptr::copy_nonoverlapping(desc.as_ptr(), page.add(base + d * 16), 16) };
        }
        // SAFETY: the available ring (flags, idx, 16 entries) lies in
        // base + 256 .. base + 294, inside the page.
        unsafe {
            let avail = page.add(base + 256).cast::<u16>();
            let idx = avail.add(1).read_volatile();
            for e in 0..usize::from(QUEUE_SIZE) {
                avail
                    .add(2 + e)
                    .write_volatile(g.next() as u16 % (QUEUE_SIZE + 4));
            }
            avail
                .add(1)
                .write_volatile(idx.wrapping_add((g.next() % 40) as u16));
        }
    }
}

/// Runs until `until`; every failure to set up is reported, not fatal.
pub fn kick(until: Instant) -> Report {
    let mut report = Report::default();
    let mut run = || -> Result<(), String> {
        let mem = OpenOptions::new()
            .read(true)
            .write(true)
            .open("/dev/mem")
            .map_err(|e| format!("/dev/mem: {e}"))?;
        let mut windows = Vec::new();
        for phys in windows_on_cmdline() {
            windows.push(Window(map(&mem, phys, PAGE)?.cast()));
        }
        report.devices = windows.len();
        let net = windows.iter().find(|w| w.read(REG_DEVICE_ID) == DEVICE_NET);
        let (page, phys) = ring_page()?;
        if let Some(net) = net {
            activate_net(net, phys, false);
        }
        let mut g = Garbage(0x9e37_79b9_7f4a_7c15);
        let mut round = 0u64;
        while Instant::now() < until {
            round += 1;
            // Queues nobody has, on every device.
            for w in &windows {
                for q in [2, 7, 0xffff, u32::MAX] {
                    w.write(REG_QUEUE_NOTIFY, q);
                    report.kicks += 1;
                }
            }
            let Some(net) = net else { continue };
            if round.is_multiple_of(64) {
                activate_net(net, phys, true);
                report.bogus_activations += 1;
                net.write(REG_QUEUE_NOTIFY, 1);
                activate_net(net, phys, false);
            }
            scribble(page, phys, &mut g);
            for q in [0, 1] {
                net.write(REG_QUEUE_NOTIFY, q);
                report.kicks += 1;
            }
        }
        Ok(())
    };
    if let Err(e) = run() {
        report.error = Some(e);
    }
    report
}
