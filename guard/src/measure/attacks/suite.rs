//! The suite runner: the batch's release (the gradient of its mean loss, as the training step
//! releases it), every applicable attack on every layer, and the strongest per layer.
use super::analytic::{analytic, analytic_differences, LinearRelease};
use super::labels::{recover_labels, LabelRecovery};
use super::{check_peak, optimisation, score, truth_matrix, AttackKind, AttackOutcome};
use crate::error::{GuardError, Result, TorchContext};
use crate::measure::inspection::Inspection;
use crate::measure::inversion::{InversionPlan, InversionSettings};
use crate::measure::layers::Layer;
use crate::measure::loss::parameter_grads;
use crate::measure::tensors::to_f64_vec;
use crate::report::Metric;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How the suite runs and scores.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
#[serde(default, deny_unknown_fields)]
pub struct AttackSettings {
    /// The data's range, the PSNR's peak (1.0 for pixels in [0, 1]); None: max - min of the
    /// batch (1.0 when the batch is constant).
    pub peak: Option<f64>,
    /// x_bar, the reference mean input bits are measured against (D values); None: the batch's
    /// mean (with one sample it is the sample itself, and bits are 0).
    pub reference_mean: Option<Vec<f64>>,
    /// The analytic attacks divide only by |dG/db| (or a difference of two) above this share of
    /// the largest |dG/db_u| of the layer.
    pub min_bias_gradient: f64,
    /// Two weight rows point the same way when their cosine is above 1 - this.
    pub same_direction: f64,
    /// The optimisation attack's settings; None: not run (it is slow: hundreds of
    /// double-backward passes per layer). It is then absent with that reason.
    pub optimisation: Option<InversionSettings>,
}

impl Default for AttackSettings {
    fn default() -> Self {
        Self { peak: None, reference_mean: None, min_bias_gradient: 1e-6, same_direction: 1e-6, optimisation: Some(InversionSettings::default()) }
    }
}

impl AttackSettings {
    /// Rejects a peak that is not finite and > 0, a share outside [0, 1), a direction tolerance
    /// outside (0, 1), and bad optimisation settings.
    pub fn validate(&self) -> Result<()> {
        if let Some(peak) = self.peak {
            check_peak(peak)?;
        }
        if self.reference_mean.as_ref().is_some_and(|m| m.iter().any(|v| !v.is_finite())) {
            return Err(GuardError::Config { setting: "attacks.reference_mean", why: "a non-finite value".into() });
        }
        if !(self.min_bias_gradient.is_finite() && (0.0..1.0).contains(&self.min_bias_gradient)) {
            return Err(GuardError::Config { setting: "attacks.min_bias_gradient", why: format!("must be in [0, 1), got {}", self.min_bias_gradient) });
        }
        if !(self.same_direction.is_finite() && self.same_direction > 0.0 && self.same_direction < 1.0) {
            return Err(GuardError::Config { setting: "attacks.same_direction", why: format!("must be in (0, 1), got {}", self.same_direction) });
        }
        match &self.optimisation {
            Some(s) => s.validate(),
            None => Ok(()),
        }
    }
}

/// Every attack on one layer's release, and the strongest.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LayerAttacks {
    /// The layer's name.
    pub layer: String,
    /// P_l: scalars in the layer.
    pub params: usize,
    /// The single-unit analytic attack.
    pub analytic: Metric<AttackOutcome>,
    /// The analytic attack on differences of units that share a direction.
    pub analytic_differences: Metric<AttackOutcome>,
    /// The optimisation attack (the layer-restricted inversion on the whole batch).
    pub optimisation: Metric<AttackOutcome>,
    /// The measured attack with the most samples recovered, then the most bits per dimension
    /// (the first in the order above on a tie); None when every attack is absent.
    pub strongest: Option<AttackKind>,
}

impl LayerAttacks {
    /// The outcome of one attack.
    pub fn outcome(&self, attack: AttackKind) -> &Metric<AttackOutcome> {
        match attack {
            AttackKind::Analytic => &self.analytic,
            AttackKind::AnalyticDifferences => &self.analytic_differences,
            AttackKind::Optimisation => &self.optimisation,
        }
    }

