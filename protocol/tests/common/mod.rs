//! Shared test helpers: discovery of the conformance vectors and their manifests.
//!
//! Generic on purpose (used by several test files): a vector is a directory
//! `conformance/vectors/qemu-<version>/<name>/` with a `manifest.json`, loaded as a
//! `serde_json::Value`; files are read on demand.
#![allow(dead_code)]

use qmig_protocol::profile::Profile;
use serde_json::Value;
use std::path::{Path, PathBuf};

/// One vector directory.
pub struct VectorDir {
    /// `qemu-7.2` or `qemu-10.0`.
    pub version: String,
    /// The scenario name, e.g. `postcopy-recover`.
    pub name: String,
    /// The directory.
    pub path: PathBuf,
    /// The parsed `manifest.json`.
    pub manifest: Value,
}

impl VectorDir {
    /// The QEMU profile matching the vector's version.
    pub fn profile(&self) -> Profile {
        if self.version.starts_with("qemu-7.2") {
            Profile::QEMU_7_2
        } else {
            Profile::QEMU_10
        }
    }

    /// The bytes of a file of the vector.
    pub fn read(&self, file: &str) -> Vec<u8> {
        std::fs::read(self.path.join(file)).unwrap_or_else(|e| panic!("{}/{file}: {e}", self.id()))
    }

    /// Whether the vector has this file.
    pub fn has(&self, file: &str) -> bool {
        self.path.join(file).exists()
    }

    /// `qemu-<version>/<name>`.
    pub fn id(&self) -> String {
        format!("{}/{}", self.version, self.name)
    }

    /// The manifest's channels.
    pub fn channels(&self) -> &[Value] {
        self.manifest["channels"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// The vectors root.
pub fn vectors_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../conformance/vectors")
}

/// Every vector captured from real QEMU (`qemu-*` folders), sorted by version then name. The
/// synthetic vectors (`synthetic/`) are the conformance runner's: they are single-rule cases,
/// some without a main stream.
pub fn vectors() -> Vec<VectorDir> {
    let root = vectors_root();
    let mut out = Vec::new();
    let mut versions: Vec<_> = std::fs::read_dir(&root)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| {
            p.is_dir()
                && p.file_name()
                    .is_some_and(|n| n.to_string_lossy().starts_with("qemu-"))
        })
        .collect();
    versions.sort();
    for v in versions {
        let mut dirs: Vec<_> = std::fs::read_dir(&v)
            .unwrap()
            .map(|e| e.unwrap().path())
            .filter(|p| p.join("manifest.json").exists())
            .collect();
        dirs.sort();
        for d in dirs {
            let manifest: Value =
                serde_json::from_slice(&std::fs::read(d.join("manifest.json")).unwrap()).unwrap();
            out.push(VectorDir {
                version: v.file_name().unwrap().to_string_lossy().into_owned(),
                name: d.file_name().unwrap().to_string_lossy().into_owned(),
                path: d,
                manifest,
            });
        }
    }
    out
}

/// One vector by version folder and name.
pub fn vector(version: &str, name: &str) -> VectorDir {
    vectors()
        .into_iter()
        .find(|v| v.version == version && v.name == name)
        .unwrap_or_else(|| panic!("no vector {version}/{name}"))
}

/// Lower-case hex.
pub fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}
