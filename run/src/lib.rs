//! gradguard's guarded training runs: the [`RunLoop`] around the guarded step (stop signals,
//! the policy reload, counting releases, closing the audit log, the summary), written once for
//! the demo, `gradguard train` and any loop that drives a run; [`train`], the run of
//! `gradguard train` on a TorchScript model and checked data; and the run page
//! ([`run_page`]) drawn from a run's report and audit log.
//!
//! ```
//! use gradguard_guard::measure::OwnedBatch;
//! use gradguard_run::{RunLoop, Stepper};
//! use gradguard_tch::GuardedOptimizer;
//! use tch::{nn, nn::Module, nn::OptimizerConfig, Device, Kind, Tensor};
//!
//! # fn main() -> Result<(), Box<dyn std::error::Error>> {
//! let vs = nn::VarStore::new(Device::Cpu);
//! let net = nn::linear(vs.root() / "fc", 16, 4, Default::default());
//! let loss = |x: &Tensor, y: &Tensor| net.forward(x).f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0);
//! let opt = GuardedOptimizer::builder(&vs, nn::Sgd::default().build(&vs, 0.1)?).loss(&loss).build()?;
//! let mut stepper = Stepper::Guarded(Box::new(opt));
//! let data = |_step| Ok(OwnedBatch::new(Tensor::randn([8, 16], (Kind::Float, Device::Cpu)), Tensor::zeros([8], (Kind::Int64, Device::Cpu))));
//! let outcome = RunLoop::default().run(&mut stepper, 10, data, |p| println!("step {}: loss {:.3}", p.step, p.loss))?;
//! assert_eq!(outcome.counts.released, 10); // no policy: every finite step is released
//! # Ok(()) }
//! ```
#![deny(missing_docs, unreachable_pub)]

pub mod run_page;

mod error;
mod reload;
mod run_loop;
mod stop;
mod summary;
mod train;

pub use error::{Result, RunError};
pub use reload::{PolicyReloader, ReloadOutcome};
pub use run_loop::{RunLoop, RunOutcome, StepProgress, Stepper};
pub use stop::StopSignal;
pub use summary::{GuardSummary, ReleaseCounts, RunSummary};
pub use train::{train, Evaluation, GuardOptions, OptimizerKind, PolicyInfo, TrainOptions, TrainOutcome, TrainReport};
