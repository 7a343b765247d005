//! Whole migrations of a small guest through the in-memory harness: precopy and postcopy, with
//! exact status sequences and byte-identical memory at the end.

mod harness;

use harness::{Scenario, World};
use qmig_protocol::machine::{Event, MigrationStatus as S};
use qmig_protocol::Profile;

#[test]
fn precopy_small_guest_ends_identical() {
    let mut w = World::new(Scenario::small(64, false));
    w.start();
    w.run(10_000);
    w.assert_memory_equal();
    assert!(w.errors().is_empty(), "{:?}", w.errors());
    assert_eq!(w.src_statuses, [S::None, S::Setup, S::Active, S::Completed]);
    assert_eq!(w.dst_statuses, [S::None, S::Active, S::Completed]);
    // PONG(1) then SHUT(0), nothing else.
    assert_eq!(
        w.rp_bytes[0],
        [0, 2, 0, 4, 0, 0, 0, 1, 0, 1, 0, 4, 0, 0, 0, 0]
    );
    assert_eq!(w.dst.devices().len(), 2);
    assert_eq!(w.dst.devices()[0].idstr, b"timer");
    assert_eq!(w.dst.devices()[0].data, (0u8..24).collect::<Vec<_>>());
    // The stream ends with EOF and the VM description.
    let main = &w.main_bytes[0];
    let tail = [
        &[0u8, 6][..],
        &(harness::VMDESC_JSON.len() as u32).to_be_bytes(),
        harness::VMDESC_JSON,
    ]
    .concat();
    assert!(main.ends_with(&tail));
}

#[test]
fn precopy_10x_goes_through_device() {
    let mut sc = Scenario::small(64, false);
    sc.profile = Profile::QEMU_10;
    let mut w = World::new(sc);
    w.start();
    w.run(10_000);
    w.assert_memory_equal();
    assert!(w.errors().is_empty(), "{:?}", w.errors());
    assert_eq!(
        w.src_statuses,
        [S::None, S::Setup, S::Active, S::Device, S::Completed]
    );
    assert_eq!(w.dst_statuses, [S::None, S::Setup, S::Active, S::Completed]);
}

#[test]
fn postcopy_small_guest_with_faults_ends_identical() {
    let mut sc = Scenario::small(64, true);
    sc.rounds = 1;
    sc.switch_after_pages = Some(16);
    sc.faults = vec![(0, 63), (0, 40), (0, 41), (0, 7), (0, 63)];
    sc.pages_per_section = 2;
    sc.budget = 4096;
    let mut w = World::new(sc);
    w.start();
    w.run(10_000);
    w.assert_memory_equal();
    assert!(w.errors().is_empty(), "{:?}", w.errors());
    assert_eq!(
        w.src_statuses,
        [
            S::None,
            S::Setup,
            S::Active,
            S::PostcopyActive,
            S::Completed
        ]
    );
    assert_eq!(
        w.dst_statuses,
        [S::None, S::Active, S::PostcopyActive, S::Completed]
    );
    assert!(w.waiting.is_empty());
    let requested = w
        .dst_events
        .iter()
        .filter(|e| matches!(e, Event::PageRequested { .. }))
        .count();
    assert!(requested > 0, "the guest faulted on missing pages");
    // SHUT is the last return-path message.
    let rp = w.rp_bytes.last().unwrap();
    assert_eq!(&rp[rp.len() - 8..], [0, 1, 0, 4, 0, 0, 0, 0]);
}

