//! `qmig verify`: decode each file completely and judge it. Exit 0 when every file is valid,
//! 1 when one breaks a rule (`FILE: offset N: RULE-ID: message`), 2 when one cannot be read.
//!
//! A main or recovery channel is valid when it decodes to its end under the profile (given, or
//! detected) with every rule the decoder enforces, its trailing VM description parses, and every
//! device payload decodes through it. Input that ends inside a record, or before EOF, is
//! invalid with [`super::TRUNCATED_RULE`]. With `--rp` the files are return-path captures.

use super::inspect::{known_blocks, rp_records, BlockArg};
use super::scan::{scan, End};
use super::{open, prepare, version_name, StreamOpts};
use qmig_protocol::device::decode_device;
use qmig_protocol::limits::Limits;
use qmig_protocol::stream::Item;
use qmig_protocol::vmdesc::VmDesc;
use qmig_protocol::{Profile, Version, Violation};
use std::path::{Path, PathBuf};

/// Arguments of `qmig verify`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// Files to check.
    #[arg(required = true)]
    pub files: Vec<PathBuf>,
    /// The files are return-path captures (bitmap sizes from `--main` when given).
    #[arg(long)]
    pub rp: bool,
    /// With `--rp`: a RAM block `NAME:BYTES` (sizes its bitmaps when `--main` is not given).
    #[arg(long, value_name = "NAME:BYTES")]
    pub block: Vec<BlockArg>,
    /// Profile, recovery channel and VM description options.
    #[command(flatten)]
    pub stream: StreamOpts,
}

/// The verdict on one file.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Verdict {
    /// Valid; the profile used.
    Valid(Version),
    /// Breaks a rule: offset, rule id, message.
    Invalid(u64, String, String),
}

fn invalid(v: Violation) -> Verdict {
    Verdict::Invalid(
        v.offset,
        v.rule.id().into(),
        format!("{} (value {})", v.rule.summary(), v.value),
    )
}

/// Checks one stream file.
pub fn check_stream(path: &Path, opts: &StreamOpts) -> anyhow::Result<Verdict> {
    let (prep, mut dec) = prepare(path, opts)?;
    let mut bad: Option<Verdict> = None;
    let desc = prep.vmdesc.clone();
    let end = scan(open(path)?, &mut dec, |d| {
        if bad.is_some() {
            return Ok(());
        }
        match d.item {
            Item::DeviceData(p) => {
                if let (Some(desc), Some(s)) = (&desc, d.dec.current_section()) {
                    if let Some(dev) = desc.device(s.idstr(), s.instance_id) {
                        if let Err(e) = decode_device(dev, p, d.at, &Limits::DEFAULT) {
                            if let Some(v) = e.violation() {
                                bad = Some(invalid(*v));
                            }
                        }
                    }
                }
            }
            Item::VmDescription(j) => {
                let at = d.at + 5;
                if let Err(e) = VmDesc::parse(j, at, &Limits::DEFAULT) {
                    if let Some(v) = e.violation() {
                        bad = Some(invalid(*v));
                    }
                }
            }
            _ => {}
        }
        Ok(())
    })?;
    Ok(match end {
        End::Invalid(v) => invalid(v),
        _ if bad.is_some() => bad.expect("checked"),
        End::Truncated {
            at, left, needed, ..
        } => Verdict::Invalid(
            at,
            super::TRUNCATED_RULE.into(),
            if left == 0 {
                "the input ends before the stream's EOF".into()
            } else {
                format!("the input ends inside the record at this offset ({left} bytes left, at least {needed} more needed)")
            },
        ),
        End::Complete { .. } => Verdict::Valid(prep.version),
    })
}

/// Checks one return-path capture.
pub fn check_rp(path: &Path, opts: &StreamOpts, block: &[BlockArg]) -> anyhow::Result<Verdict> {
    let mut version = opts.profile.map(|p| p.version()).unwrap_or(Version::V10);
    let main = match &opts.main {
        Some(m) => {
            let mo = StreamOpts {
                profile: opts.profile,
                ..StreamOpts::default()
            };
            let (prep, mut dec) = prepare(m, &mo)?;
            version = prep.version;
            scan(open(m)?, &mut dec, |_| Ok(()))?;
            dec
        }
        None => super::decoder(version, None),
    };
    let recs = rp_records(
        &path.to_path_buf(),
        Profile::for_version(version),
        &known_blocks(&main, block),
    )?;
    for r in recs {
        if r.ty == "INVALID" || r.ty == "TRUNCATED" {
            return Ok(Verdict::Invalid(
                r.offset,
                r.rule.unwrap_or_default(),
                r.detail.unwrap_or_default(),
            ));
        }
    }
    Ok(Verdict::Valid(version))
}

/// Runs `qmig verify`; returns the exit code.
pub fn run(a: &Args) -> anyhow::Result<i32> {
    let mut code = 0;
    for f in &a.files {
        let r = if a.rp {
            check_rp(f, &a.stream, &a.block)
        } else {
            check_stream(f, &a.stream)
        };
        match r {
            Ok(Verdict::Valid(v)) => {
                println!("{}: valid (profile {})", f.display(), version_name(v))
            }
            Ok(Verdict::Invalid(off, rule, msg)) => {
                println!("{}: offset {off}: {rule}: {msg}", f.display());
                code = code.max(1);
            }
            Err(e) => {
                println!("{}: unreadable: {e:#}", f.display());
                code = 2;
            }
        }
    }
    Ok(code)
}
