//! What the demo prints while it runs.
//!
//! This module owns [`Output`]: timestamped status lines (`[  1.234s] ...`) on stdout and, on a
//! terminal, an indicatif progress bar of the bytes the source has sent against the guest RAM
//! size. Without a terminal (or with `--no-progress`) there is no bar, only the lines, so logs
//! and tests read the same text a person sees.

use std::io::{IsTerminal, Write};
use std::time::{Duration, Instant};

use indicatif::{ProgressBar, ProgressDrawTarget, ProgressStyle};

/// The demo's stdout.
pub struct Output {
    start: Instant,
    bar: Option<ProgressBar>,
}

impl Output {
    /// Lines from now on are timed from `start`; a bar over `total` bytes when stdout is a
    /// terminal and `progress` is asked for.
    pub fn new(total: u64, progress: bool) -> Output {
        let bar = (progress && std::io::stdout().is_terminal()).then(|| {
            let b = ProgressBar::with_draw_target(Some(total), ProgressDrawTarget::stdout());
            b.set_style(
                ProgressStyle::with_template(
                    "{spinner} [{elapsed_precise}] {wide_bar} {bytes}/{total_bytes} sent ({bytes_per_sec}) {msg}",
                )
                .unwrap_or_else(|_| ProgressStyle::default_bar()),
            );
            b.enable_steady_tick(Duration::from_millis(120));
            b
        });
        Output {
            start: Instant::now(),
            bar,
        }
    }

    /// When the demo started.
    pub fn start(&self) -> Instant {
        self.start
    }

    /// Prints one status line, prefixed with the time since the start.
    pub fn line(&self, text: impl AsRef<str>) {
        let t = self.start.elapsed().as_secs_f64();
        let line = format!("[{t:8.3}s] {}", text.as_ref());
        match &self.bar {
            Some(b) => b.println(line),
            None => {
                let mut out = std::io::stdout().lock();
                let _ = writeln!(out, "{line}");
                let _ = out.flush();
            }
        }
    }

    /// Prints a line without a timestamp (summaries).
    pub fn plain(&self, text: impl AsRef<str>) {
        match &self.bar {
            Some(b) => b.println(text.as_ref()),
            None => println!("{}", text.as_ref()),
        }
    }

    /// Updates the bar: bytes the source has sent and the current phase.
    pub fn progress(&self, sent: u64, phase: &str) {
        if let Some(b) = &self.bar {
            if sent > b.length().unwrap_or(0) {
                b.set_length(sent);
            }
            b.set_position(sent);
            b.set_message(phase.to_owned());
        }
    }

    /// Removes the bar (before the summary).
    pub fn finish(&mut self) {
        if let Some(b) = self.bar.take() {
            b.finish_and_clear();
        }
    }
}

impl Drop for Output {
    fn drop(&mut self) {
        self.finish();
    }
}
