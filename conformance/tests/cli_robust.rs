//! Hostile input never makes `qmig` panic: deterministic byte mutations, truncations and
//! insertions of real vectors through `inspect`, `verify` and `extract` end with exit code 0, 1
//! or 2 (a panic would be 101), and `verify` names a rule for every input it rejects.

mod cli_util;

use cli_util::*;

/// A small deterministic generator (64-bit LCG), so failures reproduce.
struct Lcg(u64);

impl Lcg {
    fn next(&mut self) -> u64 {
        self.0 = self
            .0
            .wrapping_mul(6_364_136_223_846_793_005)
            .wrapping_add(1_442_695_040_888_963_407);
        self.0 >> 33
    }
    fn below(&mut self, n: usize) -> usize {
        (self.next() % n.max(1) as u64) as usize
    }
}

#[test]
fn mutated_vectors_never_panic() {
    let dir = std::env::temp_dir().join(format!("qmig-cli-robust-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let mut rng = Lcg(0x716d_6967);
    let sources = [
        "qemu-7.2/precopy-file-zero/stream.bin",
        "qemu-10.0/precopy-none-nocpu/stream.bin",
        "qemu-7.2/precopy-compress/stream.bin",
        "qemu-10.0/postcopy-none-nocpu/stream.bin",
    ];
    let mut rejected = 0;
    for round in 0..120 {
        let src = std::fs::read(vectors().join(sources[round % sources.len()])).unwrap();
        let mut b = src.clone();
        // Mutations concentrated in the first 600 bytes (header, configuration, commands,
        // MEM_SIZE) and anywhere else.
        for _ in 0..1 + rng.below(4) {
            let at = if rng.below(2) == 0 {
                rng.below(600.min(b.len()))
            } else {
                rng.below(b.len())
            };
            match rng.below(4) {
                0 => b[at] = rng.next() as u8,
                1 => b[at] ^= 1 << rng.below(8),
                2 => b.truncate(at),
                _ => b.insert(at, rng.next() as u8),
            }
            if b.is_empty() {
                b.push(0);
            }
        }
        let f = dir.join(format!("m{round}.bin"));
        std::fs::write(&f, &b).unwrap();
        let out = dir.join(format!("x{round}"));
        for args in [
            vec!["inspect", "--json", "-v", &p(&f)],
            vec!["verify", &p(&f)],
            vec!["extract", &p(&f), "-o", &p(&out)],
        ] {
            let (code, stdout, stderr) = run(&args);
            assert!(
                matches!(code, 0..=2),
                "{args:?} round {round}: exit {code}\n{stderr}"
            );
            if args[0] == "verify" && code == 1 {
                assert!(stdout.contains(": offset "), "{stdout}");
                rejected += 1;
            }
        }
        let _ = std::fs::remove_dir_all(&out);
    }
    assert!(rejected > 60, "most mutations are rejected: {rejected}");
    std::fs::remove_dir_all(dir).unwrap();
}
