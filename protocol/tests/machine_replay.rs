//! Replay of real QEMU postcopy-recovery captures through the machines.
//!
//! Destination: feed `stream.bin`, close the channel (it ends inside a record), recover, feed
//! `resume-stream.bin`; the return path must be the captured one (RECV_BITMAP byte for byte,
//! RESUME_ACK, SHUT; PONG/page-request rules per `replay.return_path_rule`), and the final RAM
//! must equal `final_ram`. Source: driven into recovery, fed `resume-rp.bin`; it must resend
//! exactly the pages whose received bit is clear, each once.

mod common;
mod harness;

use common::VectorDir;
use harness::Mem;
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::machine::{
    Control, Destination, DestinationConfig, Event, Instant, MigrationStatus as S, RamBlockSpec,
    Source, SourceConfig,
};
use qmig_protocol::ram::RamBody;
use qmig_protocol::rp::RpDecoder;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use sha2::{Digest, Sha256};

const TPS: u64 = 4096;

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// The blocks the stream's MEM_SIZE announces, decoded with the codec.
fn blocks_of(v: &VectorDir, stream: &[u8]) -> Vec<RamBlockSpec> {
    let mut d = StreamDecoder::new(Channel::Main, v.profile(), Default::default());
    let mut pos = 0;
    loop {
        let (item, n) = d.decode(&stream[pos..]).expect("stream decodes");
        pos += n;
        if let Item::Ram(r) = item {
            if let RamBody::MemSize(list) = r.body {
                return list
                    .iter()
                    .map(|b| {
                        RamBlockSpec::new(std::str::from_utf8(b.name).unwrap(), b.used_length, TPS)
                    })
                    .collect();
            }
        }
    }
}

fn vmdesc_of(v: &VectorDir) -> qmig_protocol::vmdesc::VmDesc {
    qmig_protocol::vmdesc::VmDesc::parse(&v.read("vmdesc.json"), 0, &Default::default())
        .expect("vmdesc.json parses")
}

/// Decodes a whole return-path byte string into owned (type, bytes) messages.
fn rp_messages(v: &VectorDir, blocks: &[RamBlockSpec], bytes: &[u8]) -> Vec<(u16, Vec<u8>)> {
    let mut d = RpDecoder::new(v.profile(), Default::default());
    let expect = |name: &[u8]| {
        blocks
            .iter()
            .find(|b| b.name.as_bytes() == name)
            .map(|b| PageBitmap::wire_size(b.len / TPS))
    };
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < bytes.len() {
        let (m, n) = d
            .decode(&bytes[pos..], &expect)
            .expect("return path decodes");
        out.push((m.ty().0, bytes[pos..pos + n].to_vec()));
        pos += n;
    }
    out
}

fn is_req(ty: u16) -> bool {
    ty == 3 || ty == 4
}

/// The `postcopy` rule: same messages except page requests; PONG 3 and 4 in either order.
fn assert_postcopy_rule(id: &str, got: &[(u16, Vec<u8>)], want: &[(u16, Vec<u8>)]) {
    let norm = |m: &[(u16, Vec<u8>)]| {
        let mut v: Vec<Vec<u8>> = m
            .iter()
            .filter(|(t, _)| !is_req(*t))
            .map(|(_, b)| b.clone())
            .collect();
        // PONG(3) and PONG(4) may come in either order: compare them as a set.
        let p3 = [0u8, 2, 0, 4, 0, 0, 0, 3].to_vec();
        let p4 = [0u8, 2, 0, 4, 0, 0, 0, 4].to_vec();
        for w in 0..v.len().saturating_sub(1) {
            if v[w] == p4 && v[w + 1] == p3 {
                v.swap(w, w + 1);
            }
        }
        v
    };
    assert_eq!(norm(got), norm(want), "{id}: return path (postcopy rule)");
}

