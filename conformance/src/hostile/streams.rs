//! Streams a malicious source sends: one valid precopy migration of a `none` machine with one
//! `ram` block, and each invalid class built on it, with the violation a destination must name.

use qmig_protocol::codes::{RamFlags, SectionType};
use qmig_protocol::command::Command;
use qmig_protocol::header::{encode_configuration, encode_header};
use qmig_protocol::ram::{encode_mem_size, BlockInfo};
use qmig_protocol::section::{encode_footer, SectionHeader, SectionIdent};
use qmig_protocol::sink::Sink;

/// Target page size.
pub const TPS: u64 = 4096;
/// Section id of `ram`.
const RAM_ID: u32 = 2;

/// The contents the valid stream gives page `i`: every byte `(i * 7 + 1) as u8`.
pub fn page(i: u64) -> Vec<u8> {
    vec![(i * 7 + 1) as u8; TPS as usize]
}

/// A stream under construction, with the offsets tests need.
#[derive(Clone, Debug, Default)]
pub struct Builder {
    /// The bytes so far.
    pub bytes: Vec<u8>,
}

impl Builder {
    /// Header and configuration for machine `none`.
    pub fn start() -> Self {
        let mut b = Builder::default();
        encode_header(3, &mut b.bytes);
        encode_configuration(b"none", &[], &mut b.bytes);
        b
    }

    /// Current length (the offset of what comes next).
    pub fn at(&self) -> u64 {
        self.bytes.len() as u64
    }

    /// RAM SECTION_START announcing one block `ram` of `ram_bytes`, then EOS and footer.
    pub fn ram_start(mut self, ram_bytes: u64) -> Self {
        SectionHeader::Start(SectionIdent {
            section_id: RAM_ID,
            idstr: b"ram",
            instance_id: 0,
            version_id: 4,
        })
        .encode(&mut self.bytes);
        self.bytes.put_be64(ram_bytes | RamFlags::MEM_SIZE.0);
        encode_mem_size(
            [BlockInfo {
                name: b"ram",
                used_length: ram_bytes,
                page_size: None,
                mr_addr: None,
            }],
            &mut self.bytes,
        );
        self.bytes.put_be64(RamFlags::EOS.0);
        encode_footer(RAM_ID, &mut self.bytes);
        self
    }

    /// Opens a RAM SECTION_PART.
    pub fn part(mut self) -> Self {
        SectionHeader::Part { section_id: RAM_ID }.encode(&mut self.bytes);
        self
    }

    /// A PAGE record of block `ram` at byte `offset` with `data`.
    pub fn page_at(mut self, offset: u64, data: &[u8]) -> Self {
        self.bytes.put_be64(offset | RamFlags::PAGE.0);
        self.bytes.put_str8(b"ram");
        self.bytes.put(data);
        self
    }

    /// EOS and the footer: closes a RAM part.
    pub fn end_part(mut self) -> Self {
        self.bytes.put_be64(RamFlags::EOS.0);
        encode_footer(RAM_ID, &mut self.bytes);
        self
    }

    /// A command.
    pub fn command(mut self, c: Command<'_>) -> Self {
        c.encode(&mut self.bytes);
        self
    }

    /// Raw bytes.
    pub fn raw(mut self, b: &[u8]) -> Self {
        self.bytes.put(b);
        self
    }

    /// RAM SECTION_END (empty) and EOF.
    pub fn finish(mut self) -> Self {
        SectionHeader::End { section_id: RAM_ID }.encode(&mut self.bytes);
        self.bytes.put_be64(RamFlags::EOS.0);
        encode_footer(RAM_ID, &mut self.bytes);
        self.bytes.put_u8(SectionType::EOF.0);
        self
    }
}

/// A valid migration of `ram_bytes` in which pages `0..pages` carry [`page`] contents.
pub fn valid(ram_bytes: u64, pages: u64) -> Builder {
    let mut b = Builder::start().ram_start(ram_bytes).part();
    for i in 0..pages {
        b = b.page_at(i * TPS, &page(i));
    }
    b.end_part().finish()
}

/// One class of invalid stream: its bytes, and what the destination must report.
#[derive(Clone, Debug)]
pub struct Case {
    /// Short name.
    pub name: &'static str,
    /// The bytes to send (then the sending side is shut down).
    pub bytes: Vec<u8>,
    /// The rule id the destination reports.
    pub rule: &'static str,
    /// The absolute offset it names (`None`: a channel loss, which has no offset).
    pub offset: Option<u64>,
    /// The final status (`failed`, or `completed` for bytes after EOF).
    pub status: &'static str,
    /// Pages `0..n` of guest RAM hold [`page`] contents; the rest stays zero.
    pub pages_placed: u64,
    /// Another `error-desc` accepted instead (a substring), where binaries differ.
    pub also: Option<&'static str>,
}

