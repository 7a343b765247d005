//! Rule-level tests of the stream decoder on hand-built streams.

use super::*;
use crate::command::Command;
use crate::header::{encode_configuration, encode_header};
use crate::ram::{encode_mem_size, BlockInfo};
use crate::section::{encode_footer, SectionHeader, SectionIdent};
use crate::sink::Sink;
use alloc::vec::Vec;

fn start(out: &mut Vec<u8>, ty: u8, id: u32, idstr: &[u8], version: u32) {
    let ident = SectionIdent {
        section_id: id,
        idstr,
        instance_id: 0,
        version_id: version,
    };
    let h = if ty == 1 {
        SectionHeader::Start(ident)
    } else {
        SectionHeader::Full(ident)
    };
    h.encode(out);
}

/// Header, configuration "none", RAM START with block `ram` of 4 pages, EOS, footer.
fn prologue() -> Vec<u8> {
    let mut out = Vec::new();
    encode_header(3, &mut out);
    encode_configuration(b"none", &[], &mut out);
    start(&mut out, 1, 2, b"ram", 4);
    out.put_be64(0x4000 | 0x04);
    encode_mem_size(
        [BlockInfo {
            name: b"ram",
            used_length: 0x4000,
            page_size: None,
            mr_addr: None,
        }],
        &mut out,
    );
    out.put_be64(0x10);
    encode_footer(2, &mut out);
    out
}

/// Decodes everything; returns the items' count and the first error.
fn run(bytes: &[u8], is_final: bool) -> (usize, WireError, StreamDecoder) {
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    d.set_final(is_final);
    let mut pos = 0;
    let mut n = 0;
    loop {
        match d.decode(&bytes[pos..]) {
            Ok((_, used)) => {
                pos += used;
                n += 1;
            }
            Err(e) => return (n, e, d),
        }
    }
}

fn err(bytes: &[u8]) -> WireError {
    run(bytes, true).1
}

#[test]
fn prologue_decodes_and_knows_the_block() {
    let p = prologue();
    let (n, e, d) = run(&p, false);
    assert_eq!((n, e), (6, WireError::Incomplete { needed: 1 }));
    assert_eq!(d.blocks().len(), 1);
    assert_eq!(d.blocks()[0].name(), b"ram");
    assert_eq!(d.section(2).unwrap().idstr(), b"ram");
    assert!(d.section(2).unwrap().is_ram);
}

#[test]
fn section_table_rules() {
    let mut b = prologue();
    let at = b.len() as u64;
    b.extend_from_slice(&[2, 0, 0, 0, 9]);
    assert_eq!(err(&b), WireError::invalid(at + 1, Rule::SecUnknownId, 9));
    let mut b = prologue();
    start(&mut b, 4, 2, b"timer", 2);
    assert_eq!(err(&b), WireError::invalid(at + 1, Rule::SecDuplicateId, 2));
    let mut b = prologue();
    start(&mut b, 1, 5, b"ram", 3);
    assert_eq!(err(&b), WireError::invalid(at + 13, Rule::RamVersion, 3));
    let mut b = prologue();
    b.extend_from_slice(&[2, 0, 0, 0, 2]);
    b.put_be64(0x10);
    encode_footer(3, &mut b);
    assert_eq!(err(&b), WireError::invalid(at + 14, Rule::SecFooterId, 3));
    let mut b = prologue();
    b.push(5);
    assert_eq!(err(&b), WireError::invalid(at, Rule::SecSubsectionTop, 5));
    let mut b = prologue();
    b.push(0x42);
    assert_eq!(err(&b), WireError::invalid(at, Rule::SecType, 0x42));
}

