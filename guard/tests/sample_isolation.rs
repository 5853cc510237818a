//! M6, sample isolation (METRICS.md, M6), against a brute force in f64: each sample's own term of
//! the batch loss differentiated here by plain autograd (a batch of one where the samples do not
//! interact; the sample's entry of the batch's per-sample loss vector under batch norm), the
//! shares and the two numbers computed on the host. Cases: one unit fed by one sample, units all
//! shared, a batch of one, a batch-norm CNN in training mode (the batch-graph route; and the same
//! model with a loss M6 cannot split: absent, not wrong), a model that cannot run on one sample
//! (the batch-graph route through a mean of per-sample losses), a token model whose embedding
//! rows are units, trap weights against an honest initialisation (with the analytic attack
//! recovering the exposed samples), and a policy rule on `exposed_fraction` that blocks the trap
//! model's release and fails the vetting of its parameters.
mod common;

use common::cross_entropy;
use gradguard_guard::measure::{IsolationSettings, UnitEnergies, UnitEnergyTable};
use gradguard_guard::report::{LeakageMetric, ReleaseOutcome, TermSource};
use gradguard_guard::{Batch, BlockReason, Guard, Inspection, LayerMap, Metric, Policy, Release, Settings};
use tch::{nn, nn::Module, Device, Kind, TchError, Tensor};

const TAU: f64 = 0.99;

/// The brute force's per-unit figures of one layer: units along dimension 0 of every parameter.
struct Expected {
    total: Vec<f64>,
    top: Vec<f64>,
    top_sample: Vec<usize>,
    released: Vec<f64>,
}

fn host(t: &Tensor) -> Vec<f64> {
    Vec::<f64>::try_from(&t.detach().to_kind(Kind::Double).reshape([-1])).unwrap()
}

/// Per-unit squared norms of one parameter's gradient (zeros for an undefined one).
fn unit_squares(g: &Tensor, units: usize, numel: usize) -> Vec<f64> {
    let values = if g.defined() { host(g) } else { vec![0.0; numel] };
    let per = numel / units;
    (0..units).map(|u| values[u * per..(u + 1) * per].iter().map(|v| v * v).sum()).collect()
}

/// `per_sample[i][p]`: sample i's term's gradient for parameter p (flat order of the map).
fn brute_force(layers: &LayerMap, per_sample: &[Vec<Tensor>]) -> Vec<Expected> {
    let n = per_sample.len();
    let mut out = Vec::new();
    let mut start = 0;
    for layer in layers.layers() {
        let units = layer.params[0].shape[0] as usize;
        let count = layer.params.len();
        let energies: Vec<Vec<f64>> = per_sample
            .iter()
            .map(|grads| {
                let mut e = vec![0.0; units];
                for (g, p) in grads[start..start + count].iter().zip(&layer.params) {
                    for (a, b) in e.iter_mut().zip(unit_squares(g, units, p.numel)) {
                        *a += b;
                    }
                }
                e
            })
            .collect();
        let mut released = vec![0.0; units];
        for (k, p) in layer.params.iter().enumerate() {
            let mut mean = vec![0.0; p.numel];
            for grads in per_sample {
                let g = &grads[start + k];
                if g.defined() {
                    for (m, v) in mean.iter_mut().zip(host(g)) {
                        *m += v / n as f64;
                    }
                }
            }
            let per = p.numel / units;
            for (u, r) in released.iter_mut().enumerate() {
                *r += mean[u * per..(u + 1) * per].iter().map(|v| v * v).sum::<f64>();
            }
        }
        let total: Vec<f64> = (0..units).map(|u| energies.iter().map(|e| e[u]).sum()).collect();
        let top_sample: Vec<usize> = (0..units).map(|u| (0..n).fold(0, |best, i| if energies[i][u] > energies[best][u] { i } else { best })).collect();
        let top = (0..units).map(|u| energies[top_sample[u]][u]).collect();
        out.push(Expected { total, top, top_sample, released });
        start += count;
    }
    out
}

