//! `qmig bench`: end-to-end migration benchmarks of qmig against QEMU 7.2 and against an
//! idealised pipeline, on one guest size over loopback, with every case repeated and the
//! repetitions interleaved (case A rep 1, case B rep 1, …, case A rep 2, …) so that load drift
//! on a shared machine spreads over all cases alike.
//!
//! | module | owns |
//! |---|---|
//! | [`cpu`] | CPU seconds from `/proc/PID/stat` and `/proc/thread-self/stat` |
//! | [`ideal`] | the protocol-free one-stream pipeline and the raw fault round trip |
//! | [`peer`] | launching QEMU / `qmig-src` / `qmig-dst` as QMP-driven peers |
//! | [`migrate`] | one precopy / postcopy migration, postcopy latency, recovery, timed |
//! | [`report`] | medians, ratios, targets, the Markdown and JSON reports |
//!
//! Pairs: `ideal` (the pipeline), `qemu` (QEMU 7.2 → QEMU 7.2), `qmig` (qmig-src → qmig-dst),
//! `qemu-qmig` (QEMU 7.2 → qmig-dst); each runs every content (`random`, `zero`, `mixed`) in
//! every mode (`precopy`, `postcopy` started at once). `latency` measures postcopy page-access
//! latency (idle link and saturating stream) for ideal, QEMU and qmig; `recovery` the time from
//! `migrate resume=true` to `postcopy-active` for QEMU and qmig. A pair whose binaries are
//! missing or whose run fails is reported as such; the others still run.

pub mod cpu;
pub mod ideal;
pub mod migrate;
pub mod peer;
pub mod report;

use std::path::{Path, PathBuf};
use std::sync::Arc;

use anyhow::Context as _;
use qmig_host::fill::Content;

use crate::qemu::{find_qemu, QemuBinary, QemuVersion};
use migrate::Mode;
use peer::Peer;
use report::{Key, Results, Sample};

/// Fill seed shared by every pair, so all move the same bytes.
const SEED: u64 = 1;
/// Page accesses per postcopy latency run.
const TOUCHES: usize = 200;
/// Raw round trips per ideal latency run.
const RAW_TOUCHES: usize = 2000;

/// `qmig bench` arguments.
#[derive(Debug, Clone, clap::Args)]
pub struct Args {
    /// Guest RAM size (`1G`, `64M`).
    #[arg(long, default_value = "1G", value_parser = parse_size)]
    pub size: u64,
    /// Repetitions of every case (interleaved).
    #[arg(long, default_value_t = 3)]
    pub reps: usize,
    /// Cases: `ideal`, `qemu`, `qmig`, `qemu-qmig`, `latency`, `recovery` (comma-separated);
    /// `latency-ideal|qemu|qmig` and `recovery-qemu|qmig` run one pair of those.
    #[arg(
        long,
        value_delimiter = ',',
        default_value = "ideal,qemu,qmig,qemu-qmig,latency,recovery"
    )]
    pub cases: Vec<String>,
    /// Contents: `random`, `zero`, `mixed`.
    #[arg(long, value_delimiter = ',', default_value = "random,zero,mixed")]
    pub contents: Vec<String>,
    /// Modes: `precopy`, `postcopy`.
    #[arg(long, value_delimiter = ',', default_value = "precopy,postcopy")]
    pub modes: Vec<String>,
    /// Write the end-to-end section into this Markdown file (between the bench markers,
    /// replacing a previous run; appended if the markers are absent).
    #[arg(long)]
    pub write: Option<PathBuf>,
    /// Also write every sample as JSON here.
    #[arg(long)]
    pub json: Option<PathBuf>,
    /// `qmig-src` binary (default: next to this executable).
    #[arg(long)]
    pub src_bin: Option<PathBuf>,
    /// `qmig-dst` binary (default: next to this executable).
    #[arg(long)]
    pub dst_bin: Option<PathBuf>,
}