#[test]
fn postcopy_recovers_from_one_cut() {
    let mut sc = Scenario::small(64, true);
    sc.rounds = 1;
    sc.faults = vec![(0, 50), (0, 51)];
    sc.pages_per_section = 2;
    sc.budget = 4096;
    let mut probe = World::new(sc.clone());
    probe.start();
    probe.run(10_000);
    let total = probe.main_bytes[0].len() as u64;
    sc.cuts = vec![harness::Cut {
        conn: 0,
        dir: harness::Dir::Main,
        at: total - 4000,
    }];
    let mut w = World::new(sc);
    w.start();
    w.run(10_000);
    w.assert_memory_equal();
    assert_eq!(
        w.src_statuses,
        [
            S::None,
            S::Setup,
            S::Active,
            S::PostcopyActive,
            S::PostcopyPaused,
            S::PostcopyRecover,
            S::PostcopyActive,
            S::Completed
        ]
    );
    assert_eq!(
        w.dst_statuses,
        [
            S::None,
            S::Active,
            S::PostcopyActive,
            S::PostcopyPaused,
            S::PostcopyRecover,
            S::PostcopyActive,
            S::Completed
        ]
    );
    // The recovery connection: RECV_BITMAP for every block, POSTCOPY_RESUME, then pages whose
    // first record names its block.
    let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_7_2, Default::default());
    d.set_vmdesc(harness::vmdesc());
    let first = &w.main_bytes[0];
    let mut pos = 0;
    while let Ok((_, n)) = d.decode(&first[pos..]) {
        pos += n;
    }
    let mut r = d.resume_from();
    let resume = &w.main_bytes[1];
    let mut pos = 0;
    let mut items = Vec::new();
    while pos < resume.len() {
        let (item, n) = r
            .decode_final(&resume[pos..])
            .expect("recovery stream decodes");
        let kind = match item {
            Item::Command(Command::RecvBitmap { .. }) => "bitmap",
            Item::Command(Command::PostcopyResume) => "resume",
            Item::Ram(rec) if rec.is_page() && rec.name.is_some() => "named-page",
            Item::Ram(rec) if rec.is_page() => "page",
            _ => "other",
        };
        items.push(kind);
        pos += n;
    }
    assert_eq!(items[..2], ["bitmap", "resume"]);
    let first_page = items.iter().find(|k| k.ends_with("page")).unwrap();
    assert_eq!(*first_page, "named-page");
}

// ---- targeted behaviours ---------------------------------------------------------------------

use harness::{Cut, Dir, Mem};
use qmig_protocol::command::Command;
use qmig_protocol::machine::{
    ChannelKind, Control, Destination, DestinationConfig, Instant, RamBlockSpec, Source,
    SourceConfig,
};
use qmig_protocol::rp::RpDecoder;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use qmig_protocol::Rule;

fn blocks() -> Vec<RamBlockSpec> {
    vec![RamBlockSpec::new("ram", 16 * 4096, 4096)]
}

/// The source's setup bytes (header, configuration, OPEN_RETURN_PATH, PING 1, ADVISE, START).
fn setup_bytes(profile: Profile, machine: &str, blocks: Vec<RamBlockSpec>) -> Vec<u8> {
    let mem = Mem::new(&blocks, 4096);
    let mut src = Source::new(SourceConfig::new(profile, machine, blocks, true));
    src.handle_channel_opened(Instant(0)).unwrap();
    let mut out = Vec::new();
    src.poll_transmit(&mem, &mut out, 1);
    out
}

/// (type, offset, length) of every return-path message.
fn rp_offsets(bytes: &[u8]) -> Vec<(u16, u64, u64)> {
    let mut d = RpDecoder::new(Profile::QEMU_7_2, Default::default());
    let expect = |_: &[u8]| Some(8u64);
    let mut pos = 0;
    let mut out = Vec::new();
    while pos < bytes.len() {
        let (m, n) = d
            .decode(&bytes[pos..], &expect)
            .expect("return path decodes");
        out.push((m.ty().0, pos as u64, n as u64));
        pos += n;
    }
    out
}

fn events(d: &mut Destination) -> Vec<Event> {
    std::iter::from_fn(|| d.poll_event()).collect()
}

