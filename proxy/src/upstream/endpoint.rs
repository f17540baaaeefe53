//! Per-endpoint runtime state shared across snapshots: in-flight and total request
//! counts, outlier-detection state and the connection pool.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Instant;

use super::pool::Pool;

/// Runtime state of one upstream address. Snapshots hold it by `Arc`, so a reload
/// that keeps an endpoint keeps its pool and its ejection state.
#[derive(Debug)]
pub struct EndpointState {
    pub addr: SocketAddr,
    /// Requests in flight (for LEAST_REQUEST and `/clusters`).
    pub active: AtomicU64,
    /// Requests sent in total.
    pub total: AtomicU64,
    /// Consecutive 5xx responses (outlier detection).
    pub consecutive_5xx: AtomicU32,
    /// Consecutive gateway errors (502/503/504 and connect failures).
    pub consecutive_gateway: AtomicU32,
    /// Ejected until this many milliseconds after the registry's epoch (0 = not ejected).
    pub ejected_until_ms: AtomicU64,
    /// How many times it was ejected (ejection time grows with it).
    pub ejections: AtomicU32,
    /// Upstream connections to this address.
    pub pool: Pool,
    epoch: Instant,
}

impl EndpointState {
    /// Milliseconds since the registry's epoch.
    pub fn now_ms(&self) -> u64 {
        self.epoch.elapsed().as_millis() as u64
    }

    /// Whether outlier detection has ejected this endpoint right now.
    pub fn is_ejected(&self) -> bool {
        let until = self.ejected_until_ms.load(Ordering::Relaxed);
        until != 0 && self.now_ms() < until
    }
}

/// Finds or creates the [`EndpointState`] of an address. Entries no snapshot holds
/// any more are dropped on the next call after they are released.
#[derive(Debug)]
pub struct EndpointRegistry {
    map: Mutex<HashMap<SocketAddr, Weak<EndpointState>>>,
    epoch: Instant,
}

impl Default for EndpointRegistry {
    fn default() -> Self {
        EndpointRegistry { map: Mutex::new(HashMap::new()), epoch: Instant::now() }
    }
}

impl EndpointRegistry {
    /// The state for `addr`, shared with any live snapshot that already has it.
    pub fn get_or_create(&self, addr: SocketAddr) -> Arc<EndpointState> {
        let mut map = self.map.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(state) = map.get(&addr).and_then(Weak::upgrade) {
            return state;
        }
        map.retain(|_, weak| weak.strong_count() > 0);
        let state = Arc::new(EndpointState {
            addr,
            active: AtomicU64::new(0),
            total: AtomicU64::new(0),
            consecutive_5xx: AtomicU32::new(0),
            consecutive_gateway: AtomicU32::new(0),
            ejected_until_ms: AtomicU64::new(0),
            ejections: AtomicU32::new(0),
            pool: Pool::new(addr),
            epoch: self.epoch,
        });
        map.insert(addr, Arc::downgrade(&state));
        state
    }
}
