//! `qmig inspect --json` output validated against `conformance/docs/inspect.schema.json`, with a
//! small JSON Schema evaluator covering the keywords that schema uses (`type`, `const`, `enum`,
//! `required`, `properties`, `additionalProperties`, `items`, `minimum`, `oneOf`, `allOf`,
//! `if`/`then`, local `$ref`).

mod cli_util;

use cli_util::*;
use serde_json::Value;

fn resolve<'a>(root: &'a Value, r: &str) -> &'a Value {
    let path = r.strip_prefix("#/").expect("local $ref");
    path.split('/').fold(root, |v, k| &v[k])
}

fn type_ok(t: &str, v: &Value) -> bool {
    match t {
        "object" => v.is_object(),
        "array" => v.is_array(),
        "string" => v.is_string(),
        "integer" => v.is_i64() || v.is_u64(),
        "number" => v.is_number(),
        "boolean" => v.is_boolean(),
        "null" => v.is_null(),
        _ => panic!("unknown type {t}"),
    }
}

/// Errors of `v` against schema `s` (empty: valid).
fn check(root: &Value, s: &Value, v: &Value, at: &str, errs: &mut Vec<String>) {
    if let Some(r) = s.get("$ref").and_then(Value::as_str) {
        check(root, resolve(root, r), v, at, errs);
    }
    if let Some(t) = s.get("type").and_then(Value::as_str) {
        if !type_ok(t, v) {
            errs.push(format!("{at}: not {t}: {v}"));
            return;
        }
    }
    if let Some(c) = s.get("const") {
        if c != v {
            errs.push(format!("{at}: {v} != const {c}"));
        }
    }
    if let Some(e) = s.get("enum").and_then(Value::as_array) {
        if !e.contains(v) {
            errs.push(format!("{at}: {v} not in enum"));
        }
    }
    if let Some(m) = s.get("minimum").and_then(Value::as_f64) {
        if v.as_f64().is_some_and(|x| x < m) {
            errs.push(format!("{at}: {v} < {m}"));
        }
    }
    if let Some(o) = v.as_object() {
        for k in s
            .get("required")
            .and_then(Value::as_array)
            .into_iter()
            .flatten()
        {
            if !o.contains_key(k.as_str().unwrap()) {
                errs.push(format!("{at}: missing {k}"));
            }
        }
        let props = s.get("properties").and_then(Value::as_object);
        for (k, x) in o {
            match props.and_then(|p| p.get(k)) {
                Some(ps) => check(root, ps, x, &format!("{at}.{k}"), errs),
                None => match s.get("additionalProperties") {
                    Some(Value::Bool(false)) => errs.push(format!("{at}: unexpected key {k}")),
                    Some(ap @ Value::Object(_)) => check(root, ap, x, &format!("{at}.{k}"), errs),
                    _ => {}
                },
            }
        }
    }
    if let (Some(items), Some(a)) = (s.get("items"), v.as_array()) {
        for (i, x) in a.iter().enumerate() {
            check(root, items, x, &format!("{at}[{i}]"), errs);
        }
    }
    if let Some(all) = s.get("allOf").and_then(Value::as_array) {
        for sub in all {
            check(root, sub, v, at, errs);
        }
    }
    if let Some(one) = s.get("oneOf").and_then(Value::as_array) {
        let ok = one
            .iter()
            .filter(|sub| {
                let mut e = Vec::new();
                check(root, sub, v, at, &mut e);
                e.is_empty()
            })
            .count();
        if ok != 1 {
            errs.push(format!("{at}: matches {ok} of oneOf"));
        }
    }
    if let (Some(i), Some(t)) = (s.get("if"), s.get("then")) {
        let mut e = Vec::new();
        check(root, i, v, at, &mut e);
        if e.is_empty() {
            check(root, t, v, at, errs);
        }
    }
}

fn schema() -> Value {
    let path = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("docs/inspect.schema.json");
    serde_json::from_slice(&std::fs::read(path).expect("schema file")).expect("schema JSON")
}

#[test]
fn json_output_of_every_vector_matches_the_schema() {
    let root = schema();
    let mut lines = 0;
    let mut types = std::collections::BTreeSet::new();
    for dir in vector_dirs() {
        let m = manifest(&dir);
        for ch in m["channels"].as_array().unwrap() {
            let mut args = inspect_args(&dir, ch);
            if dir.ends_with("precopy-file-zero") || dir.ends_with("precopy-xbzrle") {
                args.push("--pages".into());
            }
            let args: Vec<&str> = args.iter().map(String::as_str).collect();
            let (code, out, err) = run(&args);
            assert_eq!(code, 0, "{err}");
            for (i, l) in out.lines().enumerate() {
                let v: Value = serde_json::from_str(l).unwrap();
                let mut errs = Vec::new();
                check(&root, &root, &v, "$", &mut errs);
                assert!(errs.is_empty(), "{} line {i}: {errs:?}\n{l}", dir.display());
                if i == 0 {
                    assert_eq!(v["format"], "qmig-inspect/1");
                } else {
                    types.insert(v["type"].as_str().unwrap().to_string());
                }
                lines += 1;
            }
        }
    }
    assert!(lines > 1000, "{lines}");
    for t in [
        "HEADER",
        "CONFIGURATION",
        "SECTION_START",
        "SECTION_FULL",
        "COMMAND",
        "EOF",
        "VMDESCRIPTION",
        "RAM",
        "TRUNCATED",
        "MIG_RP_MSG_RECV_BITMAP",
        "MIG_RP_MSG_REQ_PAGES_ID",
        "MULTIFD_INIT",
        "MULTIFD_PACKET",
    ] {
        assert!(types.contains(t), "no {t} record validated");
    }
}

#[test]
fn the_evaluator_rejects_what_the_schema_forbids() {
    let root = schema();
    let bad = [
        r#"{"format":"qmig-inspect/2","file":"-","channel":"main","profile":"10","profile_source":"default","vmdesc":"none"}"#,
        r#"{"channel":"main","offset":0,"type":"HEADER","length":8}"#,
        r#"{"channel":"main","offset":-1,"type":"EOF","length":1}"#,
        r#"{"channel":"main","offset":0,"type":"EOF","length":1,"surprise":1}"#,
        r#"{"channel":"main","offset":9,"type":"TRUNCATED","length":0,"rule":"STREAM-TRUNCATED"}"#,
    ];
    for b in bad {
        let mut errs = Vec::new();
        check(
            &root,
            &root,
            &serde_json::from_str(b).unwrap(),
            "$",
            &mut errs,
        );
        assert!(!errs.is_empty(), "accepted: {b}");
    }
}
