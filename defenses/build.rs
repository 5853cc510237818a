//! libtorch's link arguments, and the defences' binding to what tch does not expose of
//! libtorch (`src/device_rng.cpp`: a private generator of a tensor's device, for the noise).
fn main() {
    gradguard_build::link_libtorch();
    gradguard_build::compile_cpp("src/device_rng.cpp", "gradguard_defenses_rng");
}
