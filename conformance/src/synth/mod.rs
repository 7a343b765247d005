//! Synthetic vectors: small streams and return paths built from base channels ([`base`]; a
//! postcopy recovery, [`recovery`]) and patched once per case ([`cases`]), written in the
//! `qemu-migration-vector/1` layout with a `synthetic` object in the manifest (see
//! `conformance/README.md`).
//!
//! | module | owns |
//! |---|---|
//! | [`build`] | [`build::Parts`]: a channel as named parts, offsets by construction |
//! | [`base`] | the precopy, postcopy and return-path base channels (protocol encoders) |
//! | [`broken`] | the broken destinations and sources that stand for the invalid side of behaviour rules |
//! | [`cases`] | every case: rule, class, profile, patch and expected offset |
//! | [`devices`] | the device-payload cases (`timer` and its subsection, decoded by description) |
//! | [`recovery`] | the postcopy recovery base: cut main channel, recovery channel, return paths |
//! | [`multifd`] | the multifd migration base (main channel, two multifd connections), split per connection |
//! | [`huge`] | the huge-page base (one 4 MiB block of 2 MiB pages, postcopy) and its recovery cut mid host page |
//! | [`faults`] | the cases with guest faults (`replay.faults`): the cut and recovery channel of the rerequest case |
//! | [`source`] | the valid source behaviour cases (SWITCHOVER_START, DISCARD-DIRTY, URGENT-FIRST) and their `source_replay` fields |
//!
//! [`render`] produces every file in memory (deterministic), [`generate`] writes them, and
//! `tests/synthetic.rs` checks the committed `conformance/vectors/synthetic/` is up to date.

pub mod base;
pub mod broken;
pub mod build;
pub mod cases;
pub mod devices;
pub mod faults;
pub mod huge;
pub mod multifd;
pub mod recovery;
pub mod source;

use std::collections::BTreeMap;
use std::path::Path;

use serde_json::{json, Value};

use crate::qemu::pattern::sha256_hex;
use base::{RAM_BYTES, TPS};
use cases::{Base, Class};

/// Manifest format name.
pub const FORMAT: &str = "qemu-migration-vector/1";

