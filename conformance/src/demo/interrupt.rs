//! Ctrl-C and `SIGTERM` during the demo.
//!
//! This module owns the flag a signal sets ([`install`], [`interrupted`]). The demo's waits
//! look at it between their slices and end with an error, so the normal drops run: both
//! processes killed, the temporary directory removed.

use std::sync::atomic::{AtomicBool, Ordering};

static INTERRUPTED: AtomicBool = AtomicBool::new(false);

extern "C" fn on_signal(_: libc::c_int) {
    // Only an atomic store: async-signal-safe.
    INTERRUPTED.store(true, Ordering::SeqCst);
}

/// Routes `SIGINT` and `SIGTERM` to the flag.
pub fn install() {
    let handler: extern "C" fn(libc::c_int) = on_signal;
    for sig in [libc::SIGINT, libc::SIGTERM] {
        // SAFETY: `on_signal` is async-signal-safe (one atomic store); the previous handler is
        // not needed.
        unsafe {
            libc::signal(sig, handler as libc::sighandler_t);
        }
    }
}

/// Whether `SIGINT` or `SIGTERM` arrived since [`install`].
pub fn interrupted() -> bool {
    INTERRUPTED.load(Ordering::SeqCst)
}
