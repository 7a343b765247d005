//! A synthetic guest workload: threads touching guest RAM pages.
//!
//! This module owns [`Workload`]: `threads` threads that each pick a page of the working set
//! (randomly or sequentially), and read it, write it, or read then write it, at a configured
//! rate. Writes store 64 seeded pseudo-random bytes at a seeded 64-byte slot of the page, so a
//! written page almost surely changes. On the source this is what dirty tracking must see; on a
//! postcopy destination a read of a page not placed yet blocks in the kernel until it is placed:
//! that is the fault path.
//!
//! Stopping is by flag plus condition variable, then join: a paced thread waits on the condvar
//! until its next deadline, so [`Workload::stop`] wakes it at once. The workload keeps no record
//! of which pages it wrote (tests learn that by diffing memory).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::memory::{GuestRam, PAGE_SIZE};

/// How fast each thread touches pages.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rate {
    /// As fast as possible.
    Unlimited,
    /// This many page operations per second per thread.
    PagesPerSec(u64),
}

/// Order in which pages of the working set are visited.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pattern {
    /// Uniformly random pages.
    Random,
    /// Thread `t` of `n` visits pages `t, t+n, t+2n, …`, wrapping.
    Sequential,
}

/// What each operation does to its page.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// Write 64 bytes (source-side guest).
    Write,
    /// Read 8 bytes (faults in a missing page on a postcopy destination).
    Read,
    /// Read 8 bytes, then write 64 bytes (destination-side guest).
    ReadWrite,
}

/// Workload parameters.
#[derive(Debug, Clone)]
pub struct WorkloadConfig {
    /// Number of threads.
    pub threads: usize,
    /// Per-thread rate.
    pub rate: Rate,
    /// Block index in the [`GuestRam`].
    pub block: usize,
    /// First page of the working set.
    pub first_page: u64,
    /// Pages in the working set (clipped to the block).
    pub pages: u64,
    /// Visiting order.
    pub pattern: Pattern,
    /// Operation kind.
    pub access: Access,
    /// Seed for page choice and written bytes (thread `t` uses `seed + t`).
    pub seed: u64,
    /// Stop each thread by itself after this many operations (None: until stopped).
    pub max_ops_per_thread: Option<u64>,
}

impl Default for WorkloadConfig {
    fn default() -> Self {
        Self {
            threads: 1,
            rate: Rate::Unlimited,
            block: 0,
            first_page: 0,
            pages: u64::MAX,
            pattern: Pattern::Random,
            access: Access::Write,
            seed: 0,
            max_ops_per_thread: None,
        }
    }
}

/// Totals after a workload stopped.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct WorkloadStats {
    /// Page writes done.
    pub writes: u64,
    /// Page reads done.
    pub reads: u64,
    /// XOR of every value read (keeps reads from being optimised away).
    pub read_xor: u64,
}

struct Stop {
    flag: AtomicBool,
    lock: Mutex<()>,
    cv: Condvar,
}

/// A running workload; see the module doc.
pub struct Workload {
    stop: Arc<Stop>,
    ops: Arc<AtomicU64>,
    threads: Vec<JoinHandle<WorkloadStats>>,
}

impl Workload {
    /// Starts the threads. The working set is clipped to the block; an unknown block or an empty
    /// working set starts threads that do nothing. Fails only if a thread cannot be spawned
    /// (threads already started are stopped and joined).
    pub fn start(ram: Arc<GuestRam>, cfg: WorkloadConfig) -> std::io::Result<Self> {
        let stop = Arc::new(Stop {
            flag: AtomicBool::new(false),
            lock: Mutex::new(()),
            cv: Condvar::new(),
        });
        let ops = Arc::new(AtomicU64::new(0));
        let mut w = Self {
            stop,
            ops,
            threads: Vec::new(),
        };
        for t in 0..cfg.threads.max(1) {
            let (ram, cfg, stop, ops) = (ram.clone(), cfg.clone(), w.stop.clone(), w.ops.clone());
            // On error `w` is dropped, which stops and joins the threads already running.
            let h = std::thread::Builder::new()
                .name(format!("workload-{t}"))
                .spawn(move || run(&ram, &cfg, t, &stop, &ops))?;
            w.threads.push(h);
        }
        Ok(w)
    }

    /// Operations completed so far, over all threads.
    pub fn ops(&self) -> u64 {
        self.ops.load(Ordering::Relaxed)
    }

