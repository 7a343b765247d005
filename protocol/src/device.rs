//! Schema-driven device payloads (feature `vmdesc`).
//!
//! This module owns reading a device section's payload with its VM description
//! ([`crate::vmdesc::Device`]): measuring where the payload ends ([`measure`], which the stream
//! decoder uses to delimit device sections) and decoding it field by field into a tree
//! ([`decode_device`]): fixed-size fields of `size` bytes per element, arrays of `array_len`
//! elements, nested structs and `tmp` layouts (whose bytes must add up to the field's `size`),
//! `nullptr` elements (the byte `VMS_NULLPTR_MARKER`), and subsections, found like QEMU does by
//! peeking `0x05` and a name that starts with the parent's vmsd name. Mismatches break
//! `DEV-SCHEMA`; a subsection with the parent's prefix that the description lacks, or whose
//! version is newer than the described one, breaks `DEV-SUBSECTION`; nesting beyond
//! `Limits::max_vmdesc_depth` breaks `DEV-NESTING`.

use crate::codes::VMS_NULLPTR_MARKER;
use crate::error::{WireError, WireResult};
use crate::limits::Limits;
use crate::reader::Reader;
use crate::rule::Rule;
use crate::vmdesc::{Device, Field, Vmsd};
use alloc::vec::Vec;

/// The subsection marker inside device data.
const SUBSECTION: u8 = 0x05;

/// What a node of the decoded tree is.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum NodeKind {
    /// A plain field element (integer, buffer, timer, ...): its bytes.
    Leaf,
    /// An array: its children are the elements.
    Array,
    /// A struct or tmp element: its children are the nested fields, then subsections.
    Struct,
    /// A subsection: its children are its fields, then its own subsections.
    Subsection,
    /// A NULL pointer element (`0x30`).
    Null,
}

/// One node of a decoded device payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Node<'s, 'a> {
    /// Field name, or the subsection's vmsd name.
    pub name: &'s str,
    /// The VMState type (`uint32`, `struct`, ...; `subsection` for subsections).
    pub ty: &'s str,
    /// What this node is.
    pub kind: NodeKind,
    /// Absolute channel offset of its first byte.
    pub offset: u64,
    /// All of its bytes (for a subsection: from the `0x05` marker on).
    pub bytes: &'a [u8],
    /// Elements, nested fields or subsection content.
    pub children: Vec<Node<'s, 'a>>,
}

impl Node<'_, '_> {
    /// A big-endian unsigned value of a 1-, 2-, 4- or 8-byte leaf.
    pub fn as_u64(&self) -> Option<u64> {
        if self.kind != NodeKind::Leaf || !matches!(self.bytes.len(), 1 | 2 | 4 | 8) {
            return None;
        }
        Some(self.bytes.iter().fold(0u64, |a, &b| (a << 8) | b as u64))
    }

    /// The child named `name`.
    pub fn child(&self, name: &str) -> Option<&Self> {
        self.children.iter().find(|c| c.name == name)
    }
}

/// A decoded device payload.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct DeviceTree<'s, 'a> {
    /// Top-level fields, then top-level subsections.
    pub nodes: Vec<Node<'s, 'a>>,
    /// Payload length in bytes.
    pub len: usize,
}

impl<'s, 'a> DeviceTree<'s, 'a> {
    /// The top-level node named `name` (a field, or a subsection's vmsd name).
    pub fn get(&self, name: &str) -> Option<&Node<'s, 'a>> {
        self.nodes.iter().find(|n| n.name == name)
    }
}

struct Walk<'l, 'a> {
    r: Reader<'a>,
    is_final: bool,
    limits: &'l Limits,
}

