//! `gradguard policy check FILE [--model cnn|mlp|PATH.pt] [--federated]`: validates a policy
//! file on its own and, given a model, against the model's layers, and prints what each rule
//! covers; for a policy meant for federated use, it warns when nothing in it holds against a
//! malicious server. `gradguard policy init --model M`: writes a starter policy for the model's
//! layers (see [`init`]).
use anyhow::bail;
use gradguard::models::{AuditModel, ModelError};
use gradguard::guard::Policy;
use std::path::PathBuf;
use tch::Device;

mod init;
mod lint;

#[derive(clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(clap::Subcommand)]
enum PolicyCommand {
    /// Validate a policy file; with --model, also match its layer patterns against the model.
    Check(CheckArgs),
    /// Write a starter policy for a model's layers: sample isolation (M6), noise calibrated to
    /// a bound in bits (M5) on every layer and a ledger cap, rules that need no threshold
    /// measured on the model and hold against a malicious server.
    Init(init::InitArgs),
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The policy file (TOML).
    file: PathBuf,
    /// `cnn` (the digits CNN of `gradguard demo`), `mlp` (widths 64-128-64-10) or the path of
    /// a TorchScript module (`.pt`), resolved as `gradguard audit --model` resolves it.
    #[arg(long)]
    model: Option<String>,
    /// The policy is meant for federated clients: say what in it holds against a malicious
    /// server (implied by `estimate_before_release = true`, a release per round).
    #[arg(long)]
    federated: bool,
}

/// Runs a `gradguard policy` subcommand.
pub fn run(args: PolicyArgs) -> anyhow::Result<()> {
    match args.command {
        PolicyCommand::Check(args) => check(args),
        PolicyCommand::Init(args) => init::init(args),
    }
}

/// What a rule promises, in words, for the rules whose metric has a unit that does (M5) and
/// for sample isolation (M6).
fn explain(rule: &gradguard::guard::decide::Rule, layers: &[String]) -> Vec<String> {
    use gradguard::guard::{decide::LadderStep, report::{LeakageMetric, BOUND_CAVEAT}};
    if matches!(rule.metric, LeakageMetric::ExposedFraction | LeakageMetric::IsolatedShare) {
        let what = if rule.metric == LeakageMetric::ExposedFraction {
            format!("more than {} of the batch's samples", rule.act_above)
        } else {
            format!("more than {} of its squared gradient norm in units that carry one sample each", rule.act_above)
        };
        return vec![format!(
            "meaning:    a layer whose release would carry {what} (units whose gradient comes from one sample give it back, whatever the batch size) escalates; measured at the parameters as they are before each release"
        )];
    }
    if rule.metric != LeakageMetric::ReconstructionBoundBits {
        return vec![];
    }
    let whose = match layers {
        [one] => format!("{one}'s release"),
        many => format!("the release of each of {}", many.join(", ")),
    };
    let mut out = vec![format!(
        "meaning:    no attacker with a Gaussian prior recovers more than {} bits per input dimension of the average sample from {whose} (van Trees bound from the release's noise; a release without noise has no bound and fails the rule)",
        rule.act_above
    )];
    out.push(format!("limit:      {BOUND_CAVEAT}"));
    for step in &rule.ladder {
        if let LadderStep::CalibratedNoise { clip_norm } = step {
            out.push(format!(
                "calibrated: {step} clips to {clip_norm} and adds noise of std sigma_l = sqrt(v S_l^2 / (D (2^(2*{b}) - 1))), S_l measured after the clip at each estimate, so that the bound is {b} bits/dim",
                b = rule.act_above
            ));
        }
    }
    out
}

/// A built-in model or a TorchScript file, resolved as `gradguard audit --model` resolves it.
fn load_model(name: &str) -> anyhow::Result<AuditModel> {
    match AuditModel::load(name, 0, Device::Cpu) {
        Err(ModelError::UnknownModel { name }) => {
            bail!("unknown model '{name}': expected `cnn`, `mlp` or the path of a TorchScript file")
        }
        other => Ok(other?),
    }
}

