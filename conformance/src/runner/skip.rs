//! Skip lists: one entry per line, `PATTERN REASON...`; `#` starts a comment line; the reason is
//! required. `PATTERN` matches a case name (`replay-dst[qemu]/qemu-7.2/precopy-multifd`), with
//! `*` matching any run of characters.

use anyhow::{bail, Context};
use std::path::Path;

/// One skip entry.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Skip {
    /// Glob over case names.
    pub pattern: String,
    /// Why.
    pub reason: String,
}

/// Parses a skip list.
pub fn parse(text: &str) -> anyhow::Result<Vec<Skip>> {
    let mut out = Vec::new();
    for (i, line) in text.lines().enumerate() {
        let l = line.trim();
        if l.is_empty() || l.starts_with('#') {
            continue;
        }
        let (p, r) = l.split_once(char::is_whitespace).unwrap_or((l, ""));
        if r.trim().is_empty() {
            bail!("skip list line {}: `{p}` has no reason", i + 1);
        }
        out.push(Skip {
            pattern: p.to_string(),
            reason: r.trim().to_string(),
        });
    }
    Ok(out)
}

/// Reads a skip list file.
pub fn load(path: &Path) -> anyhow::Result<Vec<Skip>> {
    let t = std::fs::read_to_string(path).with_context(|| format!("{}", path.display()))?;
    parse(&t).with_context(|| format!("{}", path.display()))
}

/// Glob match with `*` (any run, including empty).
pub fn glob(pattern: &str, name: &str) -> bool {
    let p: Vec<char> = pattern.chars().collect();
    let n: Vec<char> = name.chars().collect();
    let (mut pi, mut ni) = (0, 0);
    let (mut star, mut mark) = (None, 0);
    while ni < n.len() {
        if pi < p.len() && p[pi] != '*' && p[pi] == n[ni] {
            pi += 1;
            ni += 1;
        } else if pi < p.len() && p[pi] == '*' {
            star = Some(pi);
            mark = ni;
            pi += 1;
        } else if let Some(s) = star {
            pi = s + 1;
            mark += 1;
            ni = mark;
        } else {
            return false;
        }
    }
    while pi < p.len() && p[pi] == '*' {
        pi += 1;
    }
    pi == p.len()
}

/// The reason `name` is skipped, if any entry matches.
pub fn reason<'a>(list: &'a [Skip], name: &str) -> Option<&'a str> {
    list.iter()
        .find(|s| glob(&s.pattern, name))
        .map(|s| s.reason.as_str())
}
