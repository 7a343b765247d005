//! Properties of the main-stream codec:
//! - every command type round-trips through `Command::encode` / `decode_command`, and inside a
//!   stream through `StreamDecoder` / `Item::encode`;
//! - no input makes `StreamDecoder` panic, on any channel kind and profile, whole or final,
//!   from random bytes or from mutations of a real vector (with and without a VM description);
//! - decoding in two chunks equals decoding the whole input, for every split point of the 7.2
//!   `precopy-footer-lookalike` vector and for a dense sample of split points of the 10.0
//!   `postcopy-none-nocpu` vector (every split in the header, package and tail regions, one in 193
//!   elsewhere); and for random multi-chunk splits.

mod common;

use proptest::prelude::*;
use qmig_protocol::codes::CommandCode;
use qmig_protocol::command::{decode_command, encode_ranges, Advise, Command, Discard};
use qmig_protocol::limits::Limits;
use qmig_protocol::profile::Profile;
use qmig_protocol::reader::Reader;
use qmig_protocol::stream::{Channel, Item, StreamDecoder};
use qmig_protocol::vmdesc::VmDesc;
use qmig_protocol::{Rule, WireError};
use std::sync::OnceLock;

/// An owned description of a command, from which a borrowed `Command` is built.
#[derive(Clone, Debug)]
enum Case {
    OpenReturnPath,
    Ping(u32),
    Advise(Option<(u64, u64)>),
    Listen,
    Run,
    Discard(Vec<u8>, Vec<(u64, u64)>),
    Packaged(u32),
    EnableColo,
    Resume,
    RecvBitmap(Vec<u8>),
    SwitchoverStart,
}

fn name() -> impl Strategy<Value = Vec<u8>> {
    prop::collection::vec(any::<u8>(), 1..=255)
}

fn case() -> impl Strategy<Value = Case> {
    prop_oneof![
        Just(Case::OpenReturnPath),
        any::<u32>().prop_map(Case::Ping),
        proptest::option::of((any::<u64>(), any::<u64>())).prop_map(Case::Advise),
        Just(Case::Listen),
        Just(Case::Run),
        (
            name(),
            prop::collection::vec((any::<u64>(), any::<u64>()), 1..=12)
        )
            .prop_map(|(n, r)| Case::Discard(n, r)),
        (0..=Limits::DEFAULT.max_packaged).prop_map(Case::Packaged),
        Just(Case::EnableColo),
        Just(Case::Resume),
        name().prop_map(Case::RecvBitmap),
        Just(Case::SwitchoverStart),
    ]
}

