//! Vetting parameters set from outside (METRICS.md, M6, online): a federated client measures
//! sample isolation on the round's global model before it trains on it or releases anything.
use super::Guard;
use crate::error::Result;
use crate::measure::{Batch, Inspection, LossFn};
use crate::decide::{DecisionRecord, Outcome};
use crate::error::TorchContext;
use crate::measure::attacks::{AttackKind, AttackSettings};
use crate::measure::to_f64_vec;
use crate::report::{LeakageMetric, Metric, Vetting, VettingAttack, VettingCheck};
use tch::Kind;

impl Guard {
    /// Measures M6 (sample isolation) of the model's parameters as they are now on `batch`,
    /// and checks it against the policy's rules on `exposed_fraction` and `isolated_share`:
    /// what a client calls after the parameters were set from outside (a federated round's
    /// global model, which it did not train) and before it trains on them or releases anything.
    /// A malicious server can choose parameters whose units each carry one sample of the
    /// client's next batch (trap weights); the release of that batch would then give the
    /// samples back, whatever the batch size.
    ///
    /// The batch is one the client would train on (n as in its releases: M6 depends on n).
    /// Nothing is trained and no step is taken; the model's parameters, buffers and random
    /// stream are left as they were. The measurement becomes the reports' M6 until the next
    /// estimate, and the next release estimates afresh (the parameters changed). A rule whose
    /// layer has M6 absent fails its check, as it would block a release.
    ///
    /// ```
    /// use gradguard_guard::{Batch, Guard, LayerMap, Policy};
    /// use tch::{nn, nn::Module, Device, Kind, Tensor};
    ///
    /// let vs = nn::VarStore::new(Device::Cpu);
    /// let net = nn::linear(vs.root() / "fc", 4, 3, Default::default());
    /// let loss = |x: &Tensor, y: &Tensor| net.forward(x).f_cross_entropy_loss::<Tensor>(y, None, tch::Reduction::Mean, -100, 0.0);
    /// let policy = Policy::from_toml_str(r#"
    ///     version = 2
    ///     [[rule]]
    ///     name = "isolation"
    ///     metric = "exposed_fraction"
    ///     layers = ["fc"]
    ///     act_above = 0.5
    ///     relax_below = 0.25
    ///     ladder = [{ action = "withhold" }]
    /// "#, "inline")?;
    /// let mut guard = Guard::new(LayerMap::from_var_store(&vs)?, policy)?;
    /// // (load the server's parameters into `vs` here)
    /// let (x, y) = (Tensor::randn([16, 4], (Kind::Float, Device::Cpu)), Tensor::randint(3, [16], (Kind::Int64, Device::Cpu)));
    /// let vetting = guard.vet_parameters(&Batch::new(&x, &y), &loss)?;
    /// // A linear layer's output units all see every sample: none isolates one.
    /// assert!(vetting.accepted(), "{vetting:?}");
    /// # Ok::<(), Box<dyn std::error::Error>>(())
    /// ```
    pub fn vet_parameters(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Vetting> {
        self.estimates.scheduler.enter();
        let result = self.vet_timed(batch, loss_fn);
        self.estimates.scheduler.leave();
        let vetting = result?;
        if let (Some(why), Some(trail)) = (vetting.refusal(), self.record.audit.as_mut()) {
            // The refusal is a change of state: written before the caller acts on it.
            trail.event(&DecisionRecord::event(self.step, Outcome::Refused, self.decide.protection.policy().hash(), Some(why)))?;
        }
        Ok(vetting)
    }

    fn vet_timed(&mut self, batch: &Batch, loss_fn: &dyn LossFn) -> Result<Vetting> {
        let n = self.check_batch(batch)?;
        let settings = self.policy().settings().clone();
        let non_finite = self.non_finite_parameters()?;
        if !non_finite.is_empty() {
            // Nothing is run on parameters that are not numbers.
            let absent = Metric::absent("not measured: the parameters hold non-finite values");
            let layers = self.layers.names().into_iter().map(|name| (name, absent.clone())).collect();
            return Ok(Vetting { step: self.step, n, tau: settings.isolation.tau, layers, exposed_samples: Vec::new(), checks: Vec::new(), non_finite, attacks: Vec::new(), max_recovered_fraction: settings.vetting.max_recovered_fraction });
        }
        let look = Inspection::new(&self.layers, loss_fn, *batch).seeded(settings.seed, self.step);
        let measured = look.sample_isolation_with_samples(&settings.isolation)?;
        let mut exposed = vec![false; n];
        for i in measured.iter().flat_map(|(_, samples)| samples) {
            if let Some(e) = exposed.get_mut(*i) {
                *e = true;
            }
        }
        let isolation: Vec<_> = measured.into_iter().map(|(m, _)| m).collect();
        let names = self.layers.names();
        let protection = &self.decide.protection;
        let mut checks = Vec::new();
        for (rule, covered) in protection.policy().rules().iter().zip(&protection.coverage().rule_layers) {
            if !matches!(rule.metric, LeakageMetric::ExposedFraction | LeakageMetric::IsolatedShare) {
                continue;
            }
            for &l in covered {
                let (value, reason) = match &isolation[l] {
                    Metric::Measured(s) => (Some(if rule.metric == LeakageMetric::ExposedFraction { s.exposed_fraction } else { s.isolated_share }), None),
                    Metric::Absent { reason } => (None, Some(reason.clone())),
                };
                checks.push(VettingCheck {
                    layer: names[l].clone(),
                    rule: rule.name.clone(),
                    metric: rule.metric,
                    value,
                    act_above: rule.act_above,
                    passed: value.is_some_and(|v| v <= rule.act_above),
                    reason,
                });
            }
        }
        let attacks = analytic_attacks(&look)?;
        self.estimates.isolation = isolation.clone();
        self.estimates.isolation_step = Some(self.step);
        // Parameters set from outside: the estimates of the old ones no longer describe them.
        self.estimates.estimate_step = None;
        Ok(Vetting {
            step: self.step,
            n,
            tau: settings.isolation.tau,
            layers: names.into_iter().zip(isolation).collect(),
            exposed_samples: exposed.iter().enumerate().filter(|(_, e)| **e).map(|(i, _)| i).collect(),
            checks,
            non_finite,
            attacks,
            max_recovered_fraction: settings.vetting.max_recovered_fraction,
        })
    }

    /// Every parameter holding a non-finite value, with the count.
    fn non_finite_parameters(&self) -> Result<Vec<(String, usize)>> {
        let mut found = Vec::new();
        for layer in self.layers.layers() {
            for p in &layer.params {
                let count = p.tensor.f_isfinite().and_then(|f| f.f_logical_not()).and_then(|f| f.f_sum(Kind::Int64)).during("counting non-finite parameters")?;
                let count = to_f64_vec(&count)?[0] as usize;
                if count > 0 {
                    found.push((p.name.clone(), count));
                }
            }
        }
        Ok(found)
    }
}

/// M4's analytic attacks on the vetting batch's release, per layer they apply to (the client
/// knows the batch: it scores the attack exactly). The optimisation attack is not run: it is
/// slow, and the analytic attacks are the ones a malicious model is built for.
fn analytic_attacks(look: &Inspection) -> Result<Vec<VettingAttack>> {
    let settings = AttackSettings { optimisation: None, ..Default::default() };
    let suite = look.attack_suite(&settings)?;
    Ok(suite
        .layers
        .iter()
        .filter_map(|l| {
            let best = [AttackKind::Analytic, AttackKind::AnalyticDifferences].into_iter().filter_map(|k| l.outcome(k).measured()).max_by_key(|o| o.samples_recovered)?;
            Some(VettingAttack { layer: l.layer.clone(), attack: best.attack.name().to_string(), samples_recovered: best.samples_recovered, recovered_fraction: best.recovered_fraction })
        })
        .collect())
}