/// `256M`, `1G`, bytes without suffix; a non-zero multiple of 1 MiB.
pub fn parse_size(s: &str) -> Result<u64, String> {
    Some(qmig_host::size::parse_size(s)?)
        .filter(|b| *b > 0 && b % (1 << 20) == 0)
        .ok_or_else(|| format!("size {s:?} must be a non-zero multiple of 1M"))
}

/// A content name to the fill the pairs use.
pub fn content(name: &str) -> Option<Content> {
    match name {
        "random" => Some(Content::Random { seed: SEED }),
        "zero" => Some(Content::Zero),
        "mixed" => Some(Content::Mixed { seed: SEED }),
        _ => None,
    }
}

/// One unit of work, run once per repetition.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Work {
    /// A migration of `pair` with `content` in `mode`.
    Migrate {
        /// `ideal`, `qemu`, `qmig`, `qemu-qmig`.
        pair: String,
        /// `random`, `zero`, `mixed`.
        content: String,
        /// Precopy or postcopy.
        mode: Mode,
    },
    /// Postcopy access latency of `pair` (`ideal`, `qemu`, `qmig`), link idle or saturated.
    Latency {
        /// Which implementation.
        pair: String,
        /// Saturating background stream.
        saturate: bool,
    },
    /// Recovery timing of `pair` (`qemu`, `qmig`).
    Recovery {
        /// Which implementation.
        pair: String,
    },
}

/// The work list of one repetition, in run order.
pub fn plan(args: &Args) -> anyhow::Result<Vec<Work>> {
    let mut modes = Vec::new();
    for m in &args.modes {
        modes.push(match m.as_str() {
            "precopy" => Mode::Precopy,
            "postcopy" => Mode::Postcopy,
            _ => anyhow::bail!("unknown mode {m:?}"),
        });
    }
    for c in &args.contents {
        content(c).with_context(|| format!("unknown content {c:?}"))?;
    }
    let mut out = Vec::new();
    for case in &args.cases {
        match case.as_str() {
            "ideal" | "qemu" | "qmig" | "qemu-qmig" => {
                for c in &args.contents {
                    for &mode in &modes {
                        // The ideal pipeline has no modes: one stream either way.
                        if case == "ideal" && mode == Mode::Postcopy {
                            continue;
                        }
                        out.push(Work::Migrate {
                            pair: case.clone(),
                            content: c.clone(),
                            mode,
                        });
                    }
                }
            }
            "latency" | "latency-ideal" | "latency-qemu" | "latency-qmig" => {
                for pair in ["ideal", "qemu", "qmig"] {
                    if case.strip_prefix("latency-").is_some_and(|p| p != pair) {
                        continue;
                    }
                    for saturate in [false, true] {
                        out.push(Work::Latency {
                            pair: pair.into(),
                            saturate,
                        });
                    }
                }
            }
            "recovery" | "recovery-qemu" | "recovery-qmig" => {
                for pair in ["qemu", "qmig"] {
                    if case.strip_prefix("recovery-").is_some_and(|p| p != pair) {
                        continue;
                    }
                    out.push(Work::Recovery { pair: pair.into() });
                }
            }
            _ => anyhow::bail!("unknown case {case:?}"),
        }
    }
    Ok(out)
}

/// Binaries and cached inputs shared by the runs.
struct Env {
    size: u64,
    qemu: Option<QemuBinary>,
    src_bin: PathBuf,
    dst_bin: PathBuf,
    /// Filled source blocks for the ideal pipeline, by content name.
    ideal_src: Vec<(String, Arc<qmig_host::memory::GuestRam>)>,
}

fn sibling(name: &str) -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|e| e.parent().map(|d| d.join(name)))
        .unwrap_or_else(|| PathBuf::from(name))
}

impl Env {
    fn qemu(&self) -> Result<&QemuBinary, String> {
        self.qemu
            .as_ref()
            .ok_or_else(|| "QEMU 7.2 not found (conformance/scripts/provision-qemu.sh)".into())
    }

    fn bin(p: &Path) -> Result<&Path, String> {
        if p.is_file() {
            Ok(p)
        } else {
            Err(format!("{} not built", p.display()))
        }
    }

