//! Hostile peers for the reference binaries: the test side of `conformance/tests/hostile.rs`.
//!
//! This module owns what those tests need and nothing else: [`DstProcess`] (a `qmig-dst` child
//! with its QMP client, killed on drop), [`streams`] (a valid precopy stream for a small `none`
//! machine and each class of invalid stream, with the rule and offset a correct destination
//! reports), and [`parse_error_desc`] (the rule id and offset out of `query-migrate`'s
//! `error-desc`, which the reference binaries write as `offset N: RULE-ID: ...`).

pub mod process;
pub mod streams;

pub use process::{DstProcess, SrcProcess};

/// The offset and rule id named by an `error-desc` of the form `offset N: RULE-ID: summary`.
pub fn parse_error_desc(desc: &str) -> Option<(u64, String)> {
    let rest = desc.strip_prefix("offset ")?;
    let (n, rest) = rest.split_once(": ")?;
    let (rule, _) = rest.split_once(": ")?;
    Some((n.parse().ok()?, rule.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn error_desc_is_parsed() {
        assert_eq!(
            parse_error_desc("offset 8: CMD-LEN: a fixed-length ... (value 0x3)"),
            Some((8, "CMD-LEN".to_string()))
        );
        assert_eq!(parse_error_desc("channel lost: SM-TIMEOUT: x"), None);
    }
}
