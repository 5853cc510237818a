//! M5 (METRICS.md): dFIL and the reconstruction bound against an exact computation, their
//! additivity over layers and releases, +Inf without noise, and the run ledger's cap.
//!
//! The exact side differentiates the *clipped* release itself (autograd through the clip, in
//! f64) one parameter coordinate at a time, which gives J_R exactly; the guard's side is
//! `JvpSamples::release_fisher` fed with the raw gradient's exact basis JVPs (scaled by
//! sqrt(nD), so that their mean square is ||J||_F^2 as a probe's is in expectation), through
//! its own linearisation of the clip.
mod common;
use gradguard_defenses::Defence;
use gradguard_guard::{AuditLog, Batch, BlockReason, Guard, LayerMap, Policy, Release, decide::Outcome, measure::{reconstruction_bound_bits, release_dfil, JvpSamples, LayerFisher, LayerJvps}, report::{JvpMethod, Representation, NO_NOISE_NO_BOUND}};
use tch::{nn, Device, Kind, Tensor};

struct Case {
    vs: nn::VarStore,
    mlp: common::Mlp,
    x: Tensor,
    y: Tensor,
}

fn case() -> Case {
    tch::manual_seed(11);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[4, 5, 3]);
    vs.double();
    let x = common::gaussian(3, 4, 12, Kind::Double);
    let y = Tensor::from_slice(&[0i64, 2, 1]);
    Case { vs, mlp, x, y }
}

fn values(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.reshape([-1]).to_kind(Kind::Double)).unwrap()
}

/// Layer l's gradient (flat) as a differentiable function of x, clipped to `clip` if given.
fn release(case: &Case, x: &Tensor, l: usize, clip: Option<f64>) -> Tensor {
    let layers = LayerMap::from_var_store(&case.vs).unwrap();
    let (params, owner) = layers.flat_params();
    let mine: Vec<Tensor> = params.iter().zip(&owner).filter(|(_, &o)| o == l).map(|(p, _)| p.shallow_clone()).collect();
    let loss = case.mlp.loss(x, &case.y).unwrap();
    let grads = Tensor::run_backward(&[&loss], &mine, true, true);
    let g = Tensor::cat(&grads.iter().map(|g| g.reshape([-1])).collect::<Vec<_>>(), 0);
    match clip {
        None => g,
        Some(c) => {
            let scale = (g.norm().reciprocal() * c).clamp_max(1.0);
            &g * scale
        }
    }
}

/// The exact Jacobian of layer l's (clipped) release with respect to all nD inputs: P_l rows.
fn jacobian(case: &Case, l: usize, clip: Option<f64>) -> Vec<Vec<f64>> {
    let x = case.x.detach().set_requires_grad(true);
    let r = release(case, &x, l, clip);
    (0..r.numel() as i64).map(|q| values(&Tensor::run_backward(&[&r.get(q)], &[&x], true, false)[0])).collect()
}

fn norm_sq(rows: &[Vec<f64>]) -> f64 {
    rows.iter().flatten().map(|v| v * v).sum()
}

/// The guard's kept JVPs made exact: one "probe" per input coordinate j, sqrt(nD) J e_j.
fn exact_samples(case: &Case) -> JvpSamples {
    let (n, d) = (case.x.size()[0] as usize, case.x.size()[1] as usize);
    let scale = ((n * d) as f64).sqrt();
    let layers = (0..2)
        .map(|l| {
            let j = jacobian(case, l, None);
            let grad = release(case, &case.x, l, None).detach();
            let jvps = (0..n * d).map(|c| Tensor::from_slice(&j.iter().map(|row| row[c] * scale).collect::<Vec<f64>>())).collect();
            Some(LayerJvps { grad, jvps })
        })
        .collect();
    let xs = values(&case.x);
    let mean: Vec<f64> = (0..d).map(|k| (0..n).map(|i| xs[i * d + k]).sum::<f64>() / n as f64).collect();
    let variance = (0..n).flat_map(|i| (0..d).map(move |k| (i, k))).map(|(i, k)| (xs[i * d + k] - mean[k]).powi(2)).sum::<f64>() / (n * d) as f64;
    JvpSamples {
        n,
        probes: n * d,
        probe_samples: n,
        method: JvpMethod::DoubleBackward,
        graph_cut: vec![false; 2],
        layers,
        seed: 0,
        step: 0,
        representation: Representation::Input,
        input_dims: d,
        batch_variance: variance,
    }
}

fn bounded(f: Option<LayerFisher>) -> (f64, f64) {
    match f {
        Some(f @ LayerFisher::Bounded { .. }) => f.dfil().unwrap(),
        other => panic!("expected a bounded layer, got {other:?}"),
    }
}

