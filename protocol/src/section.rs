//! Section headers and footers.
//!
//! This module owns the framing of the four section kinds: `SECTION_START` / `SECTION_FULL`
//! (type, be32 section id, str8 idstr, be32 instance id, be32 version id) and `SECTION_PART` /
//! `SECTION_END` (type, be32 section id), and the section footer (`0x7E`, be32 section id). What
//! lies between header and footer (RAM records, device state) belongs to [`crate::ram`] and
//! [`crate::device`]; tying ids to sections is the job of [`crate::stream`].

use crate::codes::SectionType;
use crate::error::{WireError, WireResult};
use crate::reader::Reader;
use crate::rule::Rule;
use crate::sink::Sink;

/// A decoded section header.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum SectionHeader<'a> {
    /// `SECTION_START`: first part of an iterative device.
    Start(SectionIdent<'a>),
    /// `SECTION_FULL`: the whole state of a non-iterative device.
    Full(SectionIdent<'a>),
    /// `SECTION_PART`: a middle part of a section opened by START.
    Part {
        /// The section id given by START.
        section_id: u32,
    },
    /// `SECTION_END`: the last part of a section opened by START.
    End {
        /// The section id given by START.
        section_id: u32,
    },
}

/// The identity carried by START and FULL headers.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct SectionIdent<'a> {
    /// The source's section id (its registration index; sparse).
    pub section_id: u32,
    /// The device's idstr, e.g. `ram`, `timer`.
    pub idstr: &'a [u8],
    /// The device instance.
    pub instance_id: u32,
    /// The device's state version.
    pub version_id: u32,
}

impl<'a> SectionHeader<'a> {
    /// The type byte.
    pub const fn section_type(&self) -> SectionType {
        match self {
            SectionHeader::Start(_) => SectionType::START,
            SectionHeader::Full(_) => SectionType::FULL,
            SectionHeader::Part { .. } => SectionType::PART,
            SectionHeader::End { .. } => SectionType::END,
        }
    }

    /// The section id.
    pub const fn section_id(&self) -> u32 {
        match self {
            SectionHeader::Start(i) | SectionHeader::Full(i) => i.section_id,
            SectionHeader::Part { section_id } | SectionHeader::End { section_id } => *section_id,
        }
    }

    /// The identity, for START and FULL.
    pub const fn ident(&self) -> Option<&SectionIdent<'a>> {
        match self {
            SectionHeader::Start(i) | SectionHeader::Full(i) => Some(i),
            _ => None,
        }
    }

    /// Writes the header exactly.
    pub fn encode(&self, out: &mut impl Sink) {
        out.put_u8(self.section_type().0);
        out.put_be32(self.section_id());
        if let Some(i) = self.ident() {
            out.put_str8(i.idstr);
            out.put_be32(i.instance_id);
            out.put_be32(i.version_id);
        }
    }
}

/// Reads a section header starting at its type byte.
///
/// A type byte other than START/PART/END/FULL breaks [`Rule::SecType`] (value: the byte); an empty
/// idstr breaks [`Rule::Str8Empty`].
pub fn decode_section_header<'a>(r: &mut Reader<'a>) -> WireResult<SectionHeader<'a>> {
    let at = r.offset();
    let mut p = r.clone();
    let ty = SectionType(p.u8()?);
    let section_id = p.be32()?;
    let h = match ty {
        SectionType::START | SectionType::FULL => {
            let idstr = p.str8()?;
            let instance_id = p.be32()?;
            let version_id = p.be32()?;
            let ident = SectionIdent {
                section_id,
                idstr,
                instance_id,
                version_id,
            };
            if ty == SectionType::START {
                SectionHeader::Start(ident)
            } else {
                SectionHeader::Full(ident)
            }
        }
        SectionType::PART => SectionHeader::Part { section_id },
        SectionType::END => SectionHeader::End { section_id },
        _ => return Err(WireError::invalid(at, Rule::SecType, ty.0 as u64)),
    };
    *r = p;
    Ok(h)
}

/// Length of an encoded footer.
pub const FOOTER_LEN: usize = 5;

/// Reads a section footer and checks it against `expected_id`.
///
/// A first byte other than `0x7E` breaks [`Rule::SecFooter`] (value: the byte); a different id
/// breaks [`Rule::SecFooterId`] (offset of the id field, value: the id read).
pub fn decode_footer(r: &mut Reader<'_>, expected_id: u32) -> WireResult<u32> {
    let at = r.offset();
    let mut p = r.clone();
    let b = p.u8()?;
    if b != SectionType::FOOTER.0 {
        return Err(WireError::invalid(at, Rule::SecFooter, b as u64));
    }
    let id = p.be32()?;
    if id != expected_id {
        return Err(WireError::invalid(at + 1, Rule::SecFooterId, id as u64));
    }
    *r = p;
    Ok(id)
}

/// Writes a section footer.
pub fn encode_footer(section_id: u32, out: &mut impl Sink) {
    out.put_u8(SectionType::FOOTER.0);
    out.put_be32(section_id);
}

/// The footer bytes of a section, for scanning.
pub const fn footer_bytes(section_id: u32) -> [u8; FOOTER_LEN] {
    let b = section_id.to_be_bytes();
    [SectionType::FOOTER.0, b[0], b[1], b[2], b[3]]
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    #[test]
    fn headers_round_trip() {
        let hs = [
            SectionHeader::Start(SectionIdent {
                section_id: 2,
                idstr: b"ram",
                instance_id: 0,
                version_id: 4,
            }),
            SectionHeader::Full(SectionIdent {
                section_id: 40,
                idstr: b"globalstate",
                instance_id: 0,
                version_id: 1,
            }),
            SectionHeader::Part { section_id: 2 },
            SectionHeader::End { section_id: 2 },
        ];
        for h in hs {
            let mut out = Vec::new();
            h.encode(&mut out);
            let mut r = Reader::new(&out, 10);
            assert_eq!(decode_section_header(&mut r), Ok(h));
            assert_eq!(r.consumed(), out.len());
            for cut in 0..out.len() {
                assert!(decode_section_header(&mut Reader::new(&out[..cut], 10))
                    .unwrap_err()
                    .is_incomplete());
            }
        }
        assert_eq!(
            decode_section_header(&mut Reader::new(&[5, 0, 0, 0, 0], 3)),
            Err(WireError::invalid(3, Rule::SecType, 5))
        );
    }

    #[test]
    fn footer_checks() {
        let mut out = Vec::new();
        encode_footer(7, &mut out);
        assert_eq!(out, footer_bytes(7));
        assert_eq!(decode_footer(&mut Reader::new(&out, 0), 7), Ok(7));
        assert_eq!(
            decode_footer(&mut Reader::new(&out, 100), 8),
            Err(WireError::invalid(101, Rule::SecFooterId, 7))
        );
        assert_eq!(
            decode_footer(&mut Reader::new(&[0x7d, 0, 0, 0, 7], 0), 7),
            Err(WireError::invalid(0, Rule::SecFooter, 0x7d))
        );
    }
}
