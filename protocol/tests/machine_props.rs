//! Property tests: random interleavings of input chunking, link cuts, operator controls and
//! guest faults never panic, never take a transition outside the tables, never place a page
//! twice, and, whenever the destination completes, end with its memory equal to the source's.

mod harness;

use harness::{Scenario, World};
use proptest::prelude::*;
use qmig_protocol::machine::status::Transition;
use qmig_protocol::machine::{
    Control, Event, Instant, MigrationStatus as S, DESTINATION_TRANSITIONS, SOURCE_TRANSITIONS,
};
use qmig_protocol::Profile;
use std::sync::atomic::{AtomicU64, Ordering};

static COMPLETED: AtomicU64 = AtomicU64::new(0);
static RECOVERED: AtomicU64 = AtomicU64::new(0);
static CASES: AtomicU64 = AtomicU64::new(0);

#[derive(Clone, Debug)]
enum Act {
    Steps(u8),
    Chunk(Option<u16>),
    Cut,
    Dst(Control),
    Src(Control),
    Fault(u8),
}

fn act() -> impl Strategy<Value = Act> {
    let control = prop_oneof![
        Just(Control::Recover),
        Just(Control::Pause),
        Just(Control::Cancel),
        Just(Control::Resume),
        Just(Control::StartPostcopy),
        Just(Control::Complete),
    ];
    prop_oneof![
        8 => (1u8..6).prop_map(Act::Steps),
        2 => proptest::option::of(1u16..5000).prop_map(Act::Chunk),
        2 => Just(Act::Cut),
        1 => control.clone().prop_map(Act::Dst),
        1 => control.prop_map(Act::Src),
        3 => (0u8..16).prop_map(Act::Fault),
    ]
}

fn legal(table: &[Transition], profile: Profile, events: &[Event]) -> Result<(), String> {
    for e in events {
        if let Event::IllegalTransition(t) = e {
            return Err(format!("illegal transition attempted: {t}"));
        }
        if let Event::Status { from, to } = e {
            if !table
                .iter()
                .any(|r| r.from == *from && r.to == *to && r.when.to(profile.version))
            {
                return Err(format!("{from} -> {to} is not in the table"));
            }
        }
    }
    Ok(())
}

fn scenario(v10: bool, postcopy: bool) -> Scenario {
    scenario_with(v10, postcopy, false)
}

fn scenario_with(v10: bool, postcopy: bool, huge: bool) -> Scenario {
    let mut sc = Scenario::small(16, postcopy);
    if v10 {
        sc.profile = Profile::QEMU_10;
    }
    if huge {
        sc.blocks = vec![
            qmig_protocol::machine::RamBlockSpec::new("ram", 16 * 4096, 4 * 4096),
            qmig_protocol::machine::RamBlockSpec::new("rom", 2 * 4096, 4096),
        ];
    }
    sc.rounds = 2;
    sc.writes_per_round = 3;
    sc.switch_after_pages = Some(4);
    sc.pages_per_section = 2;
    sc.budget = 3000;
    sc
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1024, failure_persistence: None, .. ProptestConfig::default() })]

    #[test]
    fn random_interleavings_keep_the_invariants(
        v10 in any::<bool>(),
        postcopy in any::<bool>(),
        huge in any::<bool>(),
        acts in proptest::collection::vec(act(), 0..40),
    ) {
        let sc = scenario_with(v10, postcopy, huge);
        let profile = sc.profile;
        let mut w = World::new(sc);
        w.record = false;
        w.start();
        let mut t = 0u64;
        for a in acts {
            t += 1;
            match a {
                Act::Steps(n) => {
                    for _ in 0..n {
                        w.step();
                    }
                }
                Act::Chunk(c) => w.sc.chunk = c.map(usize::from),
                Act::Cut => {
                    if w.link.is_some() {
                        w.cut_now();
                    }
                }
                Act::Dst(c) => {
                    let before = w.dst.status();
                    if w.dst.handle_control(Instant(t), c).is_ok()
                        && matches!(c, Control::Pause | Control::Cancel)
                        && before != w.dst.status()
                        && w.link.is_some()
                    {
                        // The destination shut its socket: the link is gone.
                        w.cut_now();
                    }
                }
                Act::Src(c) => {
                    let before = w.src.status();
                    if w.src.handle_control(Instant(t), c).is_ok()
                        && matches!(c, Control::Pause | Control::Cancel)
                        && before != w.src.status()
                        && w.link.is_some()
                    {
                        w.cut_now();
                    }
                }
                Act::Fault(p) => {
                    w.dst.handle_fault(0, u64::from(p) * 4096);
                }
            }
            w.drain_events();
            prop_assert_eq!(w.dst_mem.eexist, 0, "a page was placed twice");
        }
        // Let the migration finish without further interference.
        w.sc.chunk = None;
        let done = w.run_quiet(20_000);
        w.drain_events();
        legal(DESTINATION_TRANSITIONS, profile, &w.dst_events).map_err(TestCaseError::fail)?;
        legal(SOURCE_TRANSITIONS, profile, &w.src_events).map_err(TestCaseError::fail)?;
        prop_assert_eq!(w.dst_mem.eexist, 0, "a page was placed twice");
        CASES.fetch_add(1, Ordering::Relaxed);
        if w.dst.status() == S::Completed {
            COMPLETED.fetch_add(1, Ordering::Relaxed);
            if w.dst_statuses.contains(&S::PostcopyRecover) {
                RECOVERED.fetch_add(1, Ordering::Relaxed);
            }
            prop_assert!(done);
            prop_assert_eq!(&w.src_mem.blocks, &w.dst_mem.blocks, "destination completed with different memory");
        } else {
            // Not completed: only because an operator or an early failure ended it.
            let ended = w.dst.status().is_final() || w.src.status().is_final();
            prop_assert!(ended, "stuck: src {} dst {}", w.src.status(), w.dst.status());
        }
    }
}

