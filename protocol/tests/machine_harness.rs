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
}

#[test]
fn precopy_10x_goes_through_device() {
    let mut sc = Scenario::small(64, false);
    sc.profile = Profile::QEMU_10;
    let mut w = World::new(sc);
    w.start();
    w.run(10_000);
    w.assert_memory_equal();
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
}
