//! `qmig conformance`: the conformance runner.
//!
//! | module | owns |
//! |---|---|
//! | [`vector`] | finding and loading vectors (`manifest.json`, any directory) |
//! | [`decode`] | decode checks with the protocol crate (captures and synthetic cases) |
//! | [`decode_recovery`] | decode check of the synthetic recovery cases (several channels) |
//! | [`decode_multifd`] | decode check of the synthetic multifd cases (main + multifd connections) |
//! | [`shim`] | the shim contract: templates, placeholders, starting a target, exit code 89 |
//! | [`replay_dst`] | replay of captured sources against a destination target |
//! | [`replay_src`] | replay against a source target: the runner plays the destination |
//! | [`play_dst`] | the played destination (decoder, `Destination` machine, the runner's books) |
//! | [`play_multifd`] | the played destination's multifd connections |
//! | [`synth_dst`] | the Destination machine of the synthetic decode checks: setup, return path, final RAM |
//! | [`synth_src`] | source-side synthetic cases: return-path bytes written to a live source |
//! | [`broken_src`] | deliberately broken sources (tamper stage between the source and the checks) |
//! | [`src_rules`] | the checks of source behaviour rules (SWITCHOVER_START, discards, urgent pages) |
//! | [`skip`] | skip lists with a reason per entry |
//! | [`report`] | results, text lines, JUnit and JSON |
//!
//! [`run_suite`] is the library entry (tests call it); [`run`] is the subcommand.

pub mod broken_src;
pub mod decode;
pub mod decode_multifd;
pub mod decode_recovery;
pub mod fault_trigger;
pub mod play_dst;
pub mod play_multifd;
pub mod replay_dst;
pub mod replay_faults;
pub mod replay_src;
pub mod report;
pub mod shim;
pub mod skip;
pub mod src_rules;
pub mod synth_dst;
pub mod synth_src;
pub mod vector;

use std::path::{Path, PathBuf};
use std::time::Instant;

use anyhow::Context;

use crate::qemu::{find_qemu, QemuVersion};
use replay_dst::{DstTarget, Verdict};
use report::{CaseResult, Status};

/// Arguments of `qmig conformance`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// A directory of vectors (repeatable; searched recursively for manifest.json).
    /// Default: the repository's conformance/vectors.
    #[arg(long = "vectors", value_name = "DIR")]
    pub vectors: Vec<PathBuf>,
    /// Destination under test: `qmig` (qmig-dst next to this binary or on PATH; the default),
    /// `qemu` (QEMU 7.2 or 10.0, matching each vector), `none` (no replay), a command-line
    /// template with placeholders (see conformance/README.md), or `broken-KIND:TARGET` (KIND
    /// `bitmap-be`, `drop-pong`, `shut-first`, `mark-all`, `interleave`, `drop-page` or
    /// `ack-resume`: TARGET with its return path or its final RAM deliberately corrupted, the
    /// suite's self-test).
    #[arg(long = "dst", value_name = "CMD")]
    pub dst: Vec<String>,
    /// Source under test: `qmig` (qmig-src next to this binary or on PATH; the default),
    /// `qemu` (QEMU 7.2 or 10.0, matching each vector; RAM written through qtest), `none` (no
    /// replay against a source), a command-line template with placeholders (see
    /// conformance/README.md), or `broken-KIND:TARGET` (KIND `resend-all` or `skip-clear`:
    /// TARGET with its recovery channel deliberately altered; `switchover-start-72`,
    /// `no-discard` or `urgent-late`: its main channel altered; the suite's self-test).
    #[arg(long = "src", value_name = "CMD")]
    pub src: Vec<String>,
    /// Skip list: `PATTERN REASON` per line.
    #[arg(long, value_name = "FILE")]
    pub skip: Option<PathBuf>,
    /// Write JUnit XML here.
    #[arg(long, value_name = "FILE")]
    pub junit: Option<PathBuf>,
    /// Write JSON results here.
    #[arg(long, value_name = "FILE")]
    pub json: Option<PathBuf>,
    /// Only cases whose name contains PATTERN (`*` globs allowed).
    #[arg(long, value_name = "PATTERN")]
    pub filter: Option<String>,
    /// Write the synthetic vectors to DIR and exit.
    #[arg(long, value_name = "DIR")]
    pub generate: Option<PathBuf>,
}

