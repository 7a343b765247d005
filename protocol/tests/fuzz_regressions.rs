//! Regression tests for findings of the fuzz campaigns (`fuzz/README.md` lists them), each
//! reduced to the smallest stream that showed the problem.

use qmig_protocol::codes::{RamFlags, SectionType};
use qmig_protocol::command::Command;
use qmig_protocol::header::{encode_configuration, encode_header};
use qmig_protocol::limits::Limits;
use qmig_protocol::machine::{
    Destination, DestinationConfig, DiscardMemory, Event, Instant, MigrationStatus, RamBlockSpec,
};
use qmig_protocol::ram::{encode_mem_size, BlockInfo};
use qmig_protocol::section::{encode_footer, SectionHeader, SectionIdent};
use qmig_protocol::sink::Sink;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use qmig_protocol::{Profile, Rule, WireError};

const TPS: u64 = 4096;

/// Header, configuration `none`, a RAM SECTION_START announcing one 4-page block, EOF.
fn complete_stream() -> Vec<u8> {
    let mut s = Vec::new();
    encode_header(3, &mut s);
    encode_configuration(b"none", &[], &mut s);
    SectionHeader::Start(SectionIdent {
        section_id: 2,
        idstr: b"ram",
        instance_id: 0,
        version_id: 4,
    })
    .encode(&mut s);
    s.put_be64((4 * TPS) | RamFlags::MEM_SIZE.0);
    encode_mem_size(
        [BlockInfo {
            name: b"ram",
            used_length: 4 * TPS,
            page_size: None,
            mr_addr: None,
        }],
        &mut s,
    );
    s.put_be64(RamFlags::EOS.0);
    encode_footer(2, &mut s);
    s.put_u8(SectionType::EOF.0);
    s
}

/// Found by `fuzz/fuzz_targets/destination.rs`: bytes after EOF (other than one VM
/// description) on a channel that is still open made the completed destination try the
/// transition completed -> failed, reported as `Event::IllegalTransition`. The violation is
/// still reported (EOF-TRAILING at the offending byte); the migration stays completed.
#[test]
fn garbage_after_eof_keeps_a_completed_destination_completed() {
    let mut s = complete_stream();
    let eof_end = s.len() as u64;
    s.put(b"\x42garbage");
    let blocks = vec![RamBlockSpec::new("ram", 4 * TPS, TPS)];
    let mut d = Destination::new(DestinationConfig::new(
        Profile::QEMU_10,
        "none",
        blocks,
        false,
    ))
    .unwrap();
    d.handle_channel_opened(Instant(1)).unwrap();
    let r = d.handle_stream(Instant(2), &s, &mut DiscardMemory);
    let events: Vec<Event> = std::iter::from_fn(|| d.poll_event()).collect();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::IllegalTransition(_))),
        "{events:?}"
    );
    let v = r.expect_err("trailing bytes break EOF-TRAILING");
    assert_eq!((v.rule, v.offset), (Rule::EofTrailing, eof_end));
    assert_eq!(d.status(), MigrationStatus::Completed);
    d.handle_channel_closed(Instant(3));
    assert_eq!(d.status(), MigrationStatus::Completed);
    assert!(
        std::iter::from_fn(|| d.poll_event()).all(|e| !matches!(e, Event::IllegalTransition(_)))
    );
}

/// `complete_stream` without its EOF, then two device sections: `timer` (id 3, payload
/// `01 02`) and `blob` (id 4, a payload of `blob_len` bytes 0xAA), then EOF.
fn two_device_sections(blob_len: usize) -> Vec<u8> {
    let mut s = complete_stream();
    s.pop();
    for (id, idstr, payload) in [
        (3, &b"timer"[..], vec![1u8, 2]),
        (4, &b"blob"[..], vec![0xaa; blob_len]),
    ] {
        SectionHeader::Full(SectionIdent {
            section_id: id,
            idstr,
            instance_id: 0,
            version_id: 1,
        })
        .encode(&mut s);
        s.put(&payload);
        encode_footer(id, &mut s);
    }
    s.put_u8(SectionType::EOF.0);
    s
}

/// Decodes `s` with `feed` bytes more at a time (`usize::MAX`: all at once), final only
/// when everything is there; returns the items with the offsets after them.
fn decode_fed(s: &[u8], feed: usize) -> Vec<(u64, Item<'_>)> {
    decode_fed_with(s, feed).0
}

