//! When to estimate: keep the guard's share of wall time within a budget (default 5%),
//! measured by the guard itself. The guard's time is everything spent inside it (its per-step
//! statistics and decisions, and the estimates); the rest is training. An estimate is due when
//! its expected cost still fits the budget. The per-step work is not the scheduler's to skip,
//! so where it alone exceeds the budget no estimate fits: the engine then renews an estimate
//! only when the policy's age bound requires it, over budget and counted.
use std::time::{Duration, Instant};

/// The part of the budget M2 and M6 together may take at estimates when no rule reads them; M1,
/// the metric renewed most often, keeps the rest.
pub(crate) const SECONDARY_SHARE: f64 = 1.0 / 3.0;

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
    /// Wall time in the estimates' M2 and M6 (part of `estimating`).
    secondary: f64,
    /// Cost of the last estimate short of its M2 and M6, the guess for the next one.
    estimate_cost: Option<f64>,
    /// Estimates run over budget to keep an estimate from going stale.
    over_budget: u64,
}

impl Scheduler {
    pub(crate) fn new(share: f64, clock: Box<dyn Clock>) -> Self {
        Self { share, clock, left_at: None, entered_at: None, training: 0.0, guard: 0.0, estimating: 0.0, secondary: 0.0, estimate_cost: None, over_budget: 0 }
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

    /// An estimate took `seconds`, `secondary` of them in M2 and M6; `over_budget` when it ran
    /// only to keep an estimate fresh.
    pub(crate) fn record_estimate(&mut self, seconds: f64, secondary: f64, over_budget: bool) {
        self.estimate_cost = Some((seconds - secondary).max(0.0));
        self.estimating += seconds;
        self.secondary += secondary;
        self.over_budget += over_budget as u64;
    }

    /// Whether M2 or M6, expected to take `cost` (None: never measured), fits their part of the
    /// budget, [`SECONDARY_SHARE`] of it: each costs several M1 estimates, and what they take
    /// the next M1 estimates wait for. A budget of the whole wall time (1) bounds nothing.
    pub(crate) fn secondary_fits(&self, cost: Option<f64>) -> bool {
        let Some(cost) = cost.filter(|_| self.share < 1.0) else { return true };
        let total = self.guard_so_far() + self.training + cost;
        self.secondary + cost <= SECONDARY_SHARE * self.share * total
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
                scheduler.record_estimate(0.080, 0.0, false);
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
                scheduler.record_estimate(0.040, 0.0, false);
                estimates += 1;
            }
            scheduler.leave();
            clock.advance(10);
        }
        assert_eq!(estimates, 1, "per-step work over budget leaves no room for estimates");
    }

    #[test]
    fn m2_and_m6_take_at_most_their_part_of_the_budget() {
        let clock = ManualClock::default();
        let mut scheduler = Scheduler::new(0.05, Box::new(clock.clone()));
        let (mut m1, mut secondary) = (0, 0);
        for _ in 0..20_000 {
            scheduler.enter();
            if scheduler.within_budget() {
                clock.advance(40); // M1: 4 training steps
                let mut extra = 0;
                if scheduler.secondary_fits(Some(0.300)) {
                    clock.advance(300); // M2 or M6: 30 training steps
                    extra = 300;
                    secondary += 1;
                }
                scheduler.record_estimate((40 + extra) as f64 / 1e3, extra as f64 / 1e3, false);
                m1 += 1;
            }
            scheduler.leave();
            clock.advance(10);
        }
        let total = 20_000.0 * 10.0 + m1 as f64 * 40.0 + secondary as f64 * 300.0;
        let secondary_share = secondary as f64 * 300.0 / total;
        assert!(secondary_share <= 0.05 / 3.0 + 1e-3 && secondary_share > 0.05 / 3.0 - 3e-3, "M2/M6 took {secondary_share:.4}");
        // M1 gets the rest: (0.05 - 0.0167) x 200 s / 40 ms, about 166 estimates, one every 120 steps.
        assert!(m1 > 150, "{m1} M1 estimates");
    }
}
