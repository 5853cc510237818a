//! Layer discovery: grouping by module path, creation order, buffers excluded.
use gradguard_guard::{LayerMap, measure::{group_by_layer, layer_name}};
use tch::{nn, Device};

#[test]
fn names_group_by_module_path_in_creation_order() {
    let vs = nn::VarStore::new(Device::Cpu);
    let root = vs.root();
    // Created in non-alphabetical order, so hash or name order would differ.
    let _z = nn::linear(&root / "zeta", 3, 4, Default::default());
    let _bn = nn::batch_norm1d(&root / "alpha" / "norm", 4, Default::default());
    let _m = nn::linear(&root / "mid", 4, 2, Default::default());
    let _dup = root.var("mid", &[2], nn::Init::Const(0.0));
    let map = LayerMap::from_var_store(&vs).unwrap();
    assert_eq!(map.names(), vec!["zeta", "alpha.norm", "mid"]);
    let infos = map.infos();
    assert_eq!(infos[0].params, 3 * 4 + 4);
    // Batch norm: weight and bias are parameters; running_mean/var are buffers and excluded.
    assert_eq!(infos[1].params, 4 + 4);
    assert_eq!(infos[2].params, 4 * 2 + 2 + 2, "the top-level 'mid' variable (no path) joins layer 'mid'");
}

#[test]
fn layer_name_rules() {
    assert_eq!(layer_name("conv1.weight"), "conv1");
    assert_eq!(layer_name("features.0.bias"), "features.0");
    assert_eq!(layer_name("conv1.weight__1"), "conv1");
    assert_eq!(layer_name("scale__2"), "scale");
    assert_eq!(layer_name("w"), "w");
}

#[test]
fn names_group_into_layers_in_first_appearance_order() {
    let names = ["fc.weight", "scale__1", "block.0.conv.weight", "fc.weight__1", "scale", "fc__1.weight", "block.0.conv.bias"];
    let groups = group_by_layer(names.iter().map(|n| (n.to_string(), ())));
    let groups: Vec<(&str, Vec<&str>)> = groups.iter().map(|(l, ps)| (l.as_str(), ps.iter().map(|(p, _)| p.as_str()).collect())).collect();
    assert_eq!(
        groups,
        vec![
            ("fc", vec!["fc.weight", "fc.weight__1"]),
            ("scale", vec!["scale__1", "scale"]),
            ("block.0.conv", vec!["block.0.conv.weight", "block.0.conv.bias"]),
            ("fc__1", vec!["fc__1.weight"]),
        ]
    );
}
