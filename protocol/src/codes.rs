//! Open wire codes.
//!
//! Every numeric code on the wire is an open newtype: any value decodes, known values have
//! named constants, and unknown values print in hex. Whether a value is *legal* is decided by
//! the [`Profile`](crate::profile::Profile), not by the decoder, so that a 10.x code read under
//! a 7.2 profile is reported as a profile violation at the right offset.

macro_rules! open_code {
    ($(#[$doc:meta])* $name:ident($ty:ty) { $( $(#[$cdoc:meta])* $konst:ident = $val:literal => $text:literal, )* }) => {
        $(#[$doc])*
        #[derive(Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
        pub struct $name(pub $ty);

        impl $name {
            $( $(#[$cdoc])* pub const $konst: $name = $name($val); )*

            /// QEMU's name for a known code, `None` for an unknown one.
            pub const fn name(self) -> Option<&'static str> {
                match self.0 { $( $val => Some($text), )* _ => None }
            }
        }

        impl core::fmt::Debug for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                match self.name() {
                    Some(n) => f.write_str(n),
                    None => write!(f, "{}({:#x})", stringify!($name), self.0),
                }
            }
        }

        impl core::fmt::Display for $name {
            fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
                core::fmt::Debug::fmt(self, f)
            }
        }
    };
}

open_code! {
    /// Top-level section type byte (`QEMU_VM_*`).
    SectionType(u8) {
        /// End of the stream.
        EOF = 0x00 => "EOF",
        /// First part of an iterative device (RAM).
        START = 0x01 => "SECTION_START",
        /// Middle part of an iterative device.
        PART = 0x02 => "SECTION_PART",
        /// Last part of an iterative device.
        END = 0x03 => "SECTION_END",
        /// Whole state of a non-iterative device.
        FULL = 0x04 => "SECTION_FULL",
        /// Subsection; only inside device data.
        SUBSECTION = 0x05 => "SUBSECTION",
        /// Trailing JSON VM description.
        VMDESCRIPTION = 0x06 => "VMDESCRIPTION",
        /// Configuration section, right after the header.
        CONFIGURATION = 0x07 => "CONFIGURATION",
        /// A command (`MIG_CMD_*`).
        COMMAND = 0x08 => "COMMAND",
        /// Section footer.
        FOOTER = 0x7e => "SECTION_FOOTER",
    }
}

open_code! {
    /// Command code (`MIG_CMD_*`).
    CommandCode(u16) {
        /// Never valid.
        INVALID = 0 => "MIG_CMD_INVALID",
        /// Open the return path on the same connection.
        OPEN_RETURN_PATH = 1 => "MIG_CMD_OPEN_RETURN_PATH",
        /// Ask for a PONG.
        PING = 2 => "MIG_CMD_PING",
        /// Announce postcopy.
        POSTCOPY_ADVISE = 3 => "MIG_CMD_POSTCOPY_ADVISE",
        /// Destination starts listening for faults.
        POSTCOPY_LISTEN = 4 => "MIG_CMD_POSTCOPY_LISTEN",
        /// Destination starts running.
        POSTCOPY_RUN = 5 => "MIG_CMD_POSTCOPY_RUN",
        /// Pages to drop before postcopy.
        POSTCOPY_RAM_DISCARD = 6 => "MIG_CMD_POSTCOPY_RAM_DISCARD",
        /// A nested stream blob.
        PACKAGED = 7 => "MIG_CMD_PACKAGED",
        /// COLO.
        ENABLE_COLO = 8 => "MIG_CMD_ENABLE_COLO",
        /// Resume after recovery.
        POSTCOPY_RESUME = 9 => "MIG_CMD_POSTCOPY_RESUME",
        /// Ask for a block's received bitmap.
        RECV_BITMAP = 10 => "MIG_CMD_RECV_BITMAP",
        /// Switchover starts (10.0+).
        SWITCHOVER_START = 11 => "MIG_CMD_SWITCHOVER_START",
    }
}

