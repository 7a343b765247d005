//! Case results and their three renderings: the text lines on stdout (ending with
//! `N passed, M failed[, K skipped]`), JUnit XML and JSON.

use std::fmt::Write as _;
use std::time::Duration;

use serde_json::json;

/// How a case ended.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Status {
    /// Passed, with a detail line.
    Pass(String),
    /// Failed, with the reason.
    Fail(String),
    /// Skipped, with the reason (skip list, unsupported target, missing QEMU).
    Skip(String),
}

/// One case of a run.
#[derive(Clone, Debug)]
pub struct CaseResult {
    /// `<check>/<vector id>` or a matrix cell name.
    pub name: String,
    /// Outcome.
    pub status: Status,
    /// Wall time.
    pub time: Duration,
}

impl CaseResult {
    /// Whether the case failed.
    pub fn failed(&self) -> bool {
        matches!(self.status, Status::Fail(_))
    }
}

/// Counts: passed, failed, skipped.
pub fn counts(results: &[CaseResult]) -> (usize, usize, usize) {
    let mut c = (0, 0, 0);
    for r in results {
        match r.status {
            Status::Pass(_) => c.0 += 1,
            Status::Fail(_) => c.1 += 1,
            Status::Skip(_) => c.2 += 1,
        }
    }
    c
}

/// The last line: `N passed, M failed` plus `, K skipped` when some were skipped.
pub fn summary(results: &[CaseResult]) -> String {
    let (p, f, s) = counts(results);
    if s > 0 {
        format!("{p} passed, {f} failed, {s} skipped")
    } else {
        format!("{p} passed, {f} failed")
    }
}

/// One text line per case.
pub fn line(r: &CaseResult) -> String {
    let (tag, msg) = match &r.status {
        Status::Pass(m) => ("PASS", m),
        Status::Fail(m) => ("FAIL", m),
        Status::Skip(m) => ("SKIP", m),
    };
    format!("{tag} {} ({:.2}s): {msg}", r.name, r.time.as_secs_f64())
}

fn xml_escape(s: &str) -> String {
    s.chars()
        .map(|c| match c {
            '&' => "&amp;".to_string(),
            '<' => "&lt;".to_string(),
            '>' => "&gt;".to_string(),
            '"' => "&quot;".to_string(),
            c if (c as u32) < 0x20 && c != '\n' && c != '\t' => format!("&#{};", c as u32),
            c => c.to_string(),
        })
        .collect()
}

/// JUnit XML of a run named `suite`.
pub fn junit(suite: &str, results: &[CaseResult]) -> String {
    let (_, f, s) = counts(results);
    let total: f64 = results.iter().map(|r| r.time.as_secs_f64()).sum();
    let mut x = String::from("<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n");
    let _ = writeln!(
        x,
        "<testsuite name=\"{}\" tests=\"{}\" failures=\"{f}\" skipped=\"{s}\" time=\"{total:.3}\">",
        xml_escape(suite),
        results.len()
    );
    for r in results {
        let (class, name) = r.name.split_once('/').unwrap_or((suite, &r.name));
        let _ = write!(
            x,
            "  <testcase classname=\"{}\" name=\"{}\" time=\"{:.3}\"",
            xml_escape(class),
            xml_escape(name),
            r.time.as_secs_f64()
        );
        match &r.status {
            Status::Pass(m) => {
                let _ = writeln!(x, "><system-out>{}</system-out></testcase>", xml_escape(m));
            }
            Status::Fail(m) => {
                let _ = writeln!(x, "><failure message=\"{}\"/></testcase>", xml_escape(m));
            }
            Status::Skip(m) => {
                let _ = writeln!(x, "><skipped message=\"{}\"/></testcase>", xml_escape(m));
            }
        }
    }
    x.push_str("</testsuite>\n");
    x
}

/// JSON of a run: `{"suite", "passed", "failed", "skipped", "cases": [{name, status, message, seconds}]}`.
pub fn json(suite: &str, results: &[CaseResult]) -> serde_json::Value {
    let (p, f, s) = counts(results);
    json!({
        "suite": suite,
        "passed": p, "failed": f, "skipped": s,
        "cases": results.iter().map(|r| {
            let (st, m) = match &r.status {
                Status::Pass(m) => ("pass", m), Status::Fail(m) => ("fail", m), Status::Skip(m) => ("skip", m),
            };
            json!({"name": r.name, "status": st, "message": m, "seconds": r.time.as_secs_f64()})
        }).collect::<Vec<_>>(),
    })
}