#[test]
fn dfil_and_the_bound_match_the_exact_jacobian_of_the_clipped_release() {
    let case = case();
    let samples = exact_samples(&case);
    let (n, d) = (samples.n as f64, samples.input_dims as f64);
    let g0 = values(&release(&case, &case.x, 0, None)).iter().map(|v| v * v).sum::<f64>().sqrt();
    // The clip is active (C below ||G||): its Jacobian is part of what is checked.
    let clip = 0.4 * g0;
    let multiplier = 0.7;
    let sigma = clip * multiplier;
    let noise = [Defence::Noise { clip_norm: clip, multiplier }];

    // Noise on layer 0 only.
    let f0 = samples.release_fisher(0, &noise, 3).unwrap();
    let exact = norm_sq(&jacobian(&case, 0, Some(clip))) / (n * sigma * sigma * d);
    let (got, _) = bounded(f0.clone());
    assert!(((got - exact) / exact).abs() < 1e-6, "dFIL {got} vs exact {exact}");
    let v = samples.batch_variance;
    let bits = reconstruction_bound_bits(v, got);
    let exact_bits = 0.5 * (1.0 + v * exact).log2();
    assert!((bits - exact_bits).abs() < 1e-6 * exact_bits.max(1e-12), "bound {bits} vs exact {exact_bits}");
    // Layer 1 released as computed: no bound, and none for the release.
    let f1 = samples.release_fisher(1, &[], 3).unwrap().unwrap();
    assert_eq!(f1, LayerFisher::Unbounded);
    assert_eq!(release_dfil([f0.as_ref().unwrap(), &f1]), None);

    // Noise on both layers: the release's dFIL is the sum of the layers' exact ones.
    let g1 = values(&release(&case, &case.x, 1, None)).iter().map(|v| v * v).sum::<f64>().sqrt();
    let clip1 = 2.0 * g1; // inactive clip: J_R = J
    let f1 = samples.release_fisher(1, &[Defence::Noise { clip_norm: clip1, multiplier: 0.3 }], 3).unwrap().unwrap();
    let exact1 = norm_sq(&jacobian(&case, 1, None)) / (n * (0.3 * clip1).powi(2) * d);
    let (both, _) = release_dfil([f0.as_ref().unwrap(), &f1]).unwrap();
    assert!(((both - (exact + exact1)) / (exact + exact1)).abs() < 1e-6, "release dFIL {both} vs {}", exact + exact1);
}

fn scratch() -> std::path::PathBuf {
    let dir = std::path::PathBuf::from(env!("CARGO_TARGET_TMPDIR")).join(format!("m5-{}-{:?}", std::process::id(), std::thread::current().id()));
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn noise_policy(extra_settings: &str, rule_layers: &str) -> String {
    format!(
        "version = 2\n[settings]\nestimate_every = 1\nbudget_share = 1.0\nbackground_estimates = false\nprobes = 16\n{extra_settings}\n\
         [[rule]]\nname = \"bits\"\nmetric = \"reconstruction_bound_bits\"\nlayers = [{rule_layers}]\nact_above = 0.05\nrelax_below = 0.01\n\
         ladder = [{{ action = \"noise\", clip_norm = 0.5, target = \"threshold\" }}]\n"
    )
}

/// Runs `steps` guarded releases of the MLP under `policy`, with an audit log.
fn run(policy: &str, steps: usize, log: &std::path::Path) -> Vec<Release> {
    run_with_ids(policy, steps, log, |_| None)
}

/// The same, with the sample ids `ids(step)` on each batch.
fn run_with_ids(policy: &str, steps: usize, log: &std::path::Path, ids: impl Fn(usize) -> Option<Tensor>) -> Vec<Release> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[10, 12, 3]);
    let x = common::gaussian(20, 10, 1, Kind::Float);
    let y = Tensor::from_slice(&(0..20).map(|i| i % 3).collect::<Vec<i64>>());
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), Policy::from_toml_str(policy, "test").unwrap()).unwrap();
    let _ = std::fs::remove_file(log);
    guard.set_audit_log(AuditLog::open(log).unwrap()).unwrap();
    let loss_fn = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
    (0..steps)
        .map(|step| {
            for p in vs.trainable_variables() {
                let mut g = p.grad();
                if g.defined() {
                    let _ = g.zero_();
                }
            }
            mlp.loss(&x, &y).unwrap().backward();
            let ids = ids(step);
            let batch = Batch::new(&x, &y);
            let batch = match &ids {
                Some(ids) => batch.with_sample_ids(ids),
                None => batch,
            };
            guard.after_backward(&batch, &loss_fn).unwrap()
        })
        .collect()
}

