//! The huge-page synthetic base: machine `none` with one block `ram` of [`HUGE_RAM_BYTES`]
//! (two host pages) whose page size is [`HUGE_PAGE`] (2 MiB, a hugetlbfs block), migrated in
//! postcopy; and its recovery, cut in the middle of a host page.
//!
//! What differs from the 4 KiB postcopy base ([`super::base::postcopy`]): POSTCOPY_ADVISE
//! announces the page-size summary 2 MiB; the MEM_SIZE entry of `ram` carries the be64
//! `page_size` field (RAM-PAGESIZE: present because postcopy is advised and the block's page
//! size is not the host's 4 KiB); RAM_DISCARD covers host page 1 whole; after POSTCOPY_RUN the
//! 512 target pages of host page 1 arrive consecutively (RAM-HOSTPAGE), the first naming its
//! block, so a destination places the host page atomically once its last target page is in.

use super::base::{self, footer, named, sec_part, word, FILL4, RAM_ID, SEED};
use super::build::{be64, cat, Parts};
use crate::qemu::pattern::random_page;
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::codes::RamFlags;

/// Size of the huge-page block `ram` (4 MiB: two host pages).
pub const HUGE_RAM_BYTES: u64 = 4 << 20;
/// Page size of the huge-page block `ram` (its host page: 2 MiB).
pub const HUGE_PAGE: u64 = 2 << 20;
/// Target page size.
const TPS: u64 = base::TPS;
/// Target pages per host page.
const PER_HOST: u64 = HUGE_PAGE / TPS;
/// First target page of host page 1.
const HP1: u64 = PER_HOST;
/// Last target page of host page 1 (the block's last page).
const HP1_LAST: u64 = 2 * PER_HOST - 1;
/// Zero target pages of host page 1 the recovery's cut main channel carries whole before the cut.
pub const CUT_AFTER_ZEROS: usize = 100;

/// Page 512's content sent in precopy (discarded before the switch).
fn page512_precopy() -> Vec<u8> {
    random_page(SEED, HP1, 0)
}

/// Page 512's content sent after POSTCOPY_RUN.
fn page512() -> Vec<u8> {
    random_page(SEED, HP1, 1)
}

/// Page 1023's content sent after POSTCOPY_RUN.
fn page1023() -> Vec<u8> {
    random_page(SEED, HP1_LAST, 1)
}

/// The MEM_SIZE record of the block list `[("ram", HUGE_RAM_BYTES, page size HUGE_PAGE)]`.
pub fn memsize() -> Vec<u8> {
    cat(&[
        &word(HUGE_RAM_BYTES, RamFlags::MEM_SIZE),
        &[3],
        b"ram",
        &be64(HUGE_RAM_BYTES),
        &be64(HUGE_PAGE),
    ])
}

/// Offset of the `page_size` field inside [`memsize`] (header word, counted name, length).
pub const PAGE_SIZE_FIELD: u64 = 8 + 1 + 3 + 8;

/// Host page 1 as postcopy sends it: parts `hp1_first` (page 512 as PAGE naming `ram`),
/// `hp1_zeros` (pages 513-1022 as ZERO|CONTINUE, one part) and `hp1_last` (page 1023 as
/// PAGE|CONTINUE).
fn host_page_1(p: &mut Parts) {
    p.push(
        "hp1_first",
        cat(&[&named(HP1 * TPS, RamFlags::PAGE, "ram"), &page512()]),
    );
    let zeros: Vec<u8> = (HP1 + 1..HP1_LAST)
        .flat_map(|pg| {
            cat(&[
                &word(pg * TPS, RamFlags::ZERO.with(RamFlags::CONTINUE)),
                &[0],
            ])
        })
        .collect();
    p.push("hp1_zeros", zeros);
    p.push(
        "hp1_last",
        cat(&[
            &word(HP1_LAST * TPS, RamFlags::PAGE.with(RamFlags::CONTINUE)),
            &page1023(),
        ]),
    );
}

