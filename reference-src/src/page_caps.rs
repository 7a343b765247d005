//! The page-encoding capabilities of qmig-src: `xbzrle`, `compress` (QEMU 7.2 only) and
//! `x-ignore-shared`, with their parameters.
//!
//! This module owns which of those capabilities a profile accepts (`compress` is refused with a
//! 10.x profile, as QEMU removed it), the parameters `xbzrle-cache-size` (QEMU's checks: at
//! least one target page, a power of two; default 64 MiB), `compress-level` (0..=9, default 1)
//! and `compress-threads` (1..=255, default 8: accepted and reported, but qmig-src compresses on
//! its migration thread), and the [`PageCaps`] a migration starts with. The encodings
//! themselves are the protocol crate's (`qmig_protocol::ram::page_codec`); zlib is
//! `miniz_oxide` through the protocol crate's `compress` feature.
//!
//! `x-ignore-shared`: QEMU then skips RAM blocks backed by shared memory (the destination
//! maps the same memory). qmig-src's guest RAM is private anonymous memory, so no block is
//! shared and every block is sent; the capability still changes the wire (the configuration
//! section lists it, and each MEM_SIZE entry carries the block's region address).

use std::sync::atomic::{AtomicU64, Ordering};

use qmig_host::qmp_types::MigrationParameters;
use qmig_protocol::profile::{Profile, Version};
use qmig_protocol::ram::page_codec::{check_cache_size, CacheSizeError, PageCaps};
use serde_json::{json, Map, Value};

/// The capability names this module handles.
pub const PAGE_CAPS: &[&str] = &["xbzrle", "compress", "x-ignore-shared"];

/// QEMU's default `xbzrle-cache-size`.
pub const DEFAULT_XBZRLE_CACHE_SIZE: u64 = 64 << 20;
/// QEMU's default `compress-level`.
pub const DEFAULT_COMPRESS_LEVEL: u64 = 1;
/// QEMU's default `compress-threads`.
pub const DEFAULT_COMPRESS_THREADS: u64 = 8;

/// The parameters, shared between the QMP thread and the migration thread.
#[derive(Debug)]
pub struct PageParams {
    /// `xbzrle-cache-size`, bytes.
    pub xbzrle_cache_size: AtomicU64,
    /// `compress-level`.
    pub compress_level: AtomicU64,
    /// `compress-threads` (reported only).
    pub compress_threads: AtomicU64,
}

impl Default for PageParams {
    fn default() -> Self {
        PageParams {
            xbzrle_cache_size: AtomicU64::new(DEFAULT_XBZRLE_CACHE_SIZE),
            compress_level: AtomicU64::new(DEFAULT_COMPRESS_LEVEL),
            compress_threads: AtomicU64::new(DEFAULT_COMPRESS_THREADS),
        }
    }
}

/// Whether `profile` accepts capability `name` (one of [`PAGE_CAPS`]) turned on; the QMP error
/// text if not.
pub fn check_cap(profile: &Profile, name: &str, on: bool) -> Result<(), String> {
    if on && name == "compress" && profile.version != Version::V7_2 {
        return Err(
            "capability 'compress' was removed in QEMU 9.1; qmig-src offers it only with a 7.2 profile"
                .into(),
        );
    }
    Ok(())
}

/// Checks the capabilities that would be on together (QEMU refuses postcopy with compress, and
/// multifd with postcopy or compress).
pub fn check_combination(on: &dyn Fn(&str) -> bool) -> Result<(), String> {
    if on("compress") && on("postcopy-ram") {
        return Err("Postcopy is not currently compatible with compression".into());
    }
    if on("multifd") && on("postcopy-ram") {
        return Err("Postcopy is not yet compatible with multifd".into());
    }
    if on("multifd") && on("compress") {
        return Err("Multifd is not compatible with compress".into());
    }
    Ok(())
}

