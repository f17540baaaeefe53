//! `serin gateway` terminating TLS, tested with curl and rustls on loopback:
//! SIMPLE with two hosts on one port (each gets its own certificate), HTTP/2 by
//! ALPN, MUTUAL (client certificate required and checked), `httpsRedirect`, a
//! plain HTTP server, metrics reported as `source`, `/config_dump`, and the idle
//! timeout on TLS connections.

mod gateway_support;

use std::time::Duration;

use gateway_support::{Pki, TempDir, admin_get, curl, presented_cert, resolve, service_entry, stdout};
use serin::demo_app::{AppConfig, DemoApp};
use serin::gateway::GatewayArgs;

struct Setup {
    _dir: TempDir,
    pki: Pki,
    clients: Pki,
    ca: std::path::PathBuf,
    pay_der: Vec<u8>,
    other_der: Vec<u8>,
    client: (std::path::PathBuf, std::path::PathBuf),
    stranger: (std::path::PathBuf, std::path::PathBuf),
    started: serin::gateway::Started,
    _apps: (DemoApp, DemoApp),
}

async fn setup() -> Setup {
    setup_with(|_| {}).await
}

/// Like [`setup`], with any gateway option changed by `edit`.
async fn setup_with(edit: impl FnOnce(&mut GatewayArgs)) -> Setup {
    let dir = TempDir::new("https");
    let pki = Pki::new("serin test CA");
    let clients = Pki::new("serin test client CA");
    let certs = dir.path().join("certs");
    let pay = pki.server(&["pay.example.com"], 11);
    let other = pki.server(&["other.example.com"], 12);
    pay.write(&certs, "pay");
    other.write(&certs, "other");
    gateway_support::write_atomic(&certs.join("clients-ca.pem"), &clients.ca_pem);
    let ca = gateway_support::write_atomic(&dir.path().join("ca.pem"), &pki.ca_pem);
    let client = clients.client("shop-client", 21).write(dir.path(), "client");
    let stranger = Pki::new("unknown CA").client("stranger", 22).write(dir.path(), "stranger");

    let payment =
        DemoApp::start("127.0.0.1:0".parse().expect("addr"), AppConfig::new("payment", "v1")).await.expect("app");
    let shop = DemoApp::start("127.0.0.1:0".parse().expect("addr"), AppConfig::new("shop", "v1")).await.expect("app");
    let mut config = String::new();
    config += &service_entry("payment", "prod", "payment.prod.svc.cluster.local", payment.addr(), "HTTP");
    config += &service_entry("shop", "prod", "shop.prod.svc.cluster.local", shop.addr(), "HTTP");
    config += "apiVersion: networking.istio.io/v1
kind: Gateway
metadata: {name: edge, namespace: prod}
spec:
  selector: {istio: ingressgateway}
  servers:
  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [prod/pay.example.com]
    tls: {httpsRedirect: true}
  - port: {number: 80, name: http-other, protocol: HTTP}
    hosts: [prod/other.example.com]
  - port: {number: 443, name: https-pay, protocol: HTTPS}
    hosts: [prod/pay.example.com]
    tls: {mode: SIMPLE, serverCertificate: certs/pay.crt, privateKey: certs/pay.key}
  - port: {number: 443, name: https-other, protocol: HTTPS}
    hosts: [prod/other.example.com]
    tls: {mode: SIMPLE, serverCertificate: certs/other.crt, privateKey: certs/other.key}
  - port: {number: 8443, name: mtls, protocol: HTTPS}
    hosts: ['*']
    tls: {mode: MUTUAL, serverCertificate: certs/pay.crt, privateKey: certs/pay.key, caCertificates: certs/clients-ca.pem}
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pay, namespace: prod}
spec:
  hosts: [pay.example.com]
  gateways: [edge]
  http:
  - route: [{destination: {host: payment}}]
    retries: {attempts: 2, retryOn: connect-failure}
    timeout: 5s
---
apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: other, namespace: prod}
spec:
  hosts: [other.example.com]
  gateways: [prod/edge]
  http:
  - route: [{destination: {host: shop.prod.svc.cluster.local}}]
