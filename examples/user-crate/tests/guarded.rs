//! The crate's own test binary starts (libtorch found through gradguard-build's RUNPATH) and
//! trains under the guard.
#[test]
fn a_rule_less_guard_releases_every_step_and_training_learns() {
    let policy = "version = 1\n[settings]\nseed = 1\nestimate_every = 5\n";
    let (counts, loss) = gru_guarded::train(policy, 60, tch::Device::Cpu).unwrap();
    assert_eq!((counts.released, counts.held, counts.blocked), (60, 0, 0), "{counts:?}");
    assert!(loss < (4f64).ln(), "the GRU learns the last token's class: loss {loss}");
}

#[test]
fn a_floor_above_the_batch_holds_every_other_step() {
    let policy = "version = 1\n[settings]\nseed = 1\naggregation_floor = 64\n";
    let (counts, _) = gru_guarded::train(policy, 10, tch::Device::Cpu).unwrap();
    assert_eq!((counts.released, counts.held, counts.blocked), (5, 5, 0), "{counts:?}");
}
