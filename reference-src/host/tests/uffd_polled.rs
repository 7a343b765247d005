//! `UffdRam::register_polled`: faults read by the caller's own poll loop (no reader thread).

use std::os::fd::{AsFd, AsRawFd};
use std::sync::Arc;

use qmig_host::memory::{GuestRam, MapOptions, PAGE_SIZE};
use qmig_host::uffd::{FaultSource, PlaceConfig, UffdRam};

/// Blocks until the fault descriptor is readable.
fn wait_readable(f: &FaultSource) {
    let mut p = libc::pollfd {
        fd: f.as_fd().as_raw_fd(),
        events: libc::POLLIN,
        revents: 0,
    };
    // SAFETY: one live pollfd.
    assert_eq!(unsafe { libc::poll(&mut p, 1, -1) }, 1);
}

#[test]
fn polled_fault_is_read_and_resolved_by_placement() {
    let ram =
        Arc::new(GuestRam::new(&[("ram", 16 * PAGE_SIZE as u64)], MapOptions::default()).unwrap());
    let (uffd, mut faults) = UffdRam::register_polled(ram.clone(), PlaceConfig::default()).unwrap();
    let reader = {
        let ram = ram.clone();
        std::thread::spawn(move || {
            ram.block(0)
                .unwrap()
                .read_page(5 * PAGE_SIZE as u64)
                .unwrap()
        })
    };
    // Wait for the fault message on the descriptor itself.
    let mut got = Vec::new();
    while got.is_empty() {
        wait_readable(&faults);
        faults.read(&mut got).unwrap();
    }
    assert_eq!(got.len(), 1);
    assert_eq!((got[0].block, got[0].offset), (0, 5 * PAGE_SIZE as u64));
    assert_eq!(uffd.pending_faults(), 1);
    let page = [0xa5u8; PAGE_SIZE];
    uffd.place(0, 5 * PAGE_SIZE as u64, &page).unwrap();
    assert_eq!(reader.join().unwrap(), page);
    assert_eq!(uffd.pending_faults(), 0);
    assert_eq!(uffd.take_fault_latencies().len(), 1);
    // A lazily zero page is resolved without being forwarded.
    uffd.mark_zero(0, 0, PAGE_SIZE as u64).unwrap();
    let r2 = {
        let ram = ram.clone();
        std::thread::spawn(move || ram.block(0).unwrap().read_page(0).unwrap())
    };
    wait_readable(&faults);
    let mut none = Vec::new();
    faults.read(&mut none).unwrap();
    assert!(none.is_empty());
    assert_eq!(r2.join().unwrap(), [0u8; PAGE_SIZE]);
}
