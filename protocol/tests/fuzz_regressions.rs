//! Regression tests for findings of the fuzz campaigns (`fuzz/README.md` lists them), each
//! reduced to the smallest stream that showed the problem.

use qmig_protocol::codes::{RamFlags, SectionType};
use qmig_protocol::header::{encode_configuration, encode_header};
use qmig_protocol::machine::{
    Destination, DestinationConfig, Event, GuestMemory, Instant, MemoryError, MigrationStatus,
    RamBlockSpec,
};
use qmig_protocol::ram::{encode_mem_size, BlockInfo};
use qmig_protocol::section::{encode_footer, SectionHeader, SectionIdent};
use qmig_protocol::sink::Sink;
use qmig_protocol::{Profile, Rule};

const TPS: u64 = 4096;

struct NoMemory;
impl GuestMemory for NoMemory {
    fn place_page(&mut self, _: usize, _: u64, _: &[u8]) -> Result<(), MemoryError> {
        Ok(())
    }
    fn place_zero(&mut self, _: usize, _: u64, _: u64) -> Result<(), MemoryError> {
        Ok(())
    }
    fn discard(&mut self, _: usize, _: u64, _: u64) -> Result<(), MemoryError> {
        Ok(())
    }
}

/// Header, configuration `none`, a RAM SECTION_START announcing one 4-page block, EOF.
fn complete_stream() -> Vec<u8> {
    let mut s = Vec::new();
    encode_header(3, &mut s);
    encode_configuration(b"none", &[], &mut s);
    SectionHeader::Start(SectionIdent {
        section_id: 2,
        idstr: b"ram",
        instance_id: 0,
        version_id: 4,
    })
    .encode(&mut s);
    s.put_be64((4 * TPS) | RamFlags::MEM_SIZE.0);
    encode_mem_size(
        [BlockInfo {
            name: b"ram",
            used_length: 4 * TPS,
            page_size: None,
            mr_addr: None,
        }],
        &mut s,
    );
    s.put_be64(RamFlags::EOS.0);
    encode_footer(2, &mut s);
    s.put_u8(SectionType::EOF.0);
    s
}

/// Found by `fuzz/fuzz_targets/destination.rs`: bytes after EOF (other than one VM
/// description) on a channel that is still open made the completed destination try the
/// transition completed -> failed, reported as `Event::IllegalTransition`. The violation is
/// still reported (EOF-TRAILING at the offending byte); the migration stays completed.
#[test]
fn garbage_after_eof_keeps_a_completed_destination_completed() {
    let mut s = complete_stream();
    let eof_end = s.len() as u64;
    s.put(b"\x42garbage");
    let blocks = vec![RamBlockSpec::new("ram", 4 * TPS, TPS)];
    let mut d = Destination::new(DestinationConfig::new(
        Profile::QEMU_10,
        "none",
        blocks,
        false,
    ))
    .unwrap();
    d.handle_channel_opened(Instant(1)).unwrap();
    let r = d.handle_stream(Instant(2), &s, &mut NoMemory);
    let events: Vec<Event> = std::iter::from_fn(|| d.poll_event()).collect();
    assert!(
        !events
            .iter()
            .any(|e| matches!(e, Event::IllegalTransition(_))),
        "{events:?}"
    );
    let v = r.expect_err("trailing bytes break EOF-TRAILING");
    assert_eq!((v.rule, v.offset), (Rule::EofTrailing, eof_end));
    assert_eq!(d.status(), MigrationStatus::Completed);
    d.handle_channel_closed(Instant(3));
    assert_eq!(d.status(), MigrationStatus::Completed);
    assert!(
        std::iter::from_fn(|| d.poll_event()).all(|e| !matches!(e, Event::IllegalTransition(_)))
    );
}