    fn ideal_src(&mut self, name: &str) -> Result<Arc<qmig_host::memory::GuestRam>, String> {
        if let Some((_, r)) = self.ideal_src.iter().find(|(n, _)| n == name) {
            return Ok(r.clone());
        }
        let c = content(name).ok_or("content")?;
        let r = ideal::source_ram(self.size, c).map_err(|e| e.to_string())?;
        self.ideal_src.push((name.to_string(), r.clone()));
        Ok(r)
    }

    fn qemu_source(&self, content_name: &str) -> Result<Peer, String> {
        let mut src = Peer::qemu(self.qemu()?, self.size, false)?;
        fill_through_qtest(&mut src, self.size, content(content_name).ok_or("content")?)?;
        Ok(src)
    }

    fn qmig_source(&self, content_name: &str) -> Result<Peer, String> {
        let args = vec![
            "--ram".to_string(),
            self.size.to_string(),
            "--fill".into(),
            content_name.into(),
            "--seed".into(),
            SEED.to_string(),
        ];
        Peer::qmig(Self::bin(&self.src_bin)?, &args)
    }

    fn qmig_dest(&self, profile_7_2: bool, workload: bool) -> Result<Peer, String> {
        let mut args = vec![
            "--ram".to_string(),
            self.size.to_string(),
            "--incoming".into(),
            "defer".into(),
        ];
        if profile_7_2 {
            args.extend([
                "--profile".into(),
                "7.2".into(),
                "--vmdesc".into(),
                concat!(
                    env!("CARGO_MANIFEST_DIR"),
                    "/vectors/qemu-7.2/postcopy/vmdesc.json"
                )
                .into(),
            ]);
        }
        if workload {
            args.extend(["--workload".into(), "random,threads=1".into()]);
        }
        Peer::qmig(Self::bin(&self.dst_bin)?, &args)
    }

    fn pair(&self, pair: &str, content_name: &str, workload: bool) -> Result<(Peer, Peer), String> {
        match pair {
            "qemu" => Ok((
                self.qemu_source(content_name)?,
                Peer::qemu(self.qemu()?, self.size, true)?,
            )),
            "qmig" => Ok((
                self.qmig_source(content_name)?,
                self.qmig_dest(false, workload)?,
            )),
            "qemu-qmig" => Ok((
                self.qemu_source(content_name)?,
                self.qmig_dest(true, workload)?,
            )),
            _ => Err(format!("no peers for {pair}")),
        }
    }
}

/// Writes the content into QEMU's guest RAM through qtest `b64write`, 1 MiB at a time,
/// skipping all-zero MiBs (fresh guest RAM is zero).
fn fill_through_qtest(p: &mut Peer, size: u64, c: Content) -> Result<(), String> {
    if c == Content::Zero {
        return Ok(());
    }
    let q = p.qtest().ok_or("QEMU without qtest")?;
    let mut chunk = vec![0u8; 1 << 20];
    let mut page = [0u8; 4096];
    for mib in 0..size >> 20 {
        for (i, dst) in chunk.chunks_mut(4096).enumerate() {
            qmig_host::fill::page_content(c, (mib << 8) + i as u64, &mut page);
            dst.copy_from_slice(&page);
        }
        if chunk.iter().any(|&b| b != 0) {
            q.write(mib << 20, &chunk)
                .map_err(|e| format!("qtest fill: {e}"))?;
        }
    }
    Ok(())
}

/// p50/p99/count of durations, µs, shaped like `x-qmig.fault-latency-us`.
fn summary(d: &[std::time::Duration]) -> serde_json::Value {
    let us: Vec<f64> = d.iter().map(|d| d.as_secs_f64() * 1e6).collect();
    serde_json::json!({
        "count": us.len(),
        "p50": report::quantile(&us, 0.5),
        "p99": report::quantile(&us, 0.99),
    })
}

