//! Capture tool: runs a named scenario between two real QEMUs through the
//! recording proxy ([`super::driver::run`]) and writes a vector folder in the
//! `qemu-migration-vector/1` shape: `stream.bin`, `rp.bin`,
//! `resume-stream.bin`, `resume-rp.bin` and `manifest.json` (format,
//! scenario, QEMU version, machine, both command lines, steps, QMP events,
//! files with sha256, `final_ram`, replay section, proxy counters,
//! verification) and the fields decoded from the recordings
//! (`channels[].records`, `summary`, `rp_messages`, `page_requests`,
//! `truncated_at`, `mig_cmds_present`, `rp_msgs_present`; [`super::records`]).

use std::fs;
use std::path::Path;

use serde_json::{json, Map, Value};

use super::driver::{self, first_diff_page, Kind, Outcome, Scenario};
use super::find::{QemuBinary, QemuVersion};
use super::firmware::{test_firmware, FIRMWARE_MARKER, FIRMWARE_SHA256, RESET_VECTOR};
use super::launch::Machine;
use super::pattern::{hex, sha256_hex, PAGE};
use super::proxy::Recording;
use super::records;
use super::QemuError;

/// The manifest `format` string.
pub const FORMAT: &str = "qemu-migration-vector/1";

/// `capture.decoded_fields` of a manifest: where its decoded fields come from.
pub const DECODED_FIELDS: &str = "channels[].records, summary, truncated_at (offset of the TRUNCATED record), rp_messages, page_requests, vmdesc_devices, mig_cmds_present and rp_msgs_present are decoded from the files with qmig-protocol (conformance/src/qemu/records.rs); regenerate with qmig-capture --annotate DIR";

/// Names of the scenarios [`scenario`] knows, per version.
pub fn scenario_names(version: QemuVersion) -> &'static [&'static str] {
    match version {
        QemuVersion::V7_2 => &[
            "precopy",
            "postcopy",
            "postcopy-recover",
            "postcopy-recover-pause",
        ],
        QemuVersion::V10_0 => &[
            "precopy-none-nocpu",
            "postcopy-none-nocpu",
            "precopy",
            "postcopy",
            "postcopy-recover",
            "postcopy-recover-pause",
        ],
    }
}

/// The scenario called `name` for `version`: `precopy`, `postcopy` and
/// `postcopy-recover` use the version's machine with a CPU and a pattern
/// (7.2: `-M none` with CPU; 10.0: microvm); `*-none-nocpu` use `-M none`
/// without CPU and untouched RAM.
pub fn scenario(version: QemuVersion, name: &str) -> Option<Scenario> {
    let cpu_machine = match version {
        QemuVersion::V7_2 => Machine::NoneCpu,
        QemuVersion::V10_0 => Machine::Microvm,
    };
    let base = |kind, machine, ram_mb, seed| Scenario {
        name: name.to_string(),
        kind,
        machine,
        ram_mb,
        seed,
        random_pages: 0,
        max_bandwidth: None,
        max_postcopy_bandwidth: None,
        cut_after: 0,
        dst_reads: 0,
    };
    Some(match name {
        "precopy" => Scenario {
            random_pages: 48,
            ..base(Kind::Precopy, cpu_machine, 64, Some(21))
        },
        "postcopy" => Scenario {
            random_pages: 96,
            dst_reads: 3,
            max_bandwidth: Some(256 << 10),
            ..base(Kind::Postcopy, cpu_machine, 64, Some(22))
        },
        "postcopy-recover" => Scenario {
            random_pages: 256,
            dst_reads: 3,
            max_bandwidth: Some(256 << 10),
            max_postcopy_bandwidth: Some(256 << 10),
            cut_after: 16 << 10,
            ..base(Kind::PostcopyRecover, cpu_machine, 64, Some(23))
        },
        "postcopy-recover-pause" => Scenario {
            random_pages: 256,
            dst_reads: 3,
            max_bandwidth: Some(256 << 10),
            max_postcopy_bandwidth: Some(256 << 10),
            ..base(Kind::PostcopyPauseRecover, cpu_machine, 64, Some(24))
        },
        "precopy-none-nocpu" if version == QemuVersion::V10_0 => {
            base(Kind::Precopy, Machine::NoneNoCpu, 16, None)
        }
        "postcopy-none-nocpu" if version == QemuVersion::V10_0 => Scenario {
            max_bandwidth: Some(8192),
            ..base(Kind::Postcopy, Machine::NoneNoCpu, 64, None)
        },
        _ => return None,
    })
}

