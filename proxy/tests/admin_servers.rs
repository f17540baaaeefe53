//! The admin, metrics and health servers on real loopback sockets, hit with a real
//! HTTP client (hyper) and curl.

use std::collections::HashMap;
use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::{Method, Request, StatusCode};
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::TokioIo;
use serde_json::Value;
use tokio::net::{TcpListener, TcpStream};

use serin::access_log::AccessLog;
use serin::admin::{ServeOptions, serve_admin_with, serve_health_with, serve_metrics_with};
use serin::flags::ResponseFlags;
use serin::request_info::{Reporter, RequestInfo};
use serin::snapshot::{
    Cluster, Endpoint, EndpointRegistry, HostPattern, RequestMatch, RetryPolicy, Route, RouteAction, RouteDestination,
    ServiceInfo, Snapshot, StringMatch, TrafficPolicy, VirtualHost, WeightedDestinations,
};
use serin::state::{LocalWorkload, Shared};

struct Reply {
    status: StatusCode,
    content_type: String,
    body: String,
}

async fn request(addr: SocketAddr, method: Method, path: &str) -> Reply {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await.expect("handshake");
    tokio::spawn(conn);
    let req = Request::builder()
        .method(method)
        .uri(path)
        .header("host", addr.to_string())
        .body(Empty::<Bytes>::new())
        .expect("request");
    let resp = sender.send_request(req).await.expect("response");
    let status = resp.status();
    let content_type =
        resp.headers().get(http::header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).unwrap_or_default().to_string();
    let body = resp.into_body().collect().await.expect("body").to_bytes();
    Reply { status, content_type, body: String::from_utf8(body.to_vec()).expect("utf-8 body") }
}

async fn get(addr: SocketAddr, path: &str) -> Reply {
    request(addr, Method::GET, path).await
}

fn json(reply: &Reply) -> Value {
    assert_eq!(reply.content_type, "application/json");
    serde_json::from_str(&reply.body).expect("JSON body")
}

fn endpoint(registry: &EndpointRegistry, addr: &str, version: &str) -> Arc<Endpoint> {
    let addr: SocketAddr = addr.parse().expect("addr");
    Arc::new(Endpoint {
        addr,
        labels: vec![("app".into(), "payment".into()), ("version".into(), version.into())],
        workload: format!("payment-{version}"),
        namespace: "default".into(),
        service_account: Some("payment".into()),
        state: registry.get_or_create(addr),
    })
}

fn cluster(service: &Arc<ServiceInfo>, subset: &str, endpoints: Vec<Arc<Endpoint>>) -> Arc<Cluster> {
    Arc::new(Cluster {
        name: format!("outbound|8080|{subset}|{}", service.host),
        service: service.clone(),
        subset: Some(subset.into()),
        port: 8080,
        endpoints,
        policy: TrafficPolicy::default(),
        rr_cursor: Default::default(),
    })
}

/// A canary snapshot: payment v1 95 / v2 5, with a header match in front.
fn canary_snapshot(registry: &EndpointRegistry) -> Snapshot {
    let service = Arc::new(ServiceInfo {
        host: "payment.default.svc.cluster.local".into(),
        name: "payment".into(),
        namespace: "default".into(),
        ports: vec![(8080, "HTTP".into())],
        addresses: Vec::new(),
    });
    let v1 = cluster(&service, "v1", vec![endpoint(registry, "10.0.0.1:8080", "v1")]);
    let v2 = cluster(&service, "v2", vec![endpoint(registry, "10.0.0.2:8080", "v2")]);
    let destination = |cluster: &Arc<Cluster>, weight| RouteDestination {
        cluster: cluster.clone(),
        weight,
        headers: Default::default(),
    };
    let split = WeightedDestinations::new(vec![destination(&v1, 95), destination(&v2, 5)]).expect("weights");
    let route = Route {
        name: "payment-canary".into(),
        matches: vec![RequestMatch {
            uri: Some(StringMatch::Prefix("/pay".into())),
            headers: vec![(http::HeaderName::from_static("x-canary"), Some(StringMatch::Exact("yes".into())))],
            ..RequestMatch::default()
        }],
        action: RouteAction::Forward(split),
        timeout: Some(Duration::from_millis(1500)),
        retry: RetryPolicy::default(),
        fault: None,
        headers: Default::default(),
        rewrite: None,
        mirror: None,
    };
    let mut snapshot = Snapshot::empty("test");
    snapshot.version = "v-test".into();
    snapshot.virtual_hosts.push(VirtualHost {
        name: "default/payment".into(),
        domains: vec![
            HostPattern::Exact("payment".into()),
            HostPattern::Exact("payment.default.svc.cluster.local".into()),
        ],
        routes: vec![route],
    });
    snapshot.clusters.insert(v1.name.clone(), v1);
    snapshot.clusters.insert(v2.name.clone(), v2);
    snapshot.services.insert(service.host.clone(), service);
    snapshot
}

