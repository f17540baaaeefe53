//! End-to-end test harness for serin: real demo upstreams on loopback, a real
//! sidecar with a config folder on disk, and real clients (hyper, curl).
//!
//! Every test builds its own small world on 127.0.0.1 with ephemeral ports, so
//! tests run in parallel without clashing.

pub mod netns;

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use http::{HeaderMap, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper::client::conn::http1;
use hyper_util::rt::TokioIo;
use serin::demo_app::{AppConfig, DemoApp};
use serin::sidecar::{self, Bound, SidecarArgs};
use serin::state::Shared;
use serin::upstream::split::SplitMode;
use tokio::net::TcpStream;

/// One demo pod of a service.
#[derive(Debug, Clone)]
pub struct Pod {
    pub name: String,
    pub version: String,
    pub addr: SocketAddr,
}

/// Starts one demo upstream per `(version, config)`.
pub async fn start_pods(service: &str, specs: Vec<(&str, AppConfig)>) -> (Vec<DemoApp>, Vec<Pod>) {
    let mut apps = Vec::new();
    let mut pods = Vec::new();
    for (i, (version, mut cfg)) in specs.into_iter().enumerate() {
        cfg.service = service.to_string();
        cfg.version = version.to_string();
        let app = DemoApp::start("127.0.0.1:0".parse().expect("addr"), cfg).await.expect("start demo upstream");
        pods.push(Pod { name: format!("{service}-{version}-{i}"), version: version.to_string(), addr: app.addr() });
        apps.push(app);
    }
    (apps, pods)
}

/// A ServiceEntry for `service` in namespace `default` on port 8080 (protocol
/// `protocol`), with one WorkloadEntry per pod.
pub fn registry_yaml(service: &str, protocol: &str, pods: &[Pod]) -> String {
    let mut out = format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata:\n  name: {service}\n  namespace: default\nspec:\n  hosts: [{service}.default.svc.cluster.local]\n  location: MESH_INTERNAL\n  resolution: STATIC\n  ports:\n  - {{number: 8080, name: http, protocol: {protocol}}}\n  workloadSelector:\n    labels: {{app: {service}}}\n"
    );
    for pod in pods {
        out.push_str(&format!(
            "---\napiVersion: networking.istio.io/v1\nkind: WorkloadEntry\nmetadata:\n  name: {}\n  namespace: default\nspec:\n  address: {}\n  ports: {{http: {}}}\n  labels: {{app: {service}, version: {}}}\n",
            pod.name,
            pod.addr.ip(),
            pod.addr.port(),
            pod.version
        ));
    }
    out
}

/// DestinationRule with subsets v1 and v2 and an optional extra trafficPolicy
/// (YAML, indented under `trafficPolicy:`).
pub fn subsets_yaml(service: &str, traffic_policy: Option<&str>) -> String {
    let policy = traffic_policy.map(|p| format!("  trafficPolicy:\n{p}")).unwrap_or_default();
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata:\n  name: {service}\n  namespace: default\nspec:\n  host: {service}\n{policy}  subsets:\n  - name: v1\n    labels: {{version: v1}}\n  - name: v2\n    labels: {{version: v2}}\n"
    )
}

/// A running sidecar over a config folder.
pub struct Sidecar {
    pub shared: Arc<Shared>,
    pub bound: Bound,
    pub dir: tempfile::TempDir,
}

impl Sidecar {
    /// Writes `docs` (YAML documents) to the config folder and starts a sidecar.
    pub async fn start(docs: &[String]) -> Sidecar {
        Self::start_with(docs, SplitMode::Exact).await
    }

    /// Like [`Sidecar::start`], with a choice of split mode.
    pub async fn start_with(docs: &[String], split: SplitMode) -> Sidecar {
        Self::start_full(docs, split, "127.0.0.1:8080".parse().expect("addr")).await
    }

    /// Like [`Sidecar::start`], with a split mode and the inbound side's app address.
    pub async fn start_full(docs: &[String], split: SplitMode, app: SocketAddr) -> Sidecar {
        Self::start_args(docs, |args| {
            args.split = split;
            args.app = app;
        })
        .await
    }

