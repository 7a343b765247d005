//! QEMU's VM-description JSON (feature `vmdesc`).
//!
//! This module owns the model of the JSON a precopy source appends after EOF (and that the
//! vectors ship as `vmdesc.json` for postcopy streams): `page_size`, `devices` (name,
//! instance_id, vmsd_name, version, fields, subsections) and, from QEMU 10.x, `configuration`.
//! A field has `name`, `type`, `size` (bytes written per element), and optionally `array_len`,
//! `index`, a nested `struct` description, or, for `tmp` fields, the nested description inline.
//! Parsing uses serde_json without std; the JSON length is capped by `Limits::max_vmdesc`
//! (`VMDESC-LEN`) and its nesting by `Limits::max_vmdesc_depth` (`DEV-NESTING`). What the
//! description says about a payload is applied by [`crate::device`].

use crate::error::{WireError, WireResult};
use crate::limits::Limits;
use crate::rule::Rule;
use alloc::boxed::Box;
use alloc::string::String;
use alloc::vec::Vec;
use serde::Deserialize;

/// The whole VM description.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct VmDesc {
    /// Target page size of the source.
    pub page_size: u64,
    /// Device sections described, in save order.
    pub devices: Vec<Device>,
    /// 10.x: the configuration section's layout.
    #[serde(default)]
    pub configuration: Option<Vmsd>,
}

/// One device (a FULL or START section's payload).
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Device {
    /// The section idstr.
    pub name: String,
    /// The section instance id.
    pub instance_id: u32,
    /// The top-level vmsd's name (the prefix of its subsections' names).
    pub vmsd_name: String,
    /// The vmsd version written.
    pub version: u32,
    /// Fields in wire order.
    #[serde(default)]
    pub fields: Vec<Field>,
    /// Subsections that were written, in wire order.
    #[serde(default)]
    pub subsections: Vec<Vmsd>,
}

/// A nested description: a struct's layout, a subsection, or the configuration.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Vmsd {
    /// The vmsd's name (subsections: the name on the wire).
    pub vmsd_name: String,
    /// The vmsd's version.
    #[serde(default)]
    pub version: u32,
    /// Fields in wire order.
    #[serde(default)]
    pub fields: Vec<Field>,
    /// Subsections that were written.
    #[serde(default)]
    pub subsections: Vec<Vmsd>,
}

/// One field description.
#[derive(Clone, Debug, Deserialize, PartialEq, Eq)]
pub struct Field {
    /// The field's name (made unique by QEMU with `[n]`).
    pub name: String,
    /// The VMState info type (`uint32`, `buffer`, `struct`, `tmp`, `nullptr`, ...).
    #[serde(rename = "type")]
    pub ty: String,
    /// Bytes written per element (for structs: including their subsections).
    #[serde(default)]
    pub size: u64,
    /// Element count of a compressed array.
    #[serde(default)]
    pub array_len: Option<u64>,
    /// Element index of an uncompressed array element.
    #[serde(default)]
    pub index: Option<u64>,
    /// The element layout of a struct field.
    #[serde(default, rename = "struct")]
    pub structure: Option<Box<Vmsd>>,
    /// `tmp` fields: the nested vmsd's name, given inline.
    #[serde(default)]
    pub vmsd_name: Option<String>,
    /// `tmp` fields: the nested vmsd's fields, given inline.
    #[serde(default)]
    pub fields: Option<Vec<Field>>,
    /// `tmp` fields: the nested vmsd's subsections, given inline.
    #[serde(default)]
    pub subsections: Option<Vec<Vmsd>>,
}

impl Field {
    /// Number of elements (`array_len`, or 1).
    pub fn count(&self) -> u64 {
        self.array_len.unwrap_or(1)
    }

