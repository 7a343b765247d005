//! The command line of `qmig-src` and the parsing of its value syntaxes.
//!
//! This module owns [`Args`] (clap) and the small parsers behind it: sizes (`256M`), extra RAM
//! blocks (`NAME:SIZE`), the fill content, the workload specification
//! (`random|sequential[,threads=N][,rate=PAGES/S][,working-set=SIZE]`) and the profile.

use std::path::PathBuf;

use clap::Parser;
use qmig_host::fill::Content;
use qmig_host::workload::AccessOption;
use qmig_protocol::profile::Profile;

/// `qmig-src`: the reference migration source.
#[derive(Debug, Parser)]
#[command(name = "qmig-src", version, about)]
pub struct Args {
    /// Guest RAM size of the main block (`256M`, `1G`, bytes without a suffix).
    #[arg(long, value_parser = parse_size)]
    pub ram: u64,
    /// QMP socket: `unix:PATH`.
    #[arg(long)]
    pub qmp: String,
    /// Machine type: `none` (main block `ram`) or `microvm` (main block `microvm.ram`).
    #[arg(long, default_value = "none", value_parser = ["none", "microvm"])]
    pub machine: String,
    /// An extra RAM block `NAME:SIZE` (repeatable), migrated after the main block.
    #[arg(long = "block", value_parser = parse_block)]
    pub blocks: Vec<(String, u64)>,
    /// The destination's QEMU version profile: `7.2` or `10`.
    #[arg(long, default_value = "10", value_parser = parse_profile)]
    pub profile: Profile,
    /// Initial guest RAM content: `random`, `zero`, `mixed`, `pattern` or a raw image FILE.
    #[arg(long, default_value = "zero")]
    pub fill: String,
    /// Seed of the fill content and of the workload.
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// A guest workload writing RAM from start-up:
    /// `random|sequential[,threads=N][,rate=PAGES/S][,working-set=SIZE]`.
    #[arg(long, value_parser = parse_workload)]
    pub workload: Option<WorkloadSpec>,
    /// Take the device sections from a stream captured from a real QEMU of the same version
    /// and machine.
    #[arg(long)]
    pub device_template: Option<PathBuf>,
    /// Capabilities on from the start, comma-separated (`postcopy-ram,return-path,events`).
    #[arg(long, value_delimiter = ',')]
    pub capabilities: Vec<String>,
    /// Dirty tracking: `auto`, `uffd-wp` or `soft-dirty`.
    #[arg(long, default_value = "auto", value_parser = ["auto", "uffd-wp", "soft-dirty"])]
    pub dirty_tracking: String,
}

/// A parsed `--workload` (the shared parser; the source's guest always writes).
pub use qmig_host::workload::WorkloadSpec;

/// Sizes with a binary suffix (`256M`, `1G`, `4096`).
pub use qmig_host::size::parse_size;

/// Parses `NAME:SIZE`.
pub fn parse_block(s: &str) -> Result<(String, u64), String> {
    let (name, size) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("expected NAME:SIZE, got '{s}'"))?;
    if name.is_empty() || name.len() > 255 {
        return Err(format!("block name must be 1..=255 bytes: '{s}'"));
    }
    let size = parse_size(size)?;
    if size == 0 || size % 4096 != 0 {
        return Err(format!(
            "block size must be a non-zero multiple of 4096: '{s}'"
        ));
    }
    Ok((name.to_owned(), size))
}

/// Parses `7.2` or `10` (`10.0`, `10.x` accepted).
pub fn parse_profile(s: &str) -> Result<Profile, String> {
    match s {
        "7.2" => Ok(Profile::QEMU_7_2),
        "10" | "10.0" | "10.x" | "10.1" | "10.2" => Ok(Profile::QEMU_10),
        _ => Err(format!("unknown profile '{s}' (7.2 or 10)")),
    }
}

/// Parses a fill name or image path.
pub fn parse_fill(s: &str, seed: u64) -> Result<FillSpec, String> {
    Ok(match s {
        "zero" => FillSpec::Content(Content::Zero),
        "random" => FillSpec::Content(Content::Random { seed }),
        "mixed" => FillSpec::Content(Content::Mixed { seed }),
        "pattern" => FillSpec::Content(Content::Pattern { seed }),
        path if std::path::Path::new(path).is_file() => FillSpec::Image(PathBuf::from(path)),
        other => return Err(format!("unknown fill '{other}' (and no such file)")),
    })
}

/// What `--fill` asks for.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum FillSpec {
    /// Synthetic content.
    Content(Content),
    /// A raw image for the main block.
    Image(PathBuf),
}

/// Parses `random|sequential[,threads=N][,rate=PAGES/S][,working-set=SIZE]` (no `write`
/// option: the source's guest writes).
pub fn parse_workload(s: &str) -> Result<WorkloadSpec, String> {
    WorkloadSpec::parse(s, AccessOption::SOURCE)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qmig_host::workload::Access;

    /// The shared parser (qmig_host::workload) with the source's access option: the guest
    /// always writes, and there is no `write` option.
    #[test]
    fn workloads() {
        let w = parse_workload("sequential,threads=2,rate=500,working-set=1M").unwrap();
        assert_eq!(w.access, Access::Write);
        assert!(parse_workload("random,write").is_err());
        assert_eq!(parse_size("4096"), Ok(4096));
    }

    #[test]
    fn blocks() {
        assert_eq!(parse_block("vga.vram:8M"), Ok(("vga.vram".into(), 8 << 20)));
        assert!(parse_block("x:100").is_err());
        assert!(parse_block(":4096").is_err());
    }
}
