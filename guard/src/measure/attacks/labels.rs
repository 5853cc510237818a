//! Label recovery from the last layer's bias gradient under a softmax cross-entropy loss
//! (Zhao et al. 2020, iDLG, for one sample; Wainakh et al. 2022 for batches and counts). With
//! p_i the softmax output of sample i and y_i its one-hot label, the batch-mean bias gradient
//! of the output layer is db = (1/n) sum_i (p_i - y_i): a class absent from the batch has
//! db_c = mean_i p_ic > 0, a present one db_c = mean_i p_ic - count_c / n, negative unless the
//! model already predicts it for the other samples about as often as it occurs.
//!
//! Every class with a negative entry is in the batch (a theorem of the softmax: the rule never
//! names an absent class), but a present class is missed when the model predicts it about as
//! often as it occurs: at a near-uniform prediction, whenever n / C exceeds its count (batches
//! larger than the number of classes).
//!
//! The count estimate (after Wainakh et al.'s) assumes near-uniform predictions, mean_i p_ic =
//! 1/C, as at initialisation: count_c = round(n (1/C - db_c)), at least 0, and at least 1 for a
//! class with a negative entry. The estimates then sum to n before rounding; a confident
//! model's estimates are off.
use crate::error::{GuardError, Result, TorchContext};
use crate::measure::tensors::to_f64_vec;
use crate::report::Metric;
use serde::{Deserialize, Serialize};
use tch::{Kind, Tensor};

/// How the recovered labels compare with the batch's true labels.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabelTruth {
    /// The classes present in the batch, ascending.
    pub present: Vec<i64>,
    /// Recovered classes that are present.
    pub correct: usize,
    /// Whether the recovered set is exactly the present set.
    pub set_exact: bool,
    /// sum over classes of |estimated count - true count| (a label outside the C classes
    /// counts 1).
    pub count_error: usize,
}

/// The labels recovered from one released batch.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq)]
pub struct LabelRecovery {
    /// Samples in the released batch.
    pub n: usize,
    /// Classes C (entries of the bias gradient).
    pub classes: usize,
    /// The classes with a negative bias gradient, ascending: in the batch for certain (the sign
    /// rule); present classes may be missing (see the module's documentation).
    pub recovered: Vec<i64>,
    /// The estimated count of every class (C entries, by class index).
    pub counts: Vec<usize>,
    /// The comparison with the true labels, when they were given.
    pub truth: Option<LabelTruth>,
}

/// Recovers the labels of a batch of `n` samples from the batch-mean gradient of the output
/// layer's bias under a softmax cross-entropy (the loss is assumed: the gradient does not say
/// which loss made it). `labels`, the true labels (integer class ids, one per sample), are
/// only used to fill [`LabelRecovery::truth`].
///
/// Absent, with the reason, for fewer than two classes, a non-finite gradient (never
/// released), or a gradient that is 0. Errors on n = 0, a bias gradient that is
/// not 1-D, or labels that are not n integers.
///
/// ```
/// use gradguard_guard::measure::attacks::recover_labels;
/// use tch::Tensor;
/// // Two samples of classes 1 and 3 under a uniform prediction over 4 classes.
/// let db = Tensor::from_slice(&[0.25f64, 0.25 - 0.5, 0.25, 0.25 - 0.5]);
/// let r = recover_labels(&db, 2, Some(&Tensor::from_slice(&[3i64, 1])))?;
/// let r = r.measured().unwrap();
/// assert_eq!((r.recovered.as_slice(), r.counts.as_slice()), ([1i64, 3].as_slice(), [0usize, 1, 0, 1].as_slice()));
/// assert!(r.truth.as_ref().unwrap().set_exact);
/// # Ok::<(), gradguard_guard::GuardError>(())
/// ```
pub fn recover_labels(grad_bias: &Tensor, n: usize, labels: Option<&Tensor>) -> Result<Metric<LabelRecovery>> {
    if n == 0 {
        return Err(GuardError::EmptyBatch);
    }
    if !grad_bias.defined() || grad_bias.dim() != 1 {
        return Err(GuardError::Config {
            setting: "label recovery",
            why: format!("the output layer's bias gradient must be 1-D, got shape {:?}", if grad_bias.defined() { grad_bias.size() } else { vec![] }),
        });
    }
    let truth_labels = match labels {
        None => None,
        Some(y) => {
            if !y.defined() || y.numel() != n {
                return Err(GuardError::BatchMismatch { what: "labels", inputs: n as i64, got: if y.defined() { y.numel() as i64 } else { 0 } });
            }
            if !matches!(y.kind(), Kind::Int64 | Kind::Int | Kind::Int16 | Kind::Int8 | Kind::Uint8) {
                return Err(GuardError::Config { setting: "label recovery", why: format!("labels must be integer class ids, got {:?}", y.kind()) });
            }
            Some(to_f64_vec(y)?.into_iter().map(|v| v as i64).collect::<Vec<_>>())
        }
    };
    let db = to_f64_vec(&grad_bias.f_detach().during("reading the bias gradient")?)?;
    let classes = db.len();
    if classes < 2 {
        return Ok(Metric::absent(format!("{classes} output(s): not a softmax classifier, no label to recover")));
    }
    if db.iter().any(|v| !v.is_finite()) {
        return Ok(Metric::absent("non-finite gradient: the guard never releases it, there is nothing to attack"));
    }
    let recovered: Vec<i64> = (0..classes).filter(|&c| db[c] < 0.0).map(|c| c as i64).collect();
    if db.iter().all(|v| *v == 0.0) {
        return Ok(Metric::absent("the output layer's bias gradient is 0: nothing to read the labels from"));
    }
    let uniform = 1.0 / classes as f64;
    let counts: Vec<usize> = (0..classes).map(|c| (n as f64 * (uniform - db[c])).round().max(if db[c] < 0.0 { 1.0 } else { 0.0 }) as usize).collect();
    let truth = truth_labels.map(|y| {
        let mut present = y.clone();
        present.sort_unstable();
        present.dedup();
        let correct = recovered.iter().filter(|c| present.contains(c)).count();
        let true_count = |c: i64| y.iter().filter(|&&v| v == c).count();
        let count_error = (0..classes).map(|c| true_count(c as i64).abs_diff(counts[c])).sum::<usize>()
            + y.iter().filter(|&&v| v < 0 || v >= classes as i64).count();
        LabelTruth { set_exact: present == recovered, present, correct, count_error }
    });
    Ok(Metric::Measured(LabelRecovery { n, classes, recovered, counts, truth }))
}
