//! The two QMP sessions of the demo and the waits on them.
//!
//! This module owns [`Session`]: both reference processes, a QMP client to each, and the
//! demo's [`Output`]. Its waits block on QMP events (`MIGRATION`, `MIGRATION_PASS`) in short
//! slices; between slices they check that both processes still run and move the progress bar
//! from the source's `query-migrate`. The overall `guard` only turns a hang into an error.

use std::time::{Duration, Instant};

use anyhow::{anyhow, bail, Context};
use qmig_host::qmp_client::{QmpClient, QmpError, ReceivedEvent};
use serde_json::{json, Value};

use super::output::Output;
use super::procs::Peer;

/// Slice of one blocking event wait, between progress updates.
const TICK: Duration = Duration::from_millis(200);

/// One side of the migration.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Side {
    /// `qmig-src`.
    Src,
    /// `qmig-dst`.
    Dst,
}

impl Side {
    /// `"source"` or `"destination"`.
    pub fn name(self) -> &'static str {
        match self {
            Side::Src => "source",
            Side::Dst => "destination",
        }
    }
}

/// Both processes, their QMP clients and the output.
pub struct Session {
    /// The demo's stdout.
    pub out: Output,
    /// QMP to `qmig-src`.
    pub src: QmpClient,
    /// QMP to `qmig-dst`.
    pub dst: QmpClient,
    /// The `qmig-src` process.
    pub src_proc: Peer,
    /// The `qmig-dst` process.
    pub dst_proc: Peer,
    /// Failure guard of every wait.
    pub guard: Duration,
    /// Phase shown on the progress bar.
    pub phase: &'static str,
}

impl Session {
    /// The client of `side`.
    pub fn qmp(&mut self, side: Side) -> &mut QmpClient {
        match side {
            Side::Src => &mut self.src,
            Side::Dst => &mut self.dst,
        }
    }

    /// Runs `command` on `side`, naming the side in the error.
    pub fn execute(&mut self, side: Side, command: &str, args: Value) -> anyhow::Result<Value> {
        self.qmp(side)
            .execute(command, args)
            .with_context(|| format!("{} `{command}`", side.name()))
    }

    /// `query-migrate` on `side`.
    pub fn query_migrate(&mut self, side: Side) -> anyhow::Result<Value> {
        self.execute(side, "query-migrate", Value::Null)
    }

    /// Turns `caps` on at `side`.
    pub fn set_capabilities(&mut self, side: Side, caps: &[&str]) -> anyhow::Result<()> {
        let list: Vec<Value> = caps
            .iter()
            .map(|c| json!({"capability": c, "state": true}))
            .collect();
        self.execute(
            side,
            "migrate-set-capabilities",
            json!({ "capabilities": list }),
        )?;
        Ok(())
    }

    /// Between two wait slices: both processes alive, progress bar moved.
    pub fn tick(&mut self) -> anyhow::Result<()> {
        if super::interrupt::interrupted() {
            bail!("interrupted");
        }
        self.src_proc.check_alive()?;
        self.dst_proc.check_alive()?;
        let info = self.query_migrate(Side::Src)?;
        let sent = info
            .pointer("/ram/transferred")
            .and_then(Value::as_u64)
            .unwrap_or(0);
        self.out.progress(sent, self.phase);
        Ok(())
    }

    /// Waits for `MIGRATION` status `status` on `side`.
    pub fn wait_status(&mut self, side: Side, status: &str) -> anyhow::Result<ReceivedEvent> {
        let start = Instant::now();
        loop {
            match self.qmp(side).wait_status(status, TICK) {
                Ok(e) => return Ok(e),
                Err(QmpError::Timeout(..)) => {
                    if start.elapsed() > self.guard {
                        bail!(
                            "{} did not reach `{status}` within {:?}",
                            side.name(),
                            self.guard
                        );
                    }
                    self.tick()?;
                }
                Err(QmpError::MigrationFailed(_)) => {
                    let why = self
                        .query_migrate(side)
                        .ok()
                        .and_then(|i| {
                            i.get("error-desc")
                                .and_then(Value::as_str)
                                .map(String::from)
                        })
                        .unwrap_or_else(|| "no error-desc".into());
                    bail!(
                        "the migration failed on the {} while waiting for `{status}`: {why}",
                        side.name()
                    );
                }
                Err(_) if super::interrupt::interrupted() => bail!("interrupted"),
                Err(e) => {
                    return Err(anyhow!(e))
                        .with_context(|| format!("{} waiting for `{status}`", side.name()))
                }
            }
        }
    }

    /// Waits for the next `MIGRATION_PASS` event of the source; its pass number. A status
    /// other than `active`/`setup` on the way (completion, failure) is an error: the demo
    /// wants precopy to still be running.
    pub fn wait_pass(&mut self) -> anyhow::Result<u64> {
        let start = Instant::now();
        loop {
            match self.src.wait_event("MIGRATION_PASS", |_| true, TICK) {
                Ok(e) => {
                    return e
                        .data
                        .get("pass")
                        .and_then(Value::as_u64)
                        .context("MIGRATION_PASS without a pass number")
                }
                Err(QmpError::Timeout(..)) => {
                    if start.elapsed() > self.guard {
                        bail!("no precopy pass within {:?}", self.guard);
                    }
                    self.tick()?;
                    let st = self.src.migration_status()?;
                    if !matches!(st.as_str(), "setup" | "active") {
                        bail!("the source left precopy early (status `{st}`)");
                    }
                }
                Err(_) if super::interrupt::interrupted() => bail!("interrupted"),
                Err(e) => return Err(anyhow!(e)).context("source waiting for a precopy pass"),
            }
        }
    }

    /// Polls `query-migrate` on `side` until `pred` accepts it (for figures no event
    /// announces, such as the destination's fault count), checking progress in between.
    pub fn poll_migrate(
        &mut self,
        side: Side,
        what: &str,
        mut pred: impl FnMut(&Value) -> bool,
    ) -> anyhow::Result<Value> {
        let start = Instant::now();
        loop {
            let info = self.query_migrate(side)?;
            if pred(&info) {
                return Ok(info);
            }
            let st = info.get("status").and_then(Value::as_str).unwrap_or("none");
            if matches!(st, "completed" | "failed" | "cancelled") {
                bail!(
                    "the {} reached `{st}` while waiting for {what}",
                    side.name()
                );
            }
            if start.elapsed() > self.guard {
                bail!("{what}: not within {:?}", self.guard);
            }
            self.tick()?;
            // No event exists for these figures: poll at a modest rate.
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// The `MIGRATION` statuses `side` has announced so far, in order.
    pub fn status_sequence(&self, side: Side) -> Vec<String> {
        let c = match side {
            Side::Src => &self.src,
            Side::Dst => &self.dst,
        };
        c.event_log()
            .iter()
            .filter(|e| e.name == "MIGRATION")
            .filter_map(|e| e.status().map(String::from))
            .collect()
    }
}
