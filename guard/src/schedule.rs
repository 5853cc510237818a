//! When to estimate: keep the guard's share of wall time within a budget (default 5%),
//! measured by the guard itself. The guard's time is everything spent inside it; the rest is
//! training. An estimate is due when its expected cost still fits the budget.
use std::time::{Duration, Instant};

/// A monotonic clock; tests drive a synthetic one.
pub trait Clock: Send {
    fn now(&self) -> Duration;
}

/// Wall time since the guard was made.
pub struct SystemClock(Instant);

impl Default for SystemClock {
    fn default() -> Self {
        Self(Instant::now())
    }
}

impl Clock for SystemClock {
    fn now(&self) -> Duration {
        self.0.elapsed()
    }
}

/// Accounts the guard's time against the training time.
pub struct Scheduler {
    share: f64,
    clock: Box<dyn Clock>,
    /// When the guard last returned control to the training loop.
    left_at: Option<Duration>,
    entered_at: Option<Duration>,
    training: f64,
    guard: f64,
    /// Cost of the last estimate, the guess for the next one.
    estimate_cost: Option<f64>,
}

impl Scheduler {
    pub fn new(share: f64, clock: Box<dyn Clock>) -> Self {
        Self { share, clock, left_at: None, entered_at: None, training: 0.0, guard: 0.0, estimate_cost: None }
    }

    pub fn set_share(&mut self, share: f64) {
        self.share = share;
    }

    /// The training loop handed control to the guard.
    pub fn enter(&mut self) {
        let now = self.clock.now();
        if let Some(left) = self.left_at {
            self.training += (now - left).as_secs_f64();
        }
        self.entered_at = Some(now);
    }

    /// The guard handed control back.
    pub fn leave(&mut self) {
        let now = self.clock.now();
        if let Some(entered) = self.entered_at.take() {
            self.guard += (now - entered).as_secs_f64();
        }
        self.left_at = Some(now);
    }

    /// Seconds on the clock now (for timing an estimate).
    pub fn now(&self) -> f64 {
        self.clock.now().as_secs_f64()
    }

    pub fn record_estimate(&mut self, seconds: f64) {
        self.estimate_cost = Some(seconds);
    }

    /// Whether one more estimate keeps guard / (guard + training) within the share.
    pub fn within_budget(&self) -> bool {
        let Some(cost) = self.estimate_cost else { return true };
        let guard = self.guard + cost;
        guard <= self.share * (guard + self.training)
    }

    /// The guard's share of wall time so far.
    pub fn spent_share(&self) -> f64 {
        let total = self.guard + self.training;
        if total > 0.0 {
            self.guard / total
        } else {
            0.0
        }
    }

    pub fn guard_seconds(&self) -> f64 {
        self.guard
    }

    pub fn training_seconds(&self) -> f64 {
        self.training
    }
}