open_code! {
    /// Return-path message type (`MIG_RP_MSG_*`).
    RpType(u16) {
        /// Never valid.
        INVALID = 0 => "MIG_RP_MSG_INVALID",
        /// Destination is done (be32 error).
        SHUT = 1 => "MIG_RP_MSG_SHUT",
        /// Answer to a PING.
        PONG = 2 => "MIG_RP_MSG_PONG",
        /// Page request naming its block.
        REQ_PAGES_ID = 3 => "MIG_RP_MSG_REQ_PAGES_ID",
        /// Page request in the last named block.
        REQ_PAGES = 4 => "MIG_RP_MSG_REQ_PAGES",
        /// Received bitmap of a block (body follows outside the length).
        RECV_BITMAP = 5 => "MIG_RP_MSG_RECV_BITMAP",
        /// Resume acknowledged.
        RESUME_ACK = 6 => "MIG_RP_MSG_RESUME_ACK",
        /// Switchover may proceed (8.1+).
        SWITCHOVER_ACK = 7 => "MIG_RP_MSG_SWITCHOVER_ACK",
    }
}

/// RAM record flags (`RAM_SAVE_FLAG_*`), the low bits of a record's be64 header word.
#[derive(Clone, Copy, PartialEq, Eq, Hash, Default)]
pub struct RamFlags(pub u64);

impl RamFlags {
    /// Obsolete full-RAM flag (never sent).
    pub const FULL: RamFlags = RamFlags(0x001);
    /// Page of one repeated byte (followed by the byte).
    pub const ZERO: RamFlags = RamFlags(0x002);
    /// Block list follows; the offset part is the total byte count.
    pub const MEM_SIZE: RamFlags = RamFlags(0x004);
    /// A raw target page follows.
    pub const PAGE: RamFlags = RamFlags(0x008);
    /// End of the section's RAM data.
    pub const EOS: RamFlags = RamFlags(0x010);
    /// Same block as the previous page record on this channel: no name follows.
    pub const CONTINUE: RamFlags = RamFlags(0x020);
    /// XBZRLE-encoded page.
    pub const XBZRLE: RamFlags = RamFlags(0x040);
    /// RDMA hook.
    pub const HOOK: RamFlags = RamFlags(0x080);
    /// zlib-compressed page (7.2 only).
    pub const COMPRESS_PAGE: RamFlags = RamFlags(0x100);
    /// Multifd sync point (10.x only).
    pub const MULTIFD_FLUSH: RamFlags = RamFlags(0x200);

    /// Whether every bit of `other` is set.
    #[inline]
    pub const fn contains(self, other: RamFlags) -> bool {
        self.0 & other.0 == other.0
    }

    /// The flags without CONTINUE: the record type.
    #[inline]
    pub const fn kind(self) -> RamFlags {
        RamFlags(self.0 & !Self::CONTINUE.0)
    }

    /// Union.
    #[inline]
    pub const fn with(self, other: RamFlags) -> RamFlags {
        RamFlags(self.0 | other.0)
    }
}

impl core::fmt::Debug for RamFlags {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        const NAMES: [(u64, &str); 10] = [
            (0x001, "FULL"),
            (0x002, "ZERO"),
            (0x004, "MEM_SIZE"),
            (0x008, "PAGE"),
            (0x010, "EOS"),
            (0x020, "CONTINUE"),
            (0x040, "XBZRLE"),
            (0x080, "HOOK"),
            (0x100, "COMPRESS_PAGE"),
            (0x200, "MULTIFD_FLUSH"),
        ];
        let mut first = true;
        let mut rest = self.0;
        for (bit, name) in NAMES {
            if self.0 & bit != 0 {
                if !first {
                    f.write_str("|")?;
                }
                f.write_str(name)?;
                first = false;
                rest &= !bit;
            }
        }
        if rest != 0 || first {
            if !first {
                f.write_str("|")?;
            }
            write!(f, "{rest:#x}")?;
        }
        Ok(())
    }
}

/// The `RECV_BITMAP` body's end mark (`RAMBLOCK_RECV_BITMAP_ENDING`).
pub const RECV_BITMAP_END_MARK: u64 = 0x0123_4567_89AB_CDEF;
/// The stream magic `QEVM`.
pub const QEVM_MAGIC: u32 = 0x5145_564D;
/// The only supported stream version.
pub const QEVM_VERSION: u32 = 3;
/// The multifd packet and init-packet magic.
pub const MULTIFD_MAGIC: u32 = 0x1122_3344;
/// The RESUME_ACK value.
pub const RESUME_ACK_VALUE: u32 = 1;
/// Byte that marks a NULL pointer in a vmstate array of pointers.
pub const VMS_NULLPTR_MARKER: u8 = 0x30;