/// Every invalid class for a destination with one `ram` block of `ram_bytes`.
pub fn invalid_cases(ram_bytes: u64) -> Vec<Case> {
    let mut v = Vec::new();
    v.push(Case {
        name: "garbage",
        bytes: b"GET / HTTP/1.1\r\nHost: qmig\r\n\r\n".to_vec(),
        rule: "HDR-MAGIC",
        offset: Some(0),
        status: "failed",
        pages_placed: 0,
        also: None,
    });
    v.push(Case {
        name: "bad-magic",
        bytes: b"QEVX\x00\x00\x00\x03".to_vec(),
        rule: "HDR-MAGIC",
        offset: Some(0),
        status: "failed",
        pages_placed: 0,
        also: None,
    });
    v.push(Case {
        name: "bad-version",
        bytes: b"QEVM\x00\x00\x00\x02".to_vec(),
        rule: "HDR-VERSION",
        offset: Some(4),
        status: "failed",
        pages_placed: 0,
        also: None,
    });
    // Truncated: two pages placed, then the channel ends inside the third page record:
    // STREAM-TRUNCATED at that record (qmig-dst before 8a28d83 said only
    // `channel lost: SM-FATAL-BEFORE-RUN`).
    let b = Builder::start()
        .ram_start(ram_bytes)
        .part()
        .page_at(0, &page(0))
        .page_at(TPS, &page(1));
    let at = b.at();
    let b = b.page_at(2 * TPS, &page(2)[..100]);
    v.push(Case {
        name: "truncated",
        bytes: b.bytes,
        rule: "STREAM-TRUNCATED",
        offset: Some(at),
        status: "failed",
        pages_placed: 2,
        also: Some("channel lost: SM-FATAL-BEFORE-RUN"),
    });
    // A page just past the end of the block, after three good ones.
    let b = Builder::start()
        .ram_start(ram_bytes)
        .part()
        .page_at(0, &page(0))
        .page_at(TPS, &page(1))
        .page_at(2 * TPS, &page(2));
    let at = b.at();
    let b = b.page_at(ram_bytes, &page(9)).end_part().finish();
    v.push(Case {
        name: "out-of-range-page",
        bytes: b.bytes,
        rule: "RAM-OFFSET",
        offset: Some(at),
        status: "failed",
        pages_placed: 3,
        also: None,
    });
    // PACKAGED claiming 4 GiB.
    let b = Builder::start().ram_start(ram_bytes);
    let at = b.at();
    let b = b
        .command(Command::OpenReturnPath)
        .raw(b"\x08\x00\x07\x00\x04\xff\xff\xff\xff");
    v.push(Case {
        name: "oversized-packaged",
        bytes: b.bytes,
        rule: "CMD-PACKAGED-LEN",
        offset: Some(at + 5 + 5),
        status: "failed",
        pages_placed: 0,
        also: None,
    });
    // MEM_SIZE naming a block the destination does not have (named at that entry's first
    // byte: after the record's header word and the 12-byte entry of `ram`).
    let b = Builder::start().raw(b"\x01\x00\x00\x00\x02\x03ram\x00\x00\x00\x00\x00\x00\x00\x04");
    let at = b.at() + 8 + 1 + 3 + 8;
    let mut bytes = b.bytes;
    bytes.put_be64((2 * ram_bytes) | RamFlags::MEM_SIZE.0);
    bytes.put_str8(b"ram");
    bytes.put_be64(ram_bytes);
    bytes.put_str8(b"evil");
    bytes.put_be64(ram_bytes);
    v.push(Case {
        name: "unknown-block",
        bytes,
        rule: "RAM-BLOCK-UNKNOWN",
        offset: Some(at),
        status: "failed",
        pages_placed: 0,
        also: None,
    });
    // POSTCOPY_RUN with no ADVISE or LISTEN before it.
    let b = Builder::start().ram_start(ram_bytes);
    let at = b.at();
    let b = b.command(Command::PostcopyRun);
    v.push(Case {
        name: "wrong-order",
        bytes: b.bytes,
        rule: "CMD-ORDER",
        offset: Some(at),
        status: "failed",
        pages_placed: 0,
        also: None,
    });
    // PING with a 3-byte length.
    let b = Builder::start().ram_start(ram_bytes);
    let at = b.at();
    let b = b.raw(b"\x08\x00\x02\x00\x03\x00\x00\x01");
    v.push(Case {
        name: "bad-command-length",
        bytes: b.bytes,
        rule: "CMD-LEN",
        offset: Some(at + 3),
        status: "failed",
        pages_placed: 0,
        also: None,
    });
    // A complete migration, then garbage after EOF: reported, the migration stays completed.
    let b = valid(ram_bytes, 4);
    let at = b.at();
    let b = b.raw(b"after the end");
    v.push(Case {
        name: "after-eof-garbage",
        bytes: b.bytes,
        rule: "EOF-TRAILING",
        offset: Some(at),
        status: "completed",
        pages_placed: 4,
        also: None,
    });
    v
}
