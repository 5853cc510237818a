//! R_l, M3's fixed Gaussian projection of layer l (METRICS.md, M3): r x P_l entries N(0, 1/r),
//! row-major, drawn from a ChaCha8 stream of its own per (seed, layer), so every call projects
//! a layer alike. The stream is the one definition of R_l: the host matrix ([`projection`],
//! [`project`]) and the device matrix ([`device_projection`], M3's features on the model's
//! device) read the same values in the same order, the device one in chunks so that the host
//! never holds r x P_l values.
use crate::error::{GuardError, Result, TorchContext};
use super::logistic::dot;
use super::per_sample::GradientMatrix;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, StandardNormal};
use tch::{Device, Kind, Tensor};

/// Values of R_l drawn on the host per copy to the device (8 MiB of f64).
const CHUNK: usize = 1 << 20;

/// The entries of R_l in row-major order, drawn a chunk at a time.
struct ProjectionStream {
    rng: ChaCha8Rng,
    scale: f64,
    left: usize,
}

impl ProjectionStream {
    fn new(r: usize, p: usize, seed: u64, layer: usize) -> Self {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        rng.set_stream(0x4d33_0000_0000 + layer as u64);
        Self { rng, scale: 1.0 / (r as f64).sqrt(), left: r * p }
    }

    /// The next (at most `max`) entries into `buf` (cleared first); empty when R_l is done.
    fn next_chunk(&mut self, buf: &mut Vec<f64>, max: usize) {
        let take = max.min(self.left);
        self.left -= take;
        buf.clear();
        buf.extend((0..take).map(|_| {
            let v: f64 = StandardNormal.sample(&mut self.rng);
            self.scale * v
        }));
    }
}

/// R_l of layer `layer` as a host matrix: r x p entries, row-major.
pub(crate) fn projection(r: usize, p: usize, seed: u64, layer: usize) -> Vec<f64> {
    let mut out = Vec::new();
    ProjectionStream::new(r, p, seed, layer).next_chunk(&mut out, r * p);
    out
}

/// z_i = R_l g_l(i) for every row of `grads` (unstandardised): n rows of r features.
pub fn project(grads: &GradientMatrix, r: usize, seed: u64, layer: usize) -> Result<Vec<Vec<f64>>> {
    if let Some(bad) = grads.data.iter().position(|v| !v.is_finite()) {
        return Err(GuardError::Config {
            setting: "usable information gradients",
            why: format!("non-finite value in row {}, column {}", bad / grads.cols.max(1), bad % grads.cols.max(1)),
        });
    }
    let rmat = projection(r, grads.cols, seed, layer);
    Ok((0..grads.rows)
        .map(|i| {
            let g = grads.row(i);
            rmat.chunks(grads.cols.max(1)).take(r).map(|row| dot(row, g)).collect()
        })
        .collect())
}

/// The kind R_l is kept in on the device for a gradient of kind `gradient`: the gradient's own
/// for f32 and f64; f32 for the half-precision kinds, whose sums over P_l terms would keep
/// about three significant digits of each feature.
pub(crate) fn projection_kind(gradient: Kind) -> Kind {
    match gradient {
        Kind::Double => Kind::Double,
        _ => Kind::Float,
    }
}

/// R_l on `device` in `kind`: an r x p tensor holding [`projection`]'s values, filled a chunk
/// at a time (host memory O(chunk), not r x p).
pub(crate) fn device_projection(r: usize, p: usize, seed: u64, layer: usize, kind: Kind, device: Device) -> Result<Tensor> {
    let during = "building M3's projection on the model's device";
    let flat = Tensor::f_empty([(r * p) as i64], (kind, device)).during(during)?;
    let mut stream = ProjectionStream::new(r, p, seed, layer);
    let (mut buf, mut offset) = (Vec::with_capacity(CHUNK.min(r * p)), 0i64);
    loop {
        stream.next_chunk(&mut buf, CHUNK);
        if buf.is_empty() {
            break;
        }
        let chunk = Tensor::f_from_slice(&buf).and_then(|c| c.f_to_kind(kind)).during(during)?;
        flat.f_narrow(0, offset, buf.len() as i64).and_then(|mut dst| dst.f_copy_(&chunk)).during(during)?;
        offset += buf.len() as i64;
    }
    flat.f_reshape([r as i64, p as i64]).during(during)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_device_matrix_holds_the_host_values_across_chunk_boundaries() {
        // 3 x 400_000 = 1.2M values: two chunks, the boundary inside row 2.
        let (r, p) = (3, 400_000);
        let host = projection(r, p, 9, 2);
        let device = device_projection(r, p, 9, 2, Kind::Double, Device::Cpu).unwrap();
        assert_eq!(device.size(), vec![r as i64, p as i64]);
        assert_eq!(crate::measure::to_f64_vec(&device).unwrap(), host, "the same stream, bit for bit");
        assert_ne!(projection(r, p, 9, 3)[..8], host[..8], "each layer has its own stream");
    }
}