    /// The strongest attack's outcome.
    pub fn strongest_outcome(&self) -> Option<&AttackOutcome> {
        self.strongest.and_then(|a| self.outcome(a).measured())
    }

    fn pick_strongest(&mut self) {
        let mut best: Option<&AttackOutcome> = None;
        for attack in [AttackKind::Analytic, AttackKind::AnalyticDifferences, AttackKind::Optimisation] {
            if let Some(o) = self.outcome(attack).measured() {
                let stronger = best.is_none_or(|b| (o.samples_recovered, o.bits_per_dim).partial_cmp(&(b.samples_recovered, b.bits_per_dim)) == Some(std::cmp::Ordering::Greater));
                if stronger {
                    best = Some(o);
                }
            }
        }
        self.strongest = best.map(|o| o.attack);
    }
}

/// M4's attack suite on one released batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct AttackSuite {
    /// Samples in the released batch (every figure is per batch of n).
    pub n: usize,
    /// Values per sample (D); None for inputs that are not continuous.
    pub dims: Option<usize>,
    /// The PSNR's peak (the setting, or the batch's range); None for inputs that are not
    /// continuous.
    pub peak: Option<f64>,
    /// The seed of the optimisation attack's start.
    pub seed: u64,
    /// The step the inspection belongs to.
    pub step: u64,
    /// One entry per layer, in the map's order.
    pub layers: Vec<LayerAttacks>,
    /// The labels recovered from the output layer's bias gradient (taken as the last layer of
    /// the map with a weight matrix and a bias, under a softmax cross-entropy).
    pub labels: Metric<LabelRecovery>,
}

impl AttackSuite {
    /// The layer and outcome of the strongest attack over all layers (most samples recovered,
    /// then most bits); None when every attack on every layer is absent.
    pub fn strongest(&self) -> Option<(&LayerAttacks, &AttackOutcome)> {
        let mut best: Option<(&LayerAttacks, &AttackOutcome)> = None;
        for layer in &self.layers {
            if let Some(o) = layer.strongest_outcome() {
                if best.is_none_or(|(_, b)| (o.samples_recovered, o.bits_per_dim).partial_cmp(&(b.samples_recovered, b.bits_per_dim)) == Some(std::cmp::Ordering::Greater)) {
                    best = Some((layer, o));
                }
            }
        }
        best
    }
}

/// The weight `[K, D]` and bias `[K]` of a layer (indices into its parameters), by their names
/// (`weight`, `bias`), else by shape; Err(reason) when the analytic attack does not apply.
fn linear_params(layer: &Layer, d: Option<usize>) -> std::result::Result<(usize, usize), String> {
    let last = |name: &str| name.rsplit('.').next().unwrap_or(name).to_string();
    let by_name = |want: &str| layer.params.iter().position(|p| last(&p.name) == want);
    let weight = by_name("weight").or_else(|| {
        let matrices: Vec<usize> = (0..layer.params.len()).filter(|&i| layer.params[i].shape.len() >= 2).collect();
        (matrices.len() == 1).then(|| matrices[0])
    });
    let Some(w) = weight else {
        return Err("no weight matrix: the analytic attack needs a layer with a bias whose input is the model input".into());
    };
    let shape = &layer.params[w].shape;
    let units = shape.first().copied().unwrap_or(0);
    let bias = by_name("bias").or_else(|| {
        let vectors: Vec<usize> = (0..layer.params.len()).filter(|&i| i != w && layer.params[i].shape == [units]).collect();
        (vectors.len() == 1).then(|| vectors[0])
    });
    let Some(b) = bias else {
        return Err("no bias: the analytic attack needs a layer with a bias whose input is the model input".into());
    };
    if shape.len() > 2 {
        return Err(format!(
            "a convolution (weight of shape {shape:?}): the analytic attacks cover Linear layers on the flattened model input; a convolutional first layer is out of scope"
        ));
    }
    if shape.len() != 2 || layer.params[b].shape != [shape[0]] {
        return Err(format!("weight {shape:?} and bias {:?} are not a Linear layer's", layer.params[b].shape));
    }
    if let Some(d) = d {
        if shape[1] as usize != d {
            return Err(format!("the weight takes {} inputs, the model input has {d} values per sample: not a layer on the model input", shape[1]));
        }
    }
    Ok((w, b))
}

