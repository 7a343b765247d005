//! Logging set-up and top-level exit of the qmig binaries (qmig-src, qmig-dst).
//!
//! This module owns [`init`]: `tracing` output to stderr, filtered by `QMIG_LOG` (qmig-src's
//! variable), else `RUST_LOG` (qmig-dst's), else `info`; the value is an `EnvFilter` directive
//! such as `debug` or `qmig_dst=trace,info`. [`main`] is a binary's whole `main`: logging, then
//! the binary's run function, its error printed as `NAME: error` with a failure exit status.

use std::process::ExitCode;

use tracing_subscriber::EnvFilter;

/// The variables read, in order.
pub const ENV_VARS: [&str; 2] = ["QMIG_LOG", "RUST_LOG"];

/// The filter [`init`] installs: the first of [`ENV_VARS`] that is set and valid, else `info`.
pub fn filter() -> EnvFilter {
    ENV_VARS
        .iter()
        .find_map(|v| EnvFilter::try_from_env(v).ok())
        .unwrap_or_else(|| EnvFilter::new("info"))
}

/// Installs the stderr subscriber with [`filter`]; call once, first thing in `main`.
pub fn init() {
    tracing_subscriber::fmt()
        .with_env_filter(filter())
        .with_writer(std::io::stderr)
        .init();
}

/// [`init`], then `run`; an error is printed as `name: error` and exits with failure.
pub fn main(name: &str, run: impl FnOnce() -> Result<(), String>) -> ExitCode {
    init();
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("{name}: {e}");
            ExitCode::FAILURE
        }
    }
}