#[test]
fn ram_rules() {
    let at = prologue().len() as u64 + 5;
    let part = |rec: &[u8]| {
        let mut b = prologue();
        b.extend_from_slice(&[2, 0, 0, 0, 2]);
        b.extend_from_slice(rec);
        b
    };
    let mut r = Vec::new();
    r.put_be64(0x4000 | 0x04);
    encode_mem_size(
        [BlockInfo {
            name: b"ram",
            used_length: 0x4000,
            page_size: None,
            mr_addr: None,
        }],
        &mut r,
    );
    assert_eq!(
        err(&part(&r)),
        WireError::invalid(at, Rule::RamMemSizePlace, 4)
    );
    let mut r = Vec::new();
    r.put_be64(0x1000 | 0x02);
    r.put_str8(b"rom");
    r.push(0);
    assert_eq!(
        err(&part(&r)),
        WireError::invalid(at, Rule::RamBlockUnknown, 3)
    );
    let mut r = Vec::new();
    r.put_be64(0x4000 | 0x02);
    r.put_str8(b"ram");
    r.push(0);
    assert_eq!(
        err(&part(&r)),
        WireError::invalid(at, Rule::RamOffset, 0x4000)
    );
    let mut r = Vec::new();
    r.put_be64(0x3000 | 0x02);
    r.put_str8(b"ram");
    r.push(0);
    r.put_be64(0x10);
    encode_footer(2, &mut r);
    let (n, e, _) = run(&part(&r), false);
    assert_eq!((n, e), (10, WireError::Incomplete { needed: 1 }));
    let mut r = Vec::new();
    r.put_be64(0x3000 | 0x02);
    r.put_str8(b"ram");
    r.push(0);
    encode_footer(2, &mut r);
    r.extend_from_slice(&[2, 0, 0, 0, 2]);
    assert_eq!(err(&part(&r)), WireError::invalid(at + 13, Rule::RamEos, 2));
}

#[test]
fn package_rules() {
    let pkg = |content: &[u8], len: u32| {
        let mut b = prologue();
        Command::Packaged { len }.encode(&mut b);
        b.extend_from_slice(content);
        b
    };
    let body_at = prologue().len() as u64 + 9;
    // A well-formed package: LISTEN, RUN, then PackageEnd, then EOF outside.
    let mut c = Vec::new();
    Command::PostcopyListen.encode(&mut c);
    Command::PostcopyRun.encode(&mut c);
    let mut b = pkg(&c, c.len() as u32);
    b.push(0);
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    let mut pos = 0;
    let mut items = Vec::new();
    while let Ok((item, used)) = d.decode(&b[pos..]) {
        items.push(item);
        pos += used;
    }
    assert_eq!(pos, b.len());
    assert_eq!(
        &items[6..],
        &[
            Item::Command(Command::Packaged { len: 10 }),
            Item::Command(Command::PostcopyListen),
            Item::Command(Command::PostcopyRun),
            Item::PackageEnd,
            Item::Eof
        ]
    );
    assert!(d.postcopy());
    // EOF inside.
    assert_eq!(
        err(&pkg(&[0], 1)),
        WireError::invalid(body_at, Rule::CmdPackagedContent, 0)
    );
    // Nested package.
    let mut c = Vec::new();
    Command::Packaged { len: 0 }.encode(&mut c);
    assert_eq!(
        err(&pkg(&c, 9)),
        WireError::invalid(body_at, Rule::CmdPackagedContent, 7)
    );
    // A header inside.
    let mut c = Vec::new();
    encode_header(3, &mut c);
    assert_eq!(
        err(&pkg(&c, 8)),
        WireError::invalid(body_at, Rule::CmdPackagedContent, 0x51)
    );
    // A configuration section inside.
    let mut c = Vec::new();
    encode_configuration(b"none", &[], &mut c);
    assert_eq!(
        err(&pkg(&c, c.len() as u32)),
        WireError::invalid(body_at, Rule::CmdPackagedContent, 7)
    );
    // An item crossing the end of the package.
    let mut c = Vec::new();
    Command::Ping(3).encode(&mut c);
    assert_eq!(
        err(&pkg(&c, 5)),
        WireError::invalid(body_at, Rule::CmdPackagedContent, 5)
    );
    // A package larger than the cap.
    assert_eq!(
        err(&pkg(&[], Limits::DEFAULT.max_packaged + 1)),
        WireError::invalid(body_at - 4, Rule::CmdPackagedLen, (16 << 20) + 1)
    );
}