/// Runs scenario `name` on `bin` and writes its vector into `out_dir`
/// (created; existing files are replaced). Fails, writing nothing, when
/// the destination RAM differs from the source RAM.
pub fn capture(bin: &QemuBinary, name: &str, out_dir: &Path) -> Result<Value, QemuError> {
    let sc = scenario(bin.version, name).ok_or_else(|| {
        QemuError::Failed(format!(
            "unknown scenario {name} for QEMU {}",
            bin.version.as_str()
        ))
    })?;
    let o = driver::run(bin, &sc)?;
    if let Some(p) = first_diff_page(&o.src_ram, &o.dst_ram) {
        return Err(QemuError::Failed(format!(
            "destination RAM differs from the source at page {p}"
        )));
    }
    write_vector(&o, out_dir)
}

/// Writes `o` as a vector folder; returns the manifest.
pub fn write_vector(o: &Outcome, out_dir: &Path) -> Result<Value, QemuError> {
    fs::create_dir_all(out_dir)?;
    let mut files = Map::new();
    let mut channels = Vec::new();
    let mut replay_channels = Vec::new();
    let mut proxy = Map::new();
    let postcopy = o.scenario.kind != Kind::Precopy;
    let recovering = o.recordings.len() > 1;
    for (label, rec) in &o.recordings {
        let (sf, rf) = if *label == "recovery" {
            ("resume-stream.bin", "resume-rp.bin")
        } else {
            ("stream.bin", "rp.bin")
        };
        put_file(
            out_dir,
            &mut files,
            sf,
            &rec.s2d.bytes,
            &format!("source->destination bytes of channel '{label}'"),
        )?;
        let has_rp = !rec.d2s.bytes.is_empty();
        if has_rp {
            put_file(
                out_dir,
                &mut files,
                rf,
                &rec.d2s.bytes,
                &format!("destination->source (return path) bytes of channel '{label}'"),
            )?;
        }
        let mut ch = json!({"label": label, "file": sf});
        if has_rp {
            ch["rp_file"] = json!(rf);
        }
        channels.push(ch);
        let (rule, text) = match (*label, postcopy) {
            ("recovery", _) => ("recovery", "MIG_RP_MSG_RECV_BITMAP (header, be64 size, bitmap, end marker) byte for byte first, one per MIG_CMD_RECV_BITMAP and in the same order, then MIG_RP_MSG_RESUME_ACK(1); then page requests as in 'postcopy'; MIG_RP_MSG_SHUT(0) last"),
            (_, true) => ("postcopy", "same messages except: MIG_RP_MSG_REQ_PAGES(_ID) depend on which pages the destination touched (none if it touches none); the PONG for ping 3 (inside the package) and ping 4 (after it) may come in either order; MIG_RP_MSG_SHUT(0) is last"),
            (_, false) => ("exact", "byte for byte"),
        };
        let mut rc = json!({"label": label, "feed_to_destination": sf});
        if has_rp {
            rc["expected_return_path"] = json!(rf);
            rc["return_path_rule"] = json!(rule);
            rc["return_path_rule_text"] = json!(text);
        }
        if rec.cut || (*label == "initial" && recovering) {
            // The channel failed before the migration finished: no EOF.
            rc["ends_mid_stream"] = json!(true);
        }
        replay_channels.push(rc);
        proxy.insert(label.to_string(), json!([proxy_entry(rec)]));
    }
    if let Some(v) = &o.vmdesc {
        put_file(out_dir, &mut files, "vmdesc.json", v, "VM description (device field layout) of the same machine and QEMU, as QEMU wrote it at the end of one more, precopy, migration of the destination (to a harness socket) after the vector was complete; the postcopy streams carry none. Delimits the device sections")?;
    }
    let proxy = if o.recordings.len() == 1 {
        proxy
            .remove("initial")
            .and_then(|v| v.as_array().cloned())
            .map(Value::from)
            .unwrap_or_default()
    } else {
        Value::Object(proxy)
    };
    let m = o.scenario.machine;
    let mut manifest = json!({
        "format": FORMAT,
        "scenario": o.scenario.name,
        "description": description(o),
        "qemu": {
            "version_string": o.binary.version_string,
            "query_version": o.query_version,
            "binary": "{QEMU}",
        },
        "machine": machine_json(o),
        "sides": {
            "source": {"command_line": o.command_lines.0, "capabilities": o.capabilities.0, "parameters": o.parameters.0},
            "destination": {"command_line": o.command_lines.1, "capabilities": o.capabilities.1, "parameters": o.parameters.1},
        },
        "steps": o.steps,
        "qmp_events": o.events,
        "files": files,
        "final_ram": final_ram(o),
        "channels": channels,
        "verification": verification(o),
        "destination_reads": o.destination_reads.iter().map(|r| json!({"page": r.page, "correct": r.correct, "seconds": r.seconds})).collect::<Vec<_>>(),
        "replay": {
            "destination_capabilities": o.capabilities.1,
            "destination_parameters": o.parameters.1,
            "channels": replay_channels,
        },
        "pattern": pattern_json(o),
        "migration_info": o.migration_info,
        "proxy": proxy,
        "capture": {
            "tool": "qmig-conformance qemu::capture (Rust)",
            "ram_dumps": "pmemsave of guest-physical [0, ram_bytes) on both sides after completion",
            "decoded_fields": DECODED_FIELDS,
            "machine_ram_block": m.ram_block(),
        },
    });
    records::annotate(&mut manifest, out_dir).map_err(|e| QemuError::Failed(e.to_string()))?;
    let text =
        serde_json::to_string_pretty(&manifest).map_err(|e| QemuError::Failed(e.to_string()))?;
    fs::write(out_dir.join("manifest.json"), text + "\n")?;
    Ok(manifest)
}

