//! Every fuzz target over its corpus in `fuzz/corpus/` (seeds and kept
//! finds), then over deterministic mutations of it: a regression run of
//! the AFL++ targets on the stable toolchain, with no fuzzer installed.
//! `scripts/fuzz.sh` runs the same targets coverage-guided, for long.

use std::path::Path;

use microagent::fuzzing::TARGETS;

/// Mutations per target: enough to walk every error path of the seeds'
/// shapes in a few seconds (the device and tar targets make a directory
/// per input).
const MUTATIONS: usize = 3000;

/// xorshift64*: reproducible, so a failure names its iteration.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }

    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

/// One to four of: a bit flipped, an interesting byte or u32 set, bytes
/// inserted, a range deleted or duplicated, a cut, a splice with another
/// corpus entry.
fn mutate(rng: &mut Rng, input: &[u8], corpus: &[Vec<u8>]) -> Vec<u8> {
    let mut out = input.to_vec();
    for _ in 0..1 + rng.below(4) {
        let len = out.len();
        match rng.below(7) {
            0 if len > 0 => {
                let i = rng.below(len);
                out[i] ^= 1 << rng.below(8);
            }
            1 if len > 0 => {
                let i = rng.below(len);
                out[i] = [0, 0xff, 0x7f, 0x80, b'"', b'{', b'/', b'.'][rng.below(8)];
            }
            2 if len >= 4 => {
                let i = rng.below(len - 3);
                let v: u32 = [0, 1, u32::MAX, 0x8000_0000, 4096, 65536][rng.below(6)];
                out[i..i + 4].copy_from_slice(&v.to_le_bytes());
            }
            3 => {
                let i = rng.below(len + 1);
                let n = 1 + rng.below(16);
                let bytes: Vec<u8> = (0..n).map(|_| rng.next() as u8).collect();
                out.splice(i..i, bytes);
            }
            4 if len > 1 => {
                let a = rng.below(len);
                let b = (a + 1 + rng.below(64)).min(len);
                if rng.below(2) == 0 {
                    out.drain(a..b);
                } else {
                    let dup = out[a..b].to_vec();
                    out.splice(a..a, dup);
                }
            }
            5 if len > 0 => out.truncate(rng.below(len)),
            6 => {
                let other = &corpus[rng.below(corpus.len())];
                let at = rng.below(out.len() + 1);
                let from = rng.below(other.len() + 1);
                out.truncate(at);
                out.extend_from_slice(&other[from..]);
            }
            _ => {}
        }
    }
    out
}

fn corpus(target: &str) -> Vec<Vec<u8>> {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR"))
        .join("fuzz/corpus")
        .join(target);
    let mut files: Vec<_> = std::fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("{}: {e}", dir.display()))
        .flatten()
        .map(|e| e.path())
        .collect();
    files.sort();
    files.iter().map(|p| std::fs::read(p).unwrap()).collect()
}

#[test]
fn every_target_survives_its_corpus_and_mutations_of_it() {
    for (name, run) in TARGETS {
        let seeds = corpus(name);
        assert!(!seeds.is_empty(), "fuzz/corpus/{name} is empty");
        for (i, s) in seeds.iter().enumerate() {
            let r = std::panic::catch_unwind(|| run(s));
            assert!(r.is_ok(), "{name}: corpus entry {i} panicked");
        }
        let mut rng = Rng(0x9e37_79b9_7f4a_7c15 ^ name.len() as u64);
        for i in 0..MUTATIONS {
            let input = mutate(&mut rng, &seeds[i % seeds.len()], &seeds);
            let r = std::panic::catch_unwind(|| run(&input));
            assert!(
                r.is_ok(),
                "{name}: mutation {i} panicked; input (hex): {}",
                input.iter().map(|b| format!("{b:02x}")).collect::<String>()
            );
        }
    }
}

#[test]
fn every_target_has_a_corpus_and_every_corpus_a_target() {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("fuzz/corpus");
    let mut on_disk: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .flatten()
        .map(|e| e.file_name().to_string_lossy().into_owned())
        .collect();
    on_disk.sort();
    let mut named: Vec<String> = TARGETS.iter().map(|(n, _)| n.to_string()).collect();
    named.sort();
    assert_eq!(on_disk, named);
}
