//! `qmig inspect -` reads its input in chunks: the peak memory of the child for a stream of
//! ~150 MB (the `precopy-file-zero` RAM section repeated 1000 times) stays under a bound far
//! below the stream size. Alone in its test binary, so that `RUSAGE_CHILDREN` only sees it.

mod cli_util;

use cli_util::*;
use std::io::{BufRead, BufReader, Write};
use std::process::Stdio;

#[test]
fn stdin_streaming_uses_bounded_memory() {
    let b = std::fs::read(vectors().join("qemu-10.0/precopy-file-zero/stream.bin")).unwrap();
    // Manifest: SECTION_PART of `ram` at 180, 147844 bytes; repeating it keeps the stream valid.
    let (at, len) = (180usize, 147_844usize);
    let repeats = 1000;
    let mut child = qmig()
        .args(["inspect", "--json", "--profile", "10", "-"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .spawn()
        .unwrap();
    let mut stdin = child.stdin.take().unwrap();
    let feed = b.clone();
    let writer = std::thread::spawn(move || {
        stdin.write_all(&feed[..at]).unwrap();
        for _ in 0..repeats {
            stdin.write_all(&feed[at..at + len]).unwrap();
        }
        stdin.write_all(&feed[at + len..]).unwrap();
    });
    let mut parts = 0;
    let mut last = String::new();
    for l in BufReader::new(child.stdout.take().unwrap()).lines() {
        let l = l.unwrap();
        if l.contains("\"SECTION_PART\"") {
            parts += 1;
        }
        last = l;
    }
    writer.join().unwrap();
    assert!(child.wait().unwrap().success());
    assert_eq!(parts, repeats);
    let total = b.len() + (repeats - 1) * len;
    assert!(last.contains("\"VMDESCRIPTION\""), "{last}");
    assert!(total > 140_000_000);
    let mut ru: libc::rusage = unsafe { std::mem::zeroed() };
    // SAFETY: getrusage writes into the struct we own.
    assert_eq!(
        unsafe { libc::getrusage(libc::RUSAGE_CHILDREN, &mut ru) },
        0
    );
    let peak_kib = ru.ru_maxrss as u64;
    assert!(
        peak_kib < 32 * 1024,
        "peak RSS {peak_kib} KiB for a {total}-byte stream"
    );
}
