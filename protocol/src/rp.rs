//! The return path: `MIG_RP_MSG_*` messages from destination to source.
//!
//! This module owns the return path's framing (be16 type, be16 length, payload), the
//! per-type payloads, and the one message whose body lies *outside* its length:
//! `RECV_BITMAP`, whose 1+n byte payload (the block name) is followed by a be64 size, the
//! bitmap bytes and a be64 end mark. [`RpDecoder::decode`] treats the whole of it as one atomic
//! item (`Incomplete` until the end mark is there), so a reader cannot desynchronise.
//!
//! Rules checked here: `RP-TYPE` (by profile), `RP-LEN` (fixed lengths), `RP-LEN-MAX`,
//! `RP-REQ-ID-LEN`, `RP-REQ-NO-BLOCK` (the decoder remembers the last `REQ_PAGES_ID` block of the
//! connection), `RP-BITMAP-LEN`, `RP-BITMAP-SIZE` (checked before anything is sized by it),
//! `RP-BITMAP-ENDMARK`, and `RP-RESUME-ACK-VALUE`: a RESUME_ACK value is a constant of the wire
//! format like a magic number, so the decoder rejects any value but 1 and the state machines
//! never see one. Left to the state machines: `RP-SHUT-ERROR`, `RP-ORDER`, `RP-PONG-UNKNOWN`,
//! `RP-REQ-RANGE` (they know the blocks) and `BITMAP-PADDING` (needs the page count; see
//! [`PageBitmap::from_le_bytes`](crate::bitmap::PageBitmap::from_le_bytes) and
//! [`RpDecoder::last_bitmap_offset`]).

use crate::bitmap::wire_size;
use crate::codes::{RpType, RECV_BITMAP_END_MARK, RESUME_ACK_VALUE};
use crate::error::{WireError, WireResult};
use crate::limits::Limits;
use crate::profile::Profile;
use crate::reader::Reader;
use crate::rule::Rule;
use crate::sink::Sink;

/// One return-path message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum RpMessage<'a> {
    /// `SHUT`: the destination is done; 0 means success.
    Shut(u32),
    /// `PONG`: echo of a PING value.
    Pong(u32),
    /// `REQ_PAGES_ID`: page request naming its block.
    ReqPagesId {
        /// Byte offset in the block.
        start: u64,
        /// Byte count.
        len: u32,
        /// Block idstr (1..=255 bytes, no NUL).
        name: &'a [u8],
    },
    /// `REQ_PAGES`: page request in the block of the connection's last `REQ_PAGES_ID`
    /// ([`RpDecoder::last_req_block`]).
    ReqPages {
        /// Byte offset in the block.
        start: u64,
        /// Byte count.
        len: u32,
    },
    /// `RECV_BITMAP` with its body: the block's received bitmap as wire bytes (little-endian,
    /// see [`bitmap`](crate::bitmap)).
    RecvBitmap {
        /// Block idstr.
        name: &'a [u8],
        /// The bitmap bytes (between the be64 size and the end mark).
        bitmap: &'a [u8],
    },
    /// `RESUME_ACK` with its value (always 1 when decoded).
    ResumeAck(u32),
    /// `SWITCHOVER_ACK` (8.1+).
    SwitchoverAck,
    /// Any other type with its payload: never produced by [`RpDecoder`] (which rejects types
    /// the profile does not know with `RP-TYPE`); for encoding arbitrary messages.
    Unknown {
        /// The type code.
        ty: RpType,
        /// The payload.
        payload: &'a [u8],
    },
}

/// The fixed payload length of a type, `None` for variable-length types.
const fn fixed_len(ty: RpType) -> Option<u16> {
    match ty.0 {
        1 | 2 | 6 => Some(4),
        4 => Some(12),
        7 => Some(0),
        _ => None,
    }
}

