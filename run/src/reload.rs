//! Reloading a running guard's policy file on request: SIGHUP (`kill -HUP <pid>`) or a call.
//! The signal only sets a flag; the training loop looks at it between steps and reloads there,
//! so a new policy takes effect at the next release and never in the middle of one.
use gradguard_guard::{Guard, GuardError, Policy};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Set by the SIGHUP handler; an atomic store is all a signal handler may safely do.
static SIGHUP_SEEN: AtomicBool = AtomicBool::new(false);

extern "C" fn on_sighup(_: libc::c_int) {
    SIGHUP_SEEN.store(true, Ordering::SeqCst);
}

/// What a reload did.
#[derive(Debug)]
pub enum ReloadOutcome {
    /// The new policy is in force from the next release (its hash, the one it replaced).
    Loaded {
        /// sha256 (hex) of the policy now in force.
        hash: String,
        /// sha256 (hex) of the policy it replaced.
        previous: String,
    },
    /// The policy was rejected (read, parse or model check); the one in force stays.
    Rejected(GuardError),
}

impl std::fmt::Display for ReloadOutcome {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            ReloadOutcome::Loaded { hash, previous } => write!(f, "policy loaded: {} (was {}), in force from the next release", Policy::short(hash), Policy::short(previous)),
            ReloadOutcome::Rejected(e) => write!(f, "policy reload rejected: {e}"),
        }
    }
}

/// A policy file to reload into a guard when asked.
#[derive(Clone, Debug)]
pub struct PolicyReloader {
    path: PathBuf,
    requested: Arc<AtomicBool>,
    sighup: bool,
}

impl PolicyReloader {
    /// Reloads `path` when [`PolicyReloader::request`] was called.
    pub fn new(path: impl Into<PathBuf>) -> Self {
        Self { path: path.into(), requested: Arc::new(AtomicBool::new(false)), sighup: false }
    }

    /// Reloads `path` on SIGHUP too (installs the process's SIGHUP handler, which otherwise
    /// ends the process).
    #[cfg(unix)]
    pub fn on_sighup(path: impl Into<PathBuf>) -> std::io::Result<Self> {
        // SAFETY: the handler only stores to an atomic (async-signal-safe); the sigaction
        // struct is zeroed and then filled as sigaction(2) documents.
        unsafe {
            let mut action: libc::sigaction = std::mem::zeroed();
            action.sa_sigaction = on_sighup as extern "C" fn(libc::c_int) as usize;
            action.sa_flags = libc::SA_RESTART;
            libc::sigemptyset(&mut action.sa_mask);
            if libc::sigaction(libc::SIGHUP, &action, std::ptr::null_mut()) != 0 {
                return Err(std::io::Error::last_os_error());
            }
        }
        Ok(Self { sighup: true, ..Self::new(path) })
    }

    /// The policy file.
    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Asks for a reload at the next [`PolicyReloader::poll`].
    pub fn request(&self) {
        self.requested.store(true, Ordering::SeqCst);
    }

    /// Between steps: when a reload was asked for, reads the file and hands it to
    /// [`Guard::reload_policy_file`] (which logs the outcome either way).
    pub fn poll(&self, guard: &mut Guard) -> Option<ReloadOutcome> {
        let asked = self.requested.swap(false, Ordering::SeqCst) | (self.sighup && SIGHUP_SEEN.swap(false, Ordering::SeqCst));
        if !asked {
            return None;
        }
        let previous = guard.policy().hash().to_string();
        Some(match guard.reload_policy_file(&self.path) {
            Ok(()) => ReloadOutcome::Loaded { hash: guard.policy().hash().to_string(), previous },
            Err(e) => ReloadOutcome::Rejected(e),
        })
    }
}
