//! The top level of a channel: which item a type byte starts (section header, command, EOF,
//! misplaced bytes), the section table that START/FULL headers fill and PART/END consult, the
//! receiver's optional device table, and the PACKAGED boundary a command opens.

use super::{Channel, Item, Phase, SectionInfo, StreamDecoder};
use crate::codes::{CommandCode, SectionType, QEVM_MAGIC};
use crate::command::{decode_command, Command};
use crate::error::{WireError, WireResult};
use crate::reader::Reader;
use crate::rule::Rule;
use crate::section::{decode_section_header, SectionHeader};

impl StreamDecoder {
    /// SM-RECOVER-NO-HEADER: a recovery channel's first record is `RECV_BITMAP`: its first
    /// three bytes are the command type byte and code 10. Anything else (the `QEVM` header
    /// of a new stream, a section, another command) is rejected at offset 0.
    fn check_recovery_start(&self, input: &[u8]) -> WireResult<()> {
        let mut r = Reader::new(input, 0);
        let ty = r.u8()?;
        if SectionType(ty) != SectionType::COMMAND {
            return Err(WireError::invalid(0, Rule::SmRecoverNoHeader, ty as u64));
        }
        let code = r.be16()?;
        if CommandCode(code) != CommandCode::RECV_BITMAP {
            return Err(WireError::invalid(0, Rule::SmRecoverNoHeader, code as u64));
        }
        Ok(())
    }

    pub(super) fn decode_top<'a>(&mut self, input: &'a [u8]) -> WireResult<(Item<'a>, usize)> {
        let at = self.offset;
        let mut r = Reader::new(input, at);
        if at == 0 && self.channel == Channel::Resume {
            self.check_recovery_start(input)?;
        }
        let ty = SectionType(r.peek_u8()?);
        let item = match ty {
            SectionType::EOF => {
                if self.in_package() {
                    return Err(WireError::invalid(at, Rule::CmdPackagedContent, 0));
                }
                r.u8()?;
                self.phase = Phase::AfterEof;
                Item::Eof
            }
            SectionType::START | SectionType::FULL | SectionType::PART | SectionType::END => {
                let h = decode_section_header(&mut r)?;
                let info = self.bind_section(at, &h)?;
                self.phase = if info.is_ram {
                    Phase::Ram {
                        section_id: info.section_id,
                        start: matches!(h, SectionHeader::Start(_)),
                    }
                } else {
                    Phase::Device {
                        section_id: info.section_id,
                    }
                };
                self.current = Some(info);
                Item::Section(h)
            }
            SectionType::COMMAND => {
                r.u8()?;
                let c = decode_command(&mut r, &self.profile, &self.limits)?;
                match c {
                    Command::Packaged { len } => {
                        if self.in_package() {
                            return Err(WireError::invalid(at, Rule::CmdPackagedContent, 7));
                        }
                        self.package_end = Some(r.offset() + len as u64);
                    }
                    Command::PostcopyListen => self.postcopy = true,
                    Command::PostcopyAdvise(Some(_)) => self.advised = true,
                    _ => {}
                }
                Item::Command(c)
            }
            SectionType::SUBSECTION => {
                return Err(WireError::invalid(at, Rule::SecSubsectionTop, ty.0 as u64))
            }
            SectionType::VMDESCRIPTION => {
                return Err(WireError::invalid(at, Rule::VmdescPlace, ty.0 as u64))
            }
            _ => {
                if self.in_package() {
                    // Whether the bytes are a header decides the rule, so a prefix of the
                    // magic waits for the rest (the same rule for any chunking), unless the
                    // input is all there is (the channel's or the package's end).
                    let magic = QEVM_MAGIC.to_be_bytes();
                    let n = input.len().min(magic.len());
                    let at_end = self.is_final
                        || self
                            .package_end
                            .is_some_and(|end| at + input.len() as u64 >= end);
                    if n < magic.len() && input[..n] == magic[..n] && !at_end {
                        return Err(WireError::Incomplete {
                            needed: magic.len() - n,
                        });
                    }
                    let looks_like_header = input.len() >= 4 && input[..4] == magic;
                    if ty == SectionType::CONFIGURATION || looks_like_header {
                        return Err(WireError::invalid(
                            at,
                            Rule::CmdPackagedContent,
                            ty.0 as u64,
                        ));
                    }
                }
                return Err(WireError::invalid(at, Rule::SecType, ty.0 as u64));
            }
        };
        let n = r.consumed();
        self.offset += n as u64;
        Ok((item, n))
    }

    /// Resolves a section header against the table; START/FULL bind or re-bind the id.
    fn bind_section(&mut self, at: u64, h: &SectionHeader<'_>) -> WireResult<SectionInfo> {
        match h {
            SectionHeader::Start(i) | SectionHeader::Full(i) => {
                let version_at = at + 1 + 4 + 1 + i.idstr.len() as u64 + 4;
                #[cfg(feature = "alloc")]
                if let Some(known) = &self.known_devices {
                    match known
                        .iter()
                        .find(|(n, inst, _)| n == i.idstr && *inst == i.instance_id)
                    {
                        None => {
                            return Err(WireError::invalid(
                                at + 5,
                                Rule::SecUnknownDevice,
                                i.instance_id as u64,
                            ))
                        }
                        Some((_, _, v)) if i.version_id > *v => {
                            return Err(WireError::invalid(
                                version_at,
                                Rule::SecVersion,
                                i.version_id as u64,
                            ))
                        }
                        Some(_) => {}
                    }
                }
                if i.idstr == b"ram" && i.version_id != 4 {
                    return Err(WireError::invalid(
                        version_at,
                        Rule::RamVersion,
                        i.version_id as u64,
                    ));
                }
                let bound = self
                    .sections
                    .iter()
                    .find(|s| s.section_id == i.section_id)
                    .copied();
                if let Some(mut s) = bound {
                    if s.idstr() != i.idstr || s.instance_id != i.instance_id {
                        return Err(WireError::invalid(
                            at + 1,
                            Rule::SecDuplicateId,
                            i.section_id as u64,
                        ));
                    }
                    if s.version_id != i.version_id {
                        s.version_id = i.version_id;
                        self.sections.replace(s, |e| e.section_id == i.section_id);
                    }
                    return Ok(s);
                }
                // A receiver has at most `max_sections` devices: the table never grows past it.
                if self.sections.len() >= self.limits.max_sections as usize {
                    return Err(WireError::invalid(
                        at + 5,
                        Rule::SecUnknownDevice,
                        i.section_id as u64,
                    ));
                }
                let info = SectionInfo::new(i.section_id, i.idstr, i.instance_id, i.version_id);
                // Without alloc a full table forgets the section: PART/END naming it fail.
                let _ = self.sections.push(info);
                Ok(info)
            }
            SectionHeader::Part { section_id } | SectionHeader::End { section_id } => {
                self.section(*section_id).copied().ok_or(WireError::invalid(
                    at + 1,
                    Rule::SecUnknownId,
                    *section_id as u64,
                ))
            }
        }
    }
}
