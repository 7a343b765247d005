//! The non-iterative device sections the source sends at the end of the stream.
//!
//! This module owns the device states of `qmig-src`: for machine `none` without a template, the
//! two devices QEMU's `-M none` (no CPU) registers, `timer` (v2, 24 bytes) and `globalstate`
//! (v1, QEMU's layout of the version: 7.2 `be32 size, runstate[100]`; 10.x `be32 size,
//! runstate[32], has_vm_was_suspended, vm_was_suspended, padding`), with QEMU's section ids; and
//! [`from_template`], which takes every device section (idstr, instance, version, payload, id)
//! from a stream captured from a real QEMU of the same version and machine, decoded with the
//! protocol crate's `StreamDecoder`, together with the template's VM description when it has
//! one (precopy captures end with it). The description written after a precopy EOF is that
//! one, or [`MINIMAL_VMDESC`] (QEMU's destination reads it only to skip it).

use std::path::Path;

use qmig_protocol::limits::Limits;
use qmig_protocol::machine::DeviceState;
use qmig_protocol::profile::{Profile, Version};
use qmig_protocol::section::SectionHeader;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};

/// The VM description sent when no template provides one.
pub const MINIMAL_VMDESC: &[u8] = br#"{"page_size": 4096, "devices": []}"#;

/// Device sections and the VM description taken from a captured stream.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Template {
    /// The device sections, in stream order.
    pub devices: Vec<DeviceState>,
    /// The VM description JSON after the stream's EOF, if the stream has one.
    pub vmdesc: Option<Vec<u8>>,
}

/// Section id of `ram` in every stream QEMU writes for the machines qmig models.
pub const RAM_SECTION_ID: u32 = 2;

/// The `globalstate` payload for run state `running`.
pub fn globalstate(profile: &Profile) -> Vec<u8> {
    let state = b"running\0";
    let mut p = Vec::with_capacity(104);
    p.extend_from_slice(&(state.len() as u32).to_be_bytes());
    match profile.version {
        Version::V7_2 => {
            let mut rs = [0u8; 100];
            rs[..state.len()].copy_from_slice(state);
            p.extend_from_slice(&rs);
        }
        _ => {
            let mut rs = [0u8; 32];
            rs[..state.len()].copy_from_slice(state);
            p.extend_from_slice(&rs);
            p.push(1); // has_vm_was_suspended
            p.push(0); // vm_was_suspended
            p.extend_from_slice(&[0u8; 66]); // padding to QEMU's 104 bytes
        }
    }
    p
}

/// The devices of `-M none` without a CPU, with the section ids QEMU gives them (`timer` 0;
/// `globalstate` 4 on 7.2, 3 on 10.0).
pub fn builtin(profile: &Profile) -> Vec<DeviceState> {
    let gs_id = match profile.version {
        Version::V7_2 => 4,
        _ => 3,
    };
    vec![
        DeviceState {
            section_id: 0,
            idstr: "timer".into(),
            instance_id: 0,
            version_id: 2,
            data: vec![0u8; 24],
        },
        DeviceState {
            section_id: gs_id,
            idstr: "globalstate".into(),
            instance_id: 0,
            version_id: 1,
            data: globalstate(profile),
        },
    ]
}

/// Every SECTION_FULL device (not `ram`) of a captured stream, in stream order (PACKAGED blobs
/// included). Decoding stops at the end of the stream or at the first item that does not decode
/// (a cut capture); the devices seen before are kept. Fails if none was found.
pub fn from_template(path: &Path, profile: &Profile) -> Result<Template, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let devices = decode_devices(&bytes, profile);
    if devices.devices.is_empty() {
        return Err(format!(
            "{}: no device section found in the template stream",
            path.display()
        ));
    }
    Ok(devices)
}

