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
fn freshness_comes_before_the_budget() {
    let (vs, net, digits) = cnn();
    let policy = Policy::from_toml_str(&format!("version = 1\n[settings]\nestimate_every = 1\nmax_estimate_age_steps = 3\nbudget_share = 0.05\n{RULE}"), "t").unwrap();
    let mut guard = Guard::with_policy(&vs, policy).unwrap();
    // Every read of this clock costs a second, so no estimate ever fits the 5% budget after
    // the first: estimates then run only when the last one reaches the policy's age bound.
    guard.set_clock(Box::new(TickingClock(AtomicU64::new(0))));
    let mut estimated = vec![];
    for k in 0..10 {
        let report = step(&vs, &net, &digits, &mut guard, k).unwrap();
        assert!(report.step_allowed());
        assert!(report.health.estimate_age_steps.unwrap() <= 3);
        if report.estimated {
            estimated.push(k);
        }
    }
    assert_eq!(estimated, vec![0, 3, 6, 9]);
    assert_eq!(guard.last_report().unwrap().health.over_budget_estimates, 3);
}

#[test]
fn a_behind_worker_never_lets_subspace_results_go_stale() {
    let (vs, net, digits) = cnn();
    let rule = "[[rule]]\nname = \"latent\"\nmetric = \"subspace_separation\"\nlayers = [\"fc*\"]\nact_above = 10.0\nrelax_below = 5.0\nladder = [{ action = \"withhold\" }]\n";
    let policy = Policy::from_toml_str(&format!("version = 1\n[settings]\nestimate_every = 1\nmax_estimate_age_steps = 2\nbudget_share = 1.0\n{rule}"), "t").unwrap();
    let mut guard = Guard::with_policy(&vs, policy).unwrap();
    // A job that holds the estimator's worker until the test lets it go: M2 jobs queue, then
    // drop. The guard computes M2 inline whenever the worker's last result could outlive the
    // age bound, so every release is still decided on fresh enough M2.
    let (unblock, wait) = crossbeam_channel::unbounded::<()>();
    guard.worker().unwrap().submit(Box::new(move || wait.recv().map_err(|e| e.to_string())));
    for k in 0..8 {
        let report = step(&vs, &net, &digits, &mut guard, k).unwrap();
        assert!(report.step_allowed(), "step {k}");
        let fc1 = report.layer("fc1").unwrap().subspace.measured().expect("M2 measured");
        assert!(k as u64 - fc1.step <= 2, "step {k}: M2 from step {}", fc1.step);
    }
    assert!(guard.last_report().unwrap().health.estimates_dropped > 0, "the full queue dropped work");
    drop(unblock);
}

#[test]
fn subspace_results_older_than_the_bound_fail_closed() {
    use gradguard::guard::latent_table::LatentTable;
    use gradguard::guard::release::{Measurements, Protection, ReleaseOutcome};
    let rule = "[[rule]]\nname = \"latent\"\nmetric = \"subspace_separation\"\nlayers = [\"fc*\"]\nact_above = 10.0\nrelax_below = 5.0\nladder = [{ action = \"withhold\" }]\n";
    let policy = Policy::from_toml_str(&format!("version = 1\n{rule}"), "t").unwrap();
    let layers: Vec<String> = ["conv1", "fc1", "fc2"].map(String::from).to_vec();
    let mut protection = Protection::new(policy, layers).unwrap();
    let old = LatentTable::unavailable(0, 3, "never reached: the age check comes first".into());
    let m = Measurements { jvps: None, latent: Some(&old), step: 10, max_age_steps: 4, seeds: &[0, 0, 0], params: &[1, 1, 1] };
    let decision = protection.decide(10, &m).unwrap();
    assert!(matches!(decision.outcome, ReleaseOutcome::Blocked { .. }));
    assert!(decision.layers.iter().all(|l| !l.released));
    let reason = decision.records.iter().find_map(|r| r.reason.clone()).unwrap();
    assert!(reason.contains("stale: 10 steps old, the policy allows 4"), "{reason}");
}

#[test]
fn a_failed_worker_is_reported_and_the_guard_fails_closed() {
    let (vs, net, digits) = cnn();
    let policy = Policy::from_toml_str(&format!("version = 1\n[settings]\nestimate_every = 1\nbudget_share = 1.0\n{RULE}"), "t").unwrap();
    let mut guard = Guard::with_policy(&vs, policy).unwrap();
    guard.add_report_sink(Arc::new(|_report: &Report| panic!("a sink that breaks")));
    step(&vs, &net, &digits, &mut guard, 0).unwrap();
    let started = Instant::now();
    while guard.fan_out_worker().unwrap().failures() == 0 {
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
