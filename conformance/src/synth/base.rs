//! The synthetic base channels every case starts from: a precopy main channel, a postcopy
//! main channel (ADVISE, DISCARD, PACKAGED with LISTEN/RUN), a return path and one multifd
//! connection (decode checks only); all for machine
//! `none` with one RAM block `ram` of [`RAM_BYTES`]. Commands and return-path messages are
//! encoded with the protocol crate's encoders; sections and RAM records byte by byte (their
//! fields are what the cases patch).

use super::build::{be32, be64, cat, Parts};
use crate::qemu::pattern::random_page;
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::codes::{RamFlags, MULTIFD_MAGIC, RECV_BITMAP_END_MARK};
use qmig_protocol::command::{Advise, Command, Discard};
use qmig_protocol::rp::RpMessage;

/// Guest RAM of every synthetic vector (block `ram`, 1 MiB: QEMU's `-m 1M` works for replay).
pub const RAM_BYTES: u64 = 1 << 20;
/// Target page size.
pub const TPS: u64 = 4096;
/// Section id of `ram`.
pub const RAM_ID: u32 = 2;
/// Section id of `globalstate`.
pub const GS_ID: u32 = 4;
/// Page content seed.
pub const SEED: u64 = 0x5171;
/// Fill byte of page 4.
pub const FILL4: u8 = 0x5a;

/// Encodes a command (type byte included).
pub fn cmd(c: Command<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    c.encode(&mut v);
    v
}

/// Encodes a return-path message.
pub fn rp(m: RpMessage<'_>) -> Vec<u8> {
    let mut v = Vec::new();
    m.encode(&mut v);
    v
}

/// A section header START/FULL: type, be32 id, counted idstr, be32 instance, be32 version.
pub fn sec_start(ty: u8, id: u32, idstr: &str, version: u32) -> Vec<u8> {
    cat(&[
        &[ty],
        &be32(id),
        &[idstr.len() as u8],
        idstr.as_bytes(),
        &be32(0),
        &be32(version),
    ])
}

/// A section header PART/END.
pub fn sec_part(ty: u8, id: u32) -> Vec<u8> {
    cat(&[&[ty], &be32(id)])
}

/// A section footer.
pub fn footer(id: u32) -> Vec<u8> {
    cat(&[&[0x7e], &be32(id)])
}

/// A RAM header word.
pub fn word(addr: u64, flags: RamFlags) -> Vec<u8> {
    be64(addr | flags.0).to_vec()
}

/// A RAM record naming its block: word, counted name.
pub fn named(addr: u64, flags: RamFlags, name: &str) -> Vec<u8> {
    cat(&[&word(addr, flags), &[name.len() as u8], name.as_bytes()])
}

/// The MEM_SIZE record of the block list `[("ram", RAM_BYTES)]`.
pub fn memsize() -> Vec<u8> {
    cat(&[
        &word(RAM_BYTES, RamFlags::MEM_SIZE),
        &[3],
        b"ram",
        &be64(RAM_BYTES),
    ])
}

/// The `globalstate` payload (be32 size 8, "running", zero padding to 104 bytes).
pub fn globalstate() -> Vec<u8> {
    let mut p = vec![0u8; 104];
    p[..4].copy_from_slice(&be32(8));
    p[4..11].copy_from_slice(b"running");
    p
}

/// Page 0's content.
pub fn page0() -> Vec<u8> {
    random_page(SEED, 0, 0)
}

/// Page 2's content (postcopy: sent after the switch).
pub fn page2() -> Vec<u8> {
    random_page(SEED, 2, 0)
}

/// Appends the header (`QEVM`, version 3) and the configuration (machine `none`).
pub fn header_and_config(p: &mut Parts) {
    p.push("header", cat(&[b"QEVM", &be32(3)]));
    p.push("config", cat(&[&[0x07], &be32(4), b"none"]));
}

fn ram_start(p: &mut Parts, memsize: Vec<u8>) {
    p.push("ram_start", sec_start(0x01, RAM_ID, "ram", 4));
    p.push("memsize", memsize);
    p.push("start_eos", word(0, RamFlags::EOS));
    p.push("start_footer", footer(RAM_ID));
}

