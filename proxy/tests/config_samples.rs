//! Every real Istio sample in `tests/data/istio-samples/` loads, and compiles
//! together with serin's registry file for the bookinfo hosts.

use std::path::{Path, PathBuf};

use serin::config::{self, model::Resource};
use serin::snapshot::{EndpointRegistry, RouteAction, TlsMode};

const REGISTRY: &str = "serin-registry.yaml";

fn samples_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data/istio-samples")
}

fn sample_files() -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(samples_dir())
        .expect("samples folder")
        .map(|e| e.expect("entry").path())
        .filter(|p| p.extension().is_some_and(|x| x == "yaml") && !p.ends_with(REGISTRY))
        .collect();
    files.sort();
    files
}

#[test]
fn every_sample_loads_alone() {
    let files = sample_files();
    assert_eq!(files.len(), 7, "the seven bookinfo samples");
    for file in files {
        let set = config::load_path(&file).unwrap_or_else(|e| panic!("{}:\n{e}", file.display()));
        assert!(!set.resources.is_empty(), "{}", file.display());
    }
}

/// Bookinfo's VirtualServices route to subsets, so (as in Istio's bookinfo
/// walkthrough) they are applied after the DestinationRules that define them.
const SUBSETS: &str = "destination-rule-all-mtls.yaml";

#[test]
fn every_sample_compiles_with_the_registry() {
    for file in sample_files() {
        let mut paths = vec![file.clone(), samples_dir().join(REGISTRY)];
        if file.file_name().is_some_and(|n| n.to_string_lossy().starts_with("virtual-service")) {
            paths.push(samples_dir().join(SUBSETS));
        }
        let set = config::load_paths(&paths).unwrap_or_else(|e| panic!("{}:\n{e}", file.display()));
        let snapshot = config::compile(&set, &EndpointRegistry::default(), "test")
            .unwrap_or_else(|e| panic!("{}:\n{e}", file.display()));
        assert_eq!(snapshot.version, set.hash);
        assert_eq!(snapshot.services.len(), 4, "{}", file.display());
        // Every registry host is routable, with or without a VirtualService.
        for host in ["productpage", "reviews", "ratings.default", "details.default.svc.cluster.local"] {
            assert!(snapshot.find_virtual_host(host).is_some(), "{}: {host}", file.display());
        }
    }
}

#[test]
fn reviews_90_10_is_a_relative_split_over_subsets() {
    let set = config::load_paths(&[
        samples_dir().join("virtual-service-reviews-90-10.yaml"),
        samples_dir().join("destination-rule-reviews.yaml"),
        samples_dir().join(REGISTRY),
    ])
    .expect("loads");
    let snapshot = config::compile(&set, &EndpointRegistry::default(), "test").expect("compiles");
    let vh = snapshot.find_virtual_host("reviews").expect("reviews host");
    assert_eq!(vh.name, "default/reviews");
    let RouteAction::Forward(w) = &vh.routes[0].action else { panic!("forward") };
    let names: Vec<(&str, u32)> = w.destinations.iter().map(|d| (d.cluster.name.as_str(), d.weight)).collect();
    assert_eq!(
        names,
        vec![
            ("outbound|9080|v1|reviews.default.svc.cluster.local", 90),
            ("outbound|9080|v2|reviews.default.svc.cluster.local", 10)
        ]
    );
    let v2 = &w.destinations[1].cluster;
    assert_eq!(v2.endpoints.len(), 1);
    assert_eq!(v2.endpoints[0].label("version"), Some("v2"));
    assert_eq!(v2.endpoints[0].workload, "reviews-v2");
    assert_eq!(v2.policy.load_balancer, serin::snapshot::LoadBalancer::Random);
}

#[test]
fn gateway_sample_parses_and_its_vs_stays_off_the_sidecar() {
    let set = config::load_paths(&[samples_dir().join("bookinfo-gateway.yaml"), samples_dir().join(REGISTRY)])
        .expect("loads");
    let gateway = set.resources.iter().find_map(|r| match &r.resource {
        Resource::Gateway(g) => Some(g),
        _ => None,
    });
    let gateway = gateway.expect("gateway in the model");
    assert_eq!(gateway.spec.servers[0].port.number, 80);
    assert_eq!(gateway.spec.servers[0].hosts, vec!["*"]);
    let snapshot = config::compile(&set, &EndpointRegistry::default(), "test").expect("compiles");
    // The `*` VirtualService is bound to bookinfo-gateway only: not a sidecar route.
    assert!(snapshot.virtual_hosts.iter().all(|vh| vh.name.starts_with("service:")));
}

#[test]
fn mtls_rule_is_stored_and_ports_map_per_endpoint() {
    let set = config::load_paths(&[samples_dir().join("destination-rule-all-mtls.yaml"), samples_dir().join(REGISTRY)])
        .expect("loads");
    let snapshot = config::compile(&set, &EndpointRegistry::default(), "test").expect("compiles");
    let ratings = &snapshot.clusters["outbound|9080||ratings.default.svc.cluster.local"];
    assert_eq!(ratings.policy.tls, Some(TlsMode::IstioMutual));
    let mut addrs: Vec<String> = ratings.endpoints.iter().map(|e| e.addr.to_string()).collect();
    addrs.sort();
    assert_eq!(addrs, vec!["127.0.0.31:9080", "127.0.0.32:19080"]);
}

#[test]
fn fault_samples_keep_the_deprecated_percent() {
    for (file, delay) in
        [("virtual-service-ratings-test-delay.yaml", true), ("virtual-service-ratings-test-abort.yaml", false)]
    {
        let set = config::load_paths(&[
            samples_dir().join(file),
            samples_dir().join("destination-rule-all-mtls.yaml"),
            samples_dir().join(REGISTRY),
        ])
        .expect("loads");
        let snapshot = config::compile(&set, &EndpointRegistry::default(), "test").expect("compiles");
        let vh = snapshot.find_virtual_host("ratings").expect("ratings");
        let fault = vh.routes[0].fault.as_ref().expect("fault on the jason route");
        if delay {
            assert_eq!(fault.delay, Some((std::time::Duration::from_secs(7), 100.0)));
        } else {
            let abort = fault.abort.as_ref().expect("abort");
            assert_eq!((abort.status.as_u16(), abort.percentage), (500, 100.0));
        }
        assert!(vh.routes[1].fault.is_none());
    }
}
