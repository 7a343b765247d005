//! `qmig-dst`: the reference destination of a QEMU live migration.
//!
//! A thin driver: protocol decisions are `qmig_protocol::machine::Destination`'s; guest memory,
//! QMP, transports and statistics are `qmig_host`'s. The modules here only wire them together:
//!
//! | module | owns |
//! |---|---|
//! | [`cli`] | the command line |
//! | [`control`] | requests into the migration thread and its wake-up eventfd |
//! | [`state`] | what the QMP and migration threads share |
//! | [`qmp`] | the QMP command set |
//! | [`migration`] | the migration thread's poll loop around the machine |
//! | [`memory`] | the machine's `GuestMemory` over userfaultfd RAM |
//! | [`workload`] | the synthetic guest |
//! | [`devices`] | device state as JSON |

mod cli;
mod control;
mod devices;
mod memory;
mod migration;
mod multifd;
mod qmp;
mod recv_buf;
mod state;
mod workload;

use std::collections::BTreeMap;
use std::process::ExitCode;
use std::sync::{Arc, Mutex};

use clap::Parser;
use qmig_host::memory::{GuestRam, MapOptions};
use qmig_host::qmp_server::{EventSink, QmpServer, QmpServerConfig};
use qmig_host::qmp_types::VersionTriple;
use qmig_host::stats::MigrationRecorder;
use qmig_host::transport::{self, TransportConfig};
use qmig_host::uffd::{PlaceConfig, UffdRam};
use qmig_host::uri::MigrationUri;
use qmig_protocol::machine::MigrationStatus;
use qmig_protocol::profile::Version;
use qmig_protocol::vmdesc::VmDesc;

use cli::Args;
use control::{Ctl, CtlSender, Waker};
use state::{Shared, View};

fn main() -> ExitCode {
    qmig_host::logging::main("qmig-dst", || run(Args::parse()))
}

fn run(args: Args) -> Result<(), String> {
    let qmp_path = args.qmp_path()?;
    let blocks = args.blocks()?;
    // The memory is 4 KiB anonymous memory whatever a block's declared page size (its migration
    // unit only: see `--ram-page-size`).
    let specs: Vec<(&str, u64)> = blocks.iter().map(|b| (b.name.as_str(), b.len)).collect();
    let ram = Arc::new(GuestRam::new(&specs, MapOptions::default()).map_err(|e| e.to_string())?);
    let (uffd, faults) = UffdRam::register_polled(ram.clone(), PlaceConfig::default())
        .map_err(|e| format!("userfaultfd: {e}"))?;
    let vmdesc = match &args.vmdesc {
        Some(p) => {
            let text = std::fs::read(p).map_err(|e| format!("--vmdesc {}: {e}", p.display()))?;
            let limits = qmig_protocol::limits::Limits::DEFAULT;
            Some(VmDesc::parse(&text, 0, &limits).map_err(|e| format!("--vmdesc: {e:?}"))?)
        }
        None => None,
    };
    let waker = Arc::new(Waker::new().map_err(|e| format!("eventfd: {e}"))?);
    let (ctl, rx) = CtlSender::new(waker.clone());
    let transport = TransportConfig {
        drop_detect: Some(args.drop_timeout),
        ..TransportConfig::default()
    };
    let caps: BTreeMap<String, bool> = args
        .capabilities
        .iter()
        .map(|c| (c.clone(), true))
        .collect();
    let sh = Arc::new(Shared {
        view: Mutex::new(View {
            status: MigrationStatus::None,
            error_desc: None,
            socket_address: Vec::new(),
            caps,
            params: Default::default(),
            guest_running: false,
            incoming: false,
        }),
        recorder: MigrationRecorder::new(std::time::Duration::from_secs(1)),
        ram: ram.clone(),
        uffd: Arc::new(uffd),
        ctl: ctl.clone(),
        transport,
    });
    let events = EventSink::new();
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
    let server = QmpServer::start(
        &qmp_path,
        Arc::new(qmp::Handler::new(sh.clone())),
        events.clone(),
        QmpServerConfig {
            version,
            ..QmpServerConfig::default()
        },
    )
    .map_err(|e| format!("QMP socket {}: {e}", qmp_path.display()))?;
    let cfg = migration::Config {
        profile: args.profile,
        machine: args.machine.clone(),
        blocks,
        vmdesc,
        workload: args.workload.clone(),
        dump_devices: args.dump_devices.clone(),
        silence_timeout: args.silence_timeout,
        faults,
    };
    let mig = {
        let (sh, waker, events) = (sh.clone(), waker.clone(), events.clone());
        std::thread::Builder::new()
            .name("migration".into())
            .spawn(move || migration::run(sh, rx, waker, events, cfg))
            .map_err(|e| e.to_string())?
    };
    if args.incoming != MigrationUri::Defer {
        let l = transport::listen(&args.incoming, &transport)
            .map_err(|e| format!("--incoming {}: {e}", args.incoming))?;
        if let Ok(local) = l.local_uri() {
            sh.view().socket_address = vec![state::socket_address(&local)];
        }
        sh.ctl.request(|r| Ctl::Incoming(l, r))?;
        sh.view().incoming = true;
    }
    tracing::info!("QMP on {}", qmp_path.display());
    server.quit_signal().wait();
    ctl.send(Ctl::Quit);
    let _ = mig.join();
    drop(server);
    // Workload threads may be blocked on guest pages that will never come: exit without them.
    std::process::exit(0)
}