#[test]
fn machine_name_mismatch_fails_with_cfg_machine() {
    let bytes = setup_bytes(Profile::QEMU_7_2, "none", blocks());
    let mut d = Destination::new(DestinationConfig::new(
        Profile::QEMU_7_2,
        "pc-i440fx-7.2",
        blocks(),
        true,
    ))
    .unwrap();
    let mut mem = Mem::new(&blocks(), 4096);
    d.handle_channel_opened(Instant(0)).unwrap();
    let v = d.handle_stream(Instant(1), &bytes, &mut mem).unwrap_err();
    assert_eq!((v.rule, v.offset), (Rule::CfgMachine, 13));
    assert_eq!(d.status(), S::Failed);
    let ev = events(&mut d);
    assert_eq!(
        ev[0],
        Event::Error {
            channel: ChannelKind::Main,
            violation: v
        }
    );
    assert_eq!(
        ev[1],
        Event::Status {
            from: S::None,
            to: S::Failed
        }
    );
    // A failed destination reads nothing more.
    assert_eq!(d.handle_stream(Instant(2), &bytes, &mut mem), Ok(0));
}

#[test]
fn unknown_block_fails_with_ram_block_unknown() {
    let src_blocks = vec![RamBlockSpec::new("pc.ram", 16 * 4096, 4096)];
    let bytes = setup_bytes(Profile::QEMU_7_2, "none", src_blocks);
    let mut d = Destination::new(DestinationConfig::new(
        Profile::QEMU_7_2,
        "none",
        blocks(),
        true,
    ))
    .unwrap();
    let mut mem = Mem::new(&blocks(), 4096);
    d.handle_channel_opened(Instant(0)).unwrap();
    let v = d.handle_stream(Instant(1), &bytes, &mut mem).unwrap_err();
    assert_eq!(v.rule, Rule::RamBlockUnknown);
    assert_eq!(d.status(), S::Failed);
    let ev = events(&mut d);
    assert!(
        ev.contains(&Event::Status {
            from: S::Active,
            to: S::Failed
        }),
        "{ev:?}"
    );
}

#[test]
fn advise_without_postcopy_ram_is_refused() {
    let bytes = setup_bytes(Profile::QEMU_7_2, "none", blocks());
    let mut d = Destination::new(DestinationConfig::new(
        Profile::QEMU_7_2,
        "none",
        blocks(),
        false,
    ))
    .unwrap();
    let mut mem = Mem::new(&blocks(), 4096);
    d.handle_channel_opened(Instant(0)).unwrap();
    let v = d.handle_stream(Instant(1), &bytes, &mut mem).unwrap_err();
    assert_eq!(v.rule, Rule::CmdAdviseLen);
}

/// A world in postcopy-active on both sides, after POSTCOPY_RUN, link up.
fn running_world() -> World {
    let mut sc = Scenario::small(64, true);
    sc.rounds = 1;
    sc.switch_after_pages = Some(8);
    sc.pages_per_section = 1;
    sc.budget = 1;
    let mut w = World::new(sc);
    w.start();
    while !(w.dst.status() == S::PostcopyActive && w.dst.pages_placed() > 10) {
        assert!(w.step());
    }
    w.drain_events();
    w
}

#[test]
fn error_after_run_pauses_and_error_in_recover_pauses() {
    let mut w = running_world();
    let n = w.dst_events.len();
    let mut mem = w.dst_mem.clone();
    // Garbage instead of the next item: a section type 0xFF.
    let v = w
        .dst
        .handle_stream(Instant(1000), &[0xff], &mut mem)
        .unwrap_err();
    assert_eq!(v.rule, Rule::SecType);
    w.drain_events();
    assert_eq!(
        w.dst_events[n..],
        [
            Event::Error {
                channel: ChannelKind::Main,
                violation: v
            },
            Event::Status {
                from: S::PostcopyActive,
                to: S::PostcopyPaused
            }
        ]
    );
    // Recover, then break the recovery channel with garbage before POSTCOPY_RESUME.
    w.dst
        .handle_control(Instant(1001), Control::Recover)
        .unwrap();
    w.dst.handle_channel_opened(Instant(1002)).unwrap();
    assert_eq!(w.dst.status(), S::PostcopyRecover);
    let v = w
        .dst
        .handle_stream(Instant(1003), &[0x08, 0x00, 0x63, 0, 0], &mut mem)
        .unwrap_err();
    // An unknown command where RECV_BITMAP must come first.
    assert_eq!((v.rule, v.offset), (Rule::SmRecoverNoHeader, 0));
    assert_eq!(w.dst.status(), S::PostcopyPaused);
    // The source side of the same link: a bad RP message in postcopy pauses it.
    let bad_pong = [0, 2, 0, 4, 0, 0, 0x12, 0x34];
    let mut src = w.src.clone();
    let v = src
        .handle_return_path(Instant(1004), &bad_pong)
        .unwrap_err();
    assert_eq!(v.rule, Rule::RpPongUnknown);
    assert_eq!(src.status(), S::PostcopyPaused);
}

