//! The daemon's REST API: the JSON shapes (compatible with SlicerVM's SDKs) and a client.

pub mod client;
pub mod types;

pub use client::{ApiClient, ApiError};
pub use types::*;
