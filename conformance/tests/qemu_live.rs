//! Live migrations between real QEMUs through the recording proxy.
//!
//! QEMU 7.2 (host) and 10.0 (trixie chroot) come from
//! `conformance/scripts/provision-qemu.sh`. Without them the tests skip,
//! unless `CI` or `QMIG_REQUIRE_QEMU` is set: then they fail.
//!
//! Each test checks real outcomes: the destination's `pmemsave` dump is
//! byte-identical to the source's and to the pattern written through qtest,
//! the recorded stream starts with the savevm header, the return path is
//! well formed, and for recoveries the cut, both pauses, the received
//! bitmaps, RESUME_ACK and completion all happened.

use std::path::PathBuf;

use qmig_conformance::qemu::capture::scenario;
use qmig_conformance::qemu::driver::{first_diff_page, run, Kind, Outcome};
use qmig_conformance::qemu::pattern::PAGE;
use qmig_conformance::qemu::{find_qemu, find_qemu_at, QemuBinary, QemuError, QemuVersion};
use qmig_protocol::codes::{CommandCode, RpType, RECV_BITMAP_END_MARK, RESUME_ACK_VALUE};

const HEADER: [u8; 8] = [0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3];

fn qemu(v: QemuVersion) -> Option<QemuBinary> {
    find_qemu(v).unwrap_or_else(|e| panic!("{e}"))
}

/// One return-path message: type, payload, and for RECV_BITMAP the bitmap.
#[derive(Debug)]
struct Rp {
    ty: RpType,
    payload: Vec<u8>,
    bitmap: Option<Vec<u8>>,
}

fn be16(b: &[u8]) -> u16 {
    u16::from_be_bytes([b[0], b[1]])
}
fn be64(b: &[u8]) -> u64 {
    u64::from_be_bytes(b[..8].try_into().unwrap())
}

/// Splits a complete return path into messages (test-side walker).
fn rp_messages(mut b: &[u8]) -> Vec<Rp> {
    let mut out = Vec::new();
    while !b.is_empty() {
        assert!(b.len() >= 4, "truncated return-path header");
        let ty = RpType(be16(b));
        let len = be16(&b[2..]) as usize;
        let payload = b[4..4 + len].to_vec();
        b = &b[4 + len..];
        let mut bitmap = None;
        if ty == RpType::RECV_BITMAP {
            let size = be64(b) as usize;
            bitmap = Some(b[8..8 + size].to_vec());
            assert_eq!(
                be64(&b[8 + size..]),
                RECV_BITMAP_END_MARK,
                "bitmap end mark"
            );
            b = &b[16 + size..];
        }
        out.push(Rp {
            ty,
            payload,
            bitmap,
        });
    }
    out
}

/// The checks every scenario shares.
fn check_common(o: &Outcome) {
    assert_eq!(o.src_ram.len() as u64, o.scenario.ram_mb << 20);
    assert_eq!(o.dst_ram.len(), o.src_ram.len());
    assert_eq!(
        first_diff_page(&o.src_ram, &o.dst_ram),
        None,
        "destination pmemsave differs from the source"
    );
    assert!(o.src_ram == o.dst_ram);
    // The source holds exactly what qtest wrote (pmemsave shows the microvm
    // firmware over RAM at 0xe0000-0xfffff: left out of the comparison).
    let mut src = o.src_ram.clone();
    for p in o.scenario.machine.reserved_pages() {
        src[p as usize * PAGE..(p as usize + 1) * PAGE].fill(0);
    }
    assert!(o.writes.len() >= 40, "a non-trivial guest");
    assert!(
        src == o.expected_ram(),
        "source RAM is not the written pattern"
    );
    let first = &o.recordings[0].1;
    assert_eq!(&first.s2d.bytes[..8], &HEADER, "stream starts with QEVM v3");
    let rp = rp_messages(&first.d2s.bytes);
    assert_eq!(
        (rp[0].ty, rp[0].payload.as_slice()),
        (RpType::PONG, &1u32.to_be_bytes()[..])
    );
    assert_eq!(o.migration_info["src"]["status"], "completed");
    assert_eq!(o.migration_info["dst"]["status"], "completed");
}

