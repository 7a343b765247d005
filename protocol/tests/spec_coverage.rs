//! Spec coverage: keeps the written specification (`spec/*.md`), the rule list
//! ([`qmig_protocol::Rule::ALL`]) and the code, tests and vectors that cite the rules in step.
//!
//! Checks, all of which must hold for the test to pass:
//! * every id in `Rule::ALL` is defined in the spec exactly once, as `**[ID]**`;
//! * every id defined in the spec exists in `Rule::ALL`, and every reference `[ID]` in the spec
//!   names an existing id;
//! * every id is cited outside the spec: by library code at its check site (`Rule::Variant` in
//!   non-test code under `protocol/src/`), by a test (`Rule::Variant` or the id string in
//!   `protocol/tests/`, `conformance/tests/`, any workspace crate's `tests/`, or a `#[cfg(test)]`
//!   item of a workspace crate's `src/`), or by a conformance vector (an id string in a text file
//!   under `conformance/vectors/`, e.g. a synthetic vector's `manifest.json`).
//!
//! A test or vector citation counts as a *valid case* when the id is on a line carrying the word
//! `valid` (`// valid: RAM-CONTINUE`), or, in a vector, in a folder named `valid-…`, under a JSON
//! key carrying the word (`"valid_rules": [...]`) or in a JSON object with a value `"valid"`
//! (`{"class": "valid", "rule": "SM-PONG"}`); otherwise it counts as an *invalid case* (the usual
//! `assert_eq!(v.rule, Rule::RamContinue)`, an object with `"class": "invalid"`).
//! The convention is stated in `spec/README.md`. The test prints a coverage table (code, valid
//! case, invalid case, vector, per id) and lists every id that no code, test or vector cites.
//! Two more tests keep the spec's tables in step with the code: the caps table of
//! `spec/limits.md` gives the values of `Limits::DEFAULT`, and the index `spec/rules.md` lists
//! every rule in `Rule::ALL` order with its defining file and `Rule::summary()` (regenerate it
//! with `spec/check/gen_rules_index.py`).

use qmig_protocol::Rule;
use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs;
use std::path::{Path, PathBuf};

/// The workspace root (the parent of the `protocol` crate).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("protocol crate has a parent directory")
        .to_path_buf()
}

/// Whether `c` can be part of a rule id (`CMD-LEN`).
fn id_char(c: char) -> bool {
    c.is_ascii_uppercase() || c.is_ascii_digit() || c == '-'
}

/// Whether `c` can be part of a Rust identifier.
fn ident_char(c: char) -> bool {
    c.is_alphanumeric() || c == '_'
}

/// 1-based line number of byte offset `at` in `text`.
fn line_of(text: &str, at: usize) -> usize {
    text[..at].bytes().filter(|&b| b == b'\n').count() + 1
}

/// The whole line of `text` that contains byte offset `at`.
fn line_text(text: &str, at: usize) -> &str {
    let start = text[..at].rfind('\n').map_or(0, |i| i + 1);
    let end = text[at..].find('\n').map_or(text.len(), |i| at + i);
    &text[start..end]
}

/// Whether `line` carries the marker word `valid` (not `invalid`, not `validate`).
fn has_valid_marker(line: &str) -> bool {
    let lower = line.to_ascii_lowercase();
    let bytes = lower.as_bytes();
    let mut from = 0;
    while let Some(i) = lower[from..].find("valid") {
        let at = from + i;
        let before = if at == 0 { None } else { Some(bytes[at - 1]) };
        let after = bytes.get(at + 5).copied();
        let before_ok = !before.is_some_and(|b| b.is_ascii_alphabetic());
        let after_ok = !after.is_some_and(|b| b.is_ascii_alphabetic());
        if before_ok && after_ok {
            return true;
        }
        from = at + 5;
    }
    false
}

/// Byte offsets of every whole-word occurrence of the rule id `id` in `text`.
fn find_id(text: &str, id: &str) -> Vec<usize> {
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(id) {
        let at = from + i;
        let before_ok = !text[..at].chars().next_back().is_some_and(id_char);
        let after_ok = !text[at + id.len()..].chars().next().is_some_and(id_char);
        if before_ok && after_ok {
            out.push(at);
        }
        from = at + id.len();
    }
    out
}