#[test]
fn recv_bitmap_and_resume_outside_recover_are_not_answered() {
    let mut w = running_world();
    let mut mem = w.dst_mem.clone();
    let mut bytes = Vec::new();
    Command::RecvBitmap { name: b"ram" }.encode(&mut bytes);
    Command::PostcopyResume.encode(&mut bytes);
    // The stream is between sections: commands are legal here.
    let mut rp = Vec::new();
    w.dst.poll_transmit(&mut rp);
    let n = w
        .dst
        .handle_stream(Instant(5000), &bytes, &mut mem)
        .expect("commands between sections");
    assert_eq!(n, bytes.len());
    let mut rp2 = Vec::new();
    w.dst.poll_transmit(&mut rp2);
    assert!(rp2.is_empty(), "{rp2:?}");
    assert_eq!(w.dst.status(), S::PostcopyActive);
}

#[test]
fn first_request_on_every_connection_names_its_block() {
    let mut sc = Scenario::small(64, true);
    sc.rounds = 1;
    sc.switch_after_pages = Some(4);
    sc.pages_per_section = 1;
    sc.budget = 1;
    sc.faults = vec![(0, 60), (0, 61), (0, 62), (0, 59)];
    let mut probe = World::new(sc.clone());
    probe.start();
    probe.run(100_000);
    // Cut the return path inside the message after the first page request: the faults after it
    // are still waiting when the link breaks.
    let msgs = rp_offsets(&probe.rp_bytes[0]);
    let first_req = msgs
        .iter()
        .position(|(t, _, _)| *t == 3)
        .expect("a page request");
    let (_, start, _) = msgs[first_req + 1];
    sc.cuts = vec![Cut {
        conn: 0,
        dir: Dir::Rp,
        at: start + 2,
    }];
    let mut w = World::new(sc);
    w.start();
    w.run(100_000);
    w.assert_memory_equal();
    assert_eq!(w.rp_bytes.len(), 2);
    let reqs_after = rp_offsets(&w.rp_bytes[1])
        .iter()
        .filter(|(t, _, _)| *t == 3 || *t == 4)
        .count();
    assert!(
        reqs_after >= 1,
        "SM-REREQUEST: waiting faults are requested again"
    );
    for (conn, bytes) in w.rp_bytes.iter().enumerate() {
        let mut d = RpDecoder::new(Profile::QEMU_7_2, Default::default());
        let expect = |_: &[u8]| Some(8u64);
        let mut pos = 0;
        let mut first_req = None;
        while pos < bytes.len() {
            let Ok((m, n)) = d.decode(&bytes[pos..], &expect) else {
                break;
            };
            if first_req.is_none() && (m.ty().0 == 3 || m.ty().0 == 4) {
                first_req = Some(m.ty().0);
            }
            pos += n;
        }
        if let Some(t) = first_req {
            assert_eq!(t, 3, "connection {conn}: the first request is REQ_PAGES_ID");
        }
    }
    assert!(w.cuts_done >= 1);
}

#[test]
fn switchover_start_only_to_10x() {
    for (profile, expect) in [(Profile::QEMU_7_2, 0), (Profile::QEMU_10, 1)] {
        let mut sc = Scenario::small(16, false);
        sc.profile = profile;
        let mut w = World::new(sc);
        w.start();
        w.run(10_000);
        let main = &w.main_bytes[0];
        let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Default::default());
        d.set_vmdesc(harness::vmdesc());
        let mut pos = 0;
        let mut count = 0;
        while pos < main.len() {
            let (item, n) = d.decode_final(&main[pos..]).unwrap();
            if matches!(item, Item::Command(Command::SwitchoverStart)) {
                count += 1;
            }
            pos += n;
        }
        assert_eq!(count, expect, "{:?}", profile.version);
    }
}