    /// Like [`Sidecar::start`], with any sidecar option changed by `edit`.
    pub async fn start_args(docs: &[String], edit: impl FnOnce(&mut SidecarArgs)) -> Sidecar {
        let dir = tempfile::tempdir().expect("tempdir");
        write_config(dir.path(), docs);
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut args = SidecarArgs {
            config: Some(dir.path().to_path_buf()),
            outbound: any,
            inbound: any,
            app: "127.0.0.1:8080".parse().expect("addr"),
            admin: any,
            metrics: any,
            health: any,
            workload: "frontend".into(),
            namespace: "default".into(),
            app_label: "frontend".into(),
            app_version: "v1".into(),
            no_access_log: true,
            cert_dir: None,
            split: SplitMode::Exact,
            drain_timeout: Duration::from_secs(2),
            idle_timeout: serin::idle::DEFAULT_IDLE_TIMEOUT,
            concurrency: 0,
            outbound_traffic_policy: Default::default(),
            control_plane: Default::default(),
        };
        edit(&mut args);
        let (shared, bound, _data) = sidecar::start(&args).await.expect("start sidecar");
        Sidecar { shared, bound, dir }
    }

    /// Replaces the config (atomically: write then rename).
    pub fn rewrite(&self, docs: &[String]) {
        write_config(self.dir.path(), docs);
    }

    /// The current snapshot's version.
    pub fn version(&self) -> String {
        self.shared.snapshot.load().version.clone()
    }

    /// Waits until the snapshot version differs from `old` (bounded: 10 s).
    pub async fn wait_reload(&self, old: &str) {
        for _ in 0..200 {
            if self.version() != old {
                return;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("config was not reloaded within 10 s");
    }

    /// The Prometheus text from the metrics port.
    pub async fn scrape(&self) -> String {
        let (status, _, body) = get(self.bound.metrics, "metrics", "/stats/prometheus", &[]).await.expect("scrape");
        assert_eq!(status, StatusCode::OK);
        String::from_utf8_lossy(&body).into_owned()
    }
}

/// Writes the documents as one file, atomically.
pub fn write_config(dir: &Path, docs: &[String]) {
    let path: PathBuf = dir.join("config.yaml");
    let tmp = dir.join(".config.yaml.tmp");
    std::fs::write(&tmp, docs.join("\n---\n")).expect("write config");
    std::fs::rename(&tmp, &path).expect("rename config");
}

/// One HTTP/1.1 request on a new connection; returns status, headers and body.
pub async fn get(
    addr: SocketAddr,
    host: &str,
    path: &str,
    headers: &[(&str, &str)],
) -> Result<(StatusCode, HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
    let stream = TcpStream::connect(addr).await?;
    let (mut sender, conn) = http1::handshake(TokioIo::new(stream)).await?;
    tokio::spawn(conn);
    let mut req = Request::builder().uri(path).header("host", host);
    for (k, v) in headers {
        req = req.header(*k, *v);
    }
    let resp = sender.send_request(req.body(Full::new(Bytes::new()))?).await?;
    let (parts, body) = resp.into_parts();
    let body = body.collect().await?.to_bytes();
    Ok((parts.status, parts.headers, body))
}

/// A keep-alive HTTP/1.1 client on one connection.
pub struct Client {
    sender: http1::SendRequest<Full<Bytes>>,
    host: String,
}

impl Client {
    /// Connects to `addr`, sending `host` as the Host header.
    pub async fn connect(addr: SocketAddr, host: &str) -> Client {
        let stream = TcpStream::connect(addr).await.expect("connect");
        let (sender, conn) = http1::handshake(TokioIo::new(stream)).await.expect("handshake");
        tokio::spawn(conn);
        Client { sender, host: host.to_string() }
    }

    /// GET `path` with extra headers; returns status and body.
    pub async fn get(&mut self, path: &str, headers: &[(&str, &str)]) -> (StatusCode, Bytes) {
        self.sender.ready().await.expect("connection ready");
        let mut req = Request::builder().uri(path).header("host", &self.host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.sender.send_request(req.body(Full::new(Bytes::new())).expect("request")).await.expect("send");
        let status = resp.status();
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        (status, body)
    }
}

/// The `version` field of a demo upstream's JSON answer.
pub fn version_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("version")?.as_str().map(str::to_string)
}

/// Sum of the samples of `metric` whose label set contains every `labels` pair.
pub fn metric_sum(text: &str, metric: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

/// Runs curl with `args`; returns (exit ok, stdout).
pub fn curl(args: &[&str]) -> (bool, String) {
    let out = std::process::Command::new("curl")
        .args(["-sS", "--max-time", "10"])
        .args(args)
        .output()
        .expect("curl is installed");
    (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned())
}

// ---- Helpers of the protocol tests (tests/tests/protocol_*.rs) ----

/// A VirtualService for `service` that sends every request to `subset`. `extra`
/// holds more fields of the one route, as YAML lines indented by four spaces
/// (e.g. `"    timeout: 300ms\n"`).
pub fn route_all_yaml(service: &str, subset: &str, extra: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {service}, namespace: default}}\nspec:\n  hosts: [{service}]\n  http:\n  - name: all-{subset}\n    route: [{{destination: {{host: {service}, subset: {subset}}}}}]\n{extra}"
    )
}