/// Appends the end of a channel: [SWITCHOVER_START if `ten`], the `ram` END (EOS), with
/// `devices` the `globalstate` FULL, EOF, and with `devices` the VM description.
pub fn ram_tail_and_devices(p: &mut Parts, ten: bool, devices: bool) {
    if ten {
        p.push("switchover", cmd(Command::SwitchoverStart));
    }
    p.push("end_hdr", sec_part(0x03, RAM_ID));
    p.push("end_eos", word(0, RamFlags::EOS));
    p.push("end_footer", footer(RAM_ID));
    if devices {
        p.push("gs_hdr", sec_start(0x04, GS_ID, "globalstate", 1));
        p.push("gs_payload", globalstate());
        p.push("gs_footer", footer(GS_ID));
    }
    p.push("eof", vec![0x00]);
    if devices {
        p.push("vmdesc", vmdesc());
    }
}

/// The VM description JSON of the synthetic machine: its one non-iterative device,
/// `globalstate` (instance 0, version 1: be32 size, 100-byte run state), as QEMU describes
/// every non-iterative section. A destination given it knows its devices (SEC-UNKNOWN-DEVICE,
/// SEC-VERSION).
pub const VMDESC_JSON: &[u8] = br#"{"page_size":4096,"devices":[{"name":"globalstate","instance_id":0,"vmsd_name":"globalstate","version":1,"fields":[{"name":"size","type":"uint32","size":4},{"name":"runstate","type":"buffer","size":100}]}]}"#;

/// The VM description a precopy stream ends with (`0x06`, be32 length, [`VMDESC_JSON`]): as
/// QEMU does, and it lets the footer scan decide the last device section.
pub fn vmdesc() -> Vec<u8> {
    vmdesc_of(VMDESC_JSON)
}

/// A VM description record (`0x06`, be32 length, `json`).
pub fn vmdesc_of(json: &[u8]) -> Vec<u8> {
    cat(&[&[0x06], &be32(json.len() as u32), json])
}

/// Appends the precopy pages of every main-channel base: page 0 as PAGE naming `ram`
/// ([`page0`]), pages 1-3 as ZERO|CONTINUE, page 4 as PAGE|CONTINUE filled with [`FILL4`]
/// (parts `page0`, `zero1`-`zero3`, `page4`).
pub fn precopy_pages(p: &mut Parts) {
    p.push("page0", cat(&[&named(0, RamFlags::PAGE, "ram"), &page0()]));
    for (name, pg) in [("zero1", 1u64), ("zero2", 2), ("zero3", 3)] {
        p.push(
            name,
            cat(&[
                &word(pg * TPS, RamFlags::ZERO.with(RamFlags::CONTINUE)),
                &[0],
            ]),
        );
    }
    p.push(
        "page4",
        cat(&[
            &word(4 * TPS, RamFlags::PAGE.with(RamFlags::CONTINUE)),
            &vec![FILL4; TPS as usize],
        ]),
    );
}

/// The precopy main channel: header, configuration, OPEN_RETURN_PATH, PING(1), `ram` START
/// (MEM_SIZE, EOS), PART (page 0 as PAGE naming `ram`, pages 1-3 as ZERO|CONTINUE, page 4 as
/// PAGE|CONTINUE filled with [`FILL4`], EOS), [SWITCHOVER_START on 10.x], END (EOS),
/// `globalstate` FULL, EOF, VM description.
pub fn precopy(ten: bool) -> Parts {
    let mut p = Parts::default();
    header_and_config(&mut p);
    p.push("open_rp", cmd(Command::OpenReturnPath));
    p.push("ping1", cmd(Command::Ping(1)));
    ram_start(&mut p, memsize());
    p.push("part_hdr", sec_part(0x02, RAM_ID));
    precopy_pages(&mut p);
    p.push("part_eos", word(0, RamFlags::EOS));
    p.push("part_footer", footer(RAM_ID));
    ram_tail_and_devices(&mut p, ten, true);
    p
}

/// The return path a destination writes for [`precopy`]: PONG(1), SHUT(0).
pub fn precopy_rp() -> Vec<u8> {
    cat(&[&rp(RpMessage::Pong(1)), &rp(RpMessage::Shut(0))])
}

/// The final `ram` block of [`precopy`] (and [`postcopy`]).
pub fn final_ram(postcopy: bool) -> Vec<u8> {
    let mut ram = vec![0u8; RAM_BYTES as usize];
    ram[..TPS as usize].copy_from_slice(&page0());
    ram[4 * TPS as usize..5 * TPS as usize].fill(FILL4);
    if postcopy {
        ram[2 * TPS as usize..3 * TPS as usize].copy_from_slice(&page2());
    }
    ram
}

