pub mod audit;
pub mod demo;
pub mod policy;
mod progress;
pub mod train;
pub mod validate;
