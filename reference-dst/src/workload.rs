//! The "guest": workload threads started when the guest would run.
//!
//! This module owns turning a `--workload` spec into a running `qmig_host::workload::Workload`
//! on the first RAM block. The guest runs from the postcopy switch (`postcopy-active`: its
//! accesses to missing pages fault and become page requests) or from completion, whichever
//! comes first, and runs until the process exits.

use std::sync::Arc;

use qmig_host::memory::GuestRam;
use qmig_host::workload::{Workload, WorkloadConfig};

use crate::cli::WorkloadSpec;

/// Starts `spec` on block 0 of `ram`.
pub fn start(ram: Arc<GuestRam>, spec: &WorkloadSpec) -> std::io::Result<Workload> {
    let cfg = WorkloadConfig {
        threads: spec.threads,
        rate: spec.rate,
        block: 0,
        first_page: 0,
        pages: spec.pages(),
        pattern: spec.pattern,
        access: spec.access,
        seed: 0x716d_6967,
        max_ops_per_thread: None,
    };
    Workload::start(ram, cfg)
}