fn precopy(v: QemuVersion) {
    let Some(bin) = qemu(v) else { return };
    let o = run(&bin, &scenario(v, "precopy").unwrap()).unwrap();
    check_common(&o);
    let rec = &o.recordings[0].1;
    assert!(!rec.cut && rec.s2d.eof && rec.d2s.eof);
    // Precopy return path: exactly PONG(1), SHUT(0).
    let rp = rp_messages(&rec.d2s.bytes);
    let types: Vec<RpType> = rp.iter().map(|m| m.ty).collect();
    assert_eq!(types, [RpType::PONG, RpType::SHUT]);
    assert_eq!(rp[1].payload, 0u32.to_be_bytes());
}

fn postcopy_recover(v: QemuVersion, name: &str) {
    let Some(bin) = qemu(v) else { return };
    let sc = scenario(v, name).unwrap();
    let o = run(&bin, &sc).unwrap();
    check_common(&o);
    let (l1, first) = &o.recordings[0];
    assert_eq!(*l1, "initial");
    if sc.kind == Kind::PostcopyRecover {
        // The first connection was cut exactly at the armed offset.
        assert!(first.cut);
        assert_eq!(Some(first.s2d.bytes.len() as u64), o.cut_at);
    } else {
        // migrate-pause: the source closed the channel itself.
        assert_eq!(sc.kind, Kind::PostcopyPauseRecover);
        assert!(!first.cut && first.s2d.eof && first.d2s.eof);
    }
    for side in ["src", "dst"] {
        assert!(
            o.steps
                .iter()
                .any(|s| s["side"] == side && s["status"] == "postcopy-paused"),
            "{side} paused"
        );
    }
    // Pages read on the destination during postcopy came back right, and
    // at least one had to be requested over the return path.
    assert_eq!(o.destination_reads.len(), sc.dst_reads);
    assert!(
        o.destination_reads.iter().all(|r| r.correct),
        "{:?}",
        o.destination_reads
    );
    let rp1 = rp_messages(&first.d2s.bytes);
    assert!(
        rp1.iter().any(|m| m.ty == RpType::REQ_PAGES_ID),
        "no page request in {:?}",
        rp1.iter().map(|m| m.ty).collect::<Vec<_>>()
    );
    // The recovery connection: no header, MIG_CMD_RECV_BITMAP first, and the
    // destination answered with bitmaps, RESUME_ACK(1), ..., SHUT(0).
    let (l2, rec) = &o.recordings[1];
    assert_eq!(*l2, "recovery");
    assert_eq!(rec.s2d.bytes[0], 0x08, "QEMU_VM_COMMAND");
    assert_eq!(
        CommandCode(be16(&rec.s2d.bytes[1..])),
        CommandCode::RECV_BITMAP
    );
    let rp = rp_messages(&rec.d2s.bytes);
    let n_bitmaps = rp
        .iter()
        .take_while(|m| m.ty == RpType::RECV_BITMAP)
        .count();
    assert!(n_bitmaps >= 1);
    let ram_pages = (sc.ram_mb << 20) / PAGE as u64;
    let main_bitmap = rp[0].bitmap.as_ref().unwrap();
    assert_eq!(
        main_bitmap.len() as u64,
        ram_pages.div_ceil(64) * 8,
        "bitmap of the main RAM block"
    );
    let received = main_bitmap
        .iter()
        .map(|b| b.count_ones() as u64)
        .sum::<u64>();
    assert!(
        received > 0 && received < ram_pages,
        "some but not all pages received before the cut: {received}"
    );
    assert_eq!(rp[n_bitmaps].ty, RpType::RESUME_ACK);
    assert_eq!(rp[n_bitmaps].payload, RESUME_ACK_VALUE.to_be_bytes());
    let last = rp.last().unwrap();
    assert_eq!(
        (last.ty, last.payload.as_slice()),
        (RpType::SHUT, &0u32.to_be_bytes()[..])
    );
}

