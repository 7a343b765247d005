//! Exhaustive link cuts during postcopy: at every byte offset of the main channel after
//! POSTCOPY_RUN, at every byte offset of the return path during postcopy, and at every byte
//! offset (both directions) of the recovery handshake. Every run must recover and end with the
//! destination's memory byte-identical to the source's. Also: ten consecutive failures in one
//! session, and cancel from paused and from recover.

mod harness;

use harness::{Cut, Dir, Scenario, World};
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::command::Command;
use qmig_protocol::machine::{
    Control, Event, FaultOutcome, Instant, MigrationStatus as S, RamBlockSpec,
};
use qmig_protocol::stream::{Channel, Item, StreamDecoder};

/// The 64-page guest of the cut tests: 4 KiB pages, 12 in 64 non-zero, dirtied in precopy,
/// switched to postcopy after 8 pages, faulting on five pages in postcopy.
fn scenario() -> Scenario {
    let mut sc = Scenario::small(64, true);
    sc.nonzero = (3, 16);
    sc.rounds = 2;
    sc.writes_per_round = 3;
    sc.switch_after_pages = Some(8);
    sc.faults = vec![(0, 60), (0, 33), (0, 34), (0, 12), (0, 60)];
    sc.pages_per_section = 4;
    sc.budget = 2048;
    sc
}

/// The cut tests' guest with a huge-page block (host pages of 4 target pages) and a small
/// block: 64 + 4 target pages.
fn huge_scenario() -> Scenario {
    let mut sc = scenario();
    sc.blocks = vec![
        RamBlockSpec::new("ram", 64 * 4096, 4 * 4096),
        RamBlockSpec::new("rom", 4 * 4096, 4096),
    ];
    sc.faults = vec![(0, 60), (1, 2), (0, 33), (0, 12)];
    sc
}

/// Offset just after the POSTCOPY_RUN command in a main stream.
fn after_run(main: &[u8]) -> u64 {
    after_run_in(&scenario(), main)
}

fn after_run_in(sc: &Scenario, main: &[u8]) -> u64 {
    let mut d = StreamDecoder::new(Channel::Main, sc.profile, Default::default());
    d.set_vmdesc(harness::vmdesc());
    let tps = sc.profile.target_page_size as u64;
    d.set_huge_page_blocks(
        sc.blocks
            .iter()
            .filter(|b| b.page_size != tps)
            .map(|b| b.name.as_bytes()),
    );
    let mut pos = 0;
    loop {
        let (item, n) = d.decode(&main[pos..]).expect("the source's stream decodes");
        pos += n;
        if matches!(item, Item::Command(Command::PostcopyRun)) {
            return pos as u64;
        }
    }
}

struct Totals {
    runs: u64,
    recovered: u64,
    unrecovered_shut: u64,
}

/// The world at the start of every step of a run with only `prefix` cuts: a run with more cuts
/// is identical to it until the step in which a later cut fires, so it can start from the
/// snapshot taken at the start of that step instead of from scratch.
struct Snapshots {
    at_step: Vec<Snapshot>,
}

/// Connection index, bytes delivered (main, return path) if a link is up, and the world.
type Snapshot = (u32, Option<(u64, u64)>, World);

impl Snapshots {
    fn take(sc: &Scenario, base: &(harness::Mem, harness::Rng), prefix: Vec<Cut>) -> Self {
        let mut sc = sc.clone();
        sc.cuts = prefix;
        let mut w = World::with_memory(sc, base.0.clone(), base.1.clone());
        w.record = false;
        w.start();
        let mut at_step = Vec::new();
        for _ in 0..100_000 {
            if w.done() {
                break;
            }
            let d = w.link.as_ref().map(|l| (l.main_delivered, l.rp_delivered));
            at_step.push((w.conn, d, w.clone()));
            w.step();
        }
        assert!(w.done());
        Snapshots { at_step }
    }