/// A running world: demo pods of `payment` and a sidecar in front of them.
pub struct World {
    pub apps: Vec<DemoApp>,
    pub pods: Vec<Pod>,
    pub sidecar: Sidecar,
}

impl World {
    /// One `payment` v1 pod with `cfg`, registered with port protocol `protocol`,
    /// subsets v1/v2, and a route sending everything to v1 (plus `route_extra`, see
    /// [`route_all_yaml`]).
    pub async fn payment_v1(protocol: &str, cfg: AppConfig, route_extra: &str) -> World {
        let (apps, pods) = start_pods("payment", vec![("v1", cfg)]).await;
        let sidecar = Sidecar::start(&[
            registry_yaml("payment", protocol, &pods),
            subsets_yaml("payment", None),
            route_all_yaml("payment", "v1", route_extra),
        ])
        .await;
        World { apps, pods, sidecar }
    }

    /// The sidecar's outbound address.
    pub fn outbound(&self) -> SocketAddr {
        self.sidecar.bound.outbound
    }
}

/// Writes `request` on a new connection and reads until the peer closes (at most
/// 10 s); a write or read error ends the exchange and what was read is returned.
pub async fn raw_exchange(addr: SocketAddr, request: &[u8]) -> String {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    let _ = stream.write_all(request).await;
    let mut out = Vec::new();
    let mut buf = [0u8; 8192];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(n)) if n > 0 => out.extend_from_slice(&buf[..n]),
            _ => break,
        }
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// Scrapes until `metric_sum(metric, labels)` reaches `want` (bounded: 10 s);
/// returns the last scrape, and panics with it when the value never arrives.
pub async fn wait_metric(sidecar: &Sidecar, metric: &str, labels: &[(&str, &str)], want: f64) -> String {
    let mut text = String::new();
    for _ in 0..200 {
        text = sidecar.scrape().await;
        if metric_sum(&text, metric, labels) >= want {
            return text;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("{metric} {labels:?} never reached {want}; last scrape:\n{text}");
}

/// The distinct values of `label` among the samples of `metric`.
pub fn label_values(text: &str, metric: &str, label: &str) -> Vec<String> {
    let key = format!("{label}=\"");
    let mut values: Vec<String> = text
        .lines()
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with('{'))
        .filter_map(|l| {
            let start = l.find(&key)? + key.len();
            let end = l[start..].find('"')?;
            Some(l[start..start + end].to_string())
        })
        .collect();
    values.sort();
    values.dedup();
    values
}

/// The demo upstream's `/echo` answer, parsed.
pub fn echo_json(body: &[u8]) -> serde_json::Value {
    serde_json::from_slice(body).unwrap_or_else(|e| panic!("not JSON ({e}): {}", String::from_utf8_lossy(body)))
}

// ---------------------------------------------------------------------------
// Helpers of the traffic-management tests (tests/tests/traffic_*.rs).
// ---------------------------------------------------------------------------

/// The `pod` field of a demo upstream's JSON answer.
pub fn pod_of(body: &[u8]) -> Option<String> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    v.get("pod")?.as_str().map(str::to_string)
}

/// A `Pod` entry for an address that is not a demo upstream (a recording
/// upstream, or a closed port).
pub fn pod_at(name: &str, version: &str, addr: SocketAddr) -> Pod {
    Pod { name: name.to_string(), version: version.to_string(), addr }
}

/// A loopback address nothing listens on: bind port 0, note the port, close it.
pub fn closed_port() -> SocketAddr {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
    let addr = listener.local_addr().expect("local addr");
    drop(listener);
    addr
}

/// A VirtualService `payment` in namespace `default` for `hosts` (a YAML flow
/// list body, e.g. `payment`), with `http` (YAML of the `http:` list, indented
/// by two spaces).
pub fn vs_yaml(name: &str, hosts: &str, http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: {name}, namespace: default}}\nspec:\n  hosts: [{hosts}]\n  http:\n{http}"
    )
}

