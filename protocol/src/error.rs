//! The wire layer's error type.
//!
//! Decoding distinguishes "need more bytes" ([`WireError::Incomplete`]) from "these bytes break
//! a rule" ([`WireError::Invalid`]). An invalid input always names the absolute byte offset in
//! its channel where the offending field starts and the [`Rule`] it breaks; `value` carries the
//! offending number where there is one (a length, a code, an offset), so that messages are
//! precise without allocating.

use crate::rule::Rule;
use core::fmt;

/// A rule violation found in peer input: where, which rule, and the offending value.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Violation {
    /// Absolute byte offset, in the channel being decoded, of the field that breaks the rule.
    pub offset: u64,
    /// The rule broken.
    pub rule: Rule,
    /// The offending value (a code, a length, an offset), or 0 where none applies.
    pub value: u64,
}

impl Violation {
    /// A violation of `rule` at `offset` with the offending `value`.
    pub const fn new(offset: u64, rule: Rule, value: u64) -> Self {
        Violation {
            offset,
            rule,
            value,
        }
    }
}

impl fmt::Display for Violation {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(
            f,
            "offset {}: {}: {} (value {:#x})",
            self.offset,
            self.rule.id(),
            self.rule.summary(),
            self.value
        )
    }
}

impl core::error::Error for Violation {}

/// Error of the wire layer (codec).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WireError {
    /// The input ends before the item does: at least `needed` more bytes are required.
    /// Nothing was consumed; call again with more input.
    Incomplete {
        /// A lower bound on the number of further bytes needed.
        needed: usize,
    },
    /// The input breaks a rule of the protocol.
    Invalid(Violation),
}

impl WireError {
    /// Shorthand for an [`WireError::Invalid`] error.
    pub const fn invalid(offset: u64, rule: Rule, value: u64) -> Self {
        WireError::Invalid(Violation::new(offset, rule, value))
    }

    /// The violation, if this is not an `Incomplete`.
    pub const fn violation(&self) -> Option<&Violation> {
        match self {
            WireError::Invalid(v) => Some(v),
            WireError::Incomplete { .. } => None,
        }
    }

    /// Whether more input could make the decode succeed.
    pub const fn is_incomplete(&self) -> bool {
        matches!(self, WireError::Incomplete { .. })
    }
}

impl From<Violation> for WireError {
    fn from(v: Violation) -> Self {
        WireError::Invalid(v)
    }
}

impl fmt::Display for WireError {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            WireError::Incomplete { needed } => {
                write!(f, "incomplete input: {needed} more bytes needed")
            }
            WireError::Invalid(v) => v.fmt(f),
        }
    }
}

impl core::error::Error for WireError {}

/// Result type of the wire layer.
pub type WireResult<T> = Result<T, WireError>;
