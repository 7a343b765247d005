//! Decode check of a synthetic recovery case (checker `destination-recovery`): the protocol's
//! [`Destination`] machine is fed the cut main channel, loses it (it must pause), then takes each
//! recovery channel of `replay.channels` in turn after a `Recover` control.
//!
//! A channel with `expect_failure` must stop with `synthetic.expected` (rule, and offset counted
//! from 0 of that connection) and leave the machine in `expect_status` (`postcopy-paused`,
//! SM-PAUSE-IN-RECOVER); a recovery channel with `ends_mid_stream` is lost after its bytes and
//! must leave the machine in postcopy-paused too; the last channel must consume to its end and complete the migration,
//! with its return path equal to its `expected_return_path` byte for byte and the final RAM
//! equal to `final_ram`.

use qmig_protocol::machine::{Control, Destination, Instant, MigrationStatus};
use serde_json::Value;

use super::synth_dst;
use super::vector::Vector;

/// `Some(result)` for a synthetic recovery case, `None` for any other vector.
pub fn check(v: &Vector) -> Option<Result<String, String>> {
    let s = v.synthetic()?;
    (s["checker"] == "destination-recovery").then(|| check_recovery(v, s))
}

fn check_recovery(v: &Vector, s: &Value) -> Result<String, String> {
    let (cfg, mut mem) = synth_dst::setup(v, true);
    let mut dst = Destination::new(cfg).map_err(|e| format!("{e:?}"))?;
    let chans = v.replay_channels();
    let mut now = 0u64;
    let mut tick = || {
        now += 1;
        Instant(now)
    };
    let mut notes = Vec::new();
    for (i, ch) in chans.iter().enumerate() {
        let label = ch["label"].as_str().unwrap_or("?");
        let file = ch["feed_to_destination"]
            .as_str()
            .ok_or_else(|| format!("{label}: no feed_to_destination"))?;
        let bytes = v.read(file).map_err(|e| e.to_string())?;
        if i > 0 {
            dst.handle_control(tick(), Control::Recover)
                .map_err(|e| format!("{label}: Recover refused: {e:?}"))?;
        }
        dst.handle_channel_opened(tick())
            .map_err(|e| format!("{label}: channel refused: {e:?}"))?;
        let cut = ch["ends_mid_stream"].as_bool() == Some(true);
        let mut rp = Vec::new();
        let r = if cut {
            dst.handle_stream(tick(), &bytes, &mut mem)
        } else {
            dst.handle_stream_end(tick(), &bytes, &mut mem)
        };
        dst.poll_transmit(&mut rp);
        if ch["expect_failure"].as_bool() == Some(true) {
            let want_rule = s["expected"]["rule"].as_str().unwrap_or("");
            let want_off = s["expected"]["offset"].as_u64();
            let x = match r {
                Err(x) => x,
                Ok(n) => {
                    return Err(format!(
                        "{label}: invalid channel accepted ({n} of {} bytes consumed, status {}); expected {want_rule} at offset {want_off:?}",
                        bytes.len(),
                        dst.status()
                    ))
                }
            };
            if x.rule.id() != want_rule || Some(x.offset) != want_off {
                return Err(format!(
                    "{label}: expected {want_rule} at offset {want_off:?}, got {} at offset {}",
                    x.rule.id(),
                    x.offset
                ));
            }
            dst.handle_channel_closed(tick());
            let want_status = ch["expect_status"].as_str().unwrap_or("postcopy-paused");
            if dst.status().to_string() != want_status {
                return Err(format!(
                    "{label}: rejected ({} at {}), but the status is {}, not {want_status}",
                    x.rule.id(),
                    x.offset,
                    dst.status()
                ));
            }
            notes.push(format!(
                "{label}: rejected as expected: {} at offset {}, then {want_status}",
                x.rule.id(),
                x.offset
            ));
            continue;
        }
        let used = r.map_err(|x| format!("{label}: {x}"))?;
        if cut {
            // The main channel cut after POSTCOPY_RUN (SM-PAUSE-AFTER-RUN), or a recovery
            // channel lost in postcopy-recover (SM-PAUSE-IN-RECOVER): paused either way.
            dst.handle_channel_closed(tick());
            let when = if i == 0 {
                "cut after POSTCOPY_RUN"
            } else {
                "lost in postcopy-recover"
            };
            if dst.status() != MigrationStatus::PostcopyPaused {
                return Err(format!(
                    "{label}: {when}, status {} (want postcopy-paused)",
                    dst.status()
                ));
            }
            if i > 0 {
                notes.push(format!(
                    "{label}: {when} after {used} bytes, then postcopy-paused"
                ));
            }
        } else if used != bytes.len() {
            return Err(format!(
                "{label}: only {used} of {} bytes consumed",
                bytes.len()
            ));
        }
        if let Some(want) = ch["expected_return_path"].as_str() {
            synth_dst::same_return_path(v, &rp, want).map_err(|e| format!("{label}: {e}"))?;
        }
    }
    if dst.status() != MigrationStatus::Completed {
        return Err(format!("ends in {}, not completed", dst.status()));
    }
    synth_dst::same_final_ram(v, &mem)?;
    notes.push(format!(
        "{} channels: completed, return paths and final RAM as expected",
        chans.len()
    ));
    Ok(notes.join("; "))
}
