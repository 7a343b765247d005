//! Shared helpers of the qmig-protocol fuzz targets.
//!
//! This crate owns what several targets need: choosing a [`Profile`] and [`Limits`] from input
//! bytes ([`Knobs`]), a bounds-checking guest memory ([`CheckedMemory`]) that panics when a
//! machine places, zeroes, discards or reads anything outside the configured RAM blocks, a
//! bounds-checking source memory ([`CheckedSourceMemory`]), the RAM block layouts the seed
//! corpora were captured with ([`layouts`]), and [`assert_no_illegal`], which turns an
//! `Event::IllegalTransition` into a crash.

use qmig_protocol::limits::Limits;
use qmig_protocol::machine::{Event, GuestMemory, MemoryError, RamBlockSpec, SourceMemory};
use qmig_protocol::Profile;

/// Target page size every layout uses.
pub const TPS: u64 = 4096;

/// Knobs taken from the first byte of an input.
#[derive(Clone, Copy, Debug)]
pub struct Knobs(pub u8);

impl Knobs {
    /// Bit 0: QEMU 7.2 (clear) or 10.x (set).
    pub fn profile(self) -> Profile {
        if self.0 & 1 == 0 {
            Profile::QEMU_7_2
        } else {
            Profile::QEMU_10
        }
    }

    /// Bit `i` of the knob byte.
    pub fn bit(self, i: u8) -> bool {
        self.0 >> i & 1 == 1
    }

    /// Bit 7: tiny caps (so that the cap checks themselves are reached by short inputs).
    pub fn limits(self) -> Limits {
        if self.bit(7) {
            Limits {
                max_packaged: 256,
                max_vmdesc: 512,
                max_device_payload: 512,
                max_blocks: 4,
                max_capabilities: 3,
                max_machine_name: 16,
                max_rp_len: 64,
                max_block_bytes: 1 << 24,
                max_vmdesc_depth: 4,
                max_sections: 8,
            }
        } else {
            Limits::DEFAULT
        }
    }
}

/// Splits `data` at its first byte: returns the knob byte and the rest.
pub fn split_knobs(data: &[u8]) -> Option<(Knobs, &[u8])> {
    let (&k, rest) = data.split_first()?;
    Some((Knobs(k), rest))
}

/// The RAM block layouts of the captured vectors, chosen by index (wrapping).
///
/// 0: `none` machine, one `ram` block of 16 MiB (precopy-none-nocpu, 10.0).
/// 1: `none` machine, `ram` 4 MiB (precopy-footer-lookalike).
/// 2: `none` machine, `ram` 64 MiB (postcopy-none-nocpu, 7.2 postcopy).
/// 3: `none` machine, `ram` 32 MiB (7.2 multifd / advise-precopy).
/// 4: `microvm`, `microvm.ram` 64 MiB plus its ROM blocks (10.0 postcopy vectors).
/// 5: `microvm`, 16 MiB plus ROM blocks (10.0 precopy-file-zero / config-caps).
/// 6: a tiny `ram` block of 16 pages (fast; what mutated inputs mostly reach).
/// 7: two tiny blocks, the second with 2 MiB host pages (huge-page assembly).
pub fn layouts(i: u8) -> (&'static str, Vec<RamBlockSpec>) {
    let microvm = |ram: u64| {
        vec![
            RamBlockSpec::new("microvm.ram", ram, TPS),
            RamBlockSpec::new("/rom@etc/acpi/tables", 4096, TPS),
            RamBlockSpec::new("pc.bios", 131072, TPS),
            RamBlockSpec::new("/rom@etc/table-loader", 4096, TPS),
            RamBlockSpec::new("/rom@etc/acpi/rsdp", 4096, TPS),
        ]
    };
    match i % 8 {
        0 => ("none", vec![RamBlockSpec::new("ram", 16 << 20, TPS)]),
        1 => ("none", vec![RamBlockSpec::new("ram", 4 << 20, TPS)]),
        2 => ("none", vec![RamBlockSpec::new("ram", 64 << 20, TPS)]),
        3 => ("none", vec![RamBlockSpec::new("ram", 32 << 20, TPS)]),
        4 => ("microvm", microvm(64 << 20)),
        5 => ("microvm", microvm(16 << 20)),
        6 => ("none", vec![RamBlockSpec::new("ram", 16 * TPS, TPS)]),
        _ => (
            "none",
            vec![
                RamBlockSpec::new("ram", 16 * TPS, TPS),
                RamBlockSpec::new("huge", 4 << 20, 2 << 20),
            ],
        ),
    }
}

