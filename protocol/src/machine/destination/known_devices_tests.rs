//! Tests of the destination's device table (`DestinationConfig::known_devices`, or the
//! devices of its VM description): SEC-UNKNOWN-DEVICE and SEC-VERSION at the offsets the
//! stream decoder names.

use alloc::string::String;
use alloc::vec;
use alloc::vec::Vec;

use super::{Destination, DestinationConfig};
use crate::header::encode_configuration;
use crate::machine::events::Instant;
use crate::machine::memory::{DiscardMemory, RamBlockSpec};
use crate::profile::Profile;
use crate::rule::Rule;

/// Header, configuration (machine `none`), then a FULL section header for `idstr` instance 0
/// version `version` (no payload yet). Returns the bytes and the section's offset.
fn stream(idstr: &[u8], version: u32) -> (Vec<u8>, u64) {
    let mut v = Vec::new();
    v.extend_from_slice(b"QEVM");
    v.extend_from_slice(&3u32.to_be_bytes());
    encode_configuration(b"none", &[], &mut v);
    let at = v.len() as u64;
    v.push(0x04);
    v.extend_from_slice(&1u32.to_be_bytes());
    v.push(idstr.len() as u8);
    v.extend_from_slice(idstr);
    v.extend_from_slice(&0u32.to_be_bytes());
    v.extend_from_slice(&version.to_be_bytes());
    (v, at)
}

fn feed(
    table: Option<Vec<(String, u32, u32)>>,
    idstr: &[u8],
    version: u32,
) -> Result<u64, (Rule, u64)> {
    let mut cfg = DestinationConfig::new(
        Profile::QEMU_7_2,
        "none",
        vec![RamBlockSpec::new("ram", 1 << 20, 4096)],
        false,
    );
    cfg.known_devices = table;
    let mut d = Destination::new(cfg).expect("config");
    d.handle_channel_opened(Instant(0)).expect("open");
    let (bytes, at) = stream(idstr, version);
    match d.handle_stream(Instant(1), &bytes, &mut DiscardMemory) {
        Ok(_) => Ok(at),
        Err(v) => Err((v.rule, v.offset - at)),
    }
}

fn table() -> Option<Vec<(String, u32, u32)>> {
    Some(vec![
        (String::from("timer"), 0, 2),
        (String::from("ram"), 0, 4),
    ])
}

#[test]
fn a_declared_device_at_its_version_or_older_is_accepted() {
    assert!(feed(table(), b"timer", 2).is_ok());
    assert!(feed(table(), b"timer", 1).is_ok());
}

#[test]
fn an_undeclared_device_is_sec_unknown_device_at_its_idstr() {
    // The offset is the idstr's length byte: section type (1) + section id (4).
    assert_eq!(
        feed(table(), b"nosuch", 1),
        Err((Rule::SecUnknownDevice, 5))
    );
}

#[test]
fn a_newer_version_is_sec_version_at_the_version_field() {
    // type (1) + id (4) + length (1) + "timer" (5) + instance (4).
    assert_eq!(feed(table(), b"timer", 3), Err((Rule::SecVersion, 15)));
}

#[test]
fn without_a_table_or_a_vm_description_every_device_is_accepted() {
    assert!(feed(None, b"nosuch", 99).is_ok());
    let cfg = DestinationConfig::new(Profile::QEMU_7_2, "none", vec![], false);
    assert_eq!(cfg.device_table(), None);
}

#[cfg(feature = "vmdesc")]
#[test]
fn a_vm_description_declares_its_devices_and_ram() {
    let json = br#"{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0, "vmsd_name": "timer", "version": 2, "fields": []}]}"#;
    let desc =
        crate::vmdesc::VmDesc::parse(json, 0, &crate::limits::Limits::DEFAULT).expect("vmdesc");
    let mut cfg = DestinationConfig::new(Profile::QEMU_7_2, "none", vec![], false);
    cfg.vmdesc = Some(desc);
    assert_eq!(
        cfg.device_table(),
        Some(vec![
            (String::from("timer"), 0, 2),
            (String::from("ram"), 0, 4)
        ])
    );
}
