//! The command line, shaped like QEMU's where it can be.
//!
//! This module owns [`Args`] (clap) and the parsing of its values: sizes (`256M`), extra RAM
//! blocks (`NAME:SIZE[:PAGESIZE]`), block page sizes, the workload spec (`random|sequential[,threads=N][,rate=P][,working-set=S][,write]`),
//! capability lists, the version profile, and [`Args::blocks`], the RAM block list a machine
//! type implies.

use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;
use qmig_host::uri::MigrationUri;
use qmig_host::workload::AccessOption;
use qmig_protocol::profile::Profile;

/// `qmig-dst`: the reference destination of a QEMU live migration.
#[derive(Debug, Parser)]
#[command(name = "qmig-dst", version, about)]
pub struct Args {
    /// Guest RAM size of the main block (`256M`, `1G`, bytes without suffix).
    #[arg(long, short = 'm', default_value = "128M", value_parser = parse_size)]
    pub ram: u64,
    /// QMP control socket: `unix:PATH` (a server socket, like QEMU's `-qmp unix:PATH,server=on`).
    #[arg(long)]
    pub qmp: String,
    /// Where to listen for the migration: `tcp:HOST:PORT`, `unix:PATH` or `defer` (wait for
    /// `migrate-incoming`). Without it, like `defer`.
    #[arg(long, default_value = "defer", value_parser = parse_uri)]
    pub incoming: MigrationUri,
    /// Machine type; decides the RAM block names and must match the source's (CFG-MACHINE).
    #[arg(long, short = 'M', default_value = "none", value_parser = ["none", "microvm"])]
    pub machine: String,
    /// Page size of the machine's main block (`2M` for a block QEMU backs with 2 MiB
    /// hugetlbfs pages). It is the block's migration unit: in postcopy the destination collects
    /// the target pages of one such page and places it whole (one `UFFDIO_COPY`), drops it
    /// whole when a channel fails with it incomplete, and requests it whole on a fault; the
    /// MEM_SIZE entry of the block must carry it (RAM-PAGESIZE). LIMITATION: the memory itself
    /// stays 4 KiB anonymous userfaultfd-registered memory, not hugetlbfs; only the protocol
    /// unit changes. Default: 4K (the target page size).
    #[arg(long, value_parser = parse_page_size)]
    pub ram_page_size: Option<u64>,
    /// Extra RAM block `NAME:SIZE[:PAGESIZE]` (repeatable), after the machine's own blocks;
    /// PAGESIZE as for `--ram-page-size` (default 4K).
    #[arg(long = "block", value_parser = parse_block)]
    pub blocks: Vec<BlockArg>,
    /// Wire profile of the source: `7.2` or `10`.
    #[arg(long, default_value = "10", value_parser = parse_profile)]
    pub profile: Profile,
    /// VM description JSON used to delimit (and decode) device sections. It also declares this
    /// destination's devices: its devices plus `ram` (instance 0, version 4) are the only
    /// sections accepted, a section naming another device fails the migration with
    /// SEC-UNKNOWN-DEVICE and one newer than its described version with SEC-VERSION, as QEMU's
    /// destination does. Without it every device section is accepted.
    #[arg(long)]
    pub vmdesc: Option<PathBuf>,
    /// Guest workload started when the guest runs (postcopy or completion).
    #[arg(long, value_parser = parse_workload)]
    pub workload: Option<WorkloadSpec>,
    /// Migration capabilities to turn on (`postcopy-ram,return-path,...`).
    #[arg(long, value_delimiter = ',')]
    pub capabilities: Vec<String>,
    /// Bound within which a silently dropped TCP peer is detected (`2s`, `1500ms`).
    #[arg(long, default_value = "2s", value_parser = parse_duration)]
    pub drop_timeout: Duration,
    /// Silence bound (SM-TIMEOUT): a migration channel that delivers no byte for longer than
    /// this (`5s`, `1500ms`) while the migration is open counts as lost (the migration fails
    /// before POSTCOPY_RUN, pauses after it). Any received byte restarts it. Off by default, as
    /// in QEMU; the migration parameter `x-qmig-silence-timeout` (milliseconds, set before
    /// `migrate-incoming` / `migrate-recover`) overrides it.
    #[arg(long, value_parser = parse_duration)]
    pub silence_timeout: Option<Duration>,
    /// Write the received device sections as JSON to this file when the migration completes.
    #[arg(long)]
    pub dump_devices: Option<PathBuf>,
}

