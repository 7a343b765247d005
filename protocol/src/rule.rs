//! Stable rule identifiers.
//!
//! Every normative statement of the qmig specification (`spec/`) has an id such as `CMD-LEN` or
//! `RP-BITMAP-ENDMARK`. Every check in this crate that rejects input names the rule it enforces,
//! so an error can be traced to the sentence of the spec that it applies, and a conformance
//! vector can say which rule it exercises. This module owns the list; `spec/` must define each id
//! and a CI test keeps the two in step.

macro_rules! rules {
    ($( $(#[$doc:meta])* $variant:ident = $id:literal, $summary:literal; )*) => {
        /// A rule of the specification. `id()` is the stable text form used by the spec,
        /// error messages, conformance vectors and reports.
        #[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord)]
        #[non_exhaustive]
        pub enum Rule {
            $( $(#[$doc])* #[doc = $summary] $variant, )*
        }

        impl Rule {
            /// Every rule, in declaration order.
            pub const ALL: &'static [Rule] = &[ $( Rule::$variant, )* ];

            /// The stable identifier, e.g. `"CMD-LEN"`.
            pub const fn id(self) -> &'static str {
                match self { $( Rule::$variant => $id, )* }
            }

            /// A one-line statement of what the rule requires.
            pub const fn summary(self) -> &'static str {
                match self { $( Rule::$variant => $summary, )* }
            }

            /// Looks a rule up by its stable identifier.
            pub fn from_id(id: &str) -> Option<Rule> {
                match id { $( $id => Some(Rule::$variant), )* _ => None }
            }
        }
    };
}

rules! {
    // --- stream header and configuration -------------------------------------------------
    HdrMagic = "HDR-MAGIC", "a main stream starts with the be32 magic 0x5145564D (\"QEVM\")";
    HdrVersion = "HDR-VERSION", "the be32 after the magic is the stream version 3";
    CfgPresent = "CFG-PRESENT", "the configuration section (0x07) follows the header when the receiver expects it";
    CfgNameLen = "CFG-NAME-LEN", "the configuration's be32 machine-name length is 1..=256";
    CfgMachine = "CFG-MACHINE", "the machine name is a prefix of the receiver's machine name";
    CfgSubsection = "CFG-SUBSECTION", "a configuration subsection has a known name and version 1";
    CfgCapsCount = "CFG-CAPS-COUNT", "the capability count of configuration/capabilities is at most the cap (64)";
    CfgCapName = "CFG-CAP-NAME", "a capability named in configuration/capabilities is known to the profile";
    Str8Empty = "STR8-EMPTY", "a counted string (u8 length, bytes) is 1..=255 bytes long";
    // --- sections ----------------------------------------------------------------------
    SecType = "SEC-TYPE", "a top-level record starts with a known section type byte";
    SecSubsectionTop = "SEC-SUBSECTION-TOP", "QEMU_VM_SUBSECTION (0x05) never appears at top level";
    SecUnknownId = "SEC-UNKNOWN-ID", "SECTION_PART/END name a section id opened by SECTION_START";
    SecDuplicateId = "SEC-DUPLICATE-ID", "a SECTION_START/FULL does not reuse an id bound to another idstr/instance";
    SecFooter = "SEC-FOOTER", "every START/PART/END/FULL section ends with the footer byte 0x7E";
    SecFooterId = "SEC-FOOTER-ID", "the footer's be32 section id equals the section header's id";
    SecDelimit = "SEC-DELIMIT", "a device section's payload is delimited by its VM description or a unique footer";
    SecDeviceLen = "SEC-DEVICE-LEN", "a device payload is at most the device cap (1 MiB)";
    SecUnknownDevice = "SEC-UNKNOWN-DEVICE", "a section names a device (idstr, instance) the receiver has";
    SecVersion = "SEC-VERSION", "a section's version is not newer than the receiver's";
    VmdescPlace = "VMDESC-PLACE", "QEMU_VM_VMDESCRIPTION (0x06) appears only right after the final EOF";
    VmdescLen = "VMDESC-LEN", "the VM description's be32 length is at most the cap (16 MiB)";
    VmdescJson = "VMDESC-JSON", "the VM description is UTF-8 JSON of the documented shape";
    EofTrailing = "EOF-TRAILING", "nothing follows EOF except one VM description";
    StreamTruncated = "STREAM-TRUNCATED", "a channel that ends (closed, or a file at its end) ends on a record boundary, after EOF for a complete stream";
    // --- commands ------------------------------------------------------------------------
    CmdUnknown = "CMD-UNKNOWN", "a command code is 1..=10 (7.2) or 1..=11 (10.x)";
    CmdLen = "CMD-LEN", "a fixed-length command's be16 length equals its table length";
    CmdAdviseLen = "CMD-ADVISE-LEN", "POSTCOPY_ADVISE is 16 bytes with postcopy-ram and 0 bytes without";
    CmdAdvisePageSize = "CMD-ADVISE-PAGESIZE", "ADVISE's page-size summary and target page size equal the receiver's";
    CmdDiscardLen = "CMD-DISCARD-LEN", "a RAM_DISCARD body is version, name, NUL and a whole number of 16-byte ranges";
    CmdDiscardVersion = "CMD-DISCARD-VERSION", "the RAM_DISCARD version byte is 0";
    CmdDiscardTerm = "CMD-DISCARD-TERM", "the RAM_DISCARD block name is followed by a 0x00 byte";
    CmdDiscardRange = "CMD-DISCARD-RANGE", "a discarded range is page-aligned and inside its block";
    CmdPackagedLen = "CMD-PACKAGED-LEN", "a PACKAGED blob is at most the cap (16 MiB)";
    CmdPackagedContent = "CMD-PACKAGED-CONTENT", "a PACKAGED blob holds whole commands and sections, no header, EOF or nested package";
    CmdRecvBitmapLen = "CMD-RECV-BITMAP-LEN", "RECV_BITMAP's length is exactly 1 + the name length";
    CmdBlockUnknown = "CMD-BLOCK-UNKNOWN", "a block named by a command exists on the receiver";
    CmdOrder = "CMD-ORDER", "a command arrives only in a state that allows it";
    CmdPingNoRp = "CMD-PING-NO-RP", "PING is sent only after OPEN_RETURN_PATH";
    // --- return path -----------------------------------------------------------------------
    RpType = "RP-TYPE", "a return-path message type is 1..=6 (7.2) or 1..=7 (10.x)";
    RpLen = "RP-LEN", "a fixed-length return-path message has its table length";
    RpLenMax = "RP-LEN-MAX", "a return-path message's be16 length is at most 512";
    RpReqIdLen = "RP-REQ-ID-LEN", "REQ_PAGES_ID's length is exactly 13 + the name length";
    RpReqNoBlock = "RP-REQ-NO-BLOCK", "REQ_PAGES follows a REQ_PAGES_ID on the same connection";
    RpReqRange = "RP-REQ-RANGE", "a page request is page-aligned and inside its block";
    RpBitmapLen = "RP-BITMAP-LEN", "RECV_BITMAP's length is exactly 1 + the name length";
    RpBitmapSize = "RP-BITMAP-SIZE", "the bitmap size is ROUND_UP(ceil(pages/8), 8) for the named block";
    RpBitmapEndmark = "RP-BITMAP-ENDMARK", "the bitmap is followed by the be64 end mark 0x0123456789ABCDEF";
    RpResumeAckValue = "RP-RESUME-ACK-VALUE", "RESUME_ACK carries the value 1";
    RpShutError = "RP-SHUT-ERROR", "SHUT carries 0 on success; any other value fails the migration";
    RpOrder = "RP-ORDER", "a return-path message arrives only in a state that allows it";
    RpAtomic = "RP-ATOMIC", "a return-path message, with a RECV_BITMAP body, is written whole, never interleaved";
    RpPongUnknown = "RP-PONG-UNKNOWN", "a PONG echoes a value the source has sent in a PING";
    // --- RAM section ---------------------------------------------------------------------
    RamVersion = "RAM-VERSION", "the RAM section (idstr \"ram\") has version 4";
    RamFlags = "RAM-FLAGS", "a RAM record has exactly one type flag, besides CONTINUE";
    RamFlagProfile = "RAM-FLAG-PROFILE", "a RAM flag is legal in the profile (COMPRESS_PAGE 7.2 only, MULTIFD_FLUSH 10.x only)";
    RamContinue = "RAM-CONTINUE", "CONTINUE is used only after an earlier page record on the same channel named a block";
    RamBlockUnknown = "RAM-BLOCK-UNKNOWN", "a RAM record names a block announced by MEM_SIZE";
    RamOffset = "RAM-OFFSET", "a page record's offset is target-page aligned and inside its block";
    RamMemSizeSum = "RAM-MEMSIZE-SUM", "the MEM_SIZE block lengths add up exactly to the announced total";
    RamMemSizeCount = "RAM-MEMSIZE-COUNT", "MEM_SIZE announces at most the cap (1024) blocks";
    RamMemSizePlace = "RAM-MEMSIZE-PLACE", "MEM_SIZE appears only in the RAM SECTION_START";
    RamZeroFill = "RAM-ZERO-FILL", "a ZERO record's fill byte is 0 (10.x rejects others)";
    RamXbzrleEnc = "RAM-XBZRLE-ENC", "an XBZRLE record's encoding byte is 0x01";
    RamXbzrleLen = "RAM-XBZRLE-LEN", "an XBZRLE delta is at most one target page long";
    RamXbzrleDecode = "RAM-XBZRLE-DECODE", "an XBZRLE delta decodes without overrunning the page";
    RamXbzrleBase = "RAM-XBZRLE-BASE", "an XBZRLE delta applies to a page that was received before";
    RamCompressLen = "RAM-COMPRESS-LEN", "a COMPRESS_PAGE length is at most compressBound(target page)";
    RamCompressDecode = "RAM-COMPRESS-DECODE", "a COMPRESS_PAGE body inflates to exactly one target page";
    RamPostcopyFlag = "RAM-POSTCOPY-FLAG", "in postcopy only ZERO, PAGE, EOS (and 7.2 COMPRESS_PAGE) records appear";
    RamHostPage = "RAM-HOSTPAGE", "in postcopy the target pages of one host page arrive consecutively on one channel";
    RamHook = "RAM-HOOK", "RDMA HOOK records are not supported over a byte stream";
    RamPageSize = "RAM-PAGESIZE", "a block's page size equals the receiver's block page size";
    RamEos = "RAM-EOS", "each RAM section payload ends with an EOS record before the footer";
    RamApply = "RAM-APPLY", "page records apply in stream order, each wholly or not at all; postcopy never overwrites a placed page";
    // --- received bitmap ---------------------------------------------------------------------
    BitmapLe = "BITMAP-LE", "bit i of a received bitmap is bit (i mod 8) of byte (i div 8), words little-endian";
    BitmapPadding = "BITMAP-PADDING", "bits past the block's last page are zero";
    BitmapMark = "BITMAP-MARK", "a received bit is set only once its page is wholly received and placed; ADVISE and DISCARD clear it";
    // --- device state ------------------------------------------------------------------------
    DevSchema = "DEV-SCHEMA", "a device payload matches its VM-description fields exactly";
    DevSubsection = "DEV-SUBSECTION", "a device subsection is known to its parent's description";
    DevNesting = "DEV-NESTING", "device descriptions nest at most 32 levels";
    // --- multifd (recognised) ------------------------------------------------------------------
    MfdMagic = "MFD-MAGIC", "a multifd packet starts with be32 0x11223344";
    MfdVersion = "MFD-VERSION", "a multifd packet has version 1";
    MfdPages = "MFD-PAGES", "normal_pages (+ zero_pages) fit in pages_alloc, at most 128";
    MfdChannel = "MFD-CHANNEL", "a multifd connection is configured and its init packet names a channel id below multifd-channels, each once";
    MfdFlags = "MFD-FLAGS", "a multifd packet's compression and device-state flags match what the receiver negotiated";
    MfdSync = "MFD-SYNC", "each multifd channel's SYNC packets match the main channel's sync points; no page follows the last";
    // --- state machines --------------------------------------------------------------------
    SmFatalBeforeRun = "SM-FATAL-BEFORE-RUN", "an error before POSTCOPY_RUN fails the migration";
    SmPauseAfterRun = "SM-PAUSE-AFTER-RUN", "an error or channel loss after POSTCOPY_RUN pauses the migration";
    SmPauseInRecover = "SM-PAUSE-IN-RECOVER", "an error or channel loss in postcopy-recover returns to postcopy-paused";
    SmPartialHostPage = "SM-PARTIAL-HOSTPAGE", "a host page not fully received when a channel fails is dropped";
    SmRecoverNoHeader = "SM-RECOVER-NO-HEADER", "a recovery channel starts without header, with RECV_BITMAP";
    SmRecoverBitmapAll = "SM-RECOVER-BITMAP-ALL", "the source sends RECV_BITMAP for every RAM block before POSTCOPY_RESUME";
    SmRebuild = "SM-REBUILD", "after recovery the source's dirty bitmap is NOT(received) minus discarded ranges";
    SmResumeState = "SM-RESUME-STATE", "POSTCOPY_RESUME is acted on only in postcopy-recover";
    SmRerequest = "SM-REREQUEST", "after RESUME_ACK the destination re-requests every page a fault still waits for";
    SmFirstReqNamed = "SM-FIRST-REQ-NAMED", "the first page request on a connection names its block";
    SmUrgentFirst = "SM-URGENT-FIRST", "requested pages are sent before background pages";
    SmDiscardDirty = "SM-DISCARD-DIRTY", "at the postcopy switch the source discards every page dirty since its last send";
    SmShutLast = "SM-SHUT-LAST", "the destination sends SHUT last, after the stream's EOF";
    SmCancel = "SM-CANCEL", "cancel from any non-final state ends in cancelled and releases every wait";
    SmPong = "SM-PONG", "the destination answers every PING with a PONG of the same value";
    SmSwitchoverStart = "SM-SWITCHOVER-START", "a source sends SWITCHOVER_START only to a 10.x destination";
    SmTimeout = "SM-TIMEOUT", "a channel silent for longer than the configured bound counts as failed";
}

impl core::fmt::Display for Rule {
    fn fmt(&self, f: &mut core::fmt::Formatter<'_>) -> core::fmt::Result {
        f.write_str(self.id())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ids_are_unique_and_round_trip() {
        for (i, a) in Rule::ALL.iter().enumerate() {
            assert_eq!(Rule::from_id(a.id()), Some(*a));
            for b in &Rule::ALL[i + 1..] {
                assert_ne!(a.id(), b.id());
            }
        }
    }
}