    /// The latest snapshot before `cut` can have fired.
    fn before(&self, cut: Cut) -> World {
        let (_, _, w) = self
            .at_step
            .iter()
            .rev()
            .find(|(conn, d, _)| {
                *conn < cut.conn
                    || (*conn == cut.conn
                        && d.is_some_and(|(m, r)| match cut.dir {
                            Dir::Main => m < cut.at,
                            Dir::Rp => r < cut.at,
                        }))
            })
            .expect("a snapshot before the cut");
        w.clone()
    }
}

fn finish(mut w: World, cuts: Vec<Cut>, t: &mut Totals) -> World {
    w.sc.cuts = cuts;
    w.run(100_000);
    t.runs += 1;
    w.assert_memory_equal();
    assert_eq!(w.dst.status(), S::Completed, "cuts {:?}", w.sc.cuts);
    assert!(
        !w.dst_events
            .iter()
            .chain(&w.src_events)
            .any(|e| matches!(e, Event::IllegalTransition(_))),
        "cuts {:?}",
        w.sc.cuts
    );
    match w.src.status() {
        S::Completed => {}
        // A cut inside SHUT: the destination completed, the source cannot learn it.
        S::PostcopyPaused => t.unrecovered_shut += 1,
        s => panic!("source ended in {s} (cuts {:?})", w.sc.cuts),
    }
    if w.cuts_done > 0 {
        t.recovered += 1;
    }
    w
}

fn run_cut(
    sc: &Scenario,
    base: &(harness::Mem, harness::Rng),
    cuts: Vec<Cut>,
    t: &mut Totals,
) -> World {
    let mut sc = sc.clone();
    sc.cuts = cuts.clone();
    let mut w = World::with_memory(sc, base.0.clone(), base.1.clone());
    w.record = false;
    w.start();
    finish(w, cuts, t)
}

