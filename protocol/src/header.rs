//! The stream header and the configuration section.
//!
//! This module owns the first bytes of a main channel: the be32 magic `QEVM` and the be32 stream
//! version ([`decode_header`], [`encode_header`]), and the configuration section that follows
//! (`0x07`, be32 length + machine name, then optional subsections
//! `configuration/target-page-bits`, `configuration/capabilities`, `configuration/uuid`):
//! [`decode_configuration`], [`Configuration`], [`ConfigSubsection`].
//!
//! A decoded [`Configuration`] borrows the machine name and the raw subsection bytes from the
//! input, so that [`Configuration::encode`] re-creates the exact bytes; the subsections were
//! validated while decoding and are walked again on demand by [`Configuration::subsections`].

use crate::codes::{SectionType, QEVM_MAGIC, QEVM_VERSION};
use crate::error::{WireError, WireResult};
use crate::limits::Limits;
use crate::profile::{Profile, Version};
use crate::reader::Reader;
use crate::rule::Rule;
use crate::sink::Sink;

/// Name of the target-page-bits subsection.
pub const SUB_TARGET_PAGE_BITS: &[u8] = b"configuration/target-page-bits";
/// Name of the capabilities subsection.
pub const SUB_CAPABILITIES: &[u8] = b"configuration/capabilities";
/// Name of the uuid subsection.
pub const SUB_UUID: &[u8] = b"configuration/uuid";
/// The prefix every configuration subsection name starts with (the parent's vmsd name).
pub const CONFIGURATION_PREFIX: &[u8] = b"configuration";
/// The subsection marker byte (`QEMU_VM_SUBSECTION`).
pub const SUBSECTION_MARKER: u8 = 0x05;

/// Reads the stream header (be32 magic, be32 version) and returns the version.
///
/// A wrong magic breaks [`Rule::HdrMagic`]; any version but 3 breaks [`Rule::HdrVersion`].
pub fn decode_header(r: &mut Reader<'_>) -> WireResult<u32> {
    let at = r.offset();
    let mut probe = r.clone();
    let magic = probe.be32()?;
    if magic != QEVM_MAGIC {
        return Err(WireError::invalid(at, Rule::HdrMagic, magic as u64));
    }
    let version = probe.be32()?;
    if version != QEVM_VERSION {
        return Err(WireError::invalid(at + 4, Rule::HdrVersion, version as u64));
    }
    *r = probe;
    Ok(version)
}

/// Writes the stream header with `version` (normally [`QEVM_VERSION`]).
pub fn encode_header(version: u32, out: &mut impl Sink) {
    out.put_be32(QEVM_MAGIC);
    out.put_be32(version);
}

/// The configuration section: machine name and raw (validated) subsections.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Configuration<'a> {
    /// The machine type name as sent (no NUL), e.g. `pc-i440fx-7.2`, `none`.
    pub name: &'a [u8],
    /// The subsection bytes exactly as on the wire (possibly empty).
    pub raw_subsections: &'a [u8],
}

/// One configuration subsection.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ConfigSubsection<'a> {
    /// `configuration/target-page-bits`: the source's target page bits.
    TargetPageBits(u32),
    /// `configuration/capabilities`: the validated capabilities that are on at the source.
    Capabilities(Capabilities<'a>),
    /// `configuration/uuid`: the source's 16-byte UUID.
    Uuid(&'a [u8; 16]),
}

/// The capability list of `configuration/capabilities`: a count and that many str8 names.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Capabilities<'a> {
    count: u32,
    raw: &'a [u8],
}

impl<'a> Capabilities<'a> {
    /// Number of names.
    pub fn count(&self) -> u32 {
        self.count
    }

    /// The names, in wire order.
    pub fn iter(&self) -> impl Iterator<Item = &'a [u8]> + 'a {
        let mut r = Reader::new(self.raw, 0);
        let mut left = self.count;
        core::iter::from_fn(move || {
            if left == 0 {
                return None;
            }
            left -= 1;
            r.str8().ok()
        })
    }

    /// Whether `name` is listed.
    pub fn contains(&self, name: &[u8]) -> bool {
        self.iter().any(|n| n == name)
    }
}

impl<'a> Configuration<'a> {
    /// The subsections, in wire order (already validated while decoding).
    pub fn subsections(&self) -> impl Iterator<Item = ConfigSubsection<'a>> + 'a {
        let mut r = Reader::new(self.raw_subsections, 0);
        core::iter::from_fn(move || {
            if r.remaining() == 0 {
                return None;
            }
            decode_subsection(
                &mut r,
                &Limits {
                    max_capabilities: u32::MAX,
                    ..Limits::DEFAULT
                },
            )
            .ok()
        })
    }

