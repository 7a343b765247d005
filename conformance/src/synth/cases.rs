//! The synthetic cases: one per (rule, class), each a patch of a base channel with the expected
//! violation offset computed from the parts (never from running a decoder).

use super::base::{self, cmd, named, word, RAM_BYTES, RAM_ID, TPS};
use super::build::{be16, be32, be64, cat, Parts};
use super::multifd;
use qmig_protocol::codes::RamFlags;
use qmig_protocol::command::Command;
use qmig_protocol::header::{
    capabilities_from, encode_configuration, ConfigSubsection, SUB_CAPABILITIES,
    SUB_TARGET_PAGE_BITS,
};
use qmig_protocol::limits::Limits;
use qmig_protocol::ram::{compress_bound, compress_page_encode};
use qmig_protocol::rp::RpMessage;

/// Which base channel a case patches.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Base {
    /// [`base::precopy`]: a main channel, destination without postcopy-ram.
    Precopy,
    /// [`base::postcopy`]: a main channel, destination with postcopy-ram.
    Postcopy,
    /// [`base::rp_channel`]: a return path judged by a source.
    ReturnPath,
    /// [`base::multifd_conn`]: one multifd connection, judged by the multifd decoder only.
    Multifd,
    /// Return-path bytes the runner writes to a SOURCE in a precopy migration, once the first
    /// RAM page record has arrived (judged by the source: `replay-src`).
    SrcPrecopy,
    /// Return-path bytes the runner writes to a SOURCE in a postcopy migration, once
    /// POSTCOPY_RUN has arrived (judged by the source: `replay-src`).
    SrcPostcopy,
    /// A postcopy migration from a SOURCE whose main channel the runner cuts after its page
    /// requests were served; on `migrate resume=true` to a new port the runner answers each
    /// RECV_BITMAP with a chosen bitmap and checks what the source sends (judged by the source:
    /// `replay-src`, SM-RECOVER-BITMAP-ALL and SM-REBUILD). No bytes are injected.
    SrcRecovery,
    /// [`super::multifd::base`]: a precopy migration (7.2 or 10.x) with two multifd connections, judged
    /// by a destination (a patch's offset counts from 0 of the connection
    /// [`super::multifd::violation_conn`] names).
    MultifdPrecopy,
    /// [`super::recovery::channel`]: the recovery channel after [`super::recovery::main`] was
    /// cut, judged by a destination (the patch edits the recovery channel; offsets count from
    /// 0 of that connection).
    Recovery,
    /// [`super::huge::postcopy`]: a postcopy main channel of one 4 MiB block `ram` whose page
    /// size is 2 MiB, destination with postcopy-ram and that block.
    HugePostcopy,
    /// [`super::huge::recovery_channel`]: the recovery channel after
    /// [`super::huge::recovery_main`] was cut inside host page 1 (offsets count from 0 of that
    /// connection).
    HugeRecovery,
    /// [`super::faults::recovery_channel`]: the recovery channel after
    /// [`super::faults::recovery_main`] was cut with a guest access waiting for page 2 (a fault
    /// case: `replay.faults`).
    FaultRecover,
}

impl Base {
    /// Name used in manifests.
    pub fn name(self) -> &'static str {
        match self {
            Base::Precopy => "precopy",
            Base::Postcopy => "postcopy",
            Base::ReturnPath => "return-path",
            Base::Multifd => "multifd",
            Base::SrcPrecopy => "source-precopy",
            Base::SrcPostcopy => "source-postcopy",
            Base::SrcRecovery => "source-recover",
            Base::Recovery => "recovery",
            Base::MultifdPrecopy => "multifd-precopy",
            Base::HugePostcopy => "huge-postcopy",
            Base::HugeRecovery => "huge-recover",
            Base::FaultRecover => "fault-recover",
        }
    }

    /// Whether the base's block `ram` has 2 MiB pages ([`super::huge`]).
    pub fn is_huge(self) -> bool {
        matches!(self, Base::HugePostcopy | Base::HugeRecovery)
    }
}

/// The class of a case.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Class {
    /// Must be accepted.
    Valid,
    /// Must be rejected with the rule at the offset.
    Invalid,
    /// Breaks the rule at the offset, which a verifier (the decode check, `qmig verify`) must
    /// report, while a destination may either reject it or complete the migration with the
    /// expected RAM: what only a verifier reads (the trailing VM description).
    Acceptable,
}

impl Class {
    /// Name used in manifests and case names.
    pub fn name(self) -> &'static str {
        match self {
            Class::Valid => "valid",
            Class::Invalid => "invalid",
            Class::Acceptable => "acceptable",
        }
    }
}

/// A patch: edits the parts, returns the expected violation offset (invalid cases).
pub type Patch = fn(&mut Parts) -> Option<u64>;

/// One synthetic case.
pub struct Case {
    /// Folder name.
    pub name: String,
    /// The rule the case is about.
    pub rule: &'static str,
    /// Valid or invalid.
    pub class: Class,
    /// `7.2` or `10`.
    pub profile: &'static str,
    /// The base channel.
    pub base: Base,
    /// What the case shows.
    pub description: &'static str,
    /// The patch.
    pub patch: Patch,
    /// Rules a valid case exercises besides `rule`.
    pub exercises: &'static [&'static str],
}

fn o(p: &Parts, n: &str) -> u64 {
    p.offset_of(n)
}

fn set_be32(p: &mut Parts, part: &str, at: usize, v: u32) {
    p.get(part)[at..at + 4].copy_from_slice(&be32(v));
}

fn set_be64(p: &mut Parts, part: &str, at: usize, v: u64) {
    p.get(part)[at..at + 8].copy_from_slice(&be64(v));
}

/// Drops the `globalstate` section (a footer-scan decoder looks past EOF to delimit it).
fn no_devices(p: &mut Parts) {
    for n in ["gs_hdr", "gs_payload", "gs_footer"] {
        p.remove(n);
    }
}