#[test]
fn device_delimiting_rules() {
    // A device payload containing its own footer pattern followed by EOF-like bytes.
    let mut b = prologue();
    let payload_at = b.len() as u64 + 1 + 4 + 1 + 5 + 8;
    start(&mut b, 4, 0, b"timer", 2);
    b.extend_from_slice(&[1, 2, 0x7e, 0, 0, 0, 0, 0, 0, 9]);
    encode_footer(0, &mut b);
    b.push(0);
    let (n, e, _) = run(&b, true);
    assert_eq!((n, e), (10, WireError::Incomplete { needed: 1 }));
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    let mut pos = 0;
    let data = loop {
        let (item, used) = d.decode_final(&b[pos..]).unwrap();
        pos += used;
        if let Item::DeviceData(p) = item {
            break p;
        }
    };
    assert_eq!(data, &[1, 2, 0x7e, 0, 0, 0, 0, 0, 0, 9]);
    // Without a footer: Incomplete until final, then SEC-DELIMIT.
    let mut b = prologue();
    start(&mut b, 4, 0, b"timer", 2);
    b.extend_from_slice(&[1, 2, 3]);
    assert_eq!(run(&b, false).1, WireError::Incomplete { needed: 1 });
    assert_eq!(err(&b), WireError::invalid(payload_at, Rule::SecDelimit, 0));
    // Longer than the cap.
    let mut b = prologue();
    start(&mut b, 4, 0, b"timer", 2);
    b.resize(b.len() + Limits::DEFAULT.max_device_payload as usize + 5, 0);
    assert_eq!(
        err(&b),
        WireError::invalid(payload_at, Rule::SecDeviceLen, (1 << 20) + 5)
    );
}

/// A decoder that delimits `timer` (two be32 fields) by its description.
#[cfg(feature = "vmdesc")]
fn described_timer() -> StreamDecoder {
    let j = br#"{"page_size":4096,"devices":[{"name":"timer","instance_id":0,"vmsd_name":"timer","version":2,
      "fields":[{"name":"a","type":"uint32","size":4},{"name":"b","type":"uint32","size":4}],
      "subsections":[{"vmsd_name":"timer/s","version":1,"fields":[{"name":"c","type":"uint8","size":1}]}]}]}"#;
    let desc = crate::vmdesc::VmDesc::parse(j, 0, &Limits::DEFAULT).unwrap();
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    d.set_vmdesc(desc);
    d
}

/// The first error of `d` on `bytes`, decoded whole.
#[cfg(feature = "vmdesc")]
fn first_error(mut d: StreamDecoder, bytes: &[u8]) -> WireError {
    let mut pos = 0;
    loop {
        match d.decode_final(&bytes[pos..]) {
            Ok((_, used)) => pos += used,
            Err(e) => return e,
        }
    }
}

#[cfg(feature = "vmdesc")]
#[test]
fn described_payload_is_followed_by_its_footer() {
    let payload_at = prologue().len() as u64 + 1 + 4 + 1 + 5 + 8;
    let timer = |payload: &[u8]| {
        let mut b = prologue();
        start(&mut b, 4, 0, b"timer", 2);
        b.extend_from_slice(payload);
        encode_footer(0, &mut b);
        b.push(0);
        b
    };
    // Exactly the fields, then fields and the described subsection: EOF reached.
    for p in [
        &[0u8; 8][..],
        &[
            0, 0, 0, 1, 0, 0, 0, 2, 5, 7, b't', b'i', b'm', b'e', b'r', b'/', b's', 0, 0, 0, 1, 9,
        ],
    ] {
        let e = first_error(described_timer(), &timer(p));
        assert_eq!(e, WireError::Incomplete { needed: 1 }, "{p:?}");
    }
    // One byte more than described: DEV-SCHEMA at that byte (a footer scan accepts it).
    let b = timer(&[0, 0, 0, 1, 0, 0, 0, 2, 0x33]);
    assert_eq!(
        first_error(described_timer(), &b),
        WireError::invalid(payload_at + 8, Rule::DevSchema, 0x33)
    );
    let (n, _, _) = run(&b, true);
    assert_eq!(n, 10, "the footer scan takes the 9 bytes as the payload");
    // A subsection of another device after the fields ends the subsection list: DEV-SCHEMA.
    let b = timer(&[0, 0, 0, 1, 0, 0, 0, 2, 5, 3, b'c', b'p', b'u', 0, 0, 0, 1]);
    assert_eq!(
        first_error(described_timer(), &b),
        WireError::invalid(payload_at + 8, Rule::DevSchema, 5)
    );
    // A subsection newer than described: DEV-SUBSECTION at its version field.
    let b = timer(&[
        0, 0, 0, 1, 0, 0, 0, 2, 5, 7, b't', b'i', b'm', b'e', b'r', b'/', b's', 0, 0, 0, 2, 9,
    ]);
    assert_eq!(
        first_error(described_timer(), &b),
        WireError::invalid(payload_at + 17, Rule::DevSubsection, 2)
    );
}