/// The huge-page postcopy main channel: header, configuration, OPEN_RETURN_PATH, PING(1),
/// POSTCOPY_ADVISE(2 MiB summary, 4096), `ram` START (MEM_SIZE with `page_size` 2 MiB, EOS),
/// PART (page 0, zero pages 1-3, page 4 filled with [`FILL4`], page 512, EOS),
/// [SWITCHOVER_START on 10.x], POSTCOPY_RAM_DISCARD(`ram`, host page 1), PING(2),
/// PACKAGED(LISTEN, `globalstate` FULL, PING(3), RUN), PING(4), PART (host page 1: pages
/// 512-1023, consecutive, EOS), END, EOF.
pub fn postcopy(ten: bool) -> Parts {
    let mut p = Parts::default();
    base::postcopy_head(&mut p, HUGE_PAGE, memsize());
    p.push("part_hdr", sec_part(0x02, RAM_ID));
    base::precopy_pages(&mut p);
    p.push(
        "page512",
        cat(&[
            &word(HP1 * TPS, RamFlags::PAGE.with(RamFlags::CONTINUE)),
            &page512_precopy(),
        ]),
    );
    p.push("part_eos", word(0, RamFlags::EOS));
    p.push("part_footer", footer(RAM_ID));
    base::postcopy_switch(&mut p, ten, &cat(&[&be64(HUGE_PAGE), &be64(HUGE_PAGE)]));
    p.push("pc_part_hdr", sec_part(0x02, RAM_ID));
    host_page_1(&mut p);
    p.push("pc_part_eos", word(0, RamFlags::EOS));
    p.push("pc_part_footer", footer(RAM_ID));
    base::ram_tail_and_devices(&mut p, false, false);
    p
}

/// The final `ram` block of [`postcopy`] (and of the recovery): page 0, page 4 filled with
/// [`FILL4`], pages 512 and 1023 as sent after POSTCOPY_RUN, the rest zero.
pub fn final_ram() -> Vec<u8> {
    let mut ram = vec![0u8; HUGE_RAM_BYTES as usize];
    let at = |pg: u64| (pg * TPS) as usize..((pg + 1) * TPS) as usize;
    ram[at(0)].copy_from_slice(&base::page0());
    ram[at(4)].fill(FILL4);
    ram[at(HP1)].copy_from_slice(&page512());
    ram[at(HP1_LAST)].copy_from_slice(&page1023());
    ram
}

/// The main channel of the huge-page recovery: [`postcopy`] up to host page 1's first page and
/// [`CUT_AFTER_ZEROS`] of its zero pages after POSTCOPY_RUN, then the first 4 bytes of the next
/// zero page's record, where the channel is cut: host page 1 is incomplete, so a destination
/// drops it (SM-PARTIAL-HOSTPAGE) and its received bits stay clear.
pub fn recovery_main(ten: bool) -> Parts {
    let mut p = postcopy(ten);
    let rec = 9 * CUT_AFTER_ZEROS;
    p.get("hp1_zeros").truncate(rec + 4);
    p.truncate_at("hp1_last");
    p
}

/// Received bits of `ram` at the cut: pages 0-4 from precopy (page 512 was discarded and host
/// page 1 dropped unfinished).
pub fn received_at_cut() -> PageBitmap {
    let mut bm = PageBitmap::new(HUGE_RAM_BYTES / TPS);
    bm.set_range(0, 5);
    bm
}

/// A valid recovery channel after [`recovery_main`]: RECV_BITMAP(`ram`), POSTCOPY_RESUME, `ram`
/// PART (host page 1 whole again, its first page naming `ram`, EOS), END (EOS), EOF.
pub fn recovery_channel() -> Parts {
    super::recovery::channel_with(host_page_1)
}

/// The return path a destination writes on [`recovery_channel`]: RECV_BITMAP(`ram`,
/// [`received_at_cut`]: host page 1 clear), RESUME_ACK(1), SHUT(0).
pub fn recovery_channel_rp() -> Vec<u8> {
    super::recovery::rp_for(&received_at_cut())
}