/// The precopy base's configuration section (machine `none`) with `subs` appended.
fn config_with(subs: &[ConfigSubsection<'_>]) -> Vec<u8> {
    let mut v = Vec::new();
    encode_configuration(b"none", subs, &mut v);
    v
}

/// A configuration/capabilities subsection from names.
fn caps_config(names: &[&[u8]]) -> Vec<u8> {
    let mut buf = [0u8; 256];
    let c = capabilities_from(names, &mut buf).expect("short names");
    config_with(&[ConfigSubsection::Capabilities(c)])
}

/// Offset of the first subsection's marker byte inside the configuration (`0x07`, be32, `none`).
const SUB_AT: u64 = 9;

/// A REQ_PAGES_ID for block `ram` (what a source-side case writes).
fn src_request(start: u64, len: u64) -> Vec<u8> {
    base::rp(RpMessage::ReqPagesId {
        start,
        len: len as u32,
        name: b"ram",
    })
}

/// Whether case `c` is about delimiting a device payload by the footer scan, so that its
/// replay gives the destination no VM description (`replay.destination_vmdesc: false`).
pub fn footer_scan_only(c: &Case) -> bool {
    c.class == Class::Invalid && matches!(c.rule, "SEC-DELIMIT" | "SEC-DEVICE-LEN")
}

/// Whether case `c` is judged by a destination that declares its device table (checker
/// `destination-devices`): the SEC-UNKNOWN-DEVICE and SEC-VERSION cases.
pub fn needs_device_table(c: &Case) -> bool {
    matches!(c.rule, "SEC-UNKNOWN-DEVICE" | "SEC-VERSION")
}

/// Rules the valid source-side postcopy case exercises: the request comes after
/// POSTCOPY_RUN (RP-ORDER), is in range (RP-REQ-RANGE), every PONG answers a PING the source
/// sent (RP-PONG-UNKNOWN), and the destination's SHUT is 0 (RP-SHUT-ERROR).
pub const SRC_EXERCISES: &[&str] = &[
    "RP-ORDER",
    "RP-REQ-RANGE",
    "RP-PONG-UNKNOWN",
    "RP-SHUT-ERROR",
];

/// Rules the valid source-side recovery cases exercise (each is about one of the first two).
pub const SRC_RECOVERY_EXERCISES: &[&str] = &[
    "SM-REBUILD",
    "SM-RECOVER-BITMAP-ALL",
    "SM-PAUSE-AFTER-RUN",
    "RP-ORDER",
    "RP-REQ-RANGE",
];

/// An XBZRLE|CONTINUE record (encoding 1, be16 length, delta) for the page at `addr`.
fn xbzrle(addr: u64, delta: &[u8]) -> Vec<u8> {
    cat(&[
        &word(addr, RamFlags::XBZRLE.with(RamFlags::CONTINUE)),
        &[1],
        &be16(delta.len() as u16),
        delta,
    ])
}

/// A COMPRESS_PAGE|CONTINUE record (be32 length, zlib body) for the page at `addr`.
fn compressed(addr: u64, body: &[u8]) -> Vec<u8> {
    cat(&[
        &word(addr, RamFlags::COMPRESS_PAGE.with(RamFlags::CONTINUE)),
        &be32(body.len() as u32),
        body,
    ])
}

/// The state rule that decides how a destination must end an invalid case, from where its
/// violation lies (by construction, like the offset): in a postcopy main channel, at or before
/// POSTCOPY_RUN the migration fails (SM-FATAL-BEFORE-RUN), after it it pauses
/// (SM-PAUSE-AFTER-RUN); in a recovery channel, before POSTCOPY_RESUME it returns to
/// postcopy-paused (SM-PAUSE-IN-RECOVER), after it it pauses again (SM-PAUSE-AFTER-RUN: the
/// destination is postcopy-active). The replay and the decode check require that end state.
pub fn reaction(c: &Case, p: &Parts, offset: u64) -> Option<&'static str> {
    if c.class != Class::Invalid {
        return None;
    }
    let after = |part: &str| p.has(part) && offset > p.offset_of(part);
    match c.base {
        Base::Postcopy | Base::HugePostcopy if after("pkg_run") => Some("SM-PAUSE-AFTER-RUN"),
        Base::Postcopy | Base::HugePostcopy => Some("SM-FATAL-BEFORE-RUN"),
        Base::Recovery | Base::HugeRecovery if after("resume") => Some("SM-PAUSE-AFTER-RUN"),
        Base::Recovery | Base::HugeRecovery => Some("SM-PAUSE-IN-RECOVER"),
        _ => None,
    }
}

/// Destination capabilities a case needs besides the base's (QEMU 7.2 decompresses only with
/// `compress` on: its decompression threads exist only then).
pub fn extra_caps(c: &Case) -> &'static [&'static str] {
    if c.rule.starts_with("RAM-COMPRESS") {
        &["compress"]
    } else {
        &[]
    }
}

macro_rules! case {
    ($class:ident, $rule:literal, $profile:literal, $base:ident, $desc:literal, $patch:expr) => {
        case!($class, $rule, $profile, $base, $desc, $patch, &[])
    };
    ($class:ident, $rule:literal, $profile:literal, $base:ident, $desc:literal, $patch:expr, $ex:expr) => {
        Case {
            name: String::new(),
            rule: $rule,
            class: Class::$class,
            profile: $profile,
            base: Base::$base,
            description: $desc,
            patch: $patch,
            exercises: $ex,
        }
    };
}

/// Rules the unpatched precopy base exercises (accepted by a conforming destination).
pub const PRECOPY_EXERCISES: &[&str] = &[
    "HDR-MAGIC",
    "HDR-VERSION",
    "CFG-PRESENT",
    "CFG-NAME-LEN",
    "CFG-MACHINE",
    "STR8-EMPTY",
    "SEC-TYPE",
    "SEC-SUBSECTION-TOP",
    "SEC-UNKNOWN-ID",
    "SEC-DUPLICATE-ID",
    "SEC-FOOTER",
    "SEC-FOOTER-ID",
    "SEC-DELIMIT",
    "SEC-DEVICE-LEN",
    "VMDESC-PLACE",
    "VMDESC-LEN",
    "VMDESC-JSON",
    "EOF-TRAILING",
    "STREAM-TRUNCATED",
    "CMD-UNKNOWN",
    "CMD-LEN",
    "CMD-PING-NO-RP",
    "RAM-VERSION",
    "RAM-FLAGS",
    "RAM-FLAG-PROFILE",
    "RAM-CONTINUE",
    "RAM-BLOCK-UNKNOWN",
    "RAM-OFFSET",
    "RAM-MEMSIZE-SUM",
    "RAM-MEMSIZE-COUNT",
    "RAM-MEMSIZE-PLACE",
    "RAM-ZERO-FILL",
    "RAM-HOOK",
    "RAM-EOS",
    "RAM-APPLY",
    "SM-PONG",
    "SM-SHUT-LAST",
    "SM-SWITCHOVER-START",
    "RP-ATOMIC",
];

/// Rules the unpatched postcopy base exercises (SM-FATAL-BEFORE-RUN: everything before
/// POSTCOPY_RUN is accepted, so the migration must not fail there, and completes).
pub const POSTCOPY_EXERCISES: &[&str] = &[
    "SM-FATAL-BEFORE-RUN",
    "CMD-ADVISE-LEN",
    "CMD-ADVISE-PAGESIZE",
    "CMD-DISCARD-LEN",
    "CMD-DISCARD-VERSION",
    "CMD-DISCARD-TERM",
    "CMD-DISCARD-RANGE",
    "CMD-BLOCK-UNKNOWN",
    "CMD-PACKAGED-LEN",
    "CMD-PACKAGED-CONTENT",
    "CMD-ORDER",
    "RAM-POSTCOPY-FLAG",
    "SM-PONG",
    "SM-SHUT-LAST",
    "BITMAP-MARK",
];

/// Rules the unpatched return path exercises (accepted by a conforming source).
pub const RP_EXERCISES: &[&str] = &[
    "RP-TYPE",
    "RP-LEN",
    "RP-LEN-MAX",
    "RP-REQ-ID-LEN",
    "RP-REQ-NO-BLOCK",
    "RP-BITMAP-LEN",
    "RP-BITMAP-SIZE",
    "RP-BITMAP-ENDMARK",
    "RP-RESUME-ACK-VALUE",
    "BITMAP-LE",
    "BITMAP-PADDING",
];

/// Rules the unpatched recovery exercises: the cut after POSTCOPY_RUN pauses
/// (SM-PAUSE-AFTER-RUN); the recovery channel starts with RECV_BITMAP (SM-RECOVER-NO-HEADER) of
/// the right length (CMD-RECV-BITMAP-LEN), answered with the received bitmap byte for byte
/// (BITMAP-MARK, BITMAP-LE); POSTCOPY_RESUME in postcopy-recover gets RESUME_ACK
/// (SM-RESUME-STATE); its first page record names its block (RAM-CONTINUE); the final RAM.
pub const RECOVERY_EXERCISES: &[&str] = &[
    "SM-PAUSE-AFTER-RUN",
    "SM-RECOVER-NO-HEADER",
    "CMD-RECV-BITMAP-LEN",
    "BITMAP-MARK",
    "BITMAP-LE",
    "SM-RESUME-STATE",
    "RAM-CONTINUE",
    "RAM-APPLY",
];