#[test]
fn eof_and_vmdesc_rules() {
    let mut b = prologue();
    let at = b.len() as u64;
    b.push(6);
    assert_eq!(err(&b), WireError::invalid(at, Rule::VmdescPlace, 6));
    let mut b = prologue();
    b.push(0);
    b.push(6);
    b.put_be32((16 << 20) + 1);
    assert_eq!(
        err(&b),
        WireError::invalid(at + 2, Rule::VmdescLen, (16 << 20) + 1)
    );
    let mut b = prologue();
    b.push(0);
    b.push(6);
    b.put_be32(2);
    b.extend_from_slice(b"{}");
    let (n, e, d) = run(&b, true);
    assert_eq!((n, e), (8, WireError::Incomplete { needed: 1 }));
    assert!(d.at_end());
    b.push(0);
    assert_eq!(err(&b), WireError::invalid(at + 8, Rule::EofTrailing, 0));
    let mut b = prologue();
    b.extend_from_slice(&[0, 0]);
    assert_eq!(err(&b), WireError::invalid(at + 1, Rule::EofTrailing, 0));
}

#[test]
fn header_and_configuration_rules() {
    assert_eq!(
        err(b"QEVN\0\0\0\x03"),
        WireError::invalid(0, Rule::HdrMagic, 0x5145_564e)
    );
    let mut b = Vec::new();
    encode_header(3, &mut b);
    b.push(8);
    assert_eq!(err(&b), WireError::invalid(8, Rule::CfgPresent, 8));
    let mut b = Vec::new();
    encode_header(3, &mut b);
    b.push(7);
    b.put_be32(257);
    assert_eq!(err(&b), WireError::invalid(9, Rule::CfgNameLen, 257));
}

#[test]
fn resume_continues_the_section_table() {
    let p = prologue();
    let (_, _, d) = run(&p, false);
    let mut r = d.resume_from();
    assert_eq!(r.offset(), 0);
    let mut b = Vec::new();
    Command::RecvBitmap { name: b"ram" }.encode(&mut b);
    b.extend_from_slice(&[2, 0, 0, 0, 2]);
    b.put_be64(0x1000 | 0x08);
    b.put_str8(b"ram");
    b.resize(b.len() + 4096, 0xab);
    b.put_be64(0x10);
    encode_footer(2, &mut b);
    let mut pos = 0;
    let mut n = 0;
    while let Ok((_, used)) = r.decode(&b[pos..]) {
        pos += used;
        n += 1;
    }
    assert_eq!((n, pos), (5, b.len()));
    assert_eq!(r.ram().last_block(), Some(&b"ram"[..]));
    // A fresh recovery decoder does not know section 2.
    let mut fresh = StreamDecoder::new(Channel::Resume, Profile::QEMU_10, Limits::DEFAULT);
    fresh.decode(&b).unwrap();
    assert_eq!(
        fresh.decode(&b[9..]),
        Err(WireError::invalid(10, Rule::SecUnknownId, 2))
    );
}

#[test]
fn huge_page_blocks_carry_a_page_size_after_advise() {
    let mut b = Vec::new();
    encode_header(3, &mut b);
    encode_configuration(b"none", &[], &mut b);
    Command::PostcopyAdvise(Some(crate::command::Advise {
        ram_pagesize_summary: 0x20_1000,
        target_page_size: 0x1000,
    }))
    .encode(&mut b);
    start(&mut b, 1, 2, b"ram", 4);
    b.put_be64(0x40_0000 | 0x04);
    let huge = BlockInfo {
        name: b"mem",
        used_length: 0x20_0000,
        page_size: Some(0x20_0000),
        mr_addr: None,
    };
    let small = BlockInfo {
        name: b"rom",
        used_length: 0x20_0000,
        page_size: None,
        mr_addr: None,
    };
    encode_mem_size([huge, small], &mut b);
    b.put_be64(0x10);
    encode_footer(2, &mut b);
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    d.set_huge_page_blocks([&b"mem"[..]]);
    let mut pos = 0;
    while let Ok((_, used)) = d.decode(&b[pos..]) {
        pos += used;
    }
    assert_eq!(pos, b.len());
    assert!(d.advised());
    assert_eq!(d.blocks()[0].page_size, Some(0x20_0000));
    assert_eq!(d.blocks()[1].page_size, None);
    // A receiver without that hugepage block reads the page size as the next name: desync.
    let (_, e, _) = run(&b, true);
    assert!(!e.is_incomplete(), "{e}");
}