/// Byte offsets of every `Rule::Variant` (whole identifier) in `text`.
fn find_variant(text: &str, variant: &str) -> Vec<usize> {
    let needle = format!("Rule::{variant}");
    let mut out = Vec::new();
    let mut from = 0;
    while let Some(i) = text[from..].find(&needle) {
        let at = from + i;
        let before_ok = !text[..at].chars().next_back().is_some_and(ident_char);
        let after_ok = !text[at + needle.len()..]
            .chars()
            .next()
            .is_some_and(ident_char);
        if before_ok && after_ok {
            out.push(at);
        }
        from = at + needle.len();
    }
    out
}

/// A copy of Rust source with comments and the contents of string and char literals replaced
/// by spaces (newlines kept), so that brace matching and code searches see only code. Byte
/// offsets are preserved.
fn sanitize_rust(src: &str) -> String {
    let b = src.as_bytes();
    let mut out = b.to_vec();
    let blank = |out: &mut Vec<u8>, from: usize, to: usize| {
        for x in &mut out[from..to] {
            if *x != b'\n' {
                *x = b' ';
            }
        }
    };
    let mut i = 0;
    while i < b.len() {
        let c = b[i];
        let prev_ident = i > 0 && (b[i - 1].is_ascii_alphanumeric() || b[i - 1] == b'_');
        if c == b'/' && b.get(i + 1) == Some(&b'/') {
            let end = src[i..].find('\n').map_or(b.len(), |e| i + e);
            blank(&mut out, i, end);
            i = end;
        } else if c == b'/' && b.get(i + 1) == Some(&b'*') {
            let mut depth = 0usize;
            let mut j = i;
            while j < b.len() {
                if b[j] == b'/' && b.get(j + 1) == Some(&b'*') {
                    depth += 1;
                    j += 2;
                } else if b[j] == b'*' && b.get(j + 1) == Some(&b'/') {
                    depth -= 1;
                    j += 2;
                    if depth == 0 {
                        break;
                    }
                } else {
                    j += 1;
                }
            }
            blank(&mut out, i, j.min(b.len()));
            i = j;
        } else if (c == b'r' || (c == b'b' && b.get(i + 1) == Some(&b'r'))) && !prev_ident {
            // Possibly a raw string: r"..", r#".."#, br#".."#.
            let mut j = if c == b'b' { i + 2 } else { i + 1 };
            let mut hashes = 0;
            while b.get(j) == Some(&b'#') {
                hashes += 1;
                j += 1;
            }
            if b.get(j) == Some(&b'"') {
                let close: String = core::iter::once('"')
                    .chain((0..hashes).map(|_| '#'))
                    .collect();
                let body = j + 1;
                let end = src[body..]
                    .find(&close)
                    .map_or(b.len(), |e| body + e + close.len());
                blank(&mut out, body, end.saturating_sub(close.len()).max(body));
                i = end;
            } else {
                i += 1;
            }
        } else if c == b'"' {
            let mut j = i + 1;
            while j < b.len() && b[j] != b'"' {
                j += if b[j] == b'\\' { 2 } else { 1 };
            }
            blank(&mut out, i + 1, j.min(b.len()));
            i = j + 1;
        } else if c == b'\'' {
            // Char literal ('x', '\n', '\u{..}') or a lifetime ('a).
            if b.get(i + 1) == Some(&b'\\') {
                let end = src[i + 2..].find('\'').map_or(b.len(), |e| i + 2 + e);
                blank(&mut out, i + 1, end);
                i = end + 1;
            } else if let Some(ch) = src[i + 1..].chars().next() {
                let after = i + 1 + ch.len_utf8();
                if b.get(after) == Some(&b'\'') {
                    blank(&mut out, i + 1, after);
                    i = after + 1;
                } else {
                    i += 1;
                }
            } else {
                i += 1;
            }
        } else {
            i += 1;
        }
    }
    // Only ASCII bytes were replaced (by ASCII spaces) inside whole literals and comments;
    // a multi-byte character is always blanked whole, so the result stays UTF-8.
    String::from_utf8(out).unwrap_or_else(|e| String::from_utf8_lossy(e.as_bytes()).into_owned())
}