impl Inspection<'_> {
    /// M4's attack suite on the release of this batch: the gradient of its mean loss (one
    /// forward and backward of the whole batch, at the batch size the user trains with),
    /// attacked per layer by the single-unit and differences analytic attacks (Linear layers
    /// whose weight takes the flattened model input, with a bias; eligibility is by shape, so a
    /// hidden layer of the input's width is attacked too and scores what its candidates score)
    /// and, when `settings.optimisation` is given, by the existing layer-restricted inversion on
    /// the whole batch; the labels recovered from the last layer's bias gradient; each attack
    /// scored against the batch's true inputs ([`score`](super::score): oracle matching, an
    /// upper bound on the attack) and the strongest named per layer.
    ///
    /// Attacks that do not apply are absent with the reason: inputs that are not continuous,
    /// a layer without a bias or not on the model input, a layer the loss does not reach, a
    /// non-finite gradient (never released). A non-finite loss is
    /// [`GuardError::NonFiniteLoss`]; bad settings are [`GuardError::Config`].
    pub fn attack_suite(&self, settings: &AttackSettings) -> Result<AttackSuite> {
        settings.validate()?;
        let n = self.batch().validate()?;
        let mut suite = self.observing(|| analytic_suite(self, settings, n))?;
        let continuous = suite.peak.zip(suite.dims);
        match (&settings.optimisation, continuous) {
            (None, _) => {
                for layer in &mut suite.layers {
                    layer.optimisation = Metric::absent("not run: no optimisation settings (AttackSettings::optimisation is None)");
                }
            }
            (Some(_), None) => {}
            (Some(opt), Some((peak, dims))) => {
                let baseline = baseline_mse(self, settings)?;
                let inverted = self.original_information(&InversionPlan { batch_size: n, releases: 1 }, opt, None)?;
                for (layer, m) in suite.layers.iter_mut().zip(inverted) {
                    layer.optimisation = match m {
                        Metric::Measured(inv) => Metric::Measured(optimisation::outcome(&inv, n, dims, peak, baseline)),
                        Metric::Absent { reason } => Metric::Absent { reason },
                    };
                }
            }
        }
        for layer in &mut suite.layers {
            layer.pick_strongest();
        }
        Ok(suite)
    }
}

/// E||x - x_bar||^2 / D of the batch against the suite's x_bar.
fn baseline_mse(ins: &Inspection, settings: &AttackSettings) -> Result<f64> {
    let (x, n, d) = truth_matrix(ins.batch().inputs())?;
    let x_bar = match &settings.reference_mean {
        Some(mean) if mean.len() != d => {
            return Err(GuardError::Config { setting: "attacks.reference_mean", why: format!("{} values, the samples hold {d}", mean.len()) });
        }
        Some(mean) => Tensor::f_from_slice(mean).and_then(|m| m.f_reshape([1, -1])).during("forming the reference mean")?,
        None => x.f_mean_dim(0, true, Kind::Double).during("forming the batch mean")?,
    };
    let sum = x.f_sub(&x_bar).and_then(|e| e.f_square()).and_then(|e| e.f_sum(Kind::Double)).during("the baseline error")?;
    Ok(to_f64_vec(&sum)?[0] / (n * d) as f64)
}

