//! Release properties over generated models, policies and gradients, through both release
//! forms: the explicit API (`Guard::release`) and the in-place one (`Guard::after_backward`
//! after a real backward, with micro-batches held for the aggregation floor).
//!
//! - Every released layer is the manifest's actions applied to the raw gradient (for a release
//!   of held micro-batches, their sample-weighted mean) with the seed the manifest records, bit
//!   for bit; a layer with no action is released as given.
//! - A withheld layer and a blocked or held release release nothing: absent from the explicit
//!   update, zeros in `.grad()` (a withheld layer that trains locally keeps its gradient there).
//! - The manifest says what was done: its outcome is the release's, only the layers of a
//!   released outcome are released (each with its seed), a withheld layer's action is
//!   `withhold`, every released layer passed its rules' checks, and the report carries the same
//!   manifest.
//! - Nothing non-finite leaves: a gradient with NaN or Inf entries is blocked, and so is a held
//!   release whose mean overflows (entries near f32's largest value); huge (1e30) and tiny
//!   (1e-30, 1e-40) values are released as the chain makes them.
//!
//! Shapes are tiny (widths 1-6, batches 1-8, 2-4 probes) so that the cases can be many; each
//! case runs one guard over several releases (hysteresis, the ledger, estimates reused between
//! `estimate_every` steps, held micro-batches).
mod common;
use gradguard_defenses::{apply_all, Defence, GradientAccumulator};
use gradguard_guard::{Batch, BlockReason, Guard, LayerMap, Policy, Release, report::{LayerManifest, ReleaseOutcome}};
use proptest::collection::vec;
use proptest::prelude::*;
use proptest::test_runner::TestCaseError;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{nn, Device, Tensor};

/// Cases of each property: 10,000 in all.
const CASES: u32 = 5_000;

/// One rung of a generated ladder.
#[derive(Debug, Clone)]
enum Rung {
    Clip(f64),
    Noise(f64, f64),
    Sparsify(f64),
    Quantize(u32),
    Withhold,
    Aggregate(f64),
    /// A calibrated noise rung (`target = "threshold"`) with this clip_norm.
    Calibrated(f64),
}

impl Rung {
    fn toml(&self) -> String {
        match self {
            Rung::Clip(c) => format!("{{ action = \"clip\", max_norm = {c:?} }}"),
            Rung::Noise(c, m) => format!("{{ action = \"noise\", clip_norm = {c:?}, multiplier = {m:?} }}"),
            Rung::Sparsify(f) => format!("{{ action = \"sparsify\", keep_fraction = {f:?} }}"),
            Rung::Quantize(b) => format!("{{ action = \"quantize\", bits = {b} }}"),
            Rung::Withhold => "{ action = \"withhold\" }".into(),
            Rung::Aggregate(f) => format!("{{ action = \"aggregate\", factor = {f:?} }}"),
            Rung::Calibrated(c) => format!("{{ action = \"noise\", clip_norm = {c:?}, target = \"threshold\" }}"),
        }
    }
}

fn rung() -> impl Strategy<Value = Rung> {
    prop_oneof![
        3 => (1e-3f64..2.0).prop_map(Rung::Clip),
        3 => (1e-3f64..2.0, prop_oneof![Just(0.0), 0.0f64..2.0]).prop_map(|(c, m)| Rung::Noise(c, m)),
        2 => (0.05f64..=1.0).prop_map(Rung::Sparsify),
        2 => (1u32..=16).prop_map(Rung::Quantize),
        1 => Just(Rung::Withhold),
        1 => (1.5f64..4.0).prop_map(Rung::Aggregate),
    ]
}

/// A rule of the policy; `layer` None covers every layer (`fc*`), else layer `i % depth` (`i`
/// without `strict_layers`).
#[derive(Debug, Clone)]
struct RuleSpec {
    metric: &'static str,
    layer: Option<usize>,
    act_above: f64,
    /// relax_below as a share of act_above.
    relax: f64,
    ladder: Vec<Rung>,
}

