//! M2 results for the closed loop, computed off the training thread: the raw subspace metrics
//! of every layer, and the separation of each release chain the policy may need (every rung of
//! each subspace rule's ladder around the level in force). The decision looks a chain up; a
//! chain that was not computed is not measurable, and the guard fails closed on it.
use crate::error::Result;
use crate::report::{Metric, Subspace};
use crate::measure::subspace::SubspaceSamples;
use gradguard_defenses::{apply_all, Defence};
use std::collections::HashMap;

/// The key of a chain: its defences as the manifest prints them.
pub(crate) fn chain_key(chain: &[Defence]) -> String {
    chain.iter().map(|d| d.to_string()).collect::<Vec<_>>().join(" -> ")
}

/// M2 for one estimate.
#[derive(Debug, Clone)]
pub struct LatentTable {
    pub step: u64,
    /// Why M2 could not be computed at all (no attribute labels, too few samples).
    pub unavailable: Option<String>,
    /// The raw metric of every layer, for the report.
    pub raw: Vec<Metric<Subspace>>,
    separation: HashMap<(usize, String), std::result::Result<f64, String>>,
}

impl LatentTable {
    pub fn unavailable(step: u64, layers: usize, reason: String) -> Self {
        Self { step, raw: (0..layers).map(|_| Metric::absent(reason.clone())).collect(), unavailable: Some(reason), separation: HashMap::new() }
    }

    /// Computes the raw metrics and the separation of every requested (layer, chain).
    pub fn compute(samples: &SubspaceSamples, layers: usize, requests: &[(usize, Vec<Defence>)]) -> Result<Self> {
        let raw = (0..layers).map(|l| samples.layer_metric(l, None)).collect::<Result<Vec<_>>>()?;
        let mut separation = HashMap::new();
        for (l, chain) in requests {
            let key = (*l, chain_key(chain));
            if separation.contains_key(&key) || chain.iter().any(|d| matches!(d, Defence::Withhold)) {
                continue;
            }
            let metric = if chain.is_empty() {
                raw[*l].clone()
            } else {
                let column = |col: &tch::Tensor, seed: u64| -> Result<tch::Tensor> {
                    Ok(apply_all(chain, col, seed)?.expect("chains with withhold are skipped"))
                };
                samples.layer_metric(*l, Some(&column))?
            };
            let value = match metric {
                Metric::Measured(m) => Ok(m.subspace_separation),
                Metric::Absent { reason } => Err(reason),
            };
            separation.insert(key, value);
        }
        Ok(Self { step: samples.step(), unavailable: None, raw, separation })
    }

    /// The separation of layer `l` released through `chain`.
    pub fn separation(&self, l: usize, chain: &[Defence]) -> std::result::Result<f64, String> {
        if let Some(reason) = &self.unavailable {
            return Err(reason.clone());
        }
        self.separation
            .get(&(l, chain_key(chain)))
            .cloned()
            .unwrap_or_else(|| Err(format!("not measured for the chain [{}] at the estimate of step {}", chain_key(chain), self.step)))
    }
}
