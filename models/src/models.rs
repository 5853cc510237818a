//! The example models: a small CNN for the 8x8 digits and an MLP of configurable depth. Both
//! forward through tch's fallible `f_*` ops, so a wrong input shape is an error, not a panic.
use tch::{nn, TchError, Tensor};

/// Widths of the built-in `mlp` (`gradguard audit --model mlp`).
pub const MLP_WIDTHS: [i64; 4] = [64, 128, 64, 10];

/// conv1 (1->8, 3x3) -> relu -> conv2 (8->16, 3x3) -> relu -> maxpool 2 -> fc1 (256->64) -> relu
/// -> fc2 (64->10). Layers `conv1`, `conv2`, `fc1`, `fc2`: feature extractor, then the
/// fully-connected head.
#[derive(Debug)]
pub struct DigitsCnn {
    conv1: nn::Conv2D,
    conv2: nn::Conv2D,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl DigitsCnn {
    /// Creates the layers under `p` (tch's default initialisation, from libtorch's global RNG).
    pub fn new(p: &nn::Path) -> Self {
        let conv = nn::ConvConfig { padding: 1, ..Default::default() };
        Self {
            conv1: nn::conv2d(p / "conv1", 1, 8, 3, conv),
            conv2: nn::conv2d(p / "conv2", 8, 16, 3, conv),
            fc1: nn::linear(p / "fc1", 16 * 4 * 4, 64, Default::default()),
            fc2: nn::linear(p / "fc2", 64, 10, Default::default()),
        }
    }

    /// Logits for images [n, 1, 8, 8].
    pub fn f_forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let x = conv(&self.conv1, x)?.f_relu()?;
        let x = conv(&self.conv2, &x)?.f_relu()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
        let x = x.f_flatten(1, -1)?;
        let x = linear(&self.fc1, &x)?.f_relu()?;
        linear(&self.fc2, &x)
    }

    /// Mean cross-entropy of the batch: the loss the guard recomputes.
    pub fn f_loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.f_forward(x)?.f_log_softmax(-1, None)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100)
    }
}

/// A ReLU MLP on flattened inputs with layers `fc0`, `fc1`, ...
#[derive(Debug)]
pub struct Mlp {
    layers: Vec<nn::Linear>,
}

impl Mlp {
    /// `widths` = [input, hidden..., output].
    pub fn new(p: &nn::Path, widths: &[i64]) -> Self {
        let layers = widths
            .windows(2)
            .enumerate()
            .map(|(i, w)| nn::linear(p / format!("fc{i}"), w[0], w[1], Default::default()))
            .collect();
        Self { layers }
    }

    /// Logits for inputs [n, ...] (flattened to [n, widths[0]]).
    pub fn f_forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        let mut h = x.f_flatten(1, -1)?;
        for (i, layer) in self.layers.iter().enumerate() {
            h = linear(layer, &h)?;
            if i + 1 < self.layers.len() {
                h = h.f_relu()?;
            }
        }
        Ok(h)
    }

    /// Mean cross-entropy of the batch against class ids `y`.
    pub fn f_loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.f_forward(x)?.f_log_softmax(-1, None)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100)
    }
}

fn conv(c: &nn::Conv2D, x: &Tensor) -> Result<Tensor, TchError> {
    x.f_conv2d(&c.ws, c.bs.as_ref(), [1, 1], [1, 1], [1, 1], 1)
}

fn linear(l: &nn::Linear, x: &Tensor) -> Result<Tensor, TchError> {
    x.f_linear(&l.ws, l.bs.as_ref())
}