fn rule() -> impl Strategy<Value = RuleSpec> {
    let measured = (
        prop::sample::select(vec!["sensitivity", "sensitivity_rms", "relative_sensitivity", "subspace_separation", "exposed_fraction", "isolated_share"]),
        prop::option::of(0usize..3),
        prop_oneof![Just(0.0), 0.0f64..0.3, 0.3f64..5.0],
        0.0f64..=1.0,
        vec(rung(), 1..4),
    )
        .prop_map(|(metric, layer, act_above, relax, ladder)| RuleSpec { metric, layer, act_above, relax, ladder });
    // M5 in bits/dim: calibrated rungs are valid only here.
    let bits = (
        prop::option::of(0usize..3),
        prop_oneof![1 => (-20.0f64..-15.0).prop_map(|e| 10f64.powf(e)), 4 => 1e-3f64..0.1, 4 => 0.1f64..2.0],
        0.0f64..=1.0,
        vec(prop_oneof![2 => (1e-3f64..2.0).prop_map(Rung::Calibrated), 1 => rung()], 1..4),
    )
        .prop_map(|(layer, act_above, relax, ladder)| RuleSpec { metric: "reconstruction_bound_bits", layer, act_above, relax, ladder });
    prop_oneof![3 => measured, 2 => bits]
}

/// A generated policy (version 2: M5 rules, calibrated rungs, the ledger's settings).
#[derive(Debug, Clone)]
struct PolicySpec {
    seed: u64,
    estimate_every: u64,
    extra_age: u64,
    withhold: bool,
    floor: usize,
    extra_ceiling: usize,
    train_locally: bool,
    probes: usize,
    rank: usize,
    subspace_every: u64,
    ledger_cap: Option<f64>,
    prior_variance: Option<f64>,
    margin_se: f64,
    dataset_size: Option<u64>,
    before_release: bool,
    /// Off: a rule's `fc{i}` may name a layer the model does not have (a warning).
    strict_layers: bool,
    central_difference: bool,
    rules: Vec<RuleSpec>,
}

fn policy() -> impl Strategy<Value = PolicySpec> {
    (
        (0u64..=i64::MAX as u64, 1u64..=3, 0u64..=3, any::<bool>(), prop_oneof![2 => Just(1usize), 1 => 2usize..=12], 0usize..=24, any::<bool>()),
        (2usize..=4, 1usize..=2, prop_oneof![Just(0u64), Just(1000)], prop::option::of(1e-3f64..10.0), prop::option::of(0.1f64..2.0)),
        (prop_oneof![Just(0.0), 0.0f64..2.0], prop::option::of(1u64..100), prop::bool::weighted(0.2), prop::bool::weighted(0.8), any::<bool>(), vec(rule(), 0..=3)),
    )
        .prop_map(|((seed, estimate_every, extra_age, withhold, floor, extra_ceiling, train_locally), (probes, rank, subspace_every, ledger_cap, prior_variance), (margin_se, dataset_size, before_release, strict_layers, central_difference, rules))| PolicySpec {
            seed,
            estimate_every,
            extra_age,
            withhold,
            floor,
            extra_ceiling,
            train_locally,
            probes,
            rank,
            subspace_every,
            ledger_cap,
            prior_variance,
            margin_se,
            dataset_size,
            before_release,
            strict_layers,
            central_difference,
            rules,
        })
}

