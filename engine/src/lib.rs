//! volback's engine: the copy engine, and (growing) backup and restore
//! orchestration over volume drivers.

pub mod copy;
pub mod devices;
pub mod progress;
pub mod units;
