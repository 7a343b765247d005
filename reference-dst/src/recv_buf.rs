//! [`RecvBuf`]: the main channel's bytes read from the socket and not yet consumed by the
//! decoder.
//!
//! Reads go straight into memory that was zeroed once, when the buffer first grew to that size:
//! a `read` of a 64–256 KiB chunk costs no `memset` of the chunk first (as `Vec::resize` before
//! every read did: ~2 % of the migration thread's CPU in a postcopy profile). Consumed bytes are
//! dropped by moving the unread tail to the front once more than half the filled part is
//! consumed, so the buffer stays within the largest item plus one chunk.

/// Bytes read and not yet consumed; see the module doc.
#[derive(Debug, Default)]
pub struct RecvBuf {
    /// Initialised memory; `pos..end` holds the unread bytes.
    mem: Vec<u8>,
    pos: usize,
    end: usize,
}

impl RecvBuf {
    /// An empty buffer.
    pub fn new() -> Self {
        Self::default()
    }

    /// The bytes read and not yet consumed.
    pub fn unread(&self) -> &[u8] {
        &self.mem[self.pos..self.end]
    }

    /// The number of unread bytes.
    pub fn len(&self) -> usize {
        self.end - self.pos
    }

    /// Whether every byte read was consumed.
    pub fn is_empty(&self) -> bool {
        self.pos == self.end
    }

    /// Room for `n` more bytes after the unread ones; [`RecvBuf::commit`] says how many a read
    /// filled.
    pub fn spare(&mut self, n: usize) -> &mut [u8] {
        if self.mem.len() < self.end + n {
            self.mem.resize(self.end + n, 0);
        }
        &mut self.mem[self.end..self.end + n]
    }

    /// Adds the first `n` bytes of the last [`RecvBuf::spare`] to the unread bytes.
    pub fn commit(&mut self, n: usize) {
        self.end = (self.end + n).min(self.mem.len());
    }

    /// Drops the first `n` unread bytes (the decoder consumed them).
    pub fn consume(&mut self, n: usize) {
        self.pos = (self.pos + n).min(self.end);
        if self.pos == self.end {
            self.clear();
        } else if self.pos > self.end / 2 {
            self.mem.copy_within(self.pos..self.end, 0);
            self.end -= self.pos;
            self.pos = 0;
        }
    }

    /// Drops every unread byte.
    pub fn clear(&mut self) {
        self.pos = 0;
        self.end = 0;
    }
}

#[cfg(test)]
mod tests {
    use super::RecvBuf;

    #[test]
    fn reads_consumes_and_compacts_without_losing_a_byte() {
        let mut b = RecvBuf::new();
        let mut expect: Vec<u8> = Vec::new();
        let mut next = 0u8;
        let mut most_unread = 0;
        // Reads of varying sizes, partly filled; consumption of varying sizes.
        for round in 0..200usize {
            let chunk = 1 + round * 37 % 300;
            let filled = chunk - round % chunk.min(7);
            let s = b.spare(chunk);
            assert_eq!(s.len(), chunk);
            for x in &mut s[..filled] {
                *x = next;
                expect.push(next);
                next = next.wrapping_add(1);
            }
            b.commit(filled);
            most_unread = most_unread.max(b.len());
            assert_eq!(b.unread(), &expect[..]);
            let take = (round * 53 % 400).min(b.len());
            b.consume(take);
            expect.drain(..take);
            assert_eq!(b.unread(), &expect[..]);
            assert_eq!(b.len(), expect.len());
            assert_eq!(b.is_empty(), expect.is_empty());
        }
        // Compaction keeps the filled part within twice the unread bytes, so the memory stays
        // within twice the most ever unread plus one chunk.
        assert!(b.mem.len() <= 2 * most_unread + 300, "{}", b.mem.len());
    }

    #[test]
    fn consuming_everything_or_clearing_empties_it() {
        let mut b = RecvBuf::new();
        b.spare(10)[..4].copy_from_slice(b"abcd");
        b.commit(4);
        b.consume(4);
        assert!(b.is_empty());
        b.spare(3).copy_from_slice(b"xyz");
        b.commit(3);
        assert_eq!(b.unread(), b"xyz");
        b.clear();
        assert!(b.is_empty());
        assert_eq!(b.unread(), b"");
        // A count beyond what was read is clamped, never a panic.
        b.consume(5);
        b.commit(1 << 20);
        assert!(b.len() <= b.mem.len());
    }
}