fn put_file(
    dir: &Path,
    files: &mut Map<String, Value>,
    name: &str,
    data: &[u8],
    what: &str,
) -> Result<(), QemuError> {
    fs::write(dir.join(name), data)?;
    files.insert(
        name.into(),
        json!({"bytes": data.len(), "sha256": sha256_hex(data), "description": what}),
    );
    Ok(())
}

fn proxy_entry(r: &Recording) -> Value {
    json!({
        "index": 0,
        "forwarded": {"src2dst": r.s2d.bytes.len(), "dst2src": r.d2s.bytes.len()},
        "dropped_after_cut": {"src2dst": r.s2d.dropped, "dst2src": r.d2s.dropped},
        "eof": {"src2dst": r.s2d.eof, "dst2src": r.d2s.eof},
        "cut": r.cut,
        "cut_reason": r.cut_reason,
        "closed": r.s2d.eof && r.d2s.eof,
    })
}

fn description(o: &Outcome) -> String {
    let s = &o.scenario;
    let machine = match s.machine {
        Machine::NoneCpu => "-M none with CPU and qtest",
        Machine::NoneNoCpu => "-M none without CPU and without qtest",
        Machine::Microvm => "-M microvm -S with the test firmware and qtest",
    };
    let content = match s.seed {
        Some(seed) => format!(
            "{} pages written through qtest (seed {seed})",
            o.writes.len()
        ),
        None => "RAM never written".into(),
    };
    let how = match s.kind {
        Kind::Precopy => "Precopy over TCP with return-path".to_string(),
        Kind::Postcopy => "Postcopy over TCP (postcopy-ram and return-path on both sides), migrate-start-postcopy as soon as the source is active".to_string(),
        Kind::PostcopyRecover => format!(
            "Postcopy over TCP; {} bytes after the destination entered postcopy-active the proxy cut the connection (stream.bin ends at byte {}), both sides went postcopy-paused, migrate-recover on the destination and migrate resume=true on the source over a new proxied connection finished the migration",
            s.cut_after,
            o.cut_at.unwrap_or(0)
        ),
        Kind::PostcopyPauseRecover => "Postcopy over TCP; once the destination was postcopy-active, migrate-pause on the source shut its channel down, both sides went postcopy-paused, migrate-recover on the destination and migrate resume=true on the source over a new proxied connection finished the migration".to_string(),
    };
    format!("{how}. {machine}, {} MiB, {content}. Captured by qmig's Rust capture tool; destination RAM equals source RAM.", s.ram_mb)
}

