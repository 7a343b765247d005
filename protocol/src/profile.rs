//! Version profiles: which codes and flags a QEMU version sends and accepts.
//!
//! The decoder reads any code; the profile decides whether it is legal for the peer's version
//! and how a version-dependent behaviour goes (PING values, SWITCHOVER_START, recover-setup).

use crate::codes::{CommandCode, RamFlags, RpType};

/// A QEMU version family whose wire behaviour qmig implements.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Version {
    /// QEMU 7.2 (Debian bookworm).
    V7_2,
    /// QEMU 10.0 .. 10.2.
    V10,
}

/// Wire-level knobs of one side's profile.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Profile {
    /// The version family.
    pub version: Version,
    /// Target page size in bytes (4096 on x86).
    pub target_page_size: u32,
    /// Whether sections carry footers (`send-section-footer`, on for every modern machine).
    pub section_footers: bool,
    /// Whether the configuration section is sent/expected (`send-configuration`).
    pub configuration: bool,
    /// Whether a 10.x source sends MIG_CMD_SWITCHOVER_START (`send-switchover-start`).
    pub switchover_start: bool,
}

impl Profile {
    /// QEMU 7.2 defaults on x86.
    pub const QEMU_7_2: Profile = Profile {
        version: Version::V7_2,
        target_page_size: 4096,
        section_footers: true,
        configuration: true,
        switchover_start: false,
    };

    /// QEMU 10.x defaults on x86.
    pub const QEMU_10: Profile = Profile {
        version: Version::V10,
        target_page_size: 4096,
        section_footers: true,
        configuration: true,
        switchover_start: true,
    };

    /// The profile for a version's defaults.
    pub const fn for_version(version: Version) -> Profile {
        match version {
            Version::V7_2 => Self::QEMU_7_2,
            Version::V10 => Self::QEMU_10,
        }
    }

    /// Mask of the flag bits in a RAM record header word (`target_page_size - 1`).
    #[inline]
    pub const fn flag_mask(&self) -> u64 {
        self.target_page_size as u64 - 1
    }

    /// Whether a command code is legal (`MIG_CMD_MAX` is 11 in 7.2, 12 in 10.x).
    pub const fn command_legal(&self, code: CommandCode) -> bool {
        match self.version {
            Version::V7_2 => code.0 >= 1 && code.0 <= 10,
            Version::V10 => code.0 >= 1 && code.0 <= 11,
        }
    }

    /// Whether a return-path message type is legal (`MIG_RP_MSG_MAX`: 7 in 7.2, 8 in 10.x).
    pub const fn rp_type_legal(&self, ty: RpType) -> bool {
        match self.version {
            Version::V7_2 => ty.0 >= 1 && ty.0 <= 6,
            Version::V10 => ty.0 >= 1 && ty.0 <= 7,
        }
    }

    /// Whether a RAM record type flag (without CONTINUE) is legal in this profile.
    pub const fn ram_flag_legal(&self, kind: RamFlags) -> bool {
        match kind.0 {
            0x002 | 0x004 | 0x008 | 0x010 | 0x040 => true,
            0x100 => matches!(self.version, Version::V7_2),
            0x200 => matches!(self.version, Version::V10),
            _ => false,
        }
    }

    /// Whether a ZERO record's fill byte must be 0 (10.x rejects others).
    pub const fn zero_fill_must_be_zero(&self) -> bool {
        matches!(self.version, Version::V10)
    }

    /// Whether the source side of this profile has the `postcopy-recover-setup` status.
    pub const fn has_recover_setup(&self) -> bool {
        matches!(self.version, Version::V10)
    }

    /// Whether the destination side of this profile survives a failure in postcopy-recover
    /// (QEMU 7.2 does not; qmig always does).
    pub const fn survives_failure_in_recover(&self) -> bool {
        matches!(self.version, Version::V10)
    }
}

impl Default for Profile {
    fn default() -> Self {
        Profile::QEMU_10
    }
}
