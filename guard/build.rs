//! libtorch's link arguments, and the guard's binding to libtorch's default random generators
//! (`src/measure/rng_state.cpp`), which tch does not expose.
fn main() {
    gradguard_build::link_libtorch();
    gradguard_build::compile_cpp("src/measure/rng_state.cpp", "gradguard_rng_state");
}