fn with_command<R>(c: &Case, f: impl FnOnce(Command<'_>) -> R) -> R {
    let mut ranges = Vec::new();
    let cmd = match c {
        Case::OpenReturnPath => Command::OpenReturnPath,
        Case::Ping(v) => Command::Ping(*v),
        Case::Advise(a) => Command::PostcopyAdvise(a.map(|(s, t)| Advise {
            ram_pagesize_summary: s,
            target_page_size: t,
        })),
        Case::Listen => Command::PostcopyListen,
        Case::Run => Command::PostcopyRun,
        Case::Discard(n, r) => {
            encode_ranges(r, &mut ranges);
            Command::RamDiscard(Discard::new(n, &ranges).unwrap())
        }
        Case::Packaged(len) => Command::Packaged { len: *len },
        Case::EnableColo => Command::EnableColo,
        Case::Resume => Command::PostcopyResume,
        Case::RecvBitmap(n) => Command::RecvBitmap { name: n },
        Case::SwitchoverStart => Command::SwitchoverStart,
    };
    f(cmd)
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 2000, ..ProptestConfig::default() })]

    #[test]
    fn every_command_round_trips(c in case(), base in 0u64..1 << 40) {
        with_command(&c, |cmd| {
            let mut bytes = Vec::new();
            cmd.encode(&mut bytes);
            prop_assert_eq!(bytes.len(), 5 + cmd.payload_len());
            prop_assert_eq!(bytes[0], 0x08);
            let mut r = Reader::new(&bytes[1..], base + 1);
            let got = decode_command(&mut r, &Profile::QEMU_10, &Limits::DEFAULT);
            prop_assert_eq!(got, Ok(cmd));
            prop_assert_eq!(r.consumed(), bytes.len() - 1);
            // Every strict prefix is Incomplete.
            for cut in 1..bytes.len() {
                let mut r = Reader::new(&bytes[1..cut], base + 1);
                let e = decode_command(&mut r, &Profile::QEMU_10, &Limits::DEFAULT);
                prop_assert!(matches!(e, Err(WireError::Incomplete { .. })), "cut {}: {:?}", cut, e);
            }
            // 7.2 does not know SWITCHOVER_START.
            let mut r = Reader::new(&bytes[1..], base + 1);
            let old = decode_command(&mut r, &Profile::QEMU_7_2, &Limits::DEFAULT);
            if cmd.code() == CommandCode::SWITCHOVER_START {
                prop_assert_eq!(old, Err(WireError::invalid(base + 1, Rule::CmdUnknown, 11)));
            } else {
                prop_assert_eq!(old, Ok(cmd));
            }
            // The same bytes through a recovery-channel StreamDecoder, after the RECV_BITMAP
            // that must come first on such a channel (SM-RECOVER-NO-HEADER).
            let mut d = StreamDecoder::new(Channel::Resume, Profile::QEMU_10, Limits::DEFAULT);
            let mut first = Vec::new();
            Command::RecvBitmap { name: b"ram" }.encode(&mut first);
            prop_assert_eq!(d.decode(&first).map(|(_, n)| n), Ok(first.len()));
            let (item, used) = d.decode(&bytes).unwrap();
            prop_assert_eq!(item, Item::Command(cmd));
            prop_assert_eq!(used, bytes.len());
            let mut again = Vec::new();
            item.encode(&mut again);
            prop_assert_eq!(again, bytes);
            Ok(())
        })?;
    }
}

/// Decodes everything it can; returns the items' offsets and encodings, and the final error.
fn drain(d: &mut StreamDecoder, input: &[u8], is_final: bool) -> (Vec<(u64, Vec<u8>)>, WireError) {
    let mut pos = 0;
    let mut out = Vec::new();
    loop {
        let at = d.offset();
        let r = if is_final {
            d.decode_final(&input[pos..])
        } else {
            d.decode(&input[pos..])
        };
        match r {
            Ok((item, used)) => {
                assert!(pos + used <= input.len());
                let mut enc = Vec::new();
                item.encode(&mut enc);
                assert_eq!(enc, &input[pos..pos + used], "re-encoding at {at}");
                out.push((at, enc));
                pos += used;
                // PackageEnd and an empty device payload use no bytes but move the grammar on;
                // anything else that used nothing would loop.
                assert!(used > 0 || matches!(item, Item::PackageEnd | Item::DeviceData(_)));
            }
            Err(e) => return (out, e),
        }
    }
}

fn any_decoder() -> impl Strategy<Value = StreamDecoder> {
    (
        prop_oneof![
            Just(Channel::Main),
            Just(Channel::Resume),
            Just(Channel::Packaged)
        ],
        prop_oneof![Just(Profile::QEMU_7_2), Just(Profile::QEMU_10)],
    )
        .prop_map(|(c, p)| StreamDecoder::new(c, p, Limits::DEFAULT))
}

fn vector_bytes(version: &str, name: &str) -> Vec<u8> {
    std::fs::read(
        common::vectors_root()
            .join(version)
            .join(name)
            .join("stream.bin"),
    )
    .unwrap()
}

