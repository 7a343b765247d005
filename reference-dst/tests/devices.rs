//! Device state is kept and dumpable: `--dump-devices FILE` at completion and the
//! `x-qmig-dump-devices` command, decoded field by field with the VM description.

mod common;

use common::{feed, Dst};
use serde_json::{json, Value};

#[test]
fn device_sections_dumped_and_decoded() {
    let v = concat!(
        env!("CARGO_MANIFEST_DIR"),
        "/../conformance/vectors/qemu-7.2/postcopy"
    );
    let out = std::env::temp_dir().join(format!("qmig-dst-devices-{}.json", std::process::id()));
    let vd = format!("{v}/vmdesc.json");
    let out_s = out.display().to_string();
    let mut dst = Dst::spawn(&[
        "--ram",
        "64M",
        "--profile",
        "7.2",
        "--capabilities",
        "postcopy-ram,return-path",
        "--vmdesc",
        &vd,
        "--dump-devices",
        &out_s,
    ]);
    let addr = dst.listen("migrate-incoming");
    feed(addr, &std::fs::read(format!("{v}/stream.bin")).unwrap());
    dst.wait_status("completed");
    let dumped: Value = serde_json::from_slice(&std::fs::read(&out).unwrap()).unwrap();
    let _ = std::fs::remove_file(&out);
    let live = dst.cmd("x-qmig-dump-devices", json!({}));
    assert_eq!(dumped, live);
    let list = live.as_array().unwrap();
    let names: Vec<&str> = list.iter().map(|d| d["idstr"].as_str().unwrap()).collect();
    // 7.2 -M none with a CPU: every device section, in stream order.
    for want in [
        "timer",
        "cpu_common",
        "cpu",
        "kvm-tpr-opt",
        "apic",
        "globalstate",
    ] {
        assert!(names.contains(&want), "{want} missing from {names:?}");
    }
    for d in list {
        let size = d["size"].as_u64().unwrap();
        assert_eq!(d["data"].as_str().unwrap().len() as u64, 2 * size);
        let fields = d["fields"]
            .as_array()
            .unwrap_or_else(|| panic!("not decoded: {d}"));
        assert!(!fields.is_empty() || size == 0, "{d}");
    }
    // globalstate carries the run state name ("running").
    let gs = list.iter().find(|d| d["idstr"] == "globalstate").unwrap();
    let text = serde_json::to_string(gs).unwrap();
    assert!(text.contains(
        &"running"
            .bytes()
            .map(|b| format!("{b:02x}"))
            .collect::<String>()
    ));
}
