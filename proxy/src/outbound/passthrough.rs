//! Envoy's two catch-all clusters for captured traffic to destinations the
//! registry does not know: `PassthroughCluster` (outbound policy ALLOW_ANY: on to
//! the original destination) and `BlackHoleCluster` (REGISTRY_ONLY: refused).
//! Both appear under these names in the metrics' `destination_service` labels.

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::Duration;

use crate::snapshot::{
    Cluster, Endpoint, HeaderOps, Route, RouteAction, RouteDestination, ServiceInfo, TrafficPolicy,
    WeightedDestinations,
};
use crate::state::Shared;

/// Envoy's name for the original-destination cluster.
pub const PASSTHROUGH: &str = "PassthroughCluster";
/// Envoy's name for the cluster that refuses unknown destinations.
pub const BLACK_HOLE: &str = "BlackHoleCluster";

fn service(name: &str) -> Arc<ServiceInfo> {
    Arc::new(ServiceInfo {
        host: name.into(),
        name: name.into(),
        namespace: "unknown".into(),
        ports: Vec::new(),
        addresses: Vec::new(),
    })
}

/// A one-endpoint cluster that sends to `dst` as it is.
pub fn cluster(dst: SocketAddr, shared: &Shared) -> Arc<Cluster> {
    let endpoint = Arc::new(Endpoint {
        addr: dst,
        labels: Vec::new(),
        workload: "unknown".into(),
        namespace: "unknown".into(),
        service_account: None,
        state: shared.registry.get_or_create(dst),
    });
    Arc::new(Cluster {
        name: PASSTHROUGH.into(),
        service: service(PASSTHROUGH),
        subset: None,
        port: dst.port(),
        endpoints: vec![endpoint],
        policy: TrafficPolicy::default(),
        rr_cursor: AtomicU64::new(0),
    })
}

/// The black hole, for the metrics of a refused connection.
pub fn black_hole() -> Arc<Cluster> {
    Arc::new(Cluster {
        name: BLACK_HOLE.into(),
        service: service(BLACK_HOLE),
        subset: None,
        port: 0,
        endpoints: Vec::new(),
        policy: TrafficPolicy::default(),
        rr_cursor: AtomicU64::new(0),
    })
}

/// The HTTP route of Envoy's `allow_any` virtual host: every request to the
/// original destination, no retries (the destination is unknown).
pub fn route(dst: SocketAddr, shared: &Shared) -> Option<Route> {
    let destinations = WeightedDestinations::new(vec![RouteDestination {
        cluster: cluster(dst, shared),
        weight: 100,
        headers: HeaderOps::default(),
    }])?;
    Some(Route {
        name: "allow_any".into(),
        matches: Vec::new(),
        action: RouteAction::Forward(destinations),
        timeout: None,
        retry: crate::snapshot::RetryPolicy {
            attempts: 0,
            per_try_timeout: None,
            retry_on: Default::default(),
            retriable_status_codes: Vec::new(),
            backoff_base: Duration::from_millis(25),
        },
        fault: None,
        headers: HeaderOps::default(),
        rewrite: None,
        mirror: None,
    })
}