fn lookalike() -> &'static (Vec<u8>, VmDesc) {
    static V: OnceLock<(Vec<u8>, VmDesc)> = OnceLock::new();
    V.get_or_init(|| {
        let bytes = vector_bytes("qemu-7.2", "precopy-footer-lookalike");
        let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_7_2, Limits::DEFAULT);
        let mut pos = 0;
        let json = loop {
            let (item, used) = d.decode(&bytes[pos..]).unwrap();
            pos += used;
            if let Item::VmDescription(j) = item {
                break j.to_vec();
            }
        };
        let desc = VmDesc::parse(&json, 0, &Limits::DEFAULT).unwrap();
        (bytes, desc)
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 3000, ..ProptestConfig::default() })]

    #[test]
    fn random_bytes_never_panic(d in any_decoder(), bytes in prop::collection::vec(any::<u8>(), 0..1024), is_final in any::<bool>()) {
        let mut d = d;
        let _ = drain(&mut d, &bytes, is_final);
    }

    #[test]
    fn random_bytes_after_a_header_never_panic(p in prop_oneof![Just(Profile::QEMU_7_2), Just(Profile::QEMU_10)],
                                               tail in prop::collection::vec(any::<u8>(), 0..1024), is_final in any::<bool>()) {
        let mut bytes = vec![0x51, 0x45, 0x56, 0x4d, 0, 0, 0, 3, 7, 0, 0, 0, 4, b'n', b'o', b'n', b'e'];
        bytes.extend_from_slice(&tail);
        let mut d = StreamDecoder::new(Channel::Main, p, Limits::DEFAULT);
        let _ = drain(&mut d, &bytes, is_final);
    }
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1500, ..ProptestConfig::default() })]

    #[test]
    fn mutated_vector_never_panics(muts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..8),
                                   cut in any::<prop::sample::Index>(), with_desc in any::<bool>(), is_final in any::<bool>()) {
        let (orig, desc) = lookalike();
        let mut bytes = orig.clone();
        for (i, b) in &muts {
            let i = i.index(bytes.len());
            bytes[i] = *b;
        }
        let bytes = &bytes[..cut.index(bytes.len() + 1)];
        let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_7_2, Limits::DEFAULT);
        if with_desc {
            d.set_vmdesc(desc.clone());
        }
        let (_, e) = drain(&mut d, bytes, is_final);
        if let WireError::Invalid(v) = e {
            prop_assert!(v.offset <= bytes.len() as u64 + 8, "{v}");
        }
    }
}

/// Decodes `bytes` with one split at `k`: first with the input ending at `k`, then with all.
fn split_decode(d: &StreamDecoder, bytes: &[u8], k: usize) -> Vec<(u64, Vec<u8>)> {
    let mut d = d.clone();
    let (mut items, e) = drain(&mut d, &bytes[..k], false);
    assert!(e.is_incomplete(), "split {k}: prefix gave {e}");
    let pos = d.offset() as usize;
    let (rest, e) = drain(&mut d, &bytes[pos..], false);
    assert!(e.is_incomplete(), "split {k}: {e}");
    items.extend(rest);
    items
}

fn whole(d: &StreamDecoder, bytes: &[u8]) -> Vec<(u64, Vec<u8>)> {
    let mut d = d.clone();
    let (items, e) = drain(&mut d, bytes, false);
    assert!(e.is_incomplete(), "{e}");
    assert_eq!(d.offset() as usize, bytes.len());
    assert!(d.at_end());
    items
}

#[test]
fn every_split_point_of_7_2_footer_lookalike_equals_whole() {
    let (bytes, desc) = lookalike();
    for with_desc in [false, true] {
        let mut d = StreamDecoder::new(Channel::Main, Profile::QEMU_7_2, Limits::DEFAULT);
        if with_desc {
            d.set_vmdesc(desc.clone());
        }
        let all = whole(&d, bytes);
        assert_eq!(all.len(), 1044);
        for k in 0..=bytes.len() {
            assert_eq!(
                split_decode(&d, bytes, k),
                all,
                "split {k} (vmdesc {with_desc})"
            );
        }
    }
}

