//! Caps on every length a peer controls.
//!
//! Nothing in this crate allocates a size taken from the wire before checking it against one of
//! these caps. The defaults are far above anything QEMU sends for the machines qmig supports and
//! far below what could exhaust a host. The spec (`spec/limits.md`) lists them.

/// Caps applied while decoding. `Limits::DEFAULT` documents each value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Limits {
    /// Largest PACKAGED blob (QEMU allows 4 GiB; real packages are a few KiB): 16 MiB.
    pub max_packaged: u32,
    /// Largest trailing VM description: 16 MiB.
    pub max_vmdesc: u32,
    /// Largest device section payload: 1 MiB.
    pub max_device_payload: u32,
    /// Most RAM blocks in one MEM_SIZE list: 1024.
    pub max_blocks: u32,
    /// Most capabilities in configuration/capabilities: 64.
    pub max_capabilities: u32,
    /// Longest machine name in the configuration section: 256.
    pub max_machine_name: u32,
    /// Largest return-path message payload (QEMU's receive buffer): 512.
    pub max_rp_len: u16,
    /// Largest RAM block length a bitmap may describe: 1 TiB (a 32 MiB bitmap).
    pub max_block_bytes: u64,
    /// Deepest nesting of structs and subsections in a VM description: 32.
    pub max_vmdesc_depth: u32,
    /// Most distinct section ids a stream may bind with SECTION_START/FULL (the receiver's
    /// device count; QEMU has no cap): 8192. One more breaks `SEC-UNKNOWN-DEVICE`.
    pub max_sections: u32,
}

impl Limits {
    /// The documented defaults.
    pub const DEFAULT: Limits = Limits {
        max_packaged: 16 << 20,
        max_vmdesc: 16 << 20,
        max_device_payload: 1 << 20,
        max_blocks: 1024,
        max_capabilities: 64,
        max_machine_name: 256,
        max_rp_len: 512,
        max_block_bytes: 1 << 40,
        max_vmdesc_depth: 32,
        max_sections: 8192,
    };
}

impl Default for Limits {
    fn default() -> Self {
        Limits::DEFAULT
    }
}
