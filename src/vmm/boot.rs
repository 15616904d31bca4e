//! Loading the guest kernel (ELF vmlinux or bzImage) and writing what the
//! 64-bit Linux boot protocol expects: command line and zero page with the
//! e820 map.

use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use std::path::Path;

use crate::devices::GuestMemoryMmap;
use linux_loader::cmdline::Cmdline;
use linux_loader::configurator::linux::LinuxBootConfigurator;
use linux_loader::configurator::{BootConfigurator, BootParams};
use linux_loader::loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::loader::{load_cmdline, BzImage, Elf, KernelLoader};
use vm_memory::GuestAddress;

use super::arch::x86_64::layout::{
    ram_ranges, CMDLINE_MAX_SIZE, CMDLINE_START, EBDA_START, HIMEM_START, ZERO_PAGE_START,
};

const E820_RAM: u32 = 1;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448; // "HdrS"
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
/// startup_64 sits 0x200 bytes into a bzImage's protected-mode code.
const BZIMAGE_64BIT_ENTRY_OFFSET: u64 = 0x200;

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel {path}: {source}")]
    KernelOpen {
        path: String,
        source: std::io::Error,
    },
    #[error("kernel {path} is neither an ELF vmlinux nor a bzImage")]
    NotAKernel { path: String },
    #[error("loading kernel {path}: {source}")]
    KernelLoad {
        path: String,
        source: linux_loader::loader::Error,
    },
    #[error("kernel command line: {0}")]
    Cmdline(String),
    #[error("writing boot parameters: {0}")]
    BootParams(String),
}

#[derive(Debug, Clone, Copy, PartialEq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Where the vCPU starts and, for a bzImage, the image's setup header.
pub struct LoadedKernel {
    pub entry: u64,
    pub format: KernelFormat,
    setup_header: Option<linux_loader::loader::bootparam::setup_header>,
}

fn sniff(file: &mut File) -> std::io::Result<Option<KernelFormat>> {
    let mut head = [0u8; 0x206];
    let n = file.read(&mut head)?;
    file.seek(SeekFrom::Start(0))?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(Some(KernelFormat::Elf));
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(Some(KernelFormat::BzImage));
    }
    Ok(None)
}

pub fn load_kernel(mem: &GuestMemoryMmap, path: &Path) -> Result<LoadedKernel, BootError> {
    let p = || path.display().to_string();
    let mut file =
        File::open(path).map_err(|source| BootError::KernelOpen { path: p(), source })?;
    let format = sniff(&mut file)
        .map_err(|source| BootError::KernelOpen { path: p(), source })?
        .ok_or_else(|| BootError::NotAKernel { path: p() })?;
    let himem = Some(GuestAddress(HIMEM_START));
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, &mut file, himem),
        KernelFormat::BzImage => BzImage::load(mem, None, &mut file, himem),
    }
    .map_err(|source| BootError::KernelLoad { path: p(), source })?;
    let entry = match format {
        KernelFormat::Elf => result.kernel_load.0,
        KernelFormat::BzImage => result.kernel_load.0 + BZIMAGE_64BIT_ENTRY_OFFSET,
    };
    Ok(LoadedKernel {
        entry,
        format,
        setup_header: result.setup_header,
    })
}

pub fn new_cmdline(args: &str) -> Result<Cmdline, BootError> {
    Cmdline::try_from(args, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))
}

/// e820 map: low RAM below the EBDA, then RAM from 1 MiB up (split around
/// the MMIO gap for large guests).
pub fn e820_map(mem_bytes: u64) -> Vec<boot_e820_entry> {
    let mut map = vec![boot_e820_entry {
        addr: 0,
        size: EBDA_START,
        r#type: E820_RAM,
    }];
    for (start, len) in ram_ranges(mem_bytes) {
        let (s, l) = if start == 0 {
            (HIMEM_START, len - HIMEM_START)
        } else {
            (start, len)
        };
        map.push(boot_e820_entry {
            addr: s,
            size: l,
            r#type: E820_RAM,
        });
    }
    map
}

pub fn write_boot_params(
    mem: &GuestMemoryMmap,
    kernel: &LoadedKernel,
    cmdline: &Cmdline,
    mem_bytes: u64,
) -> Result<(), BootError> {
    load_cmdline(mem, GuestAddress(CMDLINE_START), cmdline)
        .map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline
        .as_cstring()
        .map_err(|e| BootError::Cmdline(e.to_string()))?
        .as_bytes()
        .len();

    let mut params = boot_params::default();
    if let Some(hdr) = kernel.setup_header {
        params.hdr = hdr;
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
    params.hdr.header = KERNEL_HDR_MAGIC;
    params.hdr.cmd_line_ptr = CMDLINE_START as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if kernel.format == KernelFormat::Elf {
        params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
    }
    let map = e820_map(mem_bytes);
    params.e820_entries = map.len() as u8;
    params.e820_table[..map.len()].copy_from_slice(&map);

    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new::<boot_params>(&params, GuestAddress(ZERO_PAGE_START)),
        mem,
    )
    .map_err(|e| BootError::BootParams(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn e820_covers_ram_but_not_the_gap_or_low_holes() {
        let map = e820_map(4 << 30);
        assert_eq!(map.len(), 3);
        let ranges: Vec<(u64, u64)> = map.iter().map(|e| (e.addr, e.size)).collect();
        assert_eq!(ranges[0], (0, EBDA_START));
        assert_eq!(ranges[1], (HIMEM_START, 0xc000_0000 - HIMEM_START));
        assert_eq!(ranges[2], (1 << 32, 1 << 30));
    }

    #[test]
    fn non_kernels_are_named_and_refused() {
        let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 64 << 20)]).unwrap();
        let p = std::env::temp_dir().join(format!("microagent-notkernel-{}", std::process::id()));
        std::fs::write(&p, b"#!/bin/sh\necho this is not a kernel\n").unwrap();
        let err = load_kernel(&mem, &p).err().unwrap().to_string();
        std::fs::remove_file(&p).unwrap();
        assert!(
            err.contains("neither an ELF vmlinux nor a bzImage"),
            "{err}"
        );
        assert!(err.contains("microagent-notkernel"), "{err}");
    }
}
