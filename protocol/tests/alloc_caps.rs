//! Allocation caps under hostile lengths.
//!
//! A counting global allocator (per thread, so that tests running in parallel do not disturb
//! each other) measures the peak of live heap bytes while a decoder or a machine takes a stream
//! that claims huge lengths: PACKAGED of 4 GiB, RECV_BITMAP of 2^63 bytes, a VM description of
//! 4 GiB, 255-byte names over and over, discard lists of a million ranges, MEM_SIZE lists with
//! more blocks than the cap, and more sections than the cap. Each case asserts the typed
//! violation (rule and offset) where there is one, and that the peak stays within the bound
//! that `protocol/src/limits.rs` documents, independent of the claimed length.

use qmig_protocol::codes::{RamFlags, SectionType, RECV_BITMAP_END_MARK};
use qmig_protocol::command::{encode_ranges, Advise, Command, Discard};
use qmig_protocol::header::{encode_configuration, encode_header};
use qmig_protocol::limits::Limits;
use qmig_protocol::machine::{
    Destination, DestinationConfig, DiscardMemory, Event, Instant, MigrationStatus, RamBlockSpec,
    Source, SourceConfig,
};
use qmig_protocol::ram::{encode_mem_size, BlockInfo};
use qmig_protocol::rp::{RpDecoder, RpMessage};
use qmig_protocol::section::{encode_footer, SectionHeader, SectionIdent};
use qmig_protocol::sink::Sink;
use qmig_protocol::stream::{Channel, StreamDecoder};
use qmig_protocol::{Profile, Rule, WireError};
use std::alloc::{GlobalAlloc, Layout, System};
use std::cell::Cell;

struct Counting;

thread_local! {
    static LIVE: Cell<isize> = const { Cell::new(0) };
    static PEAK: Cell<isize> = const { Cell::new(0) };
}

fn note(delta: isize) {
    let _ = LIVE.try_with(|l| {
        let v = l.get() + delta;
        l.set(v);
        let _ = PEAK.try_with(|p| {
            if v > p.get() {
                p.set(v)
            }
        });
    });
}

// SAFETY: forwards to the system allocator unchanged; only counts sizes in thread-locals with
// const initialisers (which never allocate).
unsafe impl GlobalAlloc for Counting {
    unsafe fn alloc(&self, l: Layout) -> *mut u8 {
        note(l.size() as isize);
        System.alloc(l)
    }
    unsafe fn alloc_zeroed(&self, l: Layout) -> *mut u8 {
        note(l.size() as isize);
        System.alloc_zeroed(l)
    }
    unsafe fn dealloc(&self, p: *mut u8, l: Layout) {
        note(-(l.size() as isize));
        System.dealloc(p, l)
    }
    unsafe fn realloc(&self, p: *mut u8, l: Layout, new: usize) -> *mut u8 {
        note(new as isize - l.size() as isize);
        System.realloc(p, l, new)
    }
}

#[global_allocator]
static A: Counting = Counting;

/// Runs `f` and returns its result and the peak of heap bytes it held above what was live
/// before it started.
fn peak<R>(f: impl FnOnce() -> R) -> (R, usize) {
    let base = LIVE.with(Cell::get);
    PEAK.with(|p| p.set(base));
    let r = f();
    let top = PEAK.with(Cell::get);
    (r, (top - base).max(0) as usize)
}

const TPS: u64 = 4096;
/// What a decoder may hold for bookkeeping, whatever the claimed lengths (a few records'
/// worth of tables and queues).
const SMALL: usize = 64 << 10;

fn preamble(profile: Profile) -> Vec<u8> {
    let mut v = Vec::new();
    encode_header(3, &mut v);
    if profile.configuration {
        encode_configuration(b"none", &[], &mut v);
    }
    v
}

fn cmd(c: Command<'_>, out: &mut Vec<u8>) {
    c.encode(out);
}

/// Decodes `stream` as a whole main channel; returns the first violation.
fn decode_all(stream: &[u8], limits: Limits) -> Option<qmig_protocol::Violation> {
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, limits);
    let mut pos = 0;
    loop {
        match d.decode_final(&stream[pos..]) {
            Ok((_, n)) => pos += n,
            Err(WireError::Invalid(v)) => return Some(v),
            Err(WireError::Incomplete { .. }) => return None,
        }
    }
}

fn destination(pages: u64, postcopy: bool) -> Destination {
    let blocks = vec![RamBlockSpec::new("ram", pages * TPS, TPS)];
    let mut d = Destination::new(DestinationConfig::new(
        Profile::QEMU_10,
        "none",
        blocks,
        postcopy,
    ))
    .unwrap();
    d.handle_channel_opened(Instant(1)).unwrap();
    d
}

