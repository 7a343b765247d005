//! The decoder's tables: sections by id ([`SectionInfo`]) and announced RAM blocks
//! ([`BlockInfoOwned`]). With `alloc` they grow; without it the section table holds
//! [`NO_ALLOC_SECTIONS`] entries and no block list is kept.

/// What a START/FULL header bound a section id to.
#[derive(Clone, Copy)]
pub struct SectionInfo {
    /// The section id.
    pub section_id: u32,
    idstr: [u8; 255],
    idstr_len: u8,
    /// The device instance.
    pub instance_id: u32,
    /// The version given by the last START/FULL for this id.
    pub version_id: u32,
    /// Whether this is the RAM section (idstr `ram`).
    pub is_ram: bool,
}

impl SectionInfo {
    /// A section entry; `idstr` is truncated to 255 bytes.
    pub fn new(section_id: u32, idstr: &[u8], instance_id: u32, version_id: u32) -> Self {
        let n = idstr.len().min(255);
        let mut buf = [0u8; 255];
        buf[..n].copy_from_slice(&idstr[..n]);
        SectionInfo {
            section_id,
            idstr: buf,
            idstr_len: n as u8,
            instance_id,
            version_id,
            is_ram: &idstr[..n] == b"ram",
        }
    }

    /// The device idstr.
    pub fn idstr(&self) -> &[u8] {
        &self.idstr[..self.idstr_len as usize]
    }
}

impl core::fmt::Debug for SectionInfo {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("SectionInfo")
            .field("section_id", &self.section_id)
            .field(
                "idstr",
                &core::str::from_utf8(self.idstr()).unwrap_or("<non-utf8>"),
            )
            .field("instance_id", &self.instance_id)
            .field("version_id", &self.version_id)
            .field("is_ram", &self.is_ram)
            .finish()
    }
}

impl PartialEq for SectionInfo {
    fn eq(&self, o: &Self) -> bool {
        self.section_id == o.section_id
            && self.idstr() == o.idstr()
            && self.instance_id == o.instance_id
            && self.version_id == o.version_id
    }
}
impl Eq for SectionInfo {}

/// A RAM block announced by MEM_SIZE, owned by the decoder.
#[derive(Clone, Copy)]
pub struct BlockInfoOwned {
    name: [u8; 255],
    name_len: u8,
    /// The block's used length in bytes.
    pub used_length: u64,
    /// The page size field, when the entry carried one.
    pub page_size: Option<u64>,
    /// The memory-region address (x-ignore-shared), when the entry carried one.
    pub mr_addr: Option<u64>,
}

impl BlockInfoOwned {
    /// An owned copy of a MEM_SIZE entry.
    pub fn from_info(b: &crate::ram::BlockInfo<'_>) -> Self {
        let n = b.name.len().min(255);
        let mut name = [0u8; 255];
        name[..n].copy_from_slice(&b.name[..n]);
        BlockInfoOwned {
            name,
            name_len: n as u8,
            used_length: b.used_length,
            page_size: b.page_size,
            mr_addr: b.mr_addr,
        }
    }

    /// The block's idstr.
    pub fn name(&self) -> &[u8] {
        &self.name[..self.name_len as usize]
    }
}

impl core::fmt::Debug for BlockInfoOwned {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("BlockInfoOwned")
            .field(
                "name",
                &core::str::from_utf8(self.name()).unwrap_or("<non-utf8>"),
            )
            .field("used_length", &self.used_length)
            .field("page_size", &self.page_size)
            .field("mr_addr", &self.mr_addr)
            .finish()
    }
}

/// Sections kept without `alloc`.
pub const NO_ALLOC_SECTIONS: usize = 64;

/// A growable list (a `Vec` with `alloc`, a fixed array of `N` without).
#[derive(Clone)]
pub(crate) struct Table<T: Copy, const N: usize> {
    #[cfg(feature = "alloc")]
    items: alloc::vec::Vec<T>,
    #[cfg(not(feature = "alloc"))]
    items: [Option<T>; N],
    #[cfg(not(feature = "alloc"))]
    len: usize,
}

impl<T: Copy, const N: usize> Table<T, N> {
    pub(crate) fn new() -> Self {
        Table {
            #[cfg(feature = "alloc")]
            items: alloc::vec::Vec::new(),
            #[cfg(not(feature = "alloc"))]
            items: [None; N],
            #[cfg(not(feature = "alloc"))]
            len: 0,
        }
    }

    /// Appends; returns false when a fixed table is full.
    pub(crate) fn push(&mut self, v: T) -> bool {
        #[cfg(feature = "alloc")]
        {
            self.items.push(v);
            true
        }
        #[cfg(not(feature = "alloc"))]
        {
            if self.len == N {
                return false;
            }
            self.items[self.len] = Some(v);
            self.len += 1;
            true
        }
    }

    #[cfg(feature = "alloc")]
    pub(crate) fn clear(&mut self) {
        self.items.clear();
    }

    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        #[cfg(feature = "alloc")]
        return self.items.iter();
        #[cfg(not(feature = "alloc"))]
        return self.items[..self.len].iter().filter_map(|x| x.as_ref());
    }

    pub(crate) fn iter_mut(&mut self) -> impl Iterator<Item = &mut T> {
        #[cfg(feature = "alloc")]
        return self.items.iter_mut();
        #[cfg(not(feature = "alloc"))]
        return self.items[..self.len].iter_mut().filter_map(|x| x.as_mut());
    }

    #[cfg(feature = "alloc")]
    pub(crate) fn as_slice(&self) -> &[T] {
        &self.items
    }
}