fn check_final_ram(v: &VectorDir, blocks: &[RamBlockSpec], mem: &Mem) {
    let fr = &v.manifest["final_ram"];
    let mut wanted = vec![(
        fr["block"].as_str().unwrap().to_string(),
        fr["sha256"].as_str().unwrap().to_string(),
    )];
    if let Some(others) = fr["other_blocks"].as_array() {
        for o in others {
            wanted.push((
                o["block"].as_str().unwrap().to_string(),
                o["sha256"].as_str().unwrap().to_string(),
            ));
        }
    }
    for (name, sha) in wanted {
        let i = blocks
            .iter()
            .position(|b| b.name == name)
            .unwrap_or_else(|| panic!("{}: no block {name}", v.id()));
        assert_eq!(
            hex(&Sha256::digest(&mem.blocks[i])),
            sha,
            "{}: final RAM of {name}",
            v.id()
        );
    }
}

fn replay_destination(v: &VectorDir) {
    let stream = v.read("stream.bin");
    let resume = v.read("resume-stream.bin");
    let blocks = blocks_of(v, &stream);
    let machine = v.manifest["machine"]["type"].as_str().unwrap().to_string();
    let mut cfg = DestinationConfig::new(v.profile(), &machine, blocks.clone(), true);
    cfg.vmdesc = Some(vmdesc_of(v));
    let mut dst = Destination::new(cfg).expect("config");
    let mut mem = Mem::new(&blocks, TPS as usize);
    let mut now = 0u64;
    let mut statuses = vec![dst.status()];

    // Feed a channel in 64 KiB chunks the way a socket reader would: keep unconsumed bytes.
    let mut feed = |dst: &mut Destination, mem: &mut Mem, bytes: &[u8], rp: &mut Vec<u8>| {
        let mut buf: Vec<u8> = Vec::new();
        for chunk in bytes.chunks(65536) {
            now += 1;
            buf.extend_from_slice(chunk);
            let used = dst
                .handle_stream(Instant(now), &buf, mem)
                .unwrap_or_else(|e| panic!("{}: {e}", v.id()));
            buf.drain(..used);
            dst.poll_transmit(rp);
        }
        buf.len()
    };

    dst.handle_channel_opened(Instant(0)).unwrap();
    let mut rp0 = Vec::new();
    let left = feed(&mut dst, &mut mem, &stream, &mut rp0);
    let last_complete = v.channels()[0]["replay"].get("last_complete_record_ends_at");
    let last_complete = last_complete
        .and_then(|x| x.as_u64())
        .or_else(|| v.manifest["replay"]["channels"][0]["last_complete_record_ends_at"].as_u64());
    if let Some(end) = last_complete {
        // The manifest counts whole sections; the machine consumes single RAM records, so at most
        // the one cut record (shorter than a page record) is left.
        assert!(
            left as u64 <= stream.len() as u64 - end,
            "{}: consumed past the last complete record",
            v.id()
        );
        assert!(
            (left as u64) < TPS + 8 + 256,
            "{}: {left} bytes left unconsumed",
            v.id()
        );
    }
    dst.handle_channel_closed(Instant(1_000_000));
    while let Some(e) = dst.poll_event() {
        if let Event::Status { to, .. } = e {
            statuses.push(to);
        }
    }
    assert_eq!(dst.status(), S::PostcopyPaused, "{}", v.id());
    let got0 = rp_messages(v, &blocks, &rp0);
    let want0 = rp_messages(v, &blocks, &v.read("rp.bin"));
    assert_postcopy_rule(&v.id(), &got0, &want0);

    // Recovery channel.
    dst.handle_control(Instant(1_000_001), Control::Recover)
        .unwrap();
    dst.handle_channel_opened(Instant(1_000_002)).unwrap();
    let mut rp1 = Vec::new();
    let left = feed(&mut dst, &mut mem, &resume, &mut rp1);
    assert_eq!(
        left,
        0,
        "{}: the recovery stream is consumed to its end",
        v.id()
    );
    while let Some(e) = dst.poll_event() {
        if let Event::Status { to, .. } = e {
            statuses.push(to);
        }
    }
    assert_eq!(dst.status(), S::Completed, "{}", v.id());
    let expected_statuses: &[S] = if v.profile().has_recover_setup() {
        &[
            S::None,
            S::Setup,
            S::Active,
            S::PostcopyActive,
            S::PostcopyPaused,
            S::PostcopyRecover,
            S::PostcopyActive,
            S::Completed,
        ]
    } else {
        &[
            S::None,
            S::Active,
            S::PostcopyActive,
            S::PostcopyPaused,
            S::PostcopyRecover,
            S::PostcopyActive,
            S::Completed,
        ]
    };
    assert_eq!(statuses, expected_statuses, "{}", v.id());

    // The `recovery` rule: RECV_BITMAP byte for byte first, RESUME_ACK(1), requests, SHUT(0) last.
    let want_rp1 = v.read("resume-rp.bin");
    let want1 = rp_messages(v, &blocks, &want_rp1);
    let nbitmaps = want1.iter().take_while(|(t, _)| *t == 5).count();
    assert!(nbitmaps >= 1);
    let bitmap_bytes: usize = want1[..nbitmaps].iter().map(|(_, b)| b.len()).sum();
    assert_eq!(
        hex(&rp1[..bitmap_bytes]),
        hex(&want_rp1[..bitmap_bytes]),
        "{}: RECV_BITMAP bytes",
        v.id()
    );
    let got1 = rp_messages(v, &blocks, &rp1);
    let strip = |m: &[(u16, Vec<u8>)]| {
        m.iter()
            .filter(|(t, _)| !is_req(*t))
            .cloned()
            .collect::<Vec<_>>()
    };
    assert_eq!(
        strip(&got1),
        strip(&want1),
        "{}: recovery return path",
        v.id()
    );
    assert_eq!(
        got1.last().unwrap().1,
        [0, 1, 0, 4, 0, 0, 0, 0],
        "{}: SHUT(0) last",
        v.id()
    );
    check_final_ram(v, &blocks, &mem);
    assert_eq!(dst.duplicate_pages(), 0, "{}", v.id());
    println!(
        "{}: {} bytes + {} recovery bytes replayed; {} RECV_BITMAP byte-identical; {} pages placed; final RAM matches",
        v.id(),
        stream.len(),
        resume.len(),
        nbitmaps,
        dst.pages_placed()
    );
}

