//! The graph M1 differentiates: the loss at a [`Point`] (the inputs, or offsets on a split's
//! embeddings), its gradient G = dL/dW and the input gradient dL/dx, from one backward pass
//! with create_graph ([`GradientGraph`]). The step driver builds it as the training step's own
//! forward and backward ([`StepGraph`]), so that an estimate step runs the loss once.
use super::ext::set_grad;
use super::inspection::Inspection;
use super::layers::LayerMap;
use super::loss::{scalar_loss, EmbeddingSplit, LossFn};
use super::rng::RngSnapshot;
use super::sensitivity::JacobianSquares;
use super::tensors::to_f64_vec;
use crate::error::{GuardError, Result, TorchContext};
use crate::report::Representation;
use std::cell::RefCell;
use tch::{Kind, TchError, Tensor};

/// What M1 differentiates: the loss as a function of one tensor `at` (the detached inputs, or
/// zero offsets shaped like the embeddings), and the values that tensor stands for (the inputs,
/// or the embeddings), whose scale sets the central-difference step.
pub(super) struct Point<'a> {
    pub(super) at: Tensor,
    pub(super) values: Tensor,
    pub(super) loss: PointLoss<'a>,
    pub(super) representation: Representation,
}

/// The loss of a [`Point`]: the user's loss on the inputs, or the split's loss at
/// `embed(tokens) + offset` (the lookup re-run each time, so the embedding table stays in the
/// graph).
pub(super) enum PointLoss<'a> {
    Input(&'a dyn LossFn),
    Embedding { split: &'a dyn EmbeddingSplit, tokens: &'a Tensor },
}

impl LossFn for PointLoss<'_> {
    fn loss(&self, at: &Tensor, targets: &Tensor) -> std::result::Result<Tensor, TchError> {
        match self {
            Self::Input(loss) => loss.loss(at, targets),
            Self::Embedding { split, tokens } => split.loss_from_embedded(&split.embed(tokens)?.f_add(at)?, targets),
        }
    }
}

fn is_continuous(t: &Tensor) -> Result<bool> {
    Ok(t.f_is_floating_point().during("reading a dtype")? || t.f_is_complex().during("reading a dtype")?)
}

impl<'a> Point<'a> {
    /// The inspection's point: the split's embeddings when one is declared, else the inputs;
    /// [`GuardError::DiscreteInputs`] for integer inputs without a split.
    pub(super) fn of(ins: &Inspection<'a>, n: usize) -> Result<Self> {
        let inputs = ins.batch().inputs();
        let Some(split) = ins.embedding() else {
            if !is_continuous(inputs)? {
                return Err(GuardError::DiscreteInputs { kind: format!("{:?}", inputs.kind()) });
            }
            let at = inputs.f_detach().during("preparing inputs")?;
            return Ok(Self { values: at.shallow_clone(), at, loss: PointLoss::Input(ins.loss()), representation: Representation::Input });
        };
        let values = tch::no_grad(|| split.embed(inputs)).during("embedding the inputs (the split's embed)")?;
        if !values.defined() || values.dim() == 0 || values.size()[0] != n as i64 {
            let shape = if values.defined() { values.size() } else { vec![] };
            return Err(GuardError::Embedding(format!("shape {shape:?} for {n} samples")));
        }
        if !is_continuous(&values)? {
            return Err(GuardError::Embedding(format!("dtype {:?}", values.kind())));
        }
        let at = values.f_zeros_like().during("allocating embedding offsets")?;
        Ok(Self { at, values, loss: PointLoss::Embedding { split, tokens: inputs }, representation: Representation::Embedding })
    }
}

pub(super) fn used_layers(grads: &[Tensor], owner: &[usize], layer_count: usize) -> Vec<bool> {
    let mut used = vec![false; layer_count];
    for (g, &l) in grads.iter().zip(owner) {
        used[l] |= g.defined();
    }
    used
}

pub(super) fn leaf_inputs(inputs: &Tensor) -> Result<Tensor> {
    inputs
        .f_detach()
        .and_then(|x| x.f_set_requires_grad(true))
        .during("preparing inputs for differentiation")
}

/// The released gradient G = dL/dW and the input gradient g = dL/dx, both from one backward
/// pass with create_graph. Mixed second derivatives commute, so the JVP of G along v is
/// (J v)_W = d<g, v>/dW: one backward pass through g's graph per probe (a Hessian-vector
/// product's cost), where differentiating <J^T w, v> with respect to a dummy w (the same
/// quantity) would go through a graph of the graph.
pub(super) struct GradientGraph {
    pub(super) x: Tensor,
    pub(super) grads: Vec<Tensor>,
    /// g = dL/dx with its graph; None when no gradient moves with the inputs.
    input_grad: Option<Tensor>,
    params: Vec<Tensor>,
    pub(super) owner: Vec<usize>,
    pub(super) used: Vec<bool>,
    pub(super) grad_norms: Vec<f64>,
}

impl GradientGraph {
    pub(super) fn build(ins: &Inspection, point: &Point) -> Result<Self> {
        Ok(Self::build_checked(ins, point, true)?.0)
    }

