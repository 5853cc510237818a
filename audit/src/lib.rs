//! gradguard's offline audit as a library: the shipped digits data and example models.
#![warn(missing_docs)]

pub mod data;
pub mod models;
