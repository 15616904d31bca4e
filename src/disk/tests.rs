//! The chain against a plain in-memory model of the same disk, through
//! writes of every alignment, freezes, reopening, forks, merges and
//! rollbacks.

use super::*;

const SIZE: u64 = 1 << 20;

/// A tiny deterministic generator (no dependency for tests of this size).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

fn base_file(dir: &Path, size: u64) -> (PathBuf, Vec<u8>) {
    let path = dir.join("base.img");
    let data: Vec<u8> = (0..size).map(|i| (i % 251) as u8).collect();
    std::fs::write(&path, &data).unwrap();
    (path, data)
}

fn check(chain: &Chain, model: &[u8]) {
    let mut got = vec![0u8; model.len()];
    chain.read_at(&mut got, 0).unwrap();
    assert!(got == model, "whole-disk read differs from the model");
    // Unaligned reads across layer boundaries too.
    for (off, len) in [(1, 4095), (4000, 9000), (SIZE - 513, 513)] {
        let mut part = vec![0u8; len];
        chain.read_at(&mut part, off).unwrap();
        assert!(
            part == model[off as usize..off as usize + len],
            "read {off}+{len}"
        );
    }
}

fn scribble(chain: &mut Chain, model: &mut [u8], rng: &mut Rng, writes: usize) {
    for _ in 0..writes {
        let off = match rng.below(3) {
            0 => rng.below(SIZE / 4096) * 4096,
            1 => rng.below(SIZE / 512) * 512,
            _ => rng.below(SIZE - 1),
        };
        let len = (1 + rng.below(20_000)).min(SIZE - off) as usize;
        let fill = if rng.below(4) == 0 {
            0
        } else {
            rng.next() as u8
        };
        let data = vec![fill; len];
        chain.write_at(&data, off).unwrap();
        model[off as usize..off as usize + len].copy_from_slice(&data);
    }
}

#[test]
fn reads_match_a_flat_model_through_freezes_reopens_and_forks() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mut model) = base_file(dir.path(), SIZE);
    let ws = dir.path().join("ws");
    create(&ws, &base, None).unwrap();
    let mut chain = Chain::open(&ws).unwrap();
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    check(&chain, &model);
    let mut snaps = Vec::new();
    for i in 0..5 {
        scribble(&mut chain, &mut model, &mut rng, 40);
        check(&chain, &model);
        let snap = dir.path().join(format!("snap{i}"));
        std::fs::create_dir(&snap).unwrap();
        let frozen = chain.freeze(Some(&snap)).unwrap();
        link_frozen(&ws, &snap).unwrap();
        assert_eq!(frozen.deltas.len(), i + 1);
        assert_eq!(ChainSpec::read(&snap).unwrap(), frozen);
        snaps.push((snap, model.clone()));
        check(&chain, &model);
    }
    // What the running chain wrote survives a reopen (allocation is the map).
    chain.flush().unwrap();
    drop(chain);
    let chain = Chain::open(&ws).unwrap();
    check(&chain, &model);
    // Forks see their snapshot's moment, whatever happened since, and
    // deleting the workspace and earlier snapshots breaks none of them.
    drop(chain);
    std::fs::remove_dir_all(&ws).unwrap();
    std::fs::remove_dir_all(&snaps[0].0).unwrap();
    std::fs::remove_file(&base).unwrap();
    for (snap, want) in &snaps[1..] {
        let fork = dir.path().join("fork");
        instantiate(snap, &fork).unwrap();
        let mut f = Chain::open(&fork).unwrap();
        check(&f, want);
        let mut m = want.clone();
        scribble(&mut f, &mut m, &mut rng, 10);
        check(&f, &m);
        drop(f);
        // A fork's writes never reach the snapshot.
        let again = dir.path().join("again");
        instantiate(snap, &again).unwrap();
        check(&Chain::open(&again).unwrap(), want);
        std::fs::remove_dir_all(&fork).unwrap();
        std::fs::remove_dir_all(&again).unwrap();
    }
}

