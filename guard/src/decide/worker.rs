//! The estimator's worker thread: what does not need the autograd graph (the QR/SVD of M2,
//! report fan-out) runs here, fed by a bounded queue. The training thread never waits on it:
//! when the queue is full the job is dropped and counted. A job that errors or panics is
//! caught, counted and remembered, and the guard then fails closed.
use crossbeam_channel::{bounded, Sender, TrySendError};
use parking_lot::Mutex;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::thread::JoinHandle;

/// A unit of work: it owns deep copies of what it reads (never a parameter the optimizer
/// updates in place) and reports an error as text.
pub(crate) type Job = Box<dyn FnOnce() -> Result<(), String> + Send>;

#[derive(Default)]
struct Health {
    dropped: AtomicU64,
    failures: AtomicU64,
    last_error: Mutex<Option<String>>,
}

/// A bounded queue and one thread that runs its jobs in order.
pub struct Worker {
    sender: Option<Sender<Job>>,
    handle: Option<JoinHandle<()>>,
    health: Arc<Health>,
}

impl Worker {
    /// `capacity` jobs may wait; more are dropped.
    pub fn spawn(capacity: usize) -> std::io::Result<Self> {
        let (sender, receiver) = bounded::<Job>(capacity.max(1));
        let health = Arc::new(Health::default());
        let h = health.clone();
        let handle = std::thread::Builder::new().name("gradguard-estimator".into()).spawn(move || {
            for job in receiver {
                let outcome = catch_unwind(AssertUnwindSafe(job));
                let error = match outcome {
                    Ok(Ok(())) => None,
                    Ok(Err(e)) => Some(e),
                    Err(panic) => Some(format!(
                        "the worker panicked: {}",
                        panic.downcast_ref::<&str>().map(|s| s.to_string()).or_else(|| panic.downcast_ref::<String>().cloned()).unwrap_or_else(|| "(no message)".into())
                    )),
                };
                if let Some(e) = error {
                    h.failures.fetch_add(1, Ordering::Relaxed);
                    *h.last_error.lock() = Some(e);
                }
            }
        })?;
        Ok(Self { sender: Some(sender), handle: Some(handle), health })
    }

    /// Queues a job without blocking; false (and counted as dropped) when the queue is full.
    pub fn submit(&self, job: Job) -> bool {
        match self.sender.as_ref().map(|s| s.try_send(job)) {
            Some(Ok(())) => true,
            Some(Err(TrySendError::Full(_))) | Some(Err(TrySendError::Disconnected(_))) | None => {
                self.health.dropped.fetch_add(1, Ordering::Relaxed);
                false
            }
        }
    }

    /// Jobs dropped because the worker was behind.
    pub fn dropped(&self) -> u64 {
        self.health.dropped.load(Ordering::Relaxed)
    }

    /// Jobs that returned an error or panicked.
    pub fn failures(&self) -> u64 {
        self.health.failures.load(Ordering::Relaxed)
    }

    /// The last failure, if any: while set, the guard cannot vouch for what the worker computes.
    pub fn last_error(&self) -> Option<String> {
        self.health.last_error.lock().clone()
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.sender.take();
        if let Some(h) = self.handle.take() {
            let _ = h.join();
        }
    }
}