/// The postcopy main channel: header, configuration, OPEN_RETURN_PATH, PING(1),
/// POSTCOPY_ADVISE(4096, 4096), `ram` START, PART (page 0, zero pages 1-3, page 4, EOS),
/// [SWITCHOVER_START], POSTCOPY_RAM_DISCARD(`ram`, [2 pages from page 2]), PING(2),
/// PACKAGED(LISTEN, `globalstate` FULL, PING(3), RUN), PING(4), PART (page 2 as PAGE|CONTINUE,
/// page 3 as ZERO|CONTINUE, EOS), END, EOF.
pub fn postcopy(ten: bool) -> Parts {
    let mut p = Parts::default();
    postcopy_head(&mut p, TPS, memsize());
    p.push("part_hdr", sec_part(0x02, RAM_ID));
    precopy_pages(&mut p);
    p.push("part_eos", word(0, RamFlags::EOS));
    p.push("part_footer", footer(RAM_ID));
    postcopy_switch(&mut p, ten, &cat(&[&be64(2 * TPS), &be64(2 * TPS)]));
    p.push("pc_part_hdr", sec_part(0x02, RAM_ID));
    p.push(
        "pc_page2",
        cat(&[
            &word(2 * TPS, RamFlags::PAGE.with(RamFlags::CONTINUE)),
            &page2(),
        ]),
    );
    p.push(
        "pc_zero3",
        cat(&[
            &word(3 * TPS, RamFlags::ZERO.with(RamFlags::CONTINUE)),
            &[0],
        ]),
    );
    p.push("pc_part_eos", word(0, RamFlags::EOS));
    p.push("pc_part_footer", footer(RAM_ID));
    ram_tail_and_devices(&mut p, false, false);
    p
}

/// The start of a postcopy main channel (the postcopy bases, 4 KiB and huge pages): header,
/// configuration, OPEN_RETURN_PATH, PING(1), POSTCOPY_ADVISE(`summary`, 4096), `ram` START with
/// the MEM_SIZE record `memsize`, EOS, footer.
pub fn postcopy_head(p: &mut Parts, summary: u64, memsize: Vec<u8>) {
    header_and_config(p);
    p.push("open_rp", cmd(Command::OpenReturnPath));
    p.push("ping1", cmd(Command::Ping(1)));
    p.push(
        "advise",
        cmd(Command::PostcopyAdvise(Some(Advise {
            ram_pagesize_summary: summary,
            target_page_size: TPS,
        }))),
    );
    ram_start(p, memsize);
}

/// The postcopy switch after the precopy part: [SWITCHOVER_START if `ten`],
/// POSTCOPY_RAM_DISCARD(`ram`, `ranges`), PING(2), PACKAGED(LISTEN, `globalstate` FULL,
/// PING(3), RUN) with each packaged record its own `pkg_*` part, PING(4).
pub fn postcopy_switch(p: &mut Parts, ten: bool, ranges: &[u8]) {
    if ten {
        p.push("switchover", cmd(Command::SwitchoverStart));
    }
    p.push(
        "discard",
        cmd(Command::RamDiscard(
            Discard::new(b"ram", ranges).expect("16-byte ranges"),
        )),
    );
    p.push("ping2", cmd(Command::Ping(2)));
    p.push("packaged", Vec::new());
    p.push("pkg_listen", cmd(Command::PostcopyListen));
    p.push("pkg_gs_hdr", sec_start(0x04, GS_ID, "globalstate", 1));
    p.push("pkg_gs_payload", globalstate());
    p.push("pkg_gs_footer", footer(GS_ID));
    p.push("pkg_ping3", cmd(Command::Ping(3)));
    p.push("pkg_run", cmd(Command::PostcopyRun));
    fix_package_len(p);
    p.push("ping4", cmd(Command::Ping(4)));
}

/// Recomputes the PACKAGED length after a case changed a `pkg_*` part.
pub fn fix_package_len(p: &mut Parts) {
    let len: u64 = p
        .parts
        .iter()
        .filter(|x| x.name.starts_with("pkg_"))
        .map(|x| x.bytes.len() as u64)
        .sum();
    p.set("packaged", cmd(Command::Packaged { len: len as u32 }));
}

