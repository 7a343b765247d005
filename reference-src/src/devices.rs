//! The non-iterative device sections the source sends at the end of the stream.
//!
//! This module owns the device states of `qmig-src`: for machine `none` without a template, the
//! two devices QEMU's `-M none` (no CPU) registers, `timer` (v2, 24 bytes) and `globalstate`
//! (v1, QEMU's layout of the version: 7.2 `be32 size, runstate[100]`; 10.x `be32 size,
//! runstate[32], has_vm_was_suspended, vm_was_suspended, padding`), with QEMU's section ids; and
//! [`from_template`], which takes every device section (idstr, instance, version, payload, id)
//! from a stream captured from a real QEMU of the same version and machine, decoded with the
//! protocol crate's `StreamDecoder`.

use std::path::Path;

use qmig_protocol::limits::Limits;
use qmig_protocol::machine::DeviceState;
use qmig_protocol::profile::{Profile, Version};
use qmig_protocol::section::SectionHeader;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};

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
pub fn from_template(path: &Path, profile: &Profile) -> Result<Vec<DeviceState>, String> {
    let bytes = std::fs::read(path).map_err(|e| format!("{}: {e}", path.display()))?;
    let devices = decode_devices(&bytes, profile);
    if devices.is_empty() {
        return Err(format!(
            "{}: no device section found in the template stream",
            path.display()
        ));
    }
    Ok(devices)
}

/// The device sections of `stream` (see [`from_template`]).
pub fn decode_devices(stream: &[u8], profile: &Profile) -> Vec<DeviceState> {
    let mut d = StreamDecoder::new(Channel::Main, *profile, Limits::DEFAULT);
    let mut pos = 0usize;
    let mut open: Option<DeviceState> = None;
    let mut out: Vec<DeviceState> = Vec::new();
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
                    out.push(dev);
                }
            }
            Item::Eof | Item::VmDescription(_) => break,
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

    #[test]
    fn globalstate_is_104_bytes_in_both_layouts() {
        let a = globalstate(&Profile::QEMU_7_2);
        let b = globalstate(&Profile::QEMU_10);
        assert_eq!((a.len(), b.len()), (104, 104));
        assert_eq!(&a[..12], b"\0\0\0\x08running\0");
        assert_eq!(b[36..38], [1, 0]);
    }
}