/// What to run.
#[derive(Clone, Debug, Default)]
pub struct Options {
    /// Vector directories.
    pub vectors: Vec<PathBuf>,
    /// Destination targets (empty: no replay against a destination).
    pub dst: Vec<String>,
    /// Source targets (empty: no replay against a source).
    pub src: Vec<String>,
    /// Skip entries.
    pub skips: Vec<skip::Skip>,
    /// Case-name filter.
    pub filter: Option<String>,
    /// Print each case line to stdout as it ends.
    pub print: bool,
}

/// Directory of the running executable (where `qmig-dst` is looked for first).
pub fn bin_dir() -> PathBuf {
    std::env::current_exe()
        .ok()
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(|| PathBuf::from("."))
}

/// `{BIN_DIR}` of a custom template: the directory of reference binary `name` as the `qmig`
/// target finds it (next to `qmig`, its parent when `qmig` is a test binary in `deps/`, or on
/// PATH), else `qmig`'s own directory.
fn reference_dir(name: &str) -> String {
    find_bin(name, &bin_dir())
        .and_then(|p| p.parent().map(Path::to_path_buf))
        .unwrap_or_else(bin_dir)
        .display()
        .to_string()
}

/// Finds a reference binary next to `qmig` (or `dir`), else on PATH.
pub fn find_bin(name: &str, dir: &Path) -> Option<PathBuf> {
    let mut dirs = vec![dir.to_path_buf()];
    if dir.ends_with("deps") {
        dirs.push(dir.parent()?.to_path_buf());
    }
    for d in dirs {
        let p = d.join(name);
        if p.is_file() {
            return Some(p);
        }
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(name))
            .find(|p| p.is_file())
    })
}

/// Resolves a `--dst` value for vector QEMU version `ver`.
fn dst_target(spec: &str, ver: &str) -> Result<DstTarget, String> {
    if let Some(rest) = spec.strip_prefix("broken-") {
        let (kind, inner) = rest
            .split_once(':')
            .ok_or_else(|| format!("`{spec}`: expected broken-KIND:TARGET"))?;
        let b = replay_dst::Breakage::parse(kind).ok_or_else(|| {
            let kinds: Vec<&str> = replay_dst::Breakage::ALL.iter().map(|k| k.1).collect();
            format!("`{kind}`: not one of {}", kinds.join(", "))
        })?;
        let mut t = dst_target(inner, ver)?;
        t.label = format!("broken-{kind}:{}", t.label);
        t.breakage = Some(b);
        return Ok(t);
    }
    match spec {
        "qemu" => {
            let v = if ver == "7.2" {
                QemuVersion::V7_2
            } else {
                QemuVersion::V10_0
            };
            match find_qemu(v) {
                Ok(Some(b)) => Ok(DstTarget {
                    label: "qemu".into(),
                    template: shim::QEMU_DST_TEMPLATE.into(),
                    extra: vec![("QEMU".into(), b.program.display().to_string())],
                    breakage: None,
                }),
                Ok(None) => Err(format!("QEMU {ver} is not installed")),
                Err(e) => Err(e.to_string()),
            }
        }
        "qmig" => match find_bin("qmig-dst", &bin_dir()) {
            Some(p) => Ok(DstTarget {
                label: "qmig".into(),
                template: shim::QMIG_DST_TEMPLATE.into(),
                extra: vec![(
                    "BIN_DIR".into(),
                    p.parent().unwrap_or(Path::new(".")).display().to_string(),
                )],
                breakage: None,
            }),
            None => Err("qmig-dst not found next to qmig or on PATH".into()),
        },
        t => Ok(DstTarget {
            label: "custom".into(),
            template: t.into(),
            extra: vec![("BIN_DIR".into(), reference_dir("qmig-dst"))],
            breakage: None,
        }),
    }
}