/// (exposed_fraction, isolated_share, isolating (unit, sample) pairs) from the brute force.
fn expected_m6(e: &Expected, n: usize) -> (f64, f64, Vec<(usize, usize)>) {
    let mut exposed = vec![false; n];
    let mut pairs = Vec::new();
    let mut isolated = 0.0;
    for u in 0..e.total.len() {
        if e.total[u] > 0.0 && e.top[u] / e.total[u] >= TAU {
            exposed[e.top_sample[u]] = true;
            pairs.push((u, e.top_sample[u]));
            isolated += e.released[u];
        }
    }
    let count = exposed.iter().filter(|x| **x).count();
    (count as f64 / n as f64, isolated / e.released.iter().sum::<f64>(), pairs)
}

fn close(a: &[f64], b: &[f64], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}: lengths");
    let scale = b.iter().fold(0.0f64, |m, v| m.max(v.abs())).max(1e-300);
    for (u, (x, y)) in a.iter().zip(b).enumerate() {
        assert!((x - y).abs() <= 1e-12 * scale, "{what}, unit {u}: {x} against the brute force's {y}");
    }
}

/// The library's figures and M6 against the brute force, layer by layer, to 1e-12 in f64.
/// Returns the library's exposed fraction per layer.
fn check_against(layers: &LayerMap, table: &UnitEnergyTable, per_sample: &[Vec<Tensor>], m6: &[Metric<gradguard_guard::report::SampleIsolation>]) -> Vec<f64> {
    let n = per_sample.len();
    let expected = brute_force(layers, per_sample);
    let mut fractions = Vec::new();
    for ((layer, (got, want)), reported) in layers.layers().iter().zip(table.layers.iter().zip(&expected)).zip(m6) {
        let got: &UnitEnergies = got.measured().unwrap_or_else(|| panic!("{}: {:?}", layer.name, got.absent_reason()));
        close(&got.total, &want.total, &format!("{} sum of ||g_ui||^2", layer.name));
        close(&got.top, &want.top, &format!("{} max of ||g_ui||^2", layer.name));
        close(&got.released, &want.released, &format!("{} ||G_u||^2", layer.name));
        let (fraction, share, pairs) = expected_m6(want, n);
        let iso = got.isolation(TAU);
        let iso = iso.measured().unwrap_or_else(|| panic!("{}: {:?}", layer.name, iso.absent_reason()));
        let got_pairs: Vec<(usize, usize)> = iso.isolating_units.iter().map(|u| (u.unit, u.sample)).collect();
        assert_eq!(got_pairs, pairs, "{}: isolating units", layer.name);
        assert_eq!(iso.exposed_fraction, fraction, "{}: exposed_fraction", layer.name);
        assert!((iso.isolated_share - share).abs() <= 1e-12, "{}: isolated_share {} against {share}", layer.name, iso.isolated_share);
        let reported = reported.measured().unwrap();
        assert_eq!((reported.exposed_fraction, reported.isolated_share, reported.n, reported.tau), (iso.exposed_fraction, iso.isolated_share, n, TAU));
        assert_eq!(reported.isolating_units, pairs.len());
        fractions.push(reported.exposed_fraction);
    }
    fractions
}

/// Plain gradients of `loss` with respect to every parameter of the map.
fn grads_of(layers: &LayerMap, loss: &Tensor) -> Vec<Tensor> {
    let (params, _) = layers.flat_params();
    Tensor::run_backward(&[loss], &params, false, false)
}

/// Batch-of-one gradients: each sample's term where the samples do not interact.
fn one_sample_terms(layers: &LayerMap, loss: impl Fn(&Tensor, &Tensor) -> Result<Tensor, TchError>, x: &Tensor, y: &Tensor) -> Vec<Vec<Tensor>> {
    (0..x.size()[0]).map(|i| grads_of(layers, &loss(&x.narrow(0, i, 1), &y.narrow(0, i, 1)).unwrap())).collect()
}

fn measure(layers: &LayerMap, loss: &dyn gradguard_guard::LossFn, x: &Tensor, y: &Tensor) -> (UnitEnergyTable, Vec<Metric<gradguard_guard::report::SampleIsolation>>) {
    let look = Inspection::new(layers, loss, Batch::new(x, y));
    (look.unit_energies().unwrap(), look.sample_isolation(&IsolationSettings { tau: TAU }).unwrap())
}

