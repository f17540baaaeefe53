//! Micro-benchmarks of the request path's pure parts: route matching over a
//! 10-route table plus the weighted pick, and header handling.
//!
//! `cargo bench -p serin-benches --bench hot_path`

use std::hint::black_box;
use std::net::SocketAddr;

use criterion::{Criterion, criterion_group, criterion_main};
use http::{HeaderMap, HeaderValue, Method};
use serin::config;
use serin::forward::headers;
use serin::router::{self, RequestView};
use serin::snapshot::{EndpointRegistry, RouteAction, Snapshot};
use serin::upstream::{balance, split};

/// A VirtualService with 9 header/uri-matched routes before the 95/5 split.
fn ten_route_snapshot() -> Snapshot {
    let mut yaml = String::from(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {name: payment, namespace: default}\nspec:\n  hosts: [payment.default.svc.cluster.local]\n  resolution: STATIC\n  ports: [{number: 8080, name: http, protocol: HTTP}]\n  endpoints:\n",
    );
    for i in 0..4 {
        let version = if i == 3 { "v2" } else { "v1" };
        yaml.push_str(&format!(
            "  - {{address: 127.0.0.1, ports: {{http: {}}}, labels: {{app: payment, version: {version}}}}}\n",
            9000 + i
        ));
    }
    yaml.push_str("---\napiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: payment, namespace: default}\nspec:\n  host: payment\n  subsets:\n  - {name: v1, labels: {version: v1}}\n  - {name: v2, labels: {version: v2}}\n");
    yaml.push_str("---\napiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: payment, namespace: default}\nspec:\n  hosts: [payment]\n  http:\n");
    for i in 0..9 {
        yaml.push_str(&format!(
            "  - name: r{i}\n    match: [{{headers: {{x-tenant: {{exact: t{i}}}}}, uri: {{prefix: /api/{i}}}}}]\n    route: [{{destination: {{host: payment, subset: v2}}}}]\n"
        ));
    }
    yaml.push_str("  - name: split\n    route:\n    - {destination: {host: payment, subset: v1}, weight: 95}\n    - {destination: {host: payment, subset: v2}, weight: 5}\n");
    let set = config::load_str(&yaml, "bench.yaml").expect("bench config loads");
    config::compile(&set, &EndpointRegistry::default(), "bench").expect("bench config compiles")
}

fn route_and_pick(c: &mut Criterion) {
    let snapshot = ten_route_snapshot();
    let mut headers = HeaderMap::new();
    headers.insert("x-tenant", HeaderValue::from_static("none"));
    headers.insert("user-agent", HeaderValue::from_static("bench"));
    let method = Method::GET;
    c.bench_function("route_match_10_routes_and_weighted_pick", |b| {
        b.iter(|| {
            let vh = snapshot.find_virtual_host(black_box("payment")).expect("host");
            let view = RequestView {
                method: &method,
                path: black_box("/pay"),
                query: "",
                scheme: "http",
                authority: "payment",
                headers: &headers,
                port: 15001,
            };
            let route = router::find_route(vh, &view).expect("route");
            let RouteAction::Forward(dests) = &route.action else { panic!("forward route") };
            let dest = split::pick(dests, split::SplitMode::Exact, None);
            black_box(balance::pick(&dest.cluster, None, None))
        })
    });
    c.bench_function("request_headers_hop_by_hop_xff_request_id", |b| {
        let client: SocketAddr = "10.1.2.3:40000".parse().expect("addr");
        b.iter(|| {
            let mut h = headers.clone();
            h.insert("connection", HeaderValue::from_static("keep-alive"));
            headers::strip_hop_by_hop(&mut h, false);
            headers::set_forwarded(&mut h, Some(client.ip()), false);
            black_box(headers::ensure_request_id(&mut h))
        })
    });
}

criterion_group!(benches, route_and_pick);
criterion_main!(benches);