#[test]
fn silence_counts_as_channel_loss() {
    let mut cfg = DestinationConfig::new(Profile::QEMU_7_2, "none", blocks(), true);
    cfg.silence_timeout = Some(1_000);
    let mut d = Destination::new(cfg).unwrap();
    assert_eq!(d.silence_deadline(), None, "no channel yet");
    d.handle_channel_opened(Instant(0)).unwrap();
    assert_eq!(d.silence_deadline(), Some(Instant(1_001)));
    d.handle_timeout(Instant(1_000));
    assert_eq!(d.status(), S::None);
    d.handle_timeout(Instant(1_001));
    assert_eq!(d.status(), S::Failed);
    assert_eq!(d.silence_deadline(), None, "ended");
    let ev = events(&mut d);
    assert_eq!(
        ev[0],
        Event::ChannelLost {
            rule: Rule::SmTimeout
        }
    );

    // A source waiting for SHUT after EOF hears nothing: the channel counts as lost.
    let mut cfg = SourceConfig::new(Profile::QEMU_7_2, "none", blocks(), false);
    cfg.return_path = true;
    cfg.silence_timeout = Some(1_000);
    let mem = Mem::new(&blocks(), 4096);
    let mut src = Source::new(cfg);
    src.handle_channel_opened(Instant(0)).unwrap();
    let mut out = Vec::new();
    src.poll_transmit(&mem, &mut out, usize::MAX);
    src.handle_timeout(Instant(5_000));
    assert_eq!(
        src.status(),
        S::Active,
        "not waiting for an answer: no timeout"
    );
    src.handle_control(Instant(5_000), Control::Complete)
        .unwrap();
    src.poll_transmit(&mem, &mut out, usize::MAX);
    assert!(!src.wants_transmit());
    src.handle_timeout(Instant(5_500));
    assert_eq!(src.status(), S::Active);
    src.handle_timeout(Instant(6_001));
    assert_eq!(src.status(), S::Failed);
    let ev: Vec<Event> = std::iter::from_fn(|| src.poll_event()).collect();
    assert!(
        ev.contains(&Event::ChannelLost {
            rule: Rule::SmTimeout
        }),
        "{ev:?}"
    );
}

/// A huge-page block (host pages of 4 target pages) next to a small-page block: target pages of
/// one host page go consecutively and are placed atomically; faults request whole host pages;
/// a cut mid host page drops it and it is sent again.
fn huge_scenario() -> Scenario {
    let mut sc = Scenario::small(64, true);
    sc.blocks = vec![
        RamBlockSpec::new("ram", 64 * 4096, 4 * 4096),
        RamBlockSpec::new("rom", 4 * 4096, 4096),
    ];
    sc.rounds = 1;
    sc.switch_after_pages = Some(10);
    sc.faults = vec![(0, 61), (0, 30), (1, 3), (0, 31)];
    sc.pages_per_section = 3;
    sc.budget = 4096;
    sc
}

#[test]
fn huge_pages_postcopy_ends_identical() {
    let mut w = World::new(huge_scenario());
    w.start();
    w.run(100_000);
    w.assert_memory_equal();
    assert!(w.errors().is_empty(), "{:?}", w.errors());
    assert_eq!(w.cuts_done, 0);
    assert_eq!(w.dst.status(), S::Completed);
    assert_eq!(w.src.status(), S::Completed);
    // Every request asks for a whole host page of its block.
    let reqs: Vec<(u16, u64, u64)> = rp_offsets(&w.rp_bytes[0])
        .into_iter()
        .filter(|m| m.0 == 3 || m.0 == 4)
        .collect();
    assert!(!reqs.is_empty());
    for (_, off, len) in &reqs {
        let m = &w.rp_bytes[0][*off as usize..(*off + *len) as usize];
        let req_len = u32::from_be_bytes([m[12], m[13], m[14], m[15]]);
        assert!(req_len == 16384 || req_len == 4096, "{req_len}");
    }
}