/// Every file of the synthetic vector set: relative path -> bytes.
pub fn render() -> BTreeMap<String, Vec<u8>> {
    let mut out = BTreeMap::new();
    let mut index = Vec::new();
    for c in cases::all() {
        let ten = c.profile == "10";
        let mut parts = match c.base {
            Base::Precopy => base::precopy(ten),
            Base::Postcopy => base::postcopy(ten),
            Base::ReturnPath => base::rp_channel(),
            Base::Multifd => base::multifd_conn(),
            Base::Recovery => recovery::channel(),
            Base::HugePostcopy => huge::postcopy(ten),
            Base::HugeRecovery => huge::recovery_channel(),
            Base::FaultRecover => faults::recovery_channel(),
            Base::MultifdPrecopy => multifd::base(ten),
            Base::SrcPrecopy | Base::SrcPostcopy | Base::SrcRecovery => build::Parts::default(),
        };
        let offset = (c.patch)(&mut parts);
        assert_eq!(
            offset.is_some(),
            c.class != Class::Valid,
            "{}: an invalid or acceptable case gives an offset, a valid one none",
            c.name
        );
        if c.base == Base::MultifdPrecopy {
            multifd_case(&c, &parts, offset, &mut out, &mut index);
            continue;
        }
        let bytes = parts.bytes();
        let dir = format!("{}/", c.name);
        let mut files = serde_json::Map::new();
        let huge = c.base.is_huge();
        // A block of another page size than the target page carries it third.
        let (ram_bytes, mut blocks) = if huge {
            let b = json!([["ram", huge::HUGE_RAM_BYTES, huge::HUGE_PAGE]]);
            (huge::HUGE_RAM_BYTES, b)
        } else {
            (RAM_BYTES, json!([["ram", RAM_BYTES]]))
        };
        if c.rule == "BITMAP-PADDING" && c.class == Class::Invalid {
            blocks = json!([["ram", 100 * TPS]]);
        }
        let postcopy = matches!(
            c.base,
            Base::Postcopy
                | Base::SrcPostcopy
                | Base::SrcRecovery
                | Base::Recovery
                | Base::HugePostcopy
                | Base::HugeRecovery
                | Base::FaultRecover
        );
        let src_side = matches!(
            c.base,
            Base::SrcPrecopy | Base::SrcPostcopy | Base::SrcRecovery
        );
        let mut caps = json!({"events": true, "return-path": true});
        if postcopy {
            caps["postcopy-ram"] = json!(true);
        }
        for cap in cases::extra_caps(&c) {
            caps[*cap] = json!(true);
        }
        let mut flags: Vec<&str> = if postcopy {
            vec!["postcopy-ram", "return-path"]
        } else if c.base == Base::Multifd {
            vec!["multifd"]
        } else {
            vec!["return-path"]
        };
        flags.extend(cases::extra_caps(&c));
        let (channel, checker, input) = match c.base {
            Base::ReturnPath => ("return-path", "source", "rp.bin"),
            Base::SrcPrecopy | Base::SrcPostcopy => ("return-path", "source-replay", "rp.bin"),
            // Nothing injected: the runner's own page requests, cut and chosen bitmap.
            Base::SrcRecovery => ("recovery", "source-recover", ""),
            Base::Multifd => ("multifd", "multifd", "multifd-conn0.bin"),
            Base::Recovery | Base::HugeRecovery | Base::FaultRecover => {
                ("recovery", "destination-recovery", "resume-stream.bin")
            }
            _ => ("main", "destination", "stream.bin"),
        };
        if !input.is_empty() {
            files.insert(
                input.into(),
                json!({"bytes": bytes.len(), "sha256": sha256_hex(&bytes),
                "description": match channel {
                    "main" => "the main channel, source to destination",
                    "multifd" => "multifd connection 0, source to destination",
                    "recovery" => "the recovery channel, source to destination (after stream.bin was cut)",
                    _ if src_side => "return-path bytes the runner writes to the source at the injection point",
                    _ => "the return path, destination to source",
                }}),
            );
            out.insert(format!("{dir}{input}"), bytes.clone());
        }
        let mut replay = json!(null);
        let mut final_ram = json!(null);
        let mut channels = if input.is_empty() {
            json!([])
        } else {
            json!([{"label": channel, "file": input}])
        };
        if matches!(
            c.base,
            Base::Recovery | Base::HugeRecovery | Base::FaultRecover
        ) {
            let (r, chans) = recovery_files(&c, ten, &caps, &mut files, &mut out);
            replay = r;
            channels = chans;
            final_ram = final_ram_json(&if huge {
                huge::final_ram()
            } else {
                base::final_ram(true)
            });
        }
        if channel == "main" {
            let mut ch = json!({"label": "main", "feed_to_destination": "stream.bin"});
            if c.class == Class::Acceptable {
                // Either outcome: a destination that completes must do so exactly as for the
                // valid base; one that rejects passes too.
                ch["accept_failure"] = json!(true);
            }
            if c.class != Class::Invalid {
                let rp = if postcopy {
                    base::postcopy_rp()
                } else {
                    base::precopy_rp()
                };
                files.insert(
                    "rp.bin".into(),
                    json!({"bytes": rp.len(), "sha256": sha256_hex(&rp),
                           "description": "the return path a conforming destination writes"}),
                );
                out.insert(format!("{dir}rp.bin"), rp);
                ch["expected_return_path"] = json!("rp.bin");
                ch["return_path_rule"] = json!(if postcopy { "postcopy" } else { "exact" });
                final_ram = final_ram_json(&if huge {
                    huge::final_ram()
                } else {
                    base::final_ram(postcopy)
                });
            } else {
                ch["expect_failure"] = json!(true);
            }
            replay = json!({"destination_capabilities": caps, "destination_parameters": {}, "channels": [ch]});
            if cases::footer_scan_only(&c) || c.class == Class::Acceptable {
                // About the footer scan: the destination is given no VM description (one
                // would delimit the payload by its described size instead). An acceptable
                // case's flaw is in the description itself: it is not given either.
                replay["destination_vmdesc"] = json!(false);
            }
        }
        let expected = match offset {
            Some(off) => json!({"rule": c.rule, "offset": off}),
            None => json!(null),
        };
        let reaction = offset.and_then(|off| cases::reaction(&c, &parts, off));
        let source_replay = if src_side {
            let ram = base::source_ram(ten);
            let source_ram = json!({"generator": "source_ram (conformance/src/synth/base.rs)",
                                    "bytes": ram.len(), "sha256": sha256_hex(&ram)});
            let mut r = json!({
                "mode": if postcopy { "postcopy" } else { "precopy" },
                "inject": "rp.bin",
                "inject_after": if postcopy { "postcopy-run" } else { "first-page" },
                "source_ram": source_ram,
                "expect": if c.class == Class::Valid { "completed" } else { "failed" },
            });
            if c.base == Base::SrcRecovery {
                // The runner's requests and cut, then a recovery (or, SM-CANCEL, a cancel).
                let cancel = c.rule == "SM-CANCEL";
                r = json!({
                    "mode": if cancel { "postcopy-cancel" } else { "postcopy-recover" },
                    "source_ram": source_ram,
                    "expect": if cancel { "cancelled" } else { "completed" },
                    "requests": "after POSTCOPY_RUN: up to three pages of `ram` not received yet, non-zero ones from the block's end first",
                    "cut": "16 KiB of stream after the requested pages arrived and at least two even pages were received",
                });
                if cancel {
                    r["checks"] = json!(["both sides postcopy-paused after the cut",
                        "migrate_cancel on the source is accepted; its MIGRATION events reach `cancelled` and query-migrate says so (SM-CANCEL)",
                        "the source still answers QMP"]);
                } else {
                    r["recovery"] = json!("migrate resume=true to a new port; each RECV_BITMAP answered with the pages received on the first connection, odd page indices cleared");
                    r["checks"] = json!(["a RECV_BITMAP for every block of MEM_SIZE before POSTCOPY_RESUME (SM-RECOVER-BITMAP-ALL)",
                        "no page record before the runner's RESUME_ACK (SM-RECOVER-BITMAP-ALL)",
                        "after it, a record for exactly the pages the chosen bitmap leaves clear, each once (SM-REBUILD)",
                        "completed on both sides; the played destination's RAM and the source's pmemsave equal source_ram"]);
                }
            } else if c.class == Class::Valid {
                // The pages the injected requests name (block, target page index).
                r["requested_pages"] = json!([["ram", 254], ["ram", 255]]);
            }
            source::extend(&c, &mut r);
            r
        } else {
            json!(null)
        };
        let mut manifest = json!({
            "format": FORMAT,
            "scenario": c.name,
            "description": c.description,
            "qemu": {"version_string": format!("synthetic ({} profile)", c.profile), "binary": null},
            "machine": {"type": "none", "cpu": null, "ram_mb": ram_bytes >> 20, "ram_bytes": ram_bytes,
                        "ram_block": "ram", "ram_guest_physical_base": 0, "target_page_size": TPS},
            "files": files,
            "channels": channels,
            "final_ram": final_ram,
            "replay": replay,
            "synthetic": {
                "class": c.class.name(),
                "rule": c.rule,
                "exercises": c.exercises,
                "profile": c.profile,
                "base": c.base.name(),
                "channel": channel,
                "checker": checker,
                "flags": flags,
                "blocks": blocks,
                "expected": expected,
                "generator": "qmig conformance --generate (conformance/src/synth)",
            },
        });
        if let Some(r) = reaction {
            manifest["synthetic"]["reaction"] = json!(r);
        }
        if huge {
            // The main block's page size (a hugetlbfs block on QEMU: `{MEM_BACKEND}`).
            manifest["machine"]["ram_page_size"] = json!(huge::HUGE_PAGE);
        }
        if c.base == Base::HugePostcopy {
            // Judged by a destination whose blocks have the page sizes of `blocks` (the
            // runner's played destination, which has 4 KiB pages only, does not judge them).
            manifest["synthetic"]["checker"] = json!("destination-huge-pages");
        }
        if devices::described(&c) {
            manifest["synthetic"]["checker"] = json!("destination-described");
        }
        if cases::needs_device_table(&c) {
            // A destination that knows its devices: the table it derives from the stream's VM
            // description (given to a target as `{VMDESC}`).
            manifest["synthetic"]["checker"] = json!("destination-devices");
            manifest["synthetic"]["known_devices"] = json!([["globalstate", 0, 1], ["ram", 0, 4]]);
        }
        if faults::is_fault_case(&c) {
            // The guest accesses the runner makes and the requests they must cause; a CPU, for
            // QEMU's qtest accesses (the trigger where there is no x-qmig-probe-read).
            manifest["replay"]["faults"] = faults::faults(&c, ten);
            manifest["machine"]["cpu"] = json!(faults::QEMU_CPU);
        }
        if src_side {
            manifest["source_replay"] = source_replay;
            // A QEMU 7.2 source's RAM is written through qtest, which needs a CPU there (the
            // 10.x cases start from zero RAM: see base::source_ram).
            if !ten {
                manifest["machine"]["cpu"] = json!("qemu64,apic-id=0");
            }
        }
        let mut text = serde_json::to_vec_pretty(&manifest).expect("json");
        text.push(b'\n');
        out.insert(format!("{dir}manifest.json"), text);
        let mut entry = json!({"name": c.name, "rule": c.rule, "class": manifest["synthetic"]["class"],
                          "profile": c.profile, "exercises": c.exercises, "expected": expected});
        if let Some(r) = reaction {
            entry["reaction"] = json!(r);
        }
        index.push(entry);
    }
    let elsewhere: Vec<Value> = cases::ELSEWHERE
        .iter()
        .map(|(r, w)| json!({"rule": r, "checked_by": w}))
        .collect();
    let broken: Vec<Value> = broken::all()
        .iter()
        .map(|b| json!({"rule": b.rule, "option": b.option, "target": b.target, "fails": b.cases}))
        .collect();
    let mut text = serde_json::to_vec_pretty(&json!({
        "format": "qmig-synthetic-index/1",
        "cases": index,
        "broken_targets": broken,
        "not_generated": elsewhere,
    }))
    .expect("json");
    text.push(b'\n');
    out.insert("index.json".into(), text);
    out
}

