//! Sidecars subscribed to a real control plane (the `serin-control-api` server, in
//! process) over real gRPC on loopback: a weight change reaches three sidecars and
//! their traffic split follows; a config a sidecar cannot compile is NACKed with the
//! reason while the old config keeps serving; the control plane restarts under load
//! with zero failed requests, the sidecars reconnect, and the weights set through the
//! API before the restart are still in force.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use serin::demo_app::{AppConfig, DemoApp};
use serin_control_api::client::ManagementClient;
use serin_control_api::pb;
use serin_control_api::server::{ControlPlane, ServerOptions, Store, parse_documents};
use serin_tests::*;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The payment VirtualService: one split route, `v1` then `v2`.
fn split_vs(v1: u32, v2: u32, v2_subset: &str) -> String {
    vs_yaml(
        "payment",
        "payment",
        &format!(
            "  - name: split\n    route:\n    - {{destination: {{host: payment, subset: v1}}, weight: {v1}}}\n    - {{destination: {{host: payment, subset: {v2_subset}}}, weight: {v2}}}\n"
        ),
    )
}

/// Two payment pods (v1, v2) and the mesh config: everything to v1.
async fn payment_world() -> (Vec<DemoApp>, Vec<String>) {
    let (apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", AppConfig::new("payment", "v2"))])
            .await;
    let docs = vec![registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), split_vs(100, 0, "v2")];
    (apps, docs)
}

/// A control plane serving on a listener until its stop sender fires.
struct Plane {
    addr: SocketAddr,
    store: Arc<Store>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Plane {
    /// Serves `store` on `listener`.
    fn serve(store: Store, listener: tokio::net::TcpListener) -> Plane {
        let addr = listener.local_addr().expect("control plane address");
        let store = Arc::new(store);
        let plane = ControlPlane::new(Arc::clone(&store), ServerOptions::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            plane.serve(listener, shutdown).await.expect("control plane serve");
        });
        Plane { addr, store, stop: Some(stop), task }
    }

    /// A control plane on an ephemeral port over `docs`, persisted in `state` when given.
    async fn start(docs: &[String], state: Option<&Path>) -> Plane {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind control plane");
        Plane::serve(store(docs, state), listener)
    }

    /// Stops serving (streams end with UNAVAILABLE) and waits for the server to end.
    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }

    async fn management(&self) -> ManagementClient {
        ManagementClient::connect(&self.addr.to_string()).await.expect("management client")
    }
}

fn store(docs: &[String], state: Option<&Path>) -> Store {
    let documents = parse_documents(&docs.join("\n---\n")).expect("documents");
    match state {
        Some(dir) => Store::open(dir, documents).expect("store"),
        None => Store::from_documents(documents).expect("store"),
    }
}

/// A sidecar with no config folder, subscribed to `plane` as `node`.
async fn subscribed_sidecar(plane: SocketAddr, node: &str) -> Sidecar {
    let node = node.to_string();
    Sidecar::start_args(&[], move |args| {
        args.config = None;
        args.control_plane.address = Some(plane.to_string());
        args.control_plane.node_id = Some(node);
    })
    .await
}

/// `/config_dump`'s `control_plane` section.
async fn cp_status(sidecar: &Sidecar) -> Value {
    sidecar.admin_json("/config_dump").await["control_plane"].clone()
}