/// The return path of [`postcopy`]: PONG 1, 2, 3, 4, SHUT(0).
pub fn postcopy_rp() -> Vec<u8> {
    cat(&[
        &rp(RpMessage::Pong(1)),
        &rp(RpMessage::Pong(2)),
        &rp(RpMessage::Pong(3)),
        &rp(RpMessage::Pong(4)),
        &rp(RpMessage::Shut(0)),
    ])
}

/// A return path exercising every message a 7.2 source accepts: PONG(1), REQ_PAGES_ID(page 5,
/// `ram`), REQ_PAGES(page 6), RECV_BITMAP(`ram`, pages 0-4 received), RESUME_ACK(1), SHUT(0).
pub fn rp_channel() -> Parts {
    let mut p = Parts::default();
    p.push("pong1", rp(RpMessage::Pong(1)));
    p.push(
        "req_id",
        rp(RpMessage::ReqPagesId {
            start: 5 * TPS,
            len: TPS as u32,
            name: b"ram",
        }),
    );
    p.push(
        "req",
        rp(RpMessage::ReqPages {
            start: 6 * TPS,
            len: TPS as u32,
        }),
    );
    let mut bm = PageBitmap::new(RAM_BYTES / TPS);
    for pg in 0..5 {
        bm.set(pg);
    }
    let mut bytes = Vec::new();
    bm.to_le_bytes(&mut bytes);
    p.push(
        "bitmap",
        rp(RpMessage::RecvBitmap {
            name: b"ram",
            bitmap: &bytes,
        }),
    );
    p.push("resume_ack", rp(RpMessage::ResumeAck(1)));
    p.push("shut", rp(RpMessage::Shut(0)));
    p
}

/// The guest RAM a source under a source-side case starts with. 7.2 profile: every page
/// non-zero and distinct (byte `j` of page `i` is `(131 i + 7 j) mod 251 + 1`), so each page
/// travels as data. 10.x profile (`ten`): all zero, because a QEMU 10.0 source of machine
/// `none` can neither have its RAM written through qtest without a CPU nor migrate an x86 CPU
/// without an x86 machine.
pub fn source_ram(ten: bool) -> Vec<u8> {
    let mut ram = vec![0u8; RAM_BYTES as usize];
    if ten {
        return ram;
    }
    for (i, pg) in ram.chunks_mut(TPS as usize).enumerate() {
        for (j, b) in pg.iter_mut().enumerate() {
            *b = ((131 * i + 7 * j) % 251 + 1) as u8;
        }
    }
    ram
}

/// The end mark after a RECV_BITMAP body.
pub fn end_mark() -> [u8; 8] {
    RECV_BITMAP_END_MARK.to_be_bytes()
}

/// A multifd RAM packet: the 320 fixed bytes (magic, version, `flags`, `pages_alloc`,
/// `normal_pages`, `next_packet_size`, `packet_num`, zero pages 0, unused, block `ram`), the
/// 128 offset slots (`offsets` first, the rest 0) and `data`.
pub fn multifd_packet(
    flags: u32,
    alloc: u32,
    offsets: &[u64],
    packet_num: u64,
    data: &[u8],
) -> Vec<u8> {
    let mut block = [0u8; 256];
    block[..3].copy_from_slice(b"ram");
    let mut slots = vec![0u8; 128 * 8];
    for (i, o) in offsets.iter().enumerate() {
        slots[i * 8..i * 8 + 8].copy_from_slice(&be64(*o));
    }
    cat(&[
        &be32(MULTIFD_MAGIC),
        &be32(1),
        &be32(flags),
        &be32(alloc),
        &be32(offsets.len() as u32),
        &be32(data.len() as u32),
        &be64(packet_num),
        &[0u8; 32],
        &block,
        &slots,
        data,
    ])
}

/// One multifd connection (channel 0): the 64-byte init packet (magic, version 1, zero UUID,
/// id 0), a RAM packet carrying page 4 filled with [`FILL4`] (128 pages allocated, 1 normal),
/// then a SYNC packet with no pages.
pub fn multifd_conn() -> Parts {
    let mut p = Parts::default();
    p.push(
        "init",
        cat(&[
            &be32(MULTIFD_MAGIC),
            &be32(1),
            &[0u8; 16],
            &[0u8; 8],
            &[0u8; 32],
        ]),
    );
    p.push(
        "pages",
        multifd_packet(0, 128, &[4 * TPS], 1, &vec![FILL4; TPS as usize]),
    );
    p.push("sync", multifd_packet(1, 0, &[], 2, &[]));
    p
}
