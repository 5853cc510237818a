//! The guard observes, it does not disturb (METRICS.md, M1 "Batch coupling"): a model with
//! batch norm, dropout or both, trained under a guard that estimates M1 and M2 at every step,
//! ends bit-identical, parameters and buffers (running statistics), to the same model trained
//! unguarded: the guard's own passes put the buffers back and leave libtorch's random stream
//! (which dropout draws from) where they found it.
use gradguard_guard::{Batch, Metric, Settings};
use gradguard_tch::{GuardedOptimizer, TorchScriptModel};
use std::path::{Path, PathBuf};
use tch::{nn, nn::ModuleT, nn::OptimizerConfig, Device, Kind, TchError, Tensor};

const STEPS: usize = 20;
const BATCH: i64 = 16;

/// libtorch's generator is global: the tests of this file seed it and draw from it one at a
/// time.
static SEEDED: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn seeded() -> std::sync::MutexGuard<'static, ()> {
    SEEDED.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// How a run trains: without the guard, guarded with the user's own backward
/// (`backward_step`), or guarded by the step driver (`train_step`, one forward and backward
/// shared with the estimate).
#[derive(Clone, Copy, PartialEq, Debug)]
enum Run {
    Unguarded,
    BackwardStep,
    TrainStep,
}

/// One guarded step of `run` (`BackwardStep` or `TrainStep`); `loss` runs the user's forward,
/// which only `BackwardStep` does.
fn guarded_step(opt: &mut GuardedOptimizer, run: Run, loss: impl FnOnce() -> Tensor, batch: &Batch) -> gradguard_guard::Release {
    match run {
        Run::TrainStep => opt.train_step(batch).unwrap(),
        _ => opt.backward_step(&loss(), batch).unwrap(),
    }
}

/// Estimates M1 and M2 before every release, inline.
fn estimate_every_step() -> Settings {
    Settings { estimate_every: 1, budget_share: 1.0, background_estimates: false, probes: 4, subspace_every_steps: 0, isolation_every_steps: 0, ..Default::default() }
}

/// conv-bn-relu, then a residual block (conv-bn-relu-conv-bn, plus the input), pooled, linear.
struct SmallResNet {
    stem: nn::Conv2D,
    stem_bn: nn::BatchNorm,
    conv1: nn::Conv2D,
    bn1: nn::BatchNorm,
    conv2: nn::Conv2D,
    bn2: nn::BatchNorm,
    fc: nn::Linear,
    /// Dropout before `fc` (0: none).
    dropout: f64,
}

impl SmallResNet {
    fn new(p: &nn::Path, dropout: f64) -> Self {
        let conv = |p: nn::Path, c_in| nn::conv2d(p, c_in, 8, 3, nn::ConvConfig { padding: 1, bias: false, ..Default::default() });
        let block = p / "block";
        Self {
            stem: conv(p / "stem", 3),
            stem_bn: nn::batch_norm2d(p / "stem_bn", 8, Default::default()),
            conv1: conv(&block / "conv1", 8),
            bn1: nn::batch_norm2d(&block / "bn1", 8, Default::default()),
            conv2: conv(&block / "conv2", 8),
            bn2: nn::batch_norm2d(&block / "bn2", 8, Default::default()),
            fc: nn::linear(p / "fc", 8, 3, Default::default()),
            dropout,
        }
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let h = self.stem_bn.forward_t(&x.apply(&self.stem), true).f_relu()?;
        let r = self.bn1.forward_t(&h.apply(&self.conv1), true).f_relu()?;
        let r = self.bn2.forward_t(&r.apply(&self.conv2), true);
        let pooled = r.f_add(&h)?.f_relu()?.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)?;
        let pooled = if self.dropout > 0.0 { pooled.f_dropout(self.dropout, true)? } else { pooled };
        pooled.apply(&self.fc).f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0)
    }
}

