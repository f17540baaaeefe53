//! Edge to mesh: client —TLS→ gateway —mTLS (SPIFFE)→ payment sidecar (STRICT)
//! → app. The gateway's `--cert-dir` identity is used for the mesh hop like a
//! sidecar's; without it the STRICT workload cannot be reached.

mod gateway_support;

use std::net::SocketAddr;
use std::time::Duration;

use gateway_support::{Pki, TempDir, curl, resolve, stdout};
use serin::demo_app::{AppConfig, DemoApp};
use serin::gateway::GatewayArgs;
use serin::sidecar::SidecarArgs;
use serin::upstream::split::SplitMode;
use serin_certs::{Ca, SpiffeId, write_workload};

const STRICT: &str = "apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: prod}
spec: {mtls: {mode: STRICT}}
";

fn identity(ca: &Ca, dir: &std::path::Path, ns: &str, sa: &str) {
    let id: SpiffeId = format!("spiffe://cluster.local/ns/{ns}/sa/{sa}").parse().expect("spiffe id");
    let cert = ca.issue(&id, Duration::from_secs(3600)).expect("issue");
    write_workload(dir, &cert).expect("write identity");
}

async fn payment_pod(dir: &TempDir, ca: &Ca, app: SocketAddr) -> SocketAddr {
    let certs = dir.path().join("payment-identity");
    identity(ca, &certs, "prod", "payment");
    let config = dir.write("payment.yaml", STRICT);
    let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
    let args = SidecarArgs {
        config: Some(config),
        outbound: any,
        inbound: any,
        app,
        admin: any,
        metrics: any,
        health: any,
        workload: "payment-v1".into(),
        namespace: "prod".into(),
        app_label: "payment".into(),
        app_version: "v1".into(),
        no_access_log: true,
        cert_dir: Some(certs),
        split: SplitMode::Exact,
        drain_timeout: Duration::from_secs(2),
        idle_timeout: serin::idle::DEFAULT_IDLE_TIMEOUT,
        concurrency: 0,
        outbound_traffic_policy: Default::default(),
        control_plane: Default::default(),
    };
    let (_shared, bound, _task) = serin::sidecar::start(&args).await.expect("payment sidecar");
    bound.inbound
}

fn gateway_config(inbound: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: payment, namespace: prod}}
spec:
  hosts: [payment.prod.svc.cluster.local]
  resolution: STATIC
  ports: [{{number: 8080, name: http, protocol: HTTP}}]
  endpoints:
  - address: {ip}
    ports: {{http: {port}}}
    serviceAccount: payment
    labels: {{app: payment, version: v1, security.istio.io/tlsMode: istio}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {{name: edge, namespace: prod}}
spec:
  servers:
  - port: {{number: 443, name: https, protocol: HTTPS}}
    hosts: [pay.example.com]
    tls: {{mode: SIMPLE, serverCertificate: certs/pay.crt, privateKey: certs/pay.key}}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {{name: pay, namespace: prod}}
spec:
  hosts: [pay.example.com]
  gateways: [edge]
  http: [{{route: [{{destination: {{host: payment}}}}]}}]
",
        ip = inbound.ip(),
        port = inbound.port()
    )
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_gateway_reaches_a_strict_workload_over_mesh_mtls() {
    let dir = TempDir::new("mesh");
    let mesh_ca = Ca::generate("cluster.local").expect("mesh ca");
    let edge = Pki::new("edge CA");
    edge.server(&["pay.example.com"], 41).write(&dir.path().join("certs"), "pay");
    let edge_ca = gateway_support::write_atomic(&dir.path().join("edge-ca.pem"), &edge.ca_pem);
    let app = DemoApp::start("127.0.0.1:0".parse().expect("addr"), AppConfig::new("payment", "v1")).await.expect("app");
    let inbound = payment_pod(&dir, &mesh_ca, app.addr()).await;
    let config = dir.write("gateway.yaml", &gateway_config(inbound));

    let gateway_identity = dir.path().join("gateway-identity");
    identity(&mesh_ca, &gateway_identity, "istio-system", "istio-ingressgateway-service-account");
    let mut args = GatewayArgs::local(config.clone(), &[443]);
    args.cert_dir = Some(gateway_identity);
    let with_identity = gateway_support::start_with(args).await;
    let port = with_identity.bound.ports[&443];
    let request = |port: SocketAddr| {
        vec![
            "--cacert".to_string(),
            edge_ca.display().to_string(),
            "--resolve".into(),
            resolve("pay.example.com", port),
            "-w".into(),
            "\n%{http_code}".into(),
            format!("https://pay.example.com:{}/echo", port.port()),
        ]
    };
    let out = stdout(&curl(request(port)).await);
    let (body, code) = out.rsplit_once('\n').expect("status line");
    assert_eq!(code, "200", "{out}");
    let echo: serde_json::Value = serde_json::from_str(body).expect("echo json");
    let xfcc = echo["headers"]["x-forwarded-client-cert"].to_string();
    assert!(
        xfcc.contains("spiffe://cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"),
        "the payment sidecar saw the gateway's identity: {echo}"
    );
    // The edge appends the client's address and sets the scheme; the sidecar
    // behind it changes neither (Istio: use_remote_address on gateways only).
    assert_eq!(echo["headers"]["x-forwarded-for"], "127.0.0.1", "{echo}");
    assert_eq!(echo["headers"]["x-forwarded-proto"], "https", "{echo}");

    // Without an identity the gateway cannot open the mesh hop.
    let without = gateway_support::start(&config, &[443]).await;
    let out = stdout(&curl(request(without.bound.ports[&443])).await);
    assert!(out.ends_with("\n503"), "{out}");
    with_identity.shared.drain.trigger();
    without.shared.drain.trigger();
}
