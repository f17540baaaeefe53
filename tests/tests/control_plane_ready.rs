//! Readiness of a sidecar that takes its config from a control plane, as Istio's
//! pilot-agent does it: `/healthz/ready` (and the admin `/ready`) answer 503 with the
//! reason until the first config from the control plane has been applied and ACKed,
//! then 200; a control plane that goes away later does not make the sidecar unready
//! (it keeps serving its last good config). Real gRPC over loopback, the control
//! plane in process.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use http::StatusCode;
use serin::demo_app::AppConfig;
use serin_control_api::server::{ControlPlane, ServerOptions, Store, parse_documents};
use serin_tests::*;
use tokio::net::TcpListener;
use tokio::sync::oneshot;
use tokio::task::JoinHandle;

/// The payment VirtualService: everything to `subset`.
fn route_to(subset: &str) -> String {
    route_all_yaml("payment", subset, "")
}

/// A control plane serving `store` on `listener` until stopped.
struct Plane {
    store: Arc<Store>,
    stop: Option<oneshot::Sender<()>>,
    task: JoinHandle<()>,
}

impl Plane {
    fn serve(docs: &[String], listener: TcpListener) -> Plane {
        let documents = parse_documents(&docs.join("\n---\n")).expect("documents");
        let store = Arc::new(Store::from_documents(documents).expect("store"));
        let plane = ControlPlane::new(Arc::clone(&store), ServerOptions::default());
        let (stop, stopped) = oneshot::channel::<()>();
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            plane.serve(listener, shutdown).await.expect("control plane serve");
        });
        Plane { store, stop: Some(stop), task }
    }

    async fn stop(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = tokio::time::timeout(Duration::from_secs(10), self.task).await;
    }
}

/// A sidecar with no config folder, subscribed to the control plane at `plane`.
async fn subscribed_sidecar(plane: SocketAddr, node: &str) -> Sidecar {
    let node = node.to_string();
    Sidecar::start_args(&[], move |args| {
        args.config = None;
        args.control_plane.address = Some(plane.to_string());
        args.control_plane.node_id = Some(node);
    })
    .await
}

/// `GET path` on `addr`: status and body.
async fn probe(addr: SocketAddr, path: &str) -> (StatusCode, String) {
    let (status, _, body) = get(addr, "probe", path, &[]).await.expect("probe answers");
    (status, String::from_utf8_lossy(&body).into_owned())
}

/// Polls `/healthz/ready` (bounded: 30 s) until it answers `want`; returns the last body.
async fn wait_health(sidecar: &Sidecar, want: StatusCode) -> String {
    let mut last = (StatusCode::IM_A_TEAPOT, String::new());
    for _ in 0..600 {
        last = probe(sidecar.bound.health, "/healthz/ready").await;
        if last.0 == want {
            return last.1;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("/healthz/ready never answered {want}; last: {} {}", last.0, last.1);
}

/// Asserts both readiness endpoints answer 503 INITIALIZING naming the control plane
/// and containing `needle`.
async fn assert_initializing(sidecar: &Sidecar, plane: SocketAddr, needle: &str) {
    for (addr, path) in [(sidecar.bound.health, "/healthz/ready"), (sidecar.bound.admin, "/ready")] {
        let (status, body) = probe(addr, path).await;
        assert_eq!(status, StatusCode::SERVICE_UNAVAILABLE, "{path}: {body}");
        assert!(body.starts_with("INITIALIZING: waiting for first config from control plane"), "{path}: {body}");
        assert!(body.contains(&plane.to_string()), "{path} names the control plane {plane}: {body}");
        assert!(body.contains(needle), "{path} says {needle:?}: {body}");
    }
    let info = sidecar.admin_json("/server_info").await;
    assert_eq!(info["state"], "INITIALIZING", "{info:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn not_ready_until_the_first_config_from_the_control_plane_arrives() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let docs = vec![registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), route_to("v1")];

    // The control plane's port is taken but nothing serves it yet: the sidecar's
    // stream cannot get a config.
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind control plane");
    let addr = listener.local_addr().expect("control plane address");
    let sidecar = subscribed_sidecar(addr, "frontend-ready").await;
    assert_initializing(&sidecar, addr, "").await;
    assert_eq!(sidecar.admin_json("/config_dump").await["control_plane"]["state"], "CONNECTING");

    // The control plane comes up: the first config is applied and ACKed, and only
    // then is the sidecar ready, with routes to serve.
    let plane = Plane::serve(&docs, listener);
    let body = wait_health(&sidecar, StatusCode::OK).await;
    assert_eq!(body, "LIVE\n");
    assert_eq!(probe(sidecar.bound.admin, "/ready").await, (StatusCode::OK, "LIVE\n".to_string()));
    let dump = sidecar.admin_json("/config_dump").await;
    assert_eq!(dump["control_plane"]["state"], "ACKED", "{dump:#}");
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let (status, body) = client.get("/", &[]).await;
    assert_eq!(status, StatusCode::OK, "ready means routed: {}", String::from_utf8_lossy(&body));
    assert_eq!(version_of(&body).as_deref(), Some("v1"));

    // Losing the control plane later does not make the sidecar unready: it keeps
    // serving its last good config.
    plane.stop().await;
    let dump = sidecar.admin_json("/config_dump").await;
    assert_eq!(dump["control_plane"]["state"], "ACKED", "{dump:#}");
    assert_eq!(probe(sidecar.bound.health, "/healthz/ready").await.0, StatusCode::OK);
    let (status, _) = client.get("/", &[]).await;
    assert_eq!(status, StatusCode::OK);

    // Draining still wins.
    sidecar.shared.drain.trigger();
    let (status, body) = probe(sidecar.bound.health, "/healthz/ready").await;
    assert_eq!((status, body.as_str()), (StatusCode::SERVICE_UNAVAILABLE, "DRAINING\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_rejected_first_config_keeps_the_sidecar_unready_and_says_why() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let good = [registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), route_to("v1")];
    // The store takes any well-formed document; only the sidecar's compiler knows
    // that the DestinationRule defines no subset `v3`.
    let bad = vec![good[0].clone(), good[1].clone(), route_to("v3")];
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind control plane");
    let addr = listener.local_addr().expect("control plane address");
    let plane = Plane::serve(&bad, listener);
    let sidecar = subscribed_sidecar(addr, "frontend-nack").await;

    let mut nacked = false;
    for _ in 0..600 {
        if sidecar.admin_json("/config_dump").await["control_plane"]["state"] == "NACKED" {
            nacked = true;
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert!(nacked, "the sidecar NACKs a config naming an unknown subset");
    assert_initializing(&sidecar, addr, "rejected").await;
    assert_initializing(&sidecar, addr, "v3").await;

    // The operator fixes the config; the control plane pushes it on the same
    // stream (only the routes changed): the sidecar completes the set with the
    // types it received with the rejected one, applies it, and is ready.
    let documents = parse_documents(&good.join("\n---\n")).expect("documents");
    plane.store.replace_documents(documents).expect("replace documents");
    assert_eq!(wait_health(&sidecar, StatusCode::OK).await, "LIVE\n");
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    assert_eq!(client.get("/", &[]).await.0, StatusCode::OK);
    plane.stop().await;
}
