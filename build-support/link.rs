//! The build script of every gradguard crate that builds a binary, test or example running
//! libtorch (the same helper a user's crate calls).
fn main() {
    gradguard_build::link_libtorch();
}
