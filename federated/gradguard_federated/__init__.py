"""gradguard's federated deployment on Flower: clients enforce the privacy policy (in the Rust
extension `gradguard_fl`) before any update leaves them. See docs/FEDERATED.md."""
