//! The digits data set (see data/README.md), embedded in the binary, with a private
//! attribute (stroke weight) for the subspace metrics.
use flate2::read::GzDecoder;
use std::io::Read;
use tch::{Device, Kind, Tensor};

const EMBEDDED: &[u8] = include_bytes!("../../data/digits.csv.gz");

/// Why the digits could not be read or batched.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// The file (or the embedded copy) could not be read or decompressed.
    #[error("cannot read digits data from {source_name}: {why}")]
    Read {
        /// The file, or "embedded digits.csv.gz".
        source_name: String,
        /// The I/O or gzip error.
        why: String,
    },
    /// A line is not 64 pixels in 0..16 and a label in 0..9.
    #[error("digits data {source_name}, line {line}: {why}")]
    Parse {
        /// The file, or "embedded digits.csv.gz".
        source_name: String,
        /// 1-based line number.
        line: usize,
        /// What is wrong with the line.
        why: String,
    },
    /// A libtorch error while building a batch.
    #[error("tensor error while building the digits batch: {0}")]
    Torch(#[from] tch::TchError),
}

/// 8x8 grey images scaled to [0, 1], digit labels, and the stroke-weight attribute.
#[derive(Debug, Clone)]
pub struct Digits {
    pixels: Vec<f32>,
    labels: Vec<i64>,
    heavy_stroke: Vec<i64>,
}

/// Image side in pixels (the images are SIDE x SIDE).
pub const SIDE: i64 = 8;
/// Digit classes (labels 0..CLASSES).
pub const CLASSES: i64 = 10;

impl Digits {
    /// The copy shipped inside the binary.
    pub fn embedded() -> Result<Self, DataError> {
        Self::from_gzip(EMBEDDED, "embedded digits.csv.gz")
    }

    /// Reads a gzip-compressed CSV of 64 pixel values (0..16) and a label per line.
    pub fn from_file(path: &std::path::Path) -> Result<Self, DataError> {
        let bytes = std::fs::read(path)
            .map_err(|e| DataError::Read { source_name: path.display().to_string(), why: e.to_string() })?;
        Self::from_gzip(&bytes, &path.display().to_string())
    }

    fn from_gzip(bytes: &[u8], source_name: &str) -> Result<Self, DataError> {
        let mut text = String::new();
        GzDecoder::new(bytes)
            .read_to_string(&mut text)
            .map_err(|e| DataError::Read { source_name: source_name.into(), why: e.to_string() })?;
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for (i, line) in text.lines().enumerate().filter(|(_, l)| !l.trim().is_empty()) {
            let err = |why: String| DataError::Parse { source_name: source_name.into(), line: i + 1, why };
            let values: Vec<i64> = line
                .split(',')
                .map(|v| v.trim().parse::<f64>().map(|f| f as i64))
                .collect::<Result<_, _>>()
                .map_err(|e| err(e.to_string()))?;
            if values.len() != 65 {
                return Err(err(format!("expected 65 values, found {}", values.len())));
            }
            if let Some(v) = values[..64].iter().find(|v| !(0..=16).contains(*v)) {
                return Err(err(format!("pixel {v} outside 0..16")));
            }
            if !(0..CLASSES).contains(&values[64]) {
                return Err(err(format!("label {} outside 0..9", values[64])));
            }
            pixels.extend(values[..64].iter().map(|&v| v as f32 / 16.0));
            labels.push(values[64]);
        }
        let heavy_stroke = stroke_weight(&pixels, &labels);
        Ok(Self { pixels, labels, heavy_stroke })
    }

    /// Number of samples.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    /// Whether there are no samples.
    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// The digit label of every sample.
    pub fn labels(&self) -> &[i64] {
        &self.labels
    }

    /// The private attribute of every sample: 1 for a heavy stroke, 0 otherwise.
    pub fn heavy_stroke(&self) -> &[i64] {
        &self.heavy_stroke
    }

    /// The samples at `indices` as (images [n, 1, 8, 8] f32, labels [n], attribute [n]).
    pub fn batch(&self, indices: &[usize], device: Device) -> Result<(Tensor, Tensor, Tensor), DataError> {
        let mut px = Vec::with_capacity(indices.len() * 64);
        let mut y = Vec::with_capacity(indices.len());
        let mut a = Vec::with_capacity(indices.len());
        for &i in indices {
            px.extend_from_slice(&self.pixels[i * 64..(i + 1) * 64]);
            y.push(self.labels[i]);
            a.push(self.heavy_stroke[i]);
        }
        let n = indices.len() as i64;
        let x = Tensor::f_from_slice(&px)?.f_reshape([n, 1, SIDE, SIDE])?.f_to_device(device)?;
        let y = Tensor::f_from_slice(&y)?.f_to_device(device)?;
        let a = Tensor::f_from_slice(&a)?.f_to_device(device)?;
        Ok((x, y, a))
    }

    /// A seeded train/test split of sample indices.
    pub fn split(&self, test_fraction: f64, seed: u64) -> (Vec<usize>, Vec<usize>) {
        use rand::{seq::SliceRandom, SeedableRng};
        let mut idx: Vec<usize> = (0..self.len()).collect();
        idx.shuffle(&mut rand_chacha::ChaCha8Rng::seed_from_u64(seed));
        let test = ((self.len() as f64) * test_fraction).round() as usize;
        let train = idx.split_off(test);
        (train, idx)
    }

    /// Classification accuracy of `logits_fn` on the samples at `indices`.
    pub fn accuracy(
        &self,
        indices: &[usize],
        device: Device,
        logits_fn: impl Fn(&Tensor) -> Result<Tensor, tch::TchError>,
    ) -> Result<f64, DataError> {
        let (x, y, _) = self.batch(indices, device)?;
        let logits = tch::no_grad(|| logits_fn(&x))?;
        let correct = logits.f_argmax(-1, false)?.f_eq_tensor(&y)?.f_to_kind(Kind::Double)?.f_mean(Kind::Double)?;
        Ok(correct.f_double_value(&[])?)
    }
}

/// 1 where an image's total ink exceeds the median of its digit class.
fn stroke_weight(pixels: &[f32], labels: &[i64]) -> Vec<i64> {
    let ink: Vec<f32> = pixels.chunks(64).map(|c| c.iter().sum()).collect();
    let mut medians = [0f32; CLASSES as usize];
    for (c, median) in medians.iter_mut().enumerate() {
        let mut v: Vec<f32> = ink.iter().zip(labels).filter(|(_, &l)| l == c as i64).map(|(i, _)| *i).collect();
        v.sort_by(|a, b| a.total_cmp(b));
        *median = if v.is_empty() { 0.0 } else { v[v.len() / 2] };
    }
    ink.iter().zip(labels).map(|(i, &l)| (*i > medians[l as usize]) as i64).collect()
}
