//! The committed synthetic vectors (`conformance/vectors/synthetic/`) are exactly what the
//! generator produces; every rule id has a valid and an invalid case or a documented place
//! where it is checked instead; and every synthetic case passes its decode check (valid ones
//! complete with the expected return path and RAM, invalid ones fail with the expected rule at
//! the expected offset).

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};

use qmig_conformance::runner::{self, report::Status, Options};
use qmig_conformance::synth::{self, cases};

fn dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("vectors/synthetic")
}

fn files_under(root: &Path, d: &Path, out: &mut BTreeSet<String>) {
    for e in std::fs::read_dir(d).unwrap() {
        let p = e.unwrap().path();
        if p.is_dir() {
            files_under(root, &p, out);
        } else {
            out.insert(p.strip_prefix(root).unwrap().to_string_lossy().into_owned());
        }
    }
}

#[test]
fn committed_vectors_are_up_to_date() {
    let want = synth::render();
    let mut have = BTreeSet::new();
    files_under(&dir(), &dir(), &mut have);
    let want_names: BTreeSet<String> = want.keys().cloned().collect();
    assert_eq!(
        have, want_names,
        "file set differs: run `qmig conformance --generate conformance/vectors/synthetic`"
    );
    for (rel, bytes) in &want {
        let got = std::fs::read(dir().join(rel)).unwrap();
        assert!(
            got == *bytes,
            "{rel} is stale: run `qmig conformance --generate conformance/vectors/synthetic`"
        );
    }
}

#[test]
fn every_rule_has_a_valid_and_an_invalid_case_or_a_stated_check() {
    let all = cases::all();
    let mut valid = BTreeSet::new();
    let mut invalid = BTreeSet::new();
    for c in &all {
        match c.class {
            cases::Class::Valid => {
                valid.insert(c.rule);
                valid.extend(c.exercises.iter().copied());
            }
            cases::Class::Invalid => {
                invalid.insert(c.rule);
            }
        }
    }
    let elsewhere: BTreeSet<&str> = cases::ELSEWHERE.iter().map(|(r, _)| *r).collect();
    let mut missing = Vec::new();
    for id in qmig_protocol::rule::Rule::ALL.iter().map(|r| r.id()) {
        if elsewhere.contains(id) {
            continue;
        }
        if !valid.contains(id) || !invalid.contains(id) {
            missing.push(format!(
                "{id} (valid: {}, invalid: {})",
                valid.contains(id),
                invalid.contains(id)
            ));
        }
    }
    assert!(missing.is_empty(), "rules without cases: {missing:?}");
    for (id, _) in cases::ELSEWHERE {
        assert!(
            qmig_protocol::Rule::from_id(id).is_some(),
            "ELSEWHERE names unknown rule {id}"
        );
    }
}

#[test]
fn every_synthetic_case_passes_its_decode_check() {
    let opts = Options {
        vectors: vec![dir()],
        ..Default::default()
    };
    let results = runner::run_suite(&opts).unwrap();
    assert_eq!(results.len(), cases::all().len());
    let failed: Vec<String> = results
        .iter()
        .filter_map(|r| match &r.status {
            Status::Fail(m) => Some(format!("{}: {m}", r.name)),
            _ => None,
        })
        .collect();
    assert!(failed.is_empty(), "{failed:#?}");
    // Invalid cases name their expected rule and offset in the pass message.
    let r = results
        .iter()
        .find(|r| r.name == "decode/synthetic/invalid-ram-memsize-sum-precopy-72")
        .unwrap();
    assert_eq!(
        r.status,
        Status::Pass("rejected as expected: RAM-MEMSIZE-SUM at offset 60 (value 1048576)".into())
    );
}