impl RpMessage<'_> {
    /// The message's type code.
    pub fn ty(&self) -> RpType {
        match self {
            RpMessage::Shut(_) => RpType::SHUT,
            RpMessage::Pong(_) => RpType::PONG,
            RpMessage::ReqPagesId { .. } => RpType::REQ_PAGES_ID,
            RpMessage::ReqPages { .. } => RpType::REQ_PAGES,
            RpMessage::RecvBitmap { .. } => RpType::RECV_BITMAP,
            RpMessage::ResumeAck(_) => RpType::RESUME_ACK,
            RpMessage::SwitchoverAck => RpType::SWITCHOVER_ACK,
            RpMessage::Unknown { ty, .. } => *ty,
        }
    }

    /// Writes the message as QEMU does: be16 type, be16 length, payload; for `RECV_BITMAP`
    /// then be64 bitmap size, the bitmap and the be64 end mark. Names are written with at most
    /// 255 bytes and an unknown payload with at most 65535, so that lengths stay truthful.
    pub fn encode(&self, out: &mut impl Sink) {
        let ty = self.ty().0;
        match *self {
            RpMessage::Shut(v) | RpMessage::Pong(v) | RpMessage::ResumeAck(v) => {
                out.put_be16(ty);
                out.put_be16(4);
                out.put_be32(v);
            }
            RpMessage::ReqPagesId { start, len, name } => {
                let name = &name[..name.len().min(255)];
                out.put_be16(ty);
                out.put_be16(13 + name.len() as u16);
                out.put_be64(start);
                out.put_be32(len);
                out.put_str8(name);
            }
            RpMessage::ReqPages { start, len } => {
                out.put_be16(ty);
                out.put_be16(12);
                out.put_be64(start);
                out.put_be32(len);
            }
            RpMessage::RecvBitmap { name, bitmap } => {
                let name = &name[..name.len().min(255)];
                out.put_be16(ty);
                out.put_be16(1 + name.len() as u16);
                out.put_str8(name);
                out.put_be64(bitmap.len() as u64);
                out.put(bitmap);
                out.put_be64(RECV_BITMAP_END_MARK);
            }
            RpMessage::SwitchoverAck => {
                out.put_be16(ty);
                out.put_be16(0);
            }
            RpMessage::Unknown { payload, .. } => {
                let p = &payload[..payload.len().min(u16::MAX as usize)];
                out.put_be16(ty);
                out.put_be16(p.len() as u16);
                out.put(p);
            }
        }
    }
}

/// Incremental decoder of one return-path connection.
///
/// It tracks the connection's absolute offset and the block of the last `REQ_PAGES_ID`
/// (inline, no allocation). Feed it the unconsumed bytes from [`offset`](Self::offset) on; each
/// successful call returns one message and the number of bytes it took.
#[derive(Clone)]
pub struct RpDecoder {
    profile: Profile,
    limits: Limits,
    offset: u64,
    block: [u8; 255],
    block_len: u8,
    last_bitmap_offset: u64,
}

impl core::fmt::Debug for RpDecoder {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.debug_struct("RpDecoder")
            .field("profile", &self.profile.version)
            .field("offset", &self.offset)
            .field("last_req_block", &self.last_req_block())
            .finish()
    }
}

impl RpDecoder {
    /// A decoder at the start of a return-path connection.
    pub const fn new(profile: Profile, limits: Limits) -> Self {
        RpDecoder {
            profile,
            limits,
            offset: 0,
            block: [0; 255],
            block_len: 0,
            last_bitmap_offset: 0,
        }
    }

    /// Starts over for a new connection: offset 0, no page-request block.
    pub fn reset(&mut self) {
        self.offset = 0;
        self.block_len = 0;
        self.last_bitmap_offset = 0;
    }

    /// Absolute offset (in the connection) of the next message.
    #[inline]
    pub fn offset(&self) -> u64 {
        self.offset
    }

    /// The block named by the last `REQ_PAGES_ID` on this connection.
    #[inline]
    pub fn last_req_block(&self) -> Option<&[u8]> {
        if self.block_len == 0 {
            None
        } else {
            Some(&self.block[..self.block_len as usize])
        }
    }

    /// Absolute offset of the bitmap bytes of the last `RECV_BITMAP` decoded (for naming a
    /// `BITMAP-PADDING` violation found when the caller converts them).
    #[inline]
    pub fn last_bitmap_offset(&self) -> u64 {
        self.last_bitmap_offset
    }