#[test]
fn qemu72_precopy_through_recording_proxy() {
    precopy(QemuVersion::V7_2);
}

#[test]
fn qemu72_postcopy_cut_recover_resume() {
    postcopy_recover(QemuVersion::V7_2, "postcopy-recover");
}

#[test]
fn qemu72_postcopy_pause_recover_resume() {
    postcopy_recover(QemuVersion::V7_2, "postcopy-recover-pause");
}

#[test]
fn qemu100_microvm_precopy_through_recording_proxy() {
    precopy(QemuVersion::V10_0);
}

#[test]
fn qemu100_microvm_postcopy_cut_recover_resume() {
    postcopy_recover(QemuVersion::V10_0, "postcopy-recover");
}

#[test]
fn qemu100_microvm_postcopy_pause_recover_resume() {
    postcopy_recover(QemuVersion::V10_0, "postcopy-recover-pause");
}

#[test]
fn missing_qemu_fails_when_required_and_skips_otherwise() {
    let nowhere = PathBuf::from("/nonexistent/qemu-system-x86_64");
    match find_qemu_at(QemuVersion::V7_2, nowhere.clone(), true) {
        Err(QemuError::Missing(msg)) => assert!(msg.contains("QEMU 7.2 required"), "{msg}"),
        other => panic!("expected an error, got {other:?}"),
    }
    assert!(matches!(
        find_qemu_at(QemuVersion::V10_0, nowhere, false),
        Ok(None)
    ));
    // A QEMU of the wrong version is not accepted either.
    if let Some(b) = qemu(QemuVersion::V7_2) {
        assert!(matches!(
            find_qemu_at(QemuVersion::V10_0, b.program, true),
            Err(QemuError::Missing(_))
        ));
    }
}

/// Runs `provision-qemu.sh` with `env`; returns its stdout.
fn provision(env: &[(&str, &str)]) -> String {
    let script = concat!(env!("CARGO_MANIFEST_DIR"), "/scripts/provision-qemu.sh");
    let out = std::process::Command::new(script)
        .envs(env.iter().copied())
        .output()
        .expect("run provision-qemu.sh");
    let stdout = String::from_utf8_lossy(&out.stdout).to_string();
    assert!(
        out.status.success(),
        "provision-qemu.sh failed: {stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    stdout
}

fn assert_versions(stdout: &str) {
    let line = |p: &str| {
        stdout
            .lines()
            .find(|l| l.starts_with(p))
            .unwrap_or("")
            .to_string()
    };
    assert!(
        line("qemu-7.2: ").contains("QEMU emulator version 7.2."),
        "{stdout}"
    );
    assert!(
        line("qemu-10.0: ").contains("QEMU emulator version 10.0."),
        "{stdout}"
    );
}

/// The provisioning script is idempotent: with both QEMUs in place it
/// reuses them and reports both versions. (It provisions from scratch when
/// CI/QMIG_REQUIRE_QEMU is set and something is missing; otherwise a
/// machine without QEMU skips.)
#[test]
fn provision_script_reports_both_versions() {
    let have = find_qemu(QemuVersion::V7_2).unwrap_or(None).is_some()
        && find_qemu(QemuVersion::V10_0).unwrap_or(None).is_some();
    if !have && !qmig_conformance::qemu::qemu_required() {
        eprintln!("skipping: QEMU not provisioned");
        return;
    }
    assert_versions(&provision(&[]));
    // A second run changes nothing and says so.
    assert_versions(&provision(&[]));
}

/// Builds the QEMU 10.0 chroot from nothing in a fresh directory (needs the
/// Debian mirror; about a minute): `cargo test -p qmig-conformance --test
/// qemu_live provision_qemu_10_chroot_from_nothing -- --ignored --nocapture`.
#[test]
#[ignore = "downloads ~60 MB from the Debian mirror; run explicitly"]
fn provision_qemu_10_chroot_from_nothing() {
    let root = format!("/var/cache/qmig/fresh-test-{}", std::process::id());
    let _ = std::fs::remove_dir_all(&root);
    let start = std::time::Instant::now();
    let stdout = provision(&[("QMIG_QEMU10_ROOT", root.as_str())]);
    let secs = start.elapsed().as_secs();
    assert_versions(&stdout);
    let stamp = std::fs::read_to_string(format!("{root}/.qmig-provisioned")).unwrap();
    let mb: u64 = stamp
        .split(", ")
        .nth(1)
        .and_then(|s| s.trim().strip_suffix(" MB"))
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("stamp {stamp}"));
    eprintln!(
        "fresh QEMU 10.0 chroot: {secs} s, {mb} MB ({})",
        stamp.trim()
    );
    assert!(mb < 400, "chroot of {mb} MB is not minimal");
    assert!(!std::path::Path::new(&format!("{root}/usr/share/doc")).exists());
    // Reuse is immediate and keeps the stamp.
    assert_versions(&provision(&[("QMIG_QEMU10_ROOT", root.as_str())]));
    assert_eq!(
        std::fs::read_to_string(format!("{root}/.qmig-provisioned")).unwrap(),
        stamp
    );
    std::fs::remove_dir_all(&root).unwrap();
}

