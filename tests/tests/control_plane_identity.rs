//! Identities from the control plane's CA, end to end on 127.0.0.1: `serin
//! control-plane` with `--ca-dir` and `--bootstrap-tokens` (started as the binary starts
//! it), sidecars with `--control-plane https://…:15012 --ca-root … --bootstrap-token-file
//! …` and no `--cert-dir`.
//!
//! - two sidecars bootstrap their identities with tokens, get their config over TLS
//!   with their new certificates, and serve STRICT mTLS traffic to each other;
//! - a sidecar with a short-lived certificate renews it with its client certificate (the
//!   serial and the end of validity change; the control plane counts a renewal);
//! - the TLS listener refuses a discovery stream without credentials, and the CA on the
//!   plaintext listener refuses to sign without a token;
//! - a token bound to another identity stops the sidecar at start, naming why;
//! - without `--ca-dir` there is no TLS listener.

use std::net::SocketAddr;
use std::path::PathBuf;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use serde_json::Value;
use serin::control_plane::{self, ControlPlaneArgs, SecurityArgs};
use serin::demo_app::{AppConfig, DemoApp};
use serin_certs::{Ca, SpiffeId, generate_csr};
use serin_control_api::client::{self, CertificateClient, SubscribeOptions};
use serin_control_api::pb;
use serin_control_api::transport::{ClientTls, Transport};
use serin_tests::*;

const PAYMENT_TOKEN: &str = "payment-bootstrap-token-0123";
const FRONTEND_TOKEN: &str = "frontend-bootstrap-token-4567";

const STRICT: &str = "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: default}\nspec: {mtls: {mode: STRICT}}\n";

/// How long a test waits for something that should happen (never a timing assertion).
const PATIENCE: Duration = Duration::from_secs(30);

/// The registry entry of the meshed payment pod behind its inbound sidecar.
fn meshed_registry(inbound: SocketAddr) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: payment, namespace: default}}\nspec:\n  hosts: [payment.default.svc.cluster.local]\n  resolution: STATIC\n  ports: [{{number: 8080, name: http, protocol: HTTP}}]\n  endpoints:\n  - address: {}\n    ports: {{http: {}}}\n    serviceAccount: payment\n    labels: {{app: payment, version: v1, security.istio.io/tlsMode: istio}}\n",
        inbound.ip(),
        inbound.port()
    )
}

/// A control plane (with or without a CA) over a config folder, and its files.
struct Plane {
    running: Option<control_plane::Running>,
    dir: tempfile::TempDir,
}

impl Plane {
    /// Starts a control plane serving `docs`; with `ca`, the mesh CA is made by `serin ca
    /// init`'s code in the plane's folder and bootstrap tokens for payment and frontend are
    /// written.
    async fn start(docs: &[String], ca: bool) -> Plane {
        let dir = tempfile::tempdir().expect("tempdir");
        let config = dir.path().join("config");
        std::fs::create_dir(&config).expect("config folder");
        write_config(&config, docs);
        let any: SocketAddr = "127.0.0.1:0".parse().expect("addr");
        let mut security = SecurityArgs { listen_tls: any, ..SecurityArgs::default() };
        if ca {
            Ca::init(&dir.path().join("ca"), "cluster.local").expect("ca init");
            let tokens = dir.path().join("tokens");
            std::fs::write(
                &tokens,
                format!("# bootstrap tokens\n{PAYMENT_TOKEN} default/payment\n{FRONTEND_TOKEN} default/frontend\n"),
            )
            .expect("tokens");
            std::fs::write(dir.path().join("payment.token"), format!("{PAYMENT_TOKEN}\n")).expect("token");
            std::fs::write(dir.path().join("frontend.token"), FRONTEND_TOKEN).expect("token");
            security.ca_dir = Some(dir.path().join("ca"));
            security.bootstrap_tokens = Some(tokens);
        }
        let args = ControlPlaneArgs {
            config_dir: config,
            state_dir: dir.path().join("state"),
            listen: any,
            monitoring: any,
            drain_timeout: Duration::from_secs(2),
            security,
            dashboard: serin::dashboard::DashboardArgs::off(),
        };
        let running = control_plane::start(&args).await.expect("control plane starts");
        Plane { running: Some(running), dir }
    }