/// Waits (bounded: 20 s) until the sidecar's `control_plane` section satisfies `ok`.
async fn wait_status(sidecar: &Sidecar, what: &str, ok: impl Fn(&Value) -> bool) -> Value {
    let mut last = Value::Null;
    for _ in 0..400 {
        last = cp_status(sidecar).await;
        if ok(&last) {
            return last;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("sidecar control-plane status never became {what}: {last:#}");
}

/// Waits until the sidecar applied a config from the control plane.
async fn wait_applied(sidecar: &Sidecar) -> Value {
    wait_status(sidecar, "ACKED", |s| s["state"] == "ACKED" && s["applied"].as_u64().unwrap_or(0) >= 1).await
}

/// Sends `n` requests one after another through the sidecar; returns the versions
/// that answered, in order (every answer must be a 200).
async fn versions_through(sidecar: &Sidecar, n: usize) -> Vec<String> {
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let mut out = Vec::with_capacity(n);
    for _ in 0..n {
        let (status, body) = client.get("/", &[]).await;
        assert_eq!(status, 200, "body {}", String::from_utf8_lossy(&body));
        out.push(version_of(&body).expect("the demo app names its version"));
    }
    out
}

fn count(versions: &[String], v: &str) -> usize {
    versions.iter().filter(|x| x.as_str() == v).count()
}

/// Asserts an exact 50/50 split: equal counts, and the versions alternate.
fn assert_alternates(versions: &[String], who: &str) {
    assert_eq!(count(versions, "v1"), count(versions, "v2"), "{who}: {versions:?}");
    assert!(versions.windows(2).all(|w| w[0] != w[1]), "{who}: 50/50 alternates: {versions:?}");
}

fn weights(pairs: &[(&str, u32)]) -> BTreeMap<String, u32> {
    pairs.iter().map(|(k, v)| ((*k).to_string(), *v)).collect()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_weight_change_reaches_three_sidecars_and_their_split_follows() {
    let (_apps, docs) = payment_world().await;
    let plane = Plane::start(&docs, None).await;
    let mut sidecars = Vec::new();
    for i in 0..3 {
        sidecars.push(subscribed_sidecar(plane.addr, &format!("frontend-{i}")).await);
    }
    for (i, sidecar) in sidecars.iter().enumerate() {
        let status = wait_applied(sidecar).await;
        assert_eq!(status["node_id"], format!("frontend-{i}"));
        assert_eq!(status["connected"], true);
        let dump = sidecar.admin_json("/config_dump").await;
        assert_eq!(dump["source"], format!("control-plane:{}", plane.addr));
        assert!(dump["version"].as_str().is_some_and(|v| v.contains("routes=")), "{}", dump["version"]);
        assert_eq!(count(&versions_through(sidecar, 6).await, "v1"), 6, "everything to v1 at first");
    }

    let mut management = plane.management().await;
    let result = management
        .set_weights("payment", &weights(&[("v1", 50), ("v2", 50)]), Some(Duration::from_secs(10)))
        .await
        .expect("set weights");
    assert!(result.changed);
    let ack = result.ack.expect("an ACK result, since we waited");
    assert_eq!((ack.acked, ack.nacked, ack.total, ack.timed_out), (3, 0, 3, false), "{ack:?}");

    // ACK means applied: no waiting between the ACK and the traffic.
    for (i, sidecar) in sidecars.iter().enumerate() {
        let versions = versions_through(sidecar, 10).await;
        assert_alternates(&versions, &format!("sidecar {i}"));
        let status = cp_status(sidecar).await;
        assert_eq!(status["state"], "ACKED");
        assert_eq!(status["versions"]["routes"], result.version.as_str(), "{status:#}");
    }

    let status = management.status().await.expect("status");
    assert_eq!(status.proxies.len(), 3);
    for proxy in &status.proxies {
        for ty in &proxy.types {
            assert_eq!(ty.state, pb::SyncState::Synced as i32, "{proxy:?}");
        }
    }
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_config_the_sidecar_cannot_compile_is_nacked_and_the_old_one_keeps_serving() {
    let (_apps, mut docs) = payment_world().await;
    docs[2] = split_vs(50, 50, "v2");
    let plane = Plane::start(&docs, None).await;
    let sidecar = subscribed_sidecar(plane.addr, "frontend-nack").await;
    let applied = wait_applied(&sidecar).await;
    let good_version = sidecar.version();
    assert_alternates(&versions_through(&sidecar, 8).await, "before");

    // The store takes any well-formed document; only the sidecar's compiler knows
    // that the DestinationRule defines no subset `v3`.
    let bad = [docs[0].clone(), docs[1].clone(), split_vs(50, 50, "v3")];
    let documents = parse_documents(&bad.join("\n---\n")).expect("documents");
    let store = Arc::clone(&plane.store);
    let changed = tokio::task::spawn_blocking(move || store.replace_documents(documents))
        .await
        .expect("replace task")
        .expect("the store accepts the documents");
    assert!(!changed.is_empty(), "the routes changed");

    let status = wait_status(&sidecar, "NACKED", |s| s["state"] == "NACKED").await;
    let reason = status["last_nack"]["error"].as_str().unwrap_or_default().to_string();
    assert!(reason.contains("v3"), "the NACK names the unknown subset: {status:#}");
    assert_eq!(status["last_ack"], applied["last_ack"], "the last ACK is still the first one");
    let dump = sidecar.admin_json("/config_dump").await;
    assert!(dump["last_rejected"]["error"].as_str().is_some_and(|e| e.contains("v3")), "{dump:#}");

    // The last good snapshot keeps serving.
    assert_eq!(sidecar.version(), good_version);
    assert_alternates(&versions_through(&sidecar, 8).await, "after the NACK");

    // The control plane saw the NACK, with the reason.
    let mut management = plane.management().await;
    let mut routes = None;
    for _ in 0..200 {
        let status = management.status().await.expect("status");
        routes = status
            .proxies
            .iter()
            .flat_map(|p| p.types.iter())
            .find(|t| t.type_url == serin_control_api::ROUTES_TYPE_URL)
            .cloned();
        if routes.as_ref().is_some_and(|r| r.state == pb::SyncState::Nacked as i32) {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    let routes = routes.expect("routes status");
    assert_eq!(routes.state, pb::SyncState::Nacked as i32, "{routes:?}");
    assert!(routes.last_nack_error.contains("v3"), "{routes:?}");

    // A fixed config is applied again.
    let good = parse_documents(&docs.join("\n---\n")).expect("documents");
    let store = Arc::clone(&plane.store);
    tokio::task::spawn_blocking(move || store.replace_documents(good)).await.expect("task").expect("replace");
    wait_status(&sidecar, "ACKED again", |s| s["state"] == "ACKED").await;
    assert_alternates(&versions_through(&sidecar, 8).await, "after the fix");
    plane.stop().await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_control_plane_restart_under_load_loses_no_request_and_keeps_the_api_weights() {
    let (_apps, docs) = payment_world().await;
    let state = tempfile::tempdir().expect("state dir");
    let plane = Plane::start(&docs, Some(state.path())).await;
    let addr = plane.addr;
    let mut sidecars = Vec::new();
    for i in 0..3 {
        sidecars.push(subscribed_sidecar(addr, &format!("frontend-{i}")).await);
    }
    for sidecar in &sidecars {
        wait_applied(sidecar).await;
    }
    let mut management = plane.management().await;
    let result = management
        .set_weights("payment", &weights(&[("v1", 50), ("v2", 50)]), Some(Duration::from_secs(10)))
        .await
        .expect("set weights");
    assert_eq!(result.ack.as_ref().map(|a| a.acked), Some(3), "{result:?}");
    drop(management);

    // Load through every sidecar, counting anything but a 200.
    let running = Arc::new(AtomicBool::new(true));
    let (ok, failed) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
    let mut load = Vec::new();
    for sidecar in &sidecars {
        let (running, ok, failed) = (Arc::clone(&running), Arc::clone(&ok), Arc::clone(&failed));
        let outbound = sidecar.bound.outbound;
        load.push(tokio::spawn(async move {
            let mut client = Client::connect(outbound, "payment").await;
            while running.load(Ordering::Relaxed) {
                match client.try_get("/", &[]).await {
                    Ok((status, _, _)) if status == 200 => ok.fetch_add(1, Ordering::Relaxed),
                    _ => failed.fetch_add(1, Ordering::Relaxed),
                };
            }
        }));
    }

    plane.stop().await;
    for sidecar in &sidecars {
        wait_status(sidecar, "disconnected", |s| s["connected"] == false).await;
    }
    let before_restart = ok.load(Ordering::Relaxed);
    // The folder's documents still say 100/0: the API's 50/50 comes from the state dir.
    let listener = bind_again(addr).await;
    let plane = Plane::serve(store(&docs, Some(state.path())), listener);
    for sidecar in &sidecars {
        wait_status(sidecar, "reconnected", |s| s["connected"] == true && s["connects"].as_u64() >= Some(2)).await;
    }
    // Some load ran while the control plane was down and after it came back.
    for _ in 0..200 {
        if ok.load(Ordering::Relaxed) > before_restart + 100 {
            break;
        }
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    running.store(false, Ordering::Relaxed);
    for task in load {
        task.await.expect("load task");
    }
    assert_eq!(failed.load(Ordering::Relaxed), 0, "no request failed ({} succeeded)", ok.load(Ordering::Relaxed));
    assert!(ok.load(Ordering::Relaxed) > before_restart, "load ran across the restart");

    for (i, sidecar) in sidecars.iter().enumerate() {
        assert_alternates(&versions_through(sidecar, 10).await, &format!("sidecar {i} after the restart"));
        assert_eq!(cp_status(sidecar).await["state"], "ACKED");
    }
    // A sidecar that first connects after the restart gets the API's weights too.
    let late = subscribed_sidecar(addr, "frontend-late").await;
    wait_applied(&late).await;
    assert_alternates(&versions_through(&late, 10).await, "a sidecar started after the restart");

    let mut management = plane.management().await;
    let status = management.status().await.expect("status");
    assert_eq!(status.proxies.len(), 4, "every sidecar reconnected: {status:?}");
    plane.stop().await;
}

/// Binds `addr` again once the old server released it (bounded: 10 s).
async fn bind_again(addr: SocketAddr) -> tokio::net::TcpListener {
    for _ in 0..200 {
        if let Ok(listener) = tokio::net::TcpListener::bind(addr).await {
            return listener;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("cannot bind {addr} again");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_subscribed_to_one_service_gets_only_that_service() {
    let (_apps, mut docs) = payment_world().await;
    let (_reviews_apps, reviews_pods) = start_pods("reviews", vec![("v1", AppConfig::new("reviews", "v1"))]).await;
    docs.push(registry_yaml("reviews", "HTTP", &reviews_pods));
    let plane = Plane::start(&docs, None).await;
    let sidecar = Sidecar::start_args(&[], |args| {
        args.config = None;
        args.control_plane.address = Some(plane.addr.to_string());
        args.control_plane.node_id = Some("frontend-payment-only".into());
        args.control_plane.subscribe = vec!["payment".into()];
    })
    .await;
    let status = wait_applied(&sidecar).await;
    assert_eq!(status["subscribe"], serde_json::json!(["payment"]));
    let dump = sidecar.admin_json("/config_dump").await;
    let hosts: Vec<&str> =
        dump["services"].as_array().into_iter().flatten().filter_map(|s| s["host"].as_str()).collect();
    assert!(hosts.contains(&"payment.default.svc.cluster.local"), "{hosts:?}");
    assert!(!hosts.iter().any(|h| h.starts_with("reviews")), "reviews was not subscribed to: {hosts:?}");
    assert_eq!(count(&versions_through(&sidecar, 4).await, "v1"), 4);
    plane.stop().await;
}
