//! Finding and loading vectors: any directory holding `manifest.json` files of format
//! `qemu-migration-vector/1`, at any depth, in or outside the repository.

use std::path::{Path, PathBuf};

use anyhow::Context;
use qmig_protocol::Profile;
use serde_json::Value;

/// One vector folder.
#[derive(Clone, Debug)]
pub struct Vector {
    /// `<parent folder>/<vector folder>`, e.g. `qemu-7.2/postcopy-recover`.
    pub id: String,
    /// The folder.
    pub dir: PathBuf,
    /// The parsed manifest.
    pub manifest: Value,
}

impl Vector {
    /// Reads a file of the vector.
    pub fn read(&self, name: &str) -> anyhow::Result<Vec<u8>> {
        let p = self.dir.join(name);
        std::fs::read(&p).with_context(|| format!("{}", p.display()))
    }

    /// Whether the vector has file `name`.
    pub fn has(&self, name: &str) -> bool {
        self.dir.join(name).is_file()
    }

    /// The synthetic object, for generated vectors.
    pub fn synthetic(&self) -> Option<&Value> {
        self.manifest.get("synthetic").filter(|v| v.is_object())
    }

    /// The wire profile: `synthetic.profile`, else from `qemu.version_string`.
    pub fn profile(&self) -> Profile {
        let s = self
            .synthetic()
            .and_then(|s| s["profile"].as_str())
            .map(str::to_owned)
            .or_else(|| {
                self.manifest["qemu"]["version_string"]
                    .as_str()
                    .map(str::to_owned)
            })
            .unwrap_or_default();
        if s == "7.2" || s.contains("version 7.") {
            Profile::QEMU_7_2
        } else {
            Profile::QEMU_10
        }
    }

    /// `7.2` or `10.0` (the QEMU a replay against QEMU needs).
    pub fn qemu_version(&self) -> &'static str {
        if self.profile() == Profile::QEMU_7_2 {
            "7.2"
        } else {
            "10.0"
        }
    }

    /// The manifest's `channels`.
    pub fn channels(&self) -> &[Value] {
        self.manifest["channels"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }

    /// The manifest's `replay.channels`.
    pub fn replay_channels(&self) -> &[Value] {
        self.manifest["replay"]["channels"]
            .as_array()
            .map(Vec::as_slice)
            .unwrap_or(&[])
    }
}

/// Every vector under `root` (recursively), sorted by id.
pub fn discover(root: &Path) -> anyhow::Result<Vec<Vector>> {
    let mut out = Vec::new();
    walk(root, root, &mut out)?;
    out.sort_by(|a, b| a.id.cmp(&b.id));
    Ok(out)
}

fn walk(root: &Path, dir: &Path, out: &mut Vec<Vector>) -> anyhow::Result<()> {
    let m = dir.join("manifest.json");
    if m.is_file() {
        let text = std::fs::read(&m).with_context(|| format!("{}", m.display()))?;
        let manifest: Value =
            serde_json::from_slice(&text).with_context(|| format!("{}", m.display()))?;
        if manifest["format"] == "qemu-migration-vector/1" {
            let id = match (dir.parent().and_then(Path::file_name), dir.file_name()) {
                (Some(p), Some(d)) if dir != root => {
                    format!("{}/{}", p.to_string_lossy(), d.to_string_lossy())
                }
                (_, Some(d)) => d.to_string_lossy().into_owned(),
                _ => dir.display().to_string(),
            };
            out.push(Vector {
                id,
                dir: dir.to_path_buf(),
                manifest,
            });
        }
        return Ok(());
    }
    let rd = std::fs::read_dir(dir).with_context(|| format!("{}", dir.display()))?;
    let mut subdirs: Vec<PathBuf> = rd
        .filter_map(|e| e.ok())
        .map(|e| e.path())
        .filter(|p| p.is_dir())
        .collect();
    subdirs.sort();
    for d in subdirs {
        walk(root, &d, out)?;
    }
    Ok(())
}

/// The default vector directory: the repository's `conformance/vectors`.
pub fn default_dir() -> PathBuf {
    PathBuf::from(concat!(env!("CARGO_MANIFEST_DIR"), "/vectors"))
}