/// Rules the unpatched huge-page postcopy base exercises besides RAM-HOSTPAGE: the MEM_SIZE
/// entry's `page_size` equals the destination's 2 MiB (RAM-PAGESIZE), ADVISE's summary matches
/// (CMD-ADVISE-PAGESIZE), the discard covers a host page (CMD-DISCARD-RANGE), and host page 1
/// is placed whole (RAM-APPLY).
pub const HUGE_EXERCISES: &[&str] = &[
    "RAM-PAGESIZE",
    "CMD-ADVISE-PAGESIZE",
    "CMD-DISCARD-RANGE",
    "RAM-POSTCOPY-FLAG",
    "RAM-CONTINUE",
    "RAM-APPLY",
    "SM-PONG",
    "SM-SHUT-LAST",
];

/// Rules the huge-page recovery exercises: the cut inside host page 1 drops it (its bits clear
/// in the RECV_BITMAP answer, byte for byte: BITMAP-MARK), it is sent again whole
/// (RAM-HOSTPAGE), the final RAM.
pub const HUGE_RECOVERY_EXERCISES: &[&str] = &[
    "SM-PAUSE-AFTER-RUN",
    "SM-RECOVER-NO-HEADER",
    "BITMAP-MARK",
    "BITMAP-LE",
    "SM-RESUME-STATE",
    "RAM-HOSTPAGE",
    "RAM-PAGESIZE",
    "RAM-APPLY",
];

/// RAM-PAGESIZE: the MEM_SIZE entry of `ram` declares 1 GiB pages where the destination's
/// block has 2 MiB ones; rejected at the `page_size` field (spec/ram.md).
fn page_size_1g(p: &mut Parts) -> Option<u64> {
    let at = super::huge::PAGE_SIZE_FIELD as usize;
    set_be64(p, "memsize", at, 1 << 30);
    Some(o(p, "memsize") + at as u64)
}

/// RAM-HOSTPAGE: after POSTCOPY_RUN, page 0 (host page 0, received in precopy) arrives between
/// the first and the second target page of host page 1, which is incomplete; rejected at the
/// intruding record's header word.
fn host_page_interleaved(p: &mut Parts) -> Option<u64> {
    p.insert_before(
        "hp1_zeros",
        "intruder",
        cat(&[&word(0, RamFlags::ZERO.with(RamFlags::CONTINUE)), &[0]]),
    );
    Some(o(p, "intruder"))
}

/// SM-RECOVER-NO-HEADER: the header and configuration of a new stream where the recovery
/// channel's RECV_BITMAP must come first; rejected at offset 0.
fn header_before_recv_bitmap(p: &mut Parts) -> Option<u64> {
    p.insert_before(
        "recv_bitmap",
        "header",
        super::recovery::header_and_config(),
    );
    Some(0)
}

/// The RECV_BITMAP of a recovery channel with length 5 for its 3-byte name (and one byte more).
fn recv_bitmap_len5() -> Vec<u8> {
    let mut b = cmd(Command::RecvBitmap { name: b"ram" });
    b[3..5].copy_from_slice(&be16(5));
    b.push(0);
    b
}