#[test]
fn many_footer_lookalikes_chunked_equal_whole() {
    let mut b = prologue();
    start(&mut b, 4, 0, b"timer", 2);
    let payload_at = b.len();
    for _ in 0..2000 {
        encode_footer(0, &mut b);
    }
    b.push(0xff);
    let payload_end = b.len();
    encode_footer(0, &mut b);
    b.push(0);
    // Whole input, final.
    let mut whole = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    let mut pos = 0;
    let mut items = Vec::new();
    while let Ok((item, used)) = whole.decode_final(&b[pos..]) {
        items.push((whole.offset(), item));
        pos += used;
    }
    assert_eq!(pos, b.len());
    assert_eq!(
        items[7].1,
        Item::DeviceData(&b[payload_at..payload_end]),
        "the payload ends at the real footer"
    );
    // Fed 7 bytes more at a time; final only once everything is there.
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    let mut got = Vec::new();
    let (mut pos, mut end) = (0, 0);
    while pos < b.len() {
        end = (end + 7).min(b.len());
        let r = if end == b.len() {
            d.decode_final(&b[pos..end])
        } else {
            d.decode(&b[pos..end])
        };
        match r {
            Ok((item, used)) => {
                got.push((d.offset(), item));
                pos += used;
                end = pos;
            }
            Err(WireError::Incomplete { .. }) => assert!(end < b.len()),
            Err(e) => panic!("{e}"),
        }
    }
    assert_eq!(got, items);
}

#[test]
fn known_devices_rules() {
    let mut b = prologue();
    let at = b.len() as u64;
    start(&mut b, 4, 0, b"timer", 3);
    let run_known = |b: &[u8]| {
        let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
        d.set_known_devices([(&b"ram"[..], 0, 4), (&b"timer"[..], 0, 2)]);
        let mut pos = 0;
        loop {
            match d.decode_final(&b[pos..]) {
                Ok((_, used)) => pos += used,
                Err(e) => return e,
            }
        }
    };
    assert_eq!(
        run_known(&b),
        WireError::invalid(at + 15, Rule::SecVersion, 3)
    );
    let mut b = prologue();
    start(&mut b, 4, 0, b"apic", 1);
    assert_eq!(
        run_known(&b),
        WireError::invalid(at + 5, Rule::SecUnknownDevice, 0)
    );
    // valid: SEC-UNKNOWN-DEVICE SEC-VERSION (known device, same version)
    let mut b = prologue();
    start(&mut b, 4, 0, b"timer", 2);
    encode_footer(0, &mut b);
    b.push(0);
    assert_eq!(run_known(&b), WireError::Incomplete { needed: 1 });
}

#[test]
fn a_recovery_channel_starts_with_recv_bitmap() {
    let fresh = || StreamDecoder::new(Channel::Resume, Profile::QEMU_10, Limits::DEFAULT);
    let bad = |rule_value: u64| Err(WireError::invalid(0, Rule::SmRecoverNoHeader, rule_value));
    // The header of a new stream.
    let mut qevm = Vec::new();
    encode_header(3, &mut qevm);
    assert_eq!(fresh().decode(&qevm), bad(0x51));
    // Another command first (PING: code 2), a section first (PART: type 2).
    let mut ping = Vec::new();
    Command::Ping(1).encode(&mut ping);
    assert_eq!(fresh().decode(&ping), bad(2));
    assert_eq!(fresh().decode(&[2, 0, 0, 0, 2]), bad(2));
    // Too few bytes to tell: Incomplete, never a guess.
    assert!(fresh().decode(&[0x08]).unwrap_err().is_incomplete());
    assert!(fresh().decode(&[0x08, 0x00]).unwrap_err().is_incomplete());
    // RECV_BITMAP first, then anything the stream allows.
    let mut ok = Vec::new();
    Command::RecvBitmap { name: b"ram" }.encode(&mut ok);
    let at = ok.len();
    Command::Ping(1).encode(&mut ok);
    let mut d = fresh();
    assert_eq!(d.decode(&ok).map(|(_, n)| n), Ok(at));
    assert_eq!(d.decode(&ok[at..]).map(|(_, n)| n), Ok(ok.len() - at));
    // The same rule on a decoder continuing a main channel.
    let mut main = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    let p = prologue();
    let mut pos = 0;
    while let Ok((_, n)) = main.decode(&p[pos..]) {
        pos += n;
    }
    assert_eq!(main.resume_from().decode(&qevm), bad(0x51));
    assert_eq!(main.resume_from().decode(&ok).map(|(_, n)| n), Ok(at));
}