/// One RAM block of the destination: name, bytes, page size.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BlockArg {
    /// Block name (as the source's MEM_SIZE list names it).
    pub name: String,
    /// Length in bytes.
    pub len: u64,
    /// Page size in bytes (its migration unit in postcopy; 4096 unless declared).
    pub page_size: u64,
}

/// Target page size, the page size of a block that declares none.
pub const TARGET_PAGE: u64 = 4096;

/// A parsed `--workload` value (the shared parser; `write` makes the guest read then write).
pub use qmig_host::workload::WorkloadSpec;

impl Args {
    /// The RAM blocks in migration order: the machine's (the main one with `--ram-page-size`),
    /// then `--block`s. Errors name a block whose length is not a multiple of its page size.
    pub fn blocks(&self) -> Result<Vec<BlockArg>, String> {
        let b = |name: &str, len: u64| BlockArg {
            name: name.to_string(),
            len,
            page_size: TARGET_PAGE,
        };
        let mut v = match self.machine.as_str() {
            "microvm" => vec![
                b("microvm.ram", self.ram),
                b("/rom@etc/acpi/tables", 4096),
                b("pc.bios", 131072),
                b("/rom@etc/table-loader", 4096),
                b("/rom@etc/acpi/rsdp", 4096),
            ],
            _ => vec![b("ram", self.ram)],
        };
        if let Some(ps) = self.ram_page_size {
            v[0].page_size = ps;
        }
        v.extend(self.blocks.iter().cloned());
        for b in &v {
            if b.len % b.page_size != 0 {
                return Err(format!(
                    "block {}: {} bytes is not a multiple of its page size {}",
                    b.name, b.len, b.page_size
                ));
            }
        }
        Ok(v)
    }

    /// The QMP socket path.
    pub fn qmp_path(&self) -> Result<PathBuf, String> {
        match MigrationUri::parse(&self.qmp) {
            Ok(MigrationUri::Unix { path }) => Ok(path),
            _ => Err(format!("--qmp {}: expected unix:PATH", self.qmp)),
        }
    }
}

/// Sizes of guest RAM, blocks and working sets: positive, with a binary suffix.
pub use qmig_host::size::parse_nonzero_size as parse_size;

fn parse_uri(s: &str) -> Result<MigrationUri, String> {
    MigrationUri::parse(s).map_err(|e| format!("{s}: {e}"))
}

/// `NAME:SIZE` or `NAME:SIZE:PAGESIZE` (a name may hold colons: the sizes are the last fields
/// that parse as sizes).
fn parse_block(s: &str) -> Result<BlockArg, String> {
    let (head, last) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("--block {s:?}: expected NAME:SIZE[:PAGESIZE]"))?;
    let (name, len, page_size) = match head.rsplit_once(':') {
        Some((name, size)) if !name.is_empty() && parse_size(size).is_ok() => {
            (name, parse_size(size)?, parse_page_size(last)?)
        }
        _ => (head, parse_size(last)?, TARGET_PAGE),
    };
    if name.is_empty() || name.len() > 255 {
        return Err(format!("--block {s:?}: name must be 1..=255 bytes"));
    }
    Ok(BlockArg {
        name: name.to_string(),
        len,
        page_size,
    })
}

/// A block page size: a power of two from 4K (the target page) to 1G.
fn parse_page_size(s: &str) -> Result<u64, String> {
    let ps = parse_size(s)?;
    if !ps.is_power_of_two() || !(TARGET_PAGE..=1 << 30).contains(&ps) {
        return Err(format!(
            "page size {s:?}: a power of two from 4K to 1G expected"
        ));
    }
    Ok(ps)
}