/// The qtest primitives against a real QEMU 7.2: `writeq`/`readq`,
/// `write`/`read` (hex) and `b64write`/`b64read`, cross-checked with each
/// other and with `pmemsave`.
#[test]
fn qemu72_qtest_primitives_agree_with_pmemsave() {
    use qmig_conformance::qemu::{Machine, Qemu};
    let Some(bin) = qemu(QemuVersion::V7_2) else {
        return;
    };
    let mut q = Qemu::launch(&bin, Machine::NoneCpu, 16, false, &[]).unwrap();
    let t = q.qtest().unwrap();
    t.writeq(0x1000, 0x0102_0304_0506_0708).unwrap();
    assert_eq!(t.readq(0x1000).unwrap(), 0x0102_0304_0506_0708);
    assert_eq!(
        t.read_hex(0x1000, 8).unwrap(),
        [8, 7, 6, 5, 4, 3, 2, 1],
        "little-endian guest"
    );
    t.write_hex(0x2ffe, &[0xde, 0xad, 0xbe, 0xef]).unwrap();
    let bulk: Vec<u8> = (0..3 * PAGE + 123).map(|i| (i * 7 % 251) as u8).collect();
    t.write(0x10_0000, &bulk).unwrap();
    assert_eq!(t.read(0x10_0000, bulk.len()).unwrap(), bulk);
    assert_eq!(t.read(0x2ffe, 4).unwrap(), [0xde, 0xad, 0xbe, 0xef]);
    let dump = q.pmemsave(0, 2 << 20).unwrap();
    assert_eq!(&dump[0x1000..0x1008], &[8, 7, 6, 5, 4, 3, 2, 1]);
    assert_eq!(&dump[0x2ffe..0x3002], &[0xde, 0xad, 0xbe, 0xef]);
    assert_eq!(&dump[0x10_0000..0x10_0000 + bulk.len()], &bulk[..]);
    assert!(dump[..0x1000].iter().all(|&b| b == 0));
}

fn sha256_hex(b: &[u8]) -> String {
    qmig_conformance::qemu::pattern::sha256_hex(b)
}

fn reference_vector(name: &str) -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/vectors/qemu-10.0")).join(name)
}

