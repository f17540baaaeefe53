//! Upstream side of the proxy: endpoint state, connection pools, load balancing,
//! the weighted split between destinations and outlier detection.

pub mod balance;
pub mod endpoint;
pub mod outlier;
pub mod pool;
pub mod split;