impl PageParams {
    /// Applies the parameters of a `migrate-set-parameters` that concern page encodings; all
    /// are checked before any is stored.
    pub fn set(&self, p: &MigrationParameters, target_page_size: u64) -> Result<(), String> {
        if let Some(s) = p.xbzrle_cache_size {
            check_cache_size(s, target_page_size).map_err(|e| match e {
                CacheSizeError::TooSmall => {
                    "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size".to_owned()
                }
                CacheSizeError::NotPowerOfTwo => {
                    "Parameter 'xbzrle_cache_size' expects a power of two no less than the target page size".to_owned()
                }
            })?;
        }
        let level = get_u64(&p.other, "compress-level")?;
        if level.is_some_and(|l| l > 9) {
            return Err("Parameter 'compress_level' expects a value between 0 and 9".into());
        }
        let threads = get_u64(&p.other, "compress-threads")?;
        if threads.is_some_and(|t| !(1..=255).contains(&t)) {
            return Err("Parameter 'compress_threads' expects a value between 1 and 255".into());
        }
        if let Some(s) = p.xbzrle_cache_size {
            self.xbzrle_cache_size.store(s, Ordering::Relaxed);
        }
        if let Some(l) = level {
            self.compress_level.store(l, Ordering::Relaxed);
        }
        if let Some(t) = threads {
            self.compress_threads.store(t, Ordering::Relaxed);
        }
        Ok(())
    }

    /// Adds the parameters to a `query-migrate-parameters` answer.
    pub fn query(&self, p: &mut MigrationParameters, profile: &Profile) {
        p.xbzrle_cache_size = Some(self.xbzrle_cache_size.load(Ordering::Relaxed));
        if profile.version == Version::V7_2 {
            p.other.insert(
                "compress-level".into(),
                json!(self.compress_level.load(Ordering::Relaxed)),
            );
            p.other.insert(
                "compress-threads".into(),
                json!(self.compress_threads.load(Ordering::Relaxed)),
            );
        }
    }

    /// The page encodings a migration starts with, from the capabilities that are on.
    pub fn caps(&self, on: &dyn Fn(&str) -> bool) -> PageCaps {
        PageCaps {
            xbzrle_cache_size: on("xbzrle").then(|| self.xbzrle_cache_size.load(Ordering::Relaxed)),
            compress_level: on("compress")
                .then(|| self.compress_level.load(Ordering::Relaxed).min(9) as u8),
            ignore_shared: on("x-ignore-shared"),
        }
    }
}

fn get_u64(m: &Map<String, Value>, name: &str) -> Result<Option<u64>, String> {
    match m.get(name) {
        None => Ok(None),
        Some(v) => v
            .as_u64()
            .map(Some)
            .ok_or_else(|| format!("Parameter '{name}' expects an unsigned integer")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn compress_only_with_72_and_never_with_postcopy() {
        assert_eq!(check_cap(&Profile::QEMU_7_2, "compress", true), Ok(()));
        assert!(check_cap(&Profile::QEMU_10, "compress", true)
            .unwrap_err()
            .contains("removed"));
        assert_eq!(check_cap(&Profile::QEMU_10, "compress", false), Ok(()));
        assert_eq!(check_cap(&Profile::QEMU_10, "xbzrle", true), Ok(()));
        assert!(check_combination(&|c| c == "compress" || c == "postcopy-ram").is_err());
        assert!(check_combination(&|c| c == "xbzrle" || c == "postcopy-ram").is_ok());
    }

    #[test]
    fn parameters_are_checked_then_stored() {
        let p = PageParams::default();
        let mut m = MigrationParameters {
            xbzrle_cache_size: Some(3 << 12),
            ..MigrationParameters::default()
        };
        assert!(p.set(&m, 4096).is_err());
        m.xbzrle_cache_size = Some(1 << 20);
        m.other.insert("compress-level".into(), json!(10));
        assert!(p.set(&m, 4096).is_err());
        assert_eq!(p.xbzrle_cache_size.load(Ordering::Relaxed), 64 << 20);
        m.other.insert("compress-level".into(), json!(6));
        m.other.insert("compress-threads".into(), json!(2));
        p.set(&m, 4096).unwrap();
        let caps = p.caps(&|c| c != "x-ignore-shared");
        assert_eq!(
            caps,
            PageCaps {
                xbzrle_cache_size: Some(1 << 20),
                compress_level: Some(6),
                ignore_shared: false
            }
        );
        let mut q = MigrationParameters::default();
        p.query(&mut q, &Profile::QEMU_7_2);
        assert_eq!(q.other["compress-threads"], json!(2));
    }
}