/// Byte ranges of `#[cfg(test)]` items (and the whole file for `#![cfg(test)]`) in Rust
/// source, found on the sanitized text.
fn test_ranges(clean: &str) -> Vec<(usize, usize)> {
    let b = clean.as_bytes();
    let mut ranges = Vec::new();
    let mut from = 0;
    while let Some(i) = clean[from..].find("#") {
        let at = from + i;
        from = at + 1;
        let inner = b.get(at + 1) == Some(&b'!');
        let open = if inner { at + 2 } else { at + 1 };
        if b.get(open) != Some(&b'[') {
            continue;
        }
        let Some(close_rel) = clean[open..].find(']') else {
            break;
        };
        let attr: String = clean[open + 1..open + close_rel]
            .chars()
            .filter(|c| !c.is_whitespace())
            .collect();
        if !attr.starts_with("cfg(") || attr.contains("not(test") {
            continue;
        }
        let is_test = attr[4..]
            .split(|c: char| !ident_char(c))
            .any(|tok| tok == "test");
        if !is_test {
            continue;
        }
        if inner {
            return vec![(0, clean.len())];
        }
        // The item ends at the first `;` before any `{`, or at the `}` matching the first `{`.
        let mut j = open + close_rel + 1;
        let mut end = clean.len();
        while j < b.len() {
            if b[j] == b';' {
                end = j + 1;
                break;
            }
            if b[j] == b'{' {
                let mut depth = 0usize;
                while j < b.len() {
                    match b[j] {
                        b'{' => depth += 1,
                        b'}' => {
                            depth -= 1;
                            if depth == 0 {
                                break;
                            }
                        }
                        _ => {}
                    }
                    j += 1;
                }
                end = (j + 1).min(clean.len());
                break;
            }
            j += 1;
        }
        ranges.push((at, end));
        from = end.max(at + 1);
    }
    ranges
}

/// Every file under `dir` (recursively) whose name satisfies `keep`.
fn files_under(dir: &Path, keep: &dyn Fn(&Path) -> bool, out: &mut Vec<PathBuf>) {
    let Ok(entries) = fs::read_dir(dir) else {
        return;
    };
    let mut entries: Vec<_> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    entries.sort();
    for p in entries {
        let name = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
        if p.is_dir() {
            if name != "target" && !name.starts_with('.') {
                files_under(&p, keep, out);
            }
        } else if keep(&p) {
            out.push(p);
        }
    }
}

/// Where a citation was found.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Kind {
    /// Library code at a check site.
    Code,
    /// A test showing input that conforms to the rule.
    ValidCase,
    /// A test showing input that breaks the rule.
    InvalidCase,
    /// A conformance vector (counted as valid or invalid case as well).
    Vector,
}

/// One citation of a rule outside the spec.
#[derive(Clone, Debug)]
struct Citation {
    kind: Kind,
    place: String,
}

/// All citations, per rule.
type Citations = BTreeMap<Rule, Vec<Citation>>;

fn rel(path: &Path) -> String {
    path.strip_prefix(workspace())
        .unwrap_or(path)
        .display()
        .to_string()
}

fn variant(rule: Rule) -> String {
    format!("{rule:?}")
}

/// Records test citations (`Rule::Variant` or the id string) in `text`.
fn cite_tests(text: &str, file: &str, base: usize, cites: &mut Citations, full: &str) {
    for &rule in Rule::ALL {
        let mut hits = find_variant(text, &variant(rule));
        hits.extend(find_id(text, rule.id()));
        for at in hits {
            let line = line_text(full, base + at);
            let kind = if has_valid_marker(line) {
                Kind::ValidCase
            } else {
                Kind::InvalidCase
            };
            cites.entry(rule).or_default().push(Citation {
                kind,
                place: format!("{file}:{}", line_of(full, base + at)),
            });
        }
    }
}

/// Scans a Rust source file: code citations outside `#[cfg(test)]` items (only if
/// `code_counts`), test citations inside them (or everywhere if `all_test`).
fn scan_rust(path: &Path, code_counts: bool, all_test: bool, cites: &mut Citations) {
    let Ok(src) = fs::read_to_string(path) else {
        return;
    };
    let file = rel(path);
    let clean = sanitize_rust(&src);
    let tests = if all_test {
        vec![(0, src.len())]
    } else {
        test_ranges(&clean)
    };
    for &(s, e) in &tests {
        cite_tests(&src[s..e], &file, s, cites, &src);
    }
    if code_counts {
        for &rule in Rule::ALL {
            for at in find_variant(&clean, &variant(rule)) {
                if tests.iter().any(|&(s, e)| at >= s && at < e) {
                    continue;
                }
                cites.entry(rule).or_default().push(Citation {
                    kind: Kind::Code,
                    place: format!("{file}:{}", line_of(&src, at)),
                });
            }
        }
    }
}