/// Resolves a `--src` value.
fn src_target(spec: &str, ver: &str) -> Result<replay_src::SrcTarget, String> {
    if let Some(rest) = spec.strip_prefix("broken-") {
        let (kind, inner) = rest
            .split_once(':')
            .ok_or_else(|| format!("`{spec}`: expected broken-KIND:TARGET"))?;
        let b = broken_src::SrcBreakage::parse(kind).ok_or_else(|| {
            let names: Vec<&str> = broken_src::KINDS.iter().map(|k| k.0).collect();
            format!("`{kind}`: not one of {}", names.join(", "))
        })?;
        let mut t = src_target(inner, ver)?;
        t.label = format!("broken-{kind}:{}", t.label);
        t.breakage = Some(b);
        return Ok(t);
    }
    match spec {
        "qmig" => match find_bin("qmig-src", &bin_dir()) {
            Some(p) => Ok(replay_src::SrcTarget {
                label: "qmig".into(),
                template: replay_src::QMIG_SRC_TEMPLATE.into(),
                extra: vec![(
                    "BIN_DIR".into(),
                    p.parent().unwrap_or(Path::new(".")).display().to_string(),
                )],
                breakage: None,
            }),
            None => Err("qmig-src not found next to qmig or on PATH".into()),
        },
        "qemu" => {
            let v = if ver == "7.2" {
                QemuVersion::V7_2
            } else {
                QemuVersion::V10_0
            };
            match find_qemu(v) {
                Ok(Some(b)) => Ok(replay_src::SrcTarget {
                    label: "qemu".into(),
                    template: replay_src::QEMU_SRC_TEMPLATE.into(),
                    extra: vec![("QEMU".into(), b.program.display().to_string())],
                    breakage: None,
                }),
                Ok(None) => Err(format!("QEMU {ver} is not installed")),
                Err(e) => Err(e.to_string()),
            }
        }
        t => Ok(replay_src::SrcTarget {
            label: "custom".into(),
            template: t.into(),
            extra: vec![("BIN_DIR".into(), reference_dir("qmig-src"))],
            breakage: None,
        }),
    }
}

fn selected(filter: &Option<String>, name: &str) -> bool {
    match filter {
        None => true,
        Some(f) if f.contains('*') => skip::glob(f, name),
        Some(f) => name.contains(f.as_str()),
    }
}

fn push(out: &mut Vec<CaseResult>, opts: &Options, r: CaseResult) {
    if opts.print {
        println!("{}", report::line(&r));
    }
    out.push(r);
}