    /// Asks every thread to stop and joins them.
    pub fn stop(mut self) -> WorkloadStats {
        self.signal_stop();
        self.join()
    }

    /// Waits for threads that stop by themselves ([`WorkloadConfig::max_ops_per_thread`]).
    pub fn join(&mut self) -> WorkloadStats {
        let mut total = WorkloadStats::default();
        for t in self.threads.drain(..) {
            if let Ok(s) = t.join() {
                total.writes += s.writes;
                total.reads += s.reads;
                total.read_xor ^= s.read_xor;
            }
        }
        total
    }

    fn signal_stop(&self) {
        self.stop.flag.store(true, Ordering::SeqCst);
        let _g = self.stop.lock.lock().unwrap_or_else(|e| e.into_inner());
        self.stop.cv.notify_all();
    }
}

impl Drop for Workload {
    fn drop(&mut self) {
        self.signal_stop();
        self.join();
    }
}

fn run(
    ram: &GuestRam,
    cfg: &WorkloadConfig,
    t: usize,
    stop: &Stop,
    ops: &AtomicU64,
) -> WorkloadStats {
    let mut st = WorkloadStats::default();
    let Ok(block) = ram.block(cfg.block) else {
        return st;
    };
    let first = cfg.first_page.min(block.pages());
    let pages = cfg.pages.min(block.pages() - first);
    if pages == 0 {
        return st;
    }
    let n_threads = cfg.threads.max(1) as u64;
    let mut rng = ChaCha8Rng::seed_from_u64(cfg.seed.wrapping_add(t as u64));
    let interval = match cfg.rate {
        Rate::Unlimited => None,
        Rate::PagesPerSec(0) => return st,
        Rate::PagesPerSec(r) => Some(Duration::from_nanos(1_000_000_000 / r.max(1))),
    };
    let started = Instant::now();
    let mut seq = t as u64 % pages;
    let mut done = 0u64;
    let base = block.as_ptr();
    while !stop.flag.load(Ordering::Relaxed) {
        if cfg.max_ops_per_thread.is_some_and(|m| done >= m) {
            break;
        }
        if let Some(iv) = interval {
            // Pacing: wait until this op's slot unless stopped (the condvar wakes us on stop).
            let due = started + iv * (done as u32);
            let mut g = stop.lock.lock().unwrap_or_else(|e| e.into_inner());
            loop {
                let now = Instant::now();
                if stop.flag.load(Ordering::SeqCst) || now >= due {
                    break;
                }
                g = stop
                    .cv
                    .wait_timeout(g, due - now)
                    .unwrap_or_else(|e| e.into_inner())
                    .0;
            }
            if stop.flag.load(Ordering::SeqCst) {
                break;
            }
        }
        let page = first
            + match cfg.pattern {
                Pattern::Random => rng.gen_range(0..pages),
                Pattern::Sequential => {
                    let p = seq;
                    seq = (seq + n_threads) % pages;
                    p
                }
            };
        let page_off = (page as usize) * PAGE_SIZE;
        if matches!(cfg.access, Access::Read | Access::ReadWrite) {
            // SAFETY: page_off + 8 <= block length (page < block.pages()); a volatile read of an
            // aligned u64 inside the live mapping. On a userfaultfd destination this may block
            // until the page is placed, which is the point.
            let v = unsafe { std::ptr::read_volatile(base.add(page_off).cast::<u64>()) };
            st.read_xor ^= v;
            st.reads += 1;
        }
        if matches!(cfg.access, Access::Write | Access::ReadWrite) {
            let slot = rng.gen_range(0..PAGE_SIZE / 64) * 64;
            let mut bytes = [0u8; 64];
            rng.fill(&mut bytes[..]);
            let _ = block.write((page_off + slot) as u64, &bytes);
            st.writes += 1;
        }
        done += 1;
        ops.fetch_add(1, Ordering::Relaxed);
    }
    st
}

/// A `--workload` specification of qmig-src or qmig-dst:
/// `random|sequential[,threads=N][,rate=PAGES/S][,working-set=SIZE][,write]`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct WorkloadSpec {
    /// Visiting order.
    pub pattern: Pattern,
    /// Threads (1..=256).
    pub threads: usize,
    /// Per-thread rate (`rate=0`: unlimited).
    pub rate: Rate,
    /// Working set in bytes from the start of the main block (`None`: the whole block).
    pub working_set: Option<u64>,
    /// What each operation does.
    pub access: Access,
}