/// Cuts `sc`'s link at every offset of the main channel after POSTCOPY_RUN, of the return path
/// after PONG(1), and of both directions of the recovery handshake; every run must recover.
fn every_offset(sc: &Scenario) {
    let base = World::initial_memory(sc);
    let mut probe = World::with_memory(sc.clone(), base.0.clone(), base.1.clone());
    probe.start();
    probe.run(100_000);
    probe.assert_memory_equal();
    let errors: Vec<&Event> = probe
        .dst_events
        .iter()
        .chain(&probe.src_events)
        .filter(|e| matches!(e, Event::Error { .. }))
        .collect();
    assert!(
        errors.is_empty() && probe.cuts_done == 0,
        "the uncut run has no error: {errors:?}"
    );
    let main = probe.main_bytes[0].clone();
    let rp_len = probe.rp_bytes[0].len() as u64;
    let run_end = after_run_in(sc, &main);
    let total = main.len() as u64;
    let mut t = Totals {
        runs: 0,
        recovered: 0,
        unrecovered_shut: 0,
    };
    let snaps = Snapshots::take(sc, &base, Vec::new());

    // Starting from a snapshot gives the same run as starting from scratch.
    for k in [run_end, (run_end + total) / 2, total - 1] {
        let cut = Cut {
            conn: 0,
            dir: Dir::Main,
            at: k,
        };
        let a = run_cut(sc, &base, vec![cut], &mut t);
        let b = finish(snaps.before(cut), vec![cut], &mut t);
        assert_eq!(a.dst_events, b.dst_events);
        assert_eq!(a.src_events, b.src_events);
    }
    t = Totals {
        runs: 0,
        recovered: 0,
        unrecovered_shut: 0,
    };

    // Main channel, every offset from just after POSTCOPY_RUN to the last byte before EOF's end.
    for k in run_end..total {
        let cut = Cut {
            conn: 0,
            dir: Dir::Main,
            at: k,
        };
        finish(snaps.before(cut), vec![cut], &mut t);
    }
    let main_runs = t.runs;

    // Return path, every offset after PONG(1) (the first message answered once postcopy runs).
    for j in 9..rp_len {
        let cut = Cut {
            conn: 0,
            dir: Dir::Rp,
            at: j,
        };
        finish(snaps.before(cut), vec![cut], &mut t);
    }
    let rp_runs = t.runs - main_runs;

    // The recovery handshake: first cut in the middle of postcopy, then every offset of the
    // recovery connection's RECV_BITMAP/POSTCOPY_RESUME and of its bitmap/RESUME_ACK answers.
    let first = Cut {
        conn: 0,
        dir: Dir::Main,
        at: (run_end + total) / 2,
    };
    let tps = sc.profile.target_page_size as u64;
    // Main: one RECV_BITMAP per block (0x08, be16 cmd, be16 len, str8 name) and RESUME (5).
    let hs_main: u64 = sc
        .blocks
        .iter()
        .map(|b| 5 + 1 + b.name.len() as u64)
        .sum::<u64>()
        + 5;
    // RP: per block header (4), str8 name, be64 size, bitmap, end mark; then RESUME_ACK (8).
    let hs_rp: u64 = sc
        .blocks
        .iter()
        .map(|b| 4 + 1 + b.name.len() as u64 + 8 + PageBitmap::wire_size(b.len / tps) + 8)
        .sum::<u64>()
        + 8;
    let snaps = Snapshots::take(sc, &base, vec![first]);
    for k in 0..=hs_main {
        let cut = Cut {
            conn: 1,
            dir: Dir::Main,
            at: k,
        };
        finish(snaps.before(cut), vec![first, cut], &mut t);
    }
    for j in 0..=hs_rp {
        let cut = Cut {
            conn: 1,
            dir: Dir::Rp,
            at: j,
        };
        finish(snaps.before(cut), vec![first, cut], &mut t);
    }
    let hs_runs = t.runs - main_runs - rp_runs;
    let blocks: Vec<String> = sc
        .blocks
        .iter()
        .map(|b| format!("{} {}x{}", b.name, b.len / b.page_size, b.page_size))
        .collect();
    println!(
        "cut runs ({blocks:?}): {} total ({} main offsets {}..{}, {} return-path offsets, {} handshake offsets); \
         {} recovered; {} cut inside SHUT (destination completed, source paused); 0 skipped",
        t.runs, main_runs, run_end, total, rp_runs, hs_runs, t.recovered, t.unrecovered_shut
    );
    assert_eq!(main_runs, total - run_end);
    assert_eq!(rp_runs, rp_len - 9);
    assert_eq!(hs_runs, hs_main + 1 + hs_rp + 1);
    assert_eq!(t.recovered, t.runs);
}

#[test]
fn cut_at_every_offset_recovers() {
    every_offset(&scenario());
}

#[test]
fn cut_at_every_offset_recovers_with_huge_pages() {
    every_offset(&huge_scenario());
}

#[test]
fn ten_consecutive_failures_including_in_recover() {
    let base = World::initial_memory(&scenario());
    let mut probe = World::with_memory(scenario(), base.0.clone(), base.1.clone());
    probe.start();
    probe.run(100_000);
    let run_end = after_run(&probe.main_bytes[0]);
    // Failure 1 in postcopy-active, then on each recovery connection alternately during the
    // handshake (in postcopy-recover) and shortly after it (in postcopy-active again).
    let mut cuts = vec![Cut {
        conn: 0,
        dir: Dir::Main,
        at: run_end + 100,
    }];
    for c in 1..10u32 {
        let cut = if c % 2 == 1 {
            Cut {
                conn: c,
                dir: Dir::Rp,
                at: 10,
            }
        } else {
            Cut {
                conn: c,
                dir: Dir::Main,
                at: 600,
            }
        };
        cuts.push(cut);
    }
    let mut sc = scenario();
    sc.cuts = cuts;
    let mut w = World::with_memory(sc, base.0, base.1);
    w.start();
    w.run(100_000);
    w.assert_memory_equal();
    assert_eq!(w.cuts_done, 10);
    assert_eq!(w.src.status(), S::Completed);
    assert_eq!(w.dst.status(), S::Completed);
    let pauses_from_recover = w
        .dst_statuses
        .windows(2)
        .filter(|p| p[0] == S::PostcopyRecover && p[1] == S::PostcopyPaused)
        .count();
    assert!(pauses_from_recover >= 5, "{:?}", w.dst_statuses);
    let paused = w
        .dst_statuses
        .iter()
        .filter(|s| **s == S::PostcopyPaused)
        .count();
    assert_eq!(paused, 10);
}