/// Walks a JSON value, recording ids found in strings; `valid` is whether an enclosing key
/// carries the word `valid`.
fn walk_json(v: &serde_json::Value, valid: bool, file: &str, cites: &mut Citations) {
    match v {
        serde_json::Value::String(s) => {
            for &rule in Rule::ALL {
                if !find_id(s, rule.id()).is_empty() {
                    let kind = if valid {
                        Kind::ValidCase
                    } else {
                        Kind::InvalidCase
                    };
                    for k in [Kind::Vector, kind] {
                        cites.entry(rule).or_default().push(Citation {
                            kind: k,
                            place: file.to_string(),
                        });
                    }
                }
            }
        }
        serde_json::Value::Array(a) => a.iter().for_each(|x| walk_json(x, valid, file, cites)),
        serde_json::Value::Object(o) => {
            // An object that says `"class": "valid"` (any key) is a valid case, one that says
            // "invalid" an invalid case; otherwise it inherits from its parent.
            let said = |word: &str| {
                o.values()
                    .any(|x| x.as_str().is_some_and(|t| t.eq_ignore_ascii_case(word)))
            };
            let valid = if said("invalid") {
                false
            } else {
                valid || said("valid")
            };
            for (k, x) in o {
                walk_json(
                    x,
                    valid || has_valid_marker(&k.replace('_', " ")),
                    file,
                    cites,
                );
                // A rule id used as a key ({"CMD-LEN": ...}) also cites it.
                walk_json(&serde_json::Value::String(k.clone()), valid, file, cites);
            }
        }
        _ => {}
    }
}

/// Scans a vector file (JSON structurally, other text files line by line).
fn scan_vector(path: &Path, cites: &mut Citations) {
    let Ok(text) = fs::read_to_string(path) else {
        return;
    };
    let file = rel(path);
    // A vector folder named `valid-…` holds a valid case, `invalid-…` an invalid one.
    let folder_valid = path
        .parent()
        .and_then(|d| d.file_name())
        .and_then(|n| n.to_str())
        .is_some_and(|n| n.starts_with("valid-") || n.starts_with("valid_"));
    if path.extension().is_some_and(|e| e == "json") {
        if let Ok(v) = serde_json::from_str::<serde_json::Value>(&text) {
            walk_json(&v, folder_valid, &file, cites);
            return;
        }
    }
    for &rule in Rule::ALL {
        for at in find_id(&text, rule.id()) {
            let kind = if folder_valid || has_valid_marker(line_text(&text, at)) {
                Kind::ValidCase
            } else {
                Kind::InvalidCase
            };
            let place = format!("{file}:{}", line_of(&text, at));
            for k in [Kind::Vector, kind] {
                cites.entry(rule).or_default().push(Citation {
                    kind: k,
                    place: place.clone(),
                });
            }
        }
    }
}

