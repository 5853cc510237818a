//! libtorch's link arguments, and gradguard's TorchScript binding (`src/script_module.cpp`),
//! compiled against the libtorch tch links.
fn main() {
    gradguard_build::link_libtorch();
    gradguard_build::compile_cpp("src/script_module.cpp", "gradguard_script_module");
}
