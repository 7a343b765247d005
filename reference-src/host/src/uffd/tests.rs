//! Unit tests of the never-faulting accessors ([`UffdRam::overwrite`],
//! [`UffdRam::overwrite_zero`], [`UffdRam::read_received`]).
//!
//! Each access runs on a helper thread while the test thread serves the fault descriptor, the
//! way qmig-dst's migration thread does; every fault message the kernel raises meanwhile is
//! counted (and resolved, so that a faulting access cannot hang the test). A count of zero is
//! the property; the control test shows that a plain store to a lazy zero page is counted.

use std::io::Write;
use std::os::fd::{AsFd, AsRawFd};
use std::os::unix::net::UnixStream;
use std::sync::Arc;

use super::{FaultSource, PlaceConfig, UffdRam};
use crate::memory::{GuestRam, MapOptions, PAGE_SIZE};

const P: u64 = PAGE_SIZE as u64;

fn setup(pages: u64) -> (Arc<GuestRam>, UffdRam, FaultSource) {
    let ram = Arc::new(GuestRam::new(&[("ram", pages * P)], MapOptions::default()).unwrap());
    let (uffd, faults) = UffdRam::register_polled(ram.clone(), PlaceConfig::default()).unwrap();
    (ram, uffd, faults)
}

fn faults_seen(uffd: &UffdRam) -> u64 {
    let s = uffd.stats();
    s.faults_resolved_locally + s.faults_forwarded
}

/// Runs `f` on another thread while this one serves `faults`; returns `f`'s result and the
/// number of userfaultfd faults raised meanwhile. Forwarded faults are answered with a zero
/// page so that the access completes.
fn watched<T: Send>(
    uffd: &UffdRam,
    faults: &mut FaultSource,
    f: impl FnOnce() -> T + Send,
) -> (T, u64) {
    let before = faults_seen(uffd);
    let (done_rx, mut done_tx) = UnixStream::pair().unwrap();
    let r = std::thread::scope(|s| {
        let h = s.spawn(move || {
            let r = f();
            done_tx.write_all(&[1]).unwrap();
            r
        });
        loop {
            let mut fds = [
                libc::pollfd {
                    fd: faults.as_fd().as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
                libc::pollfd {
                    fd: done_rx.as_raw_fd(),
                    events: libc::POLLIN,
                    revents: 0,
                },
            ];
            // SAFETY: two live pollfd structs.
            let n = unsafe { libc::poll(fds.as_mut_ptr(), 2, -1) };
            assert!(n > 0, "poll: {}", std::io::Error::last_os_error());
            if fds[0].revents != 0 {
                let mut got = Vec::new();
                faults.read(&mut got).unwrap();
                for f in got {
                    uffd.place_zero(f.block, f.offset, P).unwrap();
                }
            }
            if fds[1].revents != 0 {
                break;
            }
        }
        h.join().unwrap()
    });
    (r, faults_seen(uffd) - before)
}

fn page(b: u8) -> Vec<u8> {
    vec![b; PAGE_SIZE]
}

#[test]
fn control_plain_store_to_a_lazy_zero_page_faults() {
    let (ram, uffd, mut faults) = setup(8);
    uffd.mark_zero(0, 0, P).unwrap();
    let ((), n) = watched(&uffd, &mut faults, || {
        ram.block(0).unwrap().write(0, &page(7)).unwrap()
    });
    assert_eq!(n, 1, "the harness must see the fault of a plain store");
}

#[test]
fn overwrite_of_a_lazy_zero_page_never_faults() {
    let (_ram, uffd, mut faults) = setup(8);
    uffd.mark_zero(0, 0, 8 * P).unwrap();
    let (r, n) = watched(&uffd, &mut faults, || uffd.overwrite(0, 3 * P, &page(0x5a)));
    r.unwrap();
    assert_eq!(n, 0);
    assert!(!uffd.is_lazy_zero(0, 3 * P));
    let mut out = page(0);
    assert!(uffd.read_received(0, 3 * P, &mut out).unwrap());
    assert_eq!(out, page(0x5a));
    // The neighbours are still lazy (nothing else was mapped).
    assert!(uffd.is_lazy_zero(0, 2 * P) && uffd.is_lazy_zero(0, 4 * P));
}

#[test]
fn overwrite_replaces_a_placed_page_and_places_a_missing_one() {
    let (_ram, uffd, mut faults) = setup(8);
    uffd.place(0, P, &page(1)).unwrap();
    let (r, n) = watched(&uffd, &mut faults, || {
        uffd.overwrite(0, P, &page(2))?;
        uffd.overwrite(0, 5 * P, &page(3))
    });
    r.unwrap();
    assert_eq!(n, 0);
    let mut out = page(0);
    assert!(uffd.read_received(0, P, &mut out).unwrap());
    assert_eq!(
        out,
        page(2),
        "a resend replaces the page (COPY would keep the old one)"
    );
    assert!(uffd.read_received(0, 5 * P, &mut out).unwrap());
    assert_eq!(out, page(3));
    assert!(uffd.is_received(0, 5 * P));
    assert_eq!(uffd.stats().copied_pages, 2);
}

#[test]
fn overwrite_zero_maps_nothing_for_lazy_pages_and_zeroes_data_pages() {
    let (_ram, uffd, mut faults) = setup(8);
    uffd.mark_zero(0, 0, 2 * P).unwrap();
    uffd.place(0, 2 * P, &page(9)).unwrap();
    let mapped = uffd.stats().zero_pages;
    let (r, n) = watched(&uffd, &mut faults, || {
        uffd.overwrite_zero(0, 0, 3 * P)?;
        uffd.overwrite_zero(0, 6 * P, P)
    });
    r.unwrap();
    assert_eq!(n, 0);
    assert_eq!(uffd.stats().zero_pages, mapped, "no zero page was mapped");
    assert!(uffd.is_lazy_zero(0, 0) && uffd.is_lazy_zero(0, P));
    assert!(
        uffd.is_lazy_zero(0, 6 * P),
        "a missing page becomes a lazy zero page"
    );
    let mut out = page(0xee);
    assert!(uffd.read_received(0, 2 * P, &mut out).unwrap());
    assert_eq!(out, page(0));
}

#[test]
fn read_received_never_faults_and_refuses_missing_pages() {
    let (_ram, uffd, mut faults) = setup(8);
    uffd.mark_zero(0, 0, P).unwrap();
    let ((lazy, missing, buf), n) = watched(&uffd, &mut faults, || {
        let mut buf = page(0xff);
        let lazy = uffd.read_received(0, 0, &mut buf).unwrap();
        let mut other = page(0);
        let missing = uffd.read_received(0, 4 * P, &mut other).unwrap();
        (lazy, missing, buf)
    });
    assert_eq!(n, 0);
    assert!(lazy && !missing);
    assert_eq!(buf, page(0));
    assert!(
        uffd.is_lazy_zero(0, 0),
        "reading a lazy page does not map it"
    );
    assert!(!uffd.is_received(0, 4 * P));
}

#[test]
fn discarded_page_is_placed_again_by_overwrite() {
    let (_ram, uffd, mut faults) = setup(4);
    uffd.place(0, 0, &page(1)).unwrap();
    uffd.discard(0, 0, P).unwrap();
    assert!(!uffd.is_received(0, 0));
    let (r, n) = watched(&uffd, &mut faults, || uffd.overwrite(0, 0, &page(4)));
    r.unwrap();
    assert_eq!(n, 0);
    let mut out = page(0);
    assert!(uffd.read_received(0, 0, &mut out).unwrap());
    assert_eq!(out, page(4));
}