    /// The capability list, if the subsection is present.
    pub fn capabilities(&self) -> Option<Capabilities<'a>> {
        self.subsections().find_map(|s| match s {
            ConfigSubsection::Capabilities(c) => Some(c),
            _ => None,
        })
    }

    /// Whether the source announced capability `name` (e.g. `x-ignore-shared`).
    pub fn has_capability(&self, name: &[u8]) -> bool {
        self.capabilities().is_some_and(|c| c.contains(name))
    }

    /// Writes the section exactly: `0x07`, be32 name length, name, raw subsections.
    pub fn encode(&self, out: &mut impl Sink) {
        out.put_u8(SectionType::CONFIGURATION.0);
        out.put_be32(self.name.len() as u32);
        out.put(self.name);
        out.put(self.raw_subsections);
    }
}

impl ConfigSubsection<'_> {
    /// The subsection's name on the wire.
    pub fn name(&self) -> &'static [u8] {
        match self {
            ConfigSubsection::TargetPageBits(_) => SUB_TARGET_PAGE_BITS,
            ConfigSubsection::Capabilities(_) => SUB_CAPABILITIES,
            ConfigSubsection::Uuid(_) => SUB_UUID,
        }
    }

    /// Writes the subsection: `0x05`, str8 name, be32 version 1, body.
    pub fn encode(&self, out: &mut impl Sink) {
        out.put_u8(SUBSECTION_MARKER);
        out.put_str8(self.name());
        out.put_be32(1);
        match self {
            ConfigSubsection::TargetPageBits(b) => out.put_be32(*b),
            ConfigSubsection::Capabilities(c) => {
                out.put_be32(c.count);
                out.put(c.raw);
            }
            ConfigSubsection::Uuid(u) => out.put(&u[..]),
        }
    }
}

/// Writes a capability list body for [`ConfigSubsection::Capabilities`] from names; returns the
/// subsection. `buf` receives the str8 names and must outlive the result.
pub fn capabilities_from<'b>(names: &[&[u8]], buf: &'b mut [u8]) -> Option<Capabilities<'b>> {
    let mut sink = crate::sink::SliceSink::new(buf);
    for n in names {
        if n.is_empty() || n.len() > 255 {
            return None;
        }
        sink.put_str8(n);
    }
    if !sink.fits() {
        return None;
    }
    let len = sink.len();
    Some(Capabilities {
        count: names.len() as u32,
        raw: &buf[..len],
    })
}