/// Feeds `stream` to `d` like a binary would (keeping unconsumed bytes); returns the violation.
fn feed(d: &mut Destination, stream: &[u8]) -> Option<qmig_protocol::Violation> {
    let mut pos = 0;
    loop {
        match d.handle_stream(Instant(2), &stream[pos..], &mut DiscardMemory) {
            Ok(0) => return None,
            Ok(n) => pos += n,
            Err(v) => return Some(v),
        }
        while d.poll_event().is_some() {}
    }
}

#[test]
fn packaged_of_4_gib_is_refused_before_any_allocation() {
    let mut s = preamble(Profile::QEMU_10);
    let at = s.len() as u64;
    cmd(Command::Packaged { len: u32::MAX }, &mut s);
    let (v, bytes) = peak(|| decode_all(&s, Limits::DEFAULT));
    let v = v.expect("a violation");
    assert_eq!(
        (v.rule, v.offset, v.value),
        (Rule::CmdPackagedLen, at + 5, u32::MAX as u64)
    );
    assert!(bytes <= SMALL, "decoder held {bytes} bytes");

    let mut d = destination(16, true);
    let (v, bytes) = peak(|| feed(&mut d, &s));
    assert_eq!(v.map(|v| v.rule), Some(Rule::CmdPackagedLen));
    assert!(bytes <= SMALL, "destination held {bytes} bytes");
    assert_eq!(d.status(), MigrationStatus::Failed);
}

#[test]
fn packaged_at_the_cap_is_decoded_in_place_without_buffering() {
    // A PACKAGED blob at exactly the cap, with only its first bytes present: the decoder
    // borrows the blob from the input and never reserves its length.
    let mut s = preamble(Profile::QEMU_10);
    cmd(
        Command::Packaged {
            len: Limits::DEFAULT.max_packaged,
        },
        &mut s,
    );
    cmd(Command::PostcopyListen, &mut s);
    let (v, bytes) = peak(|| decode_all(&s, Limits::DEFAULT));
    assert!(v.is_none() || v.unwrap().rule == Rule::CmdPackagedContent);
    assert!(
        bytes <= SMALL,
        "decoder held {bytes} bytes for a 16 MiB package"
    );
}

#[test]
fn recv_bitmap_of_2_pow_63_bytes_is_refused_before_any_allocation() {
    let mut m = Vec::new();
    m.put_be16(5);
    m.put_be16(4);
    m.put_str8(b"ram");
    let size_at = m.len() as u64;
    m.put_be64(1 << 63);
    m.put_be64(RECV_BITMAP_END_MARK);

    let mut d = RpDecoder::new(Profile::QEMU_10, Limits::DEFAULT);
    let (r, bytes) = peak(|| d.decode(&m, &|_| None));
    match r {
        Err(WireError::Invalid(v)) => {
            assert_eq!(
                (v.rule, v.offset, v.value),
                (Rule::RpBitmapSize, size_at, 1 << 63)
            )
        }
        other => panic!("{other:?}"),
    }
    assert_eq!(bytes, 0);
    let (r, _) = peak(|| d.decode(&m, &|_| Some(2048)));
    assert_eq!(r.unwrap_err().violation().unwrap().rule, Rule::RpBitmapSize);

    // The source: whatever its state, the message costs no allocation sized by the claim.
    let blocks = vec![RamBlockSpec::new("ram", 16 * TPS, TPS)];
    let mut src = Source::new(SourceConfig::new(Profile::QEMU_10, "none", blocks, true));
    src.handle_channel_opened(Instant(1)).unwrap();
    let (r, bytes) = peak(|| src.handle_return_path(Instant(2), &m));
    assert!(r.is_err(), "a bitmap nobody asked for is refused");
    assert!(bytes <= SMALL, "source held {bytes} bytes");
}

#[test]
fn vm_description_of_4_gib_is_refused_and_one_at_the_cap_is_not_buffered() {
    let mut s = preamble(Profile::QEMU_10);
    s.put_u8(SectionType::EOF.0);
    let at = s.len() as u64;
    let mut huge = s.clone();
    huge.put_u8(SectionType::VMDESCRIPTION.0);
    huge.put_be32(u32::MAX);
    huge.put(b"{\"page_size\":");
    let (v, bytes) = peak(|| decode_all(&huge, Limits::DEFAULT));
    let v = v.expect("a violation");
    assert_eq!(
        (v.rule, v.offset, v.value),
        (Rule::VmdescLen, at + 1, u32::MAX as u64)
    );
    assert!(bytes <= SMALL);

    let mut cap = s;
    cap.put_u8(SectionType::VMDESCRIPTION.0);
    cap.put_be32(Limits::DEFAULT.max_vmdesc);
    cap.put(b"{\"page_size\":");
    let (v, bytes) = peak(|| decode_all(&cap, Limits::DEFAULT));
    assert_eq!(v, None, "a description at the cap waits for its bytes");
    assert!(bytes <= SMALL, "decoder held {bytes} bytes");
}

