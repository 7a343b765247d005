//! Round trip: every item StreamDecoder returns re-encodes (`Item::encode`) to exactly the
//! bytes it was decoded from.
//!
//! Input: knob byte (bit 0 profile, bits 1-2 channel, bit 4 postcopy, bit 5 x-ignore-shared,
//! bit 7 tiny caps), then the channel bytes, decoded as the whole channel.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_fuzz::split_knobs;
use qmig_protocol::stream::{Channel, StreamDecoder};

fuzz_target!(|data: &[u8]| {
    let Some((k, rest)) = split_knobs(data) else {
        return;
    };
    let channel = match (k.0 >> 1) & 3 {
        1 => Channel::Resume,
        2 => Channel::Packaged,
        _ => Channel::Main,
    };
    let mut d = StreamDecoder::new(channel, k.profile(), k.limits());
    d.set_postcopy(k.bit(4));
    d.set_ignore_shared(k.bit(5));
    let mut pos = 0usize;
    let mut out = Vec::new();
    for _ in 0..4096 {
        let Ok((item, n)) = d.decode_final(&rest[pos..]) else {
            break;
        };
        out.clear();
        item.encode(&mut out);
        assert_eq!(
            out.as_slice(),
            &rest[pos..pos + n],
            "item {item:?} at offset {pos} does not re-encode to its bytes"
        );
        pos += n;
    }
});
