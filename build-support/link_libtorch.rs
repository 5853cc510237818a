//! Shared build script of every gradguard crate that builds a binary, test or example that
//! runs libtorch. Without it, binaries need LD_LIBRARY_PATH and the linker drops
//! libtorch_cuda, so CUDA silently reports unavailable. The rpath is a RUNPATH, so
//! LD_LIBRARY_PATH still wins on a machine whose libtorch lives elsewhere (a GPU host).
pub fn main() {
    // Exported by torch-sys' build script; visible only to crates that depend on it directly.
    if let Ok(lib) = std::env::var("DEP_TCH_LIBTORCH_LIB") {
        println!("cargo:rustc-link-arg=-Wl,-rpath={lib}");
    }
    println!("cargo:rustc-link-arg=-Wl,--no-as-needed");
    println!("cargo:rustc-link-arg=-ltorch");
    println!("cargo:rerun-if-env-changed=DEP_TCH_LIBTORCH_LIB");
}