#[test]
fn dense_split_points_of_10_0_postcopy_none_nocpu_equal_whole() {
    let bytes = vector_bytes("qemu-10.0", "postcopy-none-nocpu");
    let d = StreamDecoder::new(Channel::Main, Profile::QEMU_10, Limits::DEFAULT);
    let all = whole(&d, &bytes);
    assert_eq!(all.len(), 16421);
    let n = bytes.len();
    // Header/config/commands, the package (65703..65913) and the tail: every split.
    let dense = |k: usize| k < 400 || (65_600..66_000).contains(&k) || k + 400 > n;
    let mut tried = 0;
    for k in 0..=n {
        if dense(k) || k % 193 == 0 {
            assert_eq!(split_decode(&d, &bytes, k), all, "split {k}");
            tried += 1;
        }
    }
    assert!(tried > 1900, "{tried}");
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 200, ..ProptestConfig::default() })]

    #[test]
    fn random_chunking_equals_whole(cuts in prop::collection::vec(any::<prop::sample::Index>(), 1..40)) {
        let (bytes, _) = lookalike();
        let d = StreamDecoder::new(Channel::Main, Profile::QEMU_7_2, Limits::DEFAULT);
        let all = whole(&d, bytes);
        let mut ends: Vec<usize> = cuts.iter().map(|c| c.index(bytes.len() + 1)).collect();
        ends.push(bytes.len());
        ends.sort();
        let mut dd = d.clone();
        let mut got = Vec::new();
        for end in ends {
            let pos = dd.offset() as usize;
            if end < pos {
                continue;
            }
            let (items, e) = drain(&mut dd, &bytes[pos..end], false);
            prop_assert!(e.is_incomplete());
            got.extend(items);
        }
        prop_assert_eq!(got, all);
    }
}

fn postcopy_vmdesc() -> &'static VmDesc {
    static V: OnceLock<VmDesc> = OnceLock::new();
    V.get_or_init(|| {
        let json = std::fs::read(common::vectors_root().join("qemu-10.0/postcopy/vmdesc.json"));
        VmDesc::parse(&json.unwrap(), 0, &Limits::DEFAULT).unwrap()
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 1000, ..ProptestConfig::default() })]

    /// The device decoder and measurer never panic on arbitrary payloads, and agree: a payload
    /// that decodes whole measures to its own length when a non-subsection byte follows.
    #[test]
    fn device_decoder_never_panics(dev in any::<prop::sample::Index>(), bytes in prop::collection::vec(any::<u8>(), 0..2048)) {
        let desc = postcopy_vmdesc();
        let dev = &desc.devices[dev.index(desc.devices.len())];
        let tree = qmig_protocol::device::decode_device(dev, &bytes, 0, &Limits::DEFAULT);
        let mut followed = bytes.clone();
        followed.push(0x7e);
        let measured = qmig_protocol::device::measure(dev, &followed, 0, &Limits::DEFAULT);
        if let Ok(t) = tree {
            prop_assert_eq!(measured, Ok(t.len));
        }
    }

    /// Mutated VM descriptions never make the parser panic.
    #[test]
    fn vmdesc_parser_never_panics(muts in prop::collection::vec((any::<prop::sample::Index>(), any::<u8>()), 1..6),
                                  cut in any::<prop::sample::Index>()) {
        static JSON: OnceLock<Vec<u8>> = OnceLock::new();
        let mut json = JSON
            .get_or_init(|| {
                std::fs::read(common::vectors_root().join("qemu-7.2/postcopy/vmdesc.json")).unwrap()
            })
            .clone();
        for (i, b) in &muts {
            let i = i.index(json.len());
            json[i] = *b;
        }
        let json = &json[..cut.index(json.len() + 1)];
        let _ = VmDesc::parse(json, 0, &Limits::DEFAULT);
    }
}