/// The capture tool against QEMU 10.0 `-M none` without CPU: the manifest
/// lists its files with the right sizes and hashes, and the recording
/// matches the shared reference vector: same length, the same bytes except
/// inside the 24-byte `timer` payload (clock values), the same return path
/// and the same final RAM.
#[test]
fn qemu100_capture_precopy_none_nocpu_matches_the_reference_vector() {
    let Some(bin) = qemu(QemuVersion::V10_0) else {
        return;
    };
    let dir = std::env::temp_dir().join(format!("qmig-capture-test-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let m = qmig_conformance::qemu::capture::capture(&bin, "precopy-none-nocpu", &dir).unwrap();
    assert_eq!(m["format"], "qemu-migration-vector/1");
    assert_eq!(m["qemu"]["version_string"], bin.version_string.as_str());
    let files = m["files"].as_object().unwrap();
    assert_eq!(files.keys().collect::<Vec<_>>(), ["rp.bin", "stream.bin"]);
    for (name, f) in files {
        let data = std::fs::read(dir.join(name)).unwrap();
        assert_eq!(f["bytes"], data.len());
        assert_eq!(f["sha256"], sha256_hex(&data).as_str());
    }
    let reference = reference_vector("precopy-none-nocpu");
    let ours = std::fs::read(dir.join("stream.bin")).unwrap();
    let theirs = std::fs::read(reference.join("stream.bin")).unwrap();
    assert_eq!(ours.len(), theirs.len());
    let diff: Vec<usize> = (0..ours.len()).filter(|&i| ours[i] != theirs[i]).collect();
    if let (Some(a), Some(b)) = (diff.first(), diff.last()) {
        assert!(
            b - a < 24,
            "differences beyond the timer payload: {a}..={b}"
        );
    }
    assert_eq!(
        std::fs::read(dir.join("rp.bin")).unwrap(),
        std::fs::read(reference.join("rp.bin")).unwrap()
    );
    let rm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference.join("manifest.json")).unwrap()).unwrap();
    assert_eq!(m["final_ram"]["sha256"], rm["final_ram"]["sha256"]);
    assert_eq!(m["verification"]["destination_ram_equals_source_ram"], true);
    std::fs::remove_dir_all(&dir).unwrap();
}

/// Postcopy on QEMU 10.0 `-M none` without CPU: completes, both RAMs equal
/// (all zero, as in the reference vector), return path PONG 1-4 in either
/// order of 3 and 4, then SHUT(0).
#[test]
fn qemu100_postcopy_none_nocpu() {
    let v = QemuVersion::V10_0;
    let Some(bin) = qemu(v) else { return };
    let o = run(&bin, &scenario(v, "postcopy-none-nocpu").unwrap()).unwrap();
    assert!(o.src_ram == o.dst_ram);
    assert!(o.dst_ram.iter().all(|&b| b == 0));
    let rec = &o.recordings[0].1;
    assert_eq!(&rec.s2d.bytes[..8], &HEADER);
    let rp = rp_messages(&rec.d2s.bytes);
    let mut pongs: Vec<u32> = rp
        .iter()
        .filter(|m| m.ty == RpType::PONG)
        .map(|m| u32::from_be_bytes(m.payload[..4].try_into().unwrap()))
        .collect();
    assert_eq!(&pongs[..2], [1, 2]);
    pongs.sort();
    assert_eq!(pongs, [1, 2, 3, 4]);
    let last = rp.last().unwrap();
    assert_eq!(
        (last.ty, last.payload.as_slice()),
        (RpType::SHUT, &0u32.to_be_bytes()[..])
    );
    let reference = reference_vector("postcopy-none-nocpu");
    let rm: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference.join("manifest.json")).unwrap()).unwrap();
    // The VM description taken afterwards is the reference vector's.
    let ours: serde_json::Value = serde_json::from_slice(o.vmdesc.as_ref().unwrap()).unwrap();
    let theirs: serde_json::Value =
        serde_json::from_slice(&std::fs::read(reference.join("vmdesc.json")).unwrap()).unwrap();
    assert_eq!(ours, theirs);
    assert_eq!(
        rm["final_ram"]["sha256"].as_str().unwrap(),
        sha256_hex(&o.dst_ram)
    );
}