/// The label and layer names, in model order, of a built-in model or a TorchScript file.
fn model_layers(name: &str) -> anyhow::Result<(String, Vec<String>)> {
    let model = load_model(name)?;
    Ok((model.label(), model.layer_names()?))
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let policy = Policy::load(&args.file)?;
    // Resolve the model before printing anything, so a bad model is a clean error.
    let model = args.model.as_deref().map(model_layers).transpose()?;
    let coverage = match &model {
        Some((_, layers)) => Some(policy.coverage(layers)?),
        None => None,
    };

    println!("policy {}: valid", policy.origin());
    println!("  version {}, hash {} (sha256 {})", policy.version(), policy.short_hash(), policy.hash());
    println!("settings:");
    let settings = serde_json::to_value(&policy.settings())?;
    if let Some(map) = settings.as_object() {
        let width = map.keys().map(|k| k.len()).max().unwrap_or(0);
        for (key, value) in map {
            println!("  {key:<width$} = {value}");
        }
    }
    if let Some((label, layers)) = &model {
        println!("model: {label}, {} layers: {}", layers.len(), layers.join(", "));
    }
    if policy.rules().is_empty() {
        println!("rules: none (the guard measures and releases, checking only finiteness and staleness)");
    }
    for (i, rule) in policy.rules().iter().enumerate() {
        println!("rule {} '{}':", i + 1, rule.name);
        println!("  metric:     {}", rule.metric.name());
        println!("  thresholds: act above {}, relax below {}", rule.act_above, rule.relax_below);
        let ladder: Vec<String> = rule.ladder.iter().enumerate().map(|(k, s)| format!("{}. {s}", k + 1)).collect();
        println!("  ladder:     {}", ladder.join(" -> "));
        println!("  patterns:   {}", rule.layers.join(", "));
        let mut names: Vec<String> = rule.layers.clone();
        if let (Some((_, layers)), Some(coverage)) = (&model, &coverage) {
            let covered: Vec<&str> = coverage.rule_layers[i].iter().map(|&l| layers[l].as_str()).collect();
            if covered.is_empty() {
                println!("  layers:     (none)");
            } else {
                println!("  layers:     {}", covered.join(", "));
            }
            names = covered.iter().map(|s| s.to_string()).collect();
        }
        for line in explain(rule, &names) {
            println!("  {line}");
        }
    }
    if let Some(cap) = policy.settings().ledger_cap_bits {
        println!(
            "ledger cap: over the whole run, no attacker with a Gaussian prior recovers more than {cap} bits per input dimension of any sample from all releases together (Fisher information summed over releases; a release that would cross it is {})",
            match policy.settings().on_violation {
                gradguard::guard::decide::OnViolation::Block => "blocked",
                gradguard::guard::decide::OnViolation::Withhold => "sent without the layers that would cross it",
            }
        );
    }
    if let Some(coverage) = &coverage {
        for w in &coverage.warnings {
            println!("warning: {w} (strict_layers = false)");
        }
        if let Some((_, layers)) = &model {
            let uncovered: Vec<&str> = (0..layers.len())
                .filter(|l| !coverage.rule_layers.iter().any(|r| r.contains(l)))
                .map(|l| layers[l].as_str())
                .collect();
            if !uncovered.is_empty() {
                println!("note: no rule covers {}", uncovered.join(", "));
            }
        }
    } else {
        println!("(no --model: layer patterns not checked)");
    }
    let federated = if args.federated {
        Some("--federated")
    } else if policy.settings().estimate_before_release {
        Some("estimate_before_release = true: a release per federated round")
    } else {
        None
    };
    if let Some(why) = federated {
        let on_model = match (&model, &coverage) {
            (Some((_, layers)), Some(coverage)) => Some((layers.as_slice(), coverage)),
            _ => None,
        };
        let findings = lint::federated(&policy, on_model);
        println!("federated use ({why}): against a malicious server");
        if !findings.holds.is_empty() {
            println!("  holds: {}", findings.holds.join(", and "));
        }
        for w in &findings.warnings {
            println!("warning: {w}");
        }
        for n in &findings.notes {
            println!("note: {n}");
        }
    }
    Ok(())
}
