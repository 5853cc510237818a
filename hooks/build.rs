//! The shared libtorch link arguments, and gradguard's TorchScript binding
//! (`src/script_module.cpp`), compiled against the libtorch tch links.
#[path = "../build-support/link_libtorch.rs"]
mod link_libtorch;

use std::path::PathBuf;

fn main() {
    link_libtorch::main();
    println!("cargo:rerun-if-changed=src/script_module.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    // torch-sys exports its libtorch's lib folder; the headers sit next to it (a libtorch
    // download and PyTorch's wheel alike: <root>/lib and <root>/include).
    let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") else {
        panic!("DEP_TCH_LIBTORCH_LIB is not set: gradguard-hooks needs torch-sys' libtorch (see README, Set-up)");
    };
    let include = PathBuf::from(lib).join("..").join("include");
    // The ABI of PyTorch's wheels since 2.6 and of the cxx11 libtorch downloads.
    let abi = std::env::var("LIBTORCH_CXX11_ABI").unwrap_or_else(|_| "1".to_owned());
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag(format!("-D_GLIBCXX_USE_CXX11_ABI={abi}"))
        .flag("-DGLOG_USE_GLOG_EXPORT")
        .file("src/script_module.cpp")
        .compile("gradguard_script_module");
}