#[test]
fn vm_description_nesting_is_capped() {
    // Deep nesting inside the length cap: the parser stops at the depth cap (or serde_json's
    // own recursion limit), holding memory proportional to the input at most.
    let depth = 100_000;
    let mut j = String::from("{\"page_size\":4096,\"devices\":[{\"name\":\"d\",\"instance_id\":0,\"vmsd_name\":\"d\",\"version\":1,\"fields\":[");
    for _ in 0..depth {
        j.push_str("{\"name\":\"f\",\"type\":\"struct\",\"size\":0,\"struct\":{\"vmsd_name\":\"s\",\"fields\":[");
    }
    let (r, bytes) =
        peak(|| qmig_protocol::vmdesc::VmDesc::parse(j.as_bytes(), 7, &Limits::DEFAULT));
    let v = *r.unwrap_err().violation().unwrap();
    assert!(
        matches!(v.rule, Rule::VmdescJson | Rule::DevNesting),
        "{v:?}"
    );
    assert_eq!(v.offset, 7);
    assert!(
        bytes <= j.len() + SMALL,
        "parser held {bytes} bytes for {} input",
        j.len()
    );
}

#[test]
fn names_of_255_bytes_repeated_cost_nothing_per_record() {
    let name = [b'n'; 255];
    // RAM records naming a 255-byte block, 100 000 times, inside a RAM section.
    let mut s = preamble(Profile::QEMU_10);
    SectionHeader::Start(SectionIdent {
        section_id: 2,
        idstr: b"ram",
        instance_id: 0,
        version_id: 4,
    })
    .encode(&mut s);
    s.put_be64((16 * TPS) | RamFlags::MEM_SIZE.0);
    encode_mem_size(
        [BlockInfo {
            name: &name,
            used_length: 16 * TPS,
            page_size: None,
            mr_addr: None,
        }],
        &mut s,
    );
    for i in 0..100_000u64 {
        s.put_be64(((i % 16) * TPS) | RamFlags::ZERO.0);
        s.put_str8(&name);
        s.put_u8(0);
    }
    s.put_be64(RamFlags::EOS.0);
    encode_footer(2, &mut s);
    let (v, bytes) = peak(|| decode_all(&s, Limits::DEFAULT));
    assert_eq!(v, None);
    assert!(
        bytes <= SMALL,
        "decoder held {bytes} bytes over 100 000 named records"
    );

    // Page requests naming a 255-byte block, 100 000 times, on the return path.
    let mut rp = Vec::new();
    for i in 0..100_000u64 {
        RpMessage::ReqPagesId {
            start: i * TPS,
            len: TPS as u32,
            name: &name,
        }
        .encode(&mut rp);
    }
    let mut d = RpDecoder::new(Profile::QEMU_10, Limits::DEFAULT);
    let (n, bytes) = peak(|| {
        let mut pos = 0;
        let mut n = 0;
        while let Ok((_, used)) = d.decode(&rp[pos..], &|_| None) {
            pos += used;
            n += 1;
        }
        n
    });
    assert_eq!(n, 100_000);
    assert_eq!(bytes, 0, "the return-path decoder never allocates");
}

#[test]
fn a_million_discarded_ranges_cost_nothing_per_range() {
    const PAGES: u64 = 1024;
    let mut s = preamble(Profile::QEMU_10);
    cmd(Command::OpenReturnPath, &mut s);
    cmd(
        Command::PostcopyAdvise(Some(Advise {
            ram_pagesize_summary: TPS,
            target_page_size: TPS,
        })),
        &mut s,
    );
    SectionHeader::Start(SectionIdent {
        section_id: 2,
        idstr: b"ram",
        instance_id: 0,
        version_id: 4,
    })
    .encode(&mut s);
    s.put_be64((PAGES * TPS) | RamFlags::MEM_SIZE.0);
    encode_mem_size(
        [BlockInfo {
            name: b"ram",
            used_length: PAGES * TPS,
            page_size: None,
            mr_addr: None,
        }],
        &mut s,
    );
    s.put_be64(RamFlags::EOS.0);
    encode_footer(2, &mut s);
    // A RAM_DISCARD body is at most 65535 bytes: 4095 ranges per command.
    let per_cmd = 4095usize;
    let ranges: Vec<(u64, u64)> = (0..per_cmd as u64)
        .map(|i| ((i % PAGES) * TPS, TPS))
        .collect();
    let mut raw = Vec::new();
    encode_ranges(&ranges, &mut raw);
    let commands = 1_000_000 / per_cmd + 1;
    for _ in 0..commands {
        cmd(
            Command::RamDiscard(Discard::new(b"ram", &raw).unwrap()),
            &mut s,
        );
    }
    let mut d = destination(PAGES, true);
    let (v, bytes) = peak(|| feed(&mut d, &s));
    assert_eq!(v, None, "valid discards are accepted");
    let errors: Vec<Event> = std::iter::from_fn(|| d.poll_event())
        .filter(|e| matches!(e, Event::Error { .. } | Event::IllegalTransition(_)))
        .collect();
    assert!(errors.is_empty(), "{errors:?}");
    assert!(
        bytes <= SMALL,
        "destination held {bytes} bytes over {} ranges",
        commands * per_cmd
    );
}

