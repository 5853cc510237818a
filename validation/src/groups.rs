//! Releases built from per-sample gradients by attribute group: the group-pure micro-batches
//! of the latent comparisons.
use gradguard_audit::Result;
use gradguard_audit::estimate::{projected, subspace_of_columns, usable_on_features};
use gradguard_guard::measure::GradientMatrix;
use rand::{seq::IndexedRandom, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Releases per attribute value for M2 on release columns.
pub(super) const M2_COLUMNS: usize = 16;
/// Rank of the M2 subspaces on release columns.
pub(super) const M2_RANK: usize = 4;

/// M2 and M3 of one layer on group-pure micro-batch releases.
#[derive(Clone, Copy, Default)]
pub(super) struct MicroLatent {
    pub d_between: Option<f64>,
    pub separation: Option<f64>,
    pub bits: Option<f64>,
    /// Standard error of `bits` over M3's seeded splits.
    pub bits_se: Option<f64>,
    pub accuracy: Option<f64>,
}

/// The sample indices of each attribute value, values in increasing order.
pub(super) fn indices_by_group(attribute: &[i64]) -> Vec<Vec<usize>> {
    let mut values: Vec<i64> = attribute.to_vec();
    values.sort_unstable();
    values.dedup();
    values.iter().map(|v| attribute.iter().enumerate().filter(|(_, a)| *a == v).map(|(i, _)| i).collect()).collect()
}

/// `n` distinct members of `group`, drawn with `rng`.
pub(super) fn draw(group: &[usize], n: usize, rng: &mut ChaCha8Rng) -> Vec<usize> {
    group.choose_multiple(rng, n.min(group.len())).copied().collect()
}

/// M2's release columns: per group, [`M2_COLUMNS`] releases, each the `mean` of `n` members.
pub(super) fn group_columns(groups: &[Vec<usize>], n: usize, rng: &mut ChaCha8Rng, mean: impl Fn(&[usize]) -> Vec<f64>) -> Vec<Vec<Vec<f64>>> {
    groups.iter().map(|idx| (0..M2_COLUMNS).map(|_| mean(&draw(idx, n, rng))).collect()).collect()
}

/// `releases` group-pure releases balanced over the groups (release k from group k mod G),
/// each the `mean` of `n` members.
pub(super) fn group_releases(groups: &[Vec<usize>], n: usize, releases: usize, rng: &mut ChaCha8Rng, mean: impl Fn(&[usize]) -> Vec<f64>) -> Vec<Vec<f64>> {
    (0..releases).map(|k| mean(&draw(&groups[k % groups.len()], n, rng))).collect()
}

/// The attribute value of each release of [`group_releases`].
pub(super) fn group_labels(groups: &[Vec<usize>], attribute: &[i64], releases: usize) -> Vec<i64> {
    (0..releases).map(|k| attribute[groups[k % groups.len()][0]]).collect()
}

/// The mean of the rows `members` of `z`.
pub(super) fn mean_rows(z: &[Vec<f64>], members: &[usize]) -> Vec<f64> {
    let mut out = vec![0.0; z[0].len()];
    for &i in members {
        out.iter_mut().zip(&z[i]).for_each(|(o, v)| *o += v);
    }
    out.iter_mut().for_each(|o| *o /= members.len() as f64);
    out
}

/// M2 ([`M2_COLUMNS`] releases per attribute value) and M3 (`releases` releases, balanced) of
/// every layer when each release is the mean gradient of `n` samples that share the attribute
/// value.
pub(super) fn micro_latent(grads: &[Option<GradientMatrix>], attribute: &[i64], n: usize, releases: usize, seed: u64) -> Result<Vec<MicroLatent>> {
    let groups = indices_by_group(attribute);
    let labels = group_labels(&groups, attribute, releases);
    let mut out = Vec::new();
    for (l, g) in grads.iter().enumerate() {
        let Some(g) = g else {
            out.push(MicroLatent::default());
            continue;
        };
        let mut rng = ChaCha8Rng::seed_from_u64(seed ^ 0x6d62 ^ ((l as u64) << 32));
        let m2 = subspace_of_columns(&group_columns(&groups, n, &mut rng, |m| g.mean_of_rows(m)), M2_RANK)?;
        let z = projected(g, seed, l)?;
        let m3 = usable_on_features(&group_releases(&groups, n, releases, &mut rng, |m| mean_rows(&z, m)), &labels, seed)?;
        out.push(MicroLatent {
            d_between: m2.map(|m| m.0),
            separation: m2.map(|m| m.1),
            bits: m3.as_ref().map(|m| m.usable_information_bits),
            bits_se: m3.as_ref().map(|m| m.usable_information_se),
            accuracy: m3.as_ref().map(|m| m.attack_accuracy),
        });
    }
    Ok(out)
}
