//! Upstream side of the proxy: endpoint state, connection pools, load balancing,
//! the weighted split between destinations and outlier detection.

pub mod endpoint;
pub mod pool;