    /// Decodes one message from `input`, whose first byte is at [`offset`](Self::offset).
    ///
    /// `expected_bitmap_bytes(name)` gives, for a block the caller knows, the exact bitmap size
    /// ([`wire_size`] of its page count); for `None` (unknown block) the size is only capped by
    /// `wire_size(limits.max_block_bytes / TPS)` and must be a multiple of 8, so that the body
    /// can still be skipped in step. Atomic: on `Incomplete` or `Invalid` the decoder is
    /// unchanged; on success it has advanced by the returned byte count.
    pub fn decode<'a>(
        &mut self,
        input: &'a [u8],
        expected_bitmap_bytes: &dyn Fn(&[u8]) -> Option<u64>,
    ) -> WireResult<(RpMessage<'a>, usize)> {
        let mut r = Reader::new(input, self.offset);
        let at = r.offset();
        let ty = RpType(r.be16()?);
        let len = r.be16()?;
        if !self.profile.rp_type_legal(ty) {
            return Err(WireError::invalid(at, Rule::RpType, ty.0 as u64));
        }
        if let Some(fixed) = fixed_len(ty) {
            if len != fixed {
                return Err(WireError::invalid(at + 2, Rule::RpLen, len as u64));
            }
        }
        if len > self.limits.max_rp_len {
            return Err(WireError::invalid(at + 2, Rule::RpLenMax, len as u64));
        }
        let mut p = Reader::new(r.take(len as usize)?, at + 4);
        let mut new_block = None;
        let msg = match ty {
            RpType::SHUT => RpMessage::Shut(p.be32()?),
            RpType::PONG => RpMessage::Pong(p.be32()?),
            RpType::RESUME_ACK => {
                let v = p.be32()?;
                if v != RESUME_ACK_VALUE {
                    return Err(WireError::invalid(at + 4, Rule::RpResumeAckValue, v as u64));
                }
                RpMessage::ResumeAck(v)
            }
            RpType::SWITCHOVER_ACK => RpMessage::SwitchoverAck,
            RpType::REQ_PAGES => {
                if self.block_len == 0 {
                    return Err(WireError::invalid(at, Rule::RpReqNoBlock, ty.0 as u64));
                }
                RpMessage::ReqPages {
                    start: p.be64()?,
                    len: p.be32()?,
                }
            }
            RpType::REQ_PAGES_ID => {
                if len < 13 {
                    return Err(WireError::invalid(at + 2, Rule::RpReqIdLen, len as u64));
                }
                let start = p.be64().map_err(|_| bad_len(at, Rule::RpReqIdLen, len))?;
                let plen = p.be32().map_err(|_| bad_len(at, Rule::RpReqIdLen, len))?;
                let n = p
                    .peek_u8()
                    .map_err(|_| bad_len(at, Rule::RpReqIdLen, len))?;
                if len != 13 + n as u16 {
                    return Err(WireError::invalid(at + 2, Rule::RpReqIdLen, len as u64));
                }
                let name = p.str8()?;
                new_block = Some(name);
                RpMessage::ReqPagesId {
                    start,
                    len: plen,
                    name,
                }
            }
            RpType::RECV_BITMAP => {
                let n = p
                    .peek_u8()
                    .map_err(|_| bad_len(at, Rule::RpBitmapLen, len))?;
                if len != 1 + n as u16 {
                    return Err(WireError::invalid(at + 2, Rule::RpBitmapLen, len as u64));
                }
                let name = p.str8()?;
                let sat = r.offset();
                let size = r.be64()?;
                match expected_bitmap_bytes(name) {
                    Some(e) if size != e => {
                        return Err(WireError::invalid(sat, Rule::RpBitmapSize, size));
                    }
                    Some(_) => {}
                    None => {
                        let tps = self.profile.target_page_size.max(1) as u64;
                        let cap = wire_size(self.limits.max_block_bytes / tps);
                        if size > cap || size % 8 != 0 {
                            return Err(WireError::invalid(sat, Rule::RpBitmapSize, size));
                        }
                    }
                }
                let bat = r.offset();
                let bitmap = r.take(size as usize)?;
                let eat = r.offset();
                let end = r.be64()?;
                if end != RECV_BITMAP_END_MARK {
                    return Err(WireError::invalid(eat, Rule::RpBitmapEndmark, end));
                }
                self.last_bitmap_offset = bat;
                RpMessage::RecvBitmap { name, bitmap }
            }
            // Every other legal type has a fixed length and was handled above.
            _ => RpMessage::Unknown {
                ty,
                payload: p.rest(),
            },
        };
        if let Some(name) = new_block {
            self.block[..name.len()].copy_from_slice(name);
            self.block_len = name.len() as u8;
        }
        let used = r.consumed();
        self.offset += used as u64;
        Ok((msg, used))
    }
}

#[inline]
fn bad_len(at: u64, rule: Rule, len: u16) -> WireError {
    WireError::invalid(at + 2, rule, len as u64)
}
