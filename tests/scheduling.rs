//! Continuous estimation at a bounded cost: the budget on a synthetic clock, backpressure on
//! the worker queue, and fail-closed behaviour on a stale estimate or a failed worker.
use gradguard::data::Digits;
use gradguard::guard::schedule::{Clock, Scheduler};
use gradguard::guard::worker::Worker;
use gradguard::guard::Policy;
use gradguard::models::DigitsCnn;
use gradguard::{Batch, Guard, GuardError, Report};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{nn, Device, Tensor};

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

/// A clock that moves one second every time it is read: the guard's own calls then cost it
/// time, deterministically.
struct TickingClock(AtomicU64);

impl Clock for TickingClock {
    fn now(&self) -> Duration {
        Duration::from_secs(self.0.fetch_add(1, Ordering::SeqCst))
    }
}

#[test]
fn the_scheduler_keeps_the_guard_within_its_share() {
    let clock = ManualClock::default();
    let mut scheduler = Scheduler::new(0.05, Box::new(clock.clone()));
    let mut estimates = 0;
    for _ in 0..2000 {
        scheduler.enter();
        clock.advance(1); // the guard's per-step bookkeeping
        if scheduler.within_budget() {
            clock.advance(40); // one estimate: 4 training steps' worth
            scheduler.record_estimate(0.040);
            estimates += 1;
        }
        scheduler.leave();
        clock.advance(10); // a training step
    }
    // Bookkeeping alone is 1 ms per 11 ms = 9% > 5%: no estimate fits after the first (the
    // first is always taken, there being no cost to predict), and the share stays at the
    // bookkeeping's, which the budget cannot lower.
    assert_eq!(estimates, 1, "bookkeeping over budget leaves no room for estimates");
    assert!((scheduler.spent_share() - 1.0 / 11.0).abs() < 0.005);

    let clock = ManualClock::default();
    let mut scheduler = Scheduler::new(0.05, Box::new(clock.clone()));
    let mut estimates = 0;
    for _ in 0..2000 {
        scheduler.enter();
        if scheduler.within_budget() {
            clock.advance(40);
            scheduler.record_estimate(0.040);
            estimates += 1;
        }
        scheduler.leave();
        clock.advance(10);
    }
    let share = scheduler.spent_share();
    assert!(share <= 0.05 + 1e-9 && share > 0.045, "spent {share:.4}: within and close to the 0.05 budget");
    // guard = 40 ms * e <= 0.05 * (20 s + 40 ms * e): e <= 26.3.
    assert!((25..=27).contains(&estimates), "{estimates} estimates");
}

#[test]
fn a_full_queue_drops_and_counts_without_blocking() {
    let worker = Worker::spawn(1).unwrap();
    let (release, wait) = crossbeam_channel::bounded::<()>(0);
    assert!(worker.submit(Box::new(move || {
        wait.recv().map_err(|e| e.to_string())
    })));
    // Give the worker time to take the blocking job, so exactly one more fits the queue.
    std::thread::sleep(Duration::from_millis(100));
    assert!(worker.submit(Box::new(|| Ok(()))), "one job waits in the queue");
    let started = Instant::now();
    for _ in 0..100 {
        assert!(!worker.submit(Box::new(|| Ok(()))));
    }
    assert!(started.elapsed() < Duration::from_millis(100), "submitting to a full queue never waits");
    assert_eq!(worker.dropped(), 100);
    release.send(()).unwrap();
    drop(worker);
}

fn cnn() -> (nn::VarStore, DigitsCnn, Digits) {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = DigitsCnn::new(&vs.root());
    (vs, net, Digits::embedded().unwrap())
}

fn step(vs: &nn::VarStore, net: &DigitsCnn, digits: &Digits, guard: &mut Guard, k: usize) -> Result<Report, GuardError> {
    let idx: Vec<usize> = (16 * k..16 * k + 16).collect();
    let (x, y, a) = digits.batch(&idx, Device::Cpu).unwrap();
    for p in vs.trainable_variables() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    net.f_loss(&x, &y).unwrap().backward();
    let loss = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
    guard.after_backward(&Batch::new(&x, &y).with_attribute(&a), &loss)
}

const RULE: &str = "[[rule]]\nname = \"r\"\nmetric = \"sensitivity\"\nlayers = [\"conv1\"]\nact_above = 100.0\nrelax_below = 50.0\nladder = [{ action = \"withhold\" }]\n";

#[test]
fn an_estimate_the_budget_makes_stale_fails_closed() {
    let (vs, net, digits) = cnn();
    let policy = Policy::from_toml_str(&format!("version = 1\n[settings]\nestimate_every = 1\nmax_estimate_age_steps = 3\nbudget_share = 0.05\n{RULE}"), "t").unwrap();
    let mut guard = Guard::with_policy(&vs, policy).unwrap();
    // Every read of this clock costs the guard a second: its share is far above 5%, so after
    // the first estimate no other one fits the budget.
    guard.set_clock(Box::new(TickingClock(AtomicU64::new(0))));
    assert!(step(&vs, &net, &digits, &mut guard, 0).unwrap().estimated);
    for k in 1..=3 {
        let report = step(&vs, &net, &digits, &mut guard, k).unwrap();
        assert!(!report.estimated && report.step_allowed(), "step {k}: levels reused, age {k}");
    }
    match step(&vs, &net, &digits, &mut guard, 4) {
        Err(GuardError::ReleaseRefused { reason, step: 4 }) => assert!(reason.contains("stale estimate: 4 steps old"), "{reason}"),
        other => panic!("expected a refusal, got {other:?}"),
    }
}

#[test]
fn a_failed_worker_is_reported_and_the_guard_fails_closed() {
    let (vs, net, digits) = cnn();
    let policy = Policy::from_toml_str(&format!("version = 1\n[settings]\nestimate_every = 1\nbudget_share = 1.0\n{RULE}"), "t").unwrap();
    let mut guard = Guard::with_policy(&vs, policy).unwrap();
    guard.add_report_sink(Arc::new(|_report: &Report| panic!("a sink that breaks")));
    step(&vs, &net, &digits, &mut guard, 0).unwrap();
    let started = Instant::now();
    while guard.worker().unwrap().failures() == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the worker never ran the sink");
        std::thread::sleep(Duration::from_millis(5));
    }
    match step(&vs, &net, &digits, &mut guard, 1) {
        Err(GuardError::ReleaseRefused { reason, .. }) => {
            assert!(reason.contains("worker failed") && reason.contains("a sink that breaks"), "{reason}")
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
    let report = guard.last_report().unwrap();
    assert!(report.health.worker_failures >= 1);
    assert!(report.health.worker_error.as_deref().unwrap().contains("a sink that breaks"));
}
