//! `gradguard audit` end to end, through the built binary, on the fixtures of tests/fixtures/
//! (made by tests/fixtures/make_fixtures.py).
use gradguard::guard::report::JvpMethod;
use gradguard::guard::{Batch, Inspection, measure::SensitivitySettings};
use gradguard::guard::LayerMap;
use gradguard::models::DigitsCnn;
use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use tch::{nn, Device, Kind, Tensor};

fn fixture(name: &str) -> String {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests").join("fixtures").join(name).display().to_string()
}

fn scratch(name: &str) -> PathBuf {
    let dir = Path::new(env!("CARGO_TARGET_TMPDIR")).join("audit_cli");
    std::fs::create_dir_all(&dir).unwrap();
    dir.join(name)
}

fn audit(args: &[&str]) -> Output {
    Command::new(env!("CARGO_BIN_EXE_gradguard")).arg("audit").args(args).output().expect("the gradguard binary runs")
}

fn stderr(out: &Output) -> String {
    String::from_utf8_lossy(&out.stderr).into_owned()
}

/// Runs an audit that must fail: exit code 1 (an error, not a panic) and every substring in
/// its stderr.
fn fails_with(args: &[&str], expected: &[&str]) {
    let out = audit(args);
    let err = stderr(&out);
    assert_eq!(out.status.code(), Some(1), "args {args:?}: exit {:?}, stderr:\n{err}", out.status.code());
    assert!(!err.contains("panicked"), "args {args:?} panicked:\n{err}");
    for s in expected {
        assert!(err.contains(s), "args {args:?}: stderr lacks {s:?}:\n{err}");
    }
}

fn report(path: &Path) -> Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

fn read_f32(path: &str) -> (Vec<u64>, Vec<f32>) {
    let bytes = std::fs::read(path).unwrap();
    let npy = npyz::NpyFile::new(&bytes[..]).unwrap();
    let shape = npy.shape().to_vec();
    (shape, npy.into_vec::<f32>().unwrap())
}

fn read_i64(path: &str) -> Vec<i64> {
    let bytes = std::fs::read(path).unwrap();
    npyz::NpyFile::new(&bytes[..]).unwrap().into_vec::<i64>().unwrap()
}

