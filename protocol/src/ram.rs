//! RAM section records (`RAM_SAVE_FLAG_*`): the records of the "ram" section and of the
//! postcopy preempt channel.
//!
//! This module owns the byte form of one RAM record: its be64 `offset | flags` word, the
//! optional block name, and the body each record type carries ([`RamRecord`], [`RamBody`],
//! [`decode_record`]); the per-channel CONTINUE state ([`RamChannel`]); the MEM_SIZE block list
//! ([`MemSizeList`]); XBZRLE deltas ([`xbzrle_apply`], [`xbzrle_encode`]) and, with the
//! `compress` feature, zlib pages of QEMU 7.2 (`compress_page_decode`); with `alloc`, a
//! sender's per-page choice of body with its XBZRLE page cache (`page_codec`).
//!
//! What it does not own: whether a named block exists, whether an offset lies inside its block
//! (`RAM-BLOCK-UNKNOWN`, the "inside its block" half of `RAM-OFFSET`) and where MEM_SIZE may
//! appear (`RAM-MEMSIZE-PLACE`): those need the receiver's block table and live in `stream` and
//! `machine`. The TPS-alignment half of `RAM-OFFSET` holds by construction, since the flag bits
//! are exactly the low `log2(TPS)` bits of the header word.

mod memsize;
mod record;
mod xbzrle;

#[cfg(feature = "alloc")]
pub mod page_codec;

#[cfg(feature = "compress")]
mod compress;

#[cfg(feature = "compress")]
pub use compress::{compress_page_decode, compress_page_encode};
pub use memsize::{encode_mem_size, BlockInfo, MemSizeIter, MemSizeList, MAX_MEM_SIZE_BLOCKS};
pub use record::{
    compress_bound, decode_record, BlockPredicate, RamBody, RamChannel, RamCtx, RamRecord,
};
pub use xbzrle::{xbzrle_apply, xbzrle_encode, XBZRLE_ENCODING};
