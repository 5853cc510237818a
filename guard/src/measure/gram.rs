//! M2's linear algebra from the Gram matrix of the chosen gradient columns (METRICS.md, M2).
//!
//! For a half's columns A (P x m_a) with A^T A = V diag(lambda) V^T, the rank-k orthonormal
//! basis is U_A = A V_k S_k^{-1} (S = sqrt(lambda)), kept as the m_a x k coefficients
//! V_k S_k^{-1}; and U_A^T U_B = S_A^{-1} V_A^T (A^T B) V_B S_B^{-1}. Every quantity M2 needs
//! therefore follows from the N x N Gram matrix of all chosen columns, accumulated in f64 on
//! the columns' device in row chunks (time linear in P, device memory O(chunk x N) beyond the
//! columns) and read to the host once; the host holds O(N^2).
//!
//! Precision: the Gram matrix squares the singular values, so directions whose singular value
//! is below [`resolved`]`(m, P)` of the top one (4 sqrt(m sqrt(P) eps): 2e-6 for m = 8 and
//! P = 1e6) are not resolved in it. The rank rule is orthonormal_basis's ([`rank_tolerance`]:
//! singular values at or below `top * eps * m` dropped, eigenvalues at or below its square) with
//! that floor added. The floor is the larger except for tiny layers (P < 16 m^2 in f32), so
//! directions between the two thresholds are dropped here and kept by the SVD.
//! Sums of squared sines are taken as k - ||U_A^T U_B||_F^2 (the cosine form): their absolute
//! error is a few f64 eps, so distances and angles are exact to about 1e-8 absolute.
use crate::error::{GuardError, Result, TorchContext};
use crate::measure::subspace::rank_tolerance;
use crate::measure::tensors::to_f64_vec;
use tch::{Kind, Tensor};

/// Entries of one row chunk of the stacked columns (32 MiB in f64).
const CHUNK_ENTRIES: i64 = 1 << 22;

/// The N x N Gram matrix C^T C of N columns, f64, row-major, on the host.
#[derive(Debug, Clone)]
pub(crate) struct Gram {
    n: usize,
    rows: usize,
    g: Vec<f64>,
}

impl Gram {
    fn at(&self, i: usize, j: usize) -> f64 {
        self.g[i * self.n + j]
    }
}

/// The Gram matrix of `columns` (tensors of P entries each, any shape, on one device),
/// accumulated in f64 on that device over row chunks; one host read.
pub(crate) fn gram(columns: &[Tensor]) -> Result<Gram> {
    let n = columns.len();
    let Some(first) = columns.first() else { return Ok(Gram { n: 0, rows: 0, g: Vec::new() }) };
    let p = first.numel() as i64;
    if let Some(bad) = columns.iter().position(|c| c.numel() as i64 != p) {
        return Err(GuardError::Config {
            setting: "gradient columns",
            why: format!("column {bad} has {} entries, column 0 has {p}", columns[bad].numel()),
        });
    }
    let flat = columns.iter().map(|c| c.f_reshape([-1])).collect::<std::result::Result<Vec<_>, _>>().during("flattening gradient columns")?;
    let mut acc = Tensor::f_zeros([n as i64, n as i64], (Kind::Double, first.device())).during("forming a Gram matrix")?;
    let chunk = (CHUNK_ENTRIES / n as i64).max(1);
    let mut start = 0;
    while start < p {
        let len = chunk.min(p - start);
        let parts = flat
            .iter()
            .map(|c| c.f_narrow(0, start, len).and_then(|c| c.f_to_kind(Kind::Double)))
            .collect::<std::result::Result<Vec<_>, _>>()
            .during("forming a Gram matrix")?;
        let block = Tensor::f_stack(&parts, 1).during("forming a Gram matrix")?;
        acc = acc.f_addmm(&block.f_transpose(0, 1).during("forming a Gram matrix")?, &block).during("forming a Gram matrix")?;
        start += len;
    }
    let g = to_f64_vec(&acc)?;
    Ok(Gram { n, rows: p as usize, g })
}

/// The orthonormal basis of some of the Gram's columns, as coefficients: U = C[:, idx] coeff.
#[derive(Debug, Clone)]
pub(crate) struct GramBasis {
    idx: Vec<usize>,
    /// idx.len() x k, row-major: V_k S_k^{-1}.
    coeff: Vec<f64>,
    k: usize,
}

impl GramBasis {
    /// k, the basis's rank.
    #[cfg(test)]
    pub(crate) fn rank(&self) -> usize {
        self.k
    }
}

fn host_matrix(values: &[f64], rows: usize, cols: usize) -> Result<Tensor> {
    Tensor::f_from_slice(values).and_then(|t| t.f_reshape([rows as i64, cols as i64])).during("forming a small host matrix")
}