fn mem_size_stream(blocks: u32, limits_blocks: u32) -> (Vec<u8>, u64, Limits) {
    let mut s = preamble(Profile::QEMU_10);
    SectionHeader::Start(SectionIdent {
        section_id: 2,
        idstr: b"ram",
        instance_id: 0,
        version_id: 4,
    })
    .encode(&mut s);
    let at = s.len() as u64;
    s.put_be64((blocks as u64 * TPS) | RamFlags::MEM_SIZE.0);
    let names: Vec<Vec<u8>> = (0..blocks)
        .map(|i| {
            let mut n = format!("{i:08}").into_bytes();
            n.resize(255, b'x');
            n
        })
        .collect();
    encode_mem_size(
        names.iter().map(|n| BlockInfo {
            name: n,
            used_length: TPS,
            page_size: None,
            mr_addr: None,
        }),
        &mut s,
    );
    s.put_be64(RamFlags::EOS.0);
    encode_footer(2, &mut s);
    let limits = Limits {
        max_blocks: limits_blocks,
        ..Limits::DEFAULT
    };
    (s, at, limits)
}

#[test]
fn mem_size_with_more_blocks_than_the_cap_is_refused_and_at_the_cap_is_bounded() {
    let cap = Limits::DEFAULT.max_blocks;
    let (s, at, limits) = mem_size_stream(cap + 1, cap);
    let (v, bytes) = peak(|| decode_all(&s, limits));
    let v = v.expect("a violation");
    assert_eq!(v.rule, Rule::RamMemSizeCount);
    assert!(v.offset >= at, "{v:?}");
    assert!(bytes <= SMALL, "decoder held {bytes} bytes before refusing");

    // At the cap, the decoder keeps one owned entry per block: bounded by the cap.
    let (s, _, limits) = mem_size_stream(cap, cap);
    let (v, bytes) = peak(|| decode_all(&s, limits));
    assert_eq!(v, None);
    let bound = 2 * cap as usize * std::mem::size_of::<qmig_protocol::stream::BlockInfoOwned>();
    assert!(
        bytes <= bound + SMALL,
        "decoder held {bytes} bytes (bound {bound})"
    );
}

#[test]
fn sections_beyond_the_cap_are_refused() {
    // Distinct section ids with 255-byte idstrs and empty payloads, over and over: the section
    // table must not grow with the stream.
    let idstr = [b'd'; 255];
    let mut s = preamble(Profile::QEMU_10);
    let n = 20_000u32;
    let cap = Limits::DEFAULT.max_sections;
    let mut first_over = 0;
    for id in 0..n {
        if id == cap {
            first_over = s.len() as u64;
        }
        SectionHeader::Full(SectionIdent {
            section_id: 100 + id,
            idstr: &idstr,
            instance_id: id,
            version_id: 1,
        })
        .encode(&mut s);
        encode_footer(100 + id, &mut s);
    }
    s.put_u8(SectionType::EOF.0);
    let (v, bytes) = peak(|| decode_all(&s, Limits::DEFAULT));
    let bound = Limits::DEFAULT.max_sections as usize
        * 2
        * std::mem::size_of::<qmig_protocol::stream::SectionInfo>();
    assert!(
        bytes <= bound + SMALL,
        "decoder held {bytes} bytes for {n} sections"
    );
    let v = v.expect("sections beyond the cap are refused");
    // The section past the cap breaks SEC-UNKNOWN-DEVICE; without a VM description the footer
    // scan of the section before it sees that as an implausible footer, so the stream stops
    // there (no footer the next items validate: SEC-DELIMIT, or SEC-DEVICE-LEN once the rest is
    // longer than a device payload may be).
    assert!(
        matches!(
            v.rule,
            Rule::SecUnknownDevice | Rule::SecDelimit | Rule::SecDeviceLen
        ),
        "{v:?}"
    );
    assert!(
        v.offset <= first_over,
        "{v:?} after section {cap} at {first_over}"
    );
    // At most a lookahead depth of sections before it (each is 274 bytes here).
    assert!(
        v.offset >= first_over - 4 * 274,
        "{v:?} long before section {cap} at {first_over}"
    );
}