    /// As [`GradientGraph::build`], with a non-finite loss let through (the step driver's
    /// graph is the training step's, whose non-finite gradient the guard blocks by name), and
    /// the loss (detached).
    pub(super) fn build_unchecked(ins: &Inspection, point: &Point) -> Result<(Self, Tensor)> {
        Self::build_checked(ins, point, false)
    }

    fn build_checked(ins: &Inspection, point: &Point, check_finite: bool) -> Result<(Self, Tensor)> {
        let layers = ins.layers();
        let (params, owner) = layers.flat_params();
        let x = leaf_inputs(&point.at)?;
        let loss = scalar_loss(&point.loss, &x, ins.batch().targets(), ins.step(), check_finite)?;
        let mut inputs: Vec<&Tensor> = params.iter().collect();
        inputs.push(&x);
        let mut grads = Tensor::f_run_backward(&[&loss], &inputs, true, true).during("building the gradient graph")?;
        let input_grad = grads.pop().filter(|g| g.defined() && g.requires_grad());
        let used = used_layers(&grads, &owner, layers.len());
        let grad_norms = layers.layer_square_sums(&to_f64_vec(&layers.param_norms(&grads)?)?).into_iter().map(f64::sqrt).collect();
        let loss = loss.f_detach().during("detaching the loss")?;
        Ok((Self { x, grads, input_grad, params, owner, used, grad_norms }, loss))
    }

    pub(super) fn squares(self, per_probe: Vec<Vec<f64>>, probe_samples: usize, cut: Vec<bool>) -> JacobianSquares {
        JacobianSquares { per_probe, grad_norms: self.grad_norms, used: self.used, probe_samples, cut }
    }

    /// dL/dx with its graph; None when no gradient moves with the inputs.
    pub(super) fn input_grad(&self) -> Option<&Tensor> {
        self.input_grad.as_ref()
    }

    /// d<g, v>/dW for a direction v shaped like x: J v, one tensor per parameter (undefined
    /// where the parameter's gradient does not move with the inputs).
    pub(super) fn jvp(&self, v: &Tensor) -> Result<Vec<Tensor>> {
        let Some(g) = &self.input_grad else { return Ok((0..self.params.len()).map(|_| Tensor::new()).collect()) };
        let t = g.f_mul(v).and_then(|p| p.f_sum(Kind::Double)).during("forming <dL/dx, v>")?;
        Tensor::f_run_backward(&[&t], &self.params, true, false).during("computing a JVP")
    }
}


/// The training step's forward and backward, built for M1 by the step driver
/// (`Guard::train_step`): G and dL/dx with their graph, on the step's batch. The step applies G (as
/// `.grad`); the estimate of the same step takes the graph once ([`Inspection::with_graph`])
/// instead of running the loss again.
pub struct StepGraph {
    graph: RefCell<Option<GradientGraph>>,
    grads: Vec<Tensor>,
    loss: f64,
}

impl StepGraph {
    /// Runs the loss forward and backward on the inspection's batch, with create_graph. The
    /// forward draws from libtorch's random stream and updates the buffers exactly as the
    /// training step's forward does (it is that forward). `Ok(None)` for integer inputs
    /// without an embedding split: M1 is absent and a plain backward serves the step.
    pub(crate) fn build(ins: &Inspection) -> Result<Option<Self>> {
        let n = ins.batch().validate()?;
        // The split's embed runs once more here to shape the offsets: it leaves the stream be.
        let random = RngSnapshot::take(ins.batch().inputs().device())?;
        let point = Point::of(ins, n);
        random.restore()?;
        let point = match point {
            Ok(point) => point,
            Err(GuardError::DiscreteInputs { .. }) => return Ok(None),
            Err(e) => return Err(e),
        };
        let (graph, loss) = GradientGraph::build_unchecked(ins, &point)?;
        let grads = graph
            .grads
            .iter()
            .map(|g| if g.defined() { g.f_detach_copy() } else { Ok(Tensor::new()) })
            .collect::<std::result::Result<Vec<_>, _>>()
            .during("copying the step's gradients")?;
        let loss = loss.f_double_value(&[]).during("reading the training loss")?;
        Ok(Some(Self { graph: RefCell::new(Some(graph)), grads, loss }))
    }

    /// The batch-mean training loss of the step.
    pub fn loss(&self) -> f64 {
        self.loss
    }

    /// Sets each parameter's `.grad` to the step's gradient (zeroed slots stay empty where the
    /// loss does not reach a parameter), as the training step's backward would have.
    pub(crate) fn write_grads(&self, layers: &LayerMap) -> Result<()> {
        let (params, _) = layers.flat_params();
        for (p, g) in params.iter().zip(&self.grads) {
            if g.defined() {
                set_grad(p, g)?;
            }
        }
        Ok(())
    }

    /// The graph, once: the estimator that measures M1 on this step's batch.
    pub(super) fn take(&self) -> Option<GradientGraph> {
        self.graph.borrow_mut().take()
    }
}

impl Inspection<'_> {
    /// The training step's plain backward: the loss forward on the batch and its gradient
    /// accumulated into `.grad()`, as an unguarded step computes it. Returns the loss.
    pub fn backward(&self) -> Result<f64> {
        let loss = scalar_loss(self.loss(), self.batch().inputs(), self.batch().targets(), self.step(), false)?;
        loss.f_backward().during("running backward on the training loss")?;
        loss.f_double_value(&[]).during("reading the training loss")
    }
}