impl<'a> Walk<'_, 'a> {
    /// Walks fields then subsections of one vmsd. `out`: where nodes go (None: measure only).
    fn vmsd<'s>(
        &mut self,
        vmsd_name: &str,
        fields: &'s [Field],
        subs: &'s [Vmsd],
        depth: u32,
        mut out: Option<&mut Vec<Node<'s, 'a>>>,
    ) -> WireResult<()> {
        if depth > self.limits.max_vmdesc_depth {
            return Err(WireError::invalid(
                self.r.offset(),
                Rule::DevNesting,
                depth as u64,
            ));
        }
        for f in fields {
            self.field(f, depth, out.as_deref_mut())?;
        }
        self.subsections(vmsd_name, subs, depth, out)
    }

    fn field<'s>(
        &mut self,
        f: &'s Field,
        depth: u32,
        out: Option<&mut Vec<Node<'s, 'a>>>,
    ) -> WireResult<()> {
        let start = self.r.clone();
        let mut elems = out.as_ref().map(|_| Vec::new());
        for _ in 0..f.count() {
            self.element(f, depth, elems.as_mut())?;
        }
        if let Some(out) = out {
            let mut elems = elems.unwrap_or_default();
            let node = if f.array_len.is_some() {
                Node {
                    name: &f.name,
                    ty: &f.ty,
                    kind: NodeKind::Array,
                    offset: start.offset(),
                    bytes: &start.rest()[..self.r.consumed() - start.consumed()],
                    children: elems,
                }
            } else {
                elems.pop().unwrap_or(Node {
                    name: &f.name,
                    ty: &f.ty,
                    kind: NodeKind::Leaf,
                    offset: start.offset(),
                    bytes: &[],
                    children: Vec::new(),
                })
            };
            out.push(node);
        }
        Ok(())
    }

    fn element<'s>(
        &mut self,
        f: &'s Field,
        depth: u32,
        out: Option<&mut Vec<Node<'s, 'a>>>,
    ) -> WireResult<()> {
        let start = self.r.clone();
        let at = start.offset();
        // A NULL element of an array of pointers is one marker byte; QEMU 10.x describes it as
        // type `nullptr`, 7.2 as the field's own type with size 1.
        let null_struct = f.size == 1
            && f.nested().is_some_and(|(_, fs, _)| !fs.is_empty())
            && self.r.peek_u8() == Ok(VMS_NULLPTR_MARKER);
        let (kind, children) = if f.ty == "nullptr" || null_struct {
            let b = self.r.u8()?;
            if b != VMS_NULLPTR_MARKER {
                return Err(WireError::invalid(at, Rule::DevSchema, b as u64));
            }
            (NodeKind::Null, Vec::new())
        } else if let Some((name, fields, subs)) = f.nested() {
            let mut kids = out.as_ref().map(|_| Vec::new());
            self.vmsd(name, fields, subs, depth + 1, kids.as_mut())?;
            let used = (self.r.consumed() - start.consumed()) as u64;
            if used != f.size {
                return Err(WireError::invalid(at, Rule::DevSchema, used));
            }
            (NodeKind::Struct, kids.unwrap_or_default())
        } else {
            let n = usize::try_from(f.size)
                .ok()
                .filter(|&n| n <= self.limits.max_device_payload as usize)
                .ok_or(WireError::invalid(at, Rule::DevSchema, f.size))?;
            self.r.take(n)?;
            (NodeKind::Leaf, Vec::new())
        };
        if let Some(out) = out {
            out.push(Node {
                name: &f.name,
                ty: &f.ty,
                kind,
                offset: at,
                bytes: &start.rest()[..self.r.consumed() - start.consumed()],
                children,
            });
        }
        Ok(())
    }

    fn subsections<'s>(
        &mut self,
        parent: &str,
        subs: &'s [Vmsd],
        depth: u32,
        mut out: Option<&mut Vec<Node<'s, 'a>>>,
    ) -> WireResult<()> {
        loop {
            let rest = self.r.rest();
            if rest.is_empty() {
                return if self.is_final {
                    Ok(())
                } else {
                    Err(WireError::Incomplete { needed: 1 })
                };
            }
            if rest[0] != SUBSECTION {
                return Ok(());
            }
            // Peek the name: it must be whole to decide whether it is ours.
            let at = self.r.offset();
            let mut p = self.r.clone();
            p.u8()?;
            let name = p.str8()?;
            if !name.starts_with(parent.as_bytes()) {
                return Ok(());
            }
            let Some(sub) = subs.iter().find(|s| s.vmsd_name.as_bytes() == name) else {
                return Err(WireError::invalid(
                    at,
                    Rule::DevSubsection,
                    name.len() as u64,
                ));
            };
            // A subsection newer than its description is unknown to this layout.
            let version_at = p.offset();
            let version = p.be32()?;
            if version > sub.version {
                return Err(WireError::invalid(
                    version_at,
                    Rule::DevSubsection,
                    version as u64,
                ));
            }
            let start = self.r.clone();
            self.r = p;
            let mut kids = out.as_ref().map(|_| Vec::new());
            self.vmsd(
                &sub.vmsd_name,
                &sub.fields,
                &sub.subsections,
                depth + 1,
                kids.as_mut(),
            )?;
            if let Some(out) = out.as_deref_mut() {
                out.push(Node {
                    name: &sub.vmsd_name,
                    ty: "subsection",
                    kind: NodeKind::Subsection,
                    offset: at,
                    bytes: &start.rest()[..self.r.consumed() - start.consumed()],
                    children: kids.unwrap_or_default(),
                });
            }
        }
    }
}

/// The length of the device payload at the start of `input` (first byte at channel offset
/// `at`), from its description. The bytes after the payload decide whether a subsection
/// follows, so a payload that ends exactly at the end of `input` is `Incomplete`.
pub fn measure(dev: &Device, input: &[u8], at: u64, limits: &Limits) -> WireResult<usize> {
    let mut w = Walk {
        r: Reader::new(input, at),
        is_final: false,
        limits,
    };
    w.vmsd(&dev.vmsd_name, &dev.fields, &dev.subsections, 0, None)?;
    Ok(w.r.consumed())
}

