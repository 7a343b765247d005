//! CPU time accounting from `/proc`: a process's (`/proc/PID/stat`) or the calling thread's
//! (`/proc/thread-self/stat`) user + system time.

use std::fs;

/// Linux reports `utime`/`stime` in `USER_HZ` ticks, 100 per second on every architecture
/// the kernel ABI fixes it for (x86 included).
const TICKS_PER_SECOND: f64 = 100.0;

/// `utime + stime` in seconds from the text of a `stat` file, or `None` if malformed.
///
/// The command name (field 2) is parenthesised and may contain spaces or parentheses, so the
/// fields are counted after the last `)`: `utime` and `stime` are fields 14 and 15.
pub fn parse_stat(text: &str) -> Option<f64> {
    let rest = &text[text.rfind(')')? + 1..];
    let mut f = rest.split_ascii_whitespace();
    // After the name, the first field is field 3 (state); utime is field 14.
    let utime: u64 = f.nth(11)?.parse().ok()?;
    let stime: u64 = f.next()?.parse().ok()?;
    Some((utime + stime) as f64 / TICKS_PER_SECOND)
}

/// CPU seconds (user + system) used so far by process `pid`, all its threads included.
pub fn process_seconds(pid: u32) -> Option<f64> {
    parse_stat(&fs::read_to_string(format!("/proc/{pid}/stat")).ok()?)
}

/// CPU seconds (user + system) used so far by the calling thread.
pub fn thread_seconds() -> f64 {
    fs::read_to_string("/proc/thread-self/stat")
        .ok()
        .and_then(|t| parse_stat(&t))
        .unwrap_or(0.0)
}

/// The pid of the process whose command line contains `needle` (e.g. a private socket path),
/// found by scanning `/proc`.
pub fn find_pid_by_cmdline(needle: &str) -> Option<u32> {
    fs::read_dir("/proc").ok()?.flatten().find_map(|e| {
        let pid: u32 = e.file_name().to_str()?.parse().ok()?;
        let cmd = fs::read(e.path().join("cmdline")).ok()?;
        String::from_utf8_lossy(&cmd)
            .contains(needle)
            .then_some(pid)
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn stat_fields_after_a_tricky_name() {
        let s = "1234 (a) b (c)) S 1 2 3 4 5 6 7 8 9 10 250 50 0 0 20 0 1 0";
        assert_eq!(parse_stat(s), Some(3.0));
        assert_eq!(parse_stat("garbage"), None);
    }

    #[test]
    fn own_process_and_thread_are_readable() {
        assert!(process_seconds(std::process::id()).is_some());
        assert!(thread_seconds() >= 0.0);
    }
}