    /// The nested layout of a struct or tmp field: (vmsd name, fields, subsections).
    pub fn nested(&self) -> Option<(&str, &[Field], &[Vmsd])> {
        if let Some(s) = &self.structure {
            return Some((&s.vmsd_name, &s.fields, &s.subsections));
        }
        self.fields.as_ref().map(|f| {
            (
                self.vmsd_name.as_deref().unwrap_or(""),
                &f[..],
                self.subsections.as_deref().unwrap_or(&[]),
            )
        })
    }
}

impl VmDesc {
    /// Parses the JSON bytes of a VM description whose first byte is at channel offset `at`.
    ///
    /// Longer than `limits.max_vmdesc` breaks [`Rule::VmdescLen`]; JSON of another shape
    /// breaks [`Rule::VmdescJson`]; nesting deeper than `limits.max_vmdesc_depth` breaks
    /// [`Rule::DevNesting`].
    pub fn parse(json: &[u8], at: u64, limits: &Limits) -> WireResult<VmDesc> {
        if json.len() as u64 > limits.max_vmdesc as u64 {
            return Err(WireError::invalid(at, Rule::VmdescLen, json.len() as u64));
        }
        let d: VmDesc = serde_json::from_slice(json)
            .map_err(|e| WireError::invalid(at, Rule::VmdescJson, e.line() as u64))?;
        let deepest = d
            .devices
            .iter()
            .map(|dev| depth_of(&dev.fields, &dev.subsections))
            .max()
            .unwrap_or(0);
        if deepest > limits.max_vmdesc_depth as u64 {
            return Err(WireError::invalid(at, Rule::DevNesting, deepest));
        }
        Ok(d)
    }

    /// The device with this idstr and instance id.
    pub fn device(&self, idstr: &[u8], instance_id: u32) -> Option<&Device> {
        self.devices
            .iter()
            .find(|d| d.name.as_bytes() == idstr && d.instance_id == instance_id)
    }
}

fn depth_of(fields: &[Field], subs: &[Vmsd]) -> u64 {
    let f = fields
        .iter()
        .filter_map(|f| f.nested().map(|(_, fs, ss)| 1 + depth_of(fs, ss)))
        .max()
        .unwrap_or(0);
    let s = subs
        .iter()
        .map(|s| 1 + depth_of(&s.fields, &s.subsections))
        .max()
        .unwrap_or(0);
    f.max(s)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_both_shapes_and_caps_depth() {
        let j = br#"{"page_size": 4096, "devices": [{"name": "timer", "instance_id": 0,
            "vmsd_name": "timer", "version": 2, "fields": [{"name": "a", "type": "int64", "size": 8}]}]}"#;
        let d = VmDesc::parse(j, 0, &Limits::DEFAULT).unwrap();
        assert_eq!(d.device(b"timer", 0).unwrap().fields[0].size, 8);
        assert!(d.configuration.is_none());
        let mut deep = String::from(
            r#"{"page_size":4096,"devices":[{"name":"x","instance_id":0,"vmsd_name":"x","version":1,"fields":["#,
        );
        for _ in 0..3 {
            deep.push_str(r#"{"name":"s","type":"struct","size":1,"struct":{"vmsd_name":"s","version":1,"fields":["#);
        }
        deep.push_str(r#"{"name":"b","type":"uint8","size":1}"#);
        for _ in 0..3 {
            deep.push_str("]}}");
        }
        deep.push_str("]}]}");
        let lim = Limits {
            max_vmdesc_depth: 2,
            ..Limits::DEFAULT
        };
        assert_eq!(
            VmDesc::parse(deep.as_bytes(), 5, &lim),
            Err(WireError::invalid(5, Rule::DevNesting, 3))
        );
        assert!(VmDesc::parse(deep.as_bytes(), 5, &Limits::DEFAULT).is_ok());
        assert_eq!(
            VmDesc::parse(b"[1]", 9, &Limits::DEFAULT)
                .unwrap_err()
                .violation()
                .unwrap()
                .rule,
            Rule::VmdescJson
        );
    }
}
