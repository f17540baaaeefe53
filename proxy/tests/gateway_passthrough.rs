//! TLS `PASSTHROUGH`: the gateway routes by the ClientHello's SNI without
//! terminating; curl reaches a TLS upstream (a small rustls server) and verifies
//! the upstream's own certificate. A terminating HTTPS server shares the port.

mod gateway_support;

use std::net::SocketAddr;
use std::sync::Arc;

use gateway_support::{Pki, TempDir, admin_get, curl, presented_cert, resolve, service_entry, stdout};
use serin::demo_app::{AppConfig, DemoApp};
use serin_certs::rustls;
use serin_certs::rustls::pki_types::PrivateKeyDer;
use serin_certs::rustls::pki_types::pem::PemObject as _;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The passthrough route: SNI `secure.example.com` to the `secure` service.
const SECURE_ROUTE: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: prod}
spec:
  hosts: [secure.example.com]
  gateways: [edge]
  tls:
  - match: [{sniHosts: [secure.example.com]}]
    route: [{destination: {host: secure}}]
";

/// A TLS acceptor presenting `cert`.
fn acceptor_for(cert: &gateway_support::Issued) -> tokio_rustls::TlsAcceptor {
    let key = PrivateKeyDer::from_pem_slice(cert.key_pem.as_bytes()).expect("key");
    let config = rustls::ServerConfig::builder_with_provider(serin_certs::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_no_client_auth()
        .with_single_cert(vec![cert.der.clone()], key)
        .expect("server config");
    tokio_rustls::TlsAcceptor::from(Arc::new(config))
}

/// A TLS server presenting `cert` that runs `serve` on each connection.
async fn tls_server<F, Fut>(cert: &gateway_support::Issued, serve: F) -> SocketAddr
where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>) -> Fut + Clone + Send + 'static,
    Fut: std::future::Future<Output = ()> + Send,
{
    let acceptor = acceptor_for(cert);
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let (acceptor, serve) = (acceptor.clone(), serve.clone());
            tokio::spawn(async move {
                if let Ok(tls) = acceptor.accept(tcp).await {
                    serve(tls).await;
                }
            });
        }
    });
    addr
}

/// A TLS server answering every request with `passthrough ok` (then closing).
async fn tls_upstream(cert: &gateway_support::Issued) -> SocketAddr {
    tls_server(cert, |mut tls| async move {
        let mut buf = vec![0u8; 4096];
        let mut head = Vec::new();
        while !head.windows(4).any(|w| w == b"\r\n\r\n") {
            match tls.read(&mut buf).await {
                Ok(0) | Err(_) => return,
                Ok(n) => head.extend_from_slice(&buf[..n]),
            }
        }
        let body = "passthrough ok";
        let resp = format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
        let _ = tls.write_all(resp.as_bytes()).await;
        let _ = tls.shutdown().await;
    })
    .await
}