/// Singular values (descending) and U (row-major, rows x min(rows, cols)) of a small host matrix.
fn small_svd(values: &[f64], rows: usize, cols: usize) -> Result<(Vec<f64>, Vec<f64>)> {
    // Legacy svd: linalg_svd fails on CPU through tch (see TCH-NOTES).
    let (u, s, _v) = host_matrix(values, rows, cols)?.f_svd(true, true).during("taking the SVD of a small matrix")?;
    Ok((to_f64_vec(&s)?, to_f64_vec(&u)?))
}

/// The smallest singular value, relative to the top one, that the Gram matrix of m columns
/// of P entries resolves: 4 sqrt(m sqrt(P) eps), from an eigenvalue error of about
/// m sqrt(P) eps lambda_top (each entry a dot product of P terms) with a margin of 16.
pub(crate) fn resolved(m: usize, p: usize) -> f64 {
    4.0 * (m as f64 * (p as f64).sqrt() * f64::EPSILON).sqrt()
}

/// The rank-k basis (k = min(rank, numerical rank), see the module's rule) of the columns
/// `idx` of the Gram matrix; None when every column is zero.
pub(crate) fn gram_basis(gram: &Gram, idx: &[usize], rank: usize, eps: f64) -> Result<Option<GramBasis>> {
    let m = idx.len();
    if m == 0 || idx.iter().any(|&i| i >= gram.n) {
        return Err(GuardError::Config { setting: "gradient columns", why: format!("columns {idx:?} of a Gram matrix of {}", gram.n) });
    }
    let block: Vec<f64> = idx.iter().flat_map(|&i| idx.iter().map(move |&j| (i, j))).map(|(i, j)| (gram.at(i, j) + gram.at(j, i)) / 2.0).collect();
    // A^T A is symmetric positive semi-definite: its SVD is its eigen-decomposition.
    let (lambda, v) = small_svd(&block, m, m)?;
    let top = lambda.first().copied().unwrap_or(0.0);
    if top <= 0.0 || !top.is_finite() {
        return Ok(None);
    }
    let sigma_top = top.sqrt();
    let tol = rank_tolerance(sigma_top, eps, m);
    let floor = sigma_top * resolved(m, gram.rows);
    let keep = tol.max(floor);
    let k = lambda.iter().take(rank).filter(|&&l| l > keep * keep).count();
    let mut coeff = vec![0.0; m * k];
    for r in 0..m {
        for c in 0..k {
            coeff[r * k + c] = v[r * m + c] / lambda[c].sqrt();
        }
    }
    Ok(Some(GramBasis { idx: idx.to_vec(), coeff, k }))
}

/// U_A^T U_B (a.k x b.k, row-major) from the Gram matrix.
fn cross(gram: &Gram, a: &GramBasis, b: &GramBasis) -> Vec<f64> {
    // (A^T B) V_B S_B^{-1}: m_a x k_b.
    let mut right = vec![0.0; a.idx.len() * b.k];
    for (r, &i) in a.idx.iter().enumerate() {
        for c in 0..b.k {
            right[r * b.k + c] = b.idx.iter().enumerate().map(|(s, &j)| gram.at(i, j) * b.coeff[s * b.k + c]).sum();
        }
    }
    let mut out = vec![0.0; a.k * b.k];
    for r in 0..a.k {
        for c in 0..b.k {
            out[r * b.k + c] = (0..a.idx.len()).map(|s| a.coeff[s * a.k + r] * right[s * b.k + c]).sum();
        }
    }
    out
}

/// d(A, B) = sqrt((1/k) sum_j sin^2 theta_j), k the smaller rank (1 when it is 0, as
/// `projection_distance`), with sum_j sin^2 theta_j = k - ||U_A^T U_B||_F^2.
pub(crate) fn gram_projection_distance(gram: &Gram, a: &GramBasis, b: &GramBasis) -> f64 {
    let k = a.k.min(b.k);
    if k == 0 {
        return 1.0;
    }
    let cos_sq: f64 = cross(gram, a, b).iter().map(|c| c * c).sum();
    ((k as f64 - cos_sq).max(0.0) / k as f64).sqrt().clamp(0.0, 1.0)
}

/// Principal angles (radians, ascending) between the two bases: acos of the singular values
/// of U_A^T U_B (absolute error about sqrt(f64::EPSILON) near zero, see the module). M2 itself
/// needs only the distance; this is for the tests that compare the two forms.
#[cfg(test)]
pub(crate) fn gram_principal_angles(gram: &Gram, a: &GramBasis, b: &GramBasis) -> Result<Vec<f64>> {
    if a.k.min(b.k) == 0 {
        return Ok(Vec::new());
    }
    let (cos, _) = small_svd(&cross(gram, a, b), a.k, b.k)?;
    Ok(cos.iter().map(|c| c.clamp(-1.0, 1.0).acos()).collect())
}

