//! `qmig demo`: a postcopy live migration between the two reference binaries that survives a
//! network cut, with the memories checked byte for byte at the end.
//!
//! The demo starts `qmig-dst` and `qmig-src` on loopback (a guest of `--ram` bytes that keeps
//! writing its memory on the source, and reads it, faulting, on the destination), and drives
//! them over QMP as one drives QEMU: capabilities `postcopy-ram`, `return-path`, `events` on
//! both, `migrate-incoming`, `migrate` through a proxy that can cut the link, a few precopy
//! passes, `migrate-start-postcopy`, the cut, `postcopy-paused` on both, `migrate-recover` on a
//! new port and `migrate resume=true`, `completed`, then `pmemsave` on both and a byte-for-byte
//! comparison. Exit status 0 only when the memories are identical.
//!
//! | module | owns |
//! |---|---|
//! | [`scenario`] | the steps, in order |
//! | [`session`] | both processes' QMP clients and the event waits |
//! | [`procs`] | finding and running `qmig-src` / `qmig-dst` |
//! | [`output`] | status lines and the progress bar |
//! | [`summary`] | the closing statistics |
//! | [`memcmp`] | comparing the memory dumps |
//! | [`interrupt`] | Ctrl-C: a clean stop |

pub mod interrupt;
pub mod memcmp;
pub mod output;
pub mod procs;
pub mod scenario;
pub mod session;
pub mod summary;

use std::path::PathBuf;

use anyhow::{bail, Context};

/// `qmig demo` options; every one has a default.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Guest RAM size (`256M`, `1G`, bytes without a suffix).
    #[arg(long, default_value = "256M", value_parser = parse_size)]
    pub ram: u64,
    /// Seed of the source guest's initial memory and workload.
    #[arg(long, default_value_t = 1)]
    pub seed: u64,
    /// Precopy passes before `migrate-start-postcopy`.
    #[arg(long, default_value_t = 3)]
    pub precopy_passes: u64,
    /// Bytes of guest RAM the source guest keeps writing (from the start of RAM); default a
    /// quarter of `--ram`.
    #[arg(long, value_parser = parse_size)]
    pub working_set: Option<u64>,
    /// Source precopy bandwidth limit (`max-bandwidth`), bytes per second; without it,
    /// qmig-src's default (QEMU's 128 MiB/s).
    #[arg(long, value_parser = parse_size)]
    pub bandwidth: Option<u64>,
    /// Source postcopy bandwidth until the recovery, bytes per second (so the cut lands in
    /// postcopy); lifted after the recovery.
    #[arg(long, default_value = "32M", value_parser = parse_size)]
    pub postcopy_bandwidth: u64,
    /// Work in DIR (sockets, logs, memory dumps) and keep it, instead of a temporary directory.
    #[arg(long, value_name = "DIR")]
    pub keep: Option<PathBuf>,
    /// No progress bar, even on a terminal.
    #[arg(long)]
    pub no_progress: bool,
    /// Failure guard of each wait, seconds.
    #[arg(long, default_value_t = 300)]
    pub timeout: u64,
}

impl Args {
    /// The source workload's working set in bytes, a whole number of pages.
    pub fn working_set(&self) -> u64 {
        let ws = self.working_set.unwrap_or(self.ram / 4).min(self.ram);
        (ws & !4095).max(4096)
    }

    /// Whether the working directory (and the dumps in it) is kept.
    pub fn keep_dumps(&self) -> bool {
        self.keep.is_some()
    }
}

/// Parses `256M`, `1G`, `64k`, `4096` (binary multiples, positive) into bytes.
pub use qmig_host::size::parse_nonzero_size as parse_size;

/// Runs the demo; 0 when the memories are identical, 1 when they differ.
pub fn run(args: &Args) -> anyhow::Result<i32> {
    if !procs::is_root() {
        bail!(
            "qmig demo must run as root: the destination maps guest memory with userfaultfd \
             (postcopy page faults) and the source tracks dirty pages; try `sudo qmig demo`"
        );
    }
    if args.ram % 4096 != 0 {
        bail!("--ram must be a multiple of 4096 bytes");
    }
    interrupt::install();
    let tmp;
    let dir = match &args.keep {
        Some(d) => {
            std::fs::create_dir_all(d).with_context(|| format!("creating {}", d.display()))?;
            d.clone()
        }
        None => {
            tmp = tempfile::Builder::new().prefix("qmig-demo-").tempdir()?;
            tmp.path().to_path_buf()
        }
    };
    let outcome = match scenario::run(args, &dir) {
        Ok(o) => o,
        Err(e) => {
            // The processes' own account first, the demo's verdict last.
            for l in ["qmig-src.log", "qmig-dst.log"] {
                eprintln!("{}", tail(&dir.join(l), 15));
            }
            let keep = if args.keep.is_none() {
                " (run with --keep DIR to keep the logs)"
            } else {
                ""
            };
            return Err(e.context(format!("qmig demo failed{keep}")));
        }
    };
    println!("statistics:");
    for l in outcome.stats.lines() {
        println!("{l}");
    }
    let m = &outcome.memory;
    if m.identical() {
        println!(
            "memories identical: {} bytes, sha256 {} (source) = {} (destination)",
            m.len, m.sha256_src, m.sha256_dst
        );
        Ok(0)
    } else {
        println!(
            "MEMORIES DIFFER: {} of {} pages differ (first at byte 0x{:x}){}; sha256 {} (source) != {} (destination)",
            m.differing_pages,
            m.len / 4096,
            m.first_difference.unwrap_or(0),
            if m.length_differs { ", lengths differ" } else { "" },
            m.sha256_src,
            m.sha256_dst
        );
        Ok(1)
    }
}

fn tail(p: &std::path::Path, lines: usize) -> String {
    let text = std::fs::read_to_string(p).unwrap_or_default();
    let all: Vec<&str> = text.lines().collect();
    format!(
        "--- {} (last {lines} lines)\n{}",
        p.display(),
        all[all.len().saturating_sub(lines)..].join("\n")
    )
}

#[cfg(test)]
mod tests {
    use super::parse_size;

    #[test]
    fn sizes() {
        assert_eq!(parse_size("256M"), Ok(256 << 20));
        assert_eq!(parse_size("64k"), Ok(64 << 10));
        assert_eq!(parse_size("4096"), Ok(4096));
        assert!(parse_size("0").is_err());
        assert!(parse_size("1Q").is_err());
        assert!(parse_size("99999999999G").is_err());
    }
}
