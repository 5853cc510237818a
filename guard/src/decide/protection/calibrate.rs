//! Calibrated noise rungs (METRICS.md, M5, Calibration): at each measured decision a rung
//! `{ action = "noise", clip_norm = C, target = "threshold" }` in force resolves into the
//! concrete `noise(clip_norm=C, multiplier=sigma/C)` whose bound meets its rule's threshold,
//! sigma^2 = v S_l^2 / (D (2^{2b} - 1)) with S_l measured after the chain before it and the
//! clip. Between estimates the resolved noise stays in force, as every level does.
use super::bounds::prior;
use super::{Measurements, Protection, ReleaseProbe};
use crate::decide::audit_log::{DecisionRecord, Outcome};
use crate::decide::policy::LadderStep;
use crate::error::Result;
use crate::measure::{calibrated_noise_std, mean_and_standard_error, LayerFisher};
use gradguard_defenses::Defence;

/// The calibration aims this far below the threshold, so that the re-measurement (on the same
/// probes: the same number up to rounding) passes `value <= act_above`.
const MARGIN: f64 = 1e-6;

/// How a calibration's decision record begins: the audit trail writes every one (a new sigma is
/// a change of state, even at the same level) and the run summary finds the last.
pub const CALIBRATION_REASON: &str = "calibrated noise";

/// The smallest multiplier a calibration resolves to: a layer whose release does not move with
/// its input (S_l = 0) still gets noise, so that its release is bounded (at 0 bits).
const MIN_MULTIPLIER: f64 = 1e-9;

impl Protection {
    /// Resolves every calibrated rung in force on layer `l`, in chain order, from the kept
    /// JVPs; writes a record for each sigma chosen. Err(reason): the JVPs are absent, the
    /// decision must fail closed.
    pub(super) fn calibrate(&mut self, step: u64, l: usize, m: &Measurements, records: &mut Vec<DecisionRecord>) -> Result<std::result::Result<(), String>> {
        let mut before: Vec<Defence> = Vec::new();
        for r in 0..self.policy.rules().len() {
            if !self.coverage.rule_layers[r].contains(&l) {
                continue;
            }
            let rule = self.policy.rules()[r].clone();
            for step_in_force in &rule.ladder[..self.levels[r][l]] {
                match step_in_force {
                    LadderStep::Defence(d) => before.push(d.clone()),
                    LadderStep::Aggregate { .. } => {}
                    LadderStep::CalibratedNoise { clip_norm } => {
                        let jvps = match &m.jvps {
                            Ok(jvps) => *jvps,
                            Err(reason) => return Ok(Err(format!("cannot calibrate the noise of rule '{}': {reason}", rule.name))),
                        };
                        let mut clipped = before.clone();
                        clipped.push(Defence::Clip { max_norm: *clip_norm });
                        let point = jvps.release_sensitivity(l, &clipped, m.seeds[l])?.map_or(0.0, |r| r.sensitivity);
                        let z = self.policy.settings().calibration_margin_se;
                        let s = if z > 0.0 { upper_sensitivity(jvps, l, &before, *clip_norm, m.seeds[l], z)?.unwrap_or(point) } else { point };
                        let (v, _) = prior(m, jvps);
                        let target = rule.act_above * (1.0 - MARGIN);
                        let Some(sigma) = calibrated_noise_std(v, s, jvps.input_dims(), target) else {
                            return Ok(Err(format!("cannot calibrate the noise of rule '{}' to {target} bits/dim (D = {})", rule.name, jvps.input_dims())));
                        };
                        let multiplier = (sigma / clip_norm).max(MIN_MULTIPLIER);
                        if !multiplier.is_finite() {
                            return Ok(Err(format!("cannot calibrate the noise of rule '{}': sigma {sigma:e} is {multiplier} times clip_norm {clip_norm}", rule.name)));
                        }
                        let noise = Defence::Noise { clip_norm: *clip_norm, multiplier };
                        before.push(noise.clone());
                        if self.calibrated[r][l].as_ref() == Some(&noise) {
                            continue;
                        }
                        let mut rec = self.record(step, &self.layer_names[l], Outcome::Protected, noise.to_string());
                        rec.rule = Some(rule.name.clone());
                        rec.metric = Some(rule.metric.name().into());
                        rec.threshold = Some(rule.act_above);
                        rec.level = self.levels[r][l];
                        rec.reason = Some(format!(
                            "{CALIBRATION_REASON}: sigma = {:.6e} (multiplier {multiplier:.6e} of clip_norm {clip_norm}) for {} bits/dim, from S_l = {s:.6e} after the clip (point estimate {point:.6e}, margin {z} SE), v = {v:.6e}, D = {}",
                            multiplier * clip_norm,
                            rule.act_above,
                            jvps.input_dims()
                        ));
                        records.push(rec);
                        self.calibrated[r][l] = Some(noise);
                    }
                }
            }
        }
        Ok(Ok(()))
    }
}

/// S_l after `before` and the clip, raised by `z` standard errors of S_l^2 over the probes:
/// sqrt(mean + z SE) of the per-probe S_l^2, read from the Fisher information of the chain with
/// unit-multiplier noise (dFIL_k = S_k^2 / (C^2 D)). None when the layer is not reached or
/// noise comes earlier in the chain.
fn upper_sensitivity(jvps: &dyn ReleaseProbe, l: usize, before: &[Defence], clip_norm: f64, seed: u64, z: f64) -> Result<Option<f64>> {
    // With noise earlier in the chain the Fisher information is that noise's (the first counts):
    // no per-probe S_l^2 of this clip to read, the point estimate stands.
    if super::bounds::adds_noise(before) {
        return Ok(None);
    }
    let mut chain = before.to_vec();
    chain.push(Defence::Noise { clip_norm, multiplier: 1.0 });
    let Some(LayerFisher::Bounded { per_probe, .. }) = jvps.release_fisher(l, &chain, seed)? else { return Ok(None) };
    let (mean, se) = mean_and_standard_error(&per_probe);
    let se = if se.is_finite() { se } else { 0.0 };
    Ok(Some(((mean + z * se) * clip_norm * clip_norm * jvps.input_dims() as f64).sqrt()))
}
