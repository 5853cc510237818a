fn main() {
    gradguard_build::link_libtorch();
}