/// Seeded batches: images, classes, and a binary attribute planted as a brightness offset in
/// channel 0.
fn batches(count: usize, shape: &[i64]) -> Vec<(Tensor, Tensor, Tensor)> {
    tch::manual_seed(11);
    (0..count)
        .map(|_| {
            let a = Tensor::randint(2, [BATCH], (Kind::Int64, Device::Cpu));
            let y = Tensor::randint(3, [BATCH], (Kind::Int64, Device::Cpu));
            let mut dims = vec![BATCH];
            dims.extend_from_slice(shape);
            let x = Tensor::randn(dims.as_slice(), (Kind::Float, Device::Cpu));
            if shape.len() == 3 {
                let offset = a.to_kind(Kind::Float).view([BATCH, 1, 1]);
                let _ = x.narrow(1, 0, 1).squeeze_dim(1).g_add_(&offset);
            }
            (x, y, a)
        })
        .collect()
}

/// Every variable of the VarStore by name, deep-copied.
fn state(vs: &nn::VarStore) -> Vec<(String, Tensor)> {
    let mut all: Vec<(String, Tensor)> = vs.variables().into_iter().map(|(n, t)| (n, t.detach().copy())).collect();
    all.sort_by(|a, b| a.0.cmp(&b.0));
    all
}

/// Compares two states variable by variable (bit-exact); lists the ones that differ with
/// their max |diff|.
fn differing(a: &[(String, Tensor)], b: &[(String, Tensor)]) -> Vec<String> {
    assert_eq!(a.iter().map(|(n, _)| n).collect::<Vec<_>>(), b.iter().map(|(n, _)| n).collect::<Vec<_>>());
    a.iter()
        .zip(b)
        .filter(|((_, x), (_, y))| !x.equal(y))
        .map(|((n, x), (_, y))| {
            let diff = (x.to_kind(Kind::Double) - y.to_kind(Kind::Double)).abs().max().double_value(&[]);
            format!("{n} (max |diff| {diff:.3e})")
        })
        .collect()
}

fn train_resnet(run: Run, dropout: f64) -> Vec<(String, Tensor)> {
    let data = batches(STEPS, &[3, 8, 8]);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let net = SmallResNet::new(&vs.root(), dropout);
    let sgd = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.1).unwrap();
    train(&vs, sgd, &|x: &Tensor, y: &Tensor| net.loss(x, y), run, &data)
}

/// Trains on `data` guarded (M1 and M2 estimated before every release) or not; the VarStore's
/// variables after the last step.
fn train(vs: &nn::VarStore, sgd: nn::Optimizer, loss_fn: &dyn Fn(&Tensor, &Tensor) -> Result<Tensor, TchError>, run: Run, data: &[(Tensor, Tensor, Tensor)]) -> Vec<(String, Tensor)> {
    if run != Run::Unguarded {
        let mut opt = GuardedOptimizer::builder(vs, sgd).settings(estimate_every_step()).loss(loss_fn).build().unwrap();
        for (step, (x, y, a)) in data.iter().enumerate() {
            let release = guarded_step(&mut opt, run, || loss_fn(x, y).unwrap(), &Batch::new(x, y).with_attribute(a));
            assert!(release.is_released(), "step {step}: {:?}", release.block_reason());
            let report = release.report();
            assert!(report.layers.iter().all(|l| l.sensitivity.measured().is_some()), "step {step}: M1 of every layer");
            assert!(report.layers.iter().all(|l| l.subspace.measured().is_some()), "step {step}: M2 of every layer");
        }
    } else {
        let mut opt = sgd;
        for (x, y, _) in data {
            opt.zero_grad();
            loss_fn(x, y).unwrap().backward();
            opt.step();
        }
    }
    state(vs)
}

#[test]
fn a_guarded_batch_norm_resnet_trains_bit_identically_to_an_unguarded_one() {
    let _seeded = seeded();
    let unguarded = train_resnet(Run::Unguarded, 0.0);
    let guarded = train_resnet(Run::BackwardStep, 0.0);
    assert!(unguarded.iter().any(|(n, _)| n.ends_with("running_mean")), "the model has buffers");
    let differ = differing(&unguarded, &guarded);
    assert!(differ.is_empty(), "parameters or buffers moved by the guard: {differ:?}");
}