fn parse_profile(s: &str) -> Result<Profile, String> {
    match s {
        "7.2" => Ok(Profile::QEMU_7_2),
        "10" | "10.0" | "10.1" | "10.2" => Ok(Profile::QEMU_10),
        _ => Err(format!("unknown profile {s:?} (7.2 or 10)")),
    }
}

/// `2s`, `1500ms`, `2` (seconds).
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let bad = || format!("bad duration {s:?}");
    if let Some(ms) = s.strip_suffix("ms") {
        return ms.parse().map(Duration::from_millis).map_err(|_| bad());
    }
    let secs = s.strip_suffix('s').unwrap_or(s);
    secs.parse::<f64>()
        .ok()
        .filter(|v| v.is_finite() && *v > 0.0)
        .map(Duration::from_secs_f64)
        .ok_or_else(bad)
}

/// `random|sequential[,threads=N][,rate=PAGES/S][,working-set=SIZE][,write]`: the guest reads,
/// with `write` it reads then writes.
pub fn parse_workload(s: &str) -> Result<WorkloadSpec, String> {
    WorkloadSpec::parse(s, AccessOption::DESTINATION)
}

#[cfg(test)]
mod tests {
    use super::*;
    use qmig_host::workload::Access;

    /// The shared parser (qmig_host::workload) with the destination's access option: reads,
    /// `write` reads then writes; sizes must be positive.
    #[test]
    fn workloads() {
        let w = parse_workload("sequential,threads=3,rate=100,working-set=1M,write").unwrap();
        assert_eq!(w.access, Access::ReadWrite);
        assert_eq!(parse_workload("random").unwrap().access, Access::Read);
        assert!(parse_workload("random,working-set=0").is_err());
        assert!(parse_size("0").is_err());
    }

    #[test]
    fn microvm_blocks() {
        let a = Args::parse_from([
            "qmig-dst",
            "--qmp",
            "unix:/tmp/x",
            "--machine",
            "microvm",
            "--ram",
            "64M",
            "--block",
            "extra:8K",
        ]);
        let b = a.blocks().unwrap();
        let blk = |n: &str, len: u64, page_size: u64| BlockArg {
            name: n.to_string(),
            len,
            page_size,
        };
        assert_eq!(b[0], blk("microvm.ram", 64 << 20, 4096));
        assert_eq!(b[2], blk("pc.bios", 131072, 4096));
        assert_eq!(b[5], blk("extra", 8192, 4096));
        assert_eq!(a.incoming, MigrationUri::Defer);
    }

    /// `--ram-page-size` sets the main block's page size, `--block` takes an optional third
    /// field (names may hold colons); page sizes are powers of two from 4K to 1G, and a block
    /// must be a whole number of its pages.
    #[test]
    fn page_sizes() {
        let a = Args::parse_from([
            "qmig-dst",
            "--qmp",
            "unix:/tmp/x",
            "-m",
            "4M",
            "--ram-page-size",
            "2M",
            "--block",
            "huge:4M:2M",
            "--block",
            "/rom@etc:x:8K",
        ]);
        let b = a.blocks().unwrap();
        assert_eq!(
            (b[0].name.as_str(), b[0].len, b[0].page_size),
            ("ram", 4 << 20, 2 << 20)
        );
        assert_eq!((b[1].name.as_str(), b[1].page_size), ("huge", 2 << 20));
        assert_eq!(
            (b[2].name.as_str(), b[2].len, b[2].page_size),
            ("/rom@etc:x", 8192, 4096)
        );
        assert!(parse_page_size("3M").is_err());
        assert!(parse_page_size("2K").is_err());
        assert!(parse_page_size("2G").is_err());
        assert!(parse_block("x:4M:3M").is_err());
        let odd = Args::parse_from([
            "qmig-dst",
            "--qmp",
            "unix:/tmp/x",
            "-m",
            "3M",
            "--ram-page-size",
            "2M",
        ]);
        assert!(odd.blocks().is_err());
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1").is_err());
    }
}