/// Collects every citation in the workspace.
fn citations() -> Citations {
    let ws = workspace();
    let mut cites = Citations::new();
    let is_rs = |p: &Path| p.extension().is_some_and(|e| e == "rs");
    let me = Path::new(file!()).file_name().map(|n| n.to_owned());

    // Library code of the protocol crate: check sites, plus its #[cfg(test)] items.
    let mut files = Vec::new();
    files_under(&ws.join("protocol/src"), &is_rs, &mut files);
    for f in &files {
        if f.file_name().is_some_and(|n| n == "rule.rs")
            && f.parent() == Some(&ws.join("protocol/src"))
        {
            continue; // the list itself
        }
        let in_tests_dir = f.components().any(|c| c.as_os_str() == "tests");
        let is_tests_file = f.file_name().is_some_and(|n| n == "tests.rs");
        scan_rust(f, true, in_tests_dir || is_tests_file, &mut cites);
    }

    // Other crates' sources: only their #[cfg(test)] items count (as tests).
    for krate in [
        "conformance/src",
        "reference-src/src",
        "reference-src/host/src",
        "reference-dst/src",
        "fuzz",
    ] {
        let mut files = Vec::new();
        files_under(&ws.join(krate), &is_rs, &mut files);
        for f in &files {
            let all_test = krate == "fuzz";
            scan_rust(f, false, all_test, &mut cites);
        }
    }

    // Integration tests of every crate.
    for dir in [
        "protocol/tests",
        "conformance/tests",
        "reference-src/tests",
        "reference-src/host/tests",
        "reference-dst/tests",
    ] {
        let mut files = Vec::new();
        files_under(&ws.join(dir), &is_rs, &mut files);
        for f in &files {
            if dir == "protocol/tests"
                && f.parent() == Some(&ws.join(dir))
                && f.file_name() == me.as_deref()
            {
                continue;
            }
            scan_rust(f, false, true, &mut cites);
        }
    }

    // Conformance vectors: any text file (not the captured .bin streams, not the READMEs).
    let mut files = Vec::new();
    let text_file = |p: &Path| {
        let ext = p.extension().and_then(|e| e.to_str()).unwrap_or("");
        matches!(
            ext,
            "json" | "txt" | "hex" | "toml" | "yaml" | "yml" | "expect"
        )
    };
    files_under(&ws.join("conformance/vectors"), &text_file, &mut files);
    for f in &files {
        scan_vector(f, &mut cites);
    }
    cites
}

/// A definition or reference of an id in the spec.
struct SpecUse {
    id: String,
    place: String,
    defining: bool,
}

/// Every `**[ID]**` (definition) and `[ID]` (reference) in `spec/*.md`.
fn spec_uses() -> Vec<SpecUse> {
    let dir = workspace().join("spec");
    let mut files: Vec<PathBuf> = fs::read_dir(&dir)
        .unwrap_or_else(|e| panic!("cannot read {}: {e}", dir.display()))
        .filter_map(Result::ok)
        .map(|e| e.path())
        .filter(|p| p.extension().is_some_and(|e| e == "md"))
        .collect();
    files.sort();
    assert!(!files.is_empty(), "no spec/*.md files found");
    let mut uses = Vec::new();
    for f in &files {
        let text =
            fs::read_to_string(f).unwrap_or_else(|e| panic!("cannot read {}: {e}", f.display()));
        let file = rel(f);
        let mut from = 0;
        while let Some(i) = text[from..].find('[') {
            let at = from + i;
            from = at + 1;
            let body: String = text[at + 1..].chars().take_while(|&c| id_char(c)).collect();
            let close = at + 1 + body.len();
            let looks_like_id = body.contains('-')
                && body.starts_with(|c: char| c.is_ascii_uppercase())
                && !body.ends_with('-')
                && text[close..].starts_with(']');
            if !looks_like_id || text[close + 1..].starts_with('(') {
                continue; // not an id, or a Markdown link
            }
            let defining = text[..at].ends_with("**") && text[close + 1..].starts_with("**");
            uses.push(SpecUse {
                id: body,
                place: format!("{file}:{}", line_of(&text, at)),
                defining,
            });
        }
    }
    uses
}

