//! Gateway configuration: what binds where, errors at startup and on reload
//! (rejected whole, last good kept, error in `/config_dump`), VirtualService
//! `tls[]` accepted for gateways only, unsupported fields named, and reloads that
//! change routes (followed by open keep-alive connections) or add ports.

mod gateway_support;

use std::net::SocketAddr;

use gateway_support::{Pki, TempDir, admin_get, service_entry, wait_for};
use serin::config::gateway::{GatewayOptions, PortConfig, TlsAction, compile_gateway};
use serin::config::load_str;
use serin::demo_app::{AppConfig, DemoApp};
use serin::gateway::GatewayArgs;
use serin::snapshot::EndpointRegistry;

const REGISTRY: &str = "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payment, namespace: prod}
spec:
  hosts: [payment.prod.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints: [{address: 127.0.0.1}]
---
";

fn compile(yaml: &str) -> Result<serin::config::gateway::GatewayConfig, String> {
    let set = load_str(&format!("{REGISTRY}{yaml}"), "test.yaml").map_err(|e| e.to_string())?;
    compile_gateway(&set, &EndpointRegistry::default(), "test", &GatewayOptions::default()).map_err(|e| e.to_string())
}

fn gateway(servers: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: Gateway\nmetadata: {{name: edge, namespace: prod}}\nspec:\n  servers:\n{servers}---\n"
    )
}

const PAY_VS: &str = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pay, namespace: prod}
spec:
  hosts: ['*.example.com']
  gateways: [edge]
  http: [{route: [{destination: {host: payment}}]}]
";

#[test]
fn virtual_services_bind_by_gateway_name_host_and_namespace() {
    let servers = "  - port: {number: 80, name: http, protocol: HTTP}
    hosts: [prod/pay.example.com, dev/shop.example.com, other.org]
";
    let config = compile(&format!("{}{PAY_VS}", gateway(servers))).expect("compile");
    let Some(PortConfig::Http(table)) = config.ports.get(&80) else { panic!("port 80: {config:?}") };
    let vh = table.snapshot.find_virtual_host("pay.example.com").expect("pay bound");
    assert_eq!(vh.name, "prod/pay");
    assert!(table.snapshot.find_virtual_host("shop.example.com").is_none(), "namespace dev only");
    assert!(table.snapshot.find_virtual_host("x.example.com").is_none(), "only the server's names");
    assert!(table.snapshot.find_virtual_host("other.org").is_none());

    // A VirtualService for sidecars only does not bind.
    let mesh_vs = PAY_VS.replace("gateways: [edge]", "gateways: [mesh]");
    let config = compile(&format!("{}{mesh_vs}", gateway(servers))).expect("compile");
    let Some(PortConfig::Http(table)) = config.ports.get(&80) else { panic!() };
    assert!(table.snapshot.virtual_hosts.is_empty());
    assert!(config.warnings.iter().any(|w| w.contains("no VirtualService binds")), "{:?}", config.warnings);

    // Match-level gateways override the VirtualService's.
    let per_match = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: pay, namespace: prod}
spec:
  hosts: [pay.example.com]
  gateways: [mesh, edge]
  http:
  - match: [{uri: {prefix: /mesh-only}, gateways: [mesh]}]
    route: [{destination: {host: payment}}]
  - route: [{destination: {host: payment}}]
";
    let config = compile(&format!("{}{per_match}", gateway(servers))).expect("compile");
    let Some(PortConfig::Http(table)) = config.ports.get(&80) else { panic!() };
    let vh = table.snapshot.find_virtual_host("pay.example.com").expect("bound");
    assert_eq!(vh.routes.len(), 1, "the mesh-only route is not on the gateway");
}

