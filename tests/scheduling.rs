//! Continuous estimation at a bounded cost: the budget on a synthetic clock, backpressure on
//! the worker queue, and fail-closed behaviour on a stale estimate or a failed worker.
use gradguard::data::Digits;
use gradguard::guard::{BlockReason, LayerMap, Policy, Release, decide::{Clock, Worker}};
use gradguard::models::DigitsCnn;
use gradguard::{Guard, GuardError, Report};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};
use tch::{nn, Device};

#[path = "support/digits_step.rs"]
mod digits_step;
use digits_step::digits_step;

/// A clock that moves one second every time it is read: the guard's own calls then cost it
/// time, deterministically.
struct TickingClock(AtomicU64);

impl Clock for TickingClock {
    fn now(&self) -> Duration {
        Duration::from_secs(self.0.fetch_add(1, Ordering::SeqCst))
    }
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

fn step(vs: &nn::VarStore, net: &DigitsCnn, digits: &Digits, guard: &mut Guard, k: usize) -> Result<Release, GuardError> {
    digits_step(vs, net, digits, guard, &(16 * k..16 * k + 16).collect::<Vec<_>>()).0
}

const RULE: &str = "[[rule]]\nname = \"r\"\nmetric = \"sensitivity\"\nlayers = [\"conv1\"]\nact_above = 100.0\nrelax_below = 50.0\nladder = [{ action = \"withhold\" }]\n";

#[test]
fn freshness_comes_before_the_budget() {
    let (vs, net, digits) = cnn();
    let policy = Policy::from_toml_str(&format!("version = 1\n[settings]\nestimate_every = 1\nmax_estimate_age_steps = 3\nbudget_share = 0.05\n{RULE}"), "t").unwrap();
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), policy).unwrap();
    // Every read of this clock costs a second, so no estimate ever fits the 5% budget after
    // the first: estimates then run only when the last one reaches the policy's age bound.
    guard.set_clock(Box::new(TickingClock(AtomicU64::new(0))));
    let mut estimated = vec![];
    let mut last = None;
    for k in 0..10 {
        let report = step(&vs, &net, &digits, &mut guard, k).unwrap().into_report();
        assert!(report.step_allowed());
        assert!(report.health.estimate_age_steps.unwrap() <= 3);
        if report.estimated {
            estimated.push(k);
        }
        last = Some(report);
    }
    assert_eq!(estimated, vec![0, 3, 6, 9]);
    assert_eq!(last.unwrap().health.over_budget_estimates, 3);
}

#[test]
fn a_behind_worker_never_lets_subspace_results_go_stale() {
    let (vs, net, digits) = cnn();
    let rule = "[[rule]]\nname = \"latent\"\nmetric = \"subspace_separation\"\nlayers = [\"fc*\"]\nact_above = 10.0\nrelax_below = 5.0\nladder = [{ action = \"withhold\" }]\n";
    let policy = Policy::from_toml_str(&format!("version = 1\n[settings]\nestimate_every = 1\nmax_estimate_age_steps = 2\nbudget_share = 1.0\n{rule}"), "t").unwrap();
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), policy).unwrap();
    // A job that holds the estimator's worker until the test lets it go: M2 jobs queue, then
    // drop. The guard computes M2 inline whenever the worker's last result could outlive the
    // age bound, so every release is still decided on fresh enough M2.
    let (unblock, wait) = crossbeam_channel::unbounded::<()>();
    guard.worker().unwrap().submit(Box::new(move || wait.recv().map_err(|e| e.to_string())));
    let mut dropped = 0;
    for k in 0..8 {
        let report = step(&vs, &net, &digits, &mut guard, k).unwrap().into_report();
        assert!(report.step_allowed(), "step {k}");
        dropped = report.health.estimates_dropped;
        let fc1 = report.layer("fc1").unwrap().subspace.measured().expect("M2 measured");
        assert!(k as u64 - fc1.step <= 2, "step {k}: M2 from step {}", fc1.step);
    }
    assert!(dropped > 0, "the full queue dropped work");
    drop(unblock);
}

#[test]
fn a_failed_worker_is_reported_and_the_guard_fails_closed() {
    let (vs, net, digits) = cnn();
    let policy = Policy::from_toml_str(&format!("version = 1\n[settings]\nestimate_every = 1\nbudget_share = 1.0\n{RULE}"), "t").unwrap();
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), policy).unwrap();
    guard.add_report_sink(Arc::new(|_report: &Report| panic!("a sink that breaks")));
    step(&vs, &net, &digits, &mut guard, 0).unwrap();
    let started = Instant::now();
    while guard.fan_out_worker().unwrap().failures() == 0 {
        assert!(started.elapsed() < Duration::from_secs(10), "the worker never ran the sink");
        std::thread::sleep(Duration::from_millis(5));
    }
    let report = match step(&vs, &net, &digits, &mut guard, 1) {
        Ok(Release::Blocked { reason: BlockReason::GuardFailure { what }, report, .. }) => {
            assert!(what.contains("worker failed") && what.contains("a sink that breaks"), "{what}");
            report
        }
        other => panic!("expected a refusal, got {other:?}"),
    };
    assert!(report.health.worker_failures >= 1);
    assert!(report.health.worker_error.as_deref().unwrap().contains("a sink that breaks"));
}
