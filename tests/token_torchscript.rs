//! A TorchScript text classifier on token ids (tests/fixtures/token_scripted.pt, made by
//! tests/fixtures/make_token_fixtures.py) declares its embedding split with the exported
//! methods `embed` and `forward_embedded`: M1 is measured on its embeddings and equals the same
//! model's M1 built in tch with the same weights.
use gradguard::models::{AuditModel, LossKind};
use gradguard::guard::{Batch, Inspection, LayerMap, Metric, SplitLoss, measure::SensitivitySettings, report::{JvpMethod, Representation, Sensitivity}};
use gradguard::wrap::{TorchScriptError, TorchScriptModel};
use std::path::{Path, PathBuf};
use tch::{nn, Device, Kind, TchError, Tensor};

fn fixture(name: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name)
}

fn cross_entropy(logits: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
    logits.f_log_softmax(-1, None)?.f_nll_loss(y, None::<Tensor>, tch::Reduction::Mean, -100)
}

/// The fixture's model in tch: emb (20 x 4) -> mean over the sequence -> fc (4 -> 3).
struct TchModel {
    vs: nn::VarStore,
    emb: Tensor,
    w: Tensor,
    b: Tensor,
}

impl TchModel {
    fn with_weights_of(script: &TorchScriptModel) -> Self {
        let mut vs = nn::VarStore::new(Device::Cpu);
        let weights: std::collections::HashMap<String, Tensor> = script.named_parameters().into_iter().collect();
        let root = vs.root();
        let _ = root.sub("emb").var_copy("weight", &weights["emb.weight"]);
        let _ = root.sub("fc").var_copy("weight", &weights["fc.weight"]);
        let _ = root.sub("fc").var_copy("bias", &weights["fc.bias"]);
        vs.float();
        let v = vs.variables();
        let (emb, w, b) = (v["emb.weight"].shallow_clone(), v["fc.weight"].shallow_clone(), v["fc.bias"].shallow_clone());
        Self { vs, emb, w, b }
    }

    fn embed(&self, t: &Tensor) -> Result<Tensor, TchError> {
        Tensor::f_embedding(&self.emb, t, -1, false, false)
    }

    fn loss_from_embedded(&self, e: &Tensor, y: &Tensor) -> Result<Tensor, TchError> {
        cross_entropy(&e.f_mean_dim(1, false, Kind::Float)?.f_linear(&self.w, Some(&self.b))?, y)
    }
}

fn batch() -> (Tensor, Tensor) {
    tch::manual_seed(21);
    (Tensor::randint(20, [6, 6], (Kind::Int64, Device::Cpu)), Tensor::randint(3, [6], (Kind::Int64, Device::Cpu)))
}

fn measured(m: &Metric<Sensitivity>) -> &Sensitivity {
    m.measured().unwrap_or_else(|| panic!("M1 absent: {:?}", m.absent_reason()))
}

fn assert_close(a: &[Metric<Sensitivity>], b: &[Metric<Sensitivity>], what: &str) {
    assert_eq!(a.len(), b.len());
    for (a, b) in a.iter().zip(b) {
        let (a, b) = (measured(a), measured(b));
        assert_eq!(a.representation, Representation::Embedding, "{what}");
        assert_eq!(b.representation, Representation::Embedding, "{what}");
        assert!((a.sensitivity - b.sensitivity).abs() <= 1e-4 * a.sensitivity, "{what}: TorchScript {} vs tch {}", a.sensitivity, b.sensitivity);
    }
}

#[test]
fn torchscript_embed_and_forward_embedded_give_the_tch_models_m1() {
    let script = TorchScriptModel::load(&fixture("token_scripted.pt"), Device::Cpu).unwrap();
    assert!(script.has_embedding());
    let layers = script.layer_map().unwrap();
    assert_eq!(layers.names(), vec!["emb", "fc"]);
    let tch_model = TchModel::with_weights_of(&script);
    let tch_layers = LayerMap::from_var_store(&tch_model.vs).unwrap();
    assert_eq!(tch_layers.names(), vec!["emb", "fc"]);
    let (t, y) = batch();

    let script_loss = SplitLoss::new(
        |t: &Tensor, y: &Tensor| cross_entropy(&script.f_forward(t)?, y),
        |t: &Tensor| script.f_embed(t),
        |e: &Tensor, y: &Tensor| cross_entropy(&script.f_forward_embedded(e)?, y),
    );
    let tch_loss = SplitLoss::new(
        |t: &Tensor, y: &Tensor| tch_model.loss_from_embedded(&tch_model.embed(t)?, y),
        |t: &Tensor| tch_model.embed(t),
        |e: &Tensor, y: &Tensor| tch_model.loss_from_embedded(e, y),
    );
    let exact = SensitivitySettings { exact: true, ..Default::default() };
    for settings in [exact.clone(), SensitivitySettings { probes: 8, method: JvpMethod::DoubleBackward, exact: false, probe_samples: None }, SensitivitySettings { probes: 8, method: JvpMethod::CentralDifference, exact: false, probe_samples: None }] {
        let on_script = Inspection::new(&layers, &script_loss, Batch::new(&t, &y)).seeded(3, 0).sensitivity(&settings).unwrap();
        let on_tch = Inspection::new(&tch_layers, &tch_loss, Batch::new(&t, &y)).seeded(3, 0).sensitivity(&settings).unwrap();
        assert_close(&on_script, &on_tch, &format!("{settings:?}"));
    }

    // The audit's model carries the same split.
    let audited = AuditModel::load(fixture("token_scripted.pt").to_str().unwrap(), 0, Device::Cpu).unwrap();
    assert!(audited.has_embedding());
    let audit_loss = audited.loss_fn(LossKind::CrossEntropy);
    let audit_layers = audited.layers().unwrap();
    let on_audit = Inspection::new(&audit_layers, &audit_loss, Batch::new(&t, &y)).seeded(3, 0).sensitivity(&exact).unwrap();
    let on_tch = Inspection::new(&tch_layers, &tch_loss, Batch::new(&t, &y)).seeded(3, 0).sensitivity(&exact).unwrap();
    assert_close(&on_audit, &on_tch, "audit model");
}

#[test]
fn a_module_without_the_methods_has_no_split_and_half_a_split_is_an_error() {
    let plain = TorchScriptModel::load(&fixture("mlp_scripted.pt"), Device::Cpu).unwrap();
    assert!(!plain.has_embedding());
    match TorchScriptModel::load(&fixture("token_half_split.pt"), Device::Cpu) {
        Err(e @ TorchScriptError::HalfSplit { .. }) => {
            let text = e.to_string();
            assert!(text.contains("token_half_split.pt defines embed but not forward_embedded"), "{text}");
        }
        Err(e) => panic!("unexpected error: {e}"),
        Ok(_) => panic!("half a split was accepted"),
    }
}