/// `decode_fed`, also returning the decoder at the end.
fn decode_fed_with(s: &[u8], feed: usize) -> (Vec<(u64, Item<'_>)>, StreamDecoder) {
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    let mut items = Vec::new();
    let (mut pos, mut end) = (0, 0);
    while pos < s.len() {
        end = end.max(pos);
        let r = if end == s.len() {
            d.decode_final(&s[pos..end])
        } else {
            d.decode(&s[pos..end])
        };
        match r {
            Ok((item, used)) => {
                pos += used;
                items.push((d.offset(), item));
            }
            Err(WireError::Incomplete { needed }) => {
                assert!(end < s.len(), "incomplete at the end of the input");
                end = end.saturating_add(feed.max(needed)).min(s.len());
            }
            Err(WireError::Invalid(v)) => panic!("{v:?}"),
        }
    }
    (items, d)
}

/// Found by profiling `fuzz/fuzz_targets/stream.rs` (40 executions per second): the footer
/// scan of a device payload validates a candidate footer by decoding the items after it, and
/// when those ran out of bytes the next call started that lookahead again from the candidate,
/// including the lookahead's own footer scan of the next device payload. A decoder fed a few
/// bytes at a time therefore spent time quadratic in the next device payload's length (a
/// 181-byte payload followed by a 51 KB one took 1.2 s fed byte by byte, 17 s under the
/// fuzzer's instrumentation). The lookahead is now kept and resumed. Here the `timer` footer
/// is only accepted once the whole 256 KiB `blob` payload after it has arrived; fed one byte
/// at a time (about 262 000 calls), the items are exactly those of one whole decode. Before
/// the fix this test took 36 s (debug build, loaded machine); with it, 0.15 s.
#[test]
fn footer_lookahead_resumes_instead_of_restarting_when_fed_byte_by_byte() {
    let blob_len = 256 << 10;
    let s = two_device_sections(blob_len);
    let whole = decode_fed(&s, usize::MAX);
    let payloads: Vec<&[u8]> = whole
        .iter()
        .filter_map(|(_, i)| match i {
            Item::DeviceData(p) => Some(*p),
            _ => None,
        })
        .collect();
    assert_eq!(payloads, [&[1u8, 2][..], &vec![0xaa; blob_len][..]]);
    assert_eq!(whole.last(), Some(&(s.len() as u64, Item::Eof)));
    assert_eq!(decode_fed(&s, 1), whole);
    assert_eq!(decode_fed(&s, 7), whole);
}

/// Found by `fuzz/fuzz_targets/stream.rs` (crash-906fa033, the first minute after the speed-up):
/// a PACKAGED blob starting with a stream header (`QEVM`) breaks CMD-PACKAGED-CONTENT, but the
/// decoder recognised the header only when 4 bytes were present; given the first byte or three
/// alone it reported SEC-TYPE (0x51 is no section type), so the rule depended on the chunking.
/// A prefix of the magic now waits for the rest, unless the channel or package ends there.
#[test]
fn header_in_a_package_is_the_same_violation_for_any_chunking() {
    let mut blob = Vec::new();
    encode_header(3, &mut blob);
    encode_configuration(b"none", &[], &mut blob);
    let expected = WireError::invalid(0, Rule::CmdPackagedContent, 0x51);
    let whole = StreamDecoder::new(Channel::Packaged, Profile::QEMU_7_2, Limits::DEFAULT)
        .decode_final(&blob)
        .map(|(_, n)| n);
    assert_eq!(whole, Err(expected));
    for feed in 1..=4 {
        let mut d = StreamDecoder::new(Channel::Packaged, Profile::QEMU_7_2, Limits::DEFAULT);
        let mut end = 0;
        let r = loop {
            match d.decode(&blob[..end]) {
                Err(WireError::Incomplete { needed }) => end += needed.max(feed),
                r => break r.map(|(_, n)| n),
            }
        };
        assert_eq!(r, Err(expected), "fed {feed} bytes at a time");
    }
    // A lone `Q` that ends the channel, or a package, cannot be a header: SEC-TYPE.
    let r = StreamDecoder::new(Channel::Packaged, Profile::QEMU_7_2, Limits::DEFAULT)
        .decode_final(b"Q")
        .map(|(_, n)| n);
    assert_eq!(r, Err(WireError::invalid(0, Rule::SecType, 0x51)));
    let mut s = complete_stream();
    s.pop();
    Command::Packaged { len: 1 }.encode(&mut s);
    let body_at = s.len() as u64;
    s.put(b"Q");
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_7_2, Limits::DEFAULT);
    let mut pos = 0;
    let r = loop {
        match d.decode(&s[pos..]) {
            Ok((_, n)) => pos += n,
            Err(e) => break e,
        }
    };
    assert_eq!(r, WireError::invalid(body_at, Rule::SecType, 0x51));
}