/// fc1 (relu) -> fc2, in f64.
struct Mlp {
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl Mlp {
    fn new(vs: &nn::VarStore, d: i64, hidden: i64, classes: i64) -> Self {
        Self { fc1: nn::linear(vs.root() / "fc1", d, hidden, Default::default()), fc2: nn::linear(vs.root() / "fc2", hidden, classes, Default::default()) }
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_linear(&self.fc1.ws, self.fc1.bs.as_ref())?.f_relu()?.f_linear(&self.fc2.ws, self.fc2.bs.as_ref())
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        cross_entropy(&self.logits(x)?, y)
    }
}

fn set(t: &Tensor, values: &Tensor) {
    tch::no_grad(|| t.shallow_clone().copy_(values));
}

#[test]
fn a_unit_that_one_sample_alone_activates_isolates_it() {
    tch::manual_seed(1);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs, 3, 4, 2);
    vs.double();
    // Unit 0 fires for the first coordinate above 0.5: sample 2 only. Units 1..3 fire always.
    let x = Tensor::from_slice(&[0.1, 0.3, -0.2, -1.0, 0.2, 0.4, 2.0, -0.5, 0.7, 0.2, 0.9, 0.1]).reshape([4, 3]);
    let w = Tensor::randn([4, 3], (Kind::Double, Device::Cpu));
    let _ = w.narrow(0, 0, 1).copy_(&Tensor::from_slice(&[1.0, 0.0, 0.0]).reshape([1, 3]));
    set(&net.fc1.ws, &w);
    set(net.fc1.bs.as_ref().unwrap(), &Tensor::from_slice(&[-0.5, 10.0, 10.0, 10.0]));
    let y = Tensor::from_slice(&[0i64, 1, 1, 0]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let (table, m6) = measure(&layers, &loss, &x, &y);
    assert_eq!(table.terms, Some(TermSource::OneSampleBatches), "no coupling: batches of one add up to the batch");
    let fractions = check_against(&layers, &table, &one_sample_terms(&layers, loss, &x, &y), &m6);
    let fc1 = table.layers[0].measured().unwrap().isolation(TAU);
    let fc1 = fc1.measured().unwrap();
    assert_eq!((fc1.isolating_units[0].unit, fc1.isolating_units[0].sample, fc1.isolating_units[0].share), (0, 2, 1.0));
    assert_eq!(fractions[0], 0.25, "only sample 2 is exposed by fc1");
    assert_eq!(fractions[1], 0.0, "fc2's units all see every sample");
}

#[test]
fn units_that_every_sample_feeds_expose_nothing() {
    tch::manual_seed(2);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let fc = nn::linear(vs.root() / "fc", 5, 3, Default::default());
    vs.double();
    let x = Tensor::randn([8, 5], (Kind::Double, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0, 1]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| cross_entropy(&fc.forward(x), y);
    let (table, m6) = measure(&layers, &loss, &x, &y);
    let fractions = check_against(&layers, &table, &one_sample_terms(&layers, loss, &x, &y), &m6);
    assert_eq!(fractions, [0.0]);
    let m = m6[0].measured().unwrap();
    assert_eq!((m.isolated_share, m.isolating_units, m.active_units, m.units), (0.0, 0, 3, 3));
    assert!(m.max_share < TAU);
}

#[test]
fn a_batch_of_one_exposes_its_sample() {
    tch::manual_seed(3);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs, 4, 6, 3);
    vs.double();
    // Every hidden unit active (a dead unit has no gradient and is skipped).
    set(net.fc1.bs.as_ref().unwrap(), &Tensor::full([6], 5.0, (Kind::Double, Device::Cpu)));
    let x = Tensor::randn([1, 4], (Kind::Double, Device::Cpu));
    let y = Tensor::from_slice(&[2i64]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let (table, m6) = measure(&layers, &loss, &x, &y);
    let fractions = check_against(&layers, &table, &one_sample_terms(&layers, loss, &x, &y), &m6);
    assert_eq!(fractions, [1.0, 1.0]);
    for m in &m6 {
        let m = m.measured().unwrap();
        assert!((m.isolated_share - 1.0).abs() <= 1e-12, "{}", m.isolated_share);
        assert_eq!(m.isolating_units, m.active_units);
    }
}

/// conv(1 -> 4, 3x3) -> batch norm (training mode) -> relu -> flatten -> linear(4*4*4 -> 3).
struct BnCnn {
    conv: nn::Conv2D,
    bn: nn::BatchNorm,
    fc: nn::Linear,
}

impl BnCnn {
    fn new(vs: &nn::VarStore) -> Self {
        let root = vs.root();
        Self {
            conv: nn::conv2d(&root / "conv", 1, 4, 3, Default::default()),
            bn: nn::batch_norm2d(&root / "bn", 4, Default::default()),
            fc: nn::linear(&root / "fc", 4 * 4 * 4, 3, Default::default()),
        }
    }

    fn logits(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let h = x.f_conv2d(&self.conv.ws, self.conv.bs.as_ref(), [1, 1], [0, 0], [1, 1], 1)?;
        let h = h.f_batch_norm(self.bn.ws.as_ref(), self.bn.bs.as_ref(), Some(&self.bn.running_mean), Some(&self.bn.running_var), true, 0.1, 1e-5, false)?;
        h.f_relu()?.f_flatten(1, -1)?.f_linear(&self.fc.ws, self.fc.bs.as_ref())
    }

    /// Each sample's loss in the batch's forward pass (batch statistics of the whole batch).
    fn per_sample(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.logits(x)?.f_log_softmax(-1, None)?.f_gather(1, &y.f_unsqueeze(1)?, false)?.f_neg()?.f_squeeze_dim(1)
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        cross_entropy(&self.logits(x)?, y)
    }
}

fn bn_setup() -> (nn::VarStore, BnCnn, Tensor, Tensor) {
    tch::manual_seed(4);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = BnCnn::new(&vs);
    vs.double();
    let x = Tensor::randn([6, 1, 6, 6], (Kind::Double, Device::Cpu));
    let y = Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2]);
    (vs, net, x, y)
}