/// Sum of the samples of `metric` whose `response_flags` label contains `flag`
/// (flags are a comma list such as `UF,URX`) and whose labels contain `labels`.
pub fn metric_sum_with_flag(text: &str, metric: &str, flag: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter(|l| l.starts_with(metric) && l[metric.len()..].starts_with('{'))
        .filter(|l| labels.iter().all(|(k, v)| l.contains(&format!("{k}=\"{v}\""))))
        .filter(|l| {
            l.split("response_flags=\"")
                .nth(1)
                .and_then(|rest| rest.split('"').next())
                .is_some_and(|flags| flags.split(',').any(|f| f == flag))
        })
        .filter_map(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
        .sum()
}

impl Sidecar {
    /// GET `path` on the admin port; the body as JSON.
    pub async fn admin_json(&self, path: &str) -> serde_json::Value {
        let (status, _, body) = get(self.bound.admin, "admin", path, &[]).await.expect("admin request");
        assert_eq!(status, StatusCode::OK, "admin {path}");
        serde_json::from_slice(&body).expect("admin JSON")
    }

    /// Scrapes until `metric` (filtered by `labels` and, when given, a response
    /// flag) sums to at least `at_least`; returns the last scrape. Bounded: 10 s.
    /// (Requests are recorded when their response ends, which may be a moment
    /// after the client has read it.)
    pub async fn wait_metric(
        &self,
        metric: &str,
        flag: Option<&str>,
        labels: &[(&str, &str)],
        at_least: f64,
    ) -> String {
        let mut text = String::new();
        for _ in 0..200 {
            text = self.scrape().await;
            let sum = match flag {
                Some(f) => metric_sum_with_flag(&text, metric, f, labels),
                None => metric_sum(&text, metric, labels),
            };
            if sum >= at_least {
                return text;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("{metric} {labels:?} flag {flag:?} never reached {at_least}; last scrape:\n{text}");
    }

    /// The `/clusters?format=json` host status of `addr` in cluster `cluster`.
    pub async fn host_status(&self, cluster: &str, addr: SocketAddr) -> serde_json::Value {
        let clusters = self.admin_json("/clusters?format=json").await;
        let list = clusters["cluster_statuses"].as_array().expect("cluster_statuses");
        let c =
            list.iter().find(|c| c["name"] == cluster).unwrap_or_else(|| panic!("no cluster {cluster}: {clusters}"));
        let hosts = c["host_statuses"].as_array().expect("host_statuses");
        hosts
            .iter()
            .find(|h| h["address"] == addr.to_string())
            .cloned()
            .unwrap_or_else(|| panic!("no host {addr} in {cluster}: {c}"))
    }

    /// Polls `/config_dump` until its `last_rejected` error contains `needle`;
    /// returns the error. Bounded: 10 s.
    pub async fn wait_rejected(&self, needle: &str) -> String {
        let mut last = serde_json::Value::Null;
        for _ in 0..200 {
            let dump = self.admin_json("/config_dump").await;
            if let Some(error) = dump["last_rejected"]["error"].as_str()
                && error.contains(needle)
            {
                return error.to_string();
            }
            last = dump["last_rejected"].clone();
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("no rejected update mentioning {needle:?} within 10 s; last_rejected: {last}");
    }
}

impl Client {
    /// Like [`Client::get`], but returns connection errors instead of panicking,
    /// and the response headers too.
    pub async fn try_get(
        &mut self,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
        self.request("GET", path, headers).await
    }

    /// One request with `method`; returns status, headers and body.
    pub async fn request(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
    ) -> Result<(StatusCode, HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
        self.send(method, path, headers, Bytes::new()).await
    }

    /// One request with `method` and `body`; returns status, headers and body.
    pub async fn send(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Bytes,
    ) -> Result<(StatusCode, HeaderMap, Bytes), Box<dyn std::error::Error + Send + Sync>> {
        self.sender.ready().await?;
        let mut req = Request::builder().method(method).uri(path).header("host", &self.host);
        for (k, v) in headers {
            req = req.header(*k, *v);
        }
        let resp = self.sender.send_request(req.body(Full::new(body))?).await?;
        let (parts, body) = resp.into_parts();
        let body = body.collect().await?.to_bytes();
        Ok((parts.status, parts.headers, body))
    }
}

/// Sends `total` GETs of `path` over `connections` keep-alive connections in
/// parallel; returns every (status, body), panicking on connection errors.
pub async fn load(
    addr: SocketAddr,
    host: &str,
    path: &str,
    connections: usize,
    total: usize,
) -> Vec<(StatusCode, Bytes)> {
    let mut tasks = Vec::new();
    for c in 0..connections {
        let share = total / connections + usize::from(c < total % connections);
        let host = host.to_string();
        let path = path.to_string();
        tasks.push(tokio::spawn(async move {
            let mut client = Client::connect(addr, &host).await;
            let mut out = Vec::with_capacity(share);
            for _ in 0..share {
                out.push(client.get(&path, &[]).await);
            }
            out
        }));
    }
    let mut all = Vec::with_capacity(total);
    for t in tasks {
        all.extend(t.await.expect("load task"));
    }
    all
}

/// One request a [`RecordingUpstream`] received.
#[derive(Debug, Clone)]
pub struct Seen {
    pub method: String,
    /// Path and query.
    pub path: String,
    /// The `Host` header.
    pub host: String,
    pub headers: HeaderMap,
}

/// A plain HTTP/1.1 upstream that records every request and every accepted
/// connection, and answers `200` with `{"service","version","pod"}` like the demo
/// app (`pod` = its name).
pub struct RecordingUpstream {
    addr: SocketAddr,
    seen: Arc<std::sync::Mutex<Vec<Seen>>>,
    connections: Arc<std::sync::atomic::AtomicUsize>,
    task: tokio::task::JoinHandle<()>,
}

impl RecordingUpstream {
    /// Starts one on an ephemeral loopback port.
    pub async fn start(name: &str) -> RecordingUpstream {
        use std::sync::atomic::Ordering;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind recording upstream");
        let addr = listener.local_addr().expect("local addr");
        let seen: Arc<std::sync::Mutex<Vec<Seen>>> = Arc::default();
        let connections: Arc<std::sync::atomic::AtomicUsize> = Arc::default();
        let body = Bytes::from(format!(r#"{{"service":"{name}","version":"{name}","pod":"{name}"}}"#));
        let (seen2, conns2) = (seen.clone(), connections.clone());
        let task = tokio::spawn(async move {
            loop {
                let Ok((stream, _)) = listener.accept().await else { continue };
                conns2.fetch_add(1, Ordering::SeqCst);
                let seen = seen2.clone();
                let body = body.clone();
                let svc = hyper::service::service_fn(move |req: Request<hyper::body::Incoming>| {
                    let seen = seen.clone();
                    let body = body.clone();
                    async move {
                        let (parts, incoming) = req.into_parts();
                        let _ = incoming.collect().await;
                        let host = parts.headers.get(http::header::HOST).and_then(|h| h.to_str().ok()).unwrap_or("");
                        seen.lock().expect("lock").push(Seen {
                            method: parts.method.to_string(),
                            path: parts.uri.path_and_query().map_or("/", |p| p.as_str()).to_string(),
                            host: host.to_string(),
                            headers: parts.headers.clone(),
                        });
                        let resp = http::Response::builder()
                            .header("content-type", "application/json")
                            .body(Full::new(body))
                            .expect("response");
                        Ok::<_, std::convert::Infallible>(resp)
                    }
                });
                tokio::spawn(async move {
                    let _ =
                        hyper::server::conn::http1::Builder::new().serve_connection(TokioIo::new(stream), svc).await;
                });
            }
        });
        RecordingUpstream { addr, seen, connections, task }
    }

    /// The address it listens on.
    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// Every request so far.
    pub fn seen(&self) -> Vec<Seen> {
        self.seen.lock().expect("lock").clone()
    }

    /// Connections accepted so far.
    pub fn connections(&self) -> usize {
        self.connections.load(std::sync::atomic::Ordering::SeqCst)
    }

    /// Waits until it has seen at least `n` requests (bounded: 10 s).
    pub async fn wait_seen(&self, n: usize) -> Vec<Seen> {
        for _ in 0..200 {
            let seen = self.seen();
            if seen.len() >= n {
                return seen;
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        panic!("recording upstream saw {} requests, expected {n}", self.seen().len());
    }
}

impl Drop for RecordingUpstream {
    fn drop(&mut self) {
        self.task.abort();
    }
}

/// An HTTP/2 client connection with prior knowledge (h2c) to `addr`.
pub async fn h2c_connect(addr: SocketAddr) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = TcpStream::connect(addr).await.expect("connect");
    let (sender, conn) = hyper::client::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
        .handshake(TokioIo::new(stream))
        .await
        .expect("h2c handshake");
    tokio::spawn(conn);
    sender
}

/// An empty request body.
pub fn empty_body() -> Full<Bytes> {
    Full::new(Bytes::new())
}

/// The next data message of a WebSocket, skipping pings (bounded: 10 s).
pub async fn next_message<S>(ws: &mut tokio_tungstenite::WebSocketStream<S>) -> tokio_tungstenite::tungstenite::Message
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    use futures_util::StreamExt as _;
    use tokio_tungstenite::tungstenite::Message;
    let deadline = tokio::time::Instant::now() + Duration::from_secs(10);
    loop {
        let msg = tokio::time::timeout_at(deadline, ws.next())
            .await
            .expect("a message within 10 s")
            .expect("stream open")
            .expect("valid frame");
        if !matches!(msg, Message::Ping(_) | Message::Pong(_)) {
            return msg;
        }
    }
}