/// Found while profiling `fuzz/fuzz_targets/roundtrip.rs`: the footer scan looked for a footer
/// in the whole input, not only within the device cap. It scanned more than the cap (up to
/// all the bytes a caller had buffered, at every candidate of a lookahead), and a payload
/// longer than the cap broke SEC-DEVICE-LEN with a value that depended on the chunking: the
/// offset of a footer found past the cap when the input held one, else the input's length.
/// The scan now stops at cap + 5 bytes (the last place a footer within the cap can end); the
/// value is that window's length.
#[test]
fn device_payload_over_the_cap_is_the_same_violation_for_any_chunking() {
    let limits = Limits {
        max_device_payload: 16,
        ..Limits::DEFAULT
    };
    let mut s = complete_stream();
    s.pop();
    SectionHeader::Full(SectionIdent {
        section_id: 3,
        idstr: b"timer",
        instance_id: 0,
        version_id: 1,
    })
    .encode(&mut s);
    let payload_at = s.len() as u64;
    s.put(&[0x11; 20]);
    encode_footer(3, &mut s);
    s.put_u8(SectionType::EOF.0);
    let expected = WireError::invalid(payload_at, Rule::SecDeviceLen, 16 + 5);
    for feed in [1, 3, 7, s.len()] {
        let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, limits);
        let (mut pos, mut end) = (0, 0);
        let r = loop {
            end = end.max(pos);
            let r = if end == s.len() {
                d.decode_final(&s[pos..end])
            } else {
                d.decode(&s[pos..end])
            };
            match r {
                Ok((_, n)) => pos += n,
                Err(WireError::Incomplete { .. }) if end < s.len() => {
                    end = (end + feed).min(s.len())
                }
                Err(e) => break e,
            }
        };
        assert_eq!(r, expected, "fed {feed} bytes at a time");
    }
}

/// Found reading the code of finding 3: `resume_from` (the decoder of a postcopy recovery
/// channel, offset 0) copied the footer-scan progress of the old channel, keyed by offset only.
/// A recovery channel whose first device payload starts at the offset where the old channel's
/// scan stopped resumed that scan: it skipped the candidates before the old one and continued
/// the old lookahead, and here missed the real footer (SEC-DELIMIT at the end). The recovery
/// decoder now starts without it.
#[test]
fn a_recovery_channel_does_not_inherit_the_old_channels_footer_scan() {
    // Old channel: a device payload whose footer has not arrived; the scan stops with a
    // waiting lookahead after the lookalike `7E 00000003`.
    let mut s = complete_stream();
    s.pop();
    let ident = |section_id, idstr| SectionIdent {
        section_id,
        idstr,
        instance_id: 0,
        version_id: 1,
    };
    SectionHeader::Full(ident(3, b"timer")).encode(&mut s);
    let payload_at = s.len();
    s.put(&[0x55; 40]);
    encode_footer(3, &mut s);
    SectionHeader::Full(ident(4, b"blob")).encode(&mut s);
    s.put(&[0xaa; 8]);
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    let mut pos = 0;
    loop {
        match d.decode(&s[pos..]) {
            Ok((_, n)) => pos += n,
            Err(e) => {
                assert!(e.is_incomplete(), "{e:?}");
                break;
            }
        }
    }
    assert_eq!(pos, payload_at);
    // Recovery channel: RECV_BITMAP first (SM-RECOVER-NO-HEADER), commands as padding (PING:
    // 9 bytes, OPEN_RETURN_PATH: 5), then a PART of section 3 whose payload starts at the same
    // offset as the old channel's waiting payload, with its footer 3 bytes later.
    let mut r = StreamDecoder::resume_from(&d);
    let mut rec = Vec::new();
    Command::RecvBitmap { name: b"pc.ram" }.encode(&mut rec);
    while (payload_at - 5 - rec.len()) % 5 != 0 {
        Command::Ping(7).encode(&mut rec);
    }
    while rec.len() < payload_at - 5 {
        Command::OpenReturnPath.encode(&mut rec);
    }
    SectionHeader::Part { section_id: 3 }.encode(&mut rec);
    let rec_payload_at = rec.len();
    assert_eq!(rec_payload_at, payload_at);
    rec.put(&[1, 2, 3]);
    encode_footer(3, &mut rec);
    rec.put_u8(SectionType::EOF.0);
    let mut pos = 0;
    let mut payload = None;
    while let Ok((item, n)) = r.decode_final(&rec[pos..]) {
        if let Item::DeviceData(p) = item {
            payload = Some((pos, p));
        }
        pos += n;
    }
    assert_eq!(payload, Some((rec_payload_at, &[1u8, 2, 3][..])));
    assert_eq!(pos, rec.len(), "{:?}", r.decode_final(&rec[pos..]));
}