#[test]
fn torchscript_model_gives_the_same_m1_as_the_tch_built_model() {
    let json = scratch("m1_equal.json");
    let out = audit(&[
        "--model", &fixture("cnn_traced.pt"),
        "--inputs", &fixture("digits_x.npy"),
        "--labels", &fixture("digits_y.npy"),
        "--batch-size", "16", "--probes", "4", "--seed", "3",
        "--json", json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r = report(&json);
    assert_eq!((r["batch_size"].as_u64(), r["probes"].as_u64(), r["seed"].as_u64(), r["exact"].as_bool()), (Some(16), Some(4), Some(3), Some(false)));
    assert_eq!(r["samples"].as_u64(), Some(256));

    // The same network built in tch, with the TorchScript file's weights.
    let vs = nn::VarStore::new(Device::Cpu);
    let net = DigitsCnn::new(&vs.root());
    let module = tch::CModule::load(fixture("cnn_traced.pt")).unwrap();
    let vars = vs.variables();
    tch::no_grad(|| {
        for (name, t) in module.named_parameters().unwrap() {
            let mut v = vars.get(&name).unwrap_or_else(|| panic!("tch model lacks {name}")).shallow_clone();
            v.copy_(&t);
        }
    });
    let layers = LayerMap::from_var_store(&vs).unwrap();
    let (shape, x) = read_f32(&fixture("digits_x.npy"));
    let shape: Vec<i64> = shape.iter().map(|&d| d as i64).collect();
    let x = Tensor::from_slice(&x).reshape(shape.as_slice()).narrow(0, 0, 16);
    let y = Tensor::from_slice(&read_i64(&fixture("digits_y.npy"))).narrow(0, 0, 16);
    let loss = |x: &Tensor, y: &Tensor| net.f_loss(x, y);
    let settings = SensitivitySettings { probes: 4, method: JvpMethod::DoubleBackward, exact: false, probe_samples: None };
    let direct = Inspection::new(&layers, &loss, Batch::new(&x.to_kind(Kind::Float), &y)).seeded(3, 0).sensitivity(&settings).unwrap();

    let rows = r["layers"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, layers.names());
    for (row, m) in rows.iter().zip(&direct) {
        let m = m.measured().unwrap();
        assert_eq!(row["params"].as_u64(), Some(m.params as u64));
        for (key, want) in [
            ("sensitivity", m.sensitivity),
            ("sensitivity_se", m.sensitivity_se),
            ("sensitivity_rms", m.sensitivity_rms),
            ("relative_sensitivity", m.relative_sensitivity.unwrap()),
        ] {
            let got = row[key].as_f64().unwrap_or_else(|| panic!("{}: {key} missing", row["name"]));
            assert!((got - want).abs() <= 1e-4 * want.abs(), "{} {key}: audit {got}, tch {want}", row["name"]);
        }
    }
}

#[test]
fn scripted_module_layers_keep_pytorch_names_and_absent_metrics_say_why() {
    let json = scratch("scripted.json");
    let svg = scratch("scripted.svg");
    let out = audit(&[
        "--model", &fixture("mlp_scripted.pt"),
        "--inputs", &fixture("digits_x.npy"),
        "--labels", &fixture("digits_y.npy"),
        "--attribute", &fixture("digits_a.npy"),
        "--samples", "120",
        "--json", json.to_str().unwrap(),
        "--plot", svg.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(stdout.contains("body.1") && stdout.contains("out_layer"), "table:\n{stdout}");
    let r = report(&json);
    let rows = r["layers"].as_array().unwrap();
    let names: Vec<&str> = rows.iter().map(|l| l["name"].as_str().unwrap()).collect();
    assert_eq!(names, ["body.1", "body.3", "out_layer"], "dotted PyTorch names, module order, buffer excluded");
    let params: Vec<u64> = rows.iter().map(|l| l["params"].as_u64().unwrap()).collect();
    assert_eq!(params, [64 * 32 + 32, 32 * 16 + 16, 16 * 10 + 10]);
    for row in rows {
        assert!(row["sensitivity"].as_f64().unwrap() > 0.0);
        assert!(row["subspace_separation"].is_f64(), "M2 needs only 16 per group");
        assert!(row["usable_information_bits"].is_null());
        assert_eq!(row["absent"]["usable_information_bits"], "insufficient samples: 120 < 200");
        assert!(row["usable_original_bits_per_dim"].is_null());
        assert!(row["absent"]["psnr"].as_str().unwrap().contains("--invert"));
    }
    let svg = std::fs::read_to_string(&svg).unwrap();
    assert!(svg.starts_with("<svg") || svg.contains("<svg"), "not an SVG");
    for s in ["body.1", "body.3", "out_layer", "sensitivity_rms", "usable_information_bits", "absent"] {
        assert!(svg.contains(s), "SVG lacks {s}");
    }
}

#[test]
fn full_audit_with_inversion_reports_every_metric() {
    let json = scratch("full.json");
    let out = audit(&[
        "--model", &fixture("cnn_traced.pt"),
        "--inputs", &fixture("digits_x.npy"),
        "--labels", &fixture("digits_y.npy"),
        "--attribute", &fixture("digits_a.npy"),
        "--invert", "--invert-releases", "1", "--invert-iterations", "20",
        "--json", json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r = report(&json);
    for row in r["layers"].as_array().unwrap() {
        for key in [
            "sensitivity", "sensitivity_se", "sensitivity_rms", "relative_sensitivity", "subspace_distance",
            "subspace_separation", "usable_information_bits", "attack_accuracy", "usable_original_bits_per_dim", "psnr",
        ] {
            assert!(row[key].is_f64(), "{} {key} = {}", row["name"], row[key]);
        }
        // Only M5 is absent from an undefended release (no noise, no bound), and the attack
        // suite where no attack applies, with the suite's own reason.
        let mut absent = row["absent"].as_object().unwrap().clone();
        let suite = &row["details"]["attacks"];
        for key in ["samples_recovered", "recovered_fraction"] {
            if let Some(reason) = absent.remove(key) {
                assert_eq!(suite["status"], "absent", "{}: {key} absent while the suite ran", row["name"]);
                assert_eq!(reason, suite["reason"], "{}", row["name"]);
            }
        }
        assert_eq!(absent.keys().map(String::as_str).collect::<Vec<_>>(), ["dfil", "reconstruction_bound_bits", "reconstruction_bound_se", "unbiased_mse_floor"], "{}", row["absent"]);
        assert!(absent.values().all(|v| v == "deterministic release: no noise, no bound"), "{}", row["absent"]);
        assert!(row["usable_information_se"].as_f64().is_some_and(|se| se > 0.0), "M3 over 5 splits has a spread");
        assert_eq!(row["details"]["m3"]["l2_chosen"].as_array().map(Vec::len), Some(5));
        assert_eq!(row["details"]["m3"]["samples"].as_u64(), Some(256));
        assert_eq!(row["details"]["m4"]["releases"].as_u64(), Some(1));
    }
}

#[test]
fn a_file_that_is_not_torchscript_is_named() {
    fails_with(
        &["--model", &fixture("not_torchscript.pt"), "--inputs", &fixture("x_nan.npy"), "--labels", &fixture("y16.npy")],
        &["not_torchscript.pt is not a TorchScript module"],
    );
    fails_with(&["--model", &fixture("missing.pt"), "--inputs", &fixture("x_nan.npy"), "--labels", &fixture("y16.npy")], &["missing.pt: no such file"]);
    fails_with(&["--model", "resnet"], &["unknown model \"resnet\""]);
}

#[test]
fn inputs_that_do_not_fit_are_named() {
    let cnn = fixture("cnn_traced.pt");
    fails_with(
        &["--model", &cnn, "--inputs", &fixture("x_wrong_shape.npy"), "--labels", &fixture("y16.npy")],
        &["inputs", "x_wrong_shape.npy", "per-sample shape [3, 8, 8]", "do not fit the model", "to have 1 channels, but got 3"],
    );
    fails_with(
        &["--model", &cnn, "--inputs", &fixture("x_int.npy"), "--labels", &fixture("y16.npy")],
        &["inputs", "x_int.npy", "dtype int64", "float32 or float64"],
    );
    fails_with(
        &["--model", &cnn, "--inputs", &fixture("x_nan.npy"), "--labels", &fixture("y16.npy")],
        &["inputs", "x_nan.npy", "1 non-finite value", "sample 2"],
    );
    fails_with(
        &["--model", &cnn, "--inputs", &fixture("not_npy.npy"), "--labels", &fixture("y16.npy")],
        &["inputs", "not_npy.npy is not a .npy file"],
    );
    fails_with(
        &["--model", &cnn, "--inputs", &fixture("absent.npy"), "--labels", &fixture("y16.npy")],
        &["inputs", "absent.npy: no such file"],
    );
    // The built-in models check shapes too (f_* forward, no panic).
    fails_with(
        &["--model", "mlp", "--inputs", &fixture("x_wrong_shape.npy"), "--labels", &fixture("y16.npy")],
        &["x_wrong_shape.npy", "do not fit the model mlp"],
    );
}

#[test]
fn labels_and_attributes_that_do_not_fit_are_named() {
    let cnn = fixture("cnn_traced.pt");
    let x = fixture("digits_x.npy");
    fails_with(
        &["--model", &cnn, "--inputs", &x, "--labels", &fixture("y16.npy")],
        &["labels", "y16.npy", "16 samples along dimension 0", "digits_x.npy has 256"],
    );
    // 16 valid inputs to pair with the 16-sample label fixtures.
    let x16_path = scratch("x16.npy");
    write_first_16(&x, &x16_path);
    let x16 = x16_path.to_str().unwrap().to_string();
    let run16 = |labels: &str, extra: &[&str], expected: &[&str]| {
        let mut args = vec!["--model", cnn.as_str(), "--inputs", x16.as_str(), "--labels", labels];
        args.extend_from_slice(extra);
        fails_with(&args, expected);
    };
    run16(&fixture("y_float.npy"), &[], &["labels", "y_float.npy", "dtype float32", "integer class ids"]);
    run16(&fixture("y_out_of_range.npy"), &[], &["labels", "y_out_of_range.npy", "value 12 at index 5", "outside 0..10"]);
    run16(&fixture("y_short.npy"), &[], &["labels", "y_short.npy", "10 samples", "has 16"]);
    run16(&fixture("y_2d.npy"), &[], &["labels", "y_2d.npy", "shape [16, 2]"]);
    run16(&fixture("y16.npy"), &["--attribute", &fixture("a_float.npy")], &["attribute", "a_float.npy", "dtype float64", "integers"]);
    run16(&fixture("y16.npy"), &["--attribute", &fixture("y_short.npy")], &["attribute", "y_short.npy", "shape [10]"]);
    run16(&fixture("y16.npy"), &["--loss", "mse"], &["labels", "y16.npy", "mse needs float targets"]);
    run16(&fixture("y_float.npy"), &["--loss", "mse"], &["labels", "y_float.npy", "per-sample shape []", "outputs [10] per sample"]);
    // And the 16 valid samples with valid labels do run (M3 absent: too few samples).
    let out = audit(&["--model", &cnn, "--inputs", &x16, "--labels", &fixture("y16.npy"), "--batch-size", "8"]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
}

/// Writes the first 16 samples of a float32 .npy (a valid input matching the 16-label fixtures).
fn write_first_16(src: &str, dst: &Path) {
    use npyz::WriterBuilder;
    let (shape, x) = read_f32(src);
    let per: u64 = shape[1..].iter().product();
    let mut new_shape = shape.clone();
    new_shape[0] = 16;
    let mut w = npyz::WriteOptions::new().default_dtype().shape(&new_shape).writer(std::fs::File::create(dst).unwrap()).begin_nd().unwrap();
    w.extend(x[..(16 * per) as usize].iter().copied()).unwrap();
    w.finish().unwrap();
}

#[test]
fn a_token_torchscript_model_is_audited_with_m1_on_its_embeddings() {
    let json = scratch("tokens.json");
    let out = audit(&[
        "--model", &fixture("token_scripted.pt"),
        "--inputs", &fixture("tokens_x.npy"),
        "--labels", &fixture("tokens_y.npy"),
        "--attribute", &fixture("tokens_a.npy"),
        "--batch-size", "16",
        "--json", json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    assert!(String::from_utf8_lossy(&out.stdout).contains("M1 on the embedding representation"));
    let r = report(&json);
    let rows = r["layers"].as_array().unwrap();
    assert_eq!(rows.iter().map(|row| row["name"].as_str().unwrap()).collect::<Vec<_>>(), vec!["emb", "fc"]);
    for row in rows {
        assert!(row["sensitivity"].as_f64().is_some_and(|s| s > 0.0), "{}", row["sensitivity"]);
        assert_eq!(row["sensitivity_representation"], "embedding");
        assert_eq!(row["details"]["m1"]["representation"], "embedding");
        assert!(row["subspace_distance"].is_f64(), "M2 on token ids: {}", row["absent"]);
    }
    // M5 of a noised release on the embeddings: the prior is the embeddings' variance.
    let json = scratch("tokens_noised.json");
    let out = audit(&[
        "--model", &fixture("token_scripted.pt"),
        "--inputs", &fixture("tokens_x.npy"),
        "--labels", &fixture("tokens_y.npy"),
        "--batch-size", "16",
        "--defence", "noise(clip_norm=0.5,multiplier=0.5)",
        "--json", json.to_str().unwrap(),
    ]);
    assert_eq!(out.status.code(), Some(0), "{}", stderr(&out));
    let r = report(&json);
    let release = &r["release"];
    let v = release["prior_variance"].as_f64().unwrap();
    assert!(v > 0.0 && release["prior_variance_source"].as_str().unwrap().contains("embeddings"), "{release}");
    let mut sum = 0.0;
    for row in r["layers"].as_array().unwrap() {
        let (bits, dfil) = (row["reconstruction_bound_bits"].as_f64().unwrap(), row["dfil"].as_f64().unwrap());
        assert!(bits > 0.0 && (bits - 0.5 * (1.0 + v * dfil).log2()).abs() < 1e-12, "{}", row["name"]);
        assert_eq!(row["details"]["m5"]["noise_std"].as_f64(), Some(0.25));
        sum += dfil;
    }
    assert!((release["release_dfil"].as_f64().unwrap() - sum).abs() < 1e-9 * sum, "dFIL adds over the layers: {release}");
    // Token ids need the split: a model without it names what is missing.
    fails_with(
        &["--model", &fixture("mlp_scripted.pt"), "--inputs", &fixture("tokens_x.npy"), "--labels", &fixture("tokens_y.npy")],
        &["inputs", "tokens_x.npy", "dtype int64", "float32 or float64", "embed and forward_embedded"],
    );
}

fn digits_audit(extra: &[&str], json: &Path) -> Value {
    let mut args = vec![
        "--model".to_string(), fixture("cnn_traced.pt"),
        "--inputs".to_string(), fixture("digits_x.npy"),
        "--labels".to_string(), fixture("digits_y.npy"),
        "--batch-size".to_string(), "16".to_string(), "--probes".to_string(), "4".to_string(), "--seed".to_string(), "5".to_string(),
        "--json".to_string(), json.display().to_string(),
    ];
    args.extend(extra.iter().map(|s| s.to_string()));
    let out = audit(&args.iter().map(String::as_str).collect::<Vec<_>>());
    assert_eq!(out.status.code(), Some(0), "{extra:?}: {}", stderr(&out));
    report(json)
}

#[test]
fn audit_with_a_defence_measures_every_metric_on_the_defended_release() {
    // Batch-16 release norms are 0.02 (conv1) to 0.11 (fc2): a clip at 0.05 bites on three layers.
    let noise = "noise(clip_norm=0.05,multiplier=0.1)";
    let raw = digits_audit(&["--attribute", &fixture("digits_a.npy")], &scratch("raw.json"));
    let def = digits_audit(&["--attribute", &fixture("digits_a.npy"), "--defence", noise, "--invert", "--invert-releases", "1", "--invert-iterations", "20"], &scratch("noised.json"));
    assert_eq!(def["defence"], "noise(clip_norm=0.05, multiplier=0.1)");
    assert!(raw["defence"].is_null());

    // The prior variance defaults to the per-dimension population variance of all inputs.
    let (shape, x) = read_f32(&fixture("digits_x.npy"));
    let (n, d) = (shape[0] as usize, x.len() / shape[0] as usize);
    let mut v = 0.0;
    for j in 0..d {
        let mean = (0..n).map(|i| x[i * d + j] as f64).sum::<f64>() / n as f64;
        v += (0..n).map(|i| (x[i * d + j] as f64 - mean).powi(2)).sum::<f64>() / n as f64;
    }
    v /= d as f64;
    let release = &def["release"];
    assert!((release["prior_variance"].as_f64().unwrap() - v).abs() < 1e-6 * v, "{release} vs {v}");
    assert!(release["caveat"].as_str().unwrap().contains("stronger prior"));

    let mut sum = 0.0;
    for (r, d) in raw["layers"].as_array().unwrap().iter().zip(def["layers"].as_array().unwrap()) {
        let name = d["name"].as_str().unwrap();
        // Every metric is measured on the defended release.
        for key in ["sensitivity", "sensitivity_rms", "relative_sensitivity", "subspace_distance", "usable_information_bits", "usable_information_se", "usable_original_bits_per_dim", "reconstruction_bound_bits", "reconstruction_bound_se", "dfil", "unbiased_mse_floor"] {
            assert!(d[key].is_f64(), "{name} {key} = {} ({})", d[key], d["absent"]);
        }
        assert_eq!(d["absent"]["sensitivity_se"], "defended release: measured through the defence's Jacobian, no standard error");
        // The clip's Jacobian has spectral norm min(1, C / ||g||): the release is never more
        // sensitive (same probes; f32 against f64 arithmetic), and less where the clip bites.
        let (s_def, s_raw) = (d["sensitivity"].as_f64().unwrap(), r["sensitivity"].as_f64().unwrap());
        let norm = s_raw / r["relative_sensitivity"].as_f64().unwrap();
        assert!(s_def <= s_raw * (1.0 + 1e-6), "{name}: {s_def} > {s_raw}");
        if norm > 0.06 {
            assert!(s_def < s_raw * 0.05 / norm * 1.001, "{name}: clipped from {norm} to 0.05, S {s_raw} -> {s_def}");
        }
        // The noised per-sample gradients are not the raw ones.
        assert_ne!(d["details"]["m2"], r["details"]["m2"], "{name}: M2 of the defended release equals the raw one");
        let m5 = &d["details"]["m5"];
        assert!((m5["noise_std"].as_f64().unwrap() - 0.005).abs() < 1e-15);
        let (bits, dfil) = (d["reconstruction_bound_bits"].as_f64().unwrap(), d["dfil"].as_f64().unwrap());
        assert!(dfil > 0.0 && (bits - 0.5 * (1.0 + v * dfil).log2()).abs() < 1e-9, "{name}: {bits} vs dFIL {dfil}");
        assert!((d["unbiased_mse_floor"].as_f64().unwrap() * dfil - 1.0).abs() < 1e-12);
        assert!(r["reconstruction_bound_bits"].is_null() && r["absent"]["reconstruction_bound_bits"] == "deterministic release: no noise, no bound");
        sum += dfil;
    }
    let total = release["release_dfil"].as_f64().unwrap();
    assert!((total - sum).abs() < 1e-9 * sum, "dFIL adds over the layers: {total} vs {sum}");
    assert!((release["release_reconstruction_bound_bits"].as_f64().unwrap() - 0.5 * (1.0 + v * total).log2()).abs() < 1e-9);
    assert!(raw["release"]["release_reconstruction_bound_bits"].is_null());

    // --prior-variance overrides; a chain applies in order; clip alone gives no bound.
    let given = digits_audit(&["--defence", "sparsify(keep_fraction=0.5)", "--defence", noise, "--prior-variance", "2"], &scratch("chain.json"));
    assert_eq!(given["defence"], "sparsify(keep_fraction=0.5) > noise(clip_norm=0.05, multiplier=0.1)");
    assert_eq!(given["release"]["prior_variance"].as_f64(), Some(2.0));
    for row in given["layers"].as_array().unwrap() {
        let (bits, dfil) = (row["reconstruction_bound_bits"].as_f64().unwrap(), row["dfil"].as_f64().unwrap());
        assert!((bits - 0.5 * (1.0 + 2.0 * dfil).log2()).abs() < 1e-9);
    }
    let clip = digits_audit(&["--defence", "clip(max_norm=0.5)"], &scratch("clip.json"));
    assert!(clip["release"]["release_reconstruction_bound_bits"].is_null());
    assert!(clip["layers"][0]["sensitivity"].is_f64() && clip["layers"][0]["reconstruction_bound_bits"].is_null());

    // A defence that does not parse is named, with what is wrong; nothing is measured.
    let base = ["--model", "cnn", "--samples", "32"];
    for (bad, why) in [
        ("noise(clip_norm=0.5)", "noise needs multiplier=..."),
        ("blur(radius=1)", "unknown defence 'blur'"),
        ("noise(clip_norm=0.5,multiplier=x)", "'x' is not a number"),
        ("clip(max_norm=-1)", "max_norm"),
    ] {
        let mut args = base.to_vec();
        args.extend(["--defence", bad]);
        fails_with(&args, &["--defence", bad, why]);
    }
    let mut args = base.to_vec();
    args.extend(["--defence", noise, "--exact"]);
    fails_with(&args, &["--exact cannot be combined with --defence"]);
    let mut args = base.to_vec();
    args.extend(["--defence", noise, "--prior-variance", "0"]);
    fails_with(&args, &["--prior-variance must be a finite number > 0"]);
}
