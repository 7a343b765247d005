//! The `qmig` command line: one module per subcommand, plus what they share.
//!
//! Owns: opening inputs (files or stdin), choosing the profile (given, or detected from the
//! content), finding the VM description (given, or the trailing one of a seekable precopy file),
//! and setting up decoders for main and recovery channels. The subcommands: [`inspect`],
//! [`extract`], [`verify`], [`diff`]; the output shapes: [`report`]. Decoding is always
//! `qmig_protocol`'s: this module only moves bytes.

pub mod diff;
pub mod extract;
pub mod image;
pub mod inspect;
pub mod record;
pub mod report;
pub mod scan;
pub mod verify;

use anyhow::Context as _;
use qmig_protocol::command::Command;
use qmig_protocol::limits::Limits;
use qmig_protocol::ram::RamBody;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use qmig_protocol::vmdesc::VmDesc;
use qmig_protocol::{Profile, Rule, Version};
use scan::{scan, End};
use std::io::Read;
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// The id `qmig` reports for input that ends inside a record or before EOF
/// ([`Rule::StreamTruncated`]): the decoder reports `Incomplete`, and deciding that no more input
/// will come is the caller's.
pub const TRUNCATED_RULE: &str = qmig_protocol::Rule::StreamTruncated.id();

/// A `--profile` value.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum ProfileArg {
    /// QEMU 7.2.
    #[value(name = "7.2")]
    V7_2,
    /// QEMU 10.0 .. 10.2.
    #[value(name = "10")]
    V10,
}

impl ProfileArg {
    /// The protocol version.
    pub fn version(self) -> Version {
        match self {
            ProfileArg::V7_2 => Version::V7_2,
            ProfileArg::V10 => Version::V10,
        }
    }
}

/// Text form of a version.
pub fn version_name(v: Version) -> &'static str {
    match v {
        Version::V7_2 => "7.2",
        _ => "10",
    }
}

/// Opens `path`, or stdin for `-`.
pub fn open(path: &Path) -> anyhow::Result<Box<dyn Read>> {
    if path == Path::new("-") {
        return Ok(Box::new(std::io::stdin().lock()));
    }
    let f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    Ok(Box::new(f))
}

/// Whether `path` is a regular file (seekable, can be read twice).
pub fn seekable(path: &Path) -> bool {
    path != Path::new("-") && std::fs::metadata(path).is_ok_and(|m| m.is_file())
}

/// Content-based profile detection, fed with the items of a main channel.
///
/// 10.x if `SWITCHOVER_START` or a `MULTIFD_FLUSH` record is seen; 7.2 if a `COMPRESS_PAGE`
/// record is seen, or if the stream reaches a point where a 10.x source sends
/// `SWITCHOVER_START` first (a RAM_DISCARD, a PACKAGED, the `ram` SECTION_END, a device
/// SECTION_FULL, or EOF) without one; undecided otherwise.
#[derive(Clone, Copy, Debug, Default)]
pub struct Detect {
    decided: Option<Version>,
}

impl Detect {
    /// Observes one item.
    pub fn item(&mut self, item: &Item<'_>, dec: &StreamDecoder) {
        if self.decided.is_some() {
            return;
        }
        self.decided = match item {
            Item::Command(Command::SwitchoverStart) => Some(Version::V10),
            Item::Ram(r) if matches!(r.body, RamBody::MultifdFlush) => Some(Version::V10),
            Item::Ram(r) if matches!(r.body, RamBody::Compressed(_)) => Some(Version::V7_2),
            Item::Command(Command::RamDiscard(_) | Command::Packaged { .. }) | Item::Eof => {
                Some(Version::V7_2)
            }
            Item::Section(h) => {
                use qmig_protocol::codes::SectionType;
                let ty = h.section_type();
                let ram = dec.current_section().is_some_and(|s| s.is_ram);
                if (ty == SectionType::END && ram) || (ty == SectionType::FULL && !ram) {
                    Some(Version::V7_2)
                } else {
                    None
                }
            }
            _ => None,
        };
    }

    /// The decision so far.
    pub fn decided(&self) -> Option<Version> {
        self.decided
    }
}