/// Decodes a whole device payload (first byte at channel offset `at`) into a tree. The payload
/// must be used exactly: leftover bytes break [`Rule::DevSchema`] at their offset.
pub fn decode_device<'s, 'a>(
    dev: &'s Device,
    payload: &'a [u8],
    at: u64,
    limits: &Limits,
) -> WireResult<DeviceTree<'s, 'a>> {
    let mut w = Walk {
        r: Reader::new(payload, at),
        is_final: true,
        limits,
    };
    let mut nodes = Vec::new();
    let res = w.vmsd(
        &dev.vmsd_name,
        &dev.fields,
        &dev.subsections,
        0,
        Some(&mut nodes),
    );
    match res {
        Ok(()) => {}
        Err(WireError::Incomplete { .. }) => {
            return Err(WireError::invalid(
                w.r.offset(),
                Rule::DevSchema,
                payload.len() as u64,
            ))
        }
        Err(e) => return Err(e),
    }
    if w.r.remaining() != 0 {
        return Err(WireError::invalid(
            w.r.offset(),
            Rule::DevSchema,
            w.r.remaining() as u64,
        ));
    }
    Ok(DeviceTree {
        nodes,
        len: payload.len(),
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::vmdesc::VmDesc;

    const DESC: &[u8] = br#"{"page_size":4096,"devices":[{"name":"d","instance_id":0,"vmsd_name":"d","version":1,
      "fields":[{"name":"a","type":"uint16","size":2},
                {"name":"s","type":"struct","size":5,"array_len":2,"struct":{"vmsd_name":"e","version":1,
                   "fields":[{"name":"x","type":"uint8","size":1},{"name":"y","type":"uint32","size":4}]}},
                {"name":"p","type":"nullptr","size":1}],
      "subsections":[{"vmsd_name":"d/sub","version":1,"fields":[{"name":"z","type":"uint8","size":1}]}]}]}"#;

    #[test]
    fn measure_and_decode() {
        let desc = VmDesc::parse(DESC, 0, &Limits::DEFAULT).unwrap();
        let dev = desc.device(b"d", 0).unwrap();
        let mut p = alloc::vec![0, 7, 1, 0, 0, 0, 2, 3, 0, 0, 0, 4, 0x30];
        p.extend_from_slice(&[5, 5, b'd', b'/', b's', b'u', b'b', 0, 0, 0, 1, 9]);
        let len = p.len();
        p.extend_from_slice(&[0x7e, 0, 0, 0, 0]);
        assert_eq!(measure(dev, &p, 100, &Limits::DEFAULT), Ok(len));
        assert_eq!(
            measure(dev, &p[..len], 100, &Limits::DEFAULT),
            Err(WireError::Incomplete { needed: 1 })
        );
        let t = decode_device(dev, &p[..len], 100, &Limits::DEFAULT).unwrap();
        assert_eq!(t.get("a").unwrap().as_u64(), Some(7));
        let s = t.get("s").unwrap();
        assert_eq!(s.children.len(), 2);
        assert_eq!(s.children[1].child("y").unwrap().as_u64(), Some(4));
        assert_eq!(s.children[1].offset, 107);
        assert_eq!(t.get("p").unwrap().kind, NodeKind::Null);
        let sub = t.get("d/sub").unwrap();
        assert_eq!(sub.children[0].as_u64(), Some(9));
        // An unknown subsection with the parent's prefix.
        let mut q = p[..13].to_vec();
        q.extend_from_slice(&[5, 5, b'd', b'/', b'z', b'z', b'z', 0, 0, 0, 1, 9]);
        assert_eq!(
            decode_device(dev, &q, 0, &Limits::DEFAULT),
            Err(WireError::invalid(13, Rule::DevSubsection, 5))
        );
        // A known subsection newer than described: rejected at its version field.
        let mut q = p[..13].to_vec();
        q.extend_from_slice(&[5, 5, b'd', b'/', b's', b'u', b'b', 0, 0, 0, 2, 9]);
        assert_eq!(
            decode_device(dev, &q, 0, &Limits::DEFAULT),
            Err(WireError::invalid(20, Rule::DevSubsection, 2))
        );
        // A wrong null marker.
        let mut q = p[..13].to_vec();
        q[12] = 0x31;
        assert_eq!(
            decode_device(dev, &q, 0, &Limits::DEFAULT),
            Err(WireError::invalid(12, Rule::DevSchema, 0x31))
        );
    }

    #[test]
    fn null_pointer_element_described_as_its_struct() {
        let j = br#"{"page_size":4096,"devices":[{"name":"d","instance_id":0,"vmsd_name":"d","version":1,
          "fields":[{"name":"q","type":"struct","size":1,"index":0,"struct":{"vmsd_name":"e","version":1,
                       "fields":[{"name":"y","type":"uint32","size":4}]}},
                    {"name":"q","type":"struct","size":4,"index":1,"struct":{"vmsd_name":"e","version":1,
                       "fields":[{"name":"y","type":"uint32","size":4}]}}]}]}"#;
        let desc = VmDesc::parse(j, 0, &Limits::DEFAULT).unwrap();
        let dev = desc.device(b"d", 0).unwrap();
        let t = decode_device(dev, &[0x30, 0, 0, 0, 5], 0, &Limits::DEFAULT).unwrap();
        assert_eq!(t.nodes[0].kind, NodeKind::Null);
        assert_eq!(t.nodes[1].children[0].as_u64(), Some(5));
    }
}