impl PolicySpec {
    /// The policy's text for an MLP of `depth` layers (fc0, fc1, ...).
    fn text(&self, depth: usize) -> String {
        let mut text = format!(
            "version = 2\n[settings]\nseed = {}\nestimate_every = {}\nmax_estimate_age_steps = {}\nbudget_share = 1.0\nbackground_estimates = false\n\
             aggregation_floor = {}\naggregation_ceiling = {}\non_violation = \"{}\"\nwithheld_layers_train_locally = {}\nprobes = {}\n\
             calibration_margin_se = {:?}\nsubspace_every_steps = {}\nestimate_before_release = {}\nstrict_layers = {}\njvp_method = \"{}\"\n",
            self.seed,
            self.estimate_every,
            self.estimate_every + self.extra_age,
            self.floor,
            self.floor + self.extra_ceiling,
            if self.withhold { "withhold" } else { "block" },
            self.train_locally,
            self.probes,
            self.margin_se,
            self.subspace_every,
            self.before_release,
            self.strict_layers,
            if self.central_difference { "central_difference" } else { "double_backward" },
        );
        if let Some(cap) = self.ledger_cap {
            text += &format!("ledger_cap_bits = {cap:?}\n");
        }
        if let Some(v) = self.prior_variance {
            text += &format!("prior_variance = {v:?}\n");
        }
        if let Some(n) = self.dataset_size {
            text += &format!("dataset_size = {n}\n");
        }
        text += &format!("[settings.subspace]\nsamples_per_group = 4\nrank = {}\ncentre = false\n", self.rank);
        for (i, r) in self.rules.iter().enumerate() {
            let layer = r.layer.map_or("fc*".to_string(), |l| format!("fc{}", if self.strict_layers { l % depth } else { l }));
            let ladder: Vec<String> = r.ladder.iter().map(Rung::toml).collect();
            text += &format!(
                "[[rule]]\nname = \"r{i}-{}\"\nmetric = \"{}\"\nlayers = [\"{layer}\"]\nact_above = {:?}\nrelax_below = {:?}\nladder = [{}]\n",
                r.metric,
                r.metric,
                r.act_above,
                r.act_above * r.relax,
                ladder.join(", ")
            );
        }
        text
    }
}

/// An MLP: widths (inputs, hidden..., classes) and which layers have a bias.
#[derive(Debug, Clone)]
struct ModelSpec {
    widths: Vec<i64>,
    biases: Vec<bool>,
}

fn model() -> impl Strategy<Value = ModelSpec> {
    (vec(1i64..=6, 2..=4), vec(prop::bool::weighted(0.8), 3)).prop_map(|(widths, biases)| ModelSpec { widths, biases })
}

/// A value written into one entry of a gradient.
#[derive(Debug, Clone, Copy)]
enum Special {
    Nan,
    Inf,
    NegInf,
    Huge,
    NegHuge,
    /// Near f32's largest value: a held sum of it overflows.
    Max,
    NegMax,
    Tiny,
    NegTiny,
    Zero,
}

impl Special {
    fn value(self) -> f64 {
        match self {
            Special::Nan => f64::NAN,
            Special::Inf => f64::INFINITY,
            Special::NegInf => f64::NEG_INFINITY,
            Special::Huge => 1e30,
            Special::NegHuge => -1e30,
            Special::Max => 3e38,
            Special::NegMax => -3e38,
            Special::Tiny => 1e-30,
            Special::NegTiny => -1e-30,
            Special::Zero => 0.0,
        }
    }
}

/// An entry (parameter and index, taken modulo the model's) set to a special value.
#[derive(Debug, Clone)]
struct Poke {
    param: usize,
    index: usize,
    value: Special,
}

/// One release: its batch size, the gradient's scale and the entries poked.
#[derive(Debug, Clone)]
struct Round {
    n: i64,
    scale: f64,
    pokes: Vec<Poke>,
}

fn round() -> impl Strategy<Value = Round> {
    let special = prop_oneof![
        1 => Just(Special::Nan),
        1 => Just(Special::Inf),
        1 => Just(Special::NegInf),
        2 => Just(Special::Huge),
        2 => Just(Special::NegHuge),
        1 => Just(Special::Max),
        1 => Just(Special::NegMax),
        2 => Just(Special::Tiny),
        2 => Just(Special::NegTiny),
        1 => Just(Special::Zero),
    ];
    let poke = (0usize..8, 0usize..64, special).prop_map(|(param, index, value)| Poke { param, index, value });
    (1i64..=8, prop_oneof![3 => Just(1.0), 1 => Just(1e-3), 1 => Just(1e3), 1 => Just(1e-30), 1 => Just(1e30), 1 => Just(1e-40)], vec(poke, 0..=2))
        .prop_map(|(n, scale, pokes)| Round { n, scale, pokes })
}

/// Sample ids on the batches: none, fresh ids each release, or the same ids each release.
#[derive(Debug, Clone, Copy)]
enum Ids {
    None,
    Fresh,
    Same,
}

fn ids() -> impl Strategy<Value = Ids> {
    prop_oneof![Just(Ids::None), Just(Ids::Fresh), Just(Ids::Same)]
}