/// Everything but the optimisation attack (absent until filled), with the strongest unset.
fn analytic_suite(ins: &Inspection, settings: &AttackSettings, n: usize) -> Result<AttackSuite> {
    let (layers, batch) = (ins.layers(), ins.batch());
    let (inputs, targets) = (batch.inputs(), batch.targets());
    let continuous = inputs.f_is_floating_point().during("reading the inputs' dtype")?;
    let truth = if continuous { Some(truth_matrix(inputs)?) } else { None };
    let dims = truth.as_ref().map(|t| t.2);
    let peak = match (&truth, settings.peak) {
        (None, _) => None,
        (Some(_), Some(p)) => Some(p),
        (Some((x, _, _)), None) => {
            let (lo, hi) = x.f_aminmax(None, false).during("the batch's range")?;
            let range = to_f64_vec(&hi)?[0] - to_f64_vec(&lo)?[0];
            Some(if range > 0.0 { range } else { 1.0 })
        }
    };
    let (params, owner) = layers.flat_params();
    let grads = parameter_grads(ins.loss(), inputs, targets, &params, ins.step(), true)?;
    let mut per_layer: Vec<Vec<Tensor>> = layers.layers().iter().map(|_| Vec::new()).collect();
    for (g, l) in grads.into_iter().zip(owner) {
        per_layer[l].push(g);
    }
    let not_continuous = format!("M4 reconstructs continuous inputs; these are {:?} (token ids or categorical codes)", inputs.kind());
    let mut out = Vec::with_capacity(layers.len());
    for (layer, grads) in layers.layers().iter().zip(&per_layer) {
        let (a, diff) = match (&truth, peak) {
            (Some((x, _, d)), Some(peak)) => match linear_params(layer, Some(*d)) {
                Err(reason) => (Metric::absent(reason.clone()), Metric::absent(reason)),
                Ok((w, b)) => {
                    let release = LinearRelease { weight: &layer.params[w].tensor, bias: &layer.params[b].tensor, grad_weight: &grads[w], grad_bias: &grads[b] };
                    let scored = |m: Metric<super::Reconstructions>| -> Result<Metric<AttackOutcome>> {
                        match m {
                            Metric::Absent { reason } => Ok(Metric::Absent { reason }),
                            Metric::Measured(r) => score(r.attack, x, &r.candidates, peak, settings.reference_mean.as_deref()).map(Metric::Measured),
                        }
                    };
                    (scored(analytic(&release, settings.min_bias_gradient)?)?, scored(analytic_differences(&release, settings.min_bias_gradient, settings.same_direction)?)?)
                }
            },
            _ => (Metric::absent(not_continuous.clone()), Metric::absent(not_continuous.clone())),
        };
        let optimisation = if continuous { Metric::absent("not run yet") } else { Metric::absent(not_continuous.clone()) };
        out.push(LayerAttacks { layer: layer.name.clone(), params: layer.numel(), analytic: a, analytic_differences: diff, optimisation, strongest: None });
    }
    let labels = label_recovery(ins, &per_layer, n)?;
    Ok(AttackSuite { n, dims, peak, seed: ins.seed(), step: ins.step(), layers: out, labels })
}

/// Label recovery on the last layer with a weight matrix and a bias, when the targets are
/// class ids it can output.
fn label_recovery(ins: &Inspection, grads: &[Vec<Tensor>], n: usize) -> Result<Metric<LabelRecovery>> {
    let targets = ins.batch().targets();
    if !matches!(targets.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
        return Ok(Metric::absent(format!("targets of dtype {:?} are not class ids: label recovery needs a classifier", targets.kind())));
    }
    let layers = ins.layers().layers();
    let Some((l, (_, b))) = layers.iter().enumerate().rev().find_map(|(l, layer)| linear_params(layer, None).ok().map(|p| (l, p))) else {
        return Ok(Metric::absent("no layer with a weight matrix and a bias: label recovery reads the output layer's bias gradient"));
    };
    let classes = layers[l].params[b].numel;
    let labels = to_f64_vec(targets)?;
    if let Some(&top) = labels.iter().find(|&&y| y < 0.0 || y >= classes as f64) {
        return Ok(Metric::absent(format!("label {top} is not an output of the last layer {} ({classes} outputs)", layers[l].name)));
    }
    let grad = &grads[l][b];
    if !grad.defined() {
        return Ok(Metric::absent(format!("the last layer {} is not used by the loss (gradient undefined)", layers[l].name)));
    }
    recover_labels(grad, n, Some(targets))
}
