//! One guarded training step of the digits CNN, shared by the integration tests: zero the
//! gradients, backward on the samples `idx`, then the guard's in-place decision.
use gradguard::data::Digits;
use gradguard::guard::Release;
use gradguard::models::DigitsCnn;
use gradguard::{Batch, Guard, GuardError};
use tch::{nn, Device, Tensor};

/// The release of one step on samples `idx`, with the step's inputs and targets.
pub fn digits_step(vs: &nn::VarStore, net: &DigitsCnn, digits: &Digits, guard: &mut Guard, idx: &[usize]) -> (Result<Release, GuardError>, Tensor, Tensor) {
    let (x, y, a) = digits.batch(idx, Device::Cpu).unwrap();
    for p in vs.trainable_variables() {
        let mut g = p.grad();
        if g.defined() {
            let _ = g.zero_();
        }
    }
    net.f_loss(&x, &y).unwrap().backward();
    let loss = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
    (guard.after_backward(&Batch::new(&x, &y).with_attribute(&a), &loss), x, y)
}