/// Everything a case needs besides its rounds.
#[derive(Debug, Clone)]
struct CaseSpec {
    model: ModelSpec,
    policy: PolicySpec,
    ids: Ids,
    attribute: bool,
    seed: u64,
}

fn case() -> impl Strategy<Value = CaseSpec> {
    (model(), policy(), ids(), any::<bool>(), any::<u64>()).prop_map(|(model, policy, ids, attribute, seed)| CaseSpec { model, policy, ids, attribute, seed })
}

/// f32 standard normal values of `shape` from `rng`.
fn normal(rng: &mut ChaCha8Rng, shape: &[i64]) -> Tensor {
    let values: Vec<f32> = (0..shape.iter().product::<i64>()).map(|_| StandardNormal.sample(&mut *rng)).collect();
    Tensor::from_slice(&values).reshape(shape)
}

/// A case's model, guard and data.
struct Setup {
    vs: nn::VarStore,
    mlp: common::Mlp,
    guard: Guard,
    rng: ChaCha8Rng,
    spec: CaseSpec,
}

/// One release's batch.
struct Data {
    x: Tensor,
    y: Tensor,
    a: Tensor,
    ids: Option<Tensor>,
}

impl Data {
    fn batch(&self, attribute: bool) -> Batch<'_> {
        let batch = Batch::new(&self.x, &self.y);
        let batch = if attribute { batch.with_attribute(&self.a) } else { batch };
        match &self.ids {
            Some(ids) => batch.with_sample_ids(ids),
            None => batch,
        }
    }
}

impl Setup {
    fn new(spec: &CaseSpec) -> Self {
        // Tensors of a few dozen entries: a second libtorch thread only contends for the cores.
        tch::set_num_threads(1);
        let vs = nn::VarStore::new(Device::Cpu);
        let widths = &spec.model.widths;
        let mlp = common::Mlp::with_biases(&vs.root(), widths, |i| spec.model.biases[i]);
        // The weights come from the case's seed: libtorch's initialiser draws from its global
        // generator, which the tests running in parallel share.
        let mut rng = ChaCha8Rng::seed_from_u64(spec.seed);
        let mut vars: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
        vars.sort_by(|p, q| p.0.cmp(&q.0));
        tch::no_grad(|| {
            for (_, mut t) in vars {
                t.copy_(&normal(&mut rng, &t.size()));
            }
        });
        let text = spec.policy.text(widths.len() - 1);
        let policy = Policy::from_toml_str(&text, "generated").unwrap_or_else(|e| panic!("{e}\n{text}"));
        let guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), policy).unwrap();
        Self { vs, mlp, guard, rng, spec: spec.clone() }
    }

    /// Release `r`'s batch of `n` samples.
    fn data(&mut self, r: usize, n: i64) -> Data {
        let (d, classes) = (self.spec.model.widths[0], *self.spec.model.widths.last().unwrap());
        let x = normal(&mut self.rng, &[n, d]);
        let y = Tensor::from_slice(&(0..n).map(|i| i % classes).collect::<Vec<i64>>());
        let a = Tensor::from_slice(&(0..n).map(|i| i % 2).collect::<Vec<i64>>());
        let first = match self.spec.ids {
            Ids::None => None,
            Ids::Fresh => Some(r as i64 * 8),
            Ids::Same => Some(0),
        };
        let ids = first.map(|first| Tensor::from_slice(&(first..first + n).collect::<Vec<i64>>()));
        Data { x, y, a, ids }
    }

    /// Parameter `k` (modulo the model's count) as (layer, index in the layer), for a poke.
    fn param(&self, k: usize) -> (usize, usize) {
        let all: Vec<(usize, usize)> = self.guard.layers().layers().iter().enumerate().flat_map(|(l, layer)| (0..layer.params.len()).map(move |p| (l, p))).collect();
        all[k % all.len()]
    }
}