fn replay_source(v: &VectorDir) {
    let stream = v.read("stream.bin");
    let resume = v.read("resume-stream.bin");
    let blocks = blocks_of(v, &stream);
    let machine = v.manifest["machine"]["type"].as_str().unwrap().to_string();
    let mut cfg = SourceConfig::new(v.profile(), &machine, blocks.clone(), true);
    cfg.pages_per_section = 64;
    let mem = Mem::new(&blocks, TPS as usize);
    let mut src = Source::new(cfg);
    let t = Instant(0);
    src.handle_channel_opened(t).unwrap();
    let mut sink: Vec<u8> = Vec::new();
    src.poll_transmit(&mem, &mut sink, 1);
    src.handle_control(t, Control::StartPostcopy).unwrap();
    src.poll_transmit(&mem, &mut sink, 1);
    assert_eq!(src.status(), S::PostcopyActive);
    src.handle_channel_closed(t);
    assert_eq!(src.status(), S::PostcopyPaused);
    src.handle_control(t, Control::Resume).unwrap();
    src.handle_channel_opened(t).unwrap();
    let mut out: Vec<u8> = Vec::new();
    src.poll_transmit(&mem, &mut out, usize::MAX);
    // Our RECV_BITMAP commands and POSTCOPY_RESUME are QEMU's, byte for byte.
    assert_eq!(
        hex(&out),
        hex(&resume[..out.len()]),
        "{}: recovery handshake commands",
        v.id()
    );
    let rp = v.read("resume-rp.bin");
    let msgs = rp_messages(v, &blocks, &rp);
    src.record_sent_pages(true);
    // The expected resend: every page whose received bit is clear, in every block.
    let mut expected: Vec<(usize, u64)> = Vec::new();
    for (_, m) in msgs.iter().filter(|(t, _)| *t == 5) {
        let name_len = m[4] as usize;
        let name = &m[5..5 + name_len];
        let b = blocks
            .iter()
            .position(|x| x.name.as_bytes() == name)
            .unwrap();
        let bits = &m[5 + name_len + 8..m.len() - 8];
        let got = PageBitmap::from_le_bytes(bits, blocks[b].len / TPS, 0).unwrap();
        expected.extend(got.iter_zeros().map(|p| (b, p)));
    }
    for (ty, m) in &msgs {
        if *ty == 1 {
            // SHUT comes after everything was sent: drain the source first.
            while src.wants_transmit() {
                src.poll_transmit(&mem, &mut out, 1 << 20);
            }
        }
        let used = src
            .handle_return_path(Instant(1), m)
            .unwrap_or_else(|e| panic!("{}: {e}", v.id()));
        assert_eq!(used, m.len());
        src.poll_transmit(&mem, &mut out, 1 << 16);
    }
    assert_eq!(src.status(), S::Completed, "{}", v.id());
    let mut sent = src.take_sent_pages();
    let n = sent.len();
    sent.sort_unstable();
    sent.dedup();
    assert_eq!(
        sent.len(),
        n,
        "{}: a page was sent twice after recovery",
        v.id()
    );
    expected.sort_unstable();
    assert_eq!(
        sent,
        expected,
        "{}: resent pages are exactly the clear bits",
        v.id()
    );
    println!(
        "{}: source resent exactly the {} pages whose bit is clear",
        v.id(),
        n
    );
}

