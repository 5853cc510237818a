//! The shipped digits, dealt into non-IID partitions: the demonstration data of a client.
use crate::errors::{guarded, FlError, FlResult};
use gradguard_models::data::{Digits, CLASSES};
use pyo3::prelude::*;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::OnceLock;

/// The digits data set, parsed once per process.
pub(crate) fn digits() -> FlResult<&'static Digits> {
    static DIGITS: OnceLock<Result<Digits, String>> = OnceLock::new();
    DIGITS.get_or_init(|| Digits::embedded().map_err(|e| e.to_string())).as_ref().map_err(|e| FlError::Data(e.clone()))
}
// ---------------------------------------------------------------------------------------------
// The client's data partition

/// A client's share of the digits data: non-IID by label. The seeded 80/20 train/test split of
/// the whole data set is the same for every client and the server (the server evaluates on the
/// whole test part: held-out digits no client trains on). Each sample of digit `c` goes to
/// partition `c mod num_partitions` with probability `label_skew`, else to a partition drawn
/// uniformly: `label_skew = 0` is IID, `1` gives each partition only its own digits.
#[pyclass(frozen, module = "gradguard.fl")]
#[derive(Debug, Clone)]
pub(crate) struct Partition {
    #[pyo3(get)]
    pub(crate) partition_id: usize,
    #[pyo3(get)]
    pub(crate) num_partitions: usize,
    #[pyo3(get)]
    label_skew: f64,
    #[pyo3(get)]
    seed: u64,
    #[pyo3(get)]
    test_fraction: f64,
    pub(crate) train: Vec<usize>,
    pub(crate) test: Vec<usize>,
}

fn assign(indices: &[usize], labels: &[i64], parts: usize, skew: f64, rng: &mut ChaCha8Rng, wanted: usize) -> Vec<usize> {
    let mut sorted = indices.to_vec();
    sorted.sort_unstable();
    let mut out = Vec::new();
    for i in sorted {
        let to = if rng.random::<f64>() < skew { labels[i] as usize % parts } else { rng.random_range(0..parts) };
        if to == wanted {
            out.push(i);
        }
    }
    out
}

impl Partition {
    pub(crate) fn build(partition_id: i64, num_partitions: i64, label_skew: f64, seed: i64, test_fraction: f64) -> FlResult<Self> {
        if num_partitions < 1 {
            return Err(FlError::Data(format!("num_partitions must be at least 1, got {num_partitions}")));
        }
        if partition_id < 0 || partition_id >= num_partitions {
            return Err(FlError::Data(format!("partition_id must be in 0..{num_partitions}, got {partition_id}")));
        }
        if !(0.0..=1.0).contains(&label_skew) {
            return Err(FlError::Data(format!("label_skew must be in [0, 1], got {label_skew}")));
        }
        if seed < 0 {
            return Err(FlError::Data(format!("seed must be >= 0, got {seed}")));
        }
        if !(test_fraction > 0.0 && test_fraction < 1.0) {
            return Err(FlError::Data(format!("test_fraction must be in (0, 1), got {test_fraction}")));
        }
        let data = digits()?;
        let (train_all, test_all) = data.split(test_fraction, seed as u64);
        let parts = num_partitions as usize;
        let id = partition_id as usize;
        let mut rng = ChaCha8Rng::seed_from_u64(seed as u64 ^ 0x9a77_17e0_0000_0001);
        let train = assign(&train_all, data.labels(), parts, label_skew, &mut rng, id);
        let mut rng = ChaCha8Rng::seed_from_u64(seed as u64 ^ 0x9a77_17e0_0000_0002);
        let test = assign(&test_all, data.labels(), parts, label_skew, &mut rng, id);
        Ok(Self { partition_id: id, num_partitions: parts, label_skew, seed: seed as u64, test_fraction, train, test })
    }

    fn counts(indices: &[usize]) -> FlResult<Vec<usize>> {
        let labels = digits()?.labels();
        let mut c = vec![0; CLASSES as usize];
        for &i in indices {
            c[labels[i] as usize] += 1;
        }
        Ok(c)
    }
}

#[pymethods]
impl Partition {
    #[new]
    #[pyo3(signature = (partition_id, num_partitions, label_skew = 0.8, seed = 0, test_fraction = 0.2))]
    fn new(py: Python<'_>, partition_id: i64, num_partitions: i64, label_skew: f64, seed: i64, test_fraction: f64) -> PyResult<Self> {
        guarded(py, "building the partition", || Partition::build(partition_id, num_partitions, label_skew, seed, test_fraction))
    }

    /// Training samples in this partition (may be 0: training on it is then a DataError).
    #[getter]
    fn num_train(&self) -> usize {
        self.train.len()
    }

    /// Held-out samples with this partition's label mix (client-side evaluation).
    #[getter]
    fn num_test(&self) -> usize {
        self.test.len()
    }

    /// Training samples per digit 0..9.
    fn label_counts(&self, py: Python<'_>) -> PyResult<Vec<usize>> {
        guarded(py, "counting labels", || Partition::counts(&self.train))
    }

    fn __repr__(&self) -> String {
        format!(
            "Partition(partition_id={}, num_partitions={}, label_skew={}, seed={}, num_train={}, num_test={})",
            self.partition_id,
            self.num_partitions,
            self.label_skew,
            self.seed,
            self.train.len(),
            self.test.len()
        )
    }
}

