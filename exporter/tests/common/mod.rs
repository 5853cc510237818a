//! Shared helpers: a real guard report on a tiny model, and an exposition-format parser.
#![allow(dead_code)]
use gradguard_guard::{Batch, Guard, LayerMap, Policy, Report, Settings};
use std::collections::BTreeMap;
use tch::{nn, nn::Module, Device, Kind, Tensor};

pub const LAYERS: [&str; 2] = ["fc1", "fc2"];

/// Two guarded steps of a 2-layer MLP on random data with a binary attribute, estimating at
/// every step, inline (no worker: deterministic): real reports with M1, M2 and gradient statistics.
pub fn real_reports() -> Vec<Report> {
    let settings = Settings { estimate_every: 1, background_estimates: false, budget_share: 1.0, subspace_every_steps: 0, isolation_every_steps: 0, ..Default::default() };
    reports_under(Policy::permissive_with(settings).expect("valid settings"))
}

/// The same two guarded steps under `policy`.
pub fn reports_under(policy: Policy) -> Vec<Report> {
    tch::manual_seed(0);
    let vs = nn::VarStore::new(Device::Cpu);
    let fc1 = nn::linear(vs.root() / "fc1", 6, 8, Default::default());
    let fc2 = nn::linear(vs.root() / "fc2", 8, 3, Default::default());
    let loss_fn = |x: &Tensor, y: &Tensor| {
        fc2.forward(&fc1.forward(x).relu()).f_log_softmax(-1, None)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100)
    };
    let mut guard = Guard::new(LayerMap::from_var_store(&vs).expect("layers"), policy).expect("guard");
    assert_eq!(guard.layers().names(), LAYERS);
    let n = 48i64;
    let x = Tensor::randn([n, 6], (Kind::Float, Device::Cpu));
    let y = Tensor::from_slice(&(0..n).map(|i| i % 3).collect::<Vec<_>>());
    let a = Tensor::from_slice(&(0..n).map(|i| i % 2).collect::<Vec<_>>());
    let mut reports = Vec::new();
    for _ in 0..2 {
        for p in vs.trainable_variables() {
            let mut g = p.grad();
            if g.defined() {
                let _ = g.zero_();
            }
        }
        loss_fn(&x, &y).unwrap().backward();
        reports.push(guard.after_backward(&Batch::new(&x, &y).with_attribute(&a), &loss_fn).expect("guarded step").into_report());
    }
    reports
}

/// `series text -> value` for every sample line of a text exposition.
pub fn samples(text: &str) -> BTreeMap<String, f64> {
    text.lines()
        .filter(|l| !l.starts_with('#') && !l.trim().is_empty())
        .map(|l| {
            let (series, value) = l.rsplit_once(' ').unwrap_or_else(|| panic!("bad sample line {l:?}"));
            let value = match value {
                "NaN" => f64::NAN,
                "+Inf" => f64::INFINITY,
                "-Inf" => f64::NEG_INFINITY,
                v => v.parse().unwrap_or_else(|_| panic!("bad value in {l:?}")),
            };
            (series.to_string(), value)
        })
        .collect()
}

pub fn value(text: &str, series: &str) -> f64 {
    *samples(text).get(series).unwrap_or_else(|| panic!("series {series} not in exposition:\n{text}"))
}