#[test]
fn the_ledger_adds_releases_and_a_release_without_noise_has_no_bound() {
    let dir = scratch();
    let releases = run(&noise_policy("prior_variance = 1.0", "\"*\""), 2, &dir.join("a.jsonl"));
    let dfil = |r: &Release| r.report().release_reconstruction_bound.measured().unwrap().dfil.unwrap();
    let ledger = releases[1].report().ledger.clone().unwrap();
    assert_eq!(ledger.releases, 2);
    let sum = dfil(&releases[0]) + dfil(&releases[1]);
    assert!((ledger.release_dfil.unwrap() - sum).abs() <= 1e-12 * sum, "{ledger:?} vs {sum}");
    assert!((ledger.release_bound_bits.unwrap() - reconstruction_bound_bits(1.0, sum)).abs() < 1e-12);
    // Each layer was calibrated to 0.05 bits: the release of 2 layers carries about 2x the dFIL.
    for l in &releases[0].report().layers {
        let b = l.reconstruction_bound.measured().unwrap().reconstruction_bound_bits.unwrap();
        assert!(b <= 0.05 && b > 0.0499, "{}: {b}", l.name);
    }
    let json = releases[0].report().to_json();
    assert!(json.contains("\"release_reconstruction_bound_bits\"") && json.contains("\"unbiased_mse_floor\""), "{json}");

    // fc0 clipped, then withheld (the clip cannot bring S_l to 0); fc1 released as computed:
    // +Inf, null with the reason, and the ledger is unbounded.
    let clip = "version = 2\n[settings]\nestimate_every = 1\nbudget_share = 1.0\nbackground_estimates = false\non_violation = \"withhold\"\n\
                [[rule]]\nname = \"s\"\nmetric = \"sensitivity\"\nlayers = [\"fc0\"]\nact_above = 0.0\nrelax_below = 0.0\nladder = [{ action = \"clip\", max_norm = 0.01 }]\n";
    let releases = run(clip, 1, &dir.join("b.jsonl"));
    let report = releases[0].report();
    assert!(matches!(releases[0], Release::Released { .. }));
    assert!(report.layer("fc0").unwrap().reconstruction_bound.measured().is_none());
    let b = report.layer("fc1").unwrap().reconstruction_bound.measured().unwrap();
    assert_eq!((b.reconstruction_bound_bits, b.unbounded_reason.as_deref()), (None, Some(NO_NOISE_NO_BOUND)));
    assert_eq!(report.release_reconstruction_bound_bits, None, "{}", report.to_json());
    assert!(report.to_json().contains("\"reconstruction_bound_bits\": null"));
    assert_eq!(report.ledger.as_ref().unwrap().release_bound_bits, None);
    assert!(report.table().contains("+Inf"), "{}", report.table());
}

#[test]
fn a_threshold_no_finite_noise_meets_blocks_the_release() {
    // 2^{2b} - 1 is 0 in f64 at b = 1e-20: no finite sigma brings the bound there, and the guard
    // fails closed (the calibration used to resolve to an infinite multiplier, an invalid
    // defence, and the release failed with an error).
    let dir = scratch();
    let policy = noise_policy("prior_variance = 1.0", "\"*\"").replace("act_above = 0.05\nrelax_below = 0.01", "act_above = 1e-20\nrelax_below = 0.0");
    let releases = run(&policy, 1, &dir.join("tiny.jsonl"));
    match releases[0].block_reason() {
        Some(BlockReason::GuardFailure { what }) => assert!(what.contains("cannot calibrate"), "{what}"),
        other => panic!("blocked for the calibration: {other:?}"),
    }
}

#[test]
fn a_cap_on_the_ledger_blocks_the_release_that_would_cross_it() {
    let dir = scratch();
    let free = run(&noise_policy("prior_variance = 1.0", "\"*\""), 3, &dir.join("free.jsonl"));
    let after = |k: usize| free[k].report().ledger.as_ref().unwrap().release_bound_bits.unwrap();
    let cap = 0.5 * (after(1) + after(2));
    let log = dir.join("capped.jsonl");
    let capped = run(&noise_policy(&format!("prior_variance = 1.0\nledger_cap_bits = {cap}"), "\"*\""), 3, &log);
    assert!(matches!(capped[0], Release::Released { .. }) && matches!(capped[1], Release::Released { .. }));
    match &capped[2] {
        Release::Blocked { reason: BlockReason::LedgerCap { bits, cap: c, .. }, .. } => {
            assert!((bits - after(2)).abs() < 1e-9 && *c == cap, "{bits} vs {}", after(2));
        }
        other => panic!("the third release crosses the cap: {other:?}"),
    }
    let ledger = capped[2].report().ledger.clone().unwrap();
    assert_eq!((ledger.releases, ledger.capped), (2, 1));
    assert!(ledger.release_bound_bits.unwrap() <= cap);
    let records = AuditLog::read_all(&log).unwrap();
    let rec = records.iter().find(|r| r.rule.as_deref() == Some("ledger_cap_bits")).expect("a decision record for the cap");
    assert_eq!((rec.step, rec.outcome, rec.threshold), (2, Outcome::Blocked, Some(cap)));
}