/// Runs every selected case.
pub fn run_suite(opts: &Options) -> anyhow::Result<Vec<CaseResult>> {
    let dirs = if opts.vectors.is_empty() {
        vec![vector::default_dir()]
    } else {
        opts.vectors.clone()
    };
    let mut vectors = Vec::new();
    for d in &dirs {
        vectors.extend(vector::discover(d).with_context(|| format!("{}", d.display()))?);
    }
    let mut out = Vec::new();
    for v in &vectors {
        let name = format!("decode/{}", v.id);
        if !selected(&opts.filter, &name) {
            continue;
        }
        let t0 = Instant::now();
        let status = match skip::reason(&opts.skips, &name) {
            Some(r) => Status::Skip(r.to_string()),
            None => match decode_recovery::check(v).unwrap_or_else(|| decode::check(v)) {
                Ok(m) => Status::Pass(m),
                Err(m) => Status::Fail(m),
            },
        };
        push(
            &mut out,
            opts,
            CaseResult {
                name,
                status,
                time: t0.elapsed(),
            },
        );
    }
    replay_cases(
        &mut out,
        opts,
        &vectors,
        &opts.dst,
        "dst",
        |v| !v.replay_channels().is_empty(),
        |spec, v| match dst_target(spec, v.qemu_version()) {
            Err(e) => Status::Fail(format!("no target: {e}")),
            Ok(t) => verdict_status(replay_dst::replay(v, &t)),
        },
    );
    replay_cases(
        &mut out,
        opts,
        &vectors,
        &opts.src,
        "src",
        |v| {
            synth_src::is_source_case(v)
                || (v.synthetic().is_none() && !v.replay_channels().is_empty())
        },
        |spec, v| match src_target(spec, v.qemu_version()) {
            Err(e) => Status::Fail(format!("no target: {e}")),
            Ok(t) if synth_src::is_source_case(v) => verdict_status(synth_src::replay(v, &t)),
            Ok(t) => verdict_status(replay_src::replay(v, &t)),
        },
    );
    Ok(out)
}

/// One replay case per target spec (`none` skipped) and vector `wants`: named
/// `replay-<side>[<label>]/<vector>`, filtered, looked up in the skip list, timed.
fn replay_cases(
    out: &mut Vec<CaseResult>,
    opts: &Options,
    vectors: &[vector::Vector],
    specs: &[String],
    side: &str,
    wants: impl Fn(&vector::Vector) -> bool,
    run: impl Fn(&str, &vector::Vector) -> Status,
) {
    for spec in specs {
        if spec == "none" {
            continue;
        }
        let label = match spec.as_str() {
            "qemu" | "qmig" => spec.clone(),
            s if s.starts_with("broken-") => s.to_string(),
            _ => "custom".into(),
        };
        for v in vectors.iter().filter(|v| wants(v)) {
            let name = format!("replay-{side}[{label}]/{}", v.id);
            if !selected(&opts.filter, &name) {
                continue;
            }
            let t0 = Instant::now();
            let status = match skip::reason(&opts.skips, &name) {
                Some(r) => Status::Skip(r.to_string()),
                None => run(spec, v),
            };
            push(
                out,
                opts,
                CaseResult {
                    name,
                    status,
                    time: t0.elapsed(),
                },
            );
        }
    }
}

fn verdict_status(v: Verdict) -> Status {
    match v {
        Verdict::Pass(m) => Status::Pass(m),
        Verdict::Fail(m) => Status::Fail(m),
        Verdict::Skip(m) => Status::Skip(m),
    }
}

/// `qmig conformance`: prints one line per case and the summary; exit 0 when nothing failed.
pub fn run(a: &Args) -> anyhow::Result<i32> {
    if let Some(dir) = &a.generate {
        let n = crate::synth::generate(dir)?;
        println!("{n} files written to {}", dir.display());
        return Ok(0);
    }
    let skips = match &a.skip {
        Some(p) => skip::load(p)?,
        None => Vec::new(),
    };
    let dst = if a.dst.is_empty() {
        vec!["qmig".to_string()]
    } else {
        a.dst.clone()
    };
    let src = if a.src.is_empty() {
        vec!["qmig".to_string()]
    } else {
        a.src.clone()
    };
    let opts = Options {
        vectors: a.vectors.clone(),
        dst,
        src,
        skips,
        filter: a.filter.clone(),
        print: true,
    };
    let results = run_suite(&opts)?;
    if let Some(p) = &a.junit {
        std::fs::write(p, report::junit("qmig-conformance", &results))?;
    }
    if let Some(p) = &a.json {
        std::fs::write(
            p,
            serde_json::to_vec_pretty(&report::json("qmig-conformance", &results))?,
        )?;
    }
    println!("{}", report::summary(&results));
    Ok(if results.iter().any(CaseResult::failed) {
        1
    } else {
        0
    })
}
