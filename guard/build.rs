//! libtorch's link arguments, and the guard's binding to what tch does not expose of libtorch
//! (`src/measure/libtorch_ext.cpp`: the default random generators' state, a gradient slot).
fn main() {
    gradguard_build::link_libtorch();
    gradguard_build::compile_cpp("src/measure/libtorch_ext.cpp", "gradguard_libtorch_ext");
}
