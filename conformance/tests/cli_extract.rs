//! `qmig extract`: the RAM blocks rebuilt from every vector's channels (main stream, multifd
//! connections, recovery channel) have the manifest's `final_ram` sha256, ROM blocks included
//! (`other_blocks`); `--flat` concatenates them.

mod cli_util;

use cli_util::*;
use std::collections::BTreeMap;

fn extract(
    dir: &std::path::Path,
    flat: bool,
) -> (BTreeMap<String, (String, String)>, std::path::PathBuf) {
    let out = std::env::temp_dir().join(format!(
        "qmig-cli-extract-{}-{}-{}",
        std::process::id(),
        dir.parent().unwrap().file_name().unwrap().to_str().unwrap(),
        dir.file_name().unwrap().to_str().unwrap()
    ));
    let mut args = vec![
        "extract".to_string(),
        p(&dir.join("stream.bin")),
        "-o".into(),
        p(&out),
    ];
    if flat {
        args.push("--flat".into());
    }
    let mut mf: Vec<_> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|f| {
            f.file_name()
                .unwrap()
                .to_str()
                .unwrap()
                .starts_with("multifd-conn")
        })
        .collect();
    mf.sort();
    if !mf.is_empty() {
        args.push("--multifd".into());
        args.extend(mf.iter().map(|f| p(f)));
    }
    if dir.join("resume-stream.bin").is_file() {
        args.extend(["--recovery".into(), p(&dir.join("resume-stream.bin"))]);
    }
    if dir.join("vmdesc.json").is_file() {
        args.extend(["--vmdesc".into(), p(&dir.join("vmdesc.json"))]);
    }
    let a: Vec<&str> = args.iter().map(String::as_str).collect();
    let (code, stdout, err) = run(&a);
    assert_eq!(code, 0, "{}: {err}", dir.display());
    let mut m = BTreeMap::new();
    for l in stdout.lines() {
        let mut it = l.split("  ");
        let (sha, path, name) = (it.next().unwrap(), it.next().unwrap(), it.next().unwrap());
        m.insert(name.to_string(), (sha.to_string(), path.to_string()));
    }
    (m, out)
}

#[test]
fn every_vector_rebuilds_to_final_ram() {
    let mut checked = 0;
    let mut blocks = 0;
    for dir in vector_dirs() {
        let man = manifest(&dir);
        let fr = &man["final_ram"];
        if fr.is_null() {
            continue;
        }
        let (got, out) = extract(&dir, false);
        let main = fr["block"].as_str().unwrap();
        assert_eq!(
            got[main].0,
            fr["sha256"].as_str().unwrap(),
            "{} {main}",
            dir.display()
        );
        blocks += 1;
        for b in fr["other_blocks"].as_array().into_iter().flatten() {
            let n = b["block"].as_str().unwrap();
            assert_eq!(
                got[n].0,
                b["sha256"].as_str().unwrap(),
                "{} {n}",
                dir.display()
            );
            blocks += 1;
        }
        std::fs::remove_dir_all(out).unwrap();
        checked += 1;
    }
    assert_eq!(checked, 35, "vectors with final_ram");
    assert!(
        blocks > 35 + 4 * 10,
        "ROM blocks of the microvm vectors: {blocks}"
    );
}

#[test]
fn flat_image_is_the_blocks_concatenated() {
    let dir = vectors().join("qemu-10.0/precopy-file-pattern");
    let (got, out) = extract(&dir, true);
    let man = manifest(&dir);
    let order: Vec<String> = std::fs::read_dir(&out)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_str().unwrap().to_string())
        .collect();
    assert!(order.contains(&"flat.img".to_string()));
    let mut cat = Vec::new();
    for n in [
        "microvm.ram",
        "/rom@etc/acpi/tables",
        "pc.bios",
        "/rom@etc/table-loader",
        "/rom@etc/acpi/rsdp",
    ] {
        cat.extend(std::fs::read(&got[n].1).unwrap());
    }
    let flat = std::fs::read(&got["flat"].1).unwrap();
    assert_eq!(
        flat.len() as u64,
        man["final_ram"]["bytes"].as_u64().unwrap() + 143_360
    );
    assert!(flat == cat);
    std::fs::remove_dir_all(out).unwrap();
}