/// Rules whose violation may only mean that the stream is of the other version.
pub fn profile_rule(r: Rule) -> bool {
    matches!(
        r,
        Rule::RamFlagProfile
            | Rule::CmdUnknown
            | Rule::RpType
            | Rule::CfgCapName
            | Rule::RamZeroFill
    )
}

/// What a first pass over a channel learned.
#[derive(Clone, Debug)]
pub struct Prepared {
    /// The profile to decode with.
    pub version: Version,
    /// `option`, `detected` or `default`.
    pub source: &'static str,
    /// The VM description.
    pub vmdesc: Option<Arc<VmDesc>>,
    /// `file`, `trailing` or `none`.
    pub vmdesc_source: &'static str,
    /// The VM description's JSON text, as given.
    pub vmdesc_json: Option<Vec<u8>>,
}

/// Common options of the stream-reading subcommands.
#[derive(Clone, Debug, Default, clap::Args)]
pub struct StreamOpts {
    /// Profile of the stream's QEMU; detected from the content when not given (see
    /// `conformance/docs/inspect-json.md`).
    #[arg(long, value_enum)]
    pub profile: Option<ProfileArg>,
    /// The input is a postcopy recovery channel (no header): the main channel's sections and
    /// blocks come from `--main` (default: `stream.bin` next to the input).
    #[arg(long)]
    pub resume: bool,
    /// The main channel preceding a `--resume` input.
    #[arg(long, value_name = "FILE")]
    pub main: Option<PathBuf>,
    /// A VM description (JSON) for device layouts (default: the trailing one of a seekable
    /// precopy file).
    #[arg(long, value_name = "FILE")]
    pub vmdesc: Option<PathBuf>,
}

/// Reads a VM description file: the model and the JSON text.
pub fn load_vmdesc(path: &Path) -> anyhow::Result<(VmDesc, Vec<u8>)> {
    let json = std::fs::read(path).with_context(|| format!("{}", path.display()))?;
    let d = VmDesc::parse(&json, 0, &Limits::DEFAULT)
        .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
    Ok((d, json))
}

/// A decoder for `channel` under `version` with the VM description.
pub fn decoder(version: Version, vmdesc: Option<&Arc<VmDesc>>) -> StreamDecoder {
    let mut d = StreamDecoder::new(
        Channel::Main,
        Profile::for_version(version),
        Limits::DEFAULT,
    );
    if let Some(v) = vmdesc {
        d.set_vmdesc((**v).clone());
    }
    d
}

/// One silent pass: how it ended, the profile detection, and the decoder at the end.
fn probe(path: &Path, mut dec: StreamDecoder) -> anyhow::Result<(End, Detect, StreamDecoder)> {
    let mut det = Detect::default();
    let end = scan(open(path)?, &mut dec, |d| {
        det.item(&d.item, d.dec);
        Ok(())
    })?;
    Ok((end, det, dec))
}

/// The JSON of the VM description at the end of a seekable file: the last position `p` where
/// `EOF (0x00), 0x06, be32 n` is followed by exactly `n` bytes to the end of the file. Only the
/// tail (at most the VM description cap) is read; the JSON is validated by the caller.
pub fn trailing_vmdesc(path: &Path) -> anyhow::Result<Option<Vec<u8>>> {
    use std::io::{Seek, SeekFrom};
    let mut f = std::fs::File::open(path).with_context(|| format!("{}", path.display()))?;
    let size = f.metadata()?.len();
    let tail = size.min(Limits::DEFAULT.max_vmdesc as u64 + 6);
    f.seek(SeekFrom::Start(size - tail))?;
    let mut buf = Vec::with_capacity(tail as usize);
    f.take(tail).read_to_end(&mut buf)?;
    for p in 1..buf.len().saturating_sub(4) {
        if buf[p - 1] != 0 || buf[p] != 0x06 {
            continue;
        }
        let n = u32::from_be_bytes([buf[p + 1], buf[p + 2], buf[p + 3], buf[p + 4]]) as usize;
        if p + 5 + n == buf.len() && buf.get(p + 5) == Some(&b'{') {
            return Ok(Some(buf[p + 5..].to_vec()));
        }
    }
    Ok(None)
}