#[test]
fn a_guarded_batch_norm_resnet_with_dropout_trains_bit_identically_to_an_unguarded_one() {
    let _seeded = seeded();
    let unguarded = train_resnet(Run::Unguarded, 0.3);
    let guarded = train_resnet(Run::BackwardStep, 0.3);
    let differ = differing(&unguarded, &guarded);
    assert!(differ.is_empty(), "parameters or buffers moved by the guard: {differ:?}");
    assert!(!differing(&unguarded, &train_resnet(Run::Unguarded, 0.0)).is_empty(), "dropout changes training");
}

/// linear, relu, dropout, linear: dropout without batch norm.
fn train_dropout_mlp(run: Run) -> Vec<(String, Tensor)> {
    let data = batches(STEPS, &[6]);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let (fc1, fc2) = (nn::linear(vs.root() / "fc1", 6, 16, Default::default()), nn::linear(vs.root() / "fc2", 16, 3, Default::default()));
    let loss_fn = |x: &Tensor, y: &Tensor| {
        x.apply(&fc1).f_relu()?.f_dropout(0.5, true)?.apply(&fc2).f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0)
    };
    let sgd = nn::Sgd::default().build(&vs, 0.1).unwrap();
    train(&vs, sgd, &loss_fn, run, &data)
}

#[test]
fn a_guarded_dropout_mlp_trains_bit_identically_to_an_unguarded_one() {
    let _seeded = seeded();
    let unguarded = train_dropout_mlp(Run::Unguarded);
    let guarded = train_dropout_mlp(Run::BackwardStep);
    let differ = differing(&unguarded, &guarded);
    assert!(differ.is_empty(), "parameters moved by the guard's draws: {differ:?}");
}

#[test]
fn batch_norm_1d_on_one_sample_leaves_m2_absent_with_its_reason() {
    let _seeded = seeded();
    let data = batches(3, &[6]);
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let (root, fc1) = (vs.root(), nn::linear(vs.root() / "fc1", 6, 8, Default::default()));
    let bn = nn::batch_norm1d(&root / "bn", 8, Default::default());
    let fc2 = nn::linear(&root / "fc2", 8, 3, Default::default());
    let loss_fn = |x: &Tensor, y: &Tensor| {
        bn.forward_t(&x.apply(&fc1), true).f_relu()?.apply(&fc2).f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0)
    };
    let before = state(&vs);
    let sgd = nn::Sgd::default().build(&vs, 0.1).unwrap();
    let mut opt = GuardedOptimizer::builder(&vs, sgd).settings(estimate_every_step()).loss(loss_fn).build().unwrap();
    for (step, (x, y, a)) in data.iter().enumerate() {
        let release = opt.backward_step(&loss_fn(x, y).unwrap(), &Batch::new(x, y).with_attribute(a)).unwrap();
        assert!(release.is_released(), "step {step}: {:?}", release.block_reason());
        for layer in &release.report().layers {
            assert!(layer.sensitivity.measured().is_some(), "step {step}, {}: M1 is measured on the batch", layer.name);
            match &layer.subspace {
                Metric::Measured(_) => panic!("step {step}, {}: M2 of a model that cannot run one sample", layer.name),
                Metric::Absent { reason } => {
                    assert!(reason.contains("one sample") && reason.contains("bn.running_var non-finite"), "{reason}")
                }
            }
        }
    }
    assert_ne!(differing(&before, &state(&vs)), Vec::<String>::new(), "training moved the model");
}

