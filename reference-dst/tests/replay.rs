//! Replay of every conformance vector into qmig-dst over TCP.
//!
//! Each vector's `stream.bin` is fed on a TCP connection (then EOF); for the recovery vectors
//! `migrate-recover` is issued and `resume-stream.bin` fed on a new connection. The return path
//! must follow the manifest's `return_path_rule`, and the destination's RAM (every block) must
//! equal `final_ram`. Multifd vectors: `multifd-channels` is set to the number of captured
//! connections; the main channel connects first, then each `multifd-conn*.bin` on its own
//! connection, all written concurrently (the destination holds each side back at the sync
//! points until the other has caught up).

mod common;

use std::path::PathBuf;

use common::{check_rp, feed, sha256_hex, Dst};
use qmig_protocol::profile::Profile;
use serde_json::{json, Value};

fn root() -> PathBuf {
    PathBuf::from(concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/vectors"
    ))
}

fn replay(rel: &str) {
    let dir = root().join(rel);
    let m: Value = serde_json::from_slice(&std::fs::read(dir.join("manifest.json")).unwrap())
        .expect("manifest");
    let (pname, profile) = if rel.starts_with("qemu-7.2/") {
        ("7.2", Profile::QEMU_7_2)
    } else {
        ("10", Profile::QEMU_10)
    };
    let machine = m["machine"]["type"]
        .as_str()
        .expect("machine type")
        .to_string();
    let ram = m["final_ram"]["bytes"].as_u64().expect("ram bytes");
    let caps: Vec<String> = m["replay"]["destination_capabilities"]
        .as_object()
        .expect("caps")
        .iter()
        .filter(|(k, v)| v.as_bool() == Some(true) && k.as_str() != "events")
        .map(|(k, _)| k.clone())
        .collect();
    let ram_s = ram.to_string();
    let caps_s = caps.join(",");
    let vmdesc = dir.join("vmdesc.json");
    let vmdesc_s = vmdesc.display().to_string();
    let mut args = vec!["--ram", &ram_s, "--machine", &machine, "--profile", pname];
    if !caps.is_empty() {
        args.extend(["--capabilities", &caps_s]);
    }
    if vmdesc.exists() {
        args.extend(["--vmdesc", &vmdesc_s]);
    }
    let mut dst = Dst::spawn(&args);
    if caps.iter().any(|c| c == "multifd") {
        replay_multifd(rel, &dir, &m, profile, &mut dst);
        check_final_ram(rel, &m, &mut dst, ram);
        return;
    }
    let channels = m["replay"]["channels"]
        .as_array()
        .expect("channels")
        .clone();
    for (i, ch) in channels.iter().enumerate() {
        let addr = if i == 0 {
            dst.listen("migrate-incoming")
        } else {
            dst.wait_status("postcopy-paused");
            dst.listen("migrate-recover")
        };
        let data = std::fs::read(dir.join(ch["feed_to_destination"].as_str().unwrap())).unwrap();
        let rp = feed(addr, &data);
        let cut = ch["ends_mid_stream"].as_bool() == Some(true);
        if let (Some(rule), Some(exp)) = (
            ch["return_path_rule"].as_str(),
            ch["expected_return_path"].as_str(),
        ) {
            let expected = std::fs::read(dir.join(exp)).unwrap();
            check_rp(
                rule,
                &rp,
                &expected,
                profile,
                !cut,
                &format!("{rel} channel {i}"),
            );
        } else {
            assert!(
                rp.is_empty(),
                "{rel}: no return path expected, got {} bytes",
                rp.len()
            );
        }
    }
    check_final_ram(rel, &m, &mut dst, ram);
}

/// The multifd connections of a vector, in order.
fn multifd_files(dir: &std::path::Path) -> Vec<Vec<u8>> {
    (1..)
        .map(|i| dir.join(format!("multifd-conn{i}.bin")))
        .take_while(|p| p.exists())
        .map(|p| std::fs::read(p).unwrap())
        .collect()
}

fn replay_multifd(rel: &str, dir: &std::path::Path, m: &Value, profile: Profile, dst: &mut Dst) {
    use std::io::{Read, Write};
    use std::net::{Shutdown, TcpStream};
    let conns = multifd_files(dir);
    assert!(conns.len() >= 2, "{rel}: multifd connections");
    dst.qmp
        .execute(
            "migrate-set-parameters",
            json!({"multifd-channels": conns.len()}),
        )
        .expect("multifd-channels");
    let addr = dst.listen("migrate-incoming");
    let stream = std::fs::read(dir.join("stream.bin")).unwrap();
    // The main channel is connected (and so accepted) first.
    let main = TcpStream::connect(addr).expect("connect main");
    let mut r = main.try_clone().unwrap();
    let reader = std::thread::spawn(move || {
        let mut out = Vec::new();
        let _ = r.read_to_end(&mut out);
        out
    });
    let mut writers = Vec::new();
    let mut w = main.try_clone().unwrap();
    writers.push(std::thread::spawn(move || {
        let _ = w.write_all(&stream);
        let _ = w.shutdown(Shutdown::Write);
    }));
    let mut keep = vec![main];
    for data in conns {
        let s = TcpStream::connect(addr).expect("connect multifd");
        let mut w = s.try_clone().unwrap();
        writers.push(std::thread::spawn(move || {
            let _ = w.write_all(&data);
            let _ = w.shutdown(Shutdown::Write);
        }));
        keep.push(s);
    }
    for w in writers {
        w.join().unwrap();
    }
    let rp = reader.join().unwrap();
    let ch = &m["replay"]["channels"][0];
    if let (Some(rule), Some(exp)) = (
        ch["return_path_rule"].as_str(),
        ch["expected_return_path"].as_str(),
    ) {
        let expected = std::fs::read(dir.join(exp)).unwrap();
        check_rp(rule, &rp, &expected, profile, true, &format!("{rel} main"));
    }
    drop(keep);
}

