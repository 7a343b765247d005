//! The protocol's [`Destination`] machine as the decode checks of synthetic cases use it: its
//! configuration and zeroed guest memory from a case's manifest, and the end every valid case
//! is judged by (return path byte for byte, final RAM against `final_ram`). Used by
//! [`super::decode`], [`super::decode_recovery`] and [`super::decode_multifd`].

use qmig_protocol::machine::{DestinationConfig, RamBlockSpec};

use super::play_dst::Ram;
use super::vector::Vector;
use crate::qemu::pattern::{hex, sha256_hex};

/// Target page size of every synthetic vector.
pub const TPS: u64 = 4096;

/// The machine's configuration for case `v` (its profile, machine type and blocks with their
/// page sizes; `postcopy` for the postcopy-ram capability) and guest memory of those blocks,
/// all zero.
pub fn setup(v: &Vector, postcopy: bool) -> (DestinationConfig, Ram) {
    let blocks = super::replay_dst::block_pages(v);
    let specs = blocks
        .iter()
        .map(|(n, l, ps)| RamBlockSpec::new(n, *l, *ps))
        .collect();
    let cfg = DestinationConfig::new(
        v.profile(),
        v.manifest["machine"]["type"].as_str().unwrap_or("none"),
        specs,
        postcopy,
    );
    let mem = Ram {
        blocks: blocks
            .iter()
            .map(|(_, l, _)| vec![0u8; *l as usize])
            .collect(),
    };
    (cfg, mem)
}

/// Whether the machine wrote exactly the return path in file `want` of `v`.
pub fn same_return_path(v: &Vector, got: &[u8], want: &str) -> Result<(), String> {
    let expected = v.read(want).map_err(|e| e.to_string())?;
    if got != expected {
        return Err(format!(
            "return path {} differs from {want} {}",
            hex(got),
            hex(&expected)
        ));
    }
    Ok(())
}

/// Whether the guest RAM (its first block) hashes to the manifest's `final_ram.sha256`.
pub fn same_final_ram(v: &Vector, mem: &Ram) -> Result<(), String> {
    let want = v.manifest["final_ram"]["sha256"].as_str().unwrap_or("");
    let got = sha256_hex(&mem.blocks[0]);
    if got != want {
        return Err(format!("final RAM sha256 {got}, manifest {want}"));
    }
    Ok(())
}