struct Servers {
    admin: SocketAddr,
    metrics: SocketAddr,
    health: SocketAddr,
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

async fn start(shared: &Arc<Shared>, linger: Duration) -> Servers {
    let options = ServeOptions { linger, ..ServeOptions::default() };
    let bind = || async { TcpListener::bind("127.0.0.1:0").await.expect("bind") };
    let (admin, metrics, health) = (bind().await, bind().await, bind().await);
    let addrs =
        (admin.local_addr().expect("addr"), metrics.local_addr().expect("addr"), health.local_addr().expect("addr"));
    let tasks = vec![
        tokio::spawn(serve_admin_with(admin, shared.clone(), options)),
        tokio::spawn(serve_metrics_with(metrics, shared.clone(), options)),
        tokio::spawn(serve_health_with(health, shared.clone(), options)),
    ];
    Servers { admin: addrs.0, metrics: addrs.1, health: addrs.2, tasks }
}

fn request_info(snapshot: &Snapshot) -> RequestInfo {
    let cluster = snapshot.clusters.values().find(|c| c.subset.as_deref() == Some("v2")).expect("v2").clone();
    RequestInfo {
        reporter: Reporter::Source,
        start: SystemTime::now(),
        duration: Duration::from_millis(3),
        method: Method::GET,
        path: "/pay".into(),
        protocol: "HTTP/1.1",
        authority: "payment".into(),
        status: 200,
        grpc_status: None,
        is_grpc: false,
        flags: ResponseFlags::NONE,
        bytes_received: 0,
        bytes_sent: 42,
        route_name: Some("payment-canary".into()),
        upstream: cluster.endpoints.first().cloned(),
        cluster: Some(cluster),
        attempts: 1,
        request_id: "r1".into(),
        user_agent: None,
        downstream_remote: "127.0.0.1:1".parse().expect("addr"),
        peer: None,
    }
}

#[tokio::test]
async fn empty_snapshot_servers_answer_and_quitquitquit_drains() {
    let shared = Shared::new(Snapshot::empty("test"), LocalWorkload::default(), AccessLog::new(false));
    let servers = start(&shared, Duration::from_secs(30)).await;

    let ready = get(servers.admin, "/ready").await;
    assert_eq!((ready.status, ready.body.as_str()), (StatusCode::OK, "LIVE\n"));
    assert_eq!(get(servers.health, "/healthz/ready").await.status, StatusCode::OK);

    let info = json(&get(servers.admin, "/server_info").await);
    assert_eq!(info["state"], "LIVE");
    assert!(info["version"].as_str().is_some_and(|v| v.starts_with("serin/")));
    assert!(info["uptime_current_epoch"].as_str().is_some_and(|v| v.ends_with('s')));

    let dump = json(&get(servers.admin, "/config_dump").await);
    assert_eq!(dump["source"], "test");
    assert_eq!(dump["virtual_hosts"], serde_json::json!([]));
    assert_eq!(dump["clusters"], serde_json::json!([]));
    assert_eq!(dump["last_rejected"], Value::Null);
    assert!(dump["created"].as_str().is_some_and(|t| t.ends_with('Z')));

    let scrape = get(servers.metrics, "/stats/prometheus").await;
    assert_eq!(scrape.status, StatusCode::OK);
    assert_eq!(scrape.content_type, "text/plain; version=0.0.4; charset=utf-8");

    // Unknown paths, wrong methods.
    assert_eq!(get(servers.admin, "/nope").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(servers.metrics, "/metrics").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(servers.health, "/healthz/live").await.status, StatusCode::NOT_FOUND);
    assert_eq!(get(servers.admin, "/quitquitquit").await.status, StatusCode::METHOD_NOT_ALLOWED);
    assert_eq!(request(servers.admin, Method::POST, "/ready").await.status, StatusCode::METHOD_NOT_ALLOWED);
    assert!(!shared.drain.is_draining());

    let quit = request(servers.admin, Method::POST, "/quitquitquit").await;
    assert_eq!((quit.status, quit.body.as_str()), (StatusCode::OK, "OK\n"));
    assert!(shared.drain.is_draining());

    // During the linger the servers still answer, with 503 on readiness.
    let ready = get(servers.admin, "/ready").await;
    assert_eq!((ready.status, ready.body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n"));
    assert_eq!(get(servers.health, "/healthz/ready").await.status, StatusCode::SERVICE_UNAVAILABLE);
    assert_eq!(json(&get(servers.admin, "/server_info").await)["state"], "DRAINING");
    assert_eq!(get(servers.metrics, "/stats/prometheus").await.status, StatusCode::OK);

    for task in servers.tasks {
        task.abort();
    }
}

#[tokio::test]
async fn servers_stop_accepting_after_the_drain_linger() {
    let shared = Shared::new(Snapshot::empty("test"), LocalWorkload::default(), AccessLog::new(false));
    let servers = start(&shared, Duration::ZERO).await;
    assert_eq!(get(servers.health, "/healthz/ready").await.status, StatusCode::OK);
    shared.drain.trigger();
    for task in servers.tasks {
        tokio::time::timeout(Duration::from_secs(10), task).await.expect("server stops").expect("no panic");
    }
    for addr in [servers.admin, servers.metrics, servers.health] {
        assert!(TcpStream::connect(addr).await.is_err(), "{addr} still accepts");
    }
}

#[tokio::test]
async fn config_dump_clusters_and_metrics_show_the_snapshot() {
    let registry = EndpointRegistry::default();
    let snapshot = canary_snapshot(&registry);
    let record = request_info(&snapshot);
    let local = LocalWorkload { workload: "frontend".into(), app: "frontend".into(), ..LocalWorkload::default() };
    let shared = Shared::new(snapshot, local, AccessLog::new(false));
    shared
        .reject("file:/etc/serin/bad.yaml", "VirtualService default/payment: http[0].route: all weights are 0".into());
    shared.metrics.record_request(&shared.local, &record);
    // Eject v2's endpoint and count some traffic on it.
    let v2_state = record.upstream.as_ref().expect("endpoint").state.clone();
    v2_state.ejected_until_ms.store(v2_state.now_ms() + 600_000, Ordering::Relaxed);
    v2_state.total.store(7, Ordering::Relaxed);
    v2_state.active.store(1, Ordering::Relaxed);

    let servers = start(&shared, Duration::from_secs(30)).await;

    let dump = json(&get(servers.admin, "/config_dump").await);
    assert_eq!(dump["version"], "v-test");
    let vh = &dump["virtual_hosts"][0];
    assert_eq!(vh["name"], "default/payment");
    assert_eq!(vh["domains"], serde_json::json!(["payment", "payment.default.svc.cluster.local"]));
    let route = &vh["routes"][0];
    assert_eq!(route["name"], "payment-canary");
    assert_eq!(route["match"][0]["uri"], serde_json::json!({ "prefix": "/pay" }));
    assert_eq!(route["match"][0]["headers"]["x-canary"], serde_json::json!({ "exact": "yes" }));
    assert_eq!(route["timeout"], "1s 500ms");
    assert_eq!(route["retries"]["attempts"], 2);
    assert_eq!(route["fault"], Value::Null);
    assert_eq!(route["mirror"], Value::Null);
    let destinations = route["action"]["route"].as_array().expect("destinations");
    let weights: HashMap<&str, (u64, f64)> = destinations
        .iter()
        .map(|d| {
            let subset = d["subset"].as_str().expect("subset");
            (subset, (d["weight"].as_u64().expect("weight"), d["percent"].as_f64().expect("percent")))
        })
        .collect();
    assert_eq!(weights["v1"], (95, 95.0));
    assert_eq!(weights["v2"], (5, 5.0));
    assert_eq!(destinations[0]["cluster"], "outbound|8080|v1|payment.default.svc.cluster.local");

    let clusters = dump["clusters"].as_array().expect("clusters");
    assert_eq!(clusters.len(), 2);
    let v2 = &clusters[1];
    assert_eq!(v2["name"], "outbound|8080|v2|payment.default.svc.cluster.local");
    assert_eq!(v2["service"], "payment.default.svc.cluster.local");
    assert_eq!(v2["subset"], "v2");
    assert_eq!(v2["port"], 8080);
    assert_eq!(v2["policy"]["load_balancer"]["simple"], "LEAST_REQUEST");
    let ep = &v2["endpoints"][0];
    assert_eq!(ep["address"], "10.0.0.2:8080");
    assert_eq!(ep["labels"]["version"], "v2");
    assert_eq!(ep["health"], "ejected");
    assert_eq!(ep["ejected"], true);
    assert_eq!(clusters[0]["endpoints"][0]["health"], "healthy");

    let rejected = &dump["last_rejected"];
    assert_eq!(rejected["source"], "file:/etc/serin/bad.yaml");
    assert!(rejected["error"].as_str().is_some_and(|e| e.contains("all weights are 0")));
    assert!(rejected["at"].as_str().is_some_and(|t| t.ends_with('Z')));

    let text = get(servers.admin, "/clusters").await;
    assert_eq!(text.status, StatusCode::OK);
    let v2_prefix = "outbound|8080|v2|payment.default.svc.cluster.local::10.0.0.2:8080";
    assert!(text.body.contains(&format!("{v2_prefix}::health_flags::/failed_outlier_check\n")), "{}", text.body);
    assert!(text.body.contains(&format!("{v2_prefix}::rq_total::7\n")));
    assert!(text.body.contains(&format!("{v2_prefix}::rq_active::1\n")));
    assert!(
        text.body
            .contains("outbound|8080|v1|payment.default.svc.cluster.local::10.0.0.1:8080::health_flags::healthy\n")
    );

    let statuses = json(&get(servers.admin, "/clusters?format=json").await);
    let v2 = &statuses["cluster_statuses"][1];
    assert_eq!(v2["host_statuses"][0]["health"], "ejected");
    assert_eq!(v2["host_statuses"][0]["total_requests"], 7);
    assert_eq!(v2["host_statuses"][0]["connections_open"], 0);

    // The same scrape on the admin and the metrics port.
    let scrape = get(servers.metrics, "/stats/prometheus").await;
    assert!(scrape.body.contains("istio_requests_total{reporter=\"source\",source_workload=\"frontend\""));
    assert!(scrape.body.contains("destination_version=\"v2\""));
    assert_eq!(get(servers.admin, "/stats/prometheus").await.body, scrape.body);

    // curl, as an operator would.
    let admin = servers.admin;
    let out = tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl")
            .args(["-sS", "-w", "\n%{http_code}", &format!("http://{admin}/config_dump")])
            .output()
    })
    .await
    .expect("join");
    match out {
        Ok(out) => {
            let stdout = String::from_utf8_lossy(&out.stdout);
            let (body, code) = stdout.rsplit_once('\n').expect("status line");
            assert_eq!(code, "200");
            let value: Value = serde_json::from_str(body).expect("JSON");
            assert_eq!(value["version"], "v-test");
        }
        Err(e) => eprintln!("SKIPPED curl check: {e}"),
    }

    for task in servers.tasks {
        task.abort();
    }
}