fn check_final_ram(rel: &str, m: &Value, dst: &mut Dst, ram: u64) {
    dst.wait_status("completed");
    let info = dst.info();
    assert_eq!(info["status"], "completed", "{info}");
    let main = dst.pmemsave(ram);
    assert_eq!(
        sha256_hex(&main),
        m["final_ram"]["sha256"].as_str().unwrap(),
        "{rel}: main block differs from final_ram"
    );
    for b in m["final_ram"]["other_blocks"]
        .as_array()
        .cloned()
        .unwrap_or_default()
    {
        let name = b["block"].as_str().unwrap();
        let got = dst.ramsave(name);
        assert_eq!(
            got.len() as u64,
            b["bytes"].as_u64().unwrap(),
            "{rel}: {name} length"
        );
        assert_eq!(
            sha256_hex(&got),
            b["sha256"].as_str().unwrap(),
            "{rel}: block {name} differs"
        );
    }
}

macro_rules! vectors {
    ($($name:ident => $rel:literal,)*) => {
        $( #[test] fn $name() { replay($rel); } )*
        const LISTED: &[&str] = &[$($rel),*];
    };
}

vectors! {
    v72_postcopy => "qemu-7.2/postcopy",
    v72_postcopy_advise_precopy => "qemu-7.2/postcopy-advise-precopy",
    v72_postcopy_noreads => "qemu-7.2/postcopy-noreads",
    v72_postcopy_recover => "qemu-7.2/postcopy-recover",
    v72_postcopy_recover_pause => "qemu-7.2/postcopy-recover-pause",
    v72_precopy_256m_sparse => "qemu-7.2/precopy-256m-sparse",
    v72_precopy_compress => "qemu-7.2/precopy-compress",
    v72_precopy_config_caps => "qemu-7.2/precopy-config-caps",
    v72_precopy_dirty => "qemu-7.2/precopy-dirty",
    v72_precopy_file_pattern => "qemu-7.2/precopy-file-pattern",
    v72_precopy_file_zero => "qemu-7.2/precopy-file-zero",
    v72_precopy_footer_lookalike => "qemu-7.2/precopy-footer-lookalike",
    v72_precopy_multifd => "qemu-7.2/precopy-multifd",
    v72_precopy_tcp_rp => "qemu-7.2/precopy-tcp-rp",
    v72_precopy_xbzrle => "qemu-7.2/precopy-xbzrle",
    v10_postcopy => "qemu-10.0/postcopy",
    v10_postcopy_advise_precopy => "qemu-10.0/postcopy-advise-precopy",
    v10_postcopy_none_nocpu => "qemu-10.0/postcopy-none-nocpu",
    v10_postcopy_noreads => "qemu-10.0/postcopy-noreads",
    v10_postcopy_recover => "qemu-10.0/postcopy-recover",
    v10_postcopy_recover_pause => "qemu-10.0/postcopy-recover-pause",
    v10_precopy_256m_sparse => "qemu-10.0/precopy-256m-sparse",
    v10_precopy_config_caps => "qemu-10.0/precopy-config-caps",
    v10_precopy_dirty => "qemu-10.0/precopy-dirty",
    v10_precopy_file_pattern => "qemu-10.0/precopy-file-pattern",
    v10_precopy_file_zero => "qemu-10.0/precopy-file-zero",
    v10_precopy_footer_lookalike => "qemu-10.0/precopy-footer-lookalike",
    v10_precopy_multifd => "qemu-10.0/precopy-multifd",
    v10_precopy_none_nocpu => "qemu-10.0/precopy-none-nocpu",
    v10_precopy_tcp_rp => "qemu-10.0/precopy-tcp-rp",
    v10_precopy_xbzrle => "qemu-10.0/precopy-xbzrle",
    v10q_postcopy_none_nocpu => "qemu-10.0-qmig/postcopy-none-nocpu",
    v10q_postcopy_recover => "qemu-10.0-qmig/postcopy-recover",
    v10q_postcopy_recover_pause => "qemu-10.0-qmig/postcopy-recover-pause",
    v10q_precopy_none_nocpu => "qemu-10.0-qmig/precopy-none-nocpu",
}

/// Every `qemu-*` vector folder on disk is replayed by a test above.
#[test]
fn every_vector_is_listed() {
    let mut on_disk = Vec::new();
    for set in std::fs::read_dir(root()).unwrap() {
        let set = set.unwrap().path();
        let is_qemu = set
            .file_name()
            .is_some_and(|n| n.to_string_lossy().starts_with("qemu-"));
        if !set.is_dir() || !is_qemu {
            continue;
        }
        for v in std::fs::read_dir(&set).unwrap() {
            let v = v.unwrap().path();
            if v.join("manifest.json").exists() {
                let rel = v.strip_prefix(root()).unwrap().display().to_string();
                on_disk.push(rel);
            }
        }
    }
    on_disk.sort();
    let mut listed: Vec<String> = LISTED.iter().map(|s| s.to_string()).collect();
    listed.sort();
    assert_eq!(on_disk, listed);
}