#[test]
fn with_on_violation_withhold_the_cap_withholds_layers_instead_of_blocking() {
    let dir = scratch();
    let free = run(&noise_policy("prior_variance = 1.0", "\"*\""), 2, &dir.join("free-w.jsonl"));
    let first = free[0].report().ledger.clone().unwrap();
    // Each release carries d per layer (calibrated), 2d in all: two releases take the whole
    // release to 4d. A cap at 3.5d lets the second release out only without one of its layers.
    let cap = reconstruction_bound_bits(1.0, 1.75 * first.release_dfil.unwrap());
    let two = free[1].report().ledger.as_ref().unwrap().release_bound_bits.unwrap();
    assert!(first.release_bound_bits.unwrap() < cap && cap < two, "the fixture: {cap} vs {two}");
    let log = dir.join("withheld.jsonl");
    let capped = run(&noise_policy(&format!("prior_variance = 1.0\nledger_cap_bits = {cap}\non_violation = \"withhold\""), "\"*\""), 2, &log);
    assert!(capped[1].is_released(), "{:?}", capped[1].block_reason());
    let manifest = capped[1].manifest().unwrap();
    assert_eq!(manifest.layers.iter().filter(|l| !l.released).count(), 1, "one layer withheld: {manifest:?}");
    let bound = manifest.release_reconstruction_bound_bits.unwrap();
    assert!(bound < free[1].manifest().unwrap().release_reconstruction_bound_bits.unwrap(), "the manifest's bound leaves the withheld layer out");
    let ledger = capped[1].report().ledger.clone().unwrap();
    assert!(ledger.release_bound_bits.unwrap() <= cap && ledger.layer_dfil.iter().all(|l| l.bound_bits.unwrap() <= cap), "{ledger:?}");
    assert!(ledger.capped >= 1);
    let records = AuditLog::read_all(&log).unwrap();
    assert!(records.iter().any(|r| r.rule.as_deref() == Some("ledger_cap_bits") && r.outcome == Outcome::Withheld && r.step == 1));
}

#[test]
fn the_ledger_counts_the_average_sample_by_sampling_rate_and_the_worst_by_ids() {
    let dir = scratch();
    let policy = |extra: &str| noise_policy(&format!("prior_variance = 1.0\n{extra}"), "\"*\"");
    let every = run(&policy(""), 2, &dir.join("every.jsonl"));
    let total = every[1].report().ledger.as_ref().unwrap().release_dfil.unwrap();
    assert_eq!(every[1].report().ledger.as_ref().unwrap().accounting, "every_release");
    // 20 samples of a declared 80: each release counts a quarter for the average sample.
    let rate = run(&policy("dataset_size = 80"), 2, &dir.join("rate.jsonl"));
    let ledger = rate[1].report().ledger.clone().unwrap();
    assert_eq!((ledger.accounting.as_str(), ledger.dataset_size), ("sampling_rate", Some(80)));
    assert!((ledger.release_dfil.unwrap() - 0.25 * total).abs() < 1e-12 * total, "{ledger:?} vs {total}");
    // Ids: the two releases carry disjoint samples, so no sample has more than one release's worth.
    let ids = |step: usize| Some(Tensor::from_slice(&(0..20).map(|i| (step * 20 + i) as i64).collect::<Vec<_>>()));
    let by_id = run_with_ids(&policy(""), 2, &dir.join("ids.jsonl"), ids);
    let ledger = by_id[1].report().ledger.clone().unwrap();
    let dfil = |r: &Release| r.report().release_reconstruction_bound.measured().unwrap().dfil.unwrap();
    assert_eq!(ledger.accounting, "per_sample_ids");
    let worst = dfil(&by_id[0]).max(dfil(&by_id[1]));
    assert!((ledger.release_dfil.unwrap() - worst).abs() < 1e-12 * worst, "{ledger:?} vs {worst}");
    // The same ids twice: the worst sample was in both.
    let same = run_with_ids(&policy(""), 2, &dir.join("same.jsonl"), |_| Some(Tensor::from_slice(&(0..20i64).collect::<Vec<_>>())));
    let ledger = same[1].report().ledger.clone().unwrap();
    assert!((ledger.release_dfil.unwrap() - (dfil(&same[0]) + dfil(&same[1]))).abs() < 1e-12);
}
