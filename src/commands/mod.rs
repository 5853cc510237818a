pub mod audit;
pub mod demo;
pub mod log;
pub mod policy;
mod progress;
pub mod report;
pub mod train;
pub mod validate;
