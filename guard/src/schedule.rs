//! When to estimate: keep the guard's share of wall time within a budget (default 5%),
//! measured by the guard itself. The guard's time is everything spent inside it (its per-step
//! statistics and decisions, and the estimates); the rest is training. An estimate is due when
//! its expected cost still fits the budget. The per-step work is not the scheduler's to skip,
//! so where it alone exceeds the budget no estimate fits: the engine then renews an estimate
//! only when the policy's age bound requires it, over budget and counted.
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
    /// Wall time outside the guard.
    training: f64,
    /// Wall time inside the guard, estimates included.
    guard: f64,
    /// Wall time in estimates.
    estimating: f64,
    /// Cost of the last estimate, the guess for the next one.
    estimate_cost: Option<f64>,
    /// Estimates run over budget to keep an estimate from going stale.
    over_budget: u64,
}

impl Scheduler {
    pub fn new(share: f64, clock: Box<dyn Clock>) -> Self {
        Self { share, clock, left_at: None, entered_at: None, training: 0.0, guard: 0.0, estimating: 0.0, estimate_cost: None, over_budget: 0 }
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

    /// An estimate took `seconds`; `over_budget` when it ran only to keep an estimate fresh.
    pub fn record_estimate(&mut self, seconds: f64, over_budget: bool) {
        self.estimate_cost = Some(seconds);
        self.estimating += seconds;
        self.over_budget += over_budget as u64;
    }

    /// Whether one more estimate keeps the guard's share of wall time within the budget.
    pub fn within_budget(&self) -> bool {
        let Some(cost) = self.estimate_cost else { return true };
        let guard = self.guard_so_far() + cost;
        guard <= self.share * (guard + self.training)
    }

    /// The estimates' share of wall time so far.
    pub fn estimate_share(&self) -> f64 {
        let guard = self.guard_so_far();
        ratio(self.estimating, guard + self.training)
    }

    /// The guard's whole share of wall time so far (estimates and per-step work): what the
    /// budget bounds.
    pub fn spent_share(&self) -> f64 {
        let guard = self.guard_so_far();
        ratio(guard, guard + self.training)
    }

    /// Guard time including the call in progress (reports are assembled inside it).
    fn guard_so_far(&self) -> f64 {
        self.guard + self.entered_at.map_or(0.0, |entered| (self.clock.now() - entered).as_secs_f64())
    }

    /// Estimates that ran over budget because the last one was about to go stale.
    pub fn over_budget_estimates(&self) -> u64 {
        self.over_budget
    }

    pub fn guard_seconds(&self) -> f64 {
        self.guard
    }

    pub fn training_seconds(&self) -> f64 {
        self.training
    }
}

fn ratio(part: f64, total: f64) -> f64 {
    if total > 0.0 {
        part / total
    } else {
        0.0
    }
}