/// Writes a whole configuration section from a machine name and subsections.
pub fn encode_configuration(
    name: &[u8],
    subsections: &[ConfigSubsection<'_>],
    out: &mut impl Sink,
) {
    out.put_u8(SectionType::CONFIGURATION.0);
    out.put_be32(name.len() as u32);
    out.put(name);
    for s in subsections {
        s.encode(out);
    }
}

/// Migration capability names QEMU 7.2 knows (`MigrationCapability`).
const CAPS_7_2: &[&[u8]] = &[
    b"xbzrle",
    b"rdma-pin-all",
    b"auto-converge",
    b"zero-blocks",
    b"compress",
    b"events",
    b"postcopy-ram",
    b"x-colo",
    b"release-ram",
    b"block",
    b"return-path",
    b"pause-before-switchover",
    b"multifd",
    b"dirty-bitmaps",
    b"postcopy-blocktime",
    b"late-block-activate",
    b"x-ignore-shared",
    b"validate-uuid",
    b"background-snapshot",
    b"zero-copy-send",
    b"postcopy-preempt",
];

/// Capability names added after 7.2 and known to 10.x.
const CAPS_ADDED_10: &[&[u8]] = &[b"switchover-ack", b"dirty-limit", b"mapped-ram"];
/// Capability names 10.x no longer knows (removed in 9.1 with compression and block migration).
const CAPS_REMOVED_10: &[&[u8]] = &[b"compress", b"block"];

/// Whether a capability name is one the profile's QEMU version knows. (A receiver maps each
/// name to its capability enum and rejects unknown ones.)
pub fn known_capability(version: Version, name: &[u8]) -> bool {
    match version {
        Version::V7_2 => CAPS_7_2.contains(&name),
        Version::V10 => {
            (CAPS_7_2.contains(&name) && !CAPS_REMOVED_10.contains(&name))
                || CAPS_ADDED_10.contains(&name)
        }
    }
}

/// Checks every capability name of a decoded configuration section that started at channel
/// offset `at` against `profile` ([`Rule::CfgCapName`], at the name's length byte).
pub fn check_capability_names(c: &Configuration<'_>, at: u64, profile: &Profile) -> WireResult<()> {
    let base = at + 1 + 4 + c.name.len() as u64;
    let mut r = Reader::new(c.raw_subsections, base);
    while r.remaining() > 0 {
        r.u8()?;
        let name = r.str8()?;
        r.be32()?;
        match name {
            SUB_TARGET_PAGE_BITS => {
                r.be32()?;
            }
            SUB_UUID => {
                r.skip(16)?;
            }
            _ => {
                let count = r.be32()?;
                for _ in 0..count {
                    let name_at = r.offset();
                    let cap = r.str8()?;
                    if !known_capability(profile.version, cap) {
                        return Err(WireError::invalid(
                            name_at,
                            Rule::CfgCapName,
                            cap.len() as u64,
                        ));
                    }
                }
            }
        }
    }
    Ok(())
}

fn decode_subsection<'a>(r: &mut Reader<'a>, limits: &Limits) -> WireResult<ConfigSubsection<'a>> {
    let marker_at = r.offset();
    let marker = r.u8()?;
    if marker != SUBSECTION_MARKER {
        return Err(WireError::invalid(
            marker_at,
            Rule::CfgSubsection,
            marker as u64,
        ));
    }
    let name_at = r.offset();
    let name = r.str8()?;
    let version_at = r.offset();
    let version = r.be32()?;
    let sub = match name {
        SUB_TARGET_PAGE_BITS => ConfigSubsection::TargetPageBits(r.be32()?),
        SUB_CAPABILITIES => {
            let count_at = r.offset();
            let count = r.be32()?;
            if count > limits.max_capabilities {
                return Err(WireError::invalid(
                    count_at,
                    Rule::CfgCapsCount,
                    count as u64,
                ));
            }
            let start = r.rest();
            let before = r.consumed();
            for _ in 0..count {
                r.str8()?;
            }
            let raw = &start[..r.consumed() - before];
            ConfigSubsection::Capabilities(Capabilities { count, raw })
        }
        SUB_UUID => ConfigSubsection::Uuid(r.array::<16>()?),
        _ => {
            return Err(WireError::invalid(
                name_at,
                Rule::CfgSubsection,
                name.len() as u64,
            ))
        }
    };
    if version != 1 {
        return Err(WireError::invalid(
            version_at,
            Rule::CfgSubsection,
            version as u64,
        ));
    }
    Ok(sub)
}

