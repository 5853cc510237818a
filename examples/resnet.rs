//! A small ResNet-style CNN with batch norm, trained under the guard (no policy: the guard
//! measures and releases what is finite), printing the per-layer table at every estimate.
//!
//!     cargo run --release --example resnet -- [steps] [estimate_every]
//!
//! The data is synthetic: 3x32x32 images, each the template of its class (one of 10 fixed
//! random patterns) plus Gaussian noise of the same scale. The private attribute is planted: a sample with
//! attribute 1 has its channel 0 brightened by 0.5, which the task does not need. M2 (the
//! subspace separation) measures how far the per-sample gradients of the two groups part.
//!
//! The model trains in batch-norm training mode (batch statistics). The guard's own passes
//! (M1's probes, M2's per-sample gradients) leave the running statistics as they were: the
//! run ends with the same model it would have ended with unguarded. M1 is the sensitivity of
//! the batch-mean gradient, batch coupling included; M2's per-sample gradients run each sample
//! alone, so batch norm normalises it by its own statistics.
use gradguard::{Batch, GuardedOptimizer, Settings};
use gradguard::guard::SubspaceSettings;
use tch::{nn, nn::OptimizerConfig, Device, Kind, TchError, Tensor};

const CLASSES: i64 = 10;
const BATCH: i64 = 32;

/// A bias-free k x k convolution (its weight in the VarStore, created by `nn::conv2d`).
struct Conv {
    ws: Tensor,
    stride: i64,
    padding: i64,
}

fn conv(p: nn::Path, c_in: i64, c_out: i64, k: i64, stride: i64) -> Conv {
    let ws = nn::conv2d(p, c_in, c_out, k, nn::ConvConfig { stride, padding: k / 2, bias: false, ..Default::default() }).ws;
    Conv { ws, stride, padding: k / 2 }
}

impl Conv {
    fn forward(&self, x: &Tensor) -> Result<Tensor, TchError> {
        x.f_conv2d(&self.ws, None::<Tensor>, [self.stride; 2], [self.padding; 2], [1; 2], 1)
    }
}

/// Batch norm with `nn::batch_norm2d`'s defaults (momentum 0.1, eps 1e-5), in the fallible
/// form: in training mode on the batch's statistics, updating the running ones.
fn batch_norm(bn: &nn::BatchNorm, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
    x.f_batch_norm(bn.ws.as_ref(), bn.bs.as_ref(), Some(&bn.running_mean), Some(&bn.running_var), train, 0.1, 1e-5, true)
}

/// conv-bn-relu-conv-bn plus the shortcut (a strided 1x1 conv-bn where the shape changes).
struct Block {
    conv1: Conv,
    bn1: nn::BatchNorm,
    conv2: Conv,
    bn2: nn::BatchNorm,
    shortcut: Option<(Conv, nn::BatchNorm)>,
}

impl Block {
    fn new(p: nn::Path, c_in: i64, c_out: i64, stride: i64) -> Self {
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

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let r = batch_norm(&self.bn1, &self.conv1.forward(x)?, train)?.f_relu()?;
        let r = batch_norm(&self.bn2, &self.conv2.forward(&r)?, train)?;
        let skip = match &self.shortcut {
            None => x.shallow_clone(),
            Some((down, bn)) => batch_norm(bn, &down.forward(x)?, train)?,
        };
        r.f_add(&skip)?.f_relu()
    }
}

/// stem (conv-bn-relu, 16 channels at 32x32), a block at 16 channels, a strided block to 32
/// channels at 16x16, global average pool, linear.
struct ResNet {
    stem: Conv,
    stem_bn: nn::BatchNorm,
    blocks: Vec<Block>,
    fc: nn::Linear,
}

impl ResNet {
    fn new(p: &nn::Path) -> Self {
        Self {
            stem: conv(p / "stem", 3, 16, 3, 1),
            stem_bn: nn::batch_norm2d(p / "stem_bn", 16, Default::default()),
            blocks: vec![Block::new(p / "block1", 16, 16, 1), Block::new(p / "block2", 16, 32, 2)],
            fc: nn::linear(p / "fc", 32, CLASSES, Default::default()),
        }
    }

