//! The `Destination` state machine driven by arbitrary stream chunks, channel events, faults,
//! timeouts and operator controls.
//!
//! Input: knob byte (bit 0 profile, bit 1 postcopy-ram, bit 7 tiny caps), layout byte (see
//! `qmig_fuzz::layouts`), op count byte, that many 3-byte ops, then the stream bytes that the
//! `Feed` ops (and, after the ops, one final feed of everything left) deliver. Ops:
//! `0` feed `a*256+b+1` bytes, `1` channel closed, `2` channel opened (recovery), `3` control
//! `a % 6`, `4` fault on block `a`, page `b` (some far outside), `5` timeout check after
//! `a * 100 ms`, `6` drain the return path.
//! Checks: no panic; every placement, zeroing, discard and XBZRLE read lies inside guest RAM
//! (`CheckedMemory` panics otherwise); no `Event::IllegalTransition`; a violation always comes
//! with a status change (to failed or postcopy-paused), unless the migration had already
//! ended (bytes after EOF are reported and change nothing).
#![no_main]

use libfuzzer_sys::fuzz_target;
use qmig_fuzz::{assert_no_illegal, layouts, take, CheckedMemory, Knobs, TPS};
use qmig_protocol::machine::{
    Control, Destination, DestinationConfig, Event, FaultOutcome, Instant, MigrationStatus,
};

const CONTROLS: [Control; 6] = [
    Control::Recover,
    Control::Pause,
    Control::Cancel,
    Control::StartPostcopy,
    Control::Resume,
    Control::Complete,
];

struct Run {
    d: Destination,
    mem: CheckedMemory,
    buf: Vec<u8>,
    now: u64,
    rp: Vec<u8>,
}

impl Run {
    fn drain(&mut self) {
        while let Some(ev) = self.d.poll_event() {
            if let Event::FaultResolved { block, offset } = assert_no_illegal(ev) {
                assert!(block < self.d.config().blocks.len());
                assert!(offset < self.d.config().blocks[block].len);
            }
        }
    }

    fn feed(&mut self, bytes: &[u8]) {
        self.buf.extend_from_slice(bytes);
        loop {
            let before = self.d.status();
            match self
                .d
                .handle_stream(Instant(self.now), &self.buf, &mut self.mem)
            {
                Ok(0) => break,
                Ok(n) => {
                    assert!(n <= self.buf.len());
                    self.buf.drain(..n);
                }
                Err(v) => {
                    let after = self.d.status();
                    assert!(
                        after != before
                            || after.is_final()
                            || after == MigrationStatus::PostcopyPaused,
                        "violation {v:?} without a status change ({before:?})"
                    );
                    self.buf.clear();
                    self.d.handle_channel_closed(Instant(self.now));
                    break;
                }
            }
            self.drain();
        }
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
    let (machine, blocks) = layouts(head[1]);
    let nops = head[2] as usize;
    let ops = take(&mut rest, nops * 3);
    let mut cfg = DestinationConfig::new(k.profile(), machine, blocks.clone(), k.bit(1));
    cfg.limits = k.limits();
    cfg.silence_timeout = Some(1_000_000_000);
    cfg.max_device_bytes = 1 << 20;
    let Ok(d) = Destination::new(cfg) else {
        return;
    };
    let mut run = Run {
        d,
        mem: CheckedMemory::new(&blocks, TPS),
        buf: Vec::new(),
        now: 1,
        rp: Vec::new(),
    };
    let _ = run.d.handle_channel_opened(Instant(run.now));
    run.drain();
    for op in ops.chunks_exact(3) {
        run.now += 1_000_000;
        let (a, b) = (op[1], op[2]);
        match op[0] % 7 {
            0 => {
                let chunk = take(&mut rest, (a as usize) << 8 | b as usize).to_vec();
                run.feed(&chunk);
            }
            1 => {
                run.buf.clear();
                run.d.handle_channel_closed(Instant(run.now));
            }
            2 => {
                run.buf.clear();
                let _ = run.d.handle_channel_opened(Instant(run.now));
            }
            3 => {
                let _ = run
                    .d
                    .handle_control(Instant(run.now), CONTROLS[a as usize % 6]);
            }
            4 => {
                let block = a as usize % (blocks.len() + 1);
                let offset = if a & 0x80 != 0 {
                    u64::MAX - TPS + 1 - b as u64 * TPS
                } else {
                    b as u64 * TPS * (1 + (a as u64 & 0x70))
                };
                let out = run.d.handle_fault(block, offset);
                let inside = blocks.get(block).is_some_and(|s| offset < s.len);
                if !inside {
                    assert_eq!(out, FaultOutcome::OutOfRange, "fault outside RAM: {out:?}");
                }
            }
            5 => {
                run.now += a as u64 * 100_000_000;
                run.d.handle_timeout(Instant(run.now));
            }
            _ => {
                run.d.poll_transmit(&mut run.rp);
            }
        }
        run.drain();
    }
    while !rest.is_empty() {
        let chunk = take(&mut rest, 1 << 16);
        run.now += 1_000_000;
        run.feed(chunk);
    }
    run.d.poll_transmit(&mut run.rp);
    run.drain();
});
