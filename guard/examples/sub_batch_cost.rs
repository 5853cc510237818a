//! What M1's sub-batch probes (METRICS.md, M1) cost and how precise they are, against the
//! full batch: an MLP and a small CNN on 28x28 inputs at batch 64, f32 on the CPU. For each
//! setting (m samples per probe, K probes), over `reps` seeds: the median wall time of one
//! estimate, and per layer the mean of S_l, the mean reported standard error and the spread of
//! S_l over the seeds (the standard error measured), both relative to the full batch with K = 8.
//!
//! `cargo run -p gradguard-guard --release --example sub_batch_cost -- [reps] [threads]`
//! (defaults 20 and 1).
use gradguard_guard::measure::{mean_and_standard_error, SensitivitySettings};
use gradguard_guard::{Batch, Inspection, LayerMap, Metric};
use std::time::Instant;
use tch::{nn, Device, Kind, TchError, Tensor};

/// The model under measurement: its loss, from inputs [64, 1, 28, 28].
type Loss = Box<dyn Fn(&Tensor, &Tensor) -> Result<Tensor, TchError>>;

fn cross_entropy(logits: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
    logits.f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0)
}

/// 784 -> 256 -> 128 -> 10, ReLU (235,146 parameters).
fn mlp(vs: &nn::VarStore) -> Loss {
    let root = vs.root();
    let fc = [(784, 256), (256, 128), (128, 10)].iter().enumerate().map(|(i, &(a, b))| nn::linear(&root / format!("fc{i}"), a, b, Default::default())).collect::<Vec<_>>();
    Box::new(move |x, y| {
        let mut h = x.f_flatten(1, -1)?;
        for (i, l) in fc.iter().enumerate() {
            h = h.f_linear(&l.ws, l.bs.as_ref())?;
            if i + 1 < fc.len() {
                h = h.f_relu()?;
            }
        }
        cross_entropy(&h, y)
    })
}

/// conv 1 -> 16 (3x3), ReLU, max-pool 2, conv 16 -> 32 (3x3), ReLU, max-pool 2, linear
/// 32*5*5 -> 10 (12,810 parameters).
fn cnn(vs: &nn::VarStore) -> Loss {
    let root = vs.root();
    let c1 = nn::conv2d(&root / "conv1", 1, 16, 3, Default::default());
    let c2 = nn::conv2d(&root / "conv2", 16, 32, 3, Default::default());
    let fc = nn::linear(&root / "fc", 32 * 5 * 5, 10, Default::default());
    Box::new(move |x, y| {
        let h = x.f_conv2d(&c1.ws, c1.bs.as_ref(), [1, 1], [0, 0], [1, 1], 1)?.f_relu()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
        let h = h.f_conv2d(&c2.ws, c2.bs.as_ref(), [1, 1], [0, 0], [1, 1], 1)?.f_relu()?.f_max_pool2d([2, 2], [2, 2], [0, 0], [1, 1], false)?;
        cross_entropy(&h.f_flatten(1, -1)?.f_linear(&fc.ws, fc.bs.as_ref())?, y)
    })
}

/// Per setting: median seconds, and per layer (S_l over the seeds, reported SEs).
#[derive(Default)]
struct Run {
    times: Vec<f64>,
    values: Vec<Vec<f64>>,
    reported_se: Vec<Vec<f64>>,
    probe_samples: Option<usize>,
}

impl Run {
    /// One estimate at `seed`, timed.
    fn add(&mut self, look: Inspection, settings: &SensitivitySettings, seed: u64) -> Result<(), Box<dyn std::error::Error>> {
        let started = Instant::now();
        let m1 = look.seeded(seed, 0).sensitivity(settings)?;
        self.times.push(started.elapsed().as_secs_f64());
        let measured: Vec<_> = m1.iter().map(Metric::measured).collect::<Option<_>>().ok_or("an absent M1")?;
        self.values.resize(measured.len(), vec![]);
        self.reported_se.resize(measured.len(), vec![]);
        for (l, s) in measured.iter().enumerate() {
            self.values[l].push(s.sensitivity);
            self.reported_se[l].push(s.sensitivity_se);
        }
        self.probe_samples = measured[0].probe_samples;
        Ok(())
    }

    fn median_seconds(&self) -> f64 {
        let mut times = self.times.clone();
        times.sort_by(f64::total_cmp);
        times[times.len() / 2]
    }
}

fn spread(values: &[f64]) -> f64 {
    let (_, se) = mean_and_standard_error(values);
    se * (values.len() as f64).sqrt()
}

fn mean(values: &[f64]) -> f64 {
    values.iter().sum::<f64>() / values.len() as f64
}

fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args: Vec<String> = std::env::args().collect();
    let reps: u64 = args.get(1).map(|a| a.parse()).transpose()?.unwrap_or(20);
    let threads: i32 = args.get(2).map(|a| a.parse()).transpose()?.unwrap_or(1);
    tch::set_num_threads(threads);
    let settings = |m: Option<usize>, k: usize| SensitivitySettings { probes: k, probe_samples: m, ..Default::default() };
    let grid = [(None, 8), (None, 2), (Some(32), 8), (Some(16), 8), (Some(8), 8), (Some(8), 2), (Some(16), 16), (Some(8), 16), (Some(8), 32)];
    println!("reps {reps}, {threads} thread(s), batch 64, f32, CPU; ratios against the full batch with K = 8");
    for (name, build) in [("mlp", mlp as fn(&nn::VarStore) -> Loss), ("cnn", cnn)] {
        tch::manual_seed(0);
        let vs = nn::VarStore::new(Device::Cpu);
        let loss = build(&vs);
        let layers = LayerMap::from_var_store(&vs)?;
        let x = Tensor::randn([64, 1, 28, 28], (Kind::Float, Device::Cpu));
        let y = Tensor::randint(10, [64], (Kind::Int64, Device::Cpu));
        let look = Inspection::new(&layers, &loss, Batch::new(&x, &y));
        // Settings take turns at each seed, so that a change in the machine's load falls on all.
        let mut runs: Vec<Run> = grid.iter().map(|_| Run::default()).collect();
        for (m, k) in grid {
            look.seeded(u64::MAX, 0).sensitivity(&settings(m, k))?; // warm-up
        }
        for seed in 0..reps {
            for (run, (m, k)) in runs.iter_mut().zip(grid) {
                run.add(look, &settings(m, k), seed)?;
            }
        }
        let base = &runs[0];
        println!("\n{name} ({} parameters), layers {:?}", layers.numel(), layers.names());
        println!("{:>5} {:>3} {:>9} {:>6} | per layer: mean S / full, reported SE / full, spread of S / full spread", "m", "K", "ms", "x time");
        for (r, (_, k)) in runs.iter().zip(grid) {
            let per_layer: Vec<String> = (0..r.values.len())
                .map(|l| {
                    let bias = mean(&r.values[l]) / mean(&base.values[l]);
                    let se = mean(&r.reported_se[l]) / mean(&base.reported_se[l]);
                    let sd = spread(&r.values[l]) / spread(&base.values[l]);
                    format!("{bias:.3} {se:.2} {sd:.2}")
                })
                .collect();
            let ms = 1e3 * r.median_seconds();
            println!("{:>5} {k:>3} {ms:>9.2} {:>6.3} | {}", r.probe_samples.map_or("-".into(), |m| m.to_string()), r.median_seconds() / base.median_seconds(), per_layer.join(" | "));
        }
    }
    Ok(())
}
