//! Driving a [`StreamDecoder`] over a byte source in chunks.
//!
//! This module owns the read loop every subcommand shares: read a chunk, decode items until the
//! decoder wants more, keep only the unconsumed tail, read again. Memory stays bounded by the
//! largest single item (a page, a device payload, a package or the VM description, each capped
//! by `Limits`), never by the input size. At the end of the input the decoder is told the
//! input is final, and the scan ends as [`End::Complete`], [`End::Truncated`] or
//! [`End::Invalid`].

use qmig_protocol::stream::{Item, StreamDecoder};
use qmig_protocol::{Violation, WireError};
use std::io::{self, Read};

/// Bytes read per `read` call.
pub const CHUNK: usize = 256 * 1024;

/// How a scan ended.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum End {
    /// The input ended after a complete stream (EOF, with or without a VM description; for a
    /// packaged blob: at a record boundary).
    Complete {
        /// Total bytes read.
        total: u64,
    },
    /// The input ended inside an item, or before EOF.
    Truncated {
        /// Channel offset of the first undecoded byte.
        at: u64,
        /// Bytes left after `at`.
        left: u64,
        /// Total bytes read.
        total: u64,
        /// Lower bound of the bytes the decoder still needed (0: ended between items).
        needed: usize,
    },
    /// The input breaks a rule.
    Invalid(Violation),
}

/// One decoded item with its channel offset and length, and the decoder after it.
pub struct Decoded<'i, 'd> {
    /// Channel offset of the item's first byte.
    pub at: u64,
    /// Bytes the item used.
    pub len: usize,
    /// The item.
    pub item: Item<'i>,
    /// The decoder, just after the item (for CONTINUE block names, section table, blocks).
    pub dec: &'d StreamDecoder,
}

/// Decodes every item of `input` with `dec`, calling `on_item` for each. Returns how the input
/// ended; I/O errors and errors of `on_item` are passed through.
pub fn scan<R: Read>(
    mut input: R,
    dec: &mut StreamDecoder,
    mut on_item: impl FnMut(Decoded<'_, '_>) -> anyhow::Result<()>,
) -> anyhow::Result<End> {
    let mut buf: Vec<u8> = Vec::with_capacity(CHUNK);
    let mut start = 0usize;
    let mut eof = false;
    let mut total = 0u64;
    loop {
        let at = dec.offset();
        let res = if eof {
            dec.decode_final(&buf[start..])
        } else {
            dec.decode(&buf[start..])
        };
        match res {
            Ok((item, n)) => {
                on_item(Decoded {
                    at,
                    len: n,
                    item,
                    dec,
                })?;
                start += n;
            }
            Err(WireError::Invalid(v)) => return Ok(End::Invalid(v)),
            Err(WireError::Incomplete { needed }) => {
                if eof {
                    let left = (buf.len() - start) as u64;
                    if left == 0 && dec.at_end() {
                        return Ok(End::Complete { total });
                    }
                    return Ok(End::Truncated {
                        at,
                        left,
                        total,
                        needed: if left == 0 { 0 } else { needed },
                    });
                }
                // Keep the unconsumed tail, then read at least what the decoder asked for.
                if start > 0 {
                    buf.drain(..start);
                    start = 0;
                }
                let got = fill(&mut input, &mut buf, needed.max(CHUNK), needed)?;
                total += got as u64;
                if got == 0 {
                    eof = true;
                }
            }
        }
    }
}

/// Appends up to `want` bytes from `input` to `buf`, returning once at least `needed` (and at
/// least one) arrived, so that a live pipe is decoded as it flows; 0 means end of input.
fn fill<R: Read>(
    input: &mut R,
    buf: &mut Vec<u8>,
    want: usize,
    needed: usize,
) -> io::Result<usize> {
    let old = buf.len();
    buf.resize(old + want, 0);
    let mut got = 0;
    while got < needed.max(1) {
        match input.read(&mut buf[old + got..]) {
            Ok(0) => break,
            Ok(n) => got += n,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => {
                buf.truncate(old);
                return Err(e);
            }
        }
    }
    buf.truncate(old + got);
    Ok(got)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qmig_protocol::limits::Limits;
    use qmig_protocol::stream::Channel;
    use qmig_protocol::Profile;

    /// A reader that hands out at most `n` bytes per call.
    struct Trickle<'a>(&'a [u8], usize);

    impl Read for Trickle<'_> {
        fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
            let n = self.0.len().min(self.1).min(buf.len());
            buf[..n].copy_from_slice(&self.0[..n]);
            self.0 = &self.0[n..];
            Ok(n)
        }
    }

    fn items(input: impl Read) -> (Vec<(u64, usize)>, End) {
        let mut dec = StreamDecoder::new(Channel::Main, Profile::QEMU_7_2, Limits::DEFAULT);
        let mut v = Vec::new();
        let end = scan(input, &mut dec, |d| {
            v.push((d.at, d.len));
            Ok(())
        })
        .unwrap();
        (v, end)
    }

    fn vector() -> Vec<u8> {
        let p = concat!(
            env!("CARGO_MANIFEST_DIR"),
            "/vectors/qemu-7.2/precopy-file-zero/stream.bin"
        );
        std::fs::read(p).unwrap()
    }

    #[test]
    fn any_read_size_gives_the_same_items() {
        let b = vector();
        let (whole, end) = items(&b[..]);
        assert_eq!(
            end,
            End::Complete {
                total: b.len() as u64
            }
        );
        assert_eq!(
            whole.iter().map(|x| x.1 as u64).sum::<u64>(),
            b.len() as u64
        );
        for n in [1, 7, 4096, 5000] {
            assert_eq!(items(Trickle(&b, n)), (whole.clone(), end), "reads of {n}");
        }
    }

    #[test]
    fn a_cut_ends_truncated_at_the_cut_item() {
        let b = vector();
        let (whole, _) = items(&b[..]);
        let (at, len) = whole[whole.len() / 2];
        let cut = &b[..at as usize + len / 2];
        let (got, end) = items(cut);
        assert_eq!(got, whole[..whole.len() / 2]);
        match end {
            End::Truncated {
                at: a, left, total, ..
            } => {
                assert_eq!(a, at);
                assert_eq!(left, (len / 2) as u64);
                assert_eq!(total, cut.len() as u64);
            }
            e => panic!("{e:?}"),
        }
        // Cut between items: truncated with nothing left, before EOF.
        let (_, end) = items(&b[..at as usize]);
        assert!(
            matches!(
                end,
                End::Truncated {
                    left: 0,
                    needed: 0,
                    ..
                }
            ),
            "{end:?}"
        );
    }
}
