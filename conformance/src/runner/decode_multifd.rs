//! Decode check of a synthetic multifd case (checker `destination-multifd`): the protocol's
//! [`Destination`] machine, configured with `multifd-channels` connections, is fed the main
//! channel and each `multifd_connections_in_order` file in turn (round robin, each as far as
//! the machine consumes it) until none makes progress; with `multifd_close_after_write` each
//! connection is then closed.
//!
//! An invalid case must stop with `synthetic.expected` (rule, and offset counted from 0 of the
//! connection `expected.channel` names) on that connection, the migration `failed`; a valid one
//! must consume every byte and complete, with the return path equal to `rp.bin` byte for byte
//! and the final RAM equal to `final_ram`.

use qmig_protocol::machine::{Destination, Instant, MigrationStatus, MultifdConfig};
use qmig_protocol::Violation;
use serde_json::Value;

use super::play_dst::Ram;
use super::synth_dst;
use super::vector::Vector;

/// `Some(result)` for a synthetic multifd case, `None` for any other vector.
pub fn check(v: &Vector) -> Option<Result<String, String>> {
    let s = v.synthetic()?;
    (s["checker"] == "destination-multifd").then(|| check_multifd(v, s))
}

fn check_multifd(v: &Vector, s: &Value) -> Result<String, String> {
    let ch = v
        .replay_channels()
        .first()
        .cloned()
        .ok_or("no replay channel")?;
    let mut files = vec![ch["feed_to_destination"]
        .as_str()
        .ok_or("no feed_to_destination")?
        .to_string()];
    for f in ch["multifd_connections_in_order"]
        .as_array()
        .into_iter()
        .flatten()
    {
        files.push(f.as_str().ok_or("multifd connection entry")?.to_string());
    }
    let channels = u8::try_from(files.len() - 1).map_err(|e| e.to_string())?;
    let (mut cfg, mut mem) = synth_dst::setup(v, false);
    cfg.multifd = Some(MultifdConfig::new(&v.profile(), channels));
    let mut dst = Destination::new(cfg).map_err(|e| format!("{e:?}"))?;
    dst.handle_channel_opened(Instant(0))
        .map_err(|e| e.to_string())?;
    let inputs: Vec<Vec<u8>> = files
        .iter()
        .map(|f| v.read(f).map_err(|e| e.to_string()))
        .collect::<Result<_, _>>()?;
    let r = drive(
        &mut dst,
        &mut mem,
        &inputs,
        ch["multifd_close_after_write"] == true,
    );
    let mut rp = Vec::new();
    dst.poll_transmit(&mut rp);
    if let Some((rule, off)) = s["expected"]["rule"]
        .as_str()
        .zip(s["expected"]["offset"].as_u64())
    {
        let want_file = s["expected"]["channel"].as_str().unwrap_or("stream.bin");
        let (i, x) = match r {
            Err(e) => e,
            Ok(_) => {
                return Err(format!(
                "invalid case accepted (status {}); expected {rule} at offset {off} of {want_file}",
                dst.status()
            ))
            }
        };
        if (x.rule.id(), x.offset, files[i].as_str()) != (rule, off, want_file) {
            return Err(format!(
                "expected {rule} at offset {off} of {want_file}, got {} at offset {} of {}",
                x.rule.id(),
                x.offset,
                files[i]
            ));
        }
        if dst.status() != MigrationStatus::Failed {
            return Err(format!("rejected, but the status is {}", dst.status()));
        }
        return Ok(format!(
            "rejected as expected: {rule} at offset {off} of {want_file} (value {:#x}), failed",
            x.value
        ));
    }
    let left = r.map_err(|(i, x)| format!("valid case rejected on {}: {x}", files[i]))?;
    if let Some(i) = left.iter().position(|n| *n > 0) {
        return Err(format!("{}: {} bytes not consumed", files[i], left[i]));
    }
    if dst.status() != MigrationStatus::Completed {
        return Err(format!("ends in {}, not completed", dst.status()));
    }
    synth_dst::same_return_path(v, &rp, "rp.bin")?;
    synth_dst::same_final_ram(v, &mem)?;
    Ok(format!(
        "valid: {} channels consumed, completed, return path and final RAM as expected",
        inputs.len()
    ))
}

/// Feeds input 0 (the main channel) and inputs 1.. (multifd connection 0..) round robin until
/// none makes progress, then (`close`) closes every connection. The bytes left per input, or
/// the first violation with the input it came from.
fn drive(
    dst: &mut Destination,
    mem: &mut Ram,
    inputs: &[Vec<u8>],
    close: bool,
) -> Result<Vec<usize>, (usize, Violation)> {
    let mut pos = vec![0usize; inputs.len()];
    let mut tick = 0u64;
    loop {
        let mut progress = false;
        for (i, input) in inputs.iter().enumerate() {
            tick += 1;
            let r = if i == 0 {
                dst.handle_stream(Instant(tick), &input[pos[0]..], mem)
            } else {
                dst.handle_multifd(Instant(tick), i - 1, &input[pos[i]..], mem)
            };
            let n = r.map_err(|x| (i, x))?;
            pos[i] += n;
            progress |= n > 0;
        }
        if !progress {
            break;
        }
    }
    if close {
        for (i, input) in inputs.iter().enumerate().skip(1) {
            tick += 1;
            if let Some(x) = dst.handle_multifd_closed(Instant(tick), i - 1, input.len() - pos[i]) {
                return Err((i, x));
            }
        }
    }
    Ok(inputs
        .iter()
        .zip(&pos)
        .map(|(input, p)| input.len() - p)
        .collect())
}
