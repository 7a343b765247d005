//! The command line, shaped like QEMU's where it can be.
//!
//! This module owns [`Args`] (clap) and the parsing of its values: sizes (`256M`), extra RAM
//! blocks (`NAME:SIZE`), the workload spec (`random|sequential[,threads=N][,rate=P][,working-set=S][,write]`),
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
    /// Extra RAM block `NAME:SIZE` (repeatable), after the machine's own blocks.
    #[arg(long = "block", value_parser = parse_block)]
    pub blocks: Vec<(String, u64)>,
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
    /// Write the received device sections as JSON to this file when the migration completes.
    #[arg(long)]
    pub dump_devices: Option<PathBuf>,
}

/// A parsed `--workload` value (the shared parser; `write` makes the guest read then write).
pub use qmig_host::workload::WorkloadSpec;

impl Args {
    /// The RAM blocks `(name, bytes)` in migration order: the machine's, then `--block`s.
    pub fn blocks(&self) -> Vec<(String, u64)> {
        let mut v = match self.machine.as_str() {
            "microvm" => vec![
                ("microvm.ram".to_string(), self.ram),
                ("/rom@etc/acpi/tables".to_string(), 4096),
                ("pc.bios".to_string(), 131072),
                ("/rom@etc/table-loader".to_string(), 4096),
                ("/rom@etc/acpi/rsdp".to_string(), 4096),
            ],
            _ => vec![("ram".to_string(), self.ram)],
        };
        v.extend(self.blocks.iter().cloned());
        v
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

fn parse_block(s: &str) -> Result<(String, u64), String> {
    let (name, size) = s
        .rsplit_once(':')
        .ok_or_else(|| format!("--block {s:?}: expected NAME:SIZE"))?;
    if name.is_empty() || name.len() > 255 {
        return Err(format!("--block {s:?}: name must be 1..=255 bytes"));
    }
    Ok((name.to_string(), parse_size(size)?))
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
        let b = a.blocks();
        assert_eq!(b[0], ("microvm.ram".to_string(), 64 << 20));
        assert_eq!(b[2], ("pc.bios".to_string(), 131072));
        assert_eq!(b[5], ("extra".to_string(), 8192));
        assert_eq!(a.incoming, MigrationUri::Defer);
    }

    #[test]
    fn durations() {
        assert_eq!(parse_duration("2s"), Ok(Duration::from_secs(2)));
        assert_eq!(parse_duration("1500ms"), Ok(Duration::from_millis(1500)));
        assert!(parse_duration("-1").is_err());
    }
}