/// The migration parameter of a silence bound (qmig-dst's; a target without one skips the
/// SM-TIMEOUT cases as unsupported), and the bound the cases set, milliseconds.
const SILENCE_PARAM: &str = "x-qmig-silence-timeout";
const SILENCE_MS: u64 = 1000;

/// The `final_ram` object of a manifest for block `ram` holding `ram`.
fn final_ram_json(ram: &[u8]) -> Value {
    let nonzero: Vec<Value> = ram
        .chunks(TPS as usize)
        .enumerate()
        .filter(|(_, pg)| pg.iter().any(|&b| b != 0))
        .map(|(i, pg)| json!([i, sha256_hex(pg)]))
        .collect();
    json!({"block": "ram", "bytes": ram.len(), "sha256": sha256_hex(ram),
        "zero_page_sha256": sha256_hex(&[0u8; TPS as usize]),
        "nonzero_page_count": nonzero.len(), "nonzero_pages": nonzero})
}

/// Adds a recovery case's other files to `files` / `out` (the cut main channel and its return
/// path; a valid case's expected recovery return path; an invalid case's second, valid recovery
/// channel and its return path) and returns its `replay` and `channels` objects.
fn recovery_files(
    c: &cases::Case,
    ten: bool,
    caps: &Value,
    files: &mut serde_json::Map<String, Value>,
    out: &mut BTreeMap<String, Vec<u8>>,
) -> (Value, Value) {
    let mut add = |name: &str, bytes: Vec<u8>, what: &str| {
        files.insert(
            name.into(),
            json!({"bytes": bytes.len(), "sha256": sha256_hex(&bytes), "description": what}),
        );
        out.insert(format!("{}/{name}", c.name), bytes);
    };
    let huge = c.base.is_huge();
    let fault = c.base == Base::FaultRecover;
    let main = if huge {
        huge::recovery_main(ten)
    } else if fault {
        faults::recovery_main(ten)
    } else {
        recovery::main(ten)
    };
    let cut = main.len();
    add(
        "stream.bin",
        main.bytes(),
        if huge {
            "the main channel, source to destination, cut after POSTCOPY_RUN inside host page 1 (its first 101 target pages sent, the 102nd cut inside its record)"
        } else if fault {
            "the main channel, source to destination, cut after POSTCOPY_RUN before pages 2 and 3 (a guest access waits for page 2)"
        } else {
            "the main channel, source to destination, cut inside page 3's record after POSTCOPY_RUN"
        },
    );
    add(
        "rp.bin",
        recovery::main_rp(),
        "the return path of the main channel up to the cut",
    );
    let mut initial = json!({"label": "initial", "feed_to_destination": "stream.bin",
        "expected_return_path": "rp.bin", "return_path_rule": "postcopy", "ends_mid_stream": true});
    let mut params = json!({});
    if c.rule == "SM-TIMEOUT" {
        // The cut is silence: the runner keeps the connection open and writes nothing more; a
        // destination with a silence bound of 1 s gives the channel up and pauses.
        initial["cut_by"] = json!("silence");
        params = json!({ SILENCE_PARAM: SILENCE_MS });
    }
    let mut recovery = json!({"label": "recovery", "feed_to_destination": "resume-stream.bin"});
    let mut chans = vec![
        json!({"label": "initial", "file": "stream.bin", "rp_file": "rp.bin", "truncated_at": cut}),
        json!({"label": "recovery", "file": "resume-stream.bin"}),
    ];
    let mut replay_chans = vec![initial];
    // The valid recovery channel and its return path: the whole recovery of a valid case, the
    // second one after a lost or rejected first recovery channel.
    let (good_channel, good_rp) = if huge {
        (
            huge::recovery_channel().bytes(),
            huge::recovery_channel_rp(),
        )
    } else if fault {
        (faults::recovery_channel().bytes(), faults::recovery_rp())
    } else {
        (recovery::channel().bytes(), recovery::channel_rp())
    };
    let second = if recovery::cut_in_recover(c) {
        // SM-PAUSE-IN-RECOVER without a violation: the recovery channel is lost after its
        // RECV_BITMAP was answered; back in postcopy-paused, a second recovery completes.
        add(
            "resume-rp.bin",
            recovery::bitmap_rp(),
            "the return path of the first recovery channel, lost after RECV_BITMAP: the received bitmap",
        );
        recovery["expected_return_path"] = json!("resume-rp.bin");
        recovery["return_path_rule"] = json!("exact");
        recovery["ends_mid_stream"] = json!(true);
        recovery["expect_status"] = json!("postcopy-paused");
        chans[1]["rp_file"] = json!("resume-rp.bin");
        chans[1]["truncated_at"] = json!(recovery::channel_len_to("resume"));
        Some("a second, valid recovery channel after the first one was lost")
    } else if c.class == Class::Valid {
        add(
            "resume-rp.bin",
            good_rp.clone(),
            "the return path a conforming destination writes on the recovery channel",
        );
        recovery["expected_return_path"] = json!("resume-rp.bin");
        recovery["return_path_rule"] = json!("recovery");
        chans[1]["rp_file"] = json!("resume-rp.bin");
        None
    } else {
        // SM-PAUSE-IN-RECOVER: the violation returns the destination to postcopy-paused, from
        // which a second recovery completes the migration with nothing received lost.
        recovery["expect_failure"] = json!(true);
        recovery["expect_status"] = json!("postcopy-paused");
        Some("a second, valid recovery channel after the first one failed")
    };
    replay_chans.push(recovery);
    if let Some(what) = second {
        add("resume2-stream.bin", good_channel, what);
        add(
            "resume2-rp.bin",
            good_rp,
            "the return path a conforming destination writes on the second recovery channel",
        );
        replay_chans.push(
            json!({"label": "recovery-2", "feed_to_destination": "resume2-stream.bin",
            "expected_return_path": "resume2-rp.bin", "return_path_rule": "recovery"}),
        );
        chans.push(
            json!({"label": "recovery-2", "file": "resume2-stream.bin", "rp_file": "resume2-rp.bin"}),
        );
    }
    let replay = json!({"destination_capabilities": caps, "destination_parameters": params,
        "channels": replay_chans});
    (replay, Value::Array(chans))
}

