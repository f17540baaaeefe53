//! Passive outlier detection (DestinationRule `outlierDetection`): consecutive 5xx
//! or gateway errors eject an endpoint for `baseEjectionTime × ejections`, within
//! `maxEjectionPercent` of the cluster; it comes back when that time has passed.

use std::sync::atomic::Ordering;

use crate::snapshot::{Cluster, Endpoint};

/// What one try ended with, as outlier detection sees it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// A response with this status.
    Status(u16),
    /// Connect failure, reset or timeout: a local-origin gateway error.
    Failure,
}

/// Updates `endpoint`'s counters after a try and ejects it if a threshold is reached.
pub fn observe(cluster: &Cluster, endpoint: &Endpoint, outcome: Outcome) {
    let Some(policy) = &cluster.policy.outlier else { return };
    let state = &endpoint.state;
    let (is_5xx, is_gateway) = match outcome {
        Outcome::Status(s) => (s >= 500, matches!(s, 502..=504)),
        Outcome::Failure => (true, true),
    };
    if !is_5xx {
        state.consecutive_5xx.store(0, Ordering::Relaxed);
        state.consecutive_gateway.store(0, Ordering::Relaxed);
        return;
    }
    let c5 = state.consecutive_5xx.fetch_add(1, Ordering::Relaxed) + 1;
    let cg = if is_gateway {
        state.consecutive_gateway.fetch_add(1, Ordering::Relaxed) + 1
    } else {
        state.consecutive_gateway.store(0, Ordering::Relaxed);
        0
    };
    let tripped = (policy.consecutive_5xx != 0 && c5 >= policy.consecutive_5xx)
        || (policy.consecutive_gateway_errors != 0 && cg >= policy.consecutive_gateway_errors);
    if !tripped || state.is_ejected() {
        return;
    }
    let total = cluster.endpoints.len() as u64;
    let ejected = cluster.endpoints.iter().filter(|e| e.state.is_ejected()).count() as u64;
    // Envoy's rule: eject while the ejected share is below the maximum.
    if ejected * 100 >= u64::from(policy.max_ejection_percent) * total {
        return;
    }
    let times = state.ejections.fetch_add(1, Ordering::Relaxed) + 1;
    let duration = policy.base_ejection_time.saturating_mul(times);
    let until = state.now_ms() + duration.as_millis() as u64;
    state.ejected_until_ms.store(until.max(1), Ordering::Relaxed);
    state.consecutive_5xx.store(0, Ordering::Relaxed);
    state.consecutive_gateway.store(0, Ordering::Relaxed);
    tracing::warn!(cluster = %cluster.name, endpoint = %endpoint.addr, ?duration, ejections = times, "outlier detection ejected endpoint");
}
