//! Helpers for the gRPC tests: a real control plane on 127.0.0.1, raw streams,
//! subscribers, and waiting for a condition.

#![allow(dead_code)]

use std::collections::BTreeMap;
use std::future::Future;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serin_control_api::ResourceType;
use serin_control_api::client::{self, ConfigState, Subscription, Update};
use serin_control_api::pb;
use serin_control_api::server::{ControlPlane, ServerOptions, SourceDocument, Store, parse_documents};
use tokio::sync::{mpsc, oneshot};
use tokio::task::JoinHandle;
use tokio_stream::wrappers::ReceiverStream;

/// How long a test waits for something that should happen (never a timing assertion).
pub const PATIENCE: Duration = Duration::from_secs(20);

pub fn mesh() -> Vec<SourceDocument> {
    parse_documents(include_str!("../fixtures/mesh.yaml")).expect("fixture parses")
}

pub fn weights(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
    pairs.iter().map(|(k, v)| (k.to_string(), *v)).collect()
}

/// A control plane serving on 127.0.0.1.
pub struct Server {
    pub addr: SocketAddr,
    pub plane: ControlPlane,
    stop: Option<oneshot::Sender<()>>,
    task: Option<JoinHandle<()>>,
}

impl Server {
    /// Serves `store` on a free port.
    pub async fn start(store: Store) -> Server {
        Server::start_on("127.0.0.1:0".parse().expect("addr"), store).await
    }

    /// Serves `store` on `addr`.
    pub async fn start_on(addr: SocketAddr, store: Store) -> Server {
        let listener = tokio::net::TcpListener::bind(addr).await.expect("bind");
        let addr = listener.local_addr().expect("local addr");
        let plane = ControlPlane::new(Arc::new(store), ServerOptions::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let serving = plane.clone();
        let task = tokio::spawn(async move {
            serving
                .serve(listener, async move {
                    let _ = stopped.await;
                })
                .await
                .expect("serve");
        });
        Server { addr, plane, stop: Some(stop), task: Some(task) }
    }

    pub fn url(&self) -> String {
        format!("http://{}", self.addr)
    }

    pub async fn management(&self) -> client::ManagementClient {
        client::ManagementClient::connect(&self.url()).await.expect("management client")
    }

    /// Stops serving and waits until the port is closed.
    pub async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        if let Some(task) = self.task.take() {
            tokio::time::timeout(PATIENCE, task).await.expect("server stops").expect("server task");
        }
    }
}

/// Polls `check` until it returns `Some`, or panics with `what` after [`PATIENCE`].
pub async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

pub fn node(id: &str) -> pb::Node {
    pb::Node {
        id: id.to_string(),
        workload: "frontend".to_string(),
        namespace: "default".to_string(),
        labels: [("app".to_string(), "frontend".to_string())].into_iter().collect(),
    }
}

/// A subscriber through the client library whose handler records every state it was
/// given and rejects states for which `reject` returns a reason.
pub struct Subscriber {
    pub subscription: Subscription,
    pub applied: Arc<Mutex<Vec<ConfigState>>>,
    pub calls: Arc<Mutex<usize>>,
}

