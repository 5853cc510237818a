//! When to estimate: keep the guard's share of wall time within a budget (default 5%),
//! measured by the guard itself. The guard's time is everything spent inside it (its per-step
//! statistics and decisions, and the estimates); the rest is training. An estimate is due when
//! its expected cost still fits the budget. The per-step work is not the scheduler's to skip,
//! so where it alone exceeds the budget no estimate fits: the engine then renews an estimate
//! only when the policy's age bound requires it, over budget and counted.
use std::time::{Duration, Instant};

/// A monotonic clock; tests drive a synthetic one.
// Public with the `testing` feature (decide::Clock), private without it.
#[allow(unreachable_pub)]
pub trait Clock: Send {
    /// Time elapsed since a fixed origin; never decreases.
    fn now(&self) -> Duration;
}

/// Wall time since the guard was made.
pub(crate) struct SystemClock(Instant);

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
pub(crate) struct Scheduler {
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
    pub(crate) fn new(share: f64, clock: Box<dyn Clock>) -> Self {
        Self { share, clock, left_at: None, entered_at: None, training: 0.0, guard: 0.0, estimating: 0.0, estimate_cost: None, over_budget: 0 }
    }

    pub(crate) fn set_share(&mut self, share: f64) {
        self.share = share;
    }

    /// The training loop handed control to the guard.
    pub(crate) fn enter(&mut self) {
        let now = self.clock.now();
        if let Some(left) = self.left_at {
            self.training += (now - left).as_secs_f64();
        }
        self.entered_at = Some(now);
    }

    /// The guard handed control back.
    pub(crate) fn leave(&mut self) {
        let now = self.clock.now();
        if let Some(entered) = self.entered_at.take() {
            self.guard += (now - entered).as_secs_f64();
        }
        self.left_at = Some(now);
    }

    /// Seconds on the clock now (for timing an estimate).
    pub(crate) fn now(&self) -> f64 {
        self.clock.now().as_secs_f64()
    }

    /// An estimate took `seconds`; `over_budget` when it ran only to keep an estimate fresh.
    pub(crate) fn record_estimate(&mut self, seconds: f64, over_budget: bool) {
        self.estimate_cost = Some(seconds);
        self.estimating += seconds;
        self.over_budget += over_budget as u64;
    }

    /// Whether one more estimate keeps the guard's share of wall time within the budget.
    pub(crate) fn within_budget(&self) -> bool {
        let Some(cost) = self.estimate_cost else { return true };
        let guard = self.guard_so_far() + cost;
        guard <= self.share * (guard + self.training)
    }

    /// The estimates' share of wall time so far.
    pub(crate) fn estimate_share(&self) -> f64 {
        let guard = self.guard_so_far();
        ratio(self.estimating, guard + self.training)
    }

    /// The guard's whole share of wall time so far (estimates and per-step work): what the
    /// budget bounds.
    pub(crate) fn spent_share(&self) -> f64 {
        let guard = self.guard_so_far();
        ratio(guard, guard + self.training)
    }

    /// Guard time including the call in progress (reports are assembled inside it).
    fn guard_so_far(&self) -> f64 {
        self.guard + self.entered_at.map_or(0.0, |entered| (self.clock.now() - entered).as_secs_f64())
    }

    /// Estimates that ran over budget because the last one was about to go stale.
    pub(crate) fn over_budget_estimates(&self) -> u64 {
        self.over_budget
    }
}

fn ratio(part: f64, total: f64) -> f64 {
    if total > 0.0 {
        part / total
    } else {
        0.0
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::Arc;

    /// A clock the test moves by hand.
    #[derive(Clone, Default)]
    struct ManualClock(Arc<AtomicU64>);

    impl ManualClock {
        fn advance(&self, ms: u64) {
            self.0.fetch_add(ms * 1_000_000, Ordering::SeqCst);
        }
    }

    impl Clock for ManualClock {
        fn now(&self) -> Duration {
            Duration::from_nanos(self.0.load(Ordering::SeqCst))
        }
    }

    #[test]
    fn the_scheduler_keeps_the_guard_within_its_share() {
        let clock = ManualClock::default();
        let mut scheduler = Scheduler::new(0.05, Box::new(clock.clone()));
        let mut estimates = 0;
        for _ in 0..2000 {
            scheduler.enter();
            clock.advance(1); // the guard's per-step work: 2.5% of wall time
            if scheduler.within_budget() {
                clock.advance(80); // one estimate: 2 training steps' worth
                scheduler.record_estimate(0.080, false);
                estimates += 1;
            }
            scheduler.leave();
            clock.advance(39); // a training step
        }
        let share = scheduler.spent_share();
        assert!(share <= 0.05 + 1e-9 && share > 0.045, "the guard took {share:.4} of wall time: within and close to the 0.05 budget");
        // Estimates get what the per-step work leaves of the 5%:
        // 2000 + 80 e <= 0.05 (80000 + 80 e) => e <= 26.3.
        assert!((25..=26).contains(&estimates), "{estimates} estimates");
        assert!(scheduler.estimate_share() < share);

        // Per-step work alone over budget: after the first (no cost to predict yet), no estimate fits.
        let clock = ManualClock::default();
        let mut scheduler = Scheduler::new(0.05, Box::new(clock.clone()));
        let mut estimates = 0;
        for _ in 0..2000 {
            scheduler.enter();
            clock.advance(1);
            if scheduler.within_budget() {
                clock.advance(40);
                scheduler.record_estimate(0.040, false);
                estimates += 1;
            }
            scheduler.leave();
            clock.advance(10);
        }
        assert_eq!(estimates, 1, "per-step work over budget leaves no room for estimates");
    }
}