#[test]
fn deep_chains_merge_into_one_delta_with_the_same_content() {
    let dir = tempfile::tempdir().unwrap();
    let (base, mut model) = base_file(dir.path(), SIZE);
    let ws = dir.path().join("ws");
    create(&ws, &base, None).unwrap();
    let mut chain = Chain::open(&ws).unwrap();
    let mut rng = Rng(7);
    for _ in 0..MERGE_DEPTH + 2 {
        scribble(&mut chain, &mut model, &mut rng, 5);
        chain.freeze(None).unwrap();
    }
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    let frozen = chain.freeze(Some(&snap)).unwrap();
    link_frozen(&ws, &snap).unwrap();
    assert!(frozen.deltas.len() > MERGE_DEPTH);
    let fork = dir.path().join("fork");
    let spec = instantiate(&snap, &fork).unwrap();
    assert_eq!(spec.deltas.len(), 1, "merged");
    check(&Chain::open(&fork).unwrap(), &model);
}

#[test]
fn rollback_swaps_whole_chains_and_recovers_from_a_crash_midway() {
    let dir = tempfile::tempdir().unwrap();
    let (base, model) = base_file(dir.path(), SIZE);
    let ws = dir.path().join("disk");
    create(&ws, &base, None).unwrap();
    let mut chain = Chain::open(&ws).unwrap();
    let snap = dir.path().join("snap");
    std::fs::create_dir(&snap).unwrap();
    chain.freeze(Some(&snap)).unwrap();
    link_frozen(&ws, &snap).unwrap();
    chain.write_at(&[0xAB; 8192], 4096).unwrap();
    drop(chain);
    replace(&snap, &ws).unwrap();
    check(&Chain::open(&ws).unwrap(), &model);
    // A crash after the old chain moved aside and before the new one moved
    // in: recover puts the new one in place.
    let next = sibling(&ws, "next");
    instantiate(&snap, &next).unwrap();
    std::fs::rename(&ws, sibling(&ws, "old")).unwrap();
    recover(&ws);
    check(&Chain::open(&ws).unwrap(), &model);
    assert!(!sibling(&ws, "next").exists());
}

/// A freeze leaves its syncs for later; a flush, or the next freeze, does
/// them first, and the chain on disk then names the new top.
#[test]
fn a_freeze_is_made_durable_by_the_next_flush_or_freeze() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = base_file(dir.path(), SIZE);
    let ws = dir.path().join("disk");
    create(&ws, &base, None).unwrap();
    let mut chain = Chain::open(&ws).unwrap();
    chain.write_at(&[1; 4096], 0).unwrap();
    let frozen = chain.freeze(None).unwrap();
    assert!(chain.freeze_pending_sync());
    chain.write_at(&[2; 4096], 4096).unwrap();
    chain.flush().unwrap();
    assert!(!chain.freeze_pending_sync());
    let on_disk = ChainSpec::read(&ws).unwrap();
    assert_eq!(on_disk.deltas, frozen.deltas);
    assert_eq!(on_disk.top, chain.spec().top);
    chain.freeze(None).unwrap();
    chain.freeze(None).unwrap();
    assert_eq!(ChainSpec::read(&ws).unwrap().deltas.len(), 3);
}

#[test]
fn damaged_or_hostile_chains_are_refused_by_name() {
    let dir = tempfile::tempdir().unwrap();
    let (base, _) = base_file(dir.path(), SIZE);
    let ws = dir.path().join("ws");
    let spec = create(&ws, &base, None).unwrap();
    let top = spec.top.clone().unwrap();
    File::options()
        .write(true)
        .open(ws.join(&top))
        .unwrap()
        .set_len(SIZE / 2)
        .unwrap();
    let e = Chain::open(&ws).err().unwrap().to_string();
    assert!(e.contains(&top) && e.contains("bytes"), "{e}");
    let mut bad = spec.clone();
    bad.base = "../../etc/passwd".into();
    std::fs::write(ws.join(CHAIN_FILE), serde_json::to_vec(&bad).unwrap()).unwrap();
    let e = Chain::open(&ws).err().unwrap().to_string();
    assert!(e.contains("not a plain file name"), "{e}");
}

#[test]
fn content_hash_sees_allocated_zeros_and_ignores_holes_elsewhere() {
    let dir = tempfile::tempdir().unwrap();
    let a = dir.path().join("a");
    let f = create_delta(dir.path(), "a", SIZE).unwrap();
    let empty = file_sha256(&a, 4096).unwrap();
    f.write_all_at(&[0u8; 4096], 8192).unwrap();
    let zeros = file_sha256(&a, 4096).unwrap();
    assert_ne!(empty, zeros, "an allocated zero block hides the one below");
    let b = dir.path().join("b");
    let g = create_delta(dir.path(), "b", SIZE).unwrap();
    g.write_all_at(&[0u8; 4096], 8192).unwrap();
    assert_eq!(zeros, file_sha256(&b, 4096).unwrap());
}