/// The device sections and VM description of `stream` (see [`from_template`]).
pub fn decode_devices(stream: &[u8], profile: &Profile) -> Template {
    let mut d = StreamDecoder::new(Channel::Main, *profile, Limits::DEFAULT);
    let mut pos = 0usize;
    let mut open: Option<DeviceState> = None;
    let mut out = Template::default();
    while pos < stream.len() {
        let Ok((item, n)) = d.decode_final(&stream[pos..]) else {
            break;
        };
        pos += n;
        match item {
            Item::Section(SectionHeader::Full(id)) if id.idstr != b"ram" => {
                open = Some(DeviceState {
                    section_id: id.section_id,
                    idstr: String::from_utf8_lossy(id.idstr).into_owned(),
                    instance_id: id.instance_id,
                    version_id: id.version_id,
                    data: Vec::new(),
                });
            }
            Item::DeviceData(data) => {
                if let Some(dev) = open.as_mut() {
                    dev.data = data.to_vec();
                }
            }
            Item::Footer { .. } => {
                if let Some(dev) = open.take() {
                    out.devices.push(dev);
                }
            }
            Item::VmDescription(json) => {
                out.vmdesc = Some(json.to_vec());
                break;
            }
            _ => {}
        }
        if n == 0 && !matches!(item, Item::PackageEnd) {
            break;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn vector(path: &str) -> Vec<u8> {
        let root = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors");
        std::fs::read(root.join(path)).unwrap()
    }

    /// The built-in devices are byte-identical to QEMU's (same idstr, instance, version and
    /// payload; the timer's clock offsets aside) in captures of `-M none` of each version.
    #[test]
    fn builtin_devices_match_captures() {
        for (path, profile, cpu) in [
            (
                "qemu-7.2/precopy-tcp-rp/stream.bin",
                Profile::QEMU_7_2,
                true,
            ),
            (
                "qemu-10.0/precopy-none-nocpu/stream.bin",
                Profile::QEMU_10,
                false,
            ),
        ] {
            let t = decode_devices(&vector(path), &profile);
            let b = builtin(&profile);
            let gs = t.devices.iter().find(|d| d.idstr == "globalstate").unwrap();
            assert_eq!(gs.data, b[1].data, "{path}");
            assert_eq!((gs.instance_id, gs.version_id), (0, 1));
            if !cpu {
                assert_eq!(gs.section_id, b[1].section_id, "{path}");
            }
            let timer = &t.devices[0];
            assert_eq!(
                (
                    timer.idstr.as_str(),
                    timer.section_id,
                    timer.version_id,
                    timer.data.len()
                ),
                ("timer", 0, 2, 24)
            );
            assert!(t.vmdesc.as_ref().is_some_and(|j| j.starts_with(b"{")));
        }
    }

    #[test]
    fn template_takes_every_device_in_order() {
        let t = decode_devices(
            &vector("qemu-7.2/precopy-tcp-rp/stream.bin"),
            &Profile::QEMU_7_2,
        );
        let names: Vec<(&str, u32)> = t
            .devices
            .iter()
            .map(|d| (d.idstr.as_str(), d.section_id))
            .collect();
        assert_eq!(
            names,
            [
                ("timer", 0),
                ("cpu_common", 4),
                ("cpu", 5),
                ("kvm-tpr-opt", 6),
                ("apic", 7),
                ("globalstate", 8)
            ]
        );
        assert_eq!(t.devices[2].data.len(), 1851);
        // Devices inside a PACKAGED blob (a postcopy capture) are found too; it has no vmdesc.
        let p = decode_devices(
            &vector("qemu-7.2/postcopy-recover/stream.bin"),
            &Profile::QEMU_7_2,
        );
        assert_eq!(p.devices.len(), 6);
        assert_eq!(p.vmdesc, None);
    }

    #[test]
    fn globalstate_is_104_bytes_in_both_layouts() {
        let a = globalstate(&Profile::QEMU_7_2);
        let b = globalstate(&Profile::QEMU_10);
        assert_eq!((a.len(), b.len()), (104, 104));
        assert_eq!(&a[..12], b"\0\0\0\x08running\0");
        assert_eq!(b[36..38], [1, 0]);
    }
}