/// Writes the round's scale and pokes into per-layer tensors (edited in place).
fn poke(setup: &Setup, round: &Round, tensors: &[Vec<Tensor>]) {
    tch::no_grad(|| {
        for layer in tensors {
            for t in layer {
                let _ = t.shallow_clone().f_mul_scalar_(round.scale).unwrap();
            }
        }
        for poke in &round.pokes {
            let (l, p) = setup.param(poke.param);
            let flat = tensors[l][p].reshape([-1]);
            let i = (poke.index as i64) % flat.size()[0];
            let _ = flat.get(i).fill_(poke.value.value());
        }
    });
}

fn finite(t: &Tensor) -> bool {
    t.isfinite().all().int64_value(&[]) != 0
}

fn zeros(t: &Tensor) -> bool {
    t.ne(0.0).any().int64_value(&[]) == 0
}

fn deep_copy(t: &Tensor) -> Tensor {
    t.detach().copy()
}

/// The layer's release as its manifest entry describes it: the actions applied, with the
/// recorded seed, to the layer's raw tensors flattened and joined in parameter order, split
/// back into the parameters' shapes (None: the chain withholds).
fn replay(layer: &LayerManifest, raw: &[Tensor]) -> Result<Option<Vec<Tensor>>, TestCaseError> {
    let seed = layer.seed.ok_or_else(|| TestCaseError::fail(format!("released layer {} records no seed", layer.name)))?;
    let joined = Tensor::cat(&raw.iter().map(|t| t.reshape([-1])).collect::<Vec<_>>(), 0);
    let Some(out) = apply_all(&layer.actions, &joined, seed).map_err(|e| TestCaseError::fail(format!("{}: {e}", layer.name)))? else { return Ok(None) };
    let mut offset = 0;
    let parts = raw
        .iter()
        .map(|t| {
            let n = t.numel() as i64;
            let part = out.narrow(0, offset, n).reshape(t.size());
            offset += n;
            part
        })
        .collect();
    Ok(Some(parts))
}

/// A released layer's tensors against the replay of its manifest entry on `raw` (and, without
/// an action, against `raw` itself).
fn check_layer(layer: &LayerManifest, got: &[Tensor], raw: &[Tensor]) -> Result<(), TestCaseError> {
    prop_assert_eq!(got.len(), raw.len(), "{}: every parameter of a released layer is released", &layer.name);
    let expected = replay(layer, raw)?.ok_or_else(|| TestCaseError::fail(format!("{} is released but its chain withholds", layer.name)))?;
    for (i, (g, e)) in got.iter().zip(&expected).enumerate() {
        prop_assert!(finite(g), "{} parameter {i} is not finite", &layer.name);
        prop_assert!(g.equal(e), "{} parameter {i} is not {:?} of the raw gradient with seed {:?}", &layer.name, &layer.actions, layer.seed);
        if layer.actions.is_empty() {
            prop_assert!(g.equal(&raw[i]), "{} parameter {i} changed without an action in the manifest", &layer.name);
        }
    }
    Ok(())
}