/// The stream of the footer-scan cost tests: `complete_stream` without its EOF, a device
/// section `dev` (id 3) whose payload is `units` copies of `unit` followed by `tail`, its
/// footer, EOF. Returns the stream and the payload's offset and length.
fn lookalike_payload(unit: &[u8], units: usize, tail: &[u8]) -> (Vec<u8>, usize, usize) {
    let mut s = complete_stream();
    s.pop();
    SectionHeader::Full(SectionIdent {
        section_id: 3,
        idstr: b"dev",
        instance_id: 0,
        version_id: 1,
    })
    .encode(&mut s);
    let at = s.len();
    for _ in 0..units {
        s.put(unit);
    }
    s.put(tail);
    let len = s.len() - at;
    encode_footer(3, &mut s);
    s.put_u8(SectionType::EOF.0);
    (s, at, len)
}

/// Decodes the whole `s` fed `feed` bytes at a time (see `decode_fed`); returns the device
/// payloads' (end offset, length) and the footer-scan work count at the end.
fn payloads_and_work(s: &[u8], feed: usize) -> (Vec<(usize, usize)>, u64) {
    let (items, d) = decode_fed_with(s, feed);
    let payloads = items
        .iter()
        .filter_map(|(end, i)| match i {
            Item::DeviceData(p) => Some((*end as usize, p.len())),
            _ => None,
        })
        .collect();
    (payloads, d.footer_scan_work())
}

/// A candidate `7E 00000003` of section `dev` followed by a SECTION_FULL of section `id`
/// (whose footer never comes): the candidate's lookahead scans for that footer to the end of
/// the input (or of the device cap) before rejecting it.
fn fake_footer_unit(id: u32) -> Vec<u8> {
    let mut u = Vec::new();
    encode_footer(3, &mut u);
    SectionHeader::Full(SectionIdent {
        section_id: id,
        idstr: b"x",
        instance_id: 0,
        version_id: 1,
    })
    .encode(&mut u);
    u
}

/// The open item of the second session (`fuzz/README.md`, finding 8): a device payload full of
/// lookalike footers, each followed by the header of a section whose footer never comes, cost
/// (candidates) x (bytes after them) of footer search: every candidate's lookahead searched
/// the rest of the input again for another footer (about 18 s of CPU for a 1 MiB payload).
/// The footer search of a payload is now shared by all its lookaheads and indexes the bytes
/// once its direct searching exceeds a small multiple of the bytes seen. Here 64 KiB of
/// lookalikes with a new section id each (so that no per-id memory helps), then 192 KiB of
/// filler, decoded at once and fed 64 KiB at a time as `qmig-dst` reads: the payload is the
/// whole region (every lookalike rejected), and the work (bytes searched, positions
/// indexed, index probes, candidates validated; counted, not timed) stays within 16 times
/// the stream's length. Before the fix it was about 3 300 x 250 KiB = 800 MB of search.
#[test]
fn lookalike_footers_cost_linear_footer_search() {
    let mut region = Vec::new();
    let mut id = 1000;
    while region.len() < 64 << 10 {
        region.extend(fake_footer_unit(id));
        id += 1;
    }
    let candidates = id - 1000;
    let (s, at, len) = lookalike_payload(&region, 1, &vec![0x11; 192 << 10]);
    for feed in [usize::MAX, 64 << 10] {
        let (payloads, work) = payloads_and_work(&s, feed);
        assert_eq!(payloads, [(at + len, len)], "fed {feed}");
        assert!(
            work <= 16 * s.len() as u64,
            "fed {feed}: work {work} for {} bytes ({candidates} candidates)",
            s.len()
        );
    }
}

