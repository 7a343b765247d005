//! qmig conformance library.
