//! volback's engine: the copy engine, and (growing) backup and restore
//! orchestration over volume drivers.

pub mod catalog;
pub mod config;
pub mod copy;
pub mod demo;
pub mod devices;
pub mod progress;
pub mod record;
pub mod service;
pub mod units;
