pub mod audit;
pub mod demo;
pub mod policy;
pub mod validate;