#[test]
fn batch_norm_in_training_mode_uses_each_samples_term_of_the_batch_loss() {
    let (vs, net, x, y) = bn_setup();
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let before: Vec<Tensor> = layers.buffers().iter().map(|(_, t)| t.copy()).collect();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let (table, m6) = measure(&layers, &loss, &x, &y);
    match &table.terms {
        Some(TermSource::BatchGraph { node, why }) => {
            assert_eq!(node, "NllLossBackward0");
            assert!(why.contains("do not add up to the batch gradient"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    assert!(before.iter().zip(layers.buffers()).all(|(b, (_, t))| b.equal(t)), "M6 left the running statistics as they were");
    // The brute force: sample i's entry of the batch's per-sample loss vector, differentiated.
    let terms: Vec<Vec<Tensor>> = (0..6).map(|i| grads_of(&layers, &net.per_sample(&x, &y).unwrap().get(i))).collect();
    check_against(&layers, &table, &terms, &m6);
    // The terms add up to the batch gradient, and batches of one are not the terms here.
    let batch = grads_of(&layers, &net.loss(&x, &y).unwrap());
    let expected = brute_force(&layers, &terms);
    let g_norm: f64 = batch.iter().map(|g| host(g).iter().map(|v| v * v).sum::<f64>()).sum();
    let released: f64 = expected.iter().map(|e| e.released.iter().sum::<f64>()).sum();
    assert!((g_norm - released).abs() <= 1e-12 * g_norm, "{g_norm} against {released}");
    let alone = brute_force(&layers, &one_sample_terms(&layers, |x, y| net.loss(x, y), &x, &y));
    let gap = (alone[0].total.iter().sum::<f64>() - expected[0].total.iter().sum::<f64>()).abs() / expected[0].total.iter().sum::<f64>();
    assert!(gap > 1e-3, "batches of one would have served as well (relative gap {gap}): the case tests nothing");
}

#[test]
fn batch_norm_with_a_loss_that_does_not_split_is_absent_not_wrong() {
    let (vs, net, x, y) = bn_setup();
    let layers = LayerMap::from_var_store(&vs).unwrap();
    // A scaled loss: its last operation is a multiplication, not a per-sample reduction.
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y)?.f_mul_scalar(2.0);
    let (table, m6) = measure(&layers, &loss, &x, &y);
    assert_eq!(table.terms, None);
    for m in &m6 {
        let reason = m.absent_reason().expect("absent");
        assert!(reason.contains("do not add up to the batch gradient") && reason.contains("couples its samples") && reason.contains("MulBackward"), "{reason}");
    }
    // Without batch norm the same fallback is exact: the MLP's scaled loss against its plain one.
    tch::manual_seed(6);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let mlp = Mlp::new(&vs, 4, 5, 2);
    vs.double();
    let (x, y) = (Tensor::randn([5, 4], (Kind::Double, Device::Cpu)), Tensor::from_slice(&[0i64, 1, 1, 0, 1]));
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let scaled = |x: &Tensor, y: &Tensor| mlp.loss(x, y)?.f_mul_scalar(2.0);
    let (table, m6) = measure(&layers, &scaled, &x, &y);
    assert_eq!(table.terms, Some(TermSource::OneSampleBatches));
    check_against(&layers, &table, &one_sample_terms(&layers, scaled, &x, &y), &m6);
}

#[test]
fn a_model_that_cannot_run_on_one_sample_is_measured_through_the_batch_graph() {
    tch::manual_seed(9);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs, 4, 6, 3);
    vs.double();
    let (x, y) = (Tensor::randn([7, 4], (Kind::Double, Device::Cpu)), Tensor::from_slice(&[0i64, 1, 2, 0, 1, 2, 0]));
    let layers = LayerMap::from_var_store(&vs).unwrap();
    // The mean of a per-sample vector (MeanBackward0), on batches of at least two.
    let per_sample = |x: &Tensor, y: &Tensor| net.logits(x)?.f_log_softmax(-1, None)?.f_gather(1, &y.f_unsqueeze(1)?, false)?.f_neg()?.f_squeeze_dim(1);
    let loss = |x: &Tensor, y: &Tensor| {
        if x.size()[0] < 2 {
            return Err(TchError::Shape("this model takes batches of two or more".into()));
        }
        per_sample(x, y)?.f_mean(Kind::Double)
    };
    let (table, m6) = measure(&layers, &loss, &x, &y);
    match &table.terms {
        Some(TermSource::BatchGraph { node, why }) => {
            assert_eq!(node, "MeanBackward0");
            assert!(why.contains("cannot run on one sample") && why.contains("batches of two"), "{why}");
        }
        other => panic!("{other:?}"),
    }
    // The samples do not interact: the brute force's terms are the plain per-sample losses.
    let terms: Vec<Vec<Tensor>> = (0..7).map(|i| grads_of(&layers, &per_sample(&x.narrow(0, i, 1), &y.narrow(0, i, 1)).unwrap().sum(Kind::Double))).collect();
    check_against(&layers, &table, &terms, &m6);
}

#[test]
fn a_token_models_embedding_rows_are_its_units() {
    tch::manual_seed(7);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let emb = nn::embedding(vs.root() / "emb", 20, 4, Default::default());
    let fc = nn::linear(vs.root() / "fc", 4, 2, Default::default());
    vs.double();
    // Tokens 0..4 in every sample; 10 + i in sample i alone; token 19 nowhere.
    let rows: Vec<i64> = (0..6).flat_map(|i| [0, 1, 2, 3, 10 + i]).collect();
    let tokens = Tensor::from_slice(&rows).reshape([6, 5]);
    let y = Tensor::from_slice(&[0i64, 1, 0, 1, 0, 1]);
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let loss = |t: &Tensor, y: &Tensor| cross_entropy(&fc.forward(&emb.forward(t).f_mean_dim(1, false, Kind::Double)?), y);
    let (table, m6) = measure(&layers, &loss, &tokens, &y);
    let fractions = check_against(&layers, &table, &one_sample_terms(&layers, loss, &tokens, &y), &m6);
    assert_eq!(fractions[0], 1.0, "each sample's own token gives it away");
    let emb_iso = table.layers[0].measured().unwrap().isolation(TAU);
    let emb_iso = emb_iso.measured().unwrap();
    let pairs: Vec<(usize, usize)> = emb_iso.isolating_units.iter().map(|u| (u.unit, u.sample)).collect();
    assert_eq!(pairs, (0..6).map(|i| (10 + i, i)).collect::<Vec<_>>());
    assert_eq!((emb_iso.units, emb_iso.active_units), (20, 10), "rows of unused tokens are skipped");
}

/// A first layer Linear(64, 256) with trap rows: unit directions at random, biases at the
/// 1 - 1/32 quantile of the unit's response, so that each unit fires for about one input in 32.
fn trap(net: &Mlp) {
    let w = Tensor::randn([256, 64], (Kind::Double, Device::Cpu));
    let w = &w / w.square().sum_dim_intlist([1i64].as_slice(), true, Kind::Double).sqrt();
    set(&net.fc1.ws, &w);
    // w.x ~ N(0, 1) for x ~ N(0, I): the 1 - 1/32 quantile is 1.8627.
    set(net.fc1.bs.as_ref().unwrap(), &Tensor::full([256], -1.8627, (Kind::Double, Device::Cpu)));
}

fn trap_setup(trapped: bool) -> (nn::VarStore, Mlp, Tensor, Tensor) {
    tch::manual_seed(8);
    let mut vs = nn::VarStore::new(Device::Cpu);
    let net = Mlp::new(&vs, 64, 256, 10);
    vs.double();
    if trapped {
        trap(&net);
    }
    let x = Tensor::randn([32, 64], (Kind::Double, Device::Cpu));
    let y = Tensor::arange(32, (Kind::Int64, Device::Cpu)).remainder(10);
    (vs, net, x, y)
}

#[test]
fn trap_weights_expose_most_of_the_batch_and_an_honest_init_little() {
    let mut figures = Vec::new();
    for trapped in [true, false] {
        let (vs, net, x, y) = trap_setup(trapped);
        let layers = LayerMap::from_var_store(&vs).unwrap();
        let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
        let (table, m6) = measure(&layers, &loss, &x, &y);
        check_against(&layers, &table, &one_sample_terms(&layers, loss, &x, &y), &m6);
        let fc1 = m6[0].measured().unwrap().clone();
        if trapped {
            // What M6 sees is real: each unit that one sample alone moves (share 1: the other
            // samples leave its ReLU off) gives that sample back exactly from the released
            // gradient, x = dW_u / db_u (the analytic attack).
            let g = grads_of(&layers, &net.loss(&x, &y).unwrap());
            let at = |name: &str| layers.layers()[0].params.iter().position(|p| p.name == name).unwrap();
            let (dw, db) = (&g[at("fc1.weight")], &g[at("fc1.bias")]);
            let iso = table.layers[0].measured().unwrap().isolation(TAU);
            let iso = iso.measured().unwrap();
            let mut recovered = std::collections::BTreeSet::new();
            for unit in iso.isolating_units.iter().filter(|u| u.share == 1.0) {
                let u = unit.unit as i64;
                let x_hat = dw.get(u) / db.get(u);
                let err = (&x_hat - x.get(unit.sample as i64)).abs().max().double_value(&[]);
                assert!(err < 1e-9, "unit {u}: the reconstruction of sample {} is off by {err}", unit.sample);
                recovered.insert(unit.sample);
            }
            eprintln!("trap: {} of 32 samples recovered exactly by x = dW_u / db_u", recovered.len());
            assert!(recovered.len() as f64 >= 0.75 * 32.0, "{} samples recovered", recovered.len());
        }
        figures.push((fc1.exposed_fraction, fc1.isolated_share, fc1.isolating_units));
    }
    let ((trap_exposed, trap_share, trap_units), (honest_exposed, _, _)) = (figures[0], figures[1]);
    eprintln!("trap: exposed_fraction {trap_exposed}, isolated_share {trap_share:.4}, {trap_units} isolating units; honest: exposed_fraction {honest_exposed}");
    assert!(trap_exposed >= 0.75, "the trap exposes {trap_exposed} of the batch");
    assert!(honest_exposed <= 0.25, "the honest init exposes {honest_exposed} of the batch");
    assert!(trap_units >= 40, "{trap_units} isolating units");
}

const RULE: &str = r#"
    version = 2
    [settings]
    estimate_every = 1
    budget_share = 1.0
    background_estimates = false
    [[rule]]
    name = "isolation"
    metric = "exposed_fraction"
    layers = ["fc1"]
    act_above = 0.5
    relax_below = 0.25
    ladder = [{ action = "clip", max_norm = 1.0 }]
"#;

#[test]
fn a_rule_on_exposed_fraction_blocks_the_trap_models_release_and_releases_the_honest_one() {
    for trapped in [true, false] {
        let (vs, net, x, y) = trap_setup(trapped);
        let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), Policy::from_toml_str(RULE, "test").unwrap()).unwrap();
        let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
        let batch = Batch::new(&x, &y);
        // The client vets the parameters before training on them.
        let vetting = guard.vet_parameters(&batch, &loss).unwrap();
        assert_eq!(vetting.accepted(), !trapped, "{:?}", vetting.checks);
        assert_eq!(vetting.checks.len(), 1);
        assert_eq!(vetting.checks[0].metric, LeakageMetric::ExposedFraction);
        let release = guard.train_step(&batch, &loss).unwrap();
        let report = release.report();
        let fc1 = report.layer("fc1").unwrap().sample_isolation.measured().expect("measured at the estimate").clone();
        assert_eq!(fc1.exposed_fraction, vetting.layer("fc1").unwrap().measured().unwrap().exposed_fraction, "same model, same batch");
        assert!(report.to_json().contains("\"exposed_fraction\""));
        match (trapped, &release) {
            (true, Release::Blocked { reason: BlockReason::Violation { layer, metric, value, threshold }, .. }) => {
                assert_eq!((layer.as_str(), *metric, *threshold), ("fc1", LeakageMetric::ExposedFraction, 0.5));
                assert_eq!(*value, Some(fc1.exposed_fraction));
                assert!(vetting.exposed_fraction() >= 0.75 && vetting.exposed_samples.len() == (vetting.exposed_fraction() * 32.0).round() as usize);
            }
            (false, Release::Released { report, .. }) => {
                let manifest = report.release.as_ref().expect("a release has its manifest");
                assert_eq!(manifest.outcome, ReleaseOutcome::Released);
                assert_eq!(manifest.layers[0].checks[0].released, Some(fc1.exposed_fraction));
            }
            (trapped, other) => panic!("trapped {trapped}: {other:?}"),
        }
    }
}

#[test]
fn a_withhold_rung_keeps_the_trap_layer_back_and_tau_is_a_checked_setting() {
    let (vs, net, x, y) = trap_setup(true);
    let text = RULE.replace(r#"{ action = "clip", max_norm = 1.0 }"#, r#"{ action = "withhold" }"#);
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), Policy::from_toml_str(&text, "test").unwrap()).unwrap();
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    match guard.train_step(&Batch::new(&x, &y), &loss).unwrap() {
        Release::Released { report, .. } => {
            let manifest = report.release.expect("a release has its manifest");
            assert!(!manifest.layers[0].released, "fc1 withheld");
            assert!(manifest.layers[1].released, "fc2 released");
        }
        other => panic!("{other:?}"),
    }
    for tau in ["0.5", "1.01"] {
        let text = format!("version = 2\n[settings.isolation]\ntau = {tau}\n");
        let err = Policy::from_toml_str(&text, "test").unwrap_err().to_string();
        assert!(err.contains("isolation") && err.contains("(0.5, 1]"), "{err}");
    }
    let settings = Settings { isolation: IsolationSettings { tau: 1.0 }, ..Default::default() };
    assert!(Policy::permissive_with(settings).is_ok());
}
