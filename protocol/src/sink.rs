//! Where encoders write: the [`Sink`] trait.
//!
//! Encoders are generic over a `Sink` so that they work without `alloc` (into a fixed slice via
//! [`SliceSink`]) and with it (into a `Vec<u8>`). Writing big-endian integers lives here once.

/// A byte sink for encoders.
pub trait Sink {
    /// Appends bytes.
    fn put(&mut self, bytes: &[u8]);

    /// Appends one byte.
    #[inline]
    fn put_u8(&mut self, v: u8) {
        self.put(&[v]);
    }
    /// Appends a big-endian u16.
    #[inline]
    fn put_be16(&mut self, v: u16) {
        self.put(&v.to_be_bytes());
    }
    /// Appends a big-endian u32.
    #[inline]
    fn put_be32(&mut self, v: u32) {
        self.put(&v.to_be_bytes());
    }
    /// Appends a big-endian u64.
    #[inline]
    fn put_be64(&mut self, v: u64) {
        self.put(&v.to_be_bytes());
    }
    /// Appends a counted string (u8 length, bytes). The caller guarantees 1..=255 bytes;
    /// longer input is truncated to 255 so that the length byte stays truthful.
    #[inline]
    fn put_str8(&mut self, s: &[u8]) {
        let s = &s[..s.len().min(255)];
        self.put_u8(s.len() as u8);
        self.put(s);
    }
}

#[cfg(feature = "alloc")]
impl Sink for alloc::vec::Vec<u8> {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.extend_from_slice(bytes);
    }
}

/// A sink over a fixed buffer; bytes past its end are counted but dropped.
#[derive(Debug)]
pub struct SliceSink<'a> {
    buf: &'a mut [u8],
    len: usize,
}

impl<'a> SliceSink<'a> {
    /// A sink writing into `buf` from its start.
    pub fn new(buf: &'a mut [u8]) -> Self {
        SliceSink { buf, len: 0 }
    }

    /// Bytes written (or that would have been written).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Whether nothing was written.
    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    /// Whether everything written fit.
    pub fn fits(&self) -> bool {
        self.len <= self.buf.len()
    }
}

impl Sink for SliceSink<'_> {
    fn put(&mut self, bytes: &[u8]) {
        let start = self.len.min(self.buf.len());
        let end = (self.len + bytes.len()).min(self.buf.len());
        self.buf[start..end].copy_from_slice(&bytes[..end - start]);
        self.len += bytes.len();
    }
}

/// A sink that only counts bytes: for computing encoded lengths.
#[derive(Debug, Default, Clone, Copy)]
pub struct CountingSink(pub usize);

impl Sink for CountingSink {
    #[inline]
    fn put(&mut self, bytes: &[u8]) {
        self.0 += bytes.len();
    }
}