/// The manifest against the release's variant. `poisoned`: the gradient had NaN or Inf.
fn check_manifest(guard: &Guard, release: &Release, step: u64, poisoned: bool) -> Result<(), TestCaseError> {
    let m = release.manifest().unwrap();
    prop_assert_eq!(m.step, step);
    let json = |m: Option<&gradguard_guard::Manifest>| serde_json::to_string(&m).unwrap();
    prop_assert_eq!(json(release.report().release.as_ref()), json(Some(m)), "the report carries the manifest");
    let names = guard.layers().names();
    match release {
        Release::Released { .. } => {
            prop_assert!(!poisoned, "a non-finite gradient was released");
            prop_assert_eq!(&m.outcome, &ReleaseOutcome::Released);
            prop_assert!(m.samples >= m.aggregation_floor, "{} samples released under a floor of {}", m.samples, m.aggregation_floor);
            prop_assert_eq!(m.layers.iter().map(|l| l.name.clone()).collect::<Vec<_>>(), names);
            for layer in &m.layers {
                if !layer.released {
                    prop_assert_eq!(&layer.actions, &vec![Defence::Withhold], "withheld layer {}", &layer.name);
                    prop_assert_eq!(layer.seed, None, "withheld layer {} records a seed", &layer.name);
                    continue;
                }
                prop_assert!(layer.seed.is_some(), "released layer {} records no seed", &layer.name);
                prop_assert!(!layer.actions.contains(&Defence::Withhold), "released layer {} lists withhold", &layer.name);
                // The noise std and the bound are those of the noise among the actions.
                let stds: Vec<f64> = layer.actions.iter().filter_map(|d| match d { Defence::Noise { clip_norm, multiplier } if clip_norm * multiplier > 0.0 => Some(clip_norm * multiplier), _ => None }).collect();
                prop_assert!(layer.noise_std.is_none_or(|s| stds.contains(&s)), "{}: noise std {:?} but actions {:?}", &layer.name, layer.noise_std, &layer.actions);
                prop_assert!(layer.reconstruction_bound_bits.is_none() || !stds.is_empty(), "{}: a bound without noise", &layer.name);
                for check in &layer.checks {
                    prop_assert!(check.released.is_none_or(|v| v <= check.act_above), "{}: {:?} above {}", &layer.name, check.released, check.act_above);
                }
            }
        }
        Release::Held { .. } => {
            prop_assert!(!poisoned, "a non-finite gradient was held");
            prop_assert!(matches!(m.outcome, ReleaseOutcome::Held { .. }), "{:?}", &m.outcome);
        }
        Release::Blocked { reason, .. } => {
            prop_assert!(matches!(m.outcome, ReleaseOutcome::Blocked { .. }), "{:?}", &m.outcome);
            prop_assert_eq!(m.layers.iter().map(|l| l.name.clone()).collect::<Vec<_>>(), names);
            if poisoned {
                prop_assert!(matches!(reason, BlockReason::NonFinite { .. }), "a non-finite gradient blocked for {reason}");
            }
        }
    }
    if !matches!(release, Release::Released { .. }) {
        for layer in &m.layers {
            prop_assert!(!layer.released && layer.seed.is_none(), "{:?}: layer {} released {} with seed {:?}", &m.outcome, &layer.name, layer.released, layer.seed);
        }
    }
    Ok(())
}

fn has_non_finite(tensors: &[Vec<Tensor>]) -> bool {
    tensors.iter().flatten().any(|t| !finite(t))
}

/// Runs the explicit release on each round's update (the model's shapes, normal values, the
/// round's scale and pokes).
fn explicit(spec: &CaseSpec, rounds: &[Round]) -> Result<(), TestCaseError> {
    let mut setup = Setup::new(spec);
    for (r, round) in rounds.iter().enumerate() {
        let data = setup.data(r, round.n);
        let raw: Vec<Vec<Tensor>> = setup.guard.layers().layers().iter().map(|l| l.params.iter().map(|p| normal(&mut setup.rng, &p.shape)).collect()).collect();
        poke(&setup, round, &raw);
        let poisoned = has_non_finite(&raw);
        let update: Vec<(String, Tensor)> =
            setup.guard.layers().layers().iter().zip(&raw).flat_map(|(l, ts)| l.params.iter().zip(ts).map(|(p, t)| (p.name.clone(), t.shallow_clone()))).collect();
        let step = setup.guard.step();
        let loss = |x: &Tensor, y: &Tensor| setup.mlp.loss(x, y);
        let release = setup.guard.release(&update, &data.batch(spec.attribute), &loss).map_err(|e| TestCaseError::fail(format!("release {r}: {e}")))?;
        check_manifest(&setup.guard, &release, step, poisoned)?;
        prop_assert_eq!(release.manifest().unwrap().samples, round.n as usize);
        match &release {
            Release::Released { update: out, report } => {
                let manifest = report.release.as_ref().expect("a release has its manifest");
                let mut expected = 0;
                for ((layer, lm), raw) in setup.guard.layers().layers().iter().zip(&manifest.layers).zip(&raw) {
                    let mine: Vec<Tensor> = layer.params.iter().filter_map(|p| out.iter().find(|(n, _)| *n == p.name).map(|(_, t)| t.shallow_clone())).collect();
                    if !lm.released {
                        prop_assert!(mine.is_empty(), "withheld layer {} is in the update", &lm.name);
                        continue;
                    }
                    expected += layer.params.len();
                    check_layer(lm, &mine, raw)?;
                }
                prop_assert_eq!(out.len(), expected, "the update holds the released layers' parameters, once each");
            }
            Release::Held { .. } => prop_assert!(false, "the explicit release never holds"),
            Release::Blocked { .. } => {}
        }
    }
    Ok(())
}

