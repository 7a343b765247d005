//! Destination placement through userfaultfd (needs root or vm.unprivileged_userfaultfd=1).
//!
//! Every wait on another thread is a channel receive; the timeouts only turn a hang into a
//! failure, they never decide an outcome.

use std::sync::mpsc::{channel, Receiver, TryRecvError};
use std::sync::Arc;
use std::time::Duration;

use qmig_host::fill::{page_content, Content};
use qmig_host::memory::{GuestRam, MapOptions, PAGE_SIZE};
use qmig_host::uffd::{Batcher, Fault, PlaceConfig, UffdError, UffdRam, ZeroPolicy};

const GUARD: Duration = Duration::from_secs(20);
const P: u64 = PAGE_SIZE as u64;

fn setup(pages: u64, cfg: PlaceConfig) -> (Arc<GuestRam>, UffdRam, Receiver<Fault>) {
    let ram = Arc::new(GuestRam::new(&[("pc.ram", pages * P)], MapOptions::default()).unwrap());
    let (u, rx) = UffdRam::register(ram.clone(), cfg).expect("userfaultfd register");
    (ram, u, rx)
}

fn page(seed: u64, p: u64) -> [u8; PAGE_SIZE] {
    let mut b = [0u8; PAGE_SIZE];
    page_content(Content::Random { seed }, p, &mut b);
    b
}

/// Spawns a thread that reads page `p` of block 0 and sends its bytes.
fn reader(ram: &Arc<GuestRam>, p: u64) -> Receiver<[u8; PAGE_SIZE]> {
    let (tx, rx) = channel();
    let ram = ram.clone();
    std::thread::spawn(move || {
        let bytes = ram.blocks()[0].read_page(p * P).unwrap();
        let _ = tx.send(bytes);
    });
    rx
}

