//! qmig conformance library.
pub mod cli;
pub mod qemu;
