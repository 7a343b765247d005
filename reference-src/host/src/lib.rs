//! Shared host-side code for qmig-src and qmig-dst.

// host-mem
pub mod dirty;
pub mod fill;
pub mod memory;
pub mod uffd;
pub mod workload;

// host-ctl
pub mod logging;
pub mod qmp_server;
pub mod qmp_types;
pub mod size;
pub mod stats;
pub mod transport;
pub mod uri;

// qemu
pub mod qmp_client;
