//! `qmig extract`: rebuild each RAM block from a stream (plus multifd connections and a
//! postcopy recovery channel) into one raw file per block, optionally a flat image, and print
//! each file's sha256.

use super::image::{file_sha256, Image};
use super::scan::{scan, End};
use super::{open, prepare, ProfileArg, StreamOpts};
use anyhow::Context as _;
use qmig_protocol::limits::Limits;
use qmig_protocol::multifd::MultifdDecoder;
use qmig_protocol::stream::StreamDecoder;
use qmig_protocol::{Profile, Version, WireError};
use std::io::Write as _;
use std::path::{Path, PathBuf};

/// Arguments of `qmig extract`.
#[derive(Clone, Debug, clap::Args)]
pub struct Args {
    /// The main stream.
    pub file: PathBuf,
    /// Output directory (one file per RAM block, named after its idstr with `/` as `_`).
    #[arg(short = 'o', long = "output", value_name = "DIR")]
    pub out: PathBuf,
    /// Also write `flat.img`: every block concatenated in MEM_SIZE order.
    #[arg(long)]
    pub flat: bool,
    /// Multifd connection captures, applied after the main stream.
    #[arg(long, value_name = "FILE", num_args = 1..)]
    pub multifd: Vec<PathBuf>,
    /// A postcopy recovery channel continuing the stream, applied after it.
    #[arg(long, value_name = "FILE")]
    pub recovery: Option<PathBuf>,
    /// Profile (detected when not given).
    #[arg(long, value_enum)]
    pub profile: Option<ProfileArg>,
    /// VM description for device delimiting.
    #[arg(long, value_name = "FILE")]
    pub vmdesc: Option<PathBuf>,
}

/// One extracted file: path and sha256.
#[derive(Clone, Debug)]
pub struct Extracted {
    /// Block idstr (`flat` for the flat image).
    pub name: String,
    /// The file.
    pub path: PathBuf,
    /// Its sha256.
    pub sha256: String,
}

/// Rebuilds the blocks of `file` into `out`; returns the image and how each channel ended.
pub fn rebuild(
    file: &Path,
    opts: &StreamOpts,
    multifd: &[PathBuf],
    recovery: Option<&Path>,
    out: &Path,
) -> anyhow::Result<(Image, Version, Vec<End>)> {
    let (prep, mut dec) = prepare(file, opts)?;
    let profile = Profile::for_version(prep.version);
    let mut img = Image::new(out, profile.target_page_size as u64)?;
    let mut ends = Vec::new();
    let feed = |dec: &mut StreamDecoder, path: &Path, img: &mut Image| {
        scan(open(path)?, dec, |d| {
            let block = if let qmig_protocol::stream::Item::Ram(r) = &d.item {
                r.block(d.dec.ram())
            } else {
                None
            };
            img.apply(&d.item, block, d.at)
                .with_context(|| format!("{}: offset {}", path.display(), d.at))
        })
    };
    ends.push(feed(&mut dec, file, &mut img)?);
    if let Some(r) = recovery {
        let mut rdec = dec.resume_from();
        ends.push(feed(&mut rdec, r, &mut img)?);
    }
    for m in multifd {
        let bytes = std::fs::read(m).with_context(|| format!("{}", m.display()))?;
        let mut md = MultifdDecoder::new(profile, Limits::DEFAULT);
        let mut pos = 0;
        loop {
            match md.decode(&bytes[pos..]) {
                Ok((item, n)) => {
                    img.apply_multifd(&item)?;
                    pos += n;
                }
                Err(WireError::Incomplete { .. }) => break,
                Err(WireError::Invalid(v)) => {
                    anyhow::bail!("{}: {v}", m.display())
                }
            }
        }
    }
    Ok((img, prep.version, ends))
}

/// Runs `qmig extract`; returns the exit code.
pub fn run(a: &Args) -> anyhow::Result<i32> {
    let opts = StreamOpts {
        profile: a.profile,
        vmdesc: a.vmdesc.clone(),
        ..StreamOpts::default()
    };
    let (img, _, ends) = rebuild(&a.file, &opts, &a.multifd, a.recovery.as_deref(), &a.out)?;
    let mut files = Vec::new();
    for b in &img.blocks {
        files.push(Extracted {
            name: b.name.clone(),
            path: b.path.clone(),
            sha256: file_sha256(&b.path)?,
        });
    }
    if a.flat {
        let path = img.dir().join("flat.img");
        let mut f = std::fs::File::create(&path)?;
        for b in &img.blocks {
            std::io::copy(&mut std::fs::File::open(&b.path)?, &mut f)?;
        }
        files.push(Extracted {
            name: "flat".into(),
            path: path.clone(),
            sha256: file_sha256(&path)?,
        });
    }
    let stdout = std::io::stdout();
    let mut o = stdout.lock();
    for f in &files {
        writeln!(o, "{}  {}  {}", f.sha256, f.path.display(), f.name)?;
    }
    let mut code = 0;
    for e in ends {
        match e {
            End::Complete { .. } => {}
            End::Truncated { at, .. } => {
                tracing::warn!("input truncated at offset {at}: blocks hold what came before")
            }
            End::Invalid(v) => {
                eprintln!("{}: {v}", a.file.display());
                code = 1;
            }
        }
    }
    Ok(code)
}
