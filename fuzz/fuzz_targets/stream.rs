//! StreamDecoder on a main, recovery or packaged channel, fed in chunks chosen by the input.
//!
//! Input: knob byte (bit 0 profile, bits 1-2 channel, bit 3 the input is the whole channel,
//! bit 4 postcopy, bit 5 x-ignore-shared, bit 7 tiny caps), two chunk-size bytes, then the
//! channel bytes. Checks: no panic; every item uses at most the bytes it was given and advances
//! `offset()` by exactly that; only the end of a package and an empty device payload use no
//! bytes; decoding the whole input at once and decoding it in chunks give
//! the same items and the same final violation (DESIGN.md: any chunking gives the same items).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_fuzz::{split_knobs, take};
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use qmig_protocol::WireError;

const MAX_ITEMS: usize = 4096;

#[derive(Debug, PartialEq)]
enum End {
    Incomplete,
    Invalid(qmig_protocol::Violation),
    Limit,
}

fn decoder(k: qmig_fuzz::Knobs) -> StreamDecoder {
    let channel = match (k.0 >> 1) & 3 {
        1 => Channel::Resume,
        2 => Channel::Packaged,
        _ => Channel::Main,
    };
    let mut d = StreamDecoder::new(channel, k.profile(), k.limits());
    if k.bit(4) {
        d.set_postcopy(true);
    }
    if k.bit(5) {
        d.set_ignore_shared(true);
    }
    d
}

fn step<'a>(
    d: &mut StreamDecoder,
    input: &'a [u8],
    last: bool,
) -> Result<(Item<'a>, usize), WireError> {
    let before = d.offset();
    let r = if last {
        d.decode_final(input)
    } else {
        d.decode(input)
    };
    match &r {
        Ok((item, n)) => {
            assert!(
                *n <= input.len(),
                "item {item:?} used {n} of {}",
                input.len()
            );
            assert_eq!(
                d.offset(),
                before + *n as u64,
                "offset must advance by the bytes used"
            );
            if *n == 0 {
                // The end of a package, or an empty device payload (a footer right after the
                // section header: a device with nothing to save).
                assert!(
                    matches!(item, Item::PackageEnd)
                        || matches!(item, Item::DeviceData(d) if d.is_empty()),
                    "{item:?} used no bytes"
                );
            }
        }
        Err(_) => assert_eq!(d.offset(), before, "an error must consume nothing"),
    }
    r
}

fuzz_target!(|data: &[u8]| {
    let Some((k, mut rest)) = split_knobs(data) else {
        return;
    };
    let sizes = take(&mut rest, 2);
    let size_byte =
        |i: usize| -> usize { sizes.get(i % sizes.len().max(1)).copied().unwrap_or(0) as usize };
    let whole_is_final = k.bit(3);

    // Whole input at once.
    let mut a = decoder(k);
    let mut items_a = Vec::new();
    let mut pos = 0usize;
    let end_a = loop {
        if items_a.len() >= MAX_ITEMS {
            break End::Limit;
        }
        match step(&mut a, &rest[pos..], whole_is_final) {
            Ok((item, n)) => {
                items_a.push((item, n));
                pos += n;
            }
            Err(WireError::Incomplete { .. }) => break End::Incomplete,
            Err(WireError::Invalid(v)) => break End::Invalid(v),
        }
    };

    // The same input in chunks.
    let mut b = decoder(k);
    let mut items_b = Vec::new();
    let mut pos = 0usize;
    let mut avail = 0usize;
    let mut i = 0usize;
    let end_b = loop {
        if items_b.len() >= MAX_ITEMS {
            break End::Limit;
        }
        if avail < pos {
            avail = pos;
        }
        let last = whole_is_final && avail == rest.len();
        match step(&mut b, &rest[pos..avail], last) {
            Ok((item, n)) => {
                items_b.push((item, n));
                pos += n;
            }
            Err(WireError::Incomplete { needed }) => {
                if avail == rest.len() {
                    break End::Incomplete;
                }
                assert!(needed > 0, "Incomplete with needed 0");
                i += 1;
                // Odd size bytes jump by what the decoder says it needs; even ones by a
                // fixed chunk of 1 + 3 * b bytes (any boundary; byte by byte for 0).
                let b = size_byte(i);
                let step = if b & 1 == 1 { needed } else { 1 + b * 3 };
                avail = (avail + step).min(rest.len());
            }
            Err(WireError::Invalid(v)) => break End::Invalid(v),
        }
    };

    if end_a != End::Limit && end_b != End::Limit {
        assert_eq!(items_a, items_b, "chunked decoding gave other items");
        assert_eq!(end_a, end_b, "chunked decoding ended differently");
    }
});