    fn forward(&self, x: &Tensor, train: bool) -> Result<Tensor, TchError> {
        let mut h = batch_norm(&self.stem_bn, &self.stem.forward(x)?, train)?.f_relu()?;
        for block in &self.blocks {
            h = block.forward(&h, train)?;
        }
        h.f_mean_dim([2i64, 3].as_slice(), false, Kind::Float)?.f_linear(&self.fc.ws, self.fc.bs.as_ref())
    }

    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        self.forward(x, true)?.f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0)
    }
}

/// The synthetic data set: fixed class templates, noise, and the planted attribute.
struct Synthetic {
    templates: Tensor,
}

impl Synthetic {
    fn new() -> Result<Self, TchError> {
        Ok(Self { templates: Tensor::f_randn([CLASSES, 3, 32, 32], (Kind::Float, Device::Cpu))? })
    }

    /// A batch: images, classes and the attribute (half the batch each, shuffled).
    fn batch(&self) -> Result<(Tensor, Tensor, Tensor), TchError> {
        let y = Tensor::f_randint(CLASSES, [BATCH], (Kind::Int64, Device::Cpu))?;
        let a = Tensor::f_arange(BATCH, (Kind::Int64, Device::Cpu))?.f_remainder(2)?.f_index_select(0, &Tensor::f_randperm(BATCH, (Kind::Int64, Device::Cpu))?)?;
        let noise = Tensor::f_randn([BATCH, 3, 32, 32], (Kind::Float, Device::Cpu))?;
        let x = self.templates.f_index_select(0, &y)?.f_add(&noise)?;
        // Attribute 1: channel 0 brightened by 0.5.
        let offset = a.f_to_kind(Kind::Float)?.f_mul_scalar(0.5)?.f_view([BATCH, 1, 1])?;
        let _ = x.f_select(1, 0)?.f_add_(&offset)?;
        Ok((x, y, a))
    }
}

fn main() -> anyhow::Result<()> {
    let args: Vec<u64> = std::env::args().skip(1).map(|a| a.parse()).collect::<Result<_, _>>()?;
    let steps = args.first().copied().unwrap_or(200);
    let estimate_every = args.get(1).copied().unwrap_or(50);
    tch::manual_seed(0);
    let data = Synthetic::new()?;
    let vs = nn::VarStore::new(Device::Cpu);
    let net = ResNet::new(&vs.root());
    let loss_fn = |x: &Tensor, y: &Tensor| net.loss(x, y);
    let settings = Settings {
        estimate_every,
        budget_share: 1.0,          // estimate every `estimate_every` steps, whatever it costs
        background_estimates: false, // M2 inline: the table shows this step's numbers
        subspace: SubspaceSettings { samples_per_group: 8, ..Default::default() },
        ..Default::default()
    };
    let sgd = nn::Sgd { momentum: 0.9, ..Default::default() }.build(&vs, 0.05)?;
    let mut opt = GuardedOptimizer::builder(&vs, sgd).settings(settings).loss(loss_fn).build()?;
    let clock = std::time::Instant::now();
    for _ in 0..steps {
        let (x, y, a) = data.batch()?;
        let loss = loss_fn(&x, &y)?;
        let release = opt.backward_step(&loss, &Batch::new(&x, &y).with_attribute(&a))?;
        let report = release.report();
        if report.estimated {
            println!("loss {:.3}, estimate {:.2} s", loss.f_double_value(&[])?, report.estimate_seconds.unwrap_or(0.0));
            println!("{}", report.table());
        }
    }
    let (x, y, _) = data.batch()?;
    let accuracy = tch::no_grad(|| net.forward(&x, false))?.f_argmax(-1, false)?.f_eq_tensor(&y)?.f_to_kind(Kind::Float)?.f_mean(Kind::Float)?;
    println!("{steps} steps in {:.1} s; accuracy on a fresh batch (running statistics) {:.2}", clock.elapsed().as_secs_f64(), accuracy.f_double_value(&[])?);
    Ok(())
}