#[test]
fn missing_page_read_blocks_until_placed() {
    let (ram, u, faults) = setup(16, PlaceConfig::default());
    let got = reader(&ram, 3);
    let f = faults.recv_timeout(GUARD).expect("fault forwarded");
    assert_eq!((f.block, f.offset, f.write), (0, 3 * P, false));
    // The page is missing, so the reader cannot have finished.
    assert_eq!(got.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(u.pending_faults(), 1);
    let data = page(1, 3);
    u.place(0, 3 * P, &data).unwrap();
    assert_eq!(got.recv_timeout(GUARD).expect("reader woken"), data);
    assert_eq!(u.pending_faults(), 0);
    assert_eq!(u.take_fault_latencies().len(), 1);
    assert!(u.is_received(0, 3 * P));
    assert_eq!(u.missing_pages(0).unwrap(), 15);
    let s = u.stats();
    assert_eq!(
        (s.copied_pages, s.copy_calls, s.faults_forwarded),
        (1, 1, 1)
    );
}

#[test]
fn contiguous_run_is_one_copy_per_batch() {
    let (ram, u, _faults) = setup(
        256,
        PlaceConfig {
            max_batch: 256 * 1024,
            ..Default::default()
        },
    );
    let run: Vec<u8> = (0..128).flat_map(|p| page(2, p)).collect();
    u.place(0, 0, &run).unwrap();
    let s = u.stats();
    assert_eq!(s.copied_pages, 128);
    assert_eq!(s.copy_calls, 2, "128 pages in 256 KiB batches");
    let mut back = vec![0u8; run.len()];
    ram.blocks()[0].read(0, &mut back).unwrap();
    assert_eq!(back, run);
    assert_eq!(u.missing_pages(0).unwrap(), 128);
    assert_eq!(u.received_words(0).unwrap()[..2], [u64::MAX, u64::MAX]);
    assert_eq!(u.received_words(0).unwrap()[2..], [0, 0]);
}

#[test]
fn ranged_zeropage_is_one_call() {
    let (ram, u, _faults) = setup(64, PlaceConfig::default());
    u.place_zero(0, 8 * P, 32 * P).unwrap();
    let s = u.stats();
    assert_eq!((s.zero_pages, s.zero_calls), (32, 1));
    for p in 8..40 {
        assert!(u.is_received(0, p * P));
        assert_eq!(ram.blocks()[0].read_page(p * P).unwrap(), [0u8; PAGE_SIZE]);
    }
    // They are present now: copying over them is refused page by page (EEXIST), not applied.
    let run: Vec<u8> = (8..40).flat_map(|p| page(3, p)).collect();
    u.place(0, 8 * P, &run).unwrap();
    assert_eq!(u.stats().already_present, 32);
    assert_eq!(ram.blocks()[0].read_page(9 * P).unwrap(), [0u8; PAGE_SIZE]);
}

#[test]
fn eexist_skips_present_page_and_places_the_rest() {
    let (ram, u, _faults) = setup(16, PlaceConfig::default());
    let first = page(4, 5);
    u.place(0, 5 * P, &first).unwrap();
    let run: Vec<u8> = (4..8).flat_map(|p| page(5, p)).collect();
    u.place(0, 4 * P, &run).unwrap();
    let s = u.stats();
    assert_eq!(s.already_present, 1);
    assert_eq!(s.copied_pages, 1 + 3);
    // 1 call for page 5; then page 4 (partial: stops at 5), page 5 (EEXIST), pages 6-7.
    assert_eq!(s.copy_calls, 1 + 3);
    let b = &ram.blocks()[0];
    assert_eq!(b.read_page(4 * P).unwrap(), page(5, 4));
    assert_eq!(
        b.read_page(5 * P).unwrap(),
        first,
        "present page not overwritten"
    );
    assert_eq!(b.read_page(6 * P).unwrap(), page(5, 6));
    assert_eq!(b.read_page(7 * P).unwrap(), page(5, 7));
}

#[test]
fn discard_makes_a_page_fault_again() {
    let (ram, u, faults) = setup(8, PlaceConfig::default());
    u.place(0, 2 * P, &page(6, 2)).unwrap();
    assert_eq!(ram.blocks()[0].read_page(2 * P).unwrap(), page(6, 2));
    u.discard(0, 2 * P, P).unwrap();
    assert!(!u.is_received(0, 2 * P));
    let got = reader(&ram, 2);
    let f = faults.recv_timeout(GUARD).expect("fault after discard");
    assert_eq!((f.block, f.offset), (0, 2 * P));
    assert_eq!(got.try_recv().unwrap_err(), TryRecvError::Empty);
    u.place(0, 2 * P, &page(7, 2)).unwrap();
    assert_eq!(got.recv_timeout(GUARD).unwrap(), page(7, 2));
}

#[test]
fn cancel_unblocks_waiters() {
    let (ram, u, faults) = setup(16, PlaceConfig::default());
    let a = reader(&ram, 9);
    let b = reader(&ram, 10);
    let mut seen: Vec<u64> = (0..2)
        .map(|_| faults.recv_timeout(GUARD).unwrap().offset)
        .collect();
    seen.sort();
    assert_eq!(seen, [9 * P, 10 * P]);
    u.cancel().unwrap();
    assert_eq!(
        a.recv_timeout(GUARD).expect("waiter 9 released"),
        [0u8; PAGE_SIZE]
    );
    assert_eq!(
        b.recv_timeout(GUARD).expect("waiter 10 released"),
        [0u8; PAGE_SIZE]
    );
    assert!(matches!(
        u.place(0, 0, &page(8, 0)),
        Err(UffdError::Cancelled)
    ));
}

#[test]
fn lazy_zero_pages_fault_and_resolve_without_the_driver() {
    let (ram, u, faults) = setup(32, PlaceConfig::default());
    u.mark_zero(0, 10 * P, 10 * P).unwrap();
    assert_eq!(u.missing_pages(0).unwrap(), 22);
    assert_eq!(
        reader(&ram, 12).recv_timeout(GUARD).unwrap(),
        [0u8; PAGE_SIZE]
    );
    assert_eq!(faults.try_recv().unwrap_err(), TryRecvError::Empty);
    let s = u.stats();
    assert_eq!(
        (
            s.lazy_zero_pages,
            s.faults_resolved_locally,
            s.faults_forwarded
        ),
        (10, 1, 0)
    );
    assert_eq!((s.zero_pages, s.zero_calls), (1, 1));
}

#[test]
fn lazy_zero_resolves_an_already_waiting_fault() {
    let (ram, u, faults) = setup(8, PlaceConfig::default());
    let got = reader(&ram, 4);
    assert_eq!(faults.recv_timeout(GUARD).unwrap().offset, 4 * P);
    u.mark_zero(0, 4 * P, P).unwrap();
    assert_eq!(got.recv_timeout(GUARD).unwrap(), [0u8; PAGE_SIZE]);
    assert_eq!(u.take_fault_latencies().len(), 1);
}

#[test]
fn batcher_groups_contiguous_pages_and_zero_runs() {
    let (ram, u, _faults) = setup(
        64,
        PlaceConfig {
            max_batch: 64 * 1024,
            ..Default::default()
        },
    );
    {
        let mut bt = Batcher::new(&u, ZeroPolicy::Populate);
        for p in 0..20 {
            bt.push_page(0, p * P, &page(9, p)).unwrap();
        }
        for p in 20..30 {
            bt.push_zero(0, p * P).unwrap();
        }
        bt.push_page(0, 40 * P, &page(9, 40)).unwrap();
        bt.flush().unwrap();
    }
    let s = u.stats();
    // 20 pages in 16-page (64 KiB) batches: 2 copies; 1 more for page 40; 1 ranged zero-fill.
    assert_eq!((s.copied_pages, s.copy_calls), (21, 3));
    assert_eq!((s.zero_pages, s.zero_calls), (10, 1));
    let b = &ram.blocks()[0];
    for p in 0..20 {
        assert_eq!(b.read_page(p * P).unwrap(), page(9, p));
    }
    assert_eq!(b.read_page(25 * P).unwrap(), [0u8; PAGE_SIZE]);
    assert_eq!(b.read_page(40 * P).unwrap(), page(9, 40));
    assert_eq!(u.missing_pages(0).unwrap(), 64 - 31);
}

#[test]
fn batcher_flushes_at_once_only_for_a_page_a_fault_waits_on() {
    let (ram, u, faults) = setup(64, PlaceConfig::default());
    let got = reader(&ram, 40);
    assert_eq!(faults.recv_timeout(GUARD).unwrap().offset, 40 * P);
    assert_eq!(u.pending_faults(), 1);
    let mut bt = Batcher::new(&u, ZeroPolicy::Lazy);
    // Pages nobody waits on stay staged although a fault is pending.
    for p in 0..8 {
        bt.push_page(0, p * P, &page(4, p)).unwrap();
    }
    bt.push_zero(0, 20 * P).unwrap();
    assert_eq!(
        u.stats().copy_calls,
        1,
        "pages 0..8 in one call when the zero run began"
    );
    for p in 38..40 {
        bt.push_page(0, p * P, &page(4, p)).unwrap();
    }
    assert_eq!(u.stats().copy_calls, 1);
    assert_eq!(got.try_recv().unwrap_err(), TryRecvError::Empty);
    // The waited-on page goes out at once, alone, ahead of the staged pages 38 and 39.
    bt.push_page(0, 40 * P, &page(4, 40)).unwrap();
    let s = u.stats();
    assert_eq!((s.copied_pages, s.copy_calls), (9, 2));
    assert_eq!(got.recv_timeout(GUARD).unwrap(), page(4, 40));
    assert_eq!(u.pending_faults(), 0);
    drop(bt);
    let s = u.stats();
    assert_eq!((s.copied_pages, s.copy_calls), (11, 3));
    assert_eq!(ram.blocks()[0].read_page(39 * P).unwrap(), page(4, 39));
}

#[test]
fn batcher_places_a_resend_of_a_staged_page_after_it() {
    let (ram, u, faults) = setup(16, PlaceConfig::default());
    let mut bt = Batcher::new(&u, ZeroPolicy::Lazy);
    bt.push_page(0, 2 * P, &page(5, 2)).unwrap();
    bt.push_page(0, 3 * P, &page(5, 3)).unwrap();
    let got = reader(&ram, 3);
    assert_eq!(faults.recv_timeout(GUARD).unwrap().offset, 3 * P);
    // Page 3 again while its first copy is staged: the staged run is placed, then the resend
    // (which finds the page present), never the other way round.
    bt.push_page(0, 3 * P, &page(6, 3)).unwrap();
    assert_eq!(got.recv_timeout(GUARD).unwrap(), page(5, 3));
    drop(bt);
    let s = u.stats();
    assert_eq!((s.copied_pages, s.already_present), (2, 1));
}

#[test]
fn out_of_range_and_unaligned_are_typed_errors() {
    let (_ram, u, _faults) = setup(4, PlaceConfig::default());
    assert!(matches!(
        u.place(0, 4 * P, &page(1, 0)),
        Err(UffdError::Mem(_))
    ));
    assert!(matches!(u.place(0, 1, &page(1, 0)), Err(UffdError::Mem(_))));
    assert!(matches!(u.place(1, 0, &page(1, 0)), Err(UffdError::Mem(_))));
    assert!(matches!(
        u.place_zero(0, 3 * P, 2 * P),
        Err(UffdError::Mem(_))
    ));
    assert!(matches!(
        u.discard(0, u64::MAX - 10, P),
        Err(UffdError::Mem(_))
    ));
}

#[test]
fn destination_machine_places_through_the_guest_memory_trait() {
    use qmig_protocol::machine::GuestMemory;
    let (ram, mut u, faults) = setup(8, PlaceConfig::default());
    let got = reader(&ram, 1);
    assert_eq!(faults.recv_timeout(GUARD).unwrap().offset, P);
    GuestMemory::place_page(&mut u, 0, P, &page(10, 1)).unwrap();
    assert_eq!(got.recv_timeout(GUARD).unwrap(), page(10, 1));
    GuestMemory::place_zero(&mut u, 0, 2 * P, 2 * P).unwrap();
    assert_eq!(u.stats().zero_calls, 1);
    GuestMemory::discard(&mut u, 0, P, P).unwrap();
    assert!(!u.is_received(0, P));
    let e = GuestMemory::place_page(&mut u, 0, 8 * P, &page(10, 8)).unwrap_err();
    assert_eq!(e.code, libc::EINVAL);
    u.cancel().unwrap();
    let e = GuestMemory::place_page(&mut u, 0, 0, &page(10, 0)).unwrap_err();
    assert_eq!(e.code, libc::ECANCELED);
}

#[test]
fn received_bitmap_and_pending_faults_for_recovery() {
    let (ram, u, faults) = setup(130, PlaceConfig::default());
    u.place(0, 0, &page(11, 0)).unwrap();
    u.place_zero(0, 64 * P, 2 * P).unwrap();
    u.mark_zero(0, 129 * P, P).unwrap();
    let got = reader(&ram, 100);
    assert_eq!(faults.recv_timeout(GUARD).unwrap().offset, 100 * P);
    assert_eq!(u.pending_fault_pages(), [(0, 100 * P)]);
    let bm = u.received_bitmap(0).unwrap();
    assert_eq!(bm.pages(), 130);
    assert_eq!(bm.iter_ones().collect::<Vec<_>>(), [0, 64, 65, 129]);
    // Wire form: three LE words (130 pages round up to 24 bytes).
    let le = bm.to_le_vec();
    assert_eq!(le.len(), 24);
    assert_eq!(le[0], 1);
    assert_eq!(le[8], 0b11);
    assert_eq!(le[16], 0b10);
    u.place(0, 100 * P, &page(11, 100)).unwrap();
    assert_eq!(got.recv_timeout(GUARD).unwrap(), page(11, 100));
    assert!(u.pending_fault_pages().is_empty());
}

#[test]
fn many_threads_on_one_missing_page_make_one_fault_and_all_wake() {
    let (ram, u, faults) = setup(4, PlaceConfig::default());
    let waiters: Vec<_> = (0..4).map(|_| reader(&ram, 2)).collect();
    let f = faults.recv_timeout(GUARD).unwrap();
    assert_eq!(f.offset, 2 * P);
    for w in &waiters {
        assert_eq!(w.try_recv().unwrap_err(), TryRecvError::Empty);
    }
    u.place(0, 2 * P, &page(12, 2)).unwrap();
    for w in waiters {
        assert_eq!(w.recv_timeout(GUARD).unwrap(), page(12, 2));
    }
    // Every duplicate fault message has been read by now or never will be: the reader does not
    // forward a page twice, so nothing else can be on the channel.
    assert_eq!(faults.try_recv().unwrap_err(), TryRecvError::Empty);
    assert_eq!(u.stats().faults_forwarded, 1);
}