#[test]
fn zz_report() {
    // Printed after the property run when tests run in one thread (`--test-threads 1`).
    println!(
        "machine_props: {} cases, {} completed, {} of them after at least one recovery",
        CASES.load(Ordering::Relaxed),
        COMPLETED.load(Ordering::Relaxed),
        RECOVERED.load(Ordering::Relaxed)
    );
}

use harness::Mem;
use qmig_protocol::machine::{Destination, DestinationConfig, RamBlockSpec, Source, SourceConfig};

fn small_blocks() -> Vec<RamBlockSpec> {
    vec![RamBlockSpec::new("ram", 16 * 4096, 4096)]
}

/// A valid postcopy stream and return path of a small migration, to mutate.
fn recorded() -> &'static (Vec<u8>, Vec<u8>) {
    static REC: std::sync::OnceLock<(Vec<u8>, Vec<u8>)> = std::sync::OnceLock::new();
    REC.get_or_init(|| {
        let mut sc = scenario(false, true);
        sc.faults = vec![(0, 15), (0, 14)];
        let mut w = World::new(sc);
        w.start();
        w.run(10_000);
        (w.main_bytes[0].clone(), w.rp_bytes[0].clone())
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 512, failure_persistence: None, .. ProptestConfig::default() })]

    /// Mutated main streams, in random chunks, never panic the destination, never place a
    /// page twice, and leave it in a status its table allows.
    #[test]
    fn mutated_streams_never_panic_the_destination(
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..4),
        cut in any::<prop::sample::Index>(),
        chunks in proptest::collection::vec(1usize..3000, 1..20),
        faults in proptest::collection::vec(0u64..16, 0..4),
    ) {
        let (main, _) = recorded();
        let mut bytes = main.clone();
        for (i, v) in flips {
            let i = i.index(bytes.len());
            bytes[i] ^= v | 1;
        }
        bytes.truncate(cut.index(bytes.len() + 1));
        let mut cfg = DestinationConfig::new(Profile::QEMU_7_2, "none", small_blocks(), true);
        cfg.vmdesc = Some(harness::vmdesc());
        let mut d = Destination::new(cfg).unwrap();
        let mut mem = Mem::new(&small_blocks(), 4096);
        d.handle_channel_opened(Instant(0)).unwrap();
        let mut buf = Vec::new();
        let mut pos = 0;
        let mut events = Vec::new();
        for (t, c) in chunks.iter().cycle().enumerate() {
            if pos >= bytes.len() {
                break;
            }
            let end = (pos + c).min(bytes.len());
            buf.extend_from_slice(&bytes[pos..end]);
            pos = end;
            match d.handle_stream(Instant(t as u64), &buf, &mut mem) {
                Ok(n) => {
                    buf.drain(..n);
                }
                Err(_) => break,
            }
            if d.status() == S::PostcopyActive {
                mem.uffd = true;
            }
            for f in &faults {
                d.handle_fault(0, f * 4096);
            }
        }
        d.handle_channel_closed(Instant(1 << 40));
        let mut rp = Vec::new();
        d.poll_transmit(&mut rp);
        while let Some(e) = d.poll_event() {
            events.push(e);
        }
        legal(DESTINATION_TRANSITIONS, Profile::QEMU_7_2, &events).map_err(TestCaseError::fail)?;
        prop_assert_eq!(mem.eexist, 0);
    }

    /// Arbitrary and mutated return-path bytes never panic the source.
    #[test]
    fn arbitrary_return_path_never_panics_the_source(
        junk in proptest::collection::vec(any::<u8>(), 0..200),
        flips in proptest::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 0..3),
        use_recorded in any::<bool>(),
    ) {
        let (main, rp) = recorded();
        let _ = main;
        let mut input = if use_recorded { rp.clone() } else { junk };
        let n = input.len();
        for (i, v) in flips {
            if n > 0 {
                input[i.index(n)] ^= v | 1;
            }
        }
        let blocks = small_blocks();
        let mem = Mem::new(&blocks, 4096);
        let mut src = Source::new(SourceConfig::new(Profile::QEMU_7_2, "none", blocks, true));
        src.handle_channel_opened(Instant(0)).unwrap();
        let mut out = Vec::new();
        src.poll_transmit(&mem, &mut out, 1);
        src.handle_control(Instant(1), Control::StartPostcopy).unwrap();
        src.poll_transmit(&mem, &mut out, 1);
        let _ = src.handle_return_path(Instant(2), &input);
        src.poll_transmit(&mem, &mut out, usize::MAX);
        let events: Vec<Event> = std::iter::from_fn(|| src.poll_event()).collect();
        legal(SOURCE_TRANSITIONS, Profile::QEMU_7_2, &events).map_err(TestCaseError::fail)?;
    }
}
