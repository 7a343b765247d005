//! `MIG_CMD_*` commands: `0x08`, be16 command, be16 length, payload.
//!
//! This module owns every command's payload layout and its checks: the length table
//! ([`Rule::CmdLen`]), POSTCOPY_ADVISE's two lengths, the exact POSTCOPY_RAM_DISCARD body,
//! RECV_BITMAP's `len == 1 + n`, the PACKAGED blob length cap, and which codes a profile knows
//! ([`Rule::CmdUnknown`]). The PACKAGED blob itself follows the command outside its length; the
//! stream decoder ([`crate::stream`]) decodes it inline.

use crate::codes::{CommandCode, SectionType};
use crate::error::{WireError, WireResult};
use crate::limits::Limits;
use crate::profile::Profile;
use crate::reader::Reader;
use crate::rule::Rule;
use crate::sink::Sink;

/// POSTCOPY_ADVISE's 16-byte payload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Advise {
    /// Bitwise OR of the page sizes of every migrated RAM block (`ram_pagesize_summary`).
    pub ram_pagesize_summary: u64,
    /// The source's target page size.
    pub target_page_size: u64,
}

/// A POSTCOPY_RAM_DISCARD body: one block and its discarded byte ranges (borrowed).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Discard<'a> {
    /// The RAM block's idstr.
    pub name: &'a [u8],
    /// The ranges, 16 bytes each (be64 start, be64 length), exactly as on the wire.
    raw_ranges: &'a [u8],
}

impl<'a> Discard<'a> {
    /// A discard over `raw_ranges` (a multiple of 16 bytes: be64 start, be64 length pairs).
    /// Returns `None` if the length is not a multiple of 16 or the name is not 1..=255 bytes.
    pub fn new(name: &'a [u8], raw_ranges: &'a [u8]) -> Option<Self> {
        if name.is_empty() || name.len() > 255 || raw_ranges.len() % 16 != 0 {
            return None;
        }
        Some(Discard { name, raw_ranges })
    }

    /// Number of ranges.
    pub fn len(&self) -> usize {
        self.raw_ranges.len() / 16
    }

    /// Whether there is no range.
    pub fn is_empty(&self) -> bool {
        self.raw_ranges.is_empty()
    }

    /// The ranges as `(start, length)` byte pairs, in wire order.
    pub fn ranges(&self) -> impl Iterator<Item = (u64, u64)> + 'a {
        self.raw_ranges.chunks_exact(16).map(|c| {
            let (a, b) = c.split_at(8);
            (be64(a), be64(b))
        })
    }

    /// The raw range bytes.
    pub fn raw_ranges(&self) -> &'a [u8] {
        self.raw_ranges
    }
}

fn be64(b: &[u8]) -> u64 {
    let mut a = [0u8; 8];
    a.copy_from_slice(&b[..8]);
    u64::from_be_bytes(a)
}

/// Writes `(start, length)` pairs as discard range bytes into `out`.
pub fn encode_ranges(ranges: &[(u64, u64)], out: &mut impl Sink) {
    for (s, l) in ranges {
        out.put_be64(*s);
        out.put_be64(*l);
    }
}

/// A decoded command.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Command<'a> {
    /// 1: open the return path.
    OpenReturnPath,
    /// 2: ask for a PONG with this value.
    Ping(u32),
    /// 3: postcopy advise, 16 bytes with postcopy-ram, empty with only dirty-bitmaps.
    PostcopyAdvise(Option<Advise>),
    /// 4: start listening for faults.
    PostcopyListen,
    /// 5: start running.
    PostcopyRun,
    /// 6: ranges of a block to discard.
    RamDiscard(Discard<'a>),
    /// 7: a blob of `len` bytes follows (outside the command's length).
    Packaged {
        /// The blob length.
        len: u32,
    },
    /// 8: COLO.
    EnableColo,
    /// 9: resume after recovery.
    PostcopyResume,
    /// 10: ask for a block's received bitmap.
    RecvBitmap {
        /// The block's idstr.
        name: &'a [u8],
    },
    /// 11 (10.x): switchover starts.
    SwitchoverStart,
    /// A command this crate does not decode (for encoding arbitrary commands, e.g. in tests of
    /// a peer). Never produced by [`decode_command`], which rejects unknown codes.
    Unknown {
        /// The code.
        code: CommandCode,
        /// The payload.
        data: &'a [u8],
    },
}

/// The fixed payload length of a command code, `None` for variable-length ones.
pub const fn table_len(code: CommandCode) -> Option<u16> {
    match code.0 {
        1 | 4 | 5 | 8 | 9 | 11 => Some(0),
        2 | 7 => Some(4),
        _ => None,
    }
}

