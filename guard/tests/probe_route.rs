//! M1's route when the policy leaves `probe_samples` unset: the first estimate probes the full
//! batch, the second sub-batches of n / 4, and from the third on the guard keeps the route that
//! gives the full batch's standard error in less time (m = n / 4 with K' probes, or the full
//! batch with K); a model whose samples interact keeps the full batch; a policy's own
//! `probe_samples` is used as it is. Every M1 number reports the m and K it was measured with.
mod common;

use common::cross_entropy;
use gradguard_guard::{Batch, Guard, LayerMap, Policy, Settings};
use tch::{nn, nn::OptimizerConfig, Device, Kind, TchError, Tensor};

const N: i64 = 32;

/// fc0 (64 -> 256) -> [batch norm in training mode] -> relu -> fc1 (256 -> 10).
struct Net {
    fc0: nn::Linear,
    bn: Option<nn::BatchNorm>,
    fc1: nn::Linear,
}

impl Net {
    fn loss(&self, x: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        let mut h = x.f_linear(&self.fc0.ws, self.fc0.bs.as_ref())?;
        if let Some(bn) = &self.bn {
            h = h.f_batch_norm(bn.ws.as_ref(), bn.bs.as_ref(), Some(&bn.running_mean), Some(&bn.running_var), true, 0.1, 1e-5, false)?;
        }
        cross_entropy(&h.f_relu()?.f_linear(&self.fc1.ws, self.fc1.bs.as_ref())?, y)
    }
}

/// (m, K) of fc0's M1 in each of `steps` reports, estimating at every step under `settings`.
fn routes(batch_norm: bool, settings: Settings, steps: usize) -> Vec<(usize, usize)> {
    tch::manual_seed(3);
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    let net = Net {
        fc0: nn::linear(&root / "fc0", 64, 256, Default::default()),
        bn: batch_norm.then(|| nn::batch_norm1d(&root / "bn", 256, Default::default())),
        fc1: nn::linear(&root / "fc1", 256, 10, Default::default()),
    };
    let mut opt = nn::Sgd::default().build(&vs, 0.01).unwrap();
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).unwrap(), Policy::permissive_with(settings).unwrap()).unwrap();
    let x = Tensor::randn([N, 64], (Kind::Float, Device::Cpu));
    let y = Tensor::randint(10, [N], (Kind::Int64, Device::Cpu));
    let loss = |x: &Tensor, y: &Tensor| net.loss(x, y);
    (0..steps)
        .map(|_| {
            opt.zero_grad();
            let report = guard.train_step(&Batch::new(&x, &y), &loss).unwrap().into_report();
            opt.step();
            let m1 = report.layer("fc0").unwrap().sensitivity.measured().unwrap().clone();
            (m1.probe_samples.unwrap(), m1.probes.unwrap())
        })
        .collect()
}

fn every_step() -> Settings {
    Settings { estimate_every: 1, ..common::unbudgeted_with_cadences() }
}

#[test]
fn the_route_is_calibrated_on_the_model_then_kept() {
    let seen = routes(false, every_step(), 6);
    assert_eq!(seen[0], (32, 8), "the reference: the full batch with the policy's K");
    assert_eq!(seen[1], (8, 8), "the trial: sub-batches of n / 4 with the same K");
    // Then one route, whichever measured faster here: n / 4 with K' in [2, 4K], or the full batch.
    let settled = seen[2];
    assert!(settled == (32, 8) || (settled.0 == 8 && (2..=32).contains(&settled.1)), "{seen:?}");
    assert!(seen[2..].iter().all(|r| *r == settled), "the route stays: {seen:?}");
}

#[test]
fn a_model_whose_samples_interact_keeps_the_full_batch() {
    let seen = routes(true, every_step(), 4);
    assert_eq!(seen, vec![(32, 8); 4], "batch norm in training mode: the full batch at every estimate");
}

#[test]
fn the_policy_s_own_probe_samples_is_used_as_it_is() {
    let seen = routes(false, Settings { probe_samples: Some(16), probes: 6, ..every_step() }, 4);
    assert_eq!(seen, vec![(16, 6); 4]);
    let seen = routes(false, Settings { probe_samples: Some(32), ..every_step() }, 4);
    assert_eq!(seen, vec![(32, 8); 4], "probe_samples = n pins the full batch");
}
