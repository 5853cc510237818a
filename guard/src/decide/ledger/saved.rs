//! The ledger as a guard's saved state carries it (`GuardState::ledger`): the sums of every
//! sample's Fisher information and the counts, so a run that continues in another process (a
//! federated client's next round) goes on accumulating. Unbounded sums (+Inf) are written as
//! null, and anything non-finite read back is unbounded (fail closed).
use super::{RunLedger, Sums};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

/// A ledger's saved form.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct LedgerState {
    /// What every sample received from releases without sample ids.
    pub base: SavedSums,
    /// What each identified sample received on top of `base`.
    pub per_sample: BTreeMap<i64, SavedSums>,
    /// Releases committed.
    pub releases: u64,
    /// Releases the cap blocked or cut.
    pub capped: u64,
    /// The prior variance v of the latest bounded release.
    pub prior_variance: f64,
}

/// Cumulative dFIL per layer and for the whole release; None: unbounded.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SavedSums {
    /// Per layer, in the layer map's order.
    pub layers: Vec<Option<f64>>,
    /// The whole release.
    pub release: Option<f64>,
}

fn save(s: &Sums) -> SavedSums {
    let finite = |v: f64| v.is_finite().then_some(v);
    SavedSums { layers: s.layers.iter().map(|&v| finite(v)).collect(), release: finite(s.release) }
}

fn load(s: &SavedSums, layers: usize) -> Result<Sums, String> {
    if s.layers.len() != layers {
        return Err(format!("the saved ledger has {} layers, the model {layers}", s.layers.len()));
    }
    let value = |v: Option<f64>| match v {
        Some(v) if v.is_finite() && v >= 0.0 => Ok(v),
        Some(v) if v < 0.0 => Err(format!("the saved ledger holds a negative sum {v}")),
        _ => Ok(f64::INFINITY),
    };
    Ok(Sums { layers: s.layers.iter().map(|&v| value(v)).collect::<Result<_, _>>()?, release: value(s.release)? })
}

impl RunLedger {
    /// The ledger's saved form (what a staged, uncommitted release would add is not in it).
    pub fn saved(&self) -> LedgerState {
        LedgerState {
            base: save(&self.base),
            per_sample: self.per_sample.iter().map(|(&id, s)| (id, save(s))).collect(),
            releases: self.releases,
            capped: self.capped,
            prior_variance: self.prior_variance,
        }
    }

    /// A ledger over `layers` layers that goes on from `state`.
    pub fn from_saved(layers: usize, state: &LedgerState) -> Result<Self, String> {
        if !(state.prior_variance.is_finite() && state.prior_variance > 0.0) {
            return Err(format!("the saved ledger's prior variance {} is not a positive number", state.prior_variance));
        }
        let mut ledger = RunLedger::new(layers);
        ledger.base = load(&state.base, layers)?;
        ledger.per_sample = state.per_sample.iter().map(|(&id, s)| Ok((id, load(s, layers)?))).collect::<Result<_, String>>()?;
        ledger.releases = state.releases;
        ledger.capped = state.capped;
        ledger.prior_variance = state.prior_variance;
        Ok(ledger)
    }
}
