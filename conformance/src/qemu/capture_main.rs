//! `qmig-capture`: records QEMU migration vectors with real QEMUs.
//!
//! `qmig-capture <7.2|10.0> <out-root> [scenario...]` writes each scenario
//! (default: all for that version) to `<out-root>/<scenario>/`.
//! `qmig-capture --annotate DIR...` (re)writes the decoded fields of existing
//! vector folders' manifests from their recordings, which it does not touch.

use std::path::PathBuf;
use std::process::ExitCode;

use qmig_conformance::qemu::{capture, find_qemu, records, QemuVersion};

const USAGE: &str =
    "usage: qmig-capture <7.2|10.0> <out-root> [scenario...] | qmig-capture --annotate DIR...";

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--annotate") {
        if args.len() < 2 {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
        for d in &args[1..] {
            match records::annotate_dir(&PathBuf::from(d)) {
                Ok((r, m)) => println!("{d}: {r} records, {m} return-path messages"),
                Err(e) => {
                    eprintln!("{d}: {e}");
                    return ExitCode::FAILURE;
                }
            }
        }
        return ExitCode::SUCCESS;
    }
    let version = match args.first().map(String::as_str) {
        Some("7.2") => QemuVersion::V7_2,
        Some("10.0") => QemuVersion::V10_0,
        _ => {
            eprintln!("{USAGE}");
            return ExitCode::from(2);
        }
    };
    let Some(root) = args.get(1).map(PathBuf::from) else {
        eprintln!("{USAGE}");
        return ExitCode::from(2);
    };
    let bin = match find_qemu(version) {
        Ok(Some(b)) => b,
        Ok(None) => {
            eprintln!(
                "QEMU {} not found; run conformance/scripts/provision-qemu.sh",
                version.as_str()
            );
            return ExitCode::FAILURE;
        }
        Err(e) => {
            eprintln!("{e}");
            return ExitCode::FAILURE;
        }
    };
    let names: Vec<String> = if args.len() > 2 {
        args[2..].to_vec()
    } else {
        capture::scenario_names(version)
            .iter()
            .map(|s| s.to_string())
            .collect()
    };
    for name in names {
        match capture::capture(&bin, &name, &root.join(&name)) {
            Ok(m) => {
                let files = m["files"].as_object().map(|f| f.len()).unwrap_or(0);
                println!(
                    "{name}: {} files, final_ram {}",
                    files, m["final_ram"]["sha256"]
                );
            }
            Err(e) => {
                eprintln!("{name}: {e}");
                return ExitCode::FAILURE;
            }
        }
    }
    ExitCode::SUCCESS
}