    fn bound(&self) -> control_plane::Bound {
        self.running.as_ref().expect("running").bound
    }

    fn tls_url(&self) -> String {
        format!("https://{}", self.bound().listen_tls.expect("a TLS listener"))
    }

    fn ca_root(&self) -> PathBuf {
        self.dir.path().join("ca").join(serin_certs::ROOT_CERT_FILE)
    }

    fn token_file(&self, sa: &str) -> PathBuf {
        self.dir.path().join(format!("{sa}.token"))
    }

    fn rewrite(&self, docs: &[String]) {
        write_config(&self.dir.path().join("config"), docs);
    }

    /// The control plane's Prometheus text.
    async fn metrics(&self) -> String {
        let (status, _, body) = get(self.bound().monitoring, "monitoring", "/metrics", &[]).await.expect("scrape");
        assert_eq!(status, 200);
        String::from_utf8_lossy(&body).into_owned()
    }

    /// Waits until `metric{labels}` (or `metric` without labels, when `labels` is empty)
    /// reaches `at_least`; returns the last scrape.
    async fn wait_metric(&self, metric: &str, labels: &[(&str, &str)], at_least: f64) -> String {
        let deadline = tokio::time::Instant::now() + PATIENCE;
        loop {
            let text = self.metrics().await;
            let value = if labels.is_empty() {
                text.lines().filter_map(|l| l.strip_prefix(metric)?.strip_prefix(' ')?.trim().parse::<f64>().ok()).sum()
            } else {
                metric_sum(&text, metric, labels)
            };
            if value >= at_least {
                return text;
            }
            assert!(tokio::time::Instant::now() < deadline, "{metric}{labels:?} never reached {at_least}:\n{text}");
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        if let Some(running) = self.running.take() {
            tokio::spawn(running.shutdown(Duration::from_secs(1)));
        }
    }
}

/// The control-plane options of a sidecar that subscribes to `plane`'s TLS listener and
/// bootstraps the identity of service account `sa` with its token.
fn control_plane_args(plane: &Plane, sa: &str) -> serin::xds_client::ControlPlaneArgs {
    let mut args = serin::xds_client::ControlPlaneArgs {
        address: Some(plane.tls_url()),
        node_id: Some(format!("{sa}-1")),
        ..Default::default()
    };
    args.identity.ca_root = Some(plane.ca_root());
    args.identity.bootstrap_token_file = Some(plane.token_file(sa));
    args.identity.service_account = Some(sa.to_string());
    args
}

/// A sidecar with no config folder and no `--cert-dir`, subscribed to `plane`'s TLS
/// listener, with the identity of service account `sa` from the control plane's CA.
async fn bootstrapped_sidecar(
    plane: &Plane,
    sa: &str,
    app: Option<SocketAddr>,
    edit: impl FnOnce(&mut serin::sidecar::SidecarArgs),
) -> Sidecar {
    let control_plane = control_plane_args(plane, sa);
    let sa = sa.to_string();
    Sidecar::start_args(&[], move |a| {
        a.config = None;
        a.cert_dir = None;
        if let Some(app) = app {
            a.app = app;
        }
        a.workload = sa.clone();
        a.app_label = sa;
        a.control_plane = control_plane;
        edit(a);
    })
    .await
}

/// The `identity` section of a sidecar's `/config_dump`.
async fn identity(sidecar: &Sidecar) -> Value {
    sidecar.admin_json("/config_dump").await["identity"].clone()
}

/// Polls `check` until it gives `Some`, or panics naming `what`.
async fn eventually<T, F, Fut>(what: &str, mut check: F) -> T
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = Option<T>>,
{
    let deadline = tokio::time::Instant::now() + PATIENCE;
    loop {
        if let Some(value) = check().await {
            return value;
        }
        assert!(tokio::time::Instant::now() < deadline, "gave up waiting: {what}");
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn spiffe(sa: &str) -> String {
    format!("spiffe://cluster.local/ns/default/sa/{sa}")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sidecars_bootstrap_identities_from_the_control_plane_and_talk_mutual_tls() {
    let plane = Plane::start(&[STRICT.to_string()], true).await;
    let app = DemoApp::start("127.0.0.1:0".parse().expect("addr"), AppConfig::new("payment", "v1")).await.expect("app");
    let payment = bootstrapped_sidecar(&plane, "payment", Some(app.addr()), |_| {}).await;
    let frontend = bootstrapped_sidecar(&plane, "frontend", None, |_| {}).await;

    for (sidecar, sa) in [(&payment, "payment"), (&frontend, "frontend")] {
        let id = identity(sidecar).await;
        assert_eq!(id["spiffe_id"], spiffe(sa), "{id:#}");
        assert_eq!(id["origin"], format!("control-plane:{}", plane.tls_url()), "{id:#}");
        assert!(id["next_renewal"].is_string(), "a certificate from the CA says when it renews: {id:#}");
        assert!(id["last_error"].is_null(), "{id:#}");
    }
    plane.wait_metric("serin_control_plane_csr_signed_total", &[("auth", "token")], 2.0).await;

    // Both subscribe over TLS with their new certificates; then the registry names the
    // payment pod, and the frontend reaches it through STRICT mTLS.
    plane.rewrite(&[STRICT.to_string(), meshed_registry(payment.bound.inbound)]);
    let body = eventually("the frontend reaches payment over mTLS", || async {
        match get(frontend.bound.outbound, "payment", "/echo", &[]).await {
            Ok((status, _, body)) if status == 200 => Some(body),
            _ => None,
        }
    })
    .await;
    let echo = String::from_utf8_lossy(&body);
    assert!(echo.contains(&format!("URI={}", spiffe("frontend"))), "the app sees the caller's identity: {echo}");
    assert!(echo.contains(&format!("By={}", spiffe("payment"))), "{echo}");
    let status = frontend.admin_json("/config_dump").await["control_plane"].clone();
    assert_eq!(status["connected"], true, "{status:#}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_sidecar_renews_its_certificate_with_its_client_certificate() {
    let plane = Plane::start(&[STRICT.to_string()], true).await;
    // A few seconds of validity: the sidecar renews at about half of it.
    let sidecar = bootstrapped_sidecar(&plane, "payment", None, |a| {
        a.control_plane.identity.cert_ttl = Some(Duration::from_secs(6));
    })
    .await;
    let first = identity(&sidecar).await;
    let serial = first["serial"].as_str().expect("serial").to_string();
    let renewed = eventually("the certificate is renewed", || async {
        let now = identity(&sidecar).await;
        (now["serial"].as_str() != Some(serial.as_str())).then_some(now)
    })
    .await;
    assert_eq!(renewed["spiffe_id"], spiffe("payment"));
    assert_ne!(renewed["not_after"], first["not_after"], "{first:#}\n{renewed:#}");
    assert_eq!(renewed["origin"], first["origin"]);
    // The renewal was authenticated by the sidecar's certificate, not by its token.
    plane.wait_metric("serin_control_plane_csr_signed_total", &[("auth", "certificate")], 1.0).await;
    let text = plane.metrics().await;
    assert_eq!(metric_sum(&text, "serin_control_plane_csr_signed_total", &[("auth", "token")]), 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unauthenticated_callers_are_refused() {
    let plane = Plane::start(&[STRICT.to_string()], true).await;
    let roots = Ca::load(&plane.dir.path().join("ca")).expect("ca").roots().to_vec();

    // A discovery stream on the TLS listener without a certificate or a token.
    let tls = ClientTls::new(&roots, None).expect("client TLS");
    let transport = Transport::new(&plane.tls_url(), Some(tls)).expect("transport");
    let calls = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&calls);
    let handler = move |_: client::Update<'_>| {
        seen.fetch_add(1, Ordering::SeqCst);
        Ok(())
    };
    let node = pb::Node { id: "intruder".into(), ..Default::default() };
    let subscription = client::subscribe_with_transport(transport.clone(), node, SubscribeOptions::default(), handler);
    let status = subscription.status();
    let error = eventually("the stream is refused", || {
        let error = status.borrow().last_error.clone();
        async move { error }
    })
    .await;
    assert!(error.contains("Unauthenticated") && error.contains("client certificate"), "{error}");
    assert_eq!(calls.load(Ordering::SeqCst), 0, "no config reaches an unauthenticated stream");
    subscription.shutdown().await;
    plane.wait_metric("serin_control_plane_unauthenticated_calls_total", &[], 1.0).await;

    // The CA on the plaintext listener does not sign without a token.
    let plain = Transport::new(&plane.bound().listen.to_string(), None).expect("transport");
    let id: SpiffeId = spiffe("payment").parse().expect("id");
    let csr = generate_csr(&id).expect("csr");
    let mut ca = CertificateClient::connect(&plain).await.expect("connect");
    let error = ca.create_certificate(&csr.csr_pem, Duration::ZERO, "intruder").await.expect_err("refused").to_string();
    assert!(error.contains("Unauthenticated") && error.contains("bootstrap token"), "{error}");
    // With the token it does (and says so in the docs).
    let mut ca = ca.with_token(Some(PAYMENT_TOKEN.into()));
    let signed = ca.create_certificate(&csr.csr_pem, Duration::ZERO, "payment-1").await.expect("signed with a token");
    assert_eq!(signed.spiffe_id, spiffe("payment"));
    let text = plane.wait_metric("serin_control_plane_csr_refused_total", &[("code", "Unauthenticated")], 1.0).await;
    assert_eq!(metric_sum(&text, "serin_control_plane_csr_signed_total", &[("auth", "token")]), 1.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_token_bound_to_another_identity_stops_the_sidecar() {
    let plane = Plane::start(&[STRICT.to_string()], true).await;
    // The frontend's token, asking for the payment identity: what `serin sidecar` runs
    // before it binds anything.
    let mut args = control_plane_args(&plane, "payment");
    args.identity.bootstrap_token_file = Some(plane.token_file("frontend"));
    let error = match serin::cert_client::identity_source(None, &args, "default").await {
        Ok(_) => panic!("a sidecar must not get an identity its token is not bound to"),
        Err(error) => format!("{error:#}"),
    };
    assert!(
        error.contains("PermissionDenied")
            && error.contains(&spiffe("payment"))
            && error.contains("ns/default/sa/frontend"),
        "{error}"
    );
    plane.wait_metric("serin_control_plane_csr_refused_total", &[("code", "PermissionDenied")], 1.0).await;
}

#[tokio::test]
async fn without_a_ca_there_is_no_tls_listener() {
    let plane = Plane::start(&[STRICT.to_string()], false).await;
    assert!(plane.bound().listen_tls.is_none());
    // The certificate service answers, and says why it cannot sign.
    let plain = Transport::new(&plane.bound().listen.to_string(), None).expect("transport");
    let id: SpiffeId = spiffe("payment").parse().expect("id");
    let csr = generate_csr(&id).expect("csr");
    let mut ca = CertificateClient::connect(&plain).await.expect("connect").with_token(Some(PAYMENT_TOKEN.into()));
    let error = ca.create_certificate(&csr.csr_pem, Duration::ZERO, "x").await.expect_err("no CA").to_string();
    assert!(error.contains("--ca-dir"), "{error}");
}
