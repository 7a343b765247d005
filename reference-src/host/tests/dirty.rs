//! Kernel dirty tracking: the tracker reports exactly the pages another thread wrote.

use std::sync::Arc;

use qmig_host::dirty::{probe, Choice, DirtyError, DirtyTracker, Mechanism, PageBitmap};
use qmig_host::fill::{fill, Content};
use qmig_host::memory::{GuestRam, MapOptions, PAGE_SIZE};

const P: u64 = PAGE_SIZE as u64;

fn ram(specs: &[(&str, u64)]) -> Arc<GuestRam> {
    Arc::new(GuestRam::new(specs, MapOptions::default()).unwrap())
}

/// Writes one byte into each of `pages` of `block` from another thread, and joins it.
fn write_from_thread(ram: &Arc<GuestRam>, block: usize, pages: &[u64]) {
    let (ram, pages) = (ram.clone(), pages.to_vec());
    std::thread::spawn(move || {
        for p in pages {
            ram.blocks()[block].write(p * P + 123, &[0xA5]).unwrap();
        }
    })
    .join()
    .unwrap();
}

fn ones(b: &PageBitmap) -> Vec<u64> {
    b.iter_ones().collect()
}

/// Starts `mech` or explains why it is skipped (only when the kernel lacks it).
fn start(ram: &Arc<GuestRam>, mech: Mechanism) -> Option<DirtyTracker> {
    match DirtyTracker::start(ram.clone(), Choice::Only(mech)) {
        Ok(t) => Some(t),
        Err(DirtyError::Unavailable { why, .. }) => {
            eprintln!("SKIP {}: this kernel lacks it: {why}", mech.name());
            None
        }
        Err(e) => panic!("{e}"),
    }
}

fn exact_pages_and_nothing_after(mech: Mechanism) {
    let ram = ram(&[("pc.ram", 512 * P), ("vga.vram", 64 * P)]);
    fill(&ram.blocks()[0], Content::Random { seed: 1 }).unwrap();
    fill(&ram.blocks()[1], Content::Pattern { seed: 2 }).unwrap();
    let Some(mut t) = start(&ram, mech) else {
        return;
    };
    assert_eq!(t.mechanism(), mech);

    let chosen = [0u64, 7, 63, 64, 65, 200, 511];
    write_from_thread(&ram, 0, &chosen);
    write_from_thread(&ram, 1, &[3]);
    let s = t.sync().unwrap();
    assert_eq!(s.len(), 2);
    assert_eq!(ones(&s[0]), chosen);
    assert_eq!(ones(&s[1]), [3]);
    assert_eq!(s[0].pages(), 512);

    let again = t.sync().unwrap();
    assert_eq!(
        again[0].count_ones() + again[1].count_ones(),
        0,
        "no writes, no dirty pages"
    );

    // Reads do not dirty; a later write to an already reported page is reported again.
    let _ = ram.blocks()[0].read_page(100 * P).unwrap();
    write_from_thread(&ram, 0, &[7]);
    let third = t.sync().unwrap();
    assert_eq!(ones(&third[0]), [7]);
    assert_eq!(third[1].count_ones(), 0);
}

#[test]
fn wp_async_reports_exactly_written_pages() {
    exact_pages_and_nothing_after(Mechanism::UffdWpAsync);
}

#[test]
fn soft_dirty_reports_exactly_written_pages() {
    exact_pages_and_nothing_after(Mechanism::SoftDirty);
}

#[test]
fn wp_async_tracks_never_populated_pages_and_ignores_zero_page_reads() {
    let ram = ram(&[("pc.ram", 256 * P)]);
    let Some(mut t) = start(&ram, Mechanism::UffdWpAsync) else {
        return;
    };
    // Page 10 is only read (maps the shared zero page); 11 and 250 are first-touched by writes.
    let _ = ram.blocks()[0].read_page(10 * P).unwrap();
    write_from_thread(&ram, 0, &[11, 250]);
    assert_eq!(ones(&t.sync().unwrap()[0]), [11, 250]);
    // A write to the zero-page-mapped page is a write.
    write_from_thread(&ram, 0, &[10]);
    assert_eq!(ones(&t.sync().unwrap()[0]), [10]);
    assert_eq!(t.sync().unwrap()[0].count_ones(), 0);
}