impl Command<'_> {
    /// The command code.
    pub const fn code(&self) -> CommandCode {
        match self {
            Command::OpenReturnPath => CommandCode::OPEN_RETURN_PATH,
            Command::Ping(_) => CommandCode::PING,
            Command::PostcopyAdvise(_) => CommandCode::POSTCOPY_ADVISE,
            Command::PostcopyListen => CommandCode::POSTCOPY_LISTEN,
            Command::PostcopyRun => CommandCode::POSTCOPY_RUN,
            Command::RamDiscard(_) => CommandCode::POSTCOPY_RAM_DISCARD,
            Command::Packaged { .. } => CommandCode::PACKAGED,
            Command::EnableColo => CommandCode::ENABLE_COLO,
            Command::PostcopyResume => CommandCode::POSTCOPY_RESUME,
            Command::RecvBitmap { .. } => CommandCode::RECV_BITMAP,
            Command::SwitchoverStart => CommandCode::SWITCHOVER_START,
            Command::Unknown { code, .. } => *code,
        }
    }

    /// The payload length (the be16 `len` field).
    pub fn payload_len(&self) -> usize {
        match self {
            Command::Ping(_) | Command::Packaged { .. } => 4,
            Command::PostcopyAdvise(Some(_)) => 16,
            Command::RamDiscard(d) => 3 + d.name.len() + d.raw_ranges.len(),
            Command::RecvBitmap { name } => 1 + name.len(),
            Command::Unknown { data, .. } => data.len(),
            _ => 0,
        }
    }

    /// Writes the command, including the `0x08` type byte. The PACKAGED blob is not included.
    pub fn encode(&self, out: &mut impl Sink) {
        out.put_u8(SectionType::COMMAND.0);
        out.put_be16(self.code().0);
        out.put_be16(self.payload_len() as u16);
        match self {
            Command::Ping(v) => out.put_be32(*v),
            Command::Packaged { len } => out.put_be32(*len),
            Command::PostcopyAdvise(Some(a)) => {
                out.put_be64(a.ram_pagesize_summary);
                out.put_be64(a.target_page_size);
            }
            Command::RamDiscard(d) => {
                out.put_u8(0);
                out.put_str8(d.name);
                out.put_u8(0);
                out.put(d.raw_ranges);
            }
            Command::RecvBitmap { name } => out.put_str8(name),
            Command::Unknown { data, .. } => out.put(data),
            _ => {}
        }
    }
}

/// Reads a command after its `0x08` type byte: be16 code, be16 length, payload.
///
/// Checks in QEMU's order: the code is legal in `profile` ([`Rule::CmdUnknown`], at the code),
/// a fixed-length command has its table length ([`Rule::CmdLen`], at the length), then the
/// payload's own rules. PACKAGED's blob length is checked against `limits.max_packaged`
/// ([`Rule::CmdPackagedLen`]). Atomic: on error nothing is consumed.
pub fn decode_command<'a>(
    r: &mut Reader<'a>,
    profile: &Profile,
    limits: &Limits,
) -> WireResult<Command<'a>> {
    let mut p = r.clone();
    let code_at = p.offset();
    let code = CommandCode(p.be16()?);
    let len_at = p.offset();
    let len = p.be16()?;
    if !profile.command_legal(code) {
        return Err(WireError::invalid(code_at, Rule::CmdUnknown, code.0 as u64));
    }
    if let Some(t) = table_len(code) {
        if len != t {
            return Err(WireError::invalid(len_at, Rule::CmdLen, len as u64));
        }
    }
    let body_at = p.offset();
    let body = p.take(len as usize)?;
    let cmd = decode_body(code, body, body_at, len_at, limits)?;
    *r = p;
    Ok(cmd)
}