/// The main channel preceding a recovery channel at `path`.
pub fn main_for(path: &Path, opts: &StreamOpts) -> anyhow::Result<PathBuf> {
    if let Some(m) = &opts.main {
        return Ok(m.clone());
    }
    let sib = path.parent().unwrap_or(Path::new(".")).join("stream.bin");
    anyhow::ensure!(
        path != Path::new("-") && sib.is_file(),
        "--resume needs the main channel: give --main FILE"
    );
    tracing::info!("main channel for {}: {}", path.display(), sib.display());
    Ok(sib)
}

/// Chooses profile and VM description for the channel at `path` (a main channel, or with
/// `--resume` a recovery channel), and returns a decoder ready for it.
pub fn prepare(path: &Path, opts: &StreamOpts) -> anyhow::Result<(Prepared, StreamDecoder)> {
    let mut vmdesc_json = None;
    let mut vmdesc = match &opts.vmdesc {
        Some(p) => {
            let (d, j) = load_vmdesc(p)?;
            vmdesc_json = Some(j);
            Some(Arc::new(d))
        }
        None => None,
    };
    let mut vmdesc_source = if vmdesc.is_some() { "file" } else { "none" };
    if vmdesc.is_none() && !opts.resume && seekable(path) {
        if let Some(j) = trailing_vmdesc(path)? {
            if let Ok(d) = VmDesc::parse(&j, 0, &Limits::DEFAULT) {
                vmdesc = Some(Arc::new(d));
                vmdesc_json = Some(j);
                vmdesc_source = "trailing";
            }
        }
    }
    // The channel whose content decides the profile: the main one.
    let main_path = if opts.resume {
        main_for(path, opts)?
    } else {
        path.to_path_buf()
    };
    let (version, source) = match opts.profile {
        Some(p) => (p.version(), "option"),
        None if seekable(&main_path) => {
            let (end, det, _) = probe(&main_path, decoder(Version::V10, vmdesc.as_ref()))?;
            match (end, det.decided()) {
                (_, Some(v)) => (v, "detected"),
                (End::Invalid(v), None) if profile_rule(v.rule) => (Version::V7_2, "detected"),
                _ => (Version::V10, "default"),
            }
        }
        None => (Version::V10, "default"),
    };
    let dec = if opts.resume {
        let (_, _, main) = probe(&main_path, decoder(version, vmdesc.as_ref()))?;
        main.resume_from()
    } else {
        decoder(version, vmdesc.as_ref())
    };
    Ok((
        Prepared {
            version,
            source,
            vmdesc,
            vmdesc_source,
            vmdesc_json,
        },
        dec,
    ))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn trailing_vmdesc_is_found_from_the_tail_only_when_it_ends_the_file() {
        let dir = std::env::temp_dir().join(format!("qmig-cli-unit-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let f = dir.join("s.bin");
        let json = br#"{"page_size":4096,"devices":[]}"#;
        let mut b = b"QEVM\0\0\0\x03 ... \x00".to_vec();
        b.push(0x06);
        b.extend((json.len() as u32).to_be_bytes());
        b.extend(json);
        std::fs::write(&f, &b).unwrap();
        assert_eq!(trailing_vmdesc(&f).unwrap().as_deref(), Some(&json[..]));
        b.push(0);
        std::fs::write(&f, &b).unwrap();
        assert_eq!(trailing_vmdesc(&f).unwrap(), None);
        std::fs::remove_dir_all(dir).unwrap();
    }

    #[test]
    fn detection_on_the_vectors() {
        let v = Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors");
        for (name, want) in [
            ("qemu-7.2/precopy-compress", Version::V7_2),
            ("qemu-7.2/precopy-file-zero", Version::V7_2),
            ("qemu-7.2/postcopy", Version::V7_2),
            ("qemu-10.0/precopy-multifd", Version::V10),
            ("qemu-10.0/postcopy", Version::V10),
        ] {
            let (p, _) = prepare(&v.join(name).join("stream.bin"), &StreamOpts::default()).unwrap();
            assert_eq!((p.version, p.source), (want, "detected"), "{name}");
        }
    }
}