/// Runs the in-place release after a real backward on each round's batch (the gradient scaled
/// and poked), mirroring the micro-batches the guard holds for the aggregation floor.
fn in_place(spec: &CaseSpec, rounds: &[Round]) -> Result<(), TestCaseError> {
    let mut setup = Setup::new(spec);
    let params = setup.guard.layers().flat_params().0.len();
    let mut held = GradientAccumulator::new(params);
    for (r, round) in rounds.iter().enumerate() {
        let data = setup.data(r, round.n);
        common::zero_grads(&setup.vs);
        setup.mlp.loss(&data.x, &data.y).unwrap().backward();
        let grads: Vec<Vec<Tensor>> = setup.guard.layers().layers().iter().map(|l| l.params.iter().map(|p| p.tensor.grad()).collect()).collect();
        poke(&setup, round, &grads);
        let raw: Vec<Vec<Tensor>> = grads.iter().map(|l| l.iter().map(deep_copy).collect()).collect();
        let poisoned = has_non_finite(&raw);
        // The guard holds while micro-batches are held or the batch is below the floor.
        let holding = held.samples() > 0 || (round.n as usize) < setup.guard.protection().floor();
        let flat: Vec<Option<Tensor>> = raw.iter().flatten().map(|t| Some(t.shallow_clone())).collect();
        if holding && !poisoned {
            held.add(&flat, round.n as usize).unwrap();
        }
        let step = setup.guard.step();
        let loss = |x: &Tensor, y: &Tensor| setup.mlp.loss(x, y);
        let release = setup.guard.after_backward(&data.batch(spec.attribute), &loss).map_err(|e| TestCaseError::fail(format!("release {r}: {e}")))?;
        check_manifest(&setup.guard, &release, step, poisoned)?;
        let now: Vec<Vec<Tensor>> = setup.guard.layers().layers().iter().map(|l| l.params.iter().map(|p| p.tensor.grad()).collect()).collect();
        match &release {
            Release::Released { update, report } => {
                let manifest = report.release.as_ref().expect("a release has its manifest");
                prop_assert!(update.is_empty(), "the in-place release returns no tensors");
                // What the guard released from: the held micro-batches' mean, or this gradient.
                let from: Vec<Vec<Tensor>> = if holding {
                    prop_assert_eq!(manifest.samples, held.samples());
                    let mean = held.mean().map_err(|e| TestCaseError::fail(format!("released although the held mean is not finite: {e}")))?;
                    let mut mean = mean.into_iter().map(Option::unwrap);
                    raw.iter().map(|l| l.iter().map(|_| mean.next().unwrap()).collect()).collect()
                } else {
                    prop_assert_eq!(manifest.samples, round.n as usize);
                    raw
                };
                held.reset();
                for ((lm, got), from) in manifest.layers.iter().zip(&now).zip(&from) {
                    if lm.released {
                        check_layer(lm, got, from)?;
                    } else if spec.policy.train_locally {
                        for (g, f) in got.iter().zip(from) {
                            prop_assert!(g.equal(f), "withheld layer {} trains locally on its own gradient", &lm.name);
                        }
                    } else {
                        prop_assert!(got.iter().all(zeros), "withheld layer {} is not zeroed", &lm.name);
                    }
                }
            }
            Release::Held { .. } => {
                prop_assert!(now.iter().flatten().all(zeros), "a held release left a gradient");
                if !holding {
                    // An aggregate rung raised the floor: this batch is the first one held.
                    held.add(&flat, round.n as usize).unwrap();
                }
            }
            Release::Blocked { .. } => {
                prop_assert!(now.iter().flatten().all(zeros), "a blocked release left a gradient");
                held.reset();
            }
        }
    }
    Ok(())
}