#[test]
fn wp_async_large_sparse_and_dense_sets() {
    // More dirty regions than one PAGEMAP_SCAN output vector holds (1024): every other page.
    let ram = ram(&[("pc.ram", 8192 * P)]);
    fill(&ram.blocks()[0], Content::Pattern { seed: 3 }).unwrap();
    let Some(mut t) = start(&ram, Mechanism::UffdWpAsync) else {
        return;
    };
    let sparse: Vec<u64> = (0..8192).step_by(2).collect();
    write_from_thread(&ram, 0, &sparse);
    assert_eq!(ones(&t.sync().unwrap()[0]), sparse);
    let dense: Vec<u64> = (1000..5000).collect();
    write_from_thread(&ram, 0, &dense);
    assert_eq!(ones(&t.sync().unwrap()[0]), dense);
}

#[test]
fn auto_choice_names_a_working_mechanism() {
    let ram = ram(&[("pc.ram", 16 * P)]);
    let probes = probe();
    for (m, r) in &probes {
        eprintln!("{}: {:?}", m.name(), r);
    }
    let first_ok = probes.iter().find(|(_, r)| r.is_ok()).map(|(m, _)| *m);
    match DirtyTracker::start(ram, Choice::Auto) {
        Ok(t) => assert_eq!(Some(t.mechanism()), first_ok),
        Err(e) => assert_eq!(first_ok, None, "auto failed although a probe passed: {e}"),
    }
}

#[test]
fn deferred_arming_tracks_each_page_once_its_step_is_done() {
    use std::sync::atomic::{AtomicU64, Ordering};
    let ram = ram(&[("pc.ram", 512 * P), ("vga.vram", 64 * P)]);
    fill(&ram.blocks()[0], Content::Random { seed: 3 }).unwrap();
    let (mut t, arming) =
        match DirtyTracker::start_deferred(ram.clone(), Choice::Only(Mechanism::UffdWpAsync)) {
            Ok(x) => x,
            Err(DirtyError::Unavailable { why, .. }) => {
                eprintln!("SKIP: this kernel lacks uffd-wp async: {why}");
                return;
            }
            Err(e) => panic!("{e}"),
        };
    let arming = arming.expect("the userfaultfd mechanism defers its write protection");
    let marks: Vec<AtomicU64> = (0..2).map(|_| AtomicU64::new(0)).collect();
    // 64-page steps: the marks move through every step to each block's length.
    arming.run(&marks, 64 * PAGE_SIZE).unwrap();
    assert_eq!(marks[0].load(Ordering::Acquire), 512 * P);
    assert_eq!(marks[1].load(Ordering::Acquire), 64 * P);
    write_from_thread(&ram, 0, &[1, 64, 511]);
    write_from_thread(&ram, 1, &[63]);
    let s = t.sync().unwrap();
    assert_eq!(ones(&s[0]), [1, 64, 511]);
    assert_eq!(ones(&s[1]), [63]);
    let s = t.sync().unwrap();
    assert!(ones(&s[0]).is_empty() && ones(&s[1]).is_empty());
}

#[test]
fn soft_dirty_is_armed_at_once_by_start_deferred() {
    let ram = ram(&[("pc.ram", 16 * P)]);
    match DirtyTracker::start_deferred(ram, Choice::Only(Mechanism::SoftDirty)) {
        Ok((t, arming)) => {
            assert_eq!(t.mechanism(), Mechanism::SoftDirty);
            assert!(arming.is_none());
        }
        Err(DirtyError::Unavailable { why, .. }) => eprintln!("SKIP: no soft-dirty: {why}"),
        Err(e) => panic!("{e}"),
    }
}