/// Adds multifd case `c` (base [`multifd::base`], patched to `parts`; `offset` from 0 of the
/// connection [`multifd::violation_conn`] names) to `out` and `index`: the main channel
/// (`stream.bin`), the two connections (`multifd-conn1.bin`, `multifd-conn2.bin`), a valid
/// case's return path and final RAM; an invalid case's `expected` names the connection file its
/// offset counts in (`channel`).
fn multifd_case(
    c: &cases::Case,
    parts: &build::Parts,
    offset: Option<u64>,
    out: &mut BTreeMap<String, Vec<u8>>,
    index: &mut Vec<Value>,
) {
    {
        let (main_parts, conns) = multifd::split(parts);
        let name = c.name.clone();
        let class = if c.class == Class::Valid {
            "valid"
        } else {
            "invalid"
        };
        let mut files = serde_json::Map::new();
        let mut add = |file: &str, bytes: Vec<u8>, what: &str| {
            files.insert(
                file.into(),
                json!({"bytes": bytes.len(), "sha256": sha256_hex(&bytes), "description": what}),
            );
            out.insert(format!("{name}/{file}"), bytes);
        };
        add(
            "stream.bin",
            main_parts.bytes(),
            "the main channel, source to destination",
        );
        for (k, f) in multifd::CONN_FILES.iter().enumerate() {
            add(
                f,
                conns[k].bytes(),
                "a multifd connection, source to destination, opened after the main one",
            );
        }
        let caps = json!({"events": true, "return-path": true, "multifd": true});
        let mut main = json!({"label": "main", "feed_to_destination": "stream.bin",
                   "multifd_connections_in_order": multifd::CONN_FILES});
        let mut final_ram = json!(null);
        if c.class == Class::Valid {
            add(
                "rp.bin",
                base::precopy_rp(),
                "the return path a conforming destination writes",
            );
            main["expected_return_path"] = json!("rp.bin");
            main["return_path_rule"] = json!("exact");
            final_ram = final_ram_json(&base::final_ram(false));
        } else {
            main["expect_failure"] = json!(true);
        }
        if multifd::closes_connections(c) {
            // The source closes its multifd connections once written (one ends early).
            main["multifd_close_after_write"] = json!(true);
        }
        let expected = match offset {
            Some(off) => json!({"rule": c.rule, "offset": off,
                "channel": multifd::CONN_FILES[multifd::violation_conn(c)]}),
            None => json!(null),
        };
        let manifest = json!({
            "format": FORMAT,
            "scenario": name,
            "description": c.description,
            "qemu": {"version_string": format!("synthetic ({} profile)", c.profile), "binary": null},
            "machine": {"type": "none", "cpu": null, "ram_mb": RAM_BYTES >> 20, "ram_bytes": RAM_BYTES,
                        "ram_block": "ram", "ram_guest_physical_base": 0, "target_page_size": TPS},
            "files": files,
            "channels": [{"label": "main", "file": "stream.bin", "multifd_channels": multifd::CONN_FILES}],
            "final_ram": final_ram,
            "replay": {"destination_capabilities": caps,
                       "destination_parameters": {"multifd-channels": 2}, "channels": [main]},
            "synthetic": {
                "class": class,
                "rule": c.rule,
                "exercises": c.exercises,
                "profile": c.profile,
                "base": "multifd-precopy",
                "channel": "main+multifd",
                "checker": "destination-multifd",
                "flags": ["multifd", "return-path"],
                "blocks": [["ram", RAM_BYTES]],
                "expected": expected,
                "generator": "qmig conformance --generate (conformance/src/synth)",
            },
        });
        let mut text = serde_json::to_vec_pretty(&manifest).expect("json");
        text.push(b'\n');
        out.insert(format!("{name}/manifest.json"), text);
        index.push(
            json!({"name": name, "rule": c.rule, "class": class, "profile": "7.2",
            "exercises": c.exercises, "expected": expected}),
        );
    }
}

/// Writes every synthetic vector under `dir` (created if needed). Returns the file count.
pub fn generate(dir: &Path) -> std::io::Result<usize> {
    let files = render();
    for (rel, bytes) in &files {
        let path = dir.join(rel);
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::write(path, bytes)?;
    }
    Ok(files.len())
}