#[test]
fn tls_routes_are_for_gateways_only() {
    let tls_vs = "apiVersion: networking.istio.io/v1
kind: VirtualService
metadata: {name: secure, namespace: prod}
spec:
  hosts: [secure.example.com]
  gateways: [edge]
  tls:
  - match: [{sniHosts: [secure.example.com]}]
    route: [{destination: {host: payment, port: {number: 8080}}}]
";
    assert!(load_str(tls_vs, "vs.yaml").is_ok());
    let mesh = load_str(&tls_vs.replace("gateways: [edge]", "gateways: [edge, mesh]"), "vs.yaml").expect_err("mesh");
    assert!(mesh.to_string().contains("spec.tls: field is not supported"), "{mesh}");
    let in_mesh = load_str(
        &tls_vs.replace("sniHosts: [secure.example.com]", "sniHosts: [secure.example.com], gateways: [mesh]"),
        "vs.yaml",
    )
    .expect_err("a TLS match for sidecars");
    assert!(in_mesh.to_string().contains("spec.tls[0].match[0].gateways"), "{in_mesh}");
    let typo = load_str(&tls_vs.replace("sniHosts", "sniHost"), "vs.yaml").expect_err("unknown field");
    assert!(typo.to_string().contains("spec.tls[0].match[0]") && typo.to_string().contains("sniHost"), "{typo}");

    let servers = "  - port: {number: 443, name: tls, protocol: TLS}
    hosts: ['*.example.com']
    tls: {mode: PASSTHROUGH}
";
    let config = compile(&format!("{}{tls_vs}", gateway(servers))).expect("compile");
    let Some(PortConfig::Tls(list)) = config.ports.get(&443) else { panic!("{config:?}") };
    let TlsAction::Passthrough(routes) = &list[0].action else { panic!("passthrough") };
    assert_eq!(routes.len(), 1);
    assert_eq!(routes[0].name, "prod/secure/tls[0]");
}