#[test]
fn every_rule_is_specified_once_and_cited() {
    let uses = spec_uses();
    let known: BTreeSet<&str> = Rule::ALL.iter().map(|r| r.id()).collect();
    let mut defs: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    let mut problems = Vec::new();
    for u in &uses {
        if !known.contains(u.id.as_str()) {
            let what = if u.defining { "defines" } else { "references" };
            problems.push(format!("{}: {what} unknown rule id [{}]", u.place, u.id));
        } else if u.defining {
            defs.entry(u.id.as_str()).or_default().push(&u.place);
        }
    }
    for &rule in Rule::ALL {
        match defs.get(rule.id()).map(Vec::len) {
            None => problems.push(format!(
                "[{}] is not defined in spec/ (expected **[{}]**)",
                rule.id(),
                rule.id()
            )),
            Some(1) => {}
            Some(_) => problems.push(format!(
                "[{}] is defined more than once: {}",
                rule.id(),
                defs[rule.id()].join(", ")
            )),
        }
    }

    let cites = citations();
    let mut table = String::new();
    let _ = writeln!(table, "\nspec coverage: {} rules\n", Rule::ALL.len());
    let _ = writeln!(
        table,
        "{:<24} {:<20} {:>5} {:>6} {:>8} {:>7}  first citation",
        "rule", "defined in", "code", "valid", "invalid", "vector"
    );
    let mut uncited = Vec::new();
    let (mut n_code, mut n_valid, mut n_invalid, mut n_vector) = (0, 0, 0, 0);
    for &rule in Rule::ALL {
        let list = cites.get(&rule).map(Vec::as_slice).unwrap_or(&[]);
        let count = |k: Kind| list.iter().filter(|c| c.kind == k).count();
        let (code, valid, invalid, vector) = (
            count(Kind::Code),
            count(Kind::ValidCase),
            count(Kind::InvalidCase),
            count(Kind::Vector),
        );
        n_code += usize::from(code > 0);
        n_valid += usize::from(valid > 0);
        n_invalid += usize::from(invalid > 0);
        n_vector += usize::from(vector > 0);
        let defined = defs
            .get(rule.id())
            .and_then(|v| v.first())
            .map(|p| {
                p.split(':')
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("spec/")
                    .to_string()
            })
            .unwrap_or_else(|| "UNDEFINED".into());
        let first = list
            .iter()
            .min_by_key(|c| c.kind)
            .map_or("UNCITED".to_string(), |c| c.place.clone());
        let mark = |n: usize| if n > 0 { n.to_string() } else { "-".into() };
        let _ = writeln!(
            table,
            "{:<24} {:<20} {:>5} {:>6} {:>8} {:>7}  {}",
            rule.id(),
            defined,
            mark(code),
            mark(valid),
            mark(invalid),
            mark(vector),
            first
        );
        if list.is_empty() {
            uncited.push(rule.id());
        }
    }
    let total = Rule::ALL.len();
    let _ = writeln!(
        table,
        "\nrules with code: {n_code}/{total}; with a valid case: {n_valid}/{total}; \
         with an invalid case: {n_invalid}/{total}; in a vector: {n_vector}/{total}; \
         cited anywhere: {}/{total}",
        total - uncited.len()
    );
    if uncited.is_empty() {
        let _ = writeln!(table, "uncited ids: none");
    } else {
        let _ = writeln!(
            table,
            "\nUNCITED ids ({}): no code, test or vector names them:",
            uncited.len()
        );
        for chunk in uncited.chunks(6) {
            let _ = writeln!(table, "  {}", chunk.join(" "));
        }
        problems.push(format!(
            "{} rule ids are cited by no code, test or vector (listed above)",
            uncited.len()
        ));
    }
    println!("{table}");
    assert!(
        problems.is_empty(),
        "spec coverage problems (table above):\n  {}",
        problems.join("\n  ")
    );
}

#[test]
fn scanner_separates_test_items_from_code() {
    let src = "fn a() { let r = Rule::CmdLen; let s = \"}\"; }\n\
               // Rule::RpLen in a comment\n\
               #[cfg(test)]\nmod tests { #[test] fn t() { let c = '}'; check(Rule::RpType); } }\n\
               fn b() { Rule::RamEos; }\n";
    let clean = sanitize_rust(src);
    assert_eq!(clean.len(), src.len());
    assert!(!clean.contains("RpLen"), "comments are blanked");
    let ranges = test_ranges(&clean);
    assert_eq!(ranges.len(), 1);
    let (s, e) = ranges[0];
    assert!(
        src[s..e].contains("RpType")
            && !src[s..e].contains("RamEos")
            && !src[s..e].contains("CmdLen")
    );
    assert_eq!(find_variant(&clean, "CmdLen").len(), 1);
    assert!(find_variant("Rule::RamFlagsX", "RamFlags").is_empty());
    assert_eq!(
        find_id("x SEC-FOOTER-ID SEC-FOOTER y", "SEC-FOOTER").len(),
        1
    );
    assert!(has_valid_marker("// valid: RAM-CONTINUE"));
    let mut c = Citations::new();
    let v: serde_json::Value = serde_json::from_str(
        r#"{"cases": [{"class": "valid", "rule": "SM-PONG"}, {"class": "invalid", "rule": "CMD-LEN"}],
            "valid_rules": ["RAM-EOS"]}"#,
    )
    .expect("json");
    walk_json(&v, false, "x.json", &mut c);
    let kinds = |r: Rule| {
        c.get(&r)
            .map(|l| l.iter().map(|x| x.kind).collect::<Vec<_>>())
    };
    assert_eq!(
        kinds(Rule::SmPong),
        Some(vec![Kind::Vector, Kind::ValidCase])
    );
    assert_eq!(
        kinds(Rule::CmdLen),
        Some(vec![Kind::Vector, Kind::InvalidCase])
    );
    assert_eq!(
        kinds(Rule::RamEos),
        Some(vec![Kind::Vector, Kind::ValidCase])
    );
    assert!(!has_valid_marker(
        "assert!(matches!(e, WireError::Invalid(_))); // validates"
    ));
}

