use super::*;

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

fn header(m: &GuestMemoryMmap, kind: u32, sector: u64) {
    m.write_obj(kind, GuestAddress(0x1000)).unwrap();
    m.write_obj(sector, GuestAddress(0x1008)).unwrap();
}

fn disk(sectors: u64, ro: bool) -> (tempfile_path::TempPath, Block) {
    let p = tempfile_path::TempPath::new("blk");
    std::fs::write(&p.0, vec![0xab; (sectors * SECTOR_SIZE) as usize]).unwrap();
    let b = Block::open(&p.0, ro, "test-disk").unwrap();
    (p, b)
}

mod tempfile_path {
    pub struct TempPath(pub std::path::PathBuf);
    impl TempPath {
        pub fn new(tag: &str) -> Self {
            static N: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
            let n = N.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            TempPath(
                std::env::temp_dir().join(format!("microagent-{tag}-{}-{n}", std::process::id())),
            )
        }
    }
    impl Drop for TempPath {
        fn drop(&mut self) {
            let _ = std::fs::remove_file(&self.0);
        }
    }
}

#[test]
fn hostile_chains_are_refused_without_touching_the_disk() {
    let m = mem();
    header(&m, T_IN, 0);
    // No status descriptor at all.
    assert_eq!(
        parse(&[seg(0x1000, 16, false)], &m),
        Err(ParseError::NoStatus)
    );
    // Status descriptor not writable.
    assert_eq!(
        parse(&[seg(0x1000, 16, false), seg(0x3000, 1, false)], &m),
        Err(ParseError::NoStatus)
    );
    // Short header.
    assert!(matches!(
        parse(&[seg(0x1000, 8, false), seg(0x3000, 1, true)], &m),
        Err(ParseError::Bad(_))
    ));
    // Header outside guest memory.
    assert!(matches!(
        parse(&[seg(0xfff_0000, 16, false), seg(0x3000, 1, true)], &m),
        Err(ParseError::Bad(_))
    ));
    // A read whose data buffer is device-readable (wrong direction).
    assert!(matches!(
        parse(
            &[
                seg(0x1000, 16, false),
                seg(0x2000, 512, false),
                seg(0x3000, 1, true)
            ],
            &m
        ),
        Err(ParseError::Bad(_))
    ));
    // A huge descriptor.
    assert!(matches!(
        parse(
            &[
                seg(0x1000, 16, false),
                seg(0x2000, u32::MAX, true),
                seg(0x3000, 1, true)
            ],
            &m
        ),
        Err(ParseError::Bad(_))
    ));
}

#[test]
fn reads_past_the_end_or_into_unmapped_memory_fail_cleanly() {
    let m = mem();
    let (_p, mut b) = disk(8, false);
    header(&m, T_IN, 7);
    let req = parse(
        &[
            seg(0x1000, 16, false),
            seg(0x2000, 1024, true),
            seg(0x3000, 1, true),
        ],
        &m,
    )
    .unwrap();
    assert_eq!(b.execute(&req, &m).0, S_IOERR, "sector 7 + 2 sectors > 8");
    header(&m, T_IN, u64::MAX);
    let req = parse(
        &[
            seg(0x1000, 16, false),
            seg(0x2000, 512, true),
            seg(0x3000, 1, true),
        ],
        &m,
    )
    .unwrap();
    assert_eq!(b.execute(&req, &m).0, S_IOERR, "sector overflow");
    header(&m, T_IN, 0);
    let req = parse(
        &[
            seg(0x1000, 16, false),
            seg(0x20_0000, 512, true),
            seg(0x3000, 1, true),
        ],
        &m,
    )
    .unwrap();
    assert_eq!(b.execute(&req, &m).0, S_IOERR, "buffer outside guest RAM");
    header(&m, T_IN, 0);
    let req = parse(
        &[
            seg(0x1000, 16, false),
            seg(0x2000, 100, true),
            seg(0x3000, 1, true),
        ],
        &m,
    )
    .unwrap();
    assert_eq!(b.execute(&req, &m).0, S_IOERR, "not a whole sector");
}

#[test]
fn read_write_flush_round_trip() {
    let m = mem();
    let (p, mut b) = disk(8, false);
    m.write_slice(&[0x5a; 512], GuestAddress(0x2000)).unwrap();
    header(&m, T_OUT, 3);
    let w = parse(
        &[
            seg(0x1000, 16, false),
            seg(0x2000, 512, false),
            seg(0x3000, 1, true),
        ],
        &m,
    )
    .unwrap();
    assert_eq!(b.execute(&w, &m), (S_OK, 0));
    header(&m, T_FLUSH, 0);
    let f = parse(&[seg(0x1000, 16, false), seg(0x3000, 1, true)], &m).unwrap();
    assert_eq!(b.execute(&f, &m), (S_OK, 0));
    let on_disk = std::fs::read(&p.0).unwrap();
    assert_eq!(&on_disk[3 * 512..4 * 512], &[0x5a; 512][..]);
    assert_eq!(on_disk[2 * 512], 0xab);
    header(&m, T_IN, 3);
    let r = parse(
        &[
            seg(0x1000, 16, false),
            seg(0x4000, 512, true),
            seg(0x3000, 1, true),
        ],
        &m,
    )
    .unwrap();
    assert_eq!(b.execute(&r, &m), (S_OK, 512));
    let mut back = [0u8; 512];
    m.read_slice(&mut back, GuestAddress(0x4000)).unwrap();
    assert_eq!(back, [0x5a; 512]);
    header(&m, T_GET_ID, 0);
    let id = parse(
        &[
            seg(0x1000, 16, false),
            seg(0x5000, 20, true),
            seg(0x3000, 1, true),
        ],
        &m,
    )
    .unwrap();
    assert_eq!(b.execute(&id, &m), (S_OK, 20));
    let mut idb = [0u8; 9];
    m.read_slice(&mut idb, GuestAddress(0x5000)).unwrap();
    assert_eq!(&idb, b"test-disk");
}

#[test]
fn read_only_disk_refuses_writes_and_says_so() {
    let m = mem();
    let (p, mut b) = disk(4, true);
    assert_ne!(b.features() & VIRTIO_BLK_F_RO, 0);
    header(&m, T_OUT, 0);
    m.write_slice(&[0u8; 512], GuestAddress(0x2000)).unwrap();
    let w = parse(
        &[
            seg(0x1000, 16, false),
            seg(0x2000, 512, false),
            seg(0x3000, 1, true),
        ],
        &m,
    )
    .unwrap();
    assert_eq!(b.execute(&w, &m).0, S_IOERR);
    assert!(std::fs::read(&p.0).unwrap().iter().all(|&x| x == 0xab));
    header(&m, 99, 0);
    let u = parse(&[seg(0x1000, 16, false), seg(0x3000, 1, true)], &m).unwrap();
    assert_eq!(b.execute(&u, &m).0, S_UNSUPP);
}

#[test]
fn config_reports_capacity_and_bounds_reads() {
    let (_p, b) = disk(8, false);
    let mut cap = [0u8; 8];
    b.read_config(0, &mut cap);
    assert_eq!(u64::from_le_bytes(cap), 8);
    let mut past = [0xffu8; 4];
    b.read_config(4096, &mut past);
    assert_eq!(past, [0; 4]);
}
