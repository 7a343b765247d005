//! qmig conformance library.
pub mod bench;
pub mod cli;
pub mod demo;
pub mod hostile;
pub mod interop;
pub mod qemu;
pub mod runner;
pub mod synth;
