//! `qmig-src`: the reference migration source.
//!
//! A thin driver: guest RAM and its workload (qmig-host `memory`, `fill`, `workload`), kernel
//! dirty tracking (`dirty`), a QMP socket (`qmp_server`), and a migration thread that runs the
//! sans-IO `Source` machine of qmig-protocol over a TCP or unix channel.
//!
//! Modules: [`cli`] (command line), [`guest`] (RAM, run state, pmemsave), [`devices`] (device
//! sections), [`state`] (what QMP and the migration thread share), [`qmp`] (commands),
//! [`migration`] (the driver loop), [`pacing`] (bandwidth).

pub mod cli;
pub mod devices;
pub mod guest;
pub mod migration;
pub mod pacing;
pub mod page_caps;
pub mod qmp;
pub mod state;

use std::process::ExitCode;
use std::sync::Arc;

use clap::Parser;
use qmig_host::dirty::{Choice, Mechanism};
use qmig_host::fill::{fill, fill_from_image};
use qmig_host::memory::{GuestRam, MapOptions};
use qmig_host::qmp_server::{EventSink, QmpServer, QmpServerConfig};
use qmig_host::qmp_types::VersionTriple;
use qmig_protocol::profile::Version;

use crate::cli::{parse_fill, Args, FillSpec};

fn main() -> ExitCode {
    qmig_host::logging::main("qmig-src", || run(Args::parse()))
}

fn run(args: Args) -> Result<(), String> {
    let main_block = match args.machine.as_str() {
        "microvm" => "microvm.ram",
        _ => "ram",
    };
    if args.ram == 0 || args.ram % 4096 != 0 {
        return Err("--ram must be a non-zero multiple of 4096".into());
    }
    let mut specs: Vec<(&str, u64)> = vec![(main_block, args.ram)];
    specs.extend(args.blocks.iter().map(|(n, s)| (n.as_str(), *s)));
    let ram = GuestRam::new(&specs, MapOptions::default()).map_err(|e| e.to_string())?;
    match parse_fill(&args.fill, args.seed)? {
        FillSpec::Content(c) => {
            for b in ram.blocks() {
                fill(b, c).map_err(|e| e.to_string())?;
            }
        }
        FillSpec::Image(p) => fill_from_image(&ram.blocks()[0], &p).map_err(|e| e.to_string())?,
    }
    let template = match &args.device_template {
        Some(p) => devices::from_template(p, &args.profile)?,
        None if args.machine == "none" => devices::Template {
            devices: devices::builtin(&args.profile),
            vmdesc: None,
        },
        None => return Err("--machine microvm needs --device-template".into()),
    };
    let tracking = match args.dirty_tracking.as_str() {
        "uffd-wp" => Choice::Only(Mechanism::UffdWpAsync),
        "soft-dirty" => Choice::Only(Mechanism::SoftDirty),
        _ => Choice::Auto,
    };
    let qmp_path = args
        .qmp
        .strip_prefix("unix:")
        .ok_or_else(|| format!("--qmp must be unix:PATH, got '{}'", args.qmp))?;
    let ram = Arc::new(ram);
    let guest = Arc::new(
        guest::Guest::new(ram, args.workload.clone(), args.seed).map_err(|e| e.to_string())?,
    );
    let events = EventSink::new();
    // The page-encoding capabilities on from the command line pass QMP's checks too.
    for c in &args.capabilities {
        page_caps::check_cap(&args.profile, c, true)?;
    }
    page_caps::check_combination(&|c| args.capabilities.iter().any(|x| x == c))?;
    let shared = Arc::new(state::Shared::new(
        args.profile,
        guest,
        events.clone(),
        &args.capabilities,
    ));
    let handler = Arc::new(qmp::SourceQmp {
        shared,
        machine: args.machine.clone(),
        devices: template.devices,
        vmdesc: template
            .vmdesc
            .unwrap_or_else(|| devices::MINIMAL_VMDESC.to_vec()),
        tracking,
    });
    let version = match args.profile.version {
        Version::V7_2 => VersionTriple {
            major: 7,
            minor: 2,
            micro: 0,
        },
        _ => VersionTriple {
            major: 10,
            minor: 0,
            micro: 0,
        },
    };
    let cfg = QmpServerConfig {
        version,
        ..QmpServerConfig::default()
    };
    let server =
        QmpServer::start(qmp_path, handler, events, cfg).map_err(|e| format!("{qmp_path}: {e}"))?;
    tracing::info!("qmig-src ready, QMP on {}", server.path().display());
    server.quit_signal().wait();
    Ok(())
}
