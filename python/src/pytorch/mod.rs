//! The PyTorch front end: `gradguard.wrap(model, optimizer, loss_fn, ...)` (the Python side is
//! `gradguard/_torch.py`) builds a [`TorchGuard`], a third caller of the engine's one step
//! (`Guard::after_backward`, `Guard::train_step`, `Guard::release`) beside the tch loop and the
//! federated client. The model's parameters and buffers are the user's own tensors, unpacked
//! without a copy (`tensors`); the loss is the user's Python function called back from the
//! engine (`loss`); the report reaches Python as the engine's value, JSON only when read
//! (`report`); the policy is a file with optional settings laid over it (`policy`); errors
//! are typed Python exceptions (`errors`).
mod errors;
mod guard;
mod loss;
mod policy;
mod report;
mod tensors;

pub(crate) use guard::TorchGuard;
pub(crate) use report::StepReport;