#[test]
fn unsupported_and_conflicting_servers_are_named() {
    let cases = [
        (
            "  - port: {number: 443, name: x, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: ISTIO_MUTUAL}\n",
            "spec.servers[0].tls.mode",
        ),
        ("  - port: {number: 27017, name: x, protocol: MONGO}\n    hosts: ['*']\n", "spec.servers[0].port.protocol"),
        ("  - port: {number: 443, name: x, protocol: HTTPS}\n    hosts: ['*']\n", "spec.servers[0].tls"),
        (
            "  - port: {number: 443, name: x, protocol: HTTPS}\n    hosts: ['*']\n    tls: {serverCertificate: a, privateKey: b}\n",
            "tls.mode is missing",
        ),
        (
            "  - port: {number: 443, name: x, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: SIMPLE, credentialName: pay}\n",
            "--credentials-dir",
        ),
        (
            "  - port: {number: 443, name: x, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: MUTUAL, serverCertificate: a, privateKey: b}\n",
            "spec.servers[0].tls.caCertificates",
        ),
        (
            "  - port: {number: 443, name: x, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: SIMPLE, serverCertificate: a, privateKey: b, cipherSuites: [X]}\n",
            "spec.servers[0].tls.cipherSuites",
        ),
        (
            "  - port: {number: 8080, name: a, protocol: HTTP}\n    hosts: ['*']\n  - port: {number: 8080, name: b, protocol: HTTPS}\n    hosts: ['*']\n    tls: {mode: PASSTHROUGH}\n",
            "one port serves either plain HTTP or TLS",
        ),
        (
            "  - port: {number: 443, name: a, protocol: TLS}\n    hosts: [a.example.com]\n    tls: {mode: PASSTHROUGH}\n  - port: {number: 443, name: b, protocol: TLS}\n    hosts: [a.example.com]\n    tls: {mode: PASSTHROUGH}\n",
            "already served by Gateway prod/edge spec.servers[0]",
        ),
    ];
    for (servers, want) in cases {
        let err = compile(&gateway(servers)).expect_err(want);
        assert!(err.contains(want), "want {want:?} in:\n{err}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_missing_certificate_file_is_a_startup_error_naming_it() {
    let dir = TempDir::new("missing-cert");
    let yaml = gateway(
        "  - port: {number: 443, name: https, protocol: HTTPS}
    hosts: [pay.example.com]
    tls: {mode: SIMPLE, serverCertificate: /nonexistent/pay.crt, privateKey: /nonexistent/pay.key}
",
    );
    let path = dir.write("gateway.yaml", &format!("{REGISTRY}{yaml}"));
    let err = serin::gateway::start(&GatewayArgs::local(path, &[443])).await.expect_err("must not start");
    let text = format!("{err:#}");
    assert!(text.contains("/nonexistent/pay.crt"), "{text}");
    assert!(text.contains("spec.servers[0].tls"), "{text}");
    assert!(text.contains("Gateway prod/edge"), "{text}");
}

async fn echo_service(addr: SocketAddr, host: &str) -> String {
    let mut s = tokio::net::TcpStream::connect(addr).await.expect("connect");
    let (status, body) = gateway_support::get_keep_alive(&mut s, host, "/").await;
    assert_eq!(status, 200, "{body}");
    let v: serde_json::Value = serde_json::from_str(&body).expect("json");
    v["service"].as_str().unwrap_or_default().to_string()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn reloads_apply_whole_or_not_at_all() {
    let dir = TempDir::new("reload");
    let pki = Pki::new("reload CA");
    let payment =
        DemoApp::start("127.0.0.1:0".parse().expect("addr"), AppConfig::new("payment", "v1")).await.expect("app");
    let shop = DemoApp::start("127.0.0.1:0".parse().expect("addr"), AppConfig::new("shop", "v1")).await.expect("app");
    let registry = service_entry("payment", "prod", "payment.prod.svc.cluster.local", payment.addr(), "HTTP")
        + &service_entry("shop", "prod", "shop.prod.svc.cluster.local", shop.addr(), "HTTP");
    let http = "  - port: {number: 80, name: http, protocol: HTTP}\n    hosts: ['*']\n";
    let vs = |dest: &str| PAY_VS.replace("host: payment", &format!("host: {dest}"));
    std::fs::create_dir_all(dir.path().join("config")).expect("mkdir");
    let config_dir = dir.path().join("config");
    gateway_support::write_atomic(&config_dir.join("a.yaml"), &format!("{registry}{}{}", gateway(http), vs("payment")));
    let mut args = GatewayArgs::local(config_dir.clone(), &[80]);
    args.listen.push((9443, "127.0.0.1:0".parse().expect("addr")));
    let started = gateway_support::start_with(args).await;
    let port80 = started.bound.ports[&80];
    assert_eq!(echo_service(port80, "pay.example.com").await, "payment");

    // A keep-alive connection follows the new routes after a reload.
    let mut conn = tokio::net::TcpStream::connect(port80).await.expect("connect");
    let (_, body) = gateway_support::get_keep_alive(&mut conn, "pay.example.com", "/").await;
    assert!(body.contains("\"payment\""), "{body}");
    gateway_support::write_atomic(&config_dir.join("a.yaml"), &format!("{registry}{}{}", gateway(http), vs("shop")));
    wait_for("the new route", || async { echo_service(port80, "pay.example.com").await == "shop" }).await;
    let (_, body) = gateway_support::get_keep_alive(&mut conn, "pay.example.com", "/").await;
    assert!(body.contains("\"shop\""), "same connection, new routes: {body}");

    // Invalid: a destination missing from the registry. Rejected whole.
    gateway_support::write_atomic(&config_dir.join("a.yaml"), &format!("{registry}{}{}", gateway(http), vs("nowhere")));
    wait_for("the rejection", || async {
        let dump: serde_json::Value =
            serde_json::from_str(&admin_get(started.bound.admin, "/config_dump").await).expect("json");
        dump["last_rejected"]["error"].as_str().is_some_and(|e| e.contains("nowhere"))
    })
    .await;
    assert_eq!(echo_service(port80, "pay.example.com").await, "shop", "last good config keeps serving");

    // Invalid: a new HTTPS server whose certificate is missing. Rejected whole too.
    let https = "  - port: {number: 9443, name: https, protocol: HTTPS}
    hosts: ['*']
    tls: {mode: SIMPLE, serverCertificate: certs/pay.crt, privateKey: certs/pay.key}
";
    let with_https = format!("{registry}{}{}", gateway(&format!("{http}{https}")), vs("payment"));
    gateway_support::write_atomic(&config_dir.join("a.yaml"), &with_https);
    wait_for("the certificate error", || async {
        let dump: serde_json::Value =
            serde_json::from_str(&admin_get(started.bound.admin, "/config_dump").await).expect("json");
        dump["last_rejected"]["error"].as_str().is_some_and(|e| e.contains("pay.crt"))
    })
    .await;
    assert_eq!(echo_service(port80, "pay.example.com").await, "shop");
    assert!(!started.gateway.ports().await.contains_key(&9443));

    // With the files in place the same config applies, and port 9443 opens.
    pki.server(&["pay.example.com"], 7).write(&config_dir.join("certs"), "pay");
    gateway_support::write_atomic(&config_dir.join("a.yaml"), &format!("{with_https}# again\n"));
    wait_for("port 9443", || async { started.gateway.ports().await.contains_key(&9443) }).await;
    assert_eq!(echo_service(port80, "pay.example.com").await, "payment");
    let port9443 = started.gateway.ports().await[&9443];
    assert!(!gateway_support::presented_cert(port9443, "pay.example.com", &pki.ca_der).await.is_empty());
    started.shared.drain.trigger();
}

/// Real Istio files (checked-in copies in `tests/data/`: Istio's samples and
/// gateway examples from its ingress tasks) compile for the gateway, given a registry.
#[test]
fn real_istio_gateway_files_compile() {
    let data = std::path::Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let read = |name: &str| std::fs::read_to_string(data.join(name)).expect("sample file");
    let registry = |host: &str, port: u16, protocol: &str| {
        format!(
            "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: r}}\nspec:\n  hosts: [{host}]\n  \
             resolution: STATIC\n  ports: [{{number: {port}, name: p, protocol: {protocol}}}]\n  endpoints: [{{address: 127.0.0.1}}]\n---\n"
        )
    };
    let compile_set = |sources: &[(&str, String)], options: &GatewayOptions| {
        let texts: Vec<(&str, &str)> = sources.iter().map(|(o, t)| (*o, t.as_str())).collect();
        let set = serin::config::load_sources(&texts).expect("loads");
        compile_gateway(&set, &EndpointRegistry::default(), "test", options).expect("compiles")
    };

    // Bookinfo: an HTTP server for every host, routes by path.
    let config = compile_set(
        &[
            ("bookinfo-gateway.yaml", read("istio-samples/bookinfo-gateway.yaml")),
            ("registry.yaml", registry("productpage.default.svc.cluster.local", 9080, "HTTP")),
        ],
        &GatewayOptions::default(),
    );
    let Some(PortConfig::Http(table)) = config.ports.get(&80) else { panic!("{config:?}") };
    assert_eq!(table.snapshot.find_virtual_host("bookinfo.example.com").expect("any host").routes.len(), 1);

    // SNI passthrough (HTTPS + PASSTHROUGH, as in Istio's task).
    let dir = "istio-gateway-tasks/";
    let config = compile_set(
        &[
            ("gw.yaml", read(&format!("{dir}ingress-sni-passthrough-block8.yaml"))),
            ("vs.yaml", read(&format!("{dir}ingress-sni-passthrough-block10.yaml"))),
            ("registry.yaml", registry("my-nginx.default.svc.cluster.local", 443, "TLS")),
        ],
        &GatewayOptions::default(),
    );
    let Some(PortConfig::Tls(servers)) = config.ports.get(&443) else { panic!("{config:?}") };
    let TlsAction::Passthrough(routes) = &servers[0].action else { panic!("passthrough") };
    assert_eq!((routes.len(), routes[0].port), (1, Some(443)));

    // MUTUAL with a credentialName: files from --credentials-dir.
    let options = GatewayOptions { credentials_dir: Some("/secrets".into()), ..GatewayOptions::default() };
    let config = compile_set(&[("gw.yaml", read(&format!("{dir}secure-ingress-block29.yaml")))], &options);
    let Some(PortConfig::Tls(servers)) = config.ports.get(&443) else { panic!("{config:?}") };
    let TlsAction::Terminate { credentials, .. } = &servers[0].action else { panic!("terminate") };
    assert_eq!(credentials.cert, std::path::Path::new("/secrets/httpbin-credential/tls.crt"));
    assert_eq!(credentials.client_ca.as_deref(), Some(std::path::Path::new("/secrets/httpbin-credential/ca.crt")));
}
