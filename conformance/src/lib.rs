//! qmig conformance library.
pub mod cli;
pub mod demo;
pub mod qemu;