";
    let path = dir.write("gateway.yaml", &config);
    let mut args = GatewayArgs::local(path, &[80, 443, 8443]);
    edit(&mut args);
    let started = gateway_support::start_with(args).await;
    Setup {
        pay_der: pay.der.to_vec(),
        other_der: other.der.to_vec(),
        _dir: dir,
        pki,
        clients,
        ca,
        client,
        stranger,
        started,
        _apps: (payment, shop),
    }
}

fn s(x: impl ToString) -> String {
    x.to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn simple_tls_serves_each_host_with_its_own_certificate() {
    let t = setup().await;
    let https = t.started.bound.ports[&443];
    for (host, service) in [("pay.example.com", "payment"), ("other.example.com", "shop")] {
        let out = curl(vec![
            s("--cacert"),
            t.ca.display().to_string(),
            s("--resolve"),
            resolve(host, https),
            s("-w"),
            s("\n%{http_code} %{ssl_verify_result} %{http_version}"),
            format!("https://{host}:{}/", https.port()),
        ])
        .await;
        let text = stdout(&out);
        assert!(out.status.success(), "curl {host}: {out:?}");
        assert!(text.contains(&format!("\"service\":\"{service}\"")), "{host}: {text}");
        assert!(text.ends_with("200 0 2"), "{host}: HTTP/2 by ALPN, verified: {text}");
    }
    // The certificate presented is chosen by SNI.
    assert_eq!(presented_cert(https, "pay.example.com", &t.pki.ca_der).await.to_vec(), t.pay_der);
    assert_eq!(presented_cert(https, "other.example.com", &t.pki.ca_der).await.to_vec(), t.other_der);
    // An unknown name (and no SNI at all) matches no server: no handshake.
    let config = gateway_support::client_config(&t.pki.ca_der, None);
    assert!(gateway_support::connect_tls(https, "nobody.example.com", config).await.is_err());

    // HTTP/1.1 too; the upstream sees x-forwarded-proto https.
    let out = curl(vec![
        s("--http1.1"),
        s("--cacert"),
        t.ca.display().to_string(),
        s("--resolve"),
        resolve("pay.example.com", https),
        s("-H"),
        s("x-forwarded-proto: http"),
        s("-H"),
        s("x-forwarded-for: 10.1.2.3"),
        format!("https://pay.example.com:{}/echo", https.port()),
    ])
    .await;
    let echo: serde_json::Value = serde_json::from_slice(&out.stdout).expect("echo json");
    assert_eq!(echo["http_version"], "HTTP/1.1", "{echo}");
    let xfp = echo["headers"]["x-forwarded-proto"].to_string();
    assert!(xfp.contains("https") && !xfp.contains("\"http\""), "{echo}");
    // The gateway is the edge: it appends the client's address.
    assert_eq!(echo["headers"]["x-forwarded-for"], "10.1.2.3, 127.0.0.1", "{echo}");

    let metrics = admin_get(t.started.bound.metrics, "/stats/prometheus").await;
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("istio_requests_total{")
                && l.contains("destination_service=\"shop.prod.svc.cluster.local\"")
                && l.contains("response_code=\"200\"")
        })
        .unwrap_or_else(|| panic!("no request metric for shop:\n{metrics}"));
    assert!(line.contains("reporter=\"source\""), "{line}");
    assert!(line.contains("source_workload=\"istio-ingressgateway\""), "{line}");

    let dump: serde_json::Value =
        serde_json::from_str(&admin_get(t.started.bound.admin, "/config_dump").await).expect("config dump");
    let names: Vec<String> =
        dump["virtual_hosts"].as_array().expect("hosts").iter().map(|v| v["name"].to_string()).collect();
    for want in
        ["https.443.https-pay.edge.prod/prod/pay", "https.443.https-other.edge.prod/prod/other", "http.80/prod/other"]
    {
        assert!(names.iter().any(|n| n.contains(want)), "{want} in {names:?}");
    }
    t.started.shared.drain.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mutual_tls_requires_a_client_certificate_from_the_given_ca() {
    let t = setup().await;
    let mtls = t.started.bound.ports[&8443];
    let base = |extra: Vec<String>| {
        let mut args = vec![
            s("--cacert"),
            t.ca.display().to_string(),
            s("--resolve"),
            resolve("pay.example.com", mtls),
            s("-w"),
            s("\n%{http_code}"),
        ];
        args.extend(extra);
        args.push(format!("https://pay.example.com:{}/", mtls.port()));
        args
    };
    let without = curl(base(vec![])).await;
    assert!(!without.status.success(), "no client certificate must be refused: {without:?}");
    let stranger = curl(base(vec![
        s("--cert"),
        t.stranger.0.display().to_string(),
        s("--key"),
        t.stranger.1.display().to_string(),
    ]))
    .await;
    assert!(!stranger.status.success(), "a client certificate from another CA must be refused: {stranger:?}");
    let with =
        curl(base(vec![s("--cert"), t.client.0.display().to_string(), s("--key"), t.client.1.display().to_string()]))
            .await;
    let text = stdout(&with);
    assert!(with.status.success(), "{with:?}");
    assert!(text.ends_with("\n200") && text.contains("\"service\":\"payment\""), "{text}");
    // A TLS client speaking garbage does not disturb the others.
    let mut junk = tokio::net::TcpStream::connect(mtls).await.expect("connect");
    tokio::io::AsyncWriteExt::write_all(&mut junk, b"\x16\x03\x01\x00\x05hello-garbage").await.expect("send");
    let again =
        curl(base(vec![s("--cert"), t.client.0.display().to_string(), s("--key"), t.client.1.display().to_string()]))
            .await;
    assert!(stdout(&again).ends_with("\n200"), "{again:?}");
    let _ = &t.clients;
    t.started.shared.drain.trigger();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn https_redirect_and_plain_http_servers_share_a_port() {
    let t = setup().await;
    let http = t.started.bound.ports[&80];
    let out = curl(vec![
        s("--resolve"),
        resolve("pay.example.com", http),
        s("-o"),
        s("/dev/null"),
        s("-w"),
        s("%{http_code} %{redirect_url}"),
        format!("http://pay.example.com:{}/pay/now?amount=3", http.port()),
    ])
    .await;
    assert_eq!(stdout(&out), "301 https://pay.example.com/pay/now?amount=3");
    let out = curl(vec![
        s("--resolve"),
        resolve("other.example.com", http),
        s("-w"),
        s("\n%{http_code}"),
        format!("http://other.example.com:{}/", http.port()),
    ])
    .await;
    let text = stdout(&out);
    assert!(text.contains("\"service\":\"shop\"") && text.ends_with("\n200"), "{text}");
    let out = curl(vec![
        s("-o"),
        s("/dev/null"),
        s("-w"),
        s("%{http_code}"),
        s("-H"),
        s("Host: nobody.example.com"),
        format!("http://{http}/"),
    ])
    .await;
    assert_eq!(stdout(&out), "404");
    t.started.shared.drain.trigger();
}

/// A kept-alive HTTPS connection used every 300 ms outlives the gateway's 2 s
/// `--idle-timeout`; once left alone, the gateway closes it.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn idle_https_connections_are_closed() {
    use tokio::io::AsyncReadExt as _;
    let t = setup_with(|args| args.idle_timeout = Duration::from_secs(2)).await;
    let https = t.started.bound.ports[&443];
    let config = gateway_support::client_config(&t.pki.ca_der, None);
    let mut tls = gateway_support::connect_tls(https, "pay.example.com", config).await.expect("handshake");
    for _ in 0..12 {
        let (status, body) = gateway_support::get_keep_alive(&mut tls, "pay.example.com", "/").await;
        assert_eq!(status, 200);
        assert!(body.contains("\"service\":\"payment\""), "{body}");
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    let mut buf = [0u8; 64];
    let read = tokio::time::timeout(Duration::from_secs(30), tls.read(&mut buf)).await;
    let read = read.expect("the gateway did not close the idle connection");
    // A clean close (close_notify, then EOF) or the socket's end.
    assert!(matches!(read, Ok(0) | Err(_)), "{read:?}");
    t.started.shared.drain.trigger();
}