fn paused_world() -> World {
    let base = World::initial_memory(&scenario());
    let mut probe = World::with_memory(scenario(), base.0.clone(), base.1.clone());
    probe.start();
    probe.run(100_000);
    let run_end = after_run(&probe.main_bytes[0]);
    let mut sc = scenario();
    sc.cuts = vec![Cut {
        conn: 0,
        dir: Dir::Main,
        at: run_end + 50,
    }];
    let mut w = World::with_memory(sc, base.0, base.1);
    w.start();
    while w.link.is_some() || w.cuts_done == 0 {
        w.step();
    }
    assert_eq!(w.dst.status(), S::PostcopyPaused);
    assert_eq!(w.src.status(), S::PostcopyPaused);
    w
}

#[test]
fn cancel_from_paused_releases_waits() {
    let mut w = paused_world();
    // A guest access to a page that never came: the wait is queued while paused.
    let missing = (0..64u64)
        .find(|p| !w.dst.received(0).unwrap().test(*p))
        .expect("a missing page");
    assert_eq!(w.dst.handle_fault(0, missing * 4096), FaultOutcome::Queued);
    w.dst.handle_control(Instant(1), Control::Cancel).unwrap();
    w.src.handle_control(Instant(1), Control::Cancel).unwrap();
    let ev: Vec<Event> = std::iter::from_fn(|| w.dst.poll_event()).collect();
    assert!(
        ev.contains(&Event::Status {
            from: S::PostcopyPaused,
            to: S::Cancelled
        }),
        "{ev:?}"
    );
    assert!(
        ev.iter()
            .any(|e| matches!(e, Event::WaitsReleased { count } if *count >= 1)),
        "{ev:?}"
    );
    assert_eq!(w.dst.pending_faults().count(), 0);
    assert_eq!(
        w.dst.handle_fault(0, missing * 4096),
        FaultOutcome::Released
    );
    let sev: Vec<Event> = std::iter::from_fn(|| w.src.poll_event()).collect();
    assert!(sev.ends_with(&[
        Event::Status {
            from: S::PostcopyPaused,
            to: S::Cancelling
        },
        Event::Status {
            from: S::Cancelling,
            to: S::Cancelled
        }
    ]));
    // Nothing is accepted afterwards.
    assert!(w.dst.handle_control(Instant(2), Control::Recover).is_err());
}

#[test]
fn cancel_from_recover_releases_waits() {
    let mut w = paused_world();
    let missing = (0..64u64)
        .find(|p| !w.dst.received(0).unwrap().test(*p))
        .expect("a missing page");
    w.dst.handle_fault(0, missing * 4096);
    w.dst.handle_control(Instant(1), Control::Recover).unwrap();
    w.dst.handle_channel_opened(Instant(1)).unwrap();
    assert_eq!(w.dst.status(), S::PostcopyRecover);
    w.dst.handle_control(Instant(2), Control::Cancel).unwrap();
    let ev: Vec<Event> = std::iter::from_fn(|| w.dst.poll_event()).collect();
    assert!(
        ev.contains(&Event::Status {
            from: S::PostcopyRecover,
            to: S::Cancelled
        }),
        "{ev:?}"
    );
    assert!(ev.iter().any(|e| matches!(e, Event::WaitsReleased { .. })));
    assert!(!w.dst.channel_open());
}