/// A TLS server echoing whatever it reads until the client goes.
async fn tls_echo_upstream(cert: &gateway_support::Issued) -> SocketAddr {
    tls_server(cert, |mut tls| async move {
        let mut buf = vec![0u8; 4096];
        while let Ok(n) = tls.read(&mut buf).await {
            if n == 0 || tls.write_all(&buf[..n]).await.is_err() {
                return;
            }
        }
    })
    .await
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_routes_by_sni_to_the_upstream_that_terminates() {
    let dir = TempDir::new("passthrough");
    let gateway_pki = Pki::new("gateway CA");
    let upstream_pki = Pki::new("upstream CA");
    let upstream_cert = upstream_pki.server(&["secure.example.com"], 31);
    let upstream = tls_upstream(&upstream_cert).await;
    gateway_pki.server(&["pay.example.com"], 32).write(&dir.path().join("certs"), "pay");
    let upstream_ca = gateway_support::write_atomic(&dir.path().join("upstream-ca.pem"), &upstream_pki.ca_pem);
    let gateway_ca = gateway_support::write_atomic(&dir.path().join("gateway-ca.pem"), &gateway_pki.ca_pem);
    let payment =
        DemoApp::start("127.0.0.1:0".parse().expect("addr"), AppConfig::new("payment", "v1")).await.expect("app");

    let mut config = service_entry("secure", "prod", "secure.prod.svc.cluster.local", upstream, "TLS");
    config += &service_entry("payment", "prod", "payment.prod.svc.cluster.local", payment.addr(), "HTTP");
    config += "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: prod}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: [secure.example.com, unrouted.example.com]
    tls: {mode: PASSTHROUGH}
  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [pay.example.com]
    tls: {mode: SIMPLE, serverCertificate: certs/pay.crt, privateKey: certs/pay.key}
---
";
    config += SECURE_ROUTE;
    config += "---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pay, namespace: prod}
spec:
  hosts: [pay.example.com]
  gateways: [edge]
  http: [{route: [{destination: {host: payment}}]}]
";
    let path = dir.write("gateway.yaml", &config);
    let started = gateway_support::start(&path, &[443]).await;
    let port = started.bound.ports[&443];

    let out = curl(vec![
        "--cacert".into(),
        upstream_ca.display().to_string(),
        "--resolve".into(),
        resolve("secure.example.com", port),
        "-w".into(),
        "\n%{http_code} %{ssl_verify_result}".into(),
        format!("https://secure.example.com:{}/", port.port()),
    ])
    .await;
    assert_eq!(stdout(&out), "passthrough ok\n200 0", "{out:?}");
    // The certificate the client sees is the upstream's, not the gateway's.
    assert_eq!(presented_cert(port, "secure.example.com", &upstream_pki.ca_der).await, upstream_cert.der);

    // The same port terminates TLS for another name.
    let out = curl(vec![
        "--cacert".into(),
        gateway_ca.display().to_string(),
        "--resolve".into(),
        resolve("pay.example.com", port),
        format!("https://pay.example.com:{}/", port.port()),
    ])
    .await;
    assert!(stdout(&out).contains("\"service\":\"payment\""), "{out:?}");

    // A server name of the passthrough server without a route: closed.
    let config = gateway_support::client_config(&upstream_pki.ca_der, None);
    assert!(gateway_support::connect_tls(port, "unrouted.example.com", config).await.is_err());

    let metrics = admin_get(started.bound.metrics, "/stats/prometheus").await;
    let opened = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_tcp_connections_opened_total{")
                && l.contains("destination_service=\"secure.prod.svc.cluster.local\"")
        })
        .unwrap_or_else(|| panic!("no TCP metric:\n{metrics}"));
    assert!(opened.contains("reporter=\"source\""), "{opened}");
    let count: f64 = opened.rsplit(' ').next().and_then(|v| v.parse().ok()).expect("value");
    assert!(count >= 2.0, "{opened}");
    assert!(
        metrics.lines().any(|l| l.starts_with("istio_tcp_received_bytes_total{")
            && l.contains("secure.prod.svc.cluster.local")
            && !l.ends_with(" 0")),
        "{metrics}"
    );
    started.shared.drain.trigger();
}

/// DestinationRule `connectionPool.tcp.idleTimeout` on a passthrough route: a
/// connection with bytes every 300 ms outlives its 2 s; left alone, it is closed.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn passthrough_connections_close_after_the_tcp_idle_timeout() {
    let dir = TempDir::new("passthrough-idle");
    let upstream_pki = Pki::new("upstream CA");
    let upstream = tls_echo_upstream(&upstream_pki.server(&["secure.example.com"], 41)).await;
    let mut config = service_entry("secure", "prod", "secure.prod.svc.cluster.local", upstream, "TLS");
    config += "apiVersion: networking.istio.io/v1
kind: DestinationRule
metadata: {name: secure, namespace: prod}
spec:
  host: secure.prod.svc.cluster.local
  trafficPolicy: {connectionPool: {tcp: {idleTimeout: 2s}}}
---
apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: prod}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 443, name: tls, protocol: TLS}
    hosts: [secure.example.com]
    tls: {mode: PASSTHROUGH}
---
";
    config += SECURE_ROUTE;
    let started = gateway_support::start(&dir.write("gateway.yaml", &config), &[443]).await;
    let port = started.bound.ports[&443];
    let client = gateway_support::client_config(&upstream_pki.ca_der, None);
    let mut tls = gateway_support::connect_tls(port, "secure.example.com", client).await.expect("handshake");
    let mut buf = [0u8; 64];
    for i in 0..12u8 {
        tls.write_all(&[b'a' + i]).await.expect("write");
        let n = tls.read(&mut buf).await.expect("read");
        assert_eq!(&buf[..n], &[b'a' + i], "echo {i}: the connection closed while in use");
        tokio::time::sleep(std::time::Duration::from_millis(300)).await;
    }
    let read = tokio::time::timeout(std::time::Duration::from_secs(30), tls.read(&mut buf)).await;
    let read = read.expect("the gateway did not close the idle connection");
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    started.shared.drain.trigger();
}
