//! qmig conformance library.
pub mod qemu;
