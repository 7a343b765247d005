//! The `Source` state machine driven by arbitrary return-path chunks, channel events, dirty
//! syncs, transmit budgets, timeouts and operator controls.
//!
//! Input: knob byte (bit 0 profile, bit 1 postcopy-ram, bit 7 tiny caps), layout byte (see
//! `qmig_fuzz::layouts`), op count byte, that many 3-byte ops, then the return-path bytes that
//! the `Rp` ops (and, after the ops, one final feed of everything left) deliver. Ops:
//! `0` transmit with a budget of `(a+1)*b` bytes, `1` return-path `a*256+b+1` bytes, `2` channel
//! closed, `3` channel opened, `4` control `a % 6`, `5` dirty sync of page `b` of block `a`,
//! `6` timeout check after `a * 100 ms`.
//! Checks: no panic; every page read lies inside guest RAM (`CheckedSourceMemory` panics
//! otherwise); no `Event::IllegalTransition`; a violation comes with a status change.
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_fuzz::{assert_no_illegal, layouts, take, CheckedSourceMemory, Knobs, TPS};
use qmig_protocol::bitmap::PageBitmap;
use qmig_protocol::machine::{Control, Instant, MigrationStatus, Source, SourceConfig};

const CONTROLS: [Control; 6] = [
    Control::Recover,
    Control::Pause,
    Control::Cancel,
    Control::StartPostcopy,
    Control::Resume,
    Control::Complete,
];

struct Run {
    s: Source,
    mem: CheckedSourceMemory,
    buf: Vec<u8>,
    out: Vec<u8>,
    now: u64,
}

impl Run {
    fn drain(&mut self) {
        while let Some(ev) = self.s.poll_event() {
            assert_no_illegal(ev);
        }
    }

    fn rp(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        loop {
            let before = self.s.status();
            match self.s.handle_return_path(Instant(self.now), &self.buf) {
                Ok(0) => break,
                Ok(n) => {
                    assert!(n <= self.buf.len());
                    self.buf.drain(..n);
                }
                Err(v) => {
                    let after = self.s.status();
                    assert!(
                        after != before
                            || after.is_final()
                            || after == MigrationStatus::PostcopyPaused,
                        "violation {v:?} without a status change ({before:?})"
                    );
                    self.buf.clear();
                    self.s.handle_channel_closed(Instant(self.now));
                    break;
                }
            }
            self.drain();
        }
        self.drain();
    }

    fn transmit(&mut self, budget: usize) {
        self.out.clear();
        let n = self.s.poll_transmit(&self.mem, &mut self.out, budget);
        assert_eq!(n, self.out.len());
        self.drain();
    }
}

fuzz_target!(|data: &[u8]| {
    let mut rest = data;
    let head = take(&mut rest, 3);
    if head.len() < 3 {
        return;
    }
    let k = Knobs(head[0]);
    let (machine, blocks) = layouts(head[1] % 2 + 6);
    let nops = head[2] as usize;
    let ops = take(&mut rest, nops * 3);
    let mut cfg = SourceConfig::new(k.profile(), machine, blocks.clone(), k.bit(1));
    cfg.limits = k.limits();
    cfg.silence_timeout = Some(1_000_000_000);
    let mut run = Run {
        s: Source::new(cfg),
        mem: CheckedSourceMemory::new(&blocks, TPS),
        buf: Vec::new(),
        out: Vec::new(),
        now: 1,
    };
    let _ = run.s.handle_channel_opened(Instant(run.now));
    run.drain();
    for op in ops.chunks_exact(3) {
        run.now += 1_000_000;
        let (a, b) = (op[1], op[2]);
        match op[0] % 7 {
            0 => run.transmit((a as usize + 1) * b as usize),
            1 => {
                let chunk = take(&mut rest, (a as usize) << 8 | b as usize).to_vec();
                run.rp(&chunk);
            }
            2 => {
                run.buf.clear();
                run.s.handle_channel_closed(Instant(run.now));
            }
            3 => {
                run.buf.clear();
                let _ = run.s.handle_channel_opened(Instant(run.now));
            }
            4 => {
                let _ = run
                    .s
                    .handle_control(Instant(run.now), CONTROLS[a as usize % 6]);
            }
            5 => {
                let block = a as usize % blocks.len();
                let mut bm = PageBitmap::new(blocks[block].pages(TPS));
                bm.set(b as u64 % bm.pages());
                run.s.handle_dirty_sync(block, &bm);
            }
            _ => {
                run.now += a as u64 * 100_000_000;
                run.s.handle_timeout(Instant(run.now));
            }
        }
        run.drain();
    }
    run.transmit(1 << 20);
    let tail = rest.to_vec();
    run.rp(&tail);
    run.transmit(1 << 20);
    run.drain();
});
