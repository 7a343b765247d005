//! `decode_command` (after the 0x08 byte): every `MIG_CMD_*`, PACKAGED and RAM_DISCARD bodies.
//!
//! Input: knob byte (bit 0 profile, bit 7 tiny caps), then commands back to back, each without
//! its 0x08 type byte. Checks: no panic; a decoded command re-encodes (`0x08` + its bytes) to
//! exactly the bytes it used; discard ranges iterate to the advertised count; an error consumes
//! nothing.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_fuzz::split_knobs;
use qmig_protocol::command::{decode_command, Command};
use qmig_protocol::reader::Reader;

fuzz_target!(|data: &[u8]| {
    let Some((k, rest)) = split_knobs(data) else {
        return;
    };
    let (profile, limits) = (k.profile(), k.limits());
    let mut pos = 0usize;
    let mut out = Vec::new();
    while pos < rest.len() {
        let mut r = Reader::new(&rest[pos..], 1000 + pos as u64);
        let Ok(cmd) = decode_command(&mut r, &profile, &limits) else {
            assert_eq!(r.consumed(), 0, "an error must consume nothing");
            break;
        };
        let n = r.consumed();
        assert!(n >= 4, "a command uses at least its code and length");
        if let Command::RamDiscard(d) = &cmd {
            assert_eq!(d.ranges().count(), d.len());
            assert!(!d.name.is_empty() && d.name.len() <= 255);
        }
        if let Command::Packaged { len } = &cmd {
            assert!(
                *len <= limits.max_packaged,
                "PACKAGED over the cap accepted"
            );
        }
        out.clear();
        cmd.encode(&mut out);
        assert_eq!(out[0], 0x08);
        assert_eq!(
            &out[1..],
            &rest[pos..pos + n],
            "{cmd:?} does not re-encode to its bytes"
        );
        pos += n;
    }
});