fn machine_json(o: &Outcome) -> Value {
    let m = o.scenario.machine;
    let mut v = json!({
        "type": m.type_name(),
        "cpu": m.cpu(),
        "ram_mb": o.scenario.ram_mb,
        "ram_bytes": o.scenario.ram_mb << 20,
        "ram_block": m.ram_block(),
        "ram_guest_physical_base": 0,
        "target_page_size": PAGE,
    });
    if m == Machine::Microvm {
        let fw = test_firmware();
        let zero: Vec<usize> = (0..fw.len() / PAGE).filter(|p| p % 4 == 2).collect();
        v["firmware"] = json!({
            "option": "-bios {TEST_FIRMWARE}",
            "file": "{TEST_FIRMWARE}",
            "name": "qmig test firmware",
            "version": 1,
            "bytes": fw.len(),
            "sha256": FIRMWARE_SHA256,
            "ram_block": "pc.bios",
            "in_vector": false,
            "generator": "conformance/src/qemu/firmware.rs (\"Test firmware\" in the vectors README)",
            "zero_pages": zero,
            "marker": String::from_utf8_lossy(FIRMWARE_MARKER),
            "reset_vector_hex": hex(&RESET_VECTOR),
        });
    }
    v
}

/// The destination RAM block. On microvm `pmemsave` shows the firmware at
/// 0xe0000-0xfffff instead of RAM; those pages (and 0xc0000-0xdffff) are
/// never written, so the block holds zeros there.
fn final_ram_bytes(o: &Outcome) -> Vec<u8> {
    let mut ram = o.dst_ram.clone();
    for p in o.scenario.machine.reserved_pages() {
        let a = p as usize * PAGE;
        ram[a..a + PAGE].fill(0);
    }
    ram
}

fn final_ram(o: &Outcome) -> Value {
    let ram = final_ram_bytes(o);
    let zero = [0u8; PAGE];
    let nonzero: Vec<Value> = ram
        .chunks(PAGE)
        .enumerate()
        .filter(|(_, c)| *c != zero)
        .map(|(i, c)| json!([i, sha256_hex(c)]))
        .collect();
    let mut v = json!({
        "bytes": ram.len(),
        "sha256": sha256_hex(&ram),
        "zero_page_sha256": sha256_hex(&zero),
        "nonzero_page_count": nonzero.len(),
        "nonzero_pages": nonzero,
        "block": o.scenario.machine.ram_block(),
        "note": "destination RAM after migration (pmemsave); equals the source RAM",
    });
    if o.scenario.machine == Machine::Microvm {
        v["note"] = json!("destination RAM after migration (pmemsave), with pages 192-255 (0xc0000-0xfffff, never written; pmemsave shows the firmware at 0xe0000-0xfffff) taken as the zero RAM underneath; ROM blocks not included");
    }
    v
}

fn verification(o: &Outcome) -> Value {
    let mut v = json!({
        "destination_ram_equals_source_ram": o.src_ram == o.dst_ram,
        "source_ram_equals_harness_model": source_matches_model(o),
    });
    if !o.destination_reads.is_empty() {
        v["destination_reads_returned_source_content"] =
            json!(o.destination_reads.iter().all(|r| r.correct));
    }
    v
}

fn source_matches_model(o: &Outcome) -> bool {
    let mut src = o.src_ram.clone();
    for p in o.scenario.machine.reserved_pages() {
        let a = p as usize * PAGE;
        src[a..a + PAGE].fill(0);
    }
    src == o.expected_ram()
}

fn pattern_json(o: &Outcome) -> Value {
    let writes: Vec<Value> = o
        .writes
        .iter()
        .map(|w| json!({"round": 0, "page": w.page, "kind": w.kind, "gen": w.gen, "sha256": sha256_hex(&w.data)}))
        .collect();
    let mut v = json!({
        "seed": o.scenario.seed,
        "layout": if o.scenario.seed.is_some() {
            "conformance/src/qemu/driver.rs pattern(): pages 0-7 random, 8-11 filled with 0x01/0x80/0xff/0x5a, 511 random, 512 filled with 0x33, the last page random, then random pages selected by stream(seed, 'select') (u32le mod page count, repeats skipped); random page = stream(seed, 'page' || u64le(p) || u32le(0), 4096)"
        } else {
            "no writes"
        },
        "writes": writes,
    });
    if o.scenario.machine == Machine::Microvm {
        v["never_written_pages"] = json!([192, 255]);
    }
    v
}
