//! VM-description JSON (`VmDesc::parse`) and the schema-driven device decoder (`measure`,
//! `decode_device`).
//!
//! Input: knob byte (bit 7 tiny caps), be16 JSON length, the JSON, then device payload bytes.
//! Checks: no panic; for every described device, `measure` on the payload bytes and
//! `decode_device` on the measured prefix agree (a measured payload decodes).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_fuzz::{split_knobs, take};
use qmig_protocol::device::{decode_device, measure};
use qmig_protocol::vmdesc::VmDesc;

fuzz_target!(|data: &[u8]| {
    let Some((k, mut rest)) = split_knobs(data) else {
        return;
    };
    let limits = k.limits();
    let l = take(&mut rest, 2);
    if l.len() < 2 {
        return;
    }
    let len = u16::from_be_bytes([l[0], l[1]]) as usize;
    let json = take(&mut rest, len);
    let payload = rest;
    let Ok(desc) = VmDesc::parse(json, 3, &limits) else {
        return;
    };
    for dev in desc.devices.iter().take(64) {
        let _ = desc.device(dev.name.as_bytes(), dev.instance_id);
        match measure(dev, payload, 1000, &limits) {
            Ok(n) => {
                assert!(n <= payload.len());
                if let Err(e) = decode_device(dev, &payload[..n], 1000, &limits) {
                    panic!(
                        "measured {n} bytes for {} but decoding fails: {e:?}",
                        dev.name
                    );
                }
            }
            Err(_) => {
                let _ = decode_device(dev, payload, 1000, &limits);
            }
        }
    }
});