impl Subscriber {
    pub fn start(url: &str, id: &str, reject: fn(&ConfigState) -> Option<String>) -> Subscriber {
        let applied = Arc::new(Mutex::new(Vec::new()));
        let calls = Arc::new(Mutex::new(0usize));
        let (a, c) = (Arc::clone(&applied), Arc::clone(&calls));
        let handler = move |update: Update<'_>| {
            *c.lock().expect("lock") += 1;
            if let Some(reason) = reject(update.state) {
                return Err(reason);
            }
            a.lock().expect("lock").push(update.state.clone());
            Ok(())
        };
        let options = client::SubscribeOptions {
            initial_backoff: Duration::from_millis(50),
            max_backoff: Duration::from_millis(500),
            ..client::SubscribeOptions::default()
        };
        let endpoint = client::endpoint(url).expect("endpoint");
        let subscription = client::subscribe_with(endpoint, node(id), options, handler);
        Subscriber { subscription, applied, calls }
    }

    /// The routes YAML of the last applied state.
    pub fn routes(&self) -> String {
        let applied = self.applied.lock().expect("lock");
        applied
            .last()
            .and_then(|s| s.types.get(&ResourceType::Routes))
            .map(|c| c.resources.iter().map(|r| r.yaml.clone()).collect())
            .unwrap_or_default()
    }

    /// The accepted routes version.
    pub fn routes_version(&self) -> Option<String> {
        self.subscription.status().borrow().versions.get(&ResourceType::Routes).cloned()
    }

    pub async fn wait_for_routes_version(&self, version: &str) {
        eventually(&format!("routes version {version}"), || async {
            (self.routes_version().as_deref() == Some(version)).then_some(())
        })
        .await;
    }
}

/// A raw discovery stream: send requests, read responses.
pub struct RawStream {
    /// The resource names every request carries (SotW: each request names them all).
    pub names: Vec<String>,
    pub tx: mpsc::Sender<pb::DiscoveryRequest>,
    pub inbound: tonic::Streaming<pb::DiscoveryResponse>,
}

impl RawStream {
    pub async fn open(url: &str) -> RawStream {
        let mut client =
            pb::discovery_client::DiscoveryClient::connect(url.to_string()).await.expect("discovery client");
        let (tx, rx) = mpsc::channel(16);
        let inbound = client.stream(ReceiverStream::new(rx)).await.expect("stream").into_inner();
        RawStream { names: Vec::new(), tx, inbound }
    }

    pub async fn send(&self, request: pb::DiscoveryRequest) {
        self.tx.send(request).await.expect("send");
    }

    /// The next response, or the stream's error status.
    pub async fn next(&mut self) -> Result<pb::DiscoveryResponse, tonic::Status> {
        match tokio::time::timeout(PATIENCE, self.inbound.message()).await.expect("a message in time") {
            Ok(Some(response)) => Ok(response),
            Ok(None) => Err(tonic::Status::ok("stream ended")),
            Err(status) => Err(status),
        }
    }

    /// Subscribes `node` to `ty` and returns the first response.
    pub async fn subscribe(&mut self, node: Option<pb::Node>, ty: ResourceType) -> pb::DiscoveryResponse {
        self.send(pb::DiscoveryRequest {
            node,
            type_url: ty.type_url().to_string(),
            resource_names: self.names.clone(),
            ..Default::default()
        })
        .await;
        self.next().await.expect("first response")
    }

    /// ACKs `response`.
    pub async fn ack(&self, response: &pb::DiscoveryResponse) {
        self.send(pb::DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: response.version_info.clone(),
            response_nonce: response.nonce.clone(),
            resource_names: self.names.clone(),
            ..Default::default()
        })
        .await;
    }

    /// NACKs `response`, naming `previous` as the version in force.
    pub async fn nack(&self, response: &pb::DiscoveryResponse, previous: &str, reason: &str) {
        self.send(pb::DiscoveryRequest {
            type_url: response.type_url.clone(),
            version_info: previous.to_string(),
            response_nonce: response.nonce.clone(),
            error_detail: Some(pb::ErrorDetail { code: 3, message: reason.to_string() }),
            resource_names: self.names.clone(),
            ..Default::default()
        })
        .await;
    }
}

/// The status of one node's type, from GetStatus.
pub fn type_status<'a>(status: &'a pb::Status, node_id: &str, ty: ResourceType) -> Option<&'a pb::TypeStatus> {
    status
        .proxies
        .iter()
        .filter(|p| p.node.as_ref().is_some_and(|n| n.id == node_id))
        .flat_map(|p| p.types.iter())
        .find(|t| t.type_url == ty.type_url())
}

pub fn store() -> Store {
    Store::from_documents(mesh()).expect("store")
}

pub fn open_store(dir: &Path) -> Store {
    Store::open(dir, mesh()).expect("store")
}
