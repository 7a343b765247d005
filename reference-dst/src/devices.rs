//! Device state as JSON: what `x-qmig-dump-devices` and `--dump-devices` show.
//!
//! This module owns turning the machine's kept device sections into JSON: one object per
//! section (id, idstr, instance, version, size, payload hex) and, when a VM description is
//! known, the payload decoded field by field with the protocol's schema-driven decoder (a
//! payload that does not match its description is shown with the rule it breaks).

use qmig_protocol::device::{decode_device, Node, NodeKind};
use qmig_protocol::limits::Limits;
use qmig_protocol::machine::DeviceSection;
use qmig_protocol::vmdesc::VmDesc;
use serde_json::{json, Value};

/// Lower-case hex of `b`.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

fn node(n: &Node<'_, '_>) -> Value {
    let mut v = json!({"name": n.name, "type": n.ty});
    match n.kind {
        NodeKind::Leaf => {
            v["hex"] = json!(hex(n.bytes));
            if let Some(x) = n.as_u64() {
                v["value"] = json!(x);
            }
        }
        NodeKind::Null => v["null"] = json!(true),
        _ => v["fields"] = Value::Array(n.children.iter().map(node).collect()),
    }
    v
}

/// The JSON of `sections`, decoded with `vmdesc` where it describes a section.
pub fn to_json(sections: &[DeviceSection], vmdesc: Option<&VmDesc>, limits: &Limits) -> Value {
    let list = sections
        .iter()
        .map(|s| {
            let mut v = json!({
                "section-id": s.section_id,
                "idstr": String::from_utf8_lossy(&s.idstr),
                "instance-id": s.instance_id,
                "version-id": s.version_id,
                "size": s.data.len(),
                "data": hex(&s.data),
            });
            if let Some(dev) = vmdesc.and_then(|d| d.device(&s.idstr, s.instance_id)) {
                v["fields"] = match decode_device(dev, &s.data, 0, limits) {
                    Ok(tree) => Value::Array(tree.nodes.iter().map(node).collect()),
                    Err(e) => json!({"error": format!("{e:?}")}),
                };
            }
            v
        })
        .collect();
    Value::Array(list)
}
