//! The build-script helper of a crate that uses gradguard (or tch) and builds binaries, tests
//! or examples that run libtorch. Without it such a binary does not start ("error while loading
//! shared libraries: libtorch_cpu.so") unless `LD_LIBRARY_PATH` names libtorch, and the linker
//! drops `libtorch_cuda`, so CUDA silently reports unavailable.
//!
//! In the crate's `Cargo.toml`, `gradguard-build` as a build dependency; its `build.rs`:
//!
//! ```no_run
//! fn main() {
//!     gradguard_build::link_libtorch();
//! }
//! ```
//!
//! It reads the libtorch folder that gradguard (`DEP_GRADGUARD_LIBTORCH_LIB`) or torch-sys
//! (`DEP_TCH_LIBTORCH_LIB`) exports to the crates that depend on them directly, and links
//! with that folder as a RUNPATH, so that `LD_LIBRARY_PATH` still wins on a machine whose
//! libtorch lives elsewhere (a GPU host).
#![deny(missing_docs, unreachable_pub)]

use std::path::PathBuf;

/// Where libtorch's shared libraries are, as the crates that build against it export it.
pub fn libtorch_lib() -> Option<PathBuf> {
    ["DEP_GRADGUARD_LIBTORCH_LIB", "DEP_TCH_LIBTORCH_LIB"].iter().find_map(|var| {
        println!("cargo:rerun-if-env-changed={var}");
        std::env::var_os(var).map(PathBuf::from)
    })
}

/// Links the crate's binaries, tests and examples against libtorch (all of it, CUDA
/// included) with libtorch's folder as their RUNPATH. Call it from `build.rs`.
pub fn link_libtorch() {
    match libtorch_lib() {
        Some(lib) => {
            println!("cargo:rustc-link-arg=-Wl,-rpath={}", lib.display());
            // Exported to the crate's direct dependents as DEP_<LINKS>_LIBTORCH_LIB where the
            // crate declares `links` (gradguard does, for its users' build scripts).
            println!("cargo:libtorch_lib={}", lib.display());
        }
        None => println!(
            "cargo:warning=gradguard-build: no libtorch folder exported (depend on gradguard or torch-sys directly); binaries will need LD_LIBRARY_PATH"
        ),
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
}

/// Compiles one of gradguard's C++ bindings (`source`, relative to the crate) into the static
/// library `name` against the headers of the libtorch gradguard links (they sit next to its
/// lib folder in a libtorch download and in PyTorch's wheel alike).
pub fn compile_cpp(source: &str, name: &str) {
    println!("cargo:rerun-if-changed={source}");
    println!("cargo:rerun-if-env-changed=LIBTORCH_CXX11_ABI");
    let Some(lib) = libtorch_lib() else {
        panic!("{name}: no libtorch folder exported by torch-sys (DEP_TCH_LIBTORCH_LIB); see README, Set-up");
    };
    let include = lib.join("..").join("include");
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
        .file(source)
        .compile(name);
}