fn decode_body<'a>(
    code: CommandCode,
    body: &'a [u8],
    body_at: u64,
    len_at: u64,
    limits: &Limits,
) -> WireResult<Command<'a>> {
    let len = body.len();
    // Inside `body` every read is complete or a length error: the body is whole.
    let mut b = Reader::new(body, body_at);
    let short = |_| WireError::invalid(len_at, Rule::CmdLen, len as u64);
    Ok(match code {
        CommandCode::OPEN_RETURN_PATH => Command::OpenReturnPath,
        CommandCode::PING => Command::Ping(b.be32().map_err(short)?),
        CommandCode::POSTCOPY_ADVISE => match len {
            0 => Command::PostcopyAdvise(None),
            16 => Command::PostcopyAdvise(Some(Advise {
                ram_pagesize_summary: b.be64().map_err(short)?,
                target_page_size: b.be64().map_err(short)?,
            })),
            _ => return Err(WireError::invalid(len_at, Rule::CmdAdviseLen, len as u64)),
        },
        CommandCode::POSTCOPY_LISTEN => Command::PostcopyListen,
        CommandCode::POSTCOPY_RUN => Command::PostcopyRun,
        CommandCode::POSTCOPY_RAM_DISCARD => {
            let dlen = |_| WireError::invalid(len_at, Rule::CmdDiscardLen, len as u64);
            if len < 1 + 1 + 1 + 1 + 16 {
                return Err(WireError::invalid(len_at, Rule::CmdDiscardLen, len as u64));
            }
            let v = b.u8().map_err(dlen)?;
            if v != 0 {
                return Err(WireError::invalid(
                    body_at,
                    Rule::CmdDiscardVersion,
                    v as u64,
                ));
            }
            let name = match b.str8() {
                Ok(n) => n,
                Err(WireError::Incomplete { .. }) => {
                    return Err(WireError::invalid(len_at, Rule::CmdDiscardLen, len as u64))
                }
                Err(e) => return Err(e),
            };
            let term_at = b.offset();
            let t = b.u8().map_err(dlen)?;
            if t != 0 {
                return Err(WireError::invalid(term_at, Rule::CmdDiscardTerm, t as u64));
            }
            let raw_ranges = b.rest();
            if raw_ranges.len() % 16 != 0 {
                return Err(WireError::invalid(len_at, Rule::CmdDiscardLen, len as u64));
            }
            Command::RamDiscard(Discard { name, raw_ranges })
        }
        CommandCode::PACKAGED => {
            let n = b.be32().map_err(short)?;
            if n > limits.max_packaged {
                return Err(WireError::invalid(body_at, Rule::CmdPackagedLen, n as u64));
            }
            Command::Packaged { len: n }
        }
        CommandCode::ENABLE_COLO => Command::EnableColo,
        CommandCode::POSTCOPY_RESUME => Command::PostcopyResume,
        CommandCode::RECV_BITMAP => {
            let bad = WireError::invalid(len_at, Rule::CmdRecvBitmapLen, len as u64);
            let name = match b.str8() {
                Ok(n) => n,
                Err(WireError::Incomplete { .. }) => return Err(bad),
                Err(e) => return Err(e),
            };
            if b.remaining() != 0 {
                return Err(bad);
            }
            Command::RecvBitmap { name }
        }
        CommandCode::SWITCHOVER_START => Command::SwitchoverStart,
        _ => {
            return Err(WireError::invalid(
                len_at - 2,
                Rule::CmdUnknown,
                code.0 as u64,
            ))
        }
    })
}

#[cfg(all(test, feature = "alloc"))]
mod tests {
    use super::*;
    use alloc::vec::Vec;

    fn dec<'a>(bytes: &'a [u8], p: &Profile) -> WireResult<(Command<'a>, usize)> {
        let mut r = Reader::new(&bytes[1..], 1);
        decode_command(&mut r, p, &Limits::DEFAULT).map(|c| (c, r.consumed() + 1))
    }

    #[test]
    fn captured_bytes() {
        let p = Profile::QEMU_10;
        let ping = [8, 0, 2, 0, 4, 0, 0, 0, 1];
        assert_eq!(dec(&ping, &p), Ok((Command::Ping(1), 9)));
        let disc = hex("0800060016000372616d000000000001c700000000000002390000");
        let (c, n) = dec(&disc, &p).unwrap();
        assert_eq!(n, disc.len());
        let Command::RamDiscard(d) = c else { panic!() };
        assert_eq!(d.name, b"ram");
        assert_eq!(d.ranges().collect::<Vec<_>>(), [(0x1c70000, 0x2390000)]);
        let mut out = Vec::new();
        c.encode(&mut out);
        assert_eq!(out, disc);
    }

    #[test]
    fn rule_checks() {
        let p = Profile::QEMU_7_2;
        assert_eq!(
            dec(&[8, 0, 11, 0, 0], &p),
            Err(WireError::invalid(1, Rule::CmdUnknown, 11))
        );
        assert_eq!(
            dec(&[8, 0, 8, 0, 1, 0], &p),
            Err(WireError::invalid(3, Rule::CmdLen, 1))
        );
        assert_eq!(
            dec(&[8, 0, 3, 0, 8, 0, 0, 0, 0, 0, 0, 0, 0], &p),
            Err(WireError::invalid(3, Rule::CmdAdviseLen, 8))
        );
        assert_eq!(
            dec(&[8, 0, 10, 0, 3, 1, b'a', 0], &p),
            Err(WireError::invalid(3, Rule::CmdRecvBitmapLen, 3))
        );
        assert_eq!(
            dec(&[8, 0, 7, 0, 4, 1, 0, 0, 1], &p),
            Err(WireError::invalid(5, Rule::CmdPackagedLen, 0x0100_0001))
        );
        assert_eq!(
            dec(&[8, 0, 2, 0, 4, 0], &p),
            Err(WireError::Incomplete { needed: 3 })
        );
        let mut d = hex("0800060016000372616d000000000001c700000000000002390000");
        d[10] = 1;
        assert_eq!(
            dec(&d, &p),
            Err(WireError::invalid(10, Rule::CmdDiscardTerm, 1)).map(|c: Command| (c, 0))
        );
        d[10] = 0;
        d[5] = 1;
        assert_eq!(
            dec(&d, &p),
            Err(WireError::invalid(5, Rule::CmdDiscardVersion, 1)).map(|c: Command| (c, 0))
        );
    }

    fn hex(s: &str) -> Vec<u8> {
        (0..s.len())
            .step_by(2)
            .map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap())
            .collect()
    }
}
