//! The synthetic multifd migration (profiles 7.2 and 10): a precopy main channel whose non-zero pages
//! travel on two multifd connections, in the layout of the captured `precopy-multifd` vectors
//! (`stream.bin`, `multifd-conn1.bin`, `multifd-conn2.bin`, `rp.bin`), and its cases (MFD-CHANNEL,
//! MFD-FLAGS, MFD-SYNC: listed in [`super::cases`]). An invalid case's expected offset counts
//! from 0 of the connection the violation is on, which the manifest names
//! (`synthetic.expected.channel`).

use super::base::{self, footer, memsize, multifd_packet, named, sec_part, sec_start, word};
use super::base::{FILL4, RAM_ID, TPS};
use super::build::{be32, cat, Parts};
use qmig_protocol::codes::{RamFlags, MULTIFD_MAGIC};
use qmig_protocol::command::Command;

use super::cases::{Case, Class};

/// Files of the multifd connections, in the order the runner opens them.
pub const CONN_FILES: [&str; 2] = ["multifd-conn1.bin", "multifd-conn2.bin"];

/// A 64-byte init packet naming channel `id` (zero UUID).
pub fn init_packet(id: u8) -> Vec<u8> {
    cat(&[
        &be32(MULTIFD_MAGIC),
        &be32(1),
        &[0u8; 16],
        &[id],
        &[0u8; 7],
        &[0u8; 32],
    ])
}

/// A SYNC packet (flag bit 0, no pages; 7.2 allocates 128 slots, 10.x none).
fn sync(num: u64, ten: bool) -> Vec<u8> {
    multifd_packet(1, if ten { 0 } else { 128 }, &[], num, &[])
}

/// Connection `k` (0 or 1): init packet (id `k`), SYNC for the `ram` START's sync point, one
/// packet with one page (connection 0: page 0; connection 1: page 4 filled with [`FILL4`]),
/// SYNC for the PART's, SYNC for the END's (7.2: each EOS; 10.x: each MULTIFD_FLUSH). Packet
/// numbers count across both connections.
/// Its parts are named `c1_*` (connection 0, `multifd-conn1.bin`) or `c2_*` (connection 1).
pub fn conn(k: u8, ten: bool, p: &mut Parts) {
    let n = u64::from(k);
    let (addr, data) = if k == 0 {
        (0, base::page0())
    } else {
        (4 * TPS, vec![FILL4; TPS as usize])
    };
    let names = if k == 0 { C1 } else { C2 };
    p.push(names[0], init_packet(k));
    p.push(names[1], sync(n, ten));
    p.push(names[2], multifd_packet(0, 128, &[addr], 2 + n, &data));
    p.push(names[3], sync(4 + n, ten));
    p.push(names[4], sync(6 + n, ten));
}

/// Part names of connection 0.
const C1: [&str; 5] = ["c1_init", "c1_sync1", "c1_pages", "c1_sync2", "c1_sync3"];
/// Part names of connection 1.
const C2: [&str; 5] = ["c2_init", "c2_sync1", "c2_pages", "c2_sync2", "c2_sync3"];

/// The main channel: header, configuration, OPEN_RETURN_PATH, PING(1), `ram` START (MEM_SIZE,
/// EOS), PART (pages 1-3 as ZERO, the first naming `ram`, EOS), [SWITCHOVER_START on 10.x],
/// END (EOS), `globalstate` FULL, EOF, VM description; on 10.x (`ten`) each EOS is preceded by
/// MULTIFD_FLUSH, the sync point there. Pages 0 and 4 travel on the multifd connections.
pub fn main(ten: bool) -> Parts {
    let mut p = Parts::default();
    base::header_and_config(&mut p);
    p.push("open_rp", base::cmd(Command::OpenReturnPath));
    p.push("ping1", base::cmd(Command::Ping(1)));
    p.push("ram_start", sec_start(0x01, RAM_ID, "ram", 4));
    p.push("memsize", memsize());
    flush(&mut p, ten, "start_flush");
    p.push("start_eos", word(0, RamFlags::EOS));
    p.push("start_footer", footer(RAM_ID));
    p.push("part_hdr", sec_part(0x02, RAM_ID));
    p.push("zero1", cat(&[&named(TPS, RamFlags::ZERO, "ram"), &[0]]));
    for (name, pg) in [("zero2", 2u64), ("zero3", 3)] {
        p.push(
            name,
            cat(&[
                &word(pg * TPS, RamFlags::ZERO.with(RamFlags::CONTINUE)),
                &[0],
            ]),
        );
    }
    flush(&mut p, ten, "part_flush");
    p.push("part_eos", word(0, RamFlags::EOS));
    p.push("part_footer", footer(RAM_ID));
    if ten {
        p.push("switchover", base::cmd(Command::SwitchoverStart));
    }
    p.push("end_hdr", sec_part(0x03, RAM_ID));
    flush(&mut p, ten, "end_flush");
    p.push("end_eos", word(0, RamFlags::EOS));
    p.push("end_footer", footer(RAM_ID));
    p.push("gs_hdr", sec_start(0x04, base::GS_ID, "globalstate", 1));
    p.push("gs_payload", base::globalstate());
    p.push("gs_footer", footer(base::GS_ID));
    p.push("eof", vec![0x00]);
    p.push("vmdesc", base::vmdesc());
    p
}

/// Appends a MULTIFD_FLUSH word named `name` on 10.x.
fn flush(p: &mut Parts, ten: bool, name: &'static str) {
    if ten {
        p.push(name, word(0, RamFlags::MULTIFD_FLUSH));
    }
}

/// The base of the multifd cases: [`main`]'s parts, then connection 0's (`c1_*`) and
/// connection 1's (`c2_*`); [`split`] separates them again.
pub fn base(ten: bool) -> Parts {
    let mut p = main(ten);
    conn(0, ten, &mut p);
    conn(1, ten, &mut p);
    p
}

/// The connection index a part belongs to (`None`: the main channel).
fn conn_of_part(name: &str) -> Option<usize> {
    if name.starts_with("c1_") {
        Some(0)
    } else if name.starts_with("c2_") {
        Some(1)
    } else {
        None
    }
}

/// Splits [`base`]'s parts into the main channel and the two connections.
pub fn split(p: &Parts) -> (Parts, [Parts; 2]) {
    let mut main = Parts::default();
    let mut conns = [Parts::default(), Parts::default()];
    for part in &p.parts {
        match conn_of_part(part.name) {
            None => main.push(part.name, part.bytes.clone()),
            Some(k) => conns[k].push(part.name, part.bytes.clone()),
        }
    }
    (main, conns)
}

/// Offset of part `name` from 0 of its own connection.
pub fn offset_in_conn(p: &Parts, name: &str) -> u64 {
    let (_, conns) = split(p);
    let k = conn_of_part(name).expect("a connection's part");
    conns[k].offset_of(name)
}

/// Length of connection `k` (0 or 1) of the parts.
pub fn conn_len(p: &Parts, k: usize) -> u64 {
    split(p).1[k].len()
}

/// The connection (0 or 1) an invalid multifd case's violation is on.
pub fn violation_conn(c: &Case) -> usize {
    match c.rule {
        "MFD-FLAGS" => 0,
        _ => 1,
    }
}

/// Whether the runner closes the multifd connections once written (the MFD-SYNC case: a
/// connection that ends before its last SYNC), instead of keeping them open to the end.
pub fn closes_connections(c: &Case) -> bool {
    c.rule == "MFD-SYNC" && c.class == Class::Invalid
}