/// Parses a size as written in the spec's limits table: `1024`, `16 MiB`, `1 TiB`.
fn parse_size(text: &str) -> Option<u64> {
    let mut parts = text.split_whitespace();
    let n: u64 = parts.next()?.parse().ok()?;
    let shift = match parts.next() {
        None => 0,
        Some("KiB") => 10,
        Some("MiB") => 20,
        Some("GiB") => 30,
        Some("TiB") => 40,
        Some(_) => return None,
    };
    n.checked_shl(shift)
}

#[test]
fn limits_table_matches_limits_default() {
    use qmig_protocol::limits::Limits;
    let d = Limits::DEFAULT;
    let expected: [(&str, u64); 10] = [
        ("max_packaged", d.max_packaged.into()),
        ("max_vmdesc", d.max_vmdesc.into()),
        ("max_device_payload", d.max_device_payload.into()),
        ("max_blocks", d.max_blocks.into()),
        ("max_capabilities", d.max_capabilities.into()),
        ("max_machine_name", d.max_machine_name.into()),
        ("max_rp_len", d.max_rp_len.into()),
        ("max_block_bytes", d.max_block_bytes),
        ("max_vmdesc_depth", d.max_vmdesc_depth.into()),
        ("max_sections", d.max_sections.into()),
    ];
    let text = fs::read_to_string(workspace().join("spec/limits.md")).expect("spec/limits.md");
    for (name, value) in expected {
        let row = text
            .lines()
            .find(|l| l.starts_with(&format!("| `{name}` |")))
            .unwrap_or_else(|| panic!("spec/limits.md has no row for `{name}`"));
        let cell = row.split('|').nth(2).map(str::trim).unwrap_or("");
        assert_eq!(
            parse_size(cell),
            Some(value),
            "spec/limits.md gives `{name}` as {cell:?}, Limits::DEFAULT has {value}"
        );
    }
}

#[test]
fn rule_index_lists_every_rule_in_order() {
    let text = fs::read_to_string(workspace().join("spec/rules.md")).expect("spec/rules.md");
    let defined: BTreeMap<String, String> = spec_uses()
        .into_iter()
        .filter(|u| u.defining)
        .map(|u| {
            (
                u.id,
                u.place
                    .split(':')
                    .next()
                    .unwrap_or("")
                    .trim_start_matches("spec/")
                    .to_string(),
            )
        })
        .collect();
    let rows: Vec<Vec<String>> = text
        .lines()
        .filter(|l| l.starts_with("| ["))
        .map(|l| {
            l.replace("\\|", "\u{1}")
                .split('|')
                .map(|c| c.trim().replace('\u{1}', "|"))
                .filter(|c| !c.is_empty())
                .collect()
        })
        .collect();
    assert_eq!(
        rows.len(),
        Rule::ALL.len(),
        "spec/rules.md must have one row per rule"
    );
    for (row, rule) in rows.iter().zip(Rule::ALL) {
        assert_eq!(
            row[0],
            format!("[{}]", rule.id()),
            "spec/rules.md is out of order or stale"
        );
        let file = defined.get(rule.id()).cloned().unwrap_or_default();
        assert_eq!(
            row[1],
            format!("[{file}]({file})"),
            "spec/rules.md: wrong file for {}",
            rule.id()
        );
        assert_eq!(
            row[2],
            rule.summary(),
            "spec/rules.md: summary of {} differs from Rule::summary()",
            rule.id()
        );
    }
}