fn run_one(env: &mut Env, w: &Work) -> Result<(Key, Sample), String> {
    match w {
        Work::Migrate {
            pair,
            content: c,
            mode,
        } => {
            let key = Key::migrate(pair, c, *mode);
            if pair == "ideal" {
                let src = env.ideal_src(c)?;
                let t = ideal::transfer(&src).map_err(|e| e.to_string())?;
                return Ok((
                    key,
                    Sample::Migrate {
                        seconds: t.seconds,
                        src_cpu: t.src_cpu,
                        dst_cpu: t.dst_cpu,
                        command:
                            "(in-process: sender thread -> loopback TCP -> UFFDIO_COPY batches)"
                                .into(),
                    },
                ));
            }
            let (mut s, mut d) = env.pair(pair, c, false)?;
            let command = format!("src: {}\ndst: {}", s.command_line(), d.command_line());
            let m = migrate::migrate(&mut s, &mut d, *mode)?;
            Ok((
                key,
                Sample::Migrate {
                    seconds: m.seconds,
                    src_cpu: m.src_cpu,
                    dst_cpu: m.dst_cpu,
                    command,
                },
            ))
        }
        Work::Latency { pair, saturate } => {
            let key = Key::latency(pair, *saturate);
            if pair == "ideal" {
                let src = env.ideal_src("random")?;
                let r = ideal::fault_round_trip(&src, RAW_TOUCHES, *saturate)
                    .map_err(|e| e.to_string())?;
                return Ok((
                    key,
                    Sample::Latency {
                        faults_us: r.samples.iter().map(|d| d.as_secs_f64() * 1e6).collect(),
                        present_us: Vec::new(),
                        reported: Some(summary(&r.fault_to_place)),
                    },
                ));
            }
            let (mut s, mut d) = env.pair(pair, "random", true)?;
            let l = migrate::postcopy_latency(&mut s, &mut d, env.size, TOUCHES, *saturate)?;
            Ok((
                key,
                Sample::Latency {
                    faults_us: l.faults_us,
                    present_us: l.present_us,
                    reported: l.reported,
                },
            ))
        }
        Work::Recovery { pair } => {
            let key = Key::recovery(pair);
            let (mut s, mut d) = env.pair(pair, "random", false)?;
            // qmig-dst has a probe access; a QEMU destination's qtest access would block the
            // main loop that must accept the recovery channel.
            let probe = (pair == "qmig").then(|| env.size - 4096);
            let r = migrate::recovery(&mut s, &mut d, probe)?;
            Ok((
                key,
                Sample::Recovery {
                    src_seconds: r.src_resume_to_active,
                    dst_seconds: r.dst_resume_to_active,
                    blocked_wait_seconds: r.blocked_access_wait,
                },
            ))
        }
    }
}

/// Runs the benchmark; prints the report to stdout. Exit code 0.
pub fn run(args: &Args) -> anyhow::Result<i32> {
    let work = plan(args)?;
    let qemu = find_qemu(QemuVersion::V7_2).map_err(|e| anyhow::anyhow!("{e}"))?;
    let mut env = Env {
        size: args.size,
        qemu,
        src_bin: args.src_bin.clone().unwrap_or_else(|| sibling("qmig-src")),
        dst_bin: args.dst_bin.clone().unwrap_or_else(|| sibling("qmig-dst")),
        ideal_src: Vec::new(),
    };
    let mut results = Results::new(args.size, args.reps, std::env::args().collect());
    let reps = args.reps.max(1);
    for rep in 0..reps {
        for w in &work {
            let label = format!("{w:?}");
            if results.skipped(w) {
                continue;
            }
            eprintln!("bench: rep {}/{reps}: {label}", rep + 1);
            match run_one(&mut env, w) {
                Ok((k, s)) => results.add(k, s),
                Err(e) => {
                    eprintln!("bench: {label} failed: {e}");
                    results.fail(w, e);
                }
            }
        }
    }
    let md = results.markdown();
    println!("{md}");
    if let Some(p) = &args.write {
        report::write_section(p, &md).with_context(|| format!("writing {}", p.display()))?;
    }
    if let Some(p) = &args.json {
        std::fs::write(p, serde_json::to_vec_pretty(&results.json())?)
            .with_context(|| format!("writing {}", p.display()))?;
    }
    Ok(0)
}
