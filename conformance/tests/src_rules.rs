//! The source behaviour checks (`runner::src_rules`) and the main-connection broken sources
//! (`runner::broken_src`) on the synthetic base streams, without a live source: the books
//! accept what a conforming source sends, and name the rule for each misplaced, repeated or
//! forbidden SWITCHOVER_START, a late or out-of-order requested page; the tamper stages make
//! exactly their defect.

use qmig_conformance::runner::broken_src::{SrcBreakage, Tamper};
use qmig_conformance::runner::play_dst::Request;
use qmig_conformance::runner::src_rules::{switchover_to_72, urgent_first, Switchover};
use qmig_conformance::synth::base;
use qmig_conformance::synth::build::Parts;
use qmig_protocol::command::Command;
use qmig_protocol::limits::Limits;
use qmig_protocol::stream::{Channel, StreamDecoder};
use qmig_protocol::{Profile, WireError};

fn profile(ten: bool) -> Profile {
    if ten {
        Profile::QEMU_10
    } else {
        Profile::QEMU_7_2
    }
}

/// Runs every item of `bytes` through the books; the first failure, else the books.
fn books(bytes: &[u8], ten: bool) -> Result<Switchover, String> {
    let mut dec = StreamDecoder::new(Channel::Main, profile(ten), Limits::DEFAULT);
    dec.set_final(true);
    let mut sw = Switchover::default();
    let mut pos = 0;
    while pos < bytes.len() {
        let at = dec.offset();
        match dec.decode(&bytes[pos..]) {
            Ok((item, n)) => {
                sw.item(&item, at)?;
                pos += n;
            }
            Err(WireError::Invalid(v)) => {
                let m = format!("{} at offset {}", v.rule.id(), v.offset);
                return Err(switchover_to_72(&v, profile(ten), &m).unwrap_or(m));
            }
            Err(e) => return Err(format!("{e:?}")),
        }
    }
    Ok(sw)
}

fn switchover_at(p: &Parts) -> u64 {
    p.offset_of("switchover")
}

#[test]
fn conforming_bases_pass_the_switchover_books() {
    let p = base::precopy(true);
    let sw = books(&p.bytes(), true).unwrap();
    assert_eq!(sw.sent, vec![switchover_at(&p)]);
    let m = sw.expect(1).unwrap();
    assert!(m.starts_with("SWITCHOVER_START once, at offset "), "{m}");
    assert!(sw
        .expect(0)
        .unwrap_err()
        .starts_with("SM-SWITCHOVER-START: 1 "));
    let sw = books(&base::precopy(false).bytes(), false).unwrap();
    assert_eq!(sw.expect(0).unwrap(), "no SWITCHOVER_START");
    assert!(sw.expect(1).is_err());
    let p = base::postcopy(true);
    assert_eq!(
        books(&p.bytes(), true).unwrap().sent,
        vec![switchover_at(&p)]
    );
    assert!(books(&base::postcopy(false).bytes(), false)
        .unwrap()
        .sent
        .is_empty());
}

#[test]
fn misplaced_repeated_or_forbidden_switchover_names_the_rule() {
    let sw = || base::cmd(Command::SwitchoverStart);
    // Twice.
    let mut p = base::precopy(true);
    p.insert_after("switchover", "again", sw());
    let e = books(&p.bytes(), true).unwrap_err();
    assert!(
        e.starts_with("SM-SWITCHOVER-START: a second SWITCHOVER_START at offset "),
        "{e}"
    );
    // After the ram END.
    let mut p = base::precopy(true);
    p.remove("switchover");
    p.insert_after("end_footer", "late", sw());
    let e = books(&p.bytes(), true).unwrap_err();
    assert!(e.contains("after the ram SECTION_END"), "{e}");
    // After the first discard (postcopy).
    let mut p = base::postcopy(true);
    p.remove("switchover");
    p.insert_after("discard", "late", sw());
    let e = books(&p.bytes(), true).unwrap_err();
    assert!(e.contains("after the first POSTCOPY_RAM_DISCARD"), "{e}");
    // To a 7.2 destination.
    let mut p = base::precopy(false);
    p.insert_after("start_footer", "sw72", sw());
    let at = p.offset_of("sw72") + 1;
    let e = books(&p.bytes(), false).unwrap_err();
    assert_eq!(
        e,
        format!("SM-SWITCHOVER-START: the source sent SWITCHOVER_START (command 11) to a 7.2 destination (CMD-UNKNOWN at offset {at})")
    );
}

fn req(page: u64, asked_at: u64, arrived_at: Option<u64>, others: u64) -> Request {
    Request {
        block: 0,
        page,
        asked_at,
        arrived_at,
        others,
    }
}

#[test]
fn urgent_first_order_and_slack() {
    let names = [("ram".to_string(), 256u64)];
    let ok = [req(200, 10, Some(20), 1), req(120, 10, Some(30), 0)];
    assert_eq!(urgent_first(&ok, 32, &names).unwrap(), "200@+1 120@+0");
    let late = [req(200, 10, Some(20), 33)];
    let e = urgent_first(&late, 32, &names).unwrap_err();
    assert!(
        e.starts_with("SM-URGENT-FIRST: ram page 200 arrived after 33 records"),
        "{e}"
    );
    let swapped = [req(200, 10, Some(40), 0), req(120, 10, Some(30), 0)];
    let e = urgent_first(&swapped, 32, &names).unwrap_err();
    assert!(
        e.starts_with("SM-URGENT-FIRST: ram page 120 (requested after page 200) arrived first"),
        "{e}"
    );
    let missing = [req(200, 10, None, 0)];
    assert!(urgent_first(&missing, 32, &names).is_err());
}

/// Runs `bytes` through a tamper stage of `kind` as the main connection, in 7-byte reads.
fn tamper(kind: SrcBreakage, bytes: &[u8], ten: bool, requested: &[(usize, u64)]) -> Vec<u8> {
    let mut t = Tamper::new(kind);
    let dec = StreamDecoder::new(Channel::Main, profile(ten), Limits::DEFAULT);
    t.connection(&dec, 1);
    let blocks = [("ram".to_string(), 256u64)];
    let mut out = Vec::new();
    for c in bytes.chunks(7) {
        out.extend(t.push(c, false, None, &blocks, requested));
    }
    out.extend(t.push(&[], true, None, &blocks, requested));
    out
}

#[test]
fn tamper_stages_make_exactly_their_defect() {
    // switchover-start-72: the command before the ram END of a 7.2 stream; a 10.x one passes.
    let p = base::precopy(false);
    let got = tamper(SrcBreakage::SwitchoverStart72, &p.bytes(), false, &[]);
    let end = p.offset_of("end_hdr") as usize;
    let mut want = p.bytes();
    want.splice(end..end, base::cmd(Command::SwitchoverStart));
    assert_eq!(got, want);
    let ten = base::precopy(true).bytes();
    assert_eq!(tamper(SrcBreakage::SwitchoverStart72, &ten, true, &[]), ten);
    // no-discard: the postcopy stream without its discard.
    let mut p = base::postcopy(false);
    let got = tamper(SrcBreakage::NoDiscard, &p.bytes(), false, &[]);
    p.remove("discard");
    assert_eq!(got, p.bytes());
    // urgent-late on a stream of fewer than 64 later records: every record kept, the
    // requested one moved to the final EOS.
    let p = base::postcopy(false).bytes();
    let got = tamper(SrcBreakage::UrgentLate, &p, false, &[(0, 3)]);
    assert_eq!(got.len(), p.len());
    assert_ne!(got, p);
    books(&got, false).expect("the altered stream stays well-formed");
}