/// The project's venv python: $VIRTUAL_ENV, else the workspace's .venv.
fn python() -> PathBuf {
    let venv = std::env::var_os("VIRTUAL_ENV").map(PathBuf::from);
    let workspace = Path::new(env!("CARGO_MANIFEST_DIR")).join("..").join(".venv");
    let found = venv.into_iter().chain([workspace]).map(|v| v.join("bin").join("python")).find(|p| p.is_file());
    found.expect("no venv python: set VIRTUAL_ENV (source scripts/env.sh) or create .venv (README, Set-up)")
}

/// Scripts the fixture models into a fresh folder; returns the folder.
fn scripted_models() -> PathBuf {
    let folder = std::env::temp_dir().join(format!("gradguard-observe-only-{}", std::process::id()));
    std::fs::create_dir_all(&folder).unwrap();
    let script = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/fixtures/batch_norm_models.py");
    let status = std::process::Command::new(python()).arg(&script).arg(&folder).status().unwrap();
    assert!(status.success(), "{} failed", script.display());
    folder
}

fn script_loss(model: &TorchScriptModel, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
    model.f_forward(x)?.f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0)
}

/// Trains the scripted model at `path` in training mode, guarded or not; the VarStore's
/// variables (parameters and buffers) and the module's buffers after the last step.
fn train_script(path: &Path, data: &[(Tensor, Tensor, Tensor)], run: Run, check: impl Fn(usize, &gradguard_guard::Report)) -> Vec<(String, Tensor)> {
    let mut model = TorchScriptModel::load(path, Device::Cpu).unwrap();
    model.set_train().unwrap();
    // Dropout draws from here on: each run starts from the same stream.
    tch::manual_seed(0);
    let loss_fn = |x: &Tensor, y: &Tensor| script_loss(&model, x, y);
    let sgd = nn::Sgd { momentum: 0.9, ..Default::default() }.build(model.var_store(), 0.1).unwrap();
    if run != Run::Unguarded {
        let layers = model.layer_map().map_err(|e| gradguard_guard::GuardError::Layers(e.to_string()));
        let mut opt = GuardedOptimizer::builder_for_layers(layers, sgd).settings(estimate_every_step()).loss(loss_fn).build().unwrap();
        for (step, (x, y, a)) in data.iter().enumerate() {
            let release = guarded_step(&mut opt, run, || loss_fn(x, y).unwrap(), &Batch::new(x, y).with_attribute(a));
            assert!(release.is_released(), "step {step}: {:?}", release.block_reason());
            check(step, release.report());
        }
    } else {
        let mut opt = sgd;
        for (x, y, _) in data {
            opt.zero_grad();
            loss_fn(x, y).unwrap().backward();
            opt.step();
        }
    }
    let mut all = state(model.var_store());
    all.extend(model.named_buffers().into_iter().map(|(n, t)| (format!("module {n}"), t.detach().copy())));
    all
}

#[test]
fn a_guarded_torchscript_batch_norm_model_trains_bit_identically_to_an_unguarded_one() {
    let _seeded = seeded();
    let folder = scripted_models();
    let path = folder.join("bn_resnet.pt");
    let model = TorchScriptModel::load(&path, Device::Cpu).unwrap();
    let buffers: Vec<String> = model.named_buffers().into_iter().map(|(n, _)| n).collect();
    assert_eq!(buffers.len(), 9, "running_mean, running_var, num_batches_tracked of 3 batch norms: {buffers:?}");
    assert!(buffers.contains(&"block.bn1.running_var".to_string()), "{buffers:?}");
    assert_eq!(model.layer_map().unwrap().buffers().len(), 9);
    // M1's sub-batch probes: loaded in eval mode the batch norms use their running statistics;
    // in training mode the map declares that they mix the batch's samples.
    assert!(!model.layer_map().unwrap().couples_samples(), "eval mode does not couple the samples");
    let mut model = model;
    model.set_train().unwrap();
    assert!(model.layer_map().unwrap().couples_samples(), "training mode declares the coupling");
    drop(model);
    let data = batches(STEPS, &[3, 8, 8]);
    let unguarded = train_script(&path, &data, Run::Unguarded, |_, _| {});
    let guarded = train_script(&path, &data, Run::BackwardStep, |step, report| {
        assert!(report.layers.iter().all(|l| l.sensitivity.measured().is_some()), "step {step}: M1 of every layer");
        assert!(report.layers.iter().all(|l| l.subspace.measured().is_some()), "step {step}: M2 of every layer");
    });
    assert!(unguarded.iter().any(|(n, _)| n == "block_bn1_running_mean"), "the VarStore holds the buffers");
    let differ = differing(&unguarded, &guarded);
    assert!(differ.is_empty(), "parameters or buffers moved by the guard: {differ:?}");
    let _ = std::fs::remove_dir_all(folder);
}