/// Reads the configuration section, starting at its `0x07` type byte.
///
/// A different first byte breaks [`Rule::CfgPresent`]; a name length outside
/// `1..=limits.max_machine_name` breaks [`Rule::CfgNameLen`]. Subsections follow while the next
/// byte is `0x05` and the name starts with `configuration`; an unknown one, or a version other
/// than 1, breaks [`Rule::CfgSubsection`]. Whether another subsection follows can only be told
/// from the next byte, so at the end of the input this returns `Incomplete` unless `is_final`.
pub fn decode_configuration<'a>(
    r: &mut Reader<'a>,
    limits: &Limits,
    is_final: bool,
) -> WireResult<Configuration<'a>> {
    let at = r.offset();
    let mut p = r.clone();
    let ty = p.u8()?;
    if ty != SectionType::CONFIGURATION.0 {
        return Err(WireError::invalid(at, Rule::CfgPresent, ty as u64));
    }
    let len_at = p.offset();
    let len = p.be32()?;
    if len == 0 || len > limits.max_machine_name {
        return Err(WireError::invalid(len_at, Rule::CfgNameLen, len as u64));
    }
    let name = p.take(len as usize)?;
    let subs_start = p.rest();
    let before = p.consumed();
    loop {
        if p.remaining() == 0 {
            if is_final {
                break;
            }
            return Err(WireError::Incomplete { needed: 1 });
        }
        if p.peek_u8()? != SUBSECTION_MARKER {
            break;
        }
        // A subsection whose name lacks the parent's prefix ends the list (it is not ours).
        let mut look = p.clone();
        look.u8()?;
        let name_len = look.peek_u8()? as usize;
        let avail = look.rest();
        if avail.len() < 1 + name_len.min(CONFIGURATION_PREFIX.len()) {
            return Err(WireError::Incomplete {
                needed: 1 + name_len.min(CONFIGURATION_PREFIX.len()) - avail.len(),
            });
        }
        if name_len < CONFIGURATION_PREFIX.len() || !avail[1..].starts_with(CONFIGURATION_PREFIX) {
            break;
        }
        decode_subsection(&mut p, limits)?;
    }
    let raw_subsections = &subs_start[..p.consumed() - before];
    *r = p;
    Ok(Configuration {
        name,
        raw_subsections,
    })
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;

    #[test]
    fn header_round_trip_and_errors() {
        let bytes = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3];
        let mut r = Reader::new(&bytes, 0);
        assert_eq!(decode_header(&mut r), Ok(3));
        let mut out = alloc::vec::Vec::new();
        encode_header(3, &mut out);
        assert_eq!(out, bytes);
        let bad = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 2];
        assert_eq!(
            decode_header(&mut Reader::new(&bad, 0)),
            Err(WireError::invalid(4, Rule::HdrVersion, 2))
        );
        assert_eq!(
            decode_header(&mut Reader::new(b"QEV", 0)),
            Err(WireError::Incomplete { needed: 1 })
        );
    }

    #[test]
    fn configuration_needs_the_next_byte() {
        let bytes = [7, 0, 0, 0, 4, b'n', b'o', b'n', b'e'];
        let mut r = Reader::new(&bytes, 8);
        assert_eq!(
            decode_configuration(&mut r, &Limits::DEFAULT, false),
            Err(WireError::Incomplete { needed: 1 })
        );
        let c = decode_configuration(&mut r, &Limits::DEFAULT, true).unwrap();
        assert_eq!(c.name, b"none");
        let mut with_next = bytes.to_vec();
        with_next.push(8);
        let mut r = Reader::new(&with_next, 8);
        let c = decode_configuration(&mut r, &Limits::DEFAULT, false).unwrap();
        assert_eq!(r.consumed(), 9);
        let mut out = alloc::vec::Vec::new();
        c.encode(&mut out);
        assert_eq!(out, bytes);
    }

    #[test]
    fn subsections_round_trip() {
        let mut buf = [0u8; 64];
        let caps = capabilities_from(&[b"x-ignore-shared"], &mut buf).unwrap();
        let uuid = [7u8; 16];
        let subs = [
            ConfigSubsection::Capabilities(caps),
            ConfigSubsection::Uuid(&uuid),
        ];
        let mut out = alloc::vec::Vec::new();
        encode_configuration(b"pc", &subs, &mut out);
        let mut r = Reader::new(&out, 0);
        let c = decode_configuration(&mut r, &Limits::DEFAULT, true).unwrap();
        assert!(c.has_capability(b"x-ignore-shared"));
        let got: alloc::vec::Vec<_> = c.subsections().collect();
        assert_eq!(got, subs);
        let mut again = alloc::vec::Vec::new();
        c.encode(&mut again);
        assert_eq!(again, out);
    }

    #[test]
    fn capability_names_by_profile() {
        let mut buf = [0u8; 64];
        let caps = capabilities_from(&[b"x-ignore-shared", b"compress"], &mut buf).unwrap();
        let mut out = alloc::vec::Vec::new();
        encode_configuration(b"pc", &[ConfigSubsection::Capabilities(caps)], &mut out);
        let c = decode_configuration(&mut Reader::new(&out, 8), &Limits::DEFAULT, true).unwrap();
        assert_eq!(check_capability_names(&c, 8, &Profile::QEMU_7_2), Ok(()));
        // "compress" is the second name: at 8 + 7 (name "pc") + 1 + 27 + 4 + 4 + 16.
        assert_eq!(
            check_capability_names(&c, 8, &Profile::QEMU_10),
            Err(WireError::invalid(67, Rule::CfgCapName, 8))
        );
        assert!(known_capability(Version::V10, b"mapped-ram"));
        assert!(!known_capability(Version::V7_2, b"mapped-ram"));
    }

    #[test]
    fn unknown_subsection_and_caps_cap() {
        let mut out = alloc::vec::Vec::new();
        encode_configuration(b"pc", &[], &mut out);
        out.push(5);
        out.put_str8(b"configuration/zzz");
        out.put_be32(1);
        let e = decode_configuration(&mut Reader::new(&out, 0), &Limits::DEFAULT, true);
        assert_eq!(e, Err(WireError::invalid(8, Rule::CfgSubsection, 17)));
        let mut out = alloc::vec::Vec::new();
        encode_configuration(b"pc", &[], &mut out);
        out.push(5);
        out.put_str8(SUB_CAPABILITIES);
        out.put_be32(1);
        out.put_be32(65);
        let e = decode_configuration(&mut Reader::new(&out, 0), &Limits::DEFAULT, true);
        assert_eq!(e, Err(WireError::invalid(39, Rule::CfgCapsCount, 65)));
    }
}
