//! A ResNet-style CNN with batch norm, shared by examples/resnet.rs and
//! benches/real_models.rs (each includes this file with `#[path]`): a stem (3x3 conv-bn-relu),
//! stages of basic blocks (the first block of every stage after the first halves the
//! resolution and widens), global average pool, linear. `widths = [16, 32]` with one block a
//! stage is the example's model; `[64, 128, 256, 512]` with two is ResNet-18 (11M parameters
//! on 3x32x32 inputs).
#![allow(dead_code)]
use tch::{nn, Kind, TchError, Tensor};

/// A bias-free k x k convolution (its weight in the VarStore, created by `nn::conv2d`).
pub struct Conv {
    ws: Tensor,
    stride: i64,
    padding: i64,
}

pub fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64) -> Conv {
    let ws = nn::conv2d(p, c_in, c_out, k, nn::ConvConfig { stride, padding: k / 2, bias: false, ..Default::default() }).ws;
    Conv { ws, stride, padding: k / 2 }
}

impl Conv {
    pub fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv2d(&self.ws, None::<Tensor>, [self.stride; 2], [self.padding; 2], [1; 2], 1)
    }
}

/// Batch norm with `nn::batch_norm2d`'s defaults (momentum 0.1, eps 1e-5), in the fallible
/// form: in training mode on the batch's statistics, updating the running ones.
pub fn batch_norm(bn: &nn::BatchNorm, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
    x.f_batch_norm(bn.ws.as_ref(), bn.bs.as_ref(), Some(&bn.running_mean), Some(&bn.running_var), train, 0.1, 1e-5, true)
}

/// conv-bn-relu-conv-bn plus the shortcut (a strided 1x1 conv-bn where the shape changes).
pub struct Block {
    conv1: Conv,
    bn1: nn::BatchNorm,
    conv2: Conv,
    bn2: nn::BatchNorm,
    shortcut: Option<(Conv, nn::BatchNorm)>,
}

impl Block {
    pub fn new(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
        let shortcut = (stride != 1 || c_in != c_out)
            .then(|| (conv(&p / "down", c_in, c_out, 1, stride), nn::batch_norm2d(&p / "down_bn", c_out, Default::default())));
        Self {
            conv1: conv(&p / "conv1", c_in, c_out, 3, stride),
            bn1: nn::batch_norm2d(&p / "bn1", c_out, Default::default()),
            conv2: conv(&p / "conv2", c_out, c_out, 3, 1),
            bn2: nn::batch_norm2d(&p / "bn2", c_out, Default::default()),
            shortcut,
        }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let r = batch_norm(&self.bn1, &self.conv1.forward(x)?, train)?.f_relu()?;
        let r = batch_norm(&self.bn2, &self.conv2.forward(&r)?, train)?;
        let skip = match &self.shortcut {
            None => x.shallow_clone(),
            Some((down, bn)) => batch_norm(bn, &down.forward(x)?, train)?,
        };
        r.f_add(&skip)?.f_relu()
    }
}

/// Layers `stem`, `stem_bn`, `block1` ... `blockN` (in order), `fc`.
pub struct ResNet {
    stem: Conv,
    stem_bn: nn::BatchNorm,
    blocks: Vec<Block>,
    fc: nn::Linear,
}

impl ResNet {
    /// `widths[i]` channels in stage i, `blocks_per_stage` blocks each, `classes` outputs.
    pub fn new(p: &nn::Path, widths: &[i64], blocks_per_stage: usize, classes: i64) -> Self {
        // Created in the example's original order (stem, blocks, fc): the same seed gives the
        // same initial model.
        let stem = conv(p / "stem", 3, widths[0], 3, 1);
        let stem_bn = nn::batch_norm2d(p / "stem_bn", widths[0], Default::default());
        let mut blocks = Vec::new();
        let mut c_in = widths[0];
        for (stage, &w) in widths.iter().enumerate() {
            for b in 0..blocks_per_stage {
                let stride = if stage > 0 && b == 0 { 2 } else { 1 };
                blocks.push(Block::new(p / format!("block{}", blocks.len() + 1), c_in, w, stride));
                c_in = w;
            }
        }
        let fc = nn::linear(p / "fc", c_in, classes, Default::default());
        Self { stem, stem_bn, blocks, fc }
    }

    pub fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let mut h = batch_norm(&self.stem_bn, &self.stem.forward(x)?, train)?.f_relu()?;
        for block in &self.blocks {
            h = block.forward(&h, train)?;
        }
        h.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)?.f_linear(&self.fc.ws, self.fc.bs.as_ref())
    }

    /// The training loss (batch-norm training mode).
    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.forward(x, true)?.f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0)
    }
}
