//! The inbound side of a sidecar: traffic addressed to the pod, forwarded to the
//! local app (`--app`) and recorded with `reporter="destination"`. The same
//! request path serves it, over a one-route snapshot built here.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::AtomicU64;
use std::time::{Duration, SystemTime};

use crate::snapshot::{
    Cluster, Endpoint, EndpointRegistry, HeaderOps, HostPattern, RetryOn, RetryPolicy, Route, RouteAction,
    RouteDestination, ServiceInfo, Snapshot, TrafficPolicy, VirtualHost, WeightedDestinations,
};
use crate::state::LocalWorkload;

/// The inbound snapshot: any host, any path → the app at `app`. Istio's inbound
/// default retry (`reset-before-request`) becomes one retry on connect failure.
pub fn snapshot(app: SocketAddr, inbound_port: u16, local: &LocalWorkload, registry: &EndpointRegistry) -> Snapshot {
    let host = format!("{}.{}.svc.cluster.local", local.app, local.namespace);
    let service = Arc::new(ServiceInfo {
        host: host.clone(),
        name: local.app.clone(),
        namespace: local.namespace.clone(),
        ports: vec![(app.port(), "HTTP".into())],
    });
    let endpoint = Arc::new(Endpoint {
        addr: app,
        labels: vec![("app".into(), local.app.clone()), ("version".into(), local.version.clone())],
        workload: local.workload.clone(),
        namespace: local.namespace.clone(),
        service_account: None,
        state: registry.get_or_create(app),
    });
    let name = format!("inbound|{inbound_port}||");
    let cluster = Arc::new(Cluster {
        name: name.clone(),
        service,
        subset: None,
        port: app.port(),
        endpoints: vec![endpoint],
        policy: TrafficPolicy::default(),
        rr_cursor: AtomicU64::new(0),
    });
    let destinations = WeightedDestinations::new(vec![RouteDestination {
        cluster: cluster.clone(),
        weight: 100,
        headers: HeaderOps::default(),
    }]);
    let route = Route {
        name: "inbound".into(),
        matches: Vec::new(),
        action: match destinations {
            Some(d) => RouteAction::Forward(d),
            None => RouteAction::Direct { status: http::StatusCode::SERVICE_UNAVAILABLE, body: bytes::Bytes::new() },
        },
        timeout: None,
        retry: RetryPolicy {
            attempts: 1,
            per_try_timeout: None,
            retry_on: RetryOn { connect_failure: true, ..RetryOn::default() },
            retriable_status_codes: Vec::new(),
            backoff_base: Duration::from_millis(25),
        },
        fault: None,
        headers: HeaderOps::default(),
        rewrite: None,
        mirror: None,
    };
    Snapshot {
        version: format!("inbound-{app}"),
        source: format!("inbound:{app}"),
        created: SystemTime::now(),
        virtual_hosts: vec![VirtualHost {
            name: "inbound".into(),
            domains: vec![HostPattern::Any],
            routes: vec![route],
        }],
        clusters: HashMap::from([(name, cluster)]),
        services: HashMap::new(),
    }
}
