//! `gradguard policy check FILE [--model cnn|mlp|PATH.pt]`: validates a policy file on its own
//! and, given a model, against the model's layers, and prints what each rule covers.
use anyhow::bail;
use gradguard::guard::layers::{layer_name, LayerMap};
use gradguard::guard::Policy;
use gradguard::models::{DigitsCnn, Mlp};
use std::path::{Path, PathBuf};
use tch::{nn, Device};

#[derive(clap::Args)]
pub struct PolicyArgs {
    #[command(subcommand)]
    command: PolicyCommand,
}

#[derive(clap::Subcommand)]
enum PolicyCommand {
    /// Validate a policy file; with --model, also match its layer patterns against the model.
    Check(CheckArgs),
}

#[derive(clap::Args)]
struct CheckArgs {
    /// The policy file (TOML).
    file: PathBuf,
    /// `cnn` (the digits CNN of `gradguard demo`), `mlp` (widths 64-128-64-10) or the path of
    /// a TorchScript module (`.pt`).
    #[arg(long)]
    model: Option<String>,
}

pub fn run(args: PolicyArgs) -> anyhow::Result<()> {
    match args.command {
        PolicyCommand::Check(args) => check(args),
    }
}

/// The MLP `--model mlp` stands for.
const MLP_WIDTHS: [i64; 4] = [64, 128, 64, 10];

/// The layer names of a built-in model or a TorchScript file, in model order.
fn model_layers(model: &str) -> anyhow::Result<(String, Vec<String>)> {
    match model {
        "cnn" => {
            let vs = nn::VarStore::new(Device::Cpu);
            let _net = DigitsCnn::new(&vs.root());
            Ok(("digits CNN (built-in `cnn`)".into(), LayerMap::from_var_store(&vs)?.names()))
        }
        "mlp" => {
            let vs = nn::VarStore::new(Device::Cpu);
            let _net = Mlp::new(&vs.root(), &MLP_WIDTHS);
            Ok((format!("MLP {MLP_WIDTHS:?} (built-in `mlp`)"), LayerMap::from_var_store(&vs)?.names()))
        }
        path if path.ends_with(".pt") => {
            let path = Path::new(path);
            // CModule keeps PyTorch's dotted parameter names (`conv1.weight`);
            // TrainableCModule would rewrite the dots.
            if !path.is_file() {
                bail!("model file {} not found", path.display());
            }
            let module = tch::CModule::load_on_device(path, Device::Cpu).map_err(|e| {
                anyhow::anyhow!("cannot load TorchScript module {}: {}", path.display(), first_line(&e))
            })?;
            let params = module
                .named_parameters()
                .map_err(|e| anyhow::anyhow!("cannot list the parameters of {}: {}", path.display(), first_line(&e)))?;
            let params: Vec<_> = params.into_iter().filter(|(_, t)| t.requires_grad()).collect();
            if params.is_empty() {
                bail!("TorchScript module {} has no trainable parameters", path.display());
            }
            let mut names: Vec<String> = Vec::new();
            for (name, _) in &params {
                let layer = layer_name(name);
                if !names.contains(&layer) {
                    names.push(layer);
                }
            }
            Ok((format!("TorchScript module {}", path.display()), names))
        }
        other => {
            bail!("unknown model '{other}': expected `cnn`, `mlp` or the path of a TorchScript file ending in .pt")
        }
    }
}

/// libtorch errors carry a C++ backtrace after the message: keep the message.
fn first_line(e: &tch::TchError) -> String {
    e.to_string().lines().next().unwrap_or_default().to_string()
}

fn check(args: CheckArgs) -> anyhow::Result<()> {
    let policy = Policy::load(&args.file)?;
    // Resolve the model before printing anything, so a bad model is a clean error.
    let model = args.model.as_deref().map(model_layers).transpose()?;
    let coverage = match &model {
        Some((_, layers)) => Some(policy.coverage(layers)?),
        None => None,
    };

    println!("policy {}: valid", policy.origin);
    println!("  version {}, hash {} (sha256 {})", policy.version, policy.short_hash(), policy.hash);
    println!("settings:");
    let settings = serde_json::to_value(&policy.settings)?;
    if let Some(map) = settings.as_object() {
        let width = map.keys().map(|k| k.len()).max().unwrap_or(0);
        for (key, value) in map {
            println!("  {key:<width$} = {value}");
        }
    }
    if let Some((label, layers)) = &model {
        println!("model: {label}, {} layers: {}", layers.len(), layers.join(", "));
    }
    if policy.rules.is_empty() {
        println!("rules: none (the guard measures and releases, checking only finiteness and staleness)");
    }
    for (i, rule) in policy.rules.iter().enumerate() {
        println!("rule {} '{}':", i + 1, rule.name);
        println!("  metric:     {}", rule.metric.name());
        println!("  thresholds: act above {}, relax below {}", rule.act_above, rule.relax_below);
        let ladder: Vec<String> = rule.ladder.iter().enumerate().map(|(k, s)| format!("{}. {s}", k + 1)).collect();
        println!("  ladder:     {}", ladder.join(" -> "));
        println!("  patterns:   {}", rule.layers.join(", "));
        if let (Some((_, layers)), Some(coverage)) = (&model, &coverage) {
            let covered: Vec<&str> = coverage.rule_layers[i].iter().map(|&l| layers[l].as_str()).collect();
            if covered.is_empty() {
                println!("  layers:     (none)");
            } else {
                println!("  layers:     {}", covered.join(", "));
            }
        }
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
    Ok(())
}
