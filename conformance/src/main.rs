//! `qmig`: inspect, extract, verify and diff QEMU live-migration streams.
//!
//! Each subcommand is one variant of [`Cmd`] and one module under `qmig_conformance::cli`
//! holding its `Args` and `run`. Logs go to stderr (`RUST_LOG`, or `-v`/`-vv`); results go to
//! stdout. Exit codes: 0 success (valid, equal), 1 invalid or different, 2 unreadable input or
//! usage error.

use clap::{Parser, Subcommand};
use qmig_conformance::cli;

/// QEMU live-migration stream tool: inspect, extract, verify, diff.
#[derive(Debug, Parser)]
#[command(
    name = "qmig",
    version,
    about = "QEMU live-migration streams: inspect, extract, verify, diff (see conformance/docs/)"
)]
struct Cli {
    /// More log output on stderr (-v info, -vv debug, -vvv trace); RUST_LOG overrides.
    #[arg(short = 'v', long = "verbose", action = clap::ArgAction::Count)]
    verbose: u8,
    #[command(subcommand)]
    cmd: Cmd,
}

/// The subcommands.
#[derive(Debug, Subcommand)]
enum Cmd {
    /// List the records of a stream (and of its return path) with offsets.
    Inspect(cli::inspect::Args),
    /// Rebuild each RAM block into a raw file and print its sha256.
    Extract(cli::extract::Args),
    /// Check streams against every rule the decoder enforces.
    Verify(cli::verify::Args),
    /// Compare two streams section by section and field by field.
    Diff(cli::diff::Args),
    /// Postcopy migration between qmig-src and qmig-dst surviving a network cut; memories compared.
    Demo(qmig_conformance::demo::Args),
    /// Benchmark migrations end to end against QEMU and an ideal pipeline.
    Bench(qmig_conformance::bench::Args),
    /// Run the conformance suite: decode checks on vectors, replay against targets.
    Conformance(qmig_conformance::runner::Args),
    /// Run the live interop matrix (QEMU 7.2, QEMU 10.0, qmig; every mode).
    Interop(qmig_conformance::interop::Args),
}

fn init_logs(verbose: u8) {
    let level = match verbose {
        0 => "warn",
        1 => "info",
        2 => "debug",
        _ => "trace",
    };
    let filter = tracing_subscriber::EnvFilter::try_from_default_env()
        .unwrap_or_else(|_| tracing_subscriber::EnvFilter::new(level));
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
}

fn main() {
    let cli = Cli::parse();
    init_logs(cli.verbose);
    let res = match &cli.cmd {
        Cmd::Inspect(a) => cli::inspect::run(a),
        Cmd::Extract(a) => cli::extract::run(a),
        Cmd::Verify(a) => cli::verify::run(a),
        Cmd::Diff(a) => cli::diff::run(a),
        Cmd::Demo(a) => qmig_conformance::demo::run(a),
        Cmd::Bench(a) => qmig_conformance::bench::run(a),
        Cmd::Conformance(a) => qmig_conformance::runner::run(a),
        Cmd::Interop(a) => qmig_conformance::interop::run(a),
    };
    match res {
        Ok(code) => std::process::exit(code),
        Err(e) => {
            let pipe = e
                .downcast_ref::<std::io::Error>()
                .is_some_and(|e| e.kind() == std::io::ErrorKind::BrokenPipe);
            if pipe {
                std::process::exit(0);
            }
            eprintln!("qmig: {e:#}");
            std::process::exit(2);
        }
    }
}