/// How a binary reads the access part of a [`WorkloadSpec`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct AccessOption {
    /// The access without the `write` option.
    pub default: Access,
    /// The access with `write` (`None`: the option is refused).
    pub write: Option<Access>,
}

impl AccessOption {
    /// qmig-src: the guest always writes; no `write` option.
    pub const SOURCE: AccessOption = AccessOption {
        default: Access::Write,
        write: None,
    };
    /// qmig-dst: the guest reads (faulting missing pages in); `write` makes it read then write.
    pub const DESTINATION: AccessOption = AccessOption {
        default: Access::Read,
        write: Some(Access::ReadWrite),
    };
}

impl WorkloadSpec {
    /// Parses `random|sequential[,threads=N][,rate=PAGES/S][,working-set=SIZE][,write]`, the
    /// `write` option as `access` says.
    pub fn parse(s: &str, access: AccessOption) -> Result<WorkloadSpec, String> {
        let mut parts = s.split(',');
        let pattern = match parts.next() {
            Some("random") => Pattern::Random,
            Some("sequential") => Pattern::Sequential,
            other => return Err(format!("workload pattern {other:?}: random or sequential")),
        };
        let mut w = WorkloadSpec {
            pattern,
            threads: 1,
            rate: Rate::Unlimited,
            working_set: None,
            access: access.default,
        };
        for p in parts {
            match (p.split_once('='), access.write) {
                (Some(("threads", v)), _) => {
                    w.threads = v
                        .parse()
                        .ok()
                        .filter(|n| (1..=256).contains(n))
                        .ok_or_else(|| format!("threads={v}: 1..=256"))?;
                }
                (Some(("rate", v)), _) => {
                    let r: u64 = v
                        .parse()
                        .map_err(|_| format!("rate={v}: pages per second"))?;
                    w.rate = if r == 0 {
                        Rate::Unlimited
                    } else {
                        Rate::PagesPerSec(r)
                    };
                }
                (Some(("working-set", v)), _) => {
                    w.working_set = Some(crate::size::parse_nonzero_size(v)?)
                }
                (None, Some(a)) if p == "write" => w.access = a,
                _ => return Err(format!("unknown workload option {p:?}")),
            }
        }
        Ok(w)
    }

    /// Pages of the working set (`u64::MAX`, clipped to the block later, for the whole block).
    pub fn pages(&self) -> u64 {
        self.working_set
            .map_or(u64::MAX, |b| b.div_ceil(PAGE_SIZE as u64))
    }
}

#[cfg(test)]
mod spec_tests {
    use super::*;

    #[test]
    fn destination_specs() {
        let d = AccessOption::DESTINATION;
        let w =
            WorkloadSpec::parse("sequential,threads=3,rate=100,working-set=1M,write", d).unwrap();
        assert_eq!(
            w,
            WorkloadSpec {
                pattern: Pattern::Sequential,
                threads: 3,
                rate: Rate::PagesPerSec(100),
                working_set: Some(1 << 20),
                access: Access::ReadWrite,
            }
        );
        assert_eq!(w.pages(), 256);
        let r = WorkloadSpec::parse("random", d).unwrap();
        assert_eq!(
            (r.access, r.rate, r.pages()),
            (Access::Read, Rate::Unlimited, u64::MAX)
        );
        assert!(WorkloadSpec::parse("linear", d).is_err());
        assert!(WorkloadSpec::parse("random,threads=0", d).is_err());
        assert!(WorkloadSpec::parse("random,threads=257", d).is_err());
        assert!(WorkloadSpec::parse("random,working-set=0", d).is_err());
    }

    #[test]
    fn source_specs_always_write_and_refuse_the_write_option() {
        let s = AccessOption::SOURCE;
        let w = WorkloadSpec::parse("sequential,threads=2,rate=500,working-set=1M", s).unwrap();
        assert_eq!(
            (w.pattern, w.threads, w.rate, w.working_set, w.access),
            (
                Pattern::Sequential,
                2,
                Rate::PagesPerSec(500),
                Some(1 << 20),
                Access::Write
            )
        );
        assert_eq!(
            WorkloadSpec::parse("random,rate=0", s).unwrap().rate,
            Rate::Unlimited
        );
        assert!(WorkloadSpec::parse("random,write", s).is_err());
        assert!(WorkloadSpec::parse("lazy", s).is_err());
        assert!(WorkloadSpec::parse("random,threads=0", s).is_err());
        assert!(WorkloadSpec::parse("random,colour=red", s).is_err());
    }
}