/// A destination memory that stores nothing and checks every access against the blocks:
/// an access outside guest RAM panics (the fuzzer's crash signal).
#[derive(Debug)]
pub struct CheckedMemory {
    blocks: Vec<RamBlockSpec>,
    tps: u64,
    /// Placements done (pages + zero ranges).
    pub placements: u64,
}

impl CheckedMemory {
    /// A memory for `blocks` with target pages of `tps` bytes.
    pub fn new(blocks: &[RamBlockSpec], tps: u64) -> Self {
        CheckedMemory {
            blocks: blocks.to_vec(),
            tps,
            placements: 0,
        }
    }

    fn check(&self, what: &str, block: usize, offset: u64, len: u64) {
        let b = self
            .blocks
            .get(block)
            .unwrap_or_else(|| panic!("{what}: block index {block} out of range"));
        assert!(
            offset.is_multiple_of(self.tps),
            "{what}: offset {offset:#x} not target-page aligned"
        );
        assert!(len > 0, "{what}: empty access at {offset:#x}");
        let end = offset
            .checked_add(len)
            .unwrap_or_else(|| panic!("{what}: offset {offset:#x} + {len:#x} overflows"));
        assert!(
            end <= b.len,
            "{what}: {offset:#x}+{len:#x} outside block {} of {:#x} bytes",
            b.name,
            b.len
        );
    }
}

impl GuestMemory for CheckedMemory {
    fn place_page(&mut self, block: usize, offset: u64, data: &[u8]) -> Result<(), MemoryError> {
        self.check("place_page", block, offset, data.len() as u64);
        let ps = self.blocks[block].page_size;
        assert!(
            data.len() as u64 == ps || data.len() as u64 == self.tps,
            "place_page: {} bytes is neither a target nor a host page",
            data.len()
        );
        self.placements += 1;
        Ok(())
    }

    fn place_zero(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        self.check("place_zero", block, offset, len);
        self.placements += 1;
        Ok(())
    }

    fn discard(&mut self, block: usize, offset: u64, len: u64) -> Result<(), MemoryError> {
        if len == 0 {
            return Ok(());
        }
        self.check("discard", block, offset, len);
        Ok(())
    }

    fn read_page(&self, block: usize, offset: u64, out: &mut [u8]) -> bool {
        self.check("read_page", block, offset, out.len() as u64);
        assert_eq!(out.len() as u64, self.tps, "read_page: not one target page");
        out.fill(0);
        true
    }
}

/// A source memory over small blocks: every page of block `b` is filled with byte `b + 1`;
/// a read outside a block panics.
#[derive(Debug)]
pub struct CheckedSourceMemory {
    blocks: Vec<RamBlockSpec>,
    pages: Vec<Vec<u8>>,
    tps: u64,
}

impl CheckedSourceMemory {
    /// A memory for `blocks` with target pages of `tps` bytes.
    pub fn new(blocks: &[RamBlockSpec], tps: u64) -> Self {
        CheckedSourceMemory {
            blocks: blocks.to_vec(),
            pages: (0..blocks.len())
                .map(|b| vec![b as u8 + 1; tps as usize])
                .collect(),
            tps,
        }
    }
}

impl SourceMemory for CheckedSourceMemory {
    fn page(&self, block: usize, offset: u64) -> &[u8] {
        let b = self
            .blocks
            .get(block)
            .unwrap_or_else(|| panic!("page: block index {block} out of range"));
        assert!(
            offset.is_multiple_of(self.tps),
            "page: offset {offset:#x} unaligned"
        );
        assert!(
            offset.checked_add(self.tps).is_some_and(|e| e <= b.len),
            "page: {offset:#x} outside block {} of {:#x} bytes",
            b.name,
            b.len
        );
        &self.pages[block]
    }
}

/// Panics on an `IllegalTransition` event (a machine bug); returns the other events.
pub fn assert_no_illegal(ev: Event) -> Event {
    if let Event::IllegalTransition(e) = &ev {
        panic!("illegal transition: {e:?}");
    }
    ev
}

/// Takes `n` bytes from the front of `data` (fewer at its end).
pub fn take<'a>(data: &mut &'a [u8], n: usize) -> &'a [u8] {
    let n = n.min(data.len());
    let (a, b) = data.split_at(n);
    *data = b;
    a
}