#[test]
fn replay_qemu_7_2_postcopy_recover_destination() {
    replay_destination(&common::vector("qemu-7.2", "postcopy-recover"));
}

#[test]
fn replay_qemu_7_2_postcopy_recover_pause_destination() {
    replay_destination(&common::vector("qemu-7.2", "postcopy-recover-pause"));
}

#[test]
fn replay_qemu_10_0_postcopy_recover_destination() {
    replay_destination(&common::vector("qemu-10.0", "postcopy-recover"));
}

#[test]
fn replay_qemu_10_0_postcopy_recover_pause_destination() {
    replay_destination(&common::vector("qemu-10.0", "postcopy-recover-pause"));
}

#[test]
fn replay_source_resends_exactly_the_clear_pages() {
    for (ver, name) in [
        ("qemu-7.2", "postcopy-recover"),
        ("qemu-7.2", "postcopy-recover-pause"),
        ("qemu-10.0", "postcopy-recover"),
        ("qemu-10.0", "postcopy-recover-pause"),
    ] {
        replay_source(&common::vector(ver, name));
    }
}

/// Every precopy and postcopy vector without multifd or recovery: the whole stream through a
/// destination gives `final_ram` and the captured return path (`exact` or `postcopy` rule).
#[test]
fn replay_whole_streams_destination() {
    let mut checked = Vec::new();
    for v in common::vectors() {
        let name = v.name.as_str();
        if name.contains("multifd") || name.contains("recover") || name == "precopy-compress" {
            continue;
        }
        let stream = v.read("stream.bin");
        let blocks = blocks_of(&v, &stream);
        let machine = v.manifest["machine"]["type"].as_str().unwrap().to_string();
        let postcopy_ram = v.manifest["replay"]["destination_capabilities"]["postcopy-ram"]
            .as_bool()
            .unwrap_or(false);
        let mut cfg = DestinationConfig::new(v.profile(), &machine, blocks.clone(), postcopy_ram);
        if v.has("vmdesc.json") {
            cfg.vmdesc = Some(vmdesc_of(&v));
        }
        let mut dst = Destination::new(cfg).expect("config");
        let mut mem = Mem::new(&blocks, TPS as usize);
        dst.handle_channel_opened(Instant(0)).unwrap();
        let mut buf: Vec<u8> = Vec::new();
        let mut rp = Vec::new();
        for (i, chunk) in stream.chunks(65536).enumerate() {
            buf.extend_from_slice(chunk);
            let used = dst
                .handle_stream(Instant(i as u64 + 1), &buf, &mut mem)
                .unwrap_or_else(|e| panic!("{}: {e}", v.id()));
            buf.drain(..used);
            dst.poll_transmit(&mut rp);
        }
        assert_eq!(buf.len(), 0, "{}: stream consumed to its end", v.id());
        assert_eq!(dst.status(), S::Completed, "{}", v.id());
        check_final_ram(&v, &blocks, &mem);
        if v.has("rp.bin") {
            let want = rp_messages(&v, &blocks, &v.read("rp.bin"));
            let got = rp_messages(&v, &blocks, &rp);
            assert_postcopy_rule(&v.id(), &got, &want);
        }
        checked.push(v.id());
    }
    println!(
        "whole-stream replays: {} vectors: {checked:?}",
        checked.len()
    );
    assert!(checked.len() >= 20, "{checked:?}");
}
