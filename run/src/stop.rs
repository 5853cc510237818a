//! Ending a guarded run cleanly on SIGINT (Ctrl-C) or SIGTERM (a service stop): the loop looks
//! at the flag between steps, stops there, and the run closes its audit log (the last
//! checkpoint's counts, a `closed` record) and prints its summary. A second signal ends the
//! process at once (the handler is reset after the first).
use std::sync::atomic::{AtomicBool, Ordering};

static STOP_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_stop(_: libc::c_int) {
    STOP_SEEN.store(true, Ordering::SeqCst);
}

/// The process's stop request, once [`StopSignal::install`]ed.
#[derive(Clone, Copy, Debug)]
pub struct StopSignal(());

impl StopSignal {
    /// Installs the SIGINT and SIGTERM handlers (each fires once, then the default applies).
    #[cfg(unix)]
    pub fn install() -> std::io::Result<Self> {
        for signal in [libc::SIGINT, libc::SIGTERM] {
            // SAFETY: the handler only stores to an atomic (async-signal-safe); the struct is
            // zeroed and then filled as sigaction(2) documents.
            unsafe {
                let mut action: libc::sigaction = std::mem::zeroed();
                action.sa_sigaction = on_stop as extern "C" fn(libc::c_int) as usize;
                action.sa_flags = libc::SA_RESTART | libc::SA_RESETHAND;
                libc::sigemptyset(&mut action.sa_mask);
                if libc::sigaction(signal, &action, std::ptr::null_mut()) != 0 {
                    return Err(std::io::Error::last_os_error());
                }
            }
        }
        Ok(Self(()))
    }

    /// Whether a stop was asked for.
    pub fn requested(&self) -> bool {
        STOP_SEEN.load(Ordering::SeqCst)
    }
}