#[test]
fn guarded_torchscript_models_with_dropout_train_bit_identically_to_unguarded_ones() {
    let _seeded = seeded();
    let folder = scripted_models();
    let data = batches(STEPS, &[3, 8, 8]);
    for name in ["dropout_cnn.pt", "bn_dropout_resnet.pt"] {
        let path = folder.join(name);
        let unguarded = train_script(&path, &data, Run::Unguarded, |_, _| {});
        let guarded = train_script(&path, &data, Run::BackwardStep, |step, report| {
            assert!(report.layers.iter().all(|l| l.sensitivity.measured().is_some()), "{name} step {step}: M1 of every layer");
        });
        let differ = differing(&unguarded, &guarded);
        assert!(differ.is_empty(), "{name}: parameters or buffers moved by the guard: {differ:?}");
    }
    let _ = std::fs::remove_dir_all(folder);
}

#[test]
fn a_scripted_batch_norm_1d_that_raises_on_one_sample_leaves_m2_absent_with_its_message() {
    let _seeded = seeded();
    let folder = scripted_models();
    let data = batches(3, &[6]);
    train_script(&folder.join("bn_mlp.pt"), &data, Run::BackwardStep, |step, report| {
        for layer in &report.layers {
            assert!(layer.sensitivity.measured().is_some(), "step {step}, {}: M1 is measured on the batch", layer.name);
            let reason = layer.subspace.absent_reason().unwrap_or_else(|| panic!("step {step}, {}: M2 measured", layer.name));
            assert!(reason.contains("one sample") && reason.contains("Expected more than 1 value per channel when training"), "{reason}");
        }
    });
    let _ = std::fs::remove_dir_all(folder);
}

/// The step driver computes the loss once per step (its forward and backward serve the
/// estimate): it ends where the unguarded run ends, with batch norm, dropout and both, in tch
/// and TorchScript models.
#[test]
fn the_step_driver_trains_bit_identically_to_unguarded_runs() {
    let _seeded = seeded();
    for dropout in [0.0, 0.3] {
        let differ = differing(&train_resnet(Run::Unguarded, dropout), &train_resnet(Run::TrainStep, dropout));
        assert!(differ.is_empty(), "resnet, dropout {dropout}: parameters or buffers moved by the guard: {differ:?}");
    }
    let differ = differing(&train_dropout_mlp(Run::Unguarded), &train_dropout_mlp(Run::TrainStep));
    assert!(differ.is_empty(), "dropout mlp: parameters moved by the guard: {differ:?}");
    let folder = scripted_models();
    let data = batches(STEPS, &[3, 8, 8]);
    for name in ["bn_resnet.pt", "dropout_cnn.pt", "bn_dropout_resnet.pt"] {
        let path = folder.join(name);
        let unguarded = train_script(&path, &data, Run::Unguarded, |_, _| {});
        let guarded = train_script(&path, &data, Run::TrainStep, |step, report| {
            assert!(report.estimated && report.layers.iter().all(|l| l.sensitivity.measured().is_some()), "{name} step {step}: M1 of every layer");
        });
        let differ = differing(&unguarded, &guarded);
        assert!(differ.is_empty(), "{name}: parameters or buffers moved by the guard: {differ:?}");
    }
    let _ = std::fs::remove_dir_all(folder);
}
