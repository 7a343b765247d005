//! The source's guest: RAM blocks and the workload that plays its vCPUs.
//!
//! This module owns [`Guest`]: the [`GuestRam`] (qmig-host `memory`, filled by `fill`), the
//! run state (`running` while the workload writes; stopped by `stop`, by convergence or by the
//! postcopy switch; resumed by `cont`), and `pmemsave` over the blocks laid out one after the
//! other from guest-physical 0.

use std::io::Write;
use std::path::Path;
use std::sync::{Arc, Mutex, MutexGuard};

use qmig_host::memory::{GuestRam, PAGE_SIZE};
use qmig_host::workload::{Access, Workload, WorkloadConfig};

use crate::cli::WorkloadSpec;

/// Guest RAM plus its workload; see the module doc.
pub struct Guest {
    /// The guest's memory.
    pub ram: Arc<GuestRam>,
    spec: Option<WorkloadSpec>,
    seed: u64,
    run: Mutex<RunState>,
}

struct RunState {
    running: bool,
    workload: Option<Workload>,
    /// Bumped at each start so that a restarted workload writes new bytes.
    generation: u64,
}

impl Guest {
    /// A running guest over `ram`; the workload (if any) starts now.
    pub fn new(ram: Arc<GuestRam>, spec: Option<WorkloadSpec>, seed: u64) -> std::io::Result<Self> {
        let g = Guest {
            ram,
            spec,
            seed,
            run: Mutex::new(RunState {
                running: false,
                workload: None,
                generation: 0,
            }),
        };
        g.start()?;
        Ok(g)
    }

    fn lock(&self) -> MutexGuard<'_, RunState> {
        self.run.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Whether the guest runs.
    pub fn running(&self) -> bool {
        self.lock().running
    }

    /// Starts the guest (the workload threads); returns whether it was stopped before.
    pub fn start(&self) -> std::io::Result<bool> {
        let mut r = self.lock();
        if r.running {
            return Ok(false);
        }
        if let Some(spec) = &self.spec {
            let pages = spec
                .working_set
                .map(|b| b.div_ceil(PAGE_SIZE as u64))
                .unwrap_or(u64::MAX);
            let cfg = WorkloadConfig {
                threads: spec.threads,
                rate: spec.rate,
                block: 0,
                first_page: 0,
                pages,
                pattern: spec.pattern,
                access: Access::Write,
                seed: self
                    .seed
                    .wrapping_add(r.generation.wrapping_mul(0x9E37_79B9)),
                max_ops_per_thread: None,
            };
            r.workload = Some(Workload::start(self.ram.clone(), cfg)?);
        }
        r.generation += 1;
        r.running = true;
        Ok(true)
    }

    /// Stops the guest: every workload thread has stopped writing when this returns. Returns
    /// whether it was running.
    pub fn stop(&self) -> bool {
        let mut r = self.lock();
        if let Some(w) = r.workload.take() {
            w.stop();
        }
        std::mem::replace(&mut r.running, false)
    }

    /// Stores `data` at guest-physical `addr` (blocks laid out back to back from 0), as a vCPU
    /// would: the dirty tracking sees the write. The range must lie in one block.
    pub fn write(&self, addr: u64, data: &[u8]) -> Result<(), String> {
        let mut base = 0u64;
        for b in self.ram.blocks() {
            if addr >= base && addr - base < b.len() {
                return b.write(addr - base, data).map_err(|e| e.to_string());
            }
            base += b.len();
        }
        Err(format!(
            "Invalid parameter 'addr': {addr:#x} beyond RAM of {base:#x} bytes"
        ))
    }

    /// Writes `size` bytes of guest-physical memory from `addr` to `file` (blocks laid out
    /// back to back from 0).
    pub fn pmemsave(&self, addr: u64, size: u64, file: &Path) -> Result<(), String> {
        let total = self.ram.total_len();
        if addr.checked_add(size).map_or(true, |e| e > total) {
            return Err(format!(
                "Invalid parameter 'addr': {addr:#x}+{size:#x} beyond RAM of {total:#x} bytes"
            ));
        }
        let mut f = std::fs::File::create(file).map_err(|e| format!("{}: {e}", file.display()))?;
        let mut buf = vec![0u8; 1 << 20];
        let (mut at, end) = (addr, addr + size);
        let mut base = 0u64;
        for b in self.ram.blocks() {
            let (bs, be) = (base, base + b.len());
            base = be;
            while at < end && at >= bs && at < be {
                let n = (end.min(be) - at).min(buf.len() as u64) as usize;
                b.read(at - bs, &mut buf[..n]).map_err(|e| e.to_string())?;
                f.write_all(&buf[..n])
                    .map_err(|e| format!("{}: {e}", file.display()))?;
                at += n as u64;
            }
        }
        Ok(())
    }
}
