//! A bounds-checked cursor over borrowed input.
//!
//! `Reader` owns the mechanics every decoder shares: reading big-endian integers, borrowed byte
//! runs and counted strings, and turning a short read into [`WireError::Incomplete`] instead of a
//! panic. It tracks the absolute offset of its first byte (`base`) so that every error names a
//! position in the whole channel, not in the current buffer. The primitives are nom's streaming
//! number parsers; nothing here allocates.

use crate::error::{WireError, WireResult};
use crate::rule::Rule;
use nom::number::streaming as num;

/// A cursor over `&'a [u8]` whose first byte is at absolute channel offset `base`.
#[derive(Clone, Debug)]
pub struct Reader<'a> {
    buf: &'a [u8],
    pos: usize,
    base: u64,
}

fn incomplete(needed: nom::Needed) -> WireError {
    WireError::Incomplete {
        needed: match needed {
            nom::Needed::Size(n) => n.get(),
            nom::Needed::Unknown => 1,
        },
    }
}

macro_rules! be_int {
    ($(#[$doc:meta])* $name:ident, $ty:ty, $parser:ident) => {
        $(#[$doc])*
        #[inline]
        pub fn $name(&mut self) -> WireResult<$ty> {
            match num::$parser::<&'a [u8], nom::error::Error<&'a [u8]>>(&self.buf[self.pos..]) {
                Ok((_, v)) => {
                    self.pos += core::mem::size_of::<$ty>();
                    Ok(v)
                }
                Err(nom::Err::Incomplete(n)) => Err(incomplete(n)),
                // Streaming integer parsers only ever report Incomplete.
                Err(_) => Err(WireError::Incomplete { needed: 1 }),
            }
        }
    };
}

impl<'a> Reader<'a> {
    /// A reader over `buf`, whose first byte is at channel offset `base`.
    pub const fn new(buf: &'a [u8], base: u64) -> Self {
        Reader { buf, pos: 0, base }
    }

    /// Absolute channel offset of the next byte.
    #[inline]
    pub const fn offset(&self) -> u64 {
        self.base + self.pos as u64
    }

    /// Bytes consumed so far.
    #[inline]
    pub const fn consumed(&self) -> usize {
        self.pos
    }

    /// Bytes left in the buffer.
    #[inline]
    pub const fn remaining(&self) -> usize {
        self.buf.len() - self.pos
    }

    /// The unread rest of the buffer, without consuming it.
    #[inline]
    pub fn rest(&self) -> &'a [u8] {
        &self.buf[self.pos..]
    }

    /// Looks at the next byte without consuming it.
    #[inline]
    pub fn peek_u8(&self) -> WireResult<u8> {
        self.buf
            .get(self.pos)
            .copied()
            .ok_or(WireError::Incomplete { needed: 1 })
    }

    /// Reads one byte.
    #[inline]
    pub fn u8(&mut self) -> WireResult<u8> {
        let v = self.peek_u8()?;
        self.pos += 1;
        Ok(v)
    }

    be_int!(
        /// Reads a big-endian u16.
        be16, u16, be_u16
    );
    be_int!(
        /// Reads a big-endian u32.
        be32, u32, be_u32
    );
    be_int!(
        /// Reads a big-endian u64.
        be64, u64, be_u64
    );

    /// Borrows the next `n` bytes.
    #[inline]
    pub fn take(&mut self, n: usize) -> WireResult<&'a [u8]> {
        let left = self.remaining();
        if left < n {
            return Err(WireError::Incomplete { needed: n - left });
        }
        let s = &self.buf[self.pos..self.pos + n];
        self.pos += n;
        Ok(s)
    }

    /// Borrows the next `N` bytes as an array reference.
    #[inline]
    pub fn array<const N: usize>(&mut self) -> WireResult<&'a [u8; N]> {
        self.take(N)?
            .first_chunk::<N>()
            .ok_or(WireError::Incomplete { needed: N })
    }

    /// Skips `n` bytes.
    #[inline]
    pub fn skip(&mut self, n: usize) -> WireResult<()> {
        self.take(n).map(|_| ())
    }

    /// Reads a counted string (`u8 len`, `len` bytes, no NUL). A zero length breaks
    /// [`Rule::Str8Empty`]; the error names the length byte.
    #[inline]
    pub fn str8(&mut self) -> WireResult<&'a [u8]> {
        let at = self.offset();
        let n = self.u8()?;
        if n == 0 {
            return Err(WireError::invalid(at, Rule::Str8Empty, 0));
        }
        self.take(n as usize)
    }

    /// A violation of `rule` at absolute offset `offset` with `value`.
    #[inline]
    pub fn invalid_at(&self, offset: u64, rule: Rule, value: u64) -> WireError {
        WireError::invalid(offset, rule, value)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_reads_are_incomplete_and_consume_nothing() {
        let mut r = Reader::new(&[0, 1, 2], 100);
        assert_eq!(r.be32(), Err(WireError::Incomplete { needed: 1 }));
        assert_eq!(r.consumed(), 0);
        assert_eq!(r.be16(), Ok(1));
        assert_eq!(r.offset(), 102);
        assert_eq!(r.take(3), Err(WireError::Incomplete { needed: 2 }));
    }

    #[test]
    fn empty_str8_names_the_length_byte() {
        let mut r = Reader::new(&[9, 0], 10);
        r.u8().unwrap();
        assert_eq!(r.str8(), Err(WireError::invalid(11, Rule::Str8Empty, 0)));
        let mut r = Reader::new(&[3, b'r', b'a', b'm'], 0);
        assert_eq!(r.str8(), Ok(&b"ram"[..]));
    }
}
