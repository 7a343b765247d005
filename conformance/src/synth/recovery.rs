//! The synthetic postcopy recovery: a postcopy main channel cut after POSTCOPY_RUN, then a
//! recovery channel (no header: RECV_BITMAP, POSTCOPY_RESUME, the missing page, END, EOF), in
//! the layout of the captured `postcopy-recover` vectors (`stream.bin` cut, `resume-stream.bin`,
//! `resume-rp.bin`). An invalid case patches the recovery channel; its vector then carries a
//! second, valid recovery channel (`resume2-stream.bin`) that must complete the migration with
//! the RAM received before the failed attempt intact.

use super::base::{self, cmd, footer, named, rp, sec_part, word, RAM_BYTES, RAM_ID, TPS};
use super::build::Parts;
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::codes::{RamFlags, RESUME_ACK_VALUE};
use qmig_protocol::command::Command;
use qmig_protocol::rp::RpMessage;

/// Bytes of page 3's ZERO record the cut main channel still carries (the cut falls inside it).
pub const CUT_INTO_ZERO3: usize = 4;

/// The main channel of a recovery case: the [`base::postcopy`] channel up to and including
/// page 2 sent after POSTCOPY_RUN, then the first [`CUT_INTO_ZERO3`] bytes of page 3's ZERO
/// record, where the channel is cut (a destination must pause, SM-PAUSE-AFTER-RUN, and keep
/// page 3's received bit clear: it was discarded and never arrived whole).
pub fn main(ten: bool) -> Parts {
    let mut p = base::postcopy(ten);
    p.get("pc_zero3").truncate(CUT_INTO_ZERO3);
    p.truncate_at("pc_part_eos");
    p
}

/// The return path of [`main`] up to the cut: PONG 1, 2, 3, 4 (no SHUT: the channel is lost).
pub fn main_rp() -> Vec<u8> {
    let mut v = Vec::new();
    for n in 1..=4 {
        v.extend_from_slice(&rp(RpMessage::Pong(n)));
    }
    v
}

/// A valid recovery channel (offsets from 0 of its connection): RECV_BITMAP(`ram`),
/// POSTCOPY_RESUME, `ram` PART (page 3 as ZERO naming its block, EOS), END (EOS), EOF.
pub fn channel() -> Parts {
    channel_with(|p| {
        p.push(
            "zero3",
            [named(3 * TPS, RamFlags::ZERO, "ram"), vec![0]].concat(),
        )
    })
}

/// A recovery channel: RECV_BITMAP(`ram`), POSTCOPY_RESUME, `ram` PART (the page records
/// `pages` appends, then EOS), END (EOS), EOF.
pub fn channel_with(pages: impl FnOnce(&mut Parts)) -> Parts {
    let mut p = Parts::default();
    p.push("recv_bitmap", cmd(Command::RecvBitmap { name: b"ram" }));
    p.push("resume", cmd(Command::PostcopyResume));
    p.push("part_hdr", sec_part(0x02, RAM_ID));
    pages(&mut p);
    p.push("part_eos", word(0, RamFlags::EOS));
    p.push("part_footer", footer(RAM_ID));
    p.push("end_hdr", sec_part(0x03, RAM_ID));
    p.push("end_eos", word(0, RamFlags::EOS));
    p.push("end_footer", footer(RAM_ID));
    p.push("eof", vec![0x00]);
    p
}

/// Length of [`channel`] up to (not including) part `name`.
pub fn channel_len_to(name: &str) -> u64 {
    channel().offset_of(name)
}

/// The received bitmap of `ram` when the main channel was cut: pages 0, 1 and 4 from precopy,
/// page 2 placed in postcopy; page 3 cleared by RAM_DISCARD and cut short (BITMAP-MARK).
pub fn received_at_cut() -> PageBitmap {
    let mut bm = PageBitmap::new(RAM_BYTES / TPS);
    for pg in [0, 1, 2, 4] {
        bm.set(pg);
    }
    bm
}

/// The return path a destination writes on a valid recovery channel: RECV_BITMAP(`ram`,
/// [`received_at_cut`]), RESUME_ACK(1), SHUT(0).
pub fn channel_rp() -> Vec<u8> {
    rp_for(&received_at_cut())
}

/// The return path of a valid recovery channel whose destination had received `received` of
/// `ram` at the cut: RECV_BITMAP(`ram`, `received`), RESUME_ACK(1), SHUT(0).
pub fn rp_for(received: &PageBitmap) -> Vec<u8> {
    [
        bitmap_msg(received),
        rp(RpMessage::ResumeAck(RESUME_ACK_VALUE)),
        rp(RpMessage::Shut(0)),
    ]
    .concat()
}

/// Whether valid case `c` loses its first recovery channel in postcopy-recover: the channel
/// ends right after RECV_BITMAP (the destination answers it, then must return to
/// postcopy-paused: SM-PAUSE-IN-RECOVER, no violation), and a second recovery completes.
pub fn cut_in_recover(c: &super::cases::Case) -> bool {
    c.class == super::cases::Class::Valid && c.rule == "SM-PAUSE-IN-RECOVER"
}

/// The return path of a recovery channel cut after RECV_BITMAP: only the received bitmap.
pub fn bitmap_rp() -> Vec<u8> {
    bitmap_msg(&received_at_cut())
}

/// RECV_BITMAP(`ram`, `received`) as a destination writes it.
fn bitmap_msg(received: &PageBitmap) -> Vec<u8> {
    let mut bytes = Vec::new();
    received.to_le_bytes(&mut bytes);
    rp(RpMessage::RecvBitmap {
        name: b"ram",
        bitmap: &bytes,
    })
}

/// The header and configuration a main channel starts with (what a recovery channel must not).
pub fn header_and_config() -> Vec<u8> {
    let mut p = Parts::default();
    base::header_and_config(&mut p);
    p.bytes()
}
