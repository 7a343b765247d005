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

/// A growable list (with `alloc`: shared committed entries plus a private overlay; without: a
/// fixed array of `N`).
///
/// With `alloc`, cloning is O(1) in the number of entries: the committed entries sit behind an
/// `Arc`, and a clone (the footer scan's lookahead decoders, `resume_from`) shares them. A push
/// goes into the shared vector when this table is its only owner (the live decoder, whose
/// lookahead clones are gone by then), else into the clone's private overlay, so a lookahead
/// never copies the table (before this, each device section's footer scan copied it some 20
/// times: quadratic in the number of sections, found by `protocol/tests/alloc_caps.rs`).
#[derive(Clone)]
pub(crate) struct Table<T: Copy, const N: usize> {
    #[cfg(feature = "alloc")]
    shared: alloc::sync::Arc<alloc::vec::Vec<T>>,
    #[cfg(feature = "alloc")]
    local: alloc::vec::Vec<T>,
    #[cfg(not(feature = "alloc"))]
    items: [Option<T>; N],
    #[cfg(not(feature = "alloc"))]
    len: usize,
}

impl<T: Copy, const N: usize> Table<T, N> {
    pub(crate) fn new() -> Self {
        Table {
            #[cfg(feature = "alloc")]
            shared: alloc::sync::Arc::new(alloc::vec::Vec::new()),
            #[cfg(feature = "alloc")]
            local: alloc::vec::Vec::new(),
            #[cfg(not(feature = "alloc"))]
            items: [None; N],
            #[cfg(not(feature = "alloc"))]
            len: 0,
        }
    }

    /// Number of entries.
    pub(crate) fn len(&self) -> usize {
        #[cfg(feature = "alloc")]
        return self.shared.len() + self.local.len();
        #[cfg(not(feature = "alloc"))]
        return self.len;
    }

    /// Appends; returns false when a fixed table is full.
    pub(crate) fn push(&mut self, v: T) -> bool {
        #[cfg(feature = "alloc")]
        {
            match alloc::sync::Arc::get_mut(&mut self.shared) {
                Some(items) if self.local.is_empty() => items.push(v),
                _ => self.local.push(v),
            }
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
        self.local.clear();
        match alloc::sync::Arc::get_mut(&mut self.shared) {
            Some(items) => items.clear(),
            None => self.shared = alloc::sync::Arc::new(alloc::vec::Vec::new()),
        }
    }

    /// Every entry; with `alloc`, a clone's overlay first (newest first: an entry it re-bound
    /// shadows the shared one).
    pub(crate) fn iter(&self) -> impl Iterator<Item = &T> {
        #[cfg(feature = "alloc")]
        return self.local.iter().rev().chain(self.shared.iter());
        #[cfg(not(feature = "alloc"))]
        return self.items[..self.len].iter().filter_map(|x| x.as_ref());
    }

    /// Replaces the entry matching `is` with `v` (the first in [`Table::iter`] order). With
    /// `alloc`, a clone that shares the entry records `v` in its overlay instead of copying
    /// the table.
    pub(crate) fn replace(&mut self, v: T, is: impl Fn(&T) -> bool) {
        #[cfg(feature = "alloc")]
        {
            if let Some(e) = self.local.iter_mut().rev().find(|e| is(e)) {
                *e = v;
                return;
            }
            match alloc::sync::Arc::get_mut(&mut self.shared) {
                Some(items) if self.local.is_empty() => {
                    if let Some(e) = items.iter_mut().find(|e| is(e)) {
                        *e = v;
                    }
                }
                _ => self.local.push(v),
            }
        }
        #[cfg(not(feature = "alloc"))]
        if let Some(e) = self.items[..self.len].iter_mut().flatten().find(|e| is(e)) {
            *e = v;
        }
    }

    /// Appends into the shared entries (copy-on-write if a clone shares them), so that
    /// [`Table::as_slice`] sees every entry. For tables pushed to rarely (the MEM_SIZE blocks).
    #[cfg(feature = "alloc")]
    pub(crate) fn push_shared(&mut self, v: T) {
        self.flush();
        alloc::sync::Arc::make_mut(&mut self.shared).push(v);
    }

    #[cfg(feature = "alloc")]
    fn flush(&mut self) {
        if !self.local.is_empty() {
            let items = alloc::sync::Arc::make_mut(&mut self.shared);
            items.append(&mut self.local);
        }
    }

    /// The entries as one slice; complete for tables filled with [`Table::push_shared`] only.
    #[cfg(feature = "alloc")]
    pub(crate) fn as_slice(&self) -> &[T] {
        &self.shared
    }
}
