//! `qmig diff`: a vector against itself is equal (exit 0); against a copy with one byte of a
//! device payload changed it reports exactly that field, by name, with its offset in both files
//! (exit 1); a changed RAM page is reported by block and page index.

mod cli_util;

use cli_util::*;

#[test]
fn a_vector_equals_itself() {
    for v in [
        "qemu-7.2/precopy-tcp-rp",
        "qemu-10.0/precopy-xbzrle",
        "qemu-7.2/postcopy",
    ] {
        let f = p(&vectors().join(v).join("stream.bin"));
        let mut args = vec!["diff", &f, &f];
        let vd = p(&vectors().join(v).join("vmdesc.json"));
        if vectors().join(v).join("vmdesc.json").is_file() {
            args.extend(["--vmdesc", &vd]);
        }
        let (code, out, err) = run(&args);
        assert_eq!((code, out.as_str()), (0, "no difference\n"), "{v}: {err}");
    }
}

#[test]
fn one_device_byte_is_reported_as_its_field() {
    let dir = vectors().join("qemu-7.2/precopy-tcp-rp");
    let src = dir.join("stream.bin");
    let m = manifest(&dir);
    let timer = m["channels"][0]["records"]
        .as_array()
        .unwrap()
        .iter()
        .find(|r| r["idstr"] == "timer")
        .unwrap()
        .clone();
    // FULL header: 1 + 4 + 1 + "timer" + 4 + 4 = 19 bytes; the first field is cpu_ticks_offset.
    let at = timer["offset"].as_u64().unwrap() as usize + 19;
    let mut b = std::fs::read(&src).unwrap();
    let old = b[at + 3];
    b[at + 3] ^= 0x55;
    let copy = std::env::temp_dir().join(format!("qmig-cli-diff-{}.bin", std::process::id()));
    std::fs::write(&copy, &b).unwrap();
    let (code, out, err) = run(&["diff", &p(&src), &p(&copy)]);
    assert_eq!(code, 1, "{err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 1, "{out}");
    let field = &b[at..at + 8];
    let mut orig = field.to_vec();
    orig[3] = old;
    let hex = |x: &[u8]| x.iter().map(|c| format!("{c:02x}")).collect::<String>();
    assert_eq!(
        lines[0],
        format!(
            "device \"timer\" (0) field cpu_ticks_offset: A offset {at} = {} | B offset {at} = {}",
            hex(&orig),
            hex(field)
        )
    );
    std::fs::remove_file(copy).unwrap();
}

#[test]
fn a_changed_page_is_reported_by_block_and_index() {
    let dir = vectors().join("qemu-7.2/precopy-file-pattern");
    let src = dir.join("stream.bin");
    let m = manifest(&dir);
    // Page records with their offsets, from inspect --pages.
    let (code, out, _) = run(&["inspect", "--json", "--pages", &p(&src)]);
    assert_eq!(code, 0);
    let (_, recs) = parse_json_lines(&out);
    // A page sent once (7.2 re-sends page 0 in its last section).
    let pages: Vec<_> = recs
        .iter()
        .filter(|r| r["type"] == "RAM" && r["flags"] == "PAGE")
        .collect();
    let page = *pages
        .iter()
        .find(|r| pages.iter().filter(|q| q["addr"] == r["addr"]).count() == 1)
        .unwrap();
    let rec_at = page["offset"].as_u64().unwrap() as usize;
    let len = page["length"].as_u64().unwrap() as usize;
    let addr = page["addr"].as_u64().unwrap();
    let mut b = std::fs::read(&src).unwrap();
    b[rec_at + len - 1] ^= 0xff; // last byte of the page data
    let copy = std::env::temp_dir().join(format!("qmig-cli-diff-page-{}.bin", std::process::id()));
    std::fs::write(&copy, &b).unwrap();
    let (code, out, err) = run(&["diff", &p(&src), &p(&copy)]);
    assert_eq!(code, 1, "{err}");
    let block = m["final_ram"]["block"].as_str().unwrap();
    assert!(
        out.contains(&format!(
            "RAM block \"{block}\": sha256 A {} | B ",
            m["final_ram"]["sha256"].as_str().unwrap()
        )),
        "{out}"
    );
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines.len(), 2, "{out}");
    assert!(
        lines[0].ends_with(&format!("1 differing pages: {}", addr / 4096)),
        "{out}"
    );
    // The page record that wrote it, at the same offset in both files.
    assert_eq!(
        lines[1],
        format!(
            "RAM block \"{block}\" page {}: last written A offset {rec_at} | B offset {rec_at}",
            addr / 4096
        )
    );
    std::fs::remove_file(copy).unwrap();
}
