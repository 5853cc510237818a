//! The models without cross-sample coupling that benches/real_models.rs runs beside the
//! batch-norm ResNets: a CNN without batch norm and an MLP, both on the 3x32x32 images.
use tch::{nn, Reduction, TchError, Tensor};

/// conv(3->32)-relu-pool, conv(32->64)-relu-pool, conv(64->128)-relu-pool, linear 2048->256,
/// relu, linear 256->10 (about 0.62M parameters); no batch norm, so M1's probes may run on
/// sub-batches.
pub struct PlainCnn {
    convs: Vec<nn::Conv2D>,
    fc1: nn::Linear,
    fc2: nn::Linear,
}

impl PlainCnn {
    pub fn new(p: &nn::Path, classes: i64) -> Self {
        let c = nn::ConvConfig { padding: 1, ..Default::default() };
        let convs = [(3, 32), (32, 64), (64, 128)].iter().enumerate().map(|(i, &(a, b))| nn::conv2d(p / format!("conv{i}"), a, b, 3, c)).collect();
        Self { convs, fc1: nn::linear(p / "fc1", 128 * 4 * 4, 256, Default::default()), fc2: nn::linear(p / "fc2", 256, classes, Default::default()) }
    }

    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let mut h = x.shallow_clone();
        for conv in &self.convs {
            h = h.f_conv2d(&conv.ws, conv.bs.as_ref(), [1, 1], [1, 1], [1, 1], 1)?.f_relu()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
        }
        let h = h.f_flatten(1, -1)?.f_linear(&self.fc1.ws, self.fc1.bs.as_ref())?.f_relu()?;
        h.f_linear(&self.fc2.ws, self.fc2.bs.as_ref())?.f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0)
    }
}

/// linear 3072->512, relu, 512->256, relu, 256->10 (about 1.71M parameters).
pub struct Mlp {
    layers: Vec<nn::Linear>,
}

impl Mlp {
    pub fn new(p: &nn::Path, classes: i64) -> Self {
        let dims = [3 * 32 * 32, 512, 256, classes];
        Self { layers: dims.windows(2).enumerate().map(|(i, d)| nn::linear(p / format!("fc{i}"), d[0], d[1], Default::default())).collect() }
    }

    pub fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let mut h = x.f_flatten(1, -1)?;
        for (i, layer) in self.layers.iter().enumerate() {
            h = h.f_linear(&layer.ws, layer.bs.as_ref())?;
            if i + 1 < self.layers.len() {
                h = h.f_relu()?;
            }
        }
        h.f_cross_entropy_loss::<Tensor>(y, None, Reduction::Mean, -100, 0.0)
    }
}