/// Every case, in a fixed order.
pub fn all() -> Vec<Case> {
    let mut v = vec![
        // ---- bases (valid) ----
        case!(Valid, "SM-PONG", "7.2", Precopy, "the unpatched 7.2 precopy base", |_| None, PRECOPY_EXERCISES),
        case!(Valid, "SM-SWITCHOVER-START", "10", Precopy, "the unpatched 10.x precopy base (SWITCHOVER_START before the final ram END)", |_| None, PRECOPY_EXERCISES),
        case!(Valid, "CMD-ORDER", "7.2", Postcopy, "the unpatched 7.2 postcopy base", |_| None, POSTCOPY_EXERCISES),
        case!(Valid, "CMD-PACKAGED-CONTENT", "10", Postcopy, "the unpatched 10.x postcopy base", |_| None, POSTCOPY_EXERCISES),
        case!(Valid, "RP-TYPE", "7.2", ReturnPath, "the unpatched 7.2 return path", |_| None, RP_EXERCISES),
        case!(Valid, "RP-BITMAP-SIZE", "10", ReturnPath, "the unpatched 10.x return path", |_| None, RP_EXERCISES),
        // ---- boundary valid cases ----
        case!(Valid, "CFG-NAME-LEN", "7.2", Precopy, "a one-byte machine name (`n`, a prefix of `none`)", |p| {
            p.set("config", cat(&[&[0x07], &be32(1), b"n"])); None
        }),
        case!(Valid, "CMD-UNKNOWN", "10", Precopy, "command 11 (SWITCHOVER_START) is legal in 10.x", |_| None),
        case!(Valid, "RAM-FLAG-PROFILE", "10", Precopy, "MULTIFD_FLUSH is legal in 10.x", |p| {
            p.insert_before("part_eos", "flush", word(0, RamFlags::MULTIFD_FLUSH)); None
        }),
        case!(Valid, "RAM-OFFSET", "7.2", Precopy, "a page at the last offset of the block", |p| {
            p.insert_before("part_eos", "last", cat(&[&word(RAM_BYTES - TPS, RamFlags::ZERO.with(RamFlags::CONTINUE)), &[0]])); None
        }),
        case!(Valid, "RAM-ZERO-FILL", "7.2", Precopy, "7.2 accepts a ZERO record with a non-zero fill byte", |p| {
            let b = p.get("zero1"); let n = b.len(); b[n - 1] = 0; None
        }),
        case!(Valid, "CMD-DISCARD-LEN", "7.2", Postcopy, "a RAM_DISCARD with two ranges", |p| {
            let r = cat(&[&be64(2 * TPS), &be64(TPS), &be64(3 * TPS), &be64(TPS)]);
            p.set("discard", cmd(Command::RamDiscard(qmig_protocol::command::Discard::new(b"ram", &r).unwrap()))); None
        }),
        case!(Valid, "RP-REQ-NO-BLOCK", "7.2", ReturnPath, "two REQ_PAGES after one REQ_PAGES_ID", |p| {
            let r = p.get("req").clone(); p.insert_after("req", "req2", r); None
        }),
        case!(Valid, "RP-TYPE", "10", ReturnPath, "SWITCHOVER_ACK (7) is legal in 10.x", |p| {
            p.insert_before("shut", "ack", cat(&[&be16(7), &be16(0)])); None
        }),
        // ---- invalid: header and configuration ----
        case!(Invalid, "HDR-MAGIC", "7.2", Precopy, "the magic is QEVX", |p| { p.get("header")[3] = b'X'; Some(0) }),
        case!(Invalid, "HDR-VERSION", "7.2", Precopy, "stream version 2", |p| { set_be32(p, "header", 4, 2); Some(4) }),
        case!(Invalid, "CFG-PRESENT", "7.2", Precopy, "no configuration section", |p| { p.remove("config"); Some(8) }),
        case!(Invalid, "CFG-NAME-LEN", "7.2", Precopy, "machine-name length 0", |p| { p.set("config", cat(&[&[0x07], &be32(0)])); Some(9) }),
        case!(Invalid, "CFG-MACHINE", "10", Precopy, "machine name `nonx`", |p| { p.get("config")[8] = b'x'; Some(13) }),
        case!(Invalid, "STR8-EMPTY", "7.2", Precopy, "a page record naming a block with an empty name", |p| {
            p.set("page0", cat(&[&word(0, RamFlags::PAGE), &[0], &base::page0()])); Some(o(p, "page0") + 8)
        }),
        // ---- sections ----
        case!(Invalid, "SEC-TYPE", "7.2", Precopy, "section type byte 0x09", |p| { p.get("part_hdr")[0] = 0x09; Some(o(p, "part_hdr")) }),
        case!(Invalid, "SEC-SUBSECTION-TOP", "7.2", Precopy, "QEMU_VM_SUBSECTION at top level", |p| { p.get("part_hdr")[0] = 0x05; Some(o(p, "part_hdr")) }),
        case!(Invalid, "SEC-UNKNOWN-ID", "7.2", Precopy, "SECTION_PART with an id never opened", |p| {
            set_be32(p, "part_hdr", 1, 9); set_be32(p, "part_footer", 1, 9); Some(o(p, "part_hdr") + 1)
        }),
        case!(Invalid, "SEC-DUPLICATE-ID", "7.2", Precopy, "globalstate FULL reuses the ram section's id", |p| {
            set_be32(p, "gs_hdr", 1, RAM_ID); set_be32(p, "gs_footer", 1, RAM_ID); Some(o(p, "gs_hdr") + 1)
        }),
        case!(Invalid, "SEC-FOOTER", "7.2", Precopy, "footer byte 0x7f", |p| { p.get("start_footer")[0] = 0x7f; Some(o(p, "start_footer")) }),
        case!(Invalid, "SEC-FOOTER-ID", "7.2", Precopy, "footer id 3 after section 2", |p| { set_be32(p, "start_footer", 1, 3); Some(o(p, "start_footer") + 1) }),
        case!(Invalid, "VMDESC-PLACE", "7.2", Precopy, "a VM description before EOF", |p| {
            let j = b"{}"; p.insert_before("gs_hdr", "vmdesc", cat(&[&[0x06], &be32(2), j])); Some(o(p, "vmdesc"))
        }),
        case!(Invalid, "VMDESC-LEN", "7.2", Precopy, "a VM description of 32 MiB announced (no device section: nothing depends on a footer scan)", |p| {
            no_devices(p); p.set("vmdesc", cat(&[&[0x06], &be32(32 << 20)])); Some(o(p, "vmdesc") + 1)
        }),
        case!(Invalid, "EOF-TRAILING", "7.2", Precopy, "a byte after the VM description", |p| { p.push("extra", vec![0x00]); Some(o(p, "extra")) }),
        case!(Invalid, "EOF-TRAILING", "7.2", Precopy, "a second EOF instead of the VM description (no device section)", |p| { no_devices(p); p.set("vmdesc", vec![0x00]); Some(o(p, "vmdesc")) }),
        case!(Invalid, "STREAM-TRUNCATED", "7.2", Precopy, "the channel ends inside page 4's record", |p| {
            p.get("page4").truncate(100); p.truncate_at("part_eos"); Some(o(p, "page4"))
        }),
        case!(Invalid, "STREAM-TRUNCATED", "7.2", Precopy, "the channel ends on a record boundary before EOF", |p| {
            p.truncate_at("gs_hdr"); Some(o(p, "end_footer") + 5)
        }),
        // ---- commands ----
        case!(Invalid, "CMD-UNKNOWN", "7.2", Precopy, "command 11 sent to a 7.2 destination", |p| {
            p.insert_before("end_hdr", "sw", cmd(Command::SwitchoverStart)); Some(o(p, "sw") + 1)
        }),
        case!(Invalid, "CMD-LEN", "7.2", Precopy, "PING with length 5", |p| { p.get("ping1")[3..5].copy_from_slice(&be16(5)); Some(o(p, "ping1") + 3) }),
        case!(Invalid, "CMD-PING-NO-RP", "7.2", Precopy, "PING without OPEN_RETURN_PATH", |p| { p.remove("open_rp"); Some(o(p, "ping1")) }),
        case!(Invalid, "CMD-RECV-BITMAP-LEN", "7.2", Precopy, "RECV_BITMAP whose length is not 1 + name length", |p| {
            p.insert_before("ram_start", "rb", cat(&[&[0x08], &be16(10), &be16(5), &[3], b"ram", &[0]])); Some(o(p, "rb") + 3)
        }),
        case!(Invalid, "CMD-ADVISE-LEN", "7.2", Postcopy, "a 0-byte ADVISE to a destination with postcopy-ram", |p| {
            p.set("advise", cmd(Command::PostcopyAdvise(None))); Some(o(p, "advise") + 3)
        }),
        case!(Invalid, "CMD-ADVISE-PAGESIZE", "7.2", Postcopy, "ADVISE with target page size 8192", |p| {
            set_be64(p, "advise", 13, 8192); Some(o(p, "advise") + 13)
        }),
        case!(Invalid, "CMD-DISCARD-LEN", "7.2", Postcopy, "RAM_DISCARD with a 15-byte range", |p| {
            let b = p.get("discard"); let n = b.len(); b.truncate(n - 1); let l = (n - 6) as u16; b[3..5].copy_from_slice(&be16(l)); Some(o(p, "discard") + 3)
        }),
        case!(Invalid, "CMD-DISCARD-VERSION", "7.2", Postcopy, "RAM_DISCARD version 1", |p| { p.get("discard")[5] = 1; Some(o(p, "discard") + 5) }),
        case!(Invalid, "CMD-DISCARD-TERM", "7.2", Postcopy, "RAM_DISCARD block name not followed by 0x00", |p| { p.get("discard")[10] = b'x'; Some(o(p, "discard") + 10) }),
        case!(Invalid, "CMD-DISCARD-RANGE", "7.2", Postcopy, "RAM_DISCARD range start not page aligned", |p| { set_be64(p, "discard", 11, 2 * TPS + 1); Some(o(p, "discard") + 11) }),
        case!(Invalid, "CMD-BLOCK-UNKNOWN", "7.2", Postcopy, "RAM_DISCARD names block `rom`", |p| { p.get("discard")[7..10].copy_from_slice(b"rom"); Some(o(p, "discard") + 6) }),
        case!(Invalid, "CMD-PACKAGED-LEN", "7.2", Postcopy, "PACKAGED of 32 MiB", |p| { set_be32(p, "packaged", 5, 32 << 20); Some(o(p, "packaged") + 5) }),
        case!(Invalid, "CMD-PACKAGED-CONTENT", "7.2", Postcopy, "an EOF inside the package", |p| {
            p.insert_after("pkg_listen", "pkg_eof", vec![0x00]); base::fix_package_len(p); Some(o(p, "pkg_eof"))
        }),
        case!(Invalid, "CMD-ORDER", "7.2", Postcopy, "POSTCOPY_RUN without POSTCOPY_LISTEN", |p| {
            p.remove("pkg_listen"); base::fix_package_len(p); Some(o(p, "pkg_run"))
        }),
        // ---- RAM ----
        case!(Invalid, "RAM-VERSION", "7.2", Precopy, "ram section version 3", |p| { set_be32(p, "ram_start", 13, 3); Some(o(p, "ram_start") + 13) }),
        case!(Invalid, "RAM-FLAGS", "7.2", Precopy, "PAGE and ZERO in one record", |p| {
            p.get("page0")[7] |= RamFlags::ZERO.0 as u8; Some(o(p, "page0"))
        }),
        case!(Invalid, "RAM-FLAG-PROFILE", "7.2", Precopy, "MULTIFD_FLUSH in a 7.2 stream", |p| {
            p.insert_before("part_eos", "flush", word(0, RamFlags::MULTIFD_FLUSH)); Some(o(p, "flush"))
        }),
        case!(Invalid, "RAM-CONTINUE", "7.2", Precopy, "CONTINUE on the channel's first page record", |p| {
            p.set("page0", cat(&[&word(0, RamFlags::PAGE.with(RamFlags::CONTINUE)), &base::page0()])); Some(o(p, "page0"))
        }),
        case!(Invalid, "RAM-BLOCK-UNKNOWN", "7.2", Precopy, "a page of block `rom`", |p| {
            p.set("page0", cat(&[&named(0, RamFlags::PAGE, "rom"), &base::page0()])); Some(o(p, "page0"))
        }),
        case!(Invalid, "RAM-OFFSET", "7.2", Precopy, "a page at the block's length", |p| { set_be64(p, "page4", 0, RAM_BYTES | 0x28); Some(o(p, "page4")) }),
        case!(Invalid, "RAM-MEMSIZE-SUM", "7.2", Precopy, "MEM_SIZE total half the block lengths", |p| { set_be64(p, "memsize", 0, (RAM_BYTES / 2) | 0x04); Some(o(p, "memsize") + 12) }),
        case!(Invalid, "RAM-MEMSIZE-PLACE", "7.2", Precopy, "MEM_SIZE in a SECTION_PART", |p| {
            p.insert_after("part_hdr", "ms2", base::memsize()); Some(o(p, "ms2"))
        }),
        case!(Invalid, "RAM-ZERO-FILL", "10", Precopy, "a ZERO record with fill byte 1", |p| {
            let b = p.get("zero1"); let n = b.len(); b[n - 1] = 1; Some(o(p, "zero1") + 8)
        }),
        case!(Invalid, "RAM-XBZRLE-ENC", "7.2", Precopy, "XBZRLE encoding byte 2", |p| {
            p.insert_before("part_eos", "x", cat(&[&word(0, RamFlags::XBZRLE.with(RamFlags::CONTINUE)), &[2], &be16(2), &[0, 0]])); Some(o(p, "x") + 8)
        }),
        case!(Invalid, "RAM-XBZRLE-LEN", "7.2", Precopy, "XBZRLE delta longer than a page", |p| {
            p.insert_before("part_eos", "x", cat(&[&word(0, RamFlags::XBZRLE.with(RamFlags::CONTINUE)), &[1], &be16(4097), &vec![0; 4097]])); Some(o(p, "x") + 9)
        }),
        case!(Invalid, "RAM-HOOK", "7.2", Precopy, "an RDMA HOOK record", |p| {
            p.insert_before("part_eos", "hook", word(0, RamFlags::HOOK)); Some(o(p, "hook"))
        }),
        case!(Invalid, "RAM-EOS", "7.2", Precopy, "a RAM section ends without EOS", |p| { p.remove("part_eos"); Some(o(p, "part_footer")) }),
        case!(Invalid, "RAM-POSTCOPY-FLAG", "7.2", Postcopy, "an XBZRLE record after POSTCOPY_LISTEN", |p| {
            p.insert_before("pc_part_eos", "x", cat(&[&word(0, RamFlags::XBZRLE.with(RamFlags::CONTINUE)), &[1], &be16(2), &[0, 0]])); Some(o(p, "x"))
        }),
        // ---- configuration subsections ----
        case!(Valid, "CFG-SUBSECTION", "7.2", Precopy, "a configuration/target-page-bits subsection of 12 (4 KiB pages)", |p| {
            p.set("config", config_with(&[ConfigSubsection::TargetPageBits(12)])); None
        }),
        case!(Valid, "CFG-CAP-NAME", "7.2", Precopy, "a configuration/capabilities subsection naming `events` (known, not one QEMU validates against its own)", |p| {
            p.set("config", caps_config(&[b"events"])); None
        }, &["CFG-SUBSECTION", "CFG-CAPS-COUNT"]),
        case!(Invalid, "CFG-SUBSECTION", "7.2", Precopy, "configuration/target-page-bits subsection version 2", |p| {
            p.set("config", config_with(&[ConfigSubsection::TargetPageBits(12)]));
            set_be32(p, "config", (SUB_AT + 2) as usize + SUB_TARGET_PAGE_BITS.len(), 2);
            Some(o(p, "config") + SUB_AT + 2 + SUB_TARGET_PAGE_BITS.len() as u64)
        }),
        case!(Invalid, "CFG-CAPS-COUNT", "7.2", Precopy, "configuration/capabilities announcing 65 names", |p| {
            let mut c = config_with(&[]);
            c.push(0x05);
            c.push(SUB_CAPABILITIES.len() as u8);
            c.extend_from_slice(SUB_CAPABILITIES);
            c.extend_from_slice(&be32(1));
            c.extend_from_slice(&be32(65));
            p.set("config", c);
            Some(o(p, "config") + SUB_AT + 2 + SUB_CAPABILITIES.len() as u64 + 4)
        }),
        case!(Invalid, "CFG-CAP-NAME", "10", Precopy, "configuration/capabilities naming `compress`, which 10.x no longer knows", |p| {
            p.set("config", caps_config(&[b"compress"]));
            Some(o(p, "config") + SUB_AT + 2 + SUB_CAPABILITIES.len() as u64 + 4 + 4)
        }),
        // ---- device sections ----
        case!(Invalid, "SEC-DELIMIT", "7.2", Precopy, "the globalstate section without its footer (no `7E 00000004` anywhere after its payload)", |p| {
            p.remove("gs_footer"); Some(o(p, "gs_payload"))
        }),
        case!(Invalid, "SEC-DEVICE-LEN", "7.2", Precopy, "a globalstate payload of 1 MiB + 1 bytes (cap 1 MiB): its footer lies past the cap", |p| {
            let cap = Limits::DEFAULT.max_device_payload as u64;
            p.set("gs_payload", vec![0; cap as usize + 1]);
            // The footer scan looks for `7E <id>` in the first cap + 5 bytes only; none there.
            Some(o(p, "gs_payload"))
        }),
        // ---- RAM: MEM_SIZE, XBZRLE, COMPRESS_PAGE ----
        case!(Invalid, "RAM-MEMSIZE-COUNT", "7.2", Precopy, "MEM_SIZE listing 1025 one-page blocks (cap 1024)", |p| {
            let n = 1025u64;
            let mut v = word(n * TPS, RamFlags::MEM_SIZE);
            for _ in 0..n {
                v.extend_from_slice(&cat(&[&[1], b"b", &be64(TPS)]));
            }
            p.set("memsize", v);
            Some(o(p, "memsize") + 8 + 1024 * 10)
        }),
        case!(Valid, "RAM-XBZRLE-DECODE", "7.2", Precopy, "an XBZRLE delta on page 4 rewriting bytes 4-7 with their own value", |p| {
            p.insert_after("page4", "x", xbzrle(4 * TPS, &cat(&[&[4, 4], &[base::FILL4; 4]]))); None
        }, &["RAM-XBZRLE-ENC", "RAM-XBZRLE-LEN", "RAM-XBZRLE-BASE"]),
        case!(Invalid, "RAM-XBZRLE-DECODE", "7.2", Precopy, "an XBZRLE delta whose literal run ends past the page (zero run 4095, literal run 2)", |p| {
            p.insert_after("page4", "x", xbzrle(4 * TPS, &[0xff, 0x1f, 2, 1, 1])); Some(o(p, "x") + 8 + 3 + 2)
        }),
        case!(Invalid, "RAM-XBZRLE-BASE", "7.2", Precopy, "an XBZRLE delta for page 5, never received", |p| {
            p.insert_after("page4", "x", xbzrle(5 * TPS, &cat(&[&[4, 4], &[base::FILL4; 4]]))); Some(o(p, "x"))
        }),
        case!(Valid, "RAM-COMPRESS-DECODE", "7.2", Precopy, "page 4 as a COMPRESS_PAGE (zlib level 1)", |p| {
            let z = compress_page_encode(&[base::FILL4; TPS as usize], 1);
            p.set("page4", compressed(4 * TPS, &z)); None
        }, &["RAM-COMPRESS-LEN"]),
        case!(Invalid, "RAM-COMPRESS-DECODE", "7.2", Precopy, "page 4 as a COMPRESS_PAGE whose zlib stream inflates to 100 bytes, not a page", |p| {
            let z = compress_page_encode(&[base::FILL4; 100], 1);
            p.set("page4", compressed(4 * TPS, &z)); Some(o(p, "page4") + 8 + 4)
        }),
        case!(Invalid, "RAM-COMPRESS-LEN", "7.2", Precopy, "a COMPRESS_PAGE length one above compressBound(4096)", |p| {
            let n = compress_bound(TPS) as usize + 1;
            p.set("page4", compressed(4 * TPS, &vec![0; n])); Some(o(p, "page4") + 8)
        }),
        // ---- multifd connection (decode only) ----
        case!(Valid, "MFD-PAGES", "10", Multifd, "a multifd connection: init packet, one page in a 128-page packet, SYNC", |_| None, &["MFD-MAGIC", "MFD-VERSION"]),
        case!(Valid, "MFD-PAGES", "7.2", Multifd, "a multifd connection in 7.2's layout: init packet, one page in a 128-page packet, SYNC", |_| None, &["MFD-MAGIC", "MFD-VERSION"]),
        case!(Invalid, "MFD-MAGIC", "10", Multifd, "an init packet with magic 0x11223345", |p| { set_be32(p, "init", 0, 0x1122_3345); Some(o(p, "init")) }),
        case!(Invalid, "MFD-VERSION", "10", Multifd, "a RAM packet with version 2", |p| { set_be32(p, "pages", 4, 2); Some(o(p, "pages") + 4) }),
        case!(Invalid, "MFD-PAGES", "7.2", Multifd, "a RAM packet allocating 129 pages (128 per packet for 4 KiB pages)", |p| { set_be32(p, "pages", 12, 129); Some(o(p, "pages") + 12) }),
        case!(Invalid, "MFD-PAGES", "10", Multifd, "a RAM packet with 1 normal and 128 zero pages of 128 allocated", |p| { set_be32(p, "pages", 32, 128); Some(o(p, "pages") + 32) }),
        // ---- return path ----
        case!(Invalid, "RP-TYPE", "7.2", ReturnPath, "SWITCHOVER_ACK (7) from a 7.2 destination", |p| {
            p.insert_before("shut", "ack", cat(&[&be16(7), &be16(0)])); Some(o(p, "ack"))
        }),
        case!(Invalid, "RP-LEN", "7.2", ReturnPath, "PONG with length 5", |p| { p.get("pong1")[2..4].copy_from_slice(&be16(5)); Some(2) }),
        case!(Invalid, "RP-LEN-MAX", "7.2", ReturnPath, "REQ_PAGES_ID with length 600", |p| {
            p.get("req_id")[2..4].copy_from_slice(&be16(600)); Some(o(p, "req_id") + 2)
        }),
        case!(Invalid, "RP-REQ-ID-LEN", "7.2", ReturnPath, "REQ_PAGES_ID length 17 for a 3-byte name", |p| {
            p.get("req_id")[2..4].copy_from_slice(&be16(17)); p.get("req_id").push(0); Some(o(p, "req_id") + 2)
        }),
        case!(Invalid, "RP-REQ-NO-BLOCK", "7.2", ReturnPath, "REQ_PAGES before any REQ_PAGES_ID", |p| { p.remove("req_id"); Some(o(p, "req")) }),
        case!(Invalid, "RP-BITMAP-LEN", "7.2", ReturnPath, "RECV_BITMAP length 5 for a 3-byte name", |p| {
            p.get("bitmap")[2..4].copy_from_slice(&be16(5)); p.get("bitmap").insert(8, 0); Some(o(p, "bitmap") + 2)
        }),
        case!(Invalid, "RP-BITMAP-SIZE", "7.2", ReturnPath, "RECV_BITMAP size 40 for a 256-page block", |p| {
            set_be64(p, "bitmap", 8, 40); let b = p.get("bitmap"); let n = b.len(); b.splice(n - 8..n - 8, [0u8; 8]); Some(o(p, "bitmap") + 8)
        }),
        case!(Invalid, "RP-BITMAP-ENDMARK", "7.2", ReturnPath, "RECV_BITMAP end mark 0", |p| {
            let b = p.get("bitmap"); let n = b.len(); b[n - 8..].fill(0); Some(o(p, "bitmap") + 16 + 32)
        }),
        case!(Invalid, "RP-RESUME-ACK-VALUE", "7.2", ReturnPath, "RESUME_ACK(2)", |p| { set_be32(p, "resume_ack", 4, 2); Some(o(p, "resume_ack") + 4) }),
        case!(Invalid, "BITMAP-PADDING", "7.2", ReturnPath, "a received bitmap with a bit past the block's last page (block `ram` of 100 pages here)", |p| {
            let mut bm = vec![0u8; 16];
            bm[0] = 0x1f;
            bm[100 / 8] |= 1 << (100 % 8);
            let m = base::rp(qmig_protocol::rp::RpMessage::RecvBitmap { name: b"ram", bitmap: &bm });
            p.set("bitmap", m);
            Some(o(p, "bitmap") + 16 + 100 / 8)
        }),
        // ---- the destination's device table (the VM description's devices and `ram`) ----
        case!(Valid, "SEC-UNKNOWN-DEVICE", "10", Precopy, "globalstate v1, as the destination's device table (its VM description) declares", |_| None, &["SEC-VERSION"]),
        case!(Invalid, "SEC-UNKNOWN-DEVICE", "7.2", Precopy, "a FULL section for `globalstatx`, a device the destination does not have", |p| { p.get("gs_hdr")[16] = b'x'; Some(o(p, "gs_hdr") + 5) }),
        case!(Invalid, "SEC-UNKNOWN-DEVICE", "10", Precopy, "a FULL section for `globalstatx`, a device the destination does not have", |p| { p.get("gs_hdr")[16] = b'x'; Some(o(p, "gs_hdr") + 5) }),
        case!(Invalid, "SEC-VERSION", "7.2", Precopy, "globalstate version 2, newer than the destination's 1", |p| { set_be32(p, "gs_hdr", 21, 2); Some(o(p, "gs_hdr") + 21) }),
        case!(Invalid, "SEC-VERSION", "10", Precopy, "globalstate version 2, newer than the destination's 1", |p| { set_be32(p, "gs_hdr", 21, 2); Some(o(p, "gs_hdr") + 21) }),
        // ---- return path judged by a live source (replay-src) ----
        case!(Valid, "RP-REQ-RANGE", "7.2", SrcPostcopy, "after POSTCOPY_RUN, REQ_PAGES_ID for the block's last two pages: both arrive, whole", |p| { p.push("req", src_request(254 * TPS, 2 * TPS)); None }, SRC_EXERCISES),
        // ---- a source's recovery (replay-src: the runner cuts, answers RECV_BITMAP with a chosen bitmap) ----
        case!(Valid, "SM-REBUILD", "7.2", SrcRecovery, "postcopy, the main channel cut after the requested pages arrived; on the recovery connection the source sends RECV_BITMAP(ram), gets the pages received so far with the odd ones cleared, sends POSTCOPY_RESUME, and after RESUME_ACK exactly the clear pages, once each", |_| None, SRC_RECOVERY_EXERCISES),
        case!(Valid, "SM-RECOVER-BITMAP-ALL", "7.2", SrcRecovery, "postcopy, the main channel cut after the requested pages arrived; on the recovery connection a RECV_BITMAP for every block of MEM_SIZE and no page record before the runner's RESUME_ACK; then exactly the pages the chosen bitmap leaves clear, once each", |_| None, SRC_RECOVERY_EXERCISES),
        case!(Valid, "SM-CANCEL", "7.2", SrcRecovery, "postcopy, the main channel cut after the requested pages arrived; both sides pause; migrate_cancel on the paused source: it must reach cancelled (no wait left for a recovery) and still answer QMP", |_| None, &["SM-PAUSE-AFTER-RUN", "RP-ORDER", "RP-REQ-RANGE"]),
        case!(Invalid, "RP-SHUT-ERROR", "7.2", SrcPrecopy, "SHUT(1) in the middle of a precopy migration", |p| { p.push("shut", base::rp(RpMessage::Shut(1))); Some(4) }),
        case!(Invalid, "RP-SHUT-ERROR", "10", SrcPrecopy, "SHUT(1) in the middle of a precopy migration", |p| { p.push("shut", base::rp(RpMessage::Shut(1))); Some(4) }),
        case!(Invalid, "RP-PONG-UNKNOWN", "7.2", SrcPrecopy, "PONG(0x51ab) for a PING the source never sent", |p| { p.push("pong", base::rp(RpMessage::Pong(0x51ab))); Some(4) }),
        case!(Invalid, "RP-PONG-UNKNOWN", "10", SrcPrecopy, "PONG(0x51ab) for a PING the source never sent", |p| { p.push("pong", base::rp(RpMessage::Pong(0x51ab))); Some(4) }),
        case!(Invalid, "RP-ORDER", "7.2", SrcPrecopy, "a page request (in range) in precopy, without postcopy-ram", |p| { p.push("req", src_request(5 * TPS, TPS)); Some(0) }),
        case!(Invalid, "RP-ORDER", "10", SrcPrecopy, "a page request (in range) in precopy, without postcopy-ram", |p| { p.push("req", src_request(5 * TPS, TPS)); Some(0) }),
        case!(Invalid, "RP-REQ-RANGE", "7.2", SrcPrecopy, "a page request starting at the block's end", |p| { p.push("req", src_request(RAM_BYTES, TPS)); Some(4) }),
        case!(Invalid, "RP-REQ-RANGE", "10", SrcPrecopy, "a page request starting at the block's end", |p| { p.push("req", src_request(RAM_BYTES, TPS)); Some(4) }),
        // ---- postcopy recovery (main channel cut after POSTCOPY_RUN, then a recovery channel) ----
        case!(Valid, "CMD-RECV-BITMAP-LEN", "7.2", Recovery, "a 7.2 recovery: RECV_BITMAP(ram) answered with pages 0, 1, 2, 4 received, POSTCOPY_RESUME answered RESUME_ACK(1), page 3 resent, completed", |_| None, RECOVERY_EXERCISES),
        case!(Valid, "SM-RECOVER-NO-HEADER", "10", Recovery, "a 10.x recovery: RECV_BITMAP(ram) answered with pages 0, 1, 2, 4 received, POSTCOPY_RESUME answered RESUME_ACK(1), page 3 resent, completed", |_| None, RECOVERY_EXERCISES),
        case!(Valid, "SM-TIMEOUT", "7.2", Recovery, "a 7.2 recovery where the main channel is cut by silence, not closed: the runner stops inside page 3's record and keeps the connection open; a destination with a 1 s silence bound (`x-qmig-silence-timeout`) gives it up and pauses, then recovers", |_| None, RECOVERY_EXERCISES),
        case!(Valid, "SM-TIMEOUT", "10", Recovery, "a 10.x recovery where the main channel is cut by silence, not closed: the runner stops inside page 3's record and keeps the connection open; a destination with a 1 s silence bound (`x-qmig-silence-timeout`) gives it up and pauses, then recovers", |_| None, RECOVERY_EXERCISES),
        case!(Valid, "SM-RESUME-STATE", "7.2", Postcopy, "POSTCOPY_RESUME on the main channel after POSTCOPY_RUN (postcopy-active, not postcopy-recover): ignored, no RESUME_ACK, the migration completes", |p| {
            p.insert_after("ping4", "stray_resume", cmd(Command::PostcopyResume)); None
        }),
        case!(Valid, "SM-RESUME-STATE", "10", Postcopy, "POSTCOPY_RESUME on the main channel after POSTCOPY_RUN (postcopy-active, not postcopy-recover): ignored, no RESUME_ACK, the migration completes", |p| {
            p.insert_after("ping4", "stray_resume", cmd(Command::PostcopyResume)); None
        }),
        case!(Valid, "SM-PAUSE-IN-RECOVER", "7.2", Recovery, "the first recovery channel is lost right after RECV_BITMAP (answered; no POSTCOPY_RESUME): back to postcopy-paused, then a second recovery completes", |p| { p.truncate_at("resume"); None }),
        case!(Valid, "SM-PAUSE-IN-RECOVER", "10", Recovery, "the first recovery channel is lost right after RECV_BITMAP (answered; no POSTCOPY_RESUME): back to postcopy-paused, then a second recovery completes", |p| { p.truncate_at("resume"); None }),
        case!(Invalid, "CMD-RECV-BITMAP-LEN", "7.2", Recovery, "the recovery channel's RECV_BITMAP with length 5 for a 3-byte name", |p| {
            p.set("recv_bitmap", recv_bitmap_len5()); Some(o(p, "recv_bitmap") + 3)
        }),
        case!(Invalid, "CMD-RECV-BITMAP-LEN", "10", Recovery, "the recovery channel's RECV_BITMAP with length 5 for a 3-byte name", |p| {
            p.set("recv_bitmap", recv_bitmap_len5()); Some(o(p, "recv_bitmap") + 3)
        }),
        case!(Invalid, "RAM-OFFSET", "7.2", Recovery, "after POSTCOPY_RESUME (postcopy-active again), the recovery channel's page record at the block's length: the destination pauses again", |p| {
            set_be64(p, "zero3", 0, RAM_BYTES | RamFlags::ZERO.0); Some(o(p, "zero3"))
        }),
        case!(Invalid, "RAM-OFFSET", "10", Recovery, "after POSTCOPY_RESUME (postcopy-active again), the recovery channel's page record at the block's length: the destination pauses again", |p| {
            set_be64(p, "zero3", 0, RAM_BYTES | RamFlags::ZERO.0); Some(o(p, "zero3"))
        }),
        case!(Invalid, "CMD-BLOCK-UNKNOWN", "10", Recovery, "the recovery channel's RECV_BITMAP names block `rom`", |p| {
            p.get("recv_bitmap")[6..9].copy_from_slice(b"rom"); Some(o(p, "recv_bitmap") + 5)
        }),
        case!(Invalid, "SM-RECOVER-NO-HEADER", "7.2", Recovery, "a recovery channel starting with the QEVM header and configuration", header_before_recv_bitmap),
        case!(Invalid, "SM-RECOVER-NO-HEADER", "10", Recovery, "a recovery channel starting with the QEVM header and configuration", header_before_recv_bitmap),
        // ---- a block of 2 MiB pages (hugetlbfs on QEMU), postcopy ----
        case!(Valid, "RAM-HOSTPAGE", "7.2", HugePostcopy, "7.2 postcopy of a 4 MiB block of 2 MiB pages: MEM_SIZE carries page_size 2 MiB, ADVISE the 2 MiB summary, host page 1 discarded whole and sent after POSTCOPY_RUN as 512 consecutive target pages, completed", |_| None, HUGE_EXERCISES),
        case!(Valid, "RAM-HOSTPAGE", "10", HugePostcopy, "10.x postcopy of a 4 MiB block of 2 MiB pages: MEM_SIZE carries page_size 2 MiB, ADVISE the 2 MiB summary, host page 1 discarded whole and sent after POSTCOPY_RUN as 512 consecutive target pages, completed", |_| None, HUGE_EXERCISES),
        case!(Invalid, "RAM-PAGESIZE", "7.2", HugePostcopy, "the MEM_SIZE entry of `ram` declares 1 GiB pages; the destination's block has 2 MiB pages", page_size_1g),
        case!(Invalid, "RAM-PAGESIZE", "10", HugePostcopy, "the MEM_SIZE entry of `ram` declares 1 GiB pages; the destination's block has 2 MiB pages", page_size_1g),
        case!(Invalid, "RAM-HOSTPAGE", "7.2", HugePostcopy, "after POSTCOPY_RUN, a target page of host page 0 between the first two target pages of host page 1 (incomplete): the destination pauses", host_page_interleaved),
        case!(Invalid, "RAM-HOSTPAGE", "10", HugePostcopy, "after POSTCOPY_RUN, a target page of host page 0 between the first two target pages of host page 1 (incomplete): the destination pauses", host_page_interleaved),
        case!(Valid, "SM-PARTIAL-HOSTPAGE", "7.2", HugeRecovery, "a 7.2 recovery with 2 MiB pages: the main channel is cut after POSTCOPY_RUN with 101 of host page 1's 512 target pages received; RECV_BITMAP(ram) shows pages 0-4 only (host page 1 dropped), host page 1 resent whole, completed", |_| None, HUGE_RECOVERY_EXERCISES),
        case!(Valid, "SM-PARTIAL-HOSTPAGE", "10", HugeRecovery, "a 10.x recovery with 2 MiB pages: the main channel is cut after POSTCOPY_RUN with 101 of host page 1's 512 target pages received; RECV_BITMAP(ram) shows pages 0-4 only (host page 1 dropped), host page 1 resent whole, completed", |_| None, HUGE_RECOVERY_EXERCISES),
        // ---- guest faults: the runner makes a guest access (super::faults, replay.faults) ----
        case!(Valid, "SM-FIRST-REQ-NAMED", "7.2", Postcopy, "the postcopy base with a guest access to page 2 once POSTCOPY_RUN took effect, before page 2 is written: the first page request on the connection is REQ_PAGES_ID(ram, 8192, 4096); then page 2 arrives, completed", |_| None, POSTCOPY_EXERCISES),
        case!(Valid, "SM-FIRST-REQ-NAMED", "10", Postcopy, "the postcopy base with a guest access to page 2 once POSTCOPY_RUN took effect, before page 2 is written: the first page request on the connection is REQ_PAGES_ID(ram, 8192, 4096); then page 2 arrives, completed", |_| None, POSTCOPY_EXERCISES),
        case!(Valid, "SM-REREQUEST", "7.2", FaultRecover, "a guest access to page 2 after POSTCOPY_RUN, requested, then the main channel cut before page 2: after RESUME_ACK on the recovery channel (and a new access to page 3) the first request is page 2 again, naming ram; pages 2 and 3 resent, completed", |_| None, RECOVERY_EXERCISES),
        case!(Valid, "SM-REREQUEST", "10", FaultRecover, "a guest access to page 2 after POSTCOPY_RUN, requested, then the main channel cut before page 2: after RESUME_ACK on the recovery channel (and a new access to page 3) the first request is page 2 again, naming ram; pages 2 and 3 resent, completed", |_| None, RECOVERY_EXERCISES),
        // ---- a multifd migration (main channel and two multifd connections) ----
        case!(Valid, "MFD-SYNC", "7.2", MultifdPrecopy, "a 7.2 multifd migration: pages 0 and 4 on two multifd connections (ids 0 and 1), zero pages on the main channel, one SYNC per connection for each of the three EOS, completed", |_| None, &["MFD-CHANNEL", "MFD-FLAGS", "MFD-MAGIC", "MFD-VERSION", "MFD-PAGES"]),
        case!(Invalid, "MFD-CHANNEL", "7.2", MultifdPrecopy, "both multifd connections' init packets name channel id 0 (the second one opened is rejected at its id byte)", |p| {
            p.get("c2_init")[24] = 0; Some(multifd::offset_in_conn(p, "c2_init") + 24)
        }),
        case!(Invalid, "MFD-CHANNEL", "7.2", MultifdPrecopy, "the second multifd connection's init packet names channel id 2, out of range for multifd-channels 2 (rejected at its id byte)", |p| {
            p.get("c2_init")[24] = 2; Some(multifd::offset_in_conn(p, "c2_init") + 24)
        }),
        case!(Invalid, "MFD-FLAGS", "7.2", MultifdPrecopy, "the first connection's page packet with flag bit 1 (zlib compression, not negotiated)", |p| {
            p.get("c1_pages")[11] |= 2; Some(multifd::offset_in_conn(p, "c1_pages") + 8)
        }),
        case!(Invalid, "MFD-SYNC", "7.2", MultifdPrecopy, "the second connection ends (closed by the source) without the SYNC of the END's EOS: the main channel waits for it at its last sync point", |p| {
            p.remove("c2_sync3"); Some(multifd::conn_len(p, 1))
        }),
        case!(Valid, "MFD-SYNC", "10", MultifdPrecopy, "a 10.x multifd migration: pages 0 and 4 on two multifd connections (ids 0 and 1), zero pages on the main channel, one SYNC per connection for each of the three MULTIFD_FLUSH, completed", |_| None, &["MFD-CHANNEL", "MFD-FLAGS", "MFD-MAGIC", "MFD-VERSION", "MFD-PAGES"]),
        case!(Invalid, "MFD-CHANNEL", "10", MultifdPrecopy, "both multifd connections' init packets name channel id 0 (the second one opened is rejected at its id byte)", |p| {
            p.get("c2_init")[24] = 0; Some(multifd::offset_in_conn(p, "c2_init") + 24)
        }),
        case!(Invalid, "MFD-CHANNEL", "10", MultifdPrecopy, "the second multifd connection's init packet names channel id 2, out of range for multifd-channels 2 (rejected at its id byte)", |p| {
            p.get("c2_init")[24] = 2; Some(multifd::offset_in_conn(p, "c2_init") + 24)
        }),
        case!(Invalid, "MFD-FLAGS", "10", MultifdPrecopy, "the first connection's page packet with flag bit 1 (zlib compression, not negotiated)", |p| {
            p.get("c1_pages")[11] |= 2; Some(multifd::offset_in_conn(p, "c1_pages") + 8)
        }),
        case!(Invalid, "MFD-SYNC", "10", MultifdPrecopy, "the second connection ends (closed by the source) without the SYNC of the END's MULTIFD_FLUSH: the main channel waits for it at its last sync point", |p| {
            p.remove("c2_sync3"); Some(multifd::conn_len(p, 1))
        }),
    ];
    v.extend(super::devices::cases());
    v.extend(super::source::cases());
    for c in &mut v {
        let kind = c.class.name();
        c.name = format!(
            "{}-{}-{}-{}",
            kind,
            c.rule.to_ascii_lowercase(),
            c.base.name(),
            c.profile.replace('.', "")
        );
    }
    // Disambiguate repeated names (several valid cases of one rule).
    let mut seen = std::collections::BTreeMap::<String, usize>::new();
    for c in &mut v {
        let n = seen.entry(c.name.clone()).or_default();
        *n += 1;
        if *n > 1 {
            c.name = format!("{}-{}", c.name, n);
        }
    }
    v
}

/// Rules not covered by a synthetic decode case, and where they are checked instead.
pub const ELSEWHERE: &[(&str, &str)] = &[
    ("SM-CANCEL", "a control, no wire input, so no invalid case: valid-sm-cancel-source-recover-72 cancels a paused source (QEMU 7.2 usually stays in `cancelling`: skip list, D-10; qmig-src reaches `cancelled`); protocol/tests/machine_cuts.rs cancel_from_paused_releases_waits, cancel_from_recover_releases_waits"),
    ("SM-TIMEOUT", "a MAY with no wire input, so no invalid case: valid-sm-timeout-recovery-{72,10} cut the main channel by silence and require a destination with a silence bound (qmig-dst: x-qmig-silence-timeout) to pause (QEMU has none, D-12: unsupported); reference-dst/tests/silence.rs (bytes that keep coming never trip the bound); protocol/tests/machine_harness.rs silence_counts_as_channel_loss"),
];