/// Found by the `destination` campaign's rate after the fix above (`fuzz/README.md`, finding
/// 9): fed one byte at a time, a decoder searches each byte about 5 times (a footer-sized
/// window's last 4 bytes again at every call), exceeded the direct-search budget and then
/// indexed its one new byte per call as a new run of the index, empty runs were never merged,
/// and every search probed all of them: quadratic (22 s for this stream in a release build).
/// Counted, not timed: the work stays within 16 times the stream's length.
#[test]
fn byte_by_byte_feeding_keeps_the_footer_index_small() {
    let s = two_device_sections(256 << 10);
    let (items, d) = decode_fed_with(&s, 1);
    assert_eq!(items, decode_fed(&s, usize::MAX));
    let work = d.footer_scan_work();
    assert!(
        work <= 16 * s.len() as u64,
        "work {work} for {} bytes",
        s.len()
    );
}

/// The same shape one level down: lookalike footers of `dev` each followed by a SECTION_FULL
/// of section 5 and a lookalike footer of section 5 followed by a SECTION_FULL of section
/// `id` whose footer never comes. Every `dev` candidate's lookahead scans section 5's payload,
/// whose every candidate's lookahead searches for the footer of `id`. Each `dev` candidate
/// used to validate again all the section-5 candidates after it (quadratic: about 8.5 million
/// work steps for 96 KiB, 4 minutes of CPU for a 1 MiB payload); a scan inside a lookahead now
/// validates at most 16 candidates and then rejects the enclosing candidate (spec: stream.md,
/// footer scan), so the work is linear and the true footer is still the one found.
#[test]
fn nested_lookalike_footers_cost_linear_footer_search() {
    let mut region = Vec::new();
    let mut id = 1000;
    while region.len() < 32 << 10 {
        encode_footer(3, &mut region);
        SectionHeader::Full(SectionIdent {
            section_id: 5,
            idstr: b"y",
            instance_id: 0,
            version_id: 1,
        })
        .encode(&mut region);
        let mut u = Vec::new();
        encode_footer(5, &mut u);
        region.extend(&u);
        region.extend(&fake_footer_unit(id)[5..]);
        id += 1;
    }
    let (s, at, len) = lookalike_payload(&region, 1, &vec![0x11; 64 << 10]);
    let (payloads, work) = payloads_and_work(&s, usize::MAX);
    assert_eq!(payloads, [(at + len, len)]);
    assert!(
        work <= 16 * s.len() as u64,
        "work {work} for {} bytes",
        s.len()
    );
}

/// Found by `fuzz/fuzz_targets/destination.rs` (crash-9432312f, `fuzz/README.md` finding 10):
/// a footer scan that stopped for want of bytes kept its candidate's lookahead with the bytes
/// it had used, and resumed it on the next call by slicing the input past them; a next call
/// with fewer bytes at the same offset (here directly; in the campaign through the
/// `Destination`) sliced out of range and panicked. A kept lookahead now resumes only when the
/// input still holds its bytes; otherwise the candidate starts again.
#[test]
fn a_shorter_input_after_incomplete_does_not_panic() {
    let s = two_device_sections(4096);
    let whole = decode_fed(&s, usize::MAX);
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    let mut pos = 0;
    // Up to the `timer` payload (items before it decode).
    let timer_at = loop {
        let before = d.offset() as usize;
        match d.decode(&s[pos..s.len() - 100]) {
            Ok((Item::Section(SectionHeader::Full(i)), n)) if i.section_id == 3 => {
                break before + n
            }
            Ok((_, n)) => pos += n,
            Err(e) => panic!("{e:?}"),
        }
    };
    pos = timer_at;
    // The lookahead after the candidate `7E 00000003` waits inside the `blob` payload ...
    let long = d.decode(&s[pos..s.len() - 100]).map(|(_, n)| n);
    assert_eq!(long, Err(WireError::Incomplete { needed: 1 }));
    // ... then fewer bytes than it used (the candidate and 3 bytes after it).
    let short = d.decode(&s[pos..pos + 2 + 5 + 3]).map(|(_, n)| n);
    assert_eq!(short, Err(WireError::Incomplete { needed: 1 }));
    // With the rest, the same items as a whole decode.
    let mut items = Vec::new();
    while pos < s.len() {
        let (item, n) = d.decode_final(&s[pos..]).expect("decodes");
        pos += n;
        items.push((d.offset(), item));
    }
    assert_eq!(items[..], whole[whole.len() - items.len()..]);
    assert_eq!(items[0].1, Item::DeviceData(&[1, 2]));
}
