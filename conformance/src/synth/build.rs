//! The stream builder: a stream as an ordered list of named parts, so a case can patch one
//! part and compute the absolute offset of the field it broke from the parts before it.

/// One named piece of a channel.
#[derive(Clone, Debug)]
pub struct Part {
    /// Name the cases refer to (`ping1`, `ram_start`, ...).
    pub name: &'static str,
    /// The bytes.
    pub bytes: Vec<u8>,
}

/// A channel under construction.
#[derive(Clone, Debug, Default)]
pub struct Parts {
    /// The parts in wire order.
    pub parts: Vec<Part>,
}

impl Parts {
    /// Appends a part.
    pub fn push(&mut self, name: &'static str, bytes: Vec<u8>) {
        self.parts.push(Part { name, bytes });
    }

    fn index(&self, name: &str) -> usize {
        self.parts
            .iter()
            .position(|p| p.name == name)
            .unwrap_or_else(|| panic!("synthetic base has no part {name}"))
    }

    /// Whether a part `name` exists.
    pub fn has(&self, name: &str) -> bool {
        self.parts.iter().any(|p| p.name == name)
    }

    /// Absolute offset of the first byte of part `name`.
    pub fn offset_of(&self, name: &str) -> u64 {
        let i = self.index(name);
        self.parts[..i].iter().map(|p| p.bytes.len() as u64).sum()
    }

    /// Total length.
    pub fn len(&self) -> u64 {
        self.parts.iter().map(|p| p.bytes.len() as u64).sum()
    }

    /// Whether there are no bytes.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// The bytes of part `name`, for patching.
    pub fn get(&mut self, name: &str) -> &mut Vec<u8> {
        let i = self.index(name);
        &mut self.parts[i].bytes
    }

    /// Replaces part `name`'s bytes.
    pub fn set(&mut self, name: &str, bytes: Vec<u8>) {
        *self.get(name) = bytes;
    }

    /// Removes part `name`.
    pub fn remove(&mut self, name: &str) {
        let i = self.index(name);
        self.parts.remove(i);
    }

    /// Inserts a part before part `before`.
    pub fn insert_before(&mut self, before: &str, name: &'static str, bytes: Vec<u8>) {
        let i = self.index(before);
        self.parts.insert(i, Part { name, bytes });
    }

    /// Inserts a part after part `after`.
    pub fn insert_after(&mut self, after: &str, name: &'static str, bytes: Vec<u8>) {
        let i = self.index(after);
        self.parts.insert(i + 1, Part { name, bytes });
    }

    /// Drops every part from `name` on.
    pub fn truncate_at(&mut self, name: &str) {
        let i = self.index(name);
        self.parts.truncate(i);
    }

    /// The whole channel.
    pub fn bytes(&self) -> Vec<u8> {
        self.parts
            .iter()
            .flat_map(|p| p.bytes.iter().copied())
            .collect()
    }
}

/// Big-endian byte helpers.
pub fn be16(v: u16) -> [u8; 2] {
    v.to_be_bytes()
}
/// Big-endian 32-bit.
pub fn be32(v: u32) -> [u8; 4] {
    v.to_be_bytes()
}
/// Big-endian 64-bit.
pub fn be64(v: u64) -> [u8; 8] {
    v.to_be_bytes()
}

/// Concatenates byte slices.
pub fn cat(pieces: &[&[u8]]) -> Vec<u8> {
    pieces.iter().flat_map(|p| p.iter().copied()).collect()
}