proptest! {
    #![proptest_config(ProptestConfig { cases: CASES, failure_persistence: None, ..ProptestConfig::default() })]

    #[test]
    fn explicit_releases_are_the_manifests_chains_of_the_update(spec in case(), rounds in vec(round(), 1..=3)) {
        explicit(&spec, &rounds)?;
    }

    #[test]
    fn in_place_releases_are_the_manifests_chains_of_the_gradient(spec in case(), rounds in vec(round(), 1..=5)) {
        in_place(&spec, &rounds)?;
    }
}

/// An aggregate rung that escalates: the in-place release holds the batch, the explicit one
/// (which holds nothing) is blocked, and neither manifest releases a layer.
#[test]
fn an_aggregate_rung_holds_in_place_and_blocks_the_explicit_release() {
    let text = "version = 1\n[settings]\nestimate_every = 1\nbudget_share = 1.0\nbackground_estimates = false\nprobes = 2\n\
                [[rule]]\nname = \"more\"\nmetric = \"sensitivity\"\nlayers = [\"fc*\"]\nact_above = 0.0\nrelax_below = 0.0\n\
                ladder = [{ action = \"aggregate\", factor = 2 }]\n";
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[3, 4, 2]);
    let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0, 1.5, 0.25, -0.75]).reshape([2, 3]);
    let y = Tensor::from_slice(&[0i64, 1]);
    let loss = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
    let guard = || Guard::new(LayerMap::from_var_store(&vs).unwrap(), Policy::from_toml_str(text, "aggregate").unwrap()).unwrap();
    let unreleased = |release: &Release| release.manifest().unwrap().layers.len() == 2 && release.manifest().unwrap().layers.iter().all(|l| !l.released && l.seed.is_none());

    mlp.loss(&x, &y).unwrap().backward();
    let held = guard().after_backward(&Batch::new(&x, &y), &loss).unwrap();
    assert!(matches!(held, Release::Held { .. }) && unreleased(&held), "{:?}", held.manifest().unwrap());
    assert_eq!(held.manifest().unwrap().aggregation_floor, 2);

    let update: Vec<(String, Tensor)> = vs.variables().into_iter().collect();
    let blocked = guard().release(&update, &Batch::new(&x, &y), &loss).unwrap();
    assert!(matches!(blocked.block_reason(), Some(BlockReason::Aggregate { .. })) && unreleased(&blocked), "{blocked:?}");
    assert!(blocked.block_reason().unwrap().to_string().contains("aggregation floor raised to 2 samples"), "{}", blocked.block_reason().unwrap());
}

/// Held micro-batches whose mean overflows f32 are blocked and dropped: the guard goes on
/// holding and releasing the next ones.
#[test]
fn a_held_mean_that_overflows_is_blocked_and_dropped() {
    let text = "version = 1\n[settings]\nestimate_every = 1\nbudget_share = 1.0\nbackground_estimates = false\nprobes = 2\naggregation_floor = 2\n";
    let vs = nn::VarStore::new(Device::Cpu);
    let mlp = common::Mlp::new(&vs.root(), &[3, 2]);
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), Policy::from_toml_str(text, "floor").unwrap()).unwrap();
    let x = Tensor::from_slice(&[0.5f32, -1.0, 2.0]).reshape([1, 3]);
    let y = Tensor::from_slice(&[1i64]);
    let loss = |x: &Tensor, y: &Tensor| mlp.loss(x, y);
    let mut step = |huge: bool| {
        common::zero_grads(&vs);
        mlp.loss(&x, &y).unwrap().backward();
        if huge {
            tch::no_grad(|| vs.trainable_variables().iter().for_each(|p| drop(p.grad().fill_(3e38))));
        }
        guard.after_backward(&Batch::new(&x, &y), &loss).unwrap()
    };
    assert!(matches!(step(true), Release::Held { .. }));
    let blocked = step(true);
    assert!(matches!(blocked.block_reason(), Some(BlockReason::GuardFailure { what }) if what.contains("not finite")), "{blocked:?}");
    assert!(vs.trainable_variables().iter().all(|p| zeros(&p.grad())));
    assert!(matches!(step(false), Release::Held { .. }));
    let released = step(false);
    assert!(released.is_released() && released.manifest().unwrap().samples == 2, "{released:?}");
}
