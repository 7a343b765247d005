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
            // What a verifier must reject (a destination may accept an acceptable case).
            cases::Class::Invalid | cases::Class::Acceptable => {
                invalid.insert(c.rule);
            }
        }
    }
    // An invalid case also checks the state rule its violation's place requires (`reaction`:
    // the destination must fail, or pause), which the replay and the decode check enforce.
    let index: serde_json::Value =
        serde_json::from_slice(&qmig_conformance::synth::render()["index.json"]).unwrap();
    for c in index["cases"].as_array().unwrap() {
        if let Some(r) = c["reaction"].as_str() {
            invalid.insert(qmig_protocol::Rule::from_id(r).unwrap().id());
        }
    }
    // A behaviour rule's invalid side: a broken destination or source that must fail its
    // cases (`every_broken_destination_fails_the_cases_it_names`, tests/runner_src_rules.rs).
    for b in synth::broken::all() {
        invalid.insert(b.rule);
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

/// An acceptable case passes whether the destination completes it (qmig-dst as usual) or
/// rejects it: qmig-dst given a VM description without `globalstate` refuses that section
/// (SEC-UNKNOWN-DEVICE) and the case still passes, as "rejected"; the same destination fails a
/// valid case, so the rejection is real.
#[test]
fn an_acceptable_case_passes_completed_or_rejected() {
    let tmp = std::env::temp_dir().join(format!("qmig-acceptable-{}", std::process::id()));
    std::fs::create_dir_all(&tmp).unwrap();
    let desc = tmp.join("no-devices.json");
    std::fs::write(&desc, br#"{"page_size":4096,"devices":[]}"#).unwrap();
    let strict = format!(
        "{{BIN_DIR}}/qmig-dst --qmp unix:{{QMP}} -m {{RAM}} --machine {{MACHINE}} \
         --profile {{PROFILE}} --capabilities {{CAPS}} --vmdesc {}",
        desc.display()
    );
    let run = |dst: &str, filter: &str| {
        runner::run_suite(&Options {
            vectors: vec![dir()],
            dst: vec![dst.to_string()],
            src: vec!["none".into()],
            filter: Some(filter.into()),
            ..Default::default()
        })
        .unwrap()
    };
    for (dst, want) in [
        ("qmig", "1 channel(s) replayed"),
        (strict.as_str(), "acceptable case rejected: status failed"),
    ] {
        let r = run(dst, "replay-dst*/synthetic/acceptable-*");
        assert_eq!(r.len(), 4, "{r:#?}");
        for c in &r {
            assert!(
                matches!(&c.status, Status::Pass(m) if m.starts_with(want)),
                "{}: {:?}",
                c.name,
                c.status
            );
        }
    }
    let r = run(&strict, "replay-dst*/synthetic/valid-sm-pong-precopy-72");
    assert!(matches!(r[0].status, Status::Fail(_)), "{r:#?}");
    let _ = std::fs::remove_dir_all(&tmp);
}

/// Each broken destination (qmig-dst with its return path altered against one behaviour rule)
/// fails every valid case it names, with the return-path check (the page-request defects
/// `bare-first-req` and `no-rerequest`: with a message naming their rule) (needs `qmig-dst`
/// built next to the test binary: `cargo build -p qmig-dst -p qmig-conformance --bins`). The
/// broken sources are run by tests/runner_src_rules.rs.
#[test]
fn every_broken_destination_fails_the_cases_it_names() {
    for b in synth::broken::all()
        .into_iter()
        .filter(|b| b.option == "--dst")
    {
        let r = runner::run_suite(&Options {
            vectors: vec![dir()],
            dst: vec![b.target.clone()],
            src: vec!["none".into()],
            filter: Some(format!("replay-dst[{}]/synthetic/{}", b.target, b.cases)),
            ..Default::default()
        })
        .unwrap();
        assert!(r.len() >= 2, "{}: {} cases", b.target, r.len());
        // The page-request defects are judged as the requests come (fault cases,
        // `replay.faults`): the message names the rule.
        let by_request = matches!(b.rule, "SM-FIRST-REQ-NAMED" | "SM-REREQUEST");
        for c in &r {
            match &c.status {
                Status::Fail(m) => assert!(
                    if by_request {
                        m.contains(&format!(": {}: ", b.rule))
                    } else {
                        m.contains("return path")
                            || m.contains("PONGs")
                            || m.contains("does not decode")
                            || m.contains("final RAM: page")
                    },
                    "{} ({}): {}: {m}",
                    b.target,
                    b.rule,
                    c.name
                ),
                s => panic!("{} ({}): {} did not fail: {s:?}", b.target, b.rule, c.name),
            }
        }
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

/// `spec/rules.md` ends with the traceability table (regenerated by
/// `spec/check/gen_rules_index.py`): one row per rule naming each of its cases (valid and
/// invalid cases whose `rule` it is) or, for a rule under `ELSEWHERE`, its reason.
#[test]
fn spec_traceability_names_every_case() {
    let text =
        std::fs::read_to_string(Path::new(env!("CARGO_MANIFEST_DIR")).join("../spec/rules.md"))
            .unwrap();
    let table = text
        .split("## Conformance traceability")
        .nth(1)
        .expect("spec/rules.md has no traceability section: run spec/check/gen_rules_index.py");
    let row = |id: &str| -> String {
        table
            .lines()
            .find(|l| l.starts_with(&format!("| {id} |")))
            .unwrap_or_else(|| panic!("no traceability row for {id}"))
            .to_string()
    };
    for c in cases::all() {
        assert!(
            row(c.rule).contains(&format!("`{}`", c.name)),
            "spec/rules.md: the row of {} does not name {} (run spec/check/gen_rules_index.py)",
            c.rule,
            c.name
        );
    }
    for (id, why) in cases::ELSEWHERE {
        assert!(
            row(id).contains(&why.replace('|', "\\|")),
            "spec/rules.md: the row of {id} lacks its ELSEWHERE reason (run spec/check/gen_rules_index.py)"
        );
    }
}
