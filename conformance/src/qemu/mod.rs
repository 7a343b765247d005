//! Real QEMU in the loop: provisioning lookup, launching, qtest, the
//! recording proxy, migration scenarios and the vector capture tool.
//!
//! | module | owns |
//! |---|---|
//! | [`find`] | locating QEMU 7.2 / 10.0 ([`find_qemu`]), skip-or-fail policy |
//! | [`launch`] | [`Qemu::launch`]: one QEMU with QMP/qtest sockets, killed on drop |
//! | [`hugetlbfs`] | the hugetlbfs a 2 MiB-page RAM block lives on: mount point, free pages, QEMU arguments |
//! | [`qtest`] | the qtest line-protocol client (guest memory reads and writes) |
//! | [`proxy`] | the loopback recording TCP proxy with a cut switch |
//! | [`firmware`] | the generated microvm test firmware |
//! | [`pattern`] | the vectors' deterministic page-content generator |
//! | [`driver`] | precopy / postcopy / postcopy-recover scenarios between two QEMUs |
//! | [`capture`] | writing a scenario's recordings as a `qemu-migration-vector/1` folder |
//! | [`records`] | the manifest's decoded fields (records, return-path messages, summaries) |
//!
//! The QMP client itself is `qmig_host::qmp_client`, shared with the binaries.

pub mod capture;
pub mod driver;
pub mod find;
pub mod firmware;
pub mod hugetlbfs;
pub mod launch;
pub mod pattern;
pub mod proxy;
pub mod qtest;
pub mod records;

pub use find::{find_qemu, find_qemu_at, qemu_required, QemuBinary, QemuVersion};
pub use hugetlbfs::{hugetlbfs_backend_args, hugetlbfs_free_pages, HUGETLBFS};
pub use launch::{Machine, Qemu};
pub use proxy::Proxy;
pub use qtest::Qtest;

use qmig_host::qmp_client::QmpError;

/// What can go wrong driving QEMU.
#[derive(Debug, thiserror::Error)]
pub enum QemuError {
    /// QEMU is not installed and CI/QMIG_REQUIRE_QEMU demands it.
    #[error("{0}")]
    Missing(String),
    /// A file, socket or process operation failed.
    #[error("i/o: {0}")]
    Io(#[from] std::io::Error),
    /// A QMP exchange failed.
    #[error("QMP: {0}")]
    Qmp(#[from] QmpError),
    /// QEMU misbehaved or a scenario did not reach its goal.
    #[error("{0}")]
    Failed(String),
}
