//! The certificate service and the TLS listener, over real gRPC and real TLS on
//! 127.0.0.1: a bootstrap token gets its identity signed (plaintext and TLS); a token
//! bound to one identity is refused another; a client certificate renews its own identity
//! only; bad CSRs, missing and unknown credentials get the right status naming the reason;
//! the TLS listener refuses an unauthenticated discovery stream and management call and
//! serves authenticated ones; the lifetime is capped; signings and refusals reach the
//! metrics hooks.

mod common;

use std::net::SocketAddr;
use std::sync::Arc;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, SystemTime, UNIX_EPOCH};

use serin_certs::rustls::pki_types::CertificateDer;
use serin_certs::rustls::sign::CertifiedKey;
use serin_certs::{Ca, IssuedCert, SpiffeId, WorkloadIdentity, generate_csr};
use serin_control_api::client::{CertificateClient, ClientError, ManagementClient};
use serin_control_api::pb;
use serin_control_api::server::{BootstrapTokens, CaSettings, ControlPlane, Observer, ServerOptions, TokenScope};
use serin_control_api::transport::{ClientCertFn, ClientTls, Transport};
use serin_control_api::{ResourceType, client};
use tokio::sync::{mpsc, oneshot};
use tokio_stream::wrappers::ReceiverStream;
use tonic::Code;

/// Bound to `default/payment`.
const PAYMENT_TOKEN: &str = "payment-token-0123456789";
/// Any identity.
const ANY_TOKEN: &str = "any-identity-token-abcdef";

fn id(sa: &str) -> SpiffeId {
    format!("spiffe://cluster.local/ns/default/sa/{sa}").parse().expect("spiffe id")
}

/// Counts the CA hooks.
#[derive(Default)]
struct Counts {
    signed: AtomicUsize,
    refused: AtomicUsize,
    unauthenticated: AtomicUsize,
}

impl Observer for Counts {
    fn csr_signed(&self, _spiffe_id: &str, _auth: &str) {
        self.signed.fetch_add(1, Ordering::SeqCst);
    }
    fn csr_refused(&self, _code: Code) {
        self.refused.fetch_add(1, Ordering::SeqCst);
    }
    fn unauthenticated(&self) {
        self.unauthenticated.fetch_add(1, Ordering::SeqCst);
    }
}

/// A control plane with a CA, serving plaintext and TLS on 127.0.0.1.
struct Plane {
    ca: Arc<Ca>,
    plain: SocketAddr,
    tls: SocketAddr,
    counts: Arc<Counts>,
    stop: Vec<oneshot::Sender<()>>,
}

impl Plane {
    async fn start() -> Plane {
        let ca = Ca::generate("cluster.local").expect("ca");
        let counts = Arc::new(Counts::default());
        let mut settings = CaSettings::new(ca, None).expect("settings");
        settings.max_ttl = Duration::from_secs(3600);
        settings.tokens = Arc::new(BootstrapTokens::from_entries([
            (PAYMENT_TOKEN, TokenScope::Identity { namespace: "default".into(), service_account: "payment".into() }),
            (ANY_TOKEN, TokenScope::Any),
        ]));
        let ca = Arc::clone(&settings.ca);
        let options = ServerOptions { observer: counts.clone(), ..ServerOptions::default() };
        let plane = ControlPlane::new(Arc::new(common::store()), options).with_ca(settings);
        let plain_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let tls_l = tokio::net::TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let (plain, tls) = (plain_l.local_addr().expect("addr"), tls_l.local_addr().expect("addr"));
        let (stop_plain, plain_stopped) = oneshot::channel::<()>();
        let (stop_tls, tls_stopped) = oneshot::channel::<()>();
        let serving = plane.clone();
        tokio::spawn(async move {
            serving
                .serve(plain_l, async move {
                    let _ = plain_stopped.await;
                })
                .await
                .expect("serve plaintext");
        });
        tokio::spawn(async move {
            plane
                .serve_tls(tls_l, async move {
                    let _ = tls_stopped.await;
                })
                .await
                .expect("serve TLS");
        });
        Plane { ca, plain, tls, counts, stop: vec![stop_plain, stop_tls] }
    }

    fn roots(&self) -> Vec<CertificateDer<'static>> {
        self.ca.roots().to_vec()
    }

    /// A TLS transport presenting `cert` (if any).
    fn tls_transport(&self, cert: Option<&IssuedCert>) -> Transport {
        let current: Option<ClientCertFn> = cert.map(|c| {
            let key: Arc<CertifiedKey> = c.to_identity().expect("identity").certified_key().clone();
            Arc::new(move || Some(Arc::clone(&key))) as ClientCertFn
        });
        let tls = ClientTls::new(&self.roots(), current).expect("client TLS");
        Transport::new(&format!("https://{}", self.tls), Some(tls)).expect("transport")
    }

    fn plain_transport(&self) -> Transport {
        Transport::new(&format!("http://{}", self.plain), None).expect("transport")
    }
}

impl Drop for Plane {
    fn drop(&mut self) {
        for stop in self.stop.drain(..) {
            let _ = stop.send(());
        }
    }
}

/// Asks for a certificate for `who` over `transport` with `token`; returns the key and
/// the response or the error.
async fn ask(
    transport: &Transport,
    token: Option<&str>,
    who: &SpiffeId,
    validity: Duration,
) -> (String, Result<pb::CsrResponse, ClientError>) {
    let csr = generate_csr(who).expect("csr");
    let mut client = CertificateClient::connect(transport).await.expect("connect").with_token(token.map(String::from));
    (csr.key_pem.clone(), client.create_certificate(&csr.csr_pem, validity, "test-node").await)
}

fn status_of(result: Result<pb::CsrResponse, ClientError>) -> tonic::Status {
    match result {
        Err(ClientError::Rpc(status)) => status,
        other => panic!("expected a gRPC error status, got {other:?}"),
    }
}

/// The response as a checked workload identity (key + chain + roots).
fn identity(key_pem: &str, response: &pb::CsrResponse) -> WorkloadIdentity {
    WorkloadIdentity::from_pem(
        key_pem.as_bytes(),
        response.cert_chain.concat().as_bytes(),
        response.root_certs.concat().as_bytes(),
    )
    .expect("the returned chain is a usable identity for the key")
}

#[tokio::test]
async fn a_bootstrap_token_gets_its_identity_over_plaintext_and_tls() {
    let plane = Plane::start().await;
    for transport in [plane.plain_transport(), plane.tls_transport(None)] {
        let (key, result) = ask(&transport, Some(PAYMENT_TOKEN), &id("payment"), Duration::ZERO).await;
        let response = result.expect("signed");
        assert_eq!(response.spiffe_id, id("payment").to_string());
        assert_eq!(response.cert_chain.len(), 1, "root CA: the leaf only");
        assert_eq!(response.root_certs.len(), 1);
        let identity = identity(&key, &response);
        assert_eq!(identity.spiffe_id(), &id("payment"));
        assert_eq!(identity.serial(), response.serial);
        assert_eq!(identity.roots(), plane.ca.roots());
        let not_after = identity.not_after().duration_since(UNIX_EPOCH).expect("time").as_secs();
        assert_eq!(i64::try_from(not_after).expect("fits"), response.not_after_unix);
        // The default lifetime, cut to this CA's one-hour maximum.
        assert_eq!(response.validity_seconds, 3600);
    }
    // A wildcard token may have any identity of the trust domain.
    let (_, result) = ask(&plane.plain_transport(), Some(ANY_TOKEN), &id("reviews"), Duration::from_secs(600)).await;
    let response = result.expect("signed for any identity");
    assert_eq!(response.spiffe_id, id("reviews").to_string());
    assert_eq!(response.validity_seconds, 600);
    assert_eq!(plane.counts.signed.load(Ordering::SeqCst), 3);
}

#[tokio::test]
async fn a_token_bound_to_one_identity_is_refused_another() {
    let plane = Plane::start().await;
    for transport in [plane.plain_transport(), plane.tls_transport(None)] {
        let (_, result) = ask(&transport, Some(PAYMENT_TOKEN), &id("frontend"), Duration::ZERO).await;
        let status = status_of(result);
        assert_eq!(status.code(), Code::PermissionDenied, "{status:?}");
        let message = status.message();
        assert!(
            message.contains("spiffe://cluster.local/ns/default/sa/frontend")
                && message.contains("bound to ns/default/sa/payment"),
            "{message}"
        );
    }
    assert_eq!(plane.counts.refused.load(Ordering::SeqCst), 2);
    assert_eq!(plane.counts.signed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn missing_or_unknown_credentials_are_unauthenticated() {
    let plane = Plane::start().await;
    // Plaintext without a token: the CA never signs there without one.
    let (_, result) = ask(&plane.plain_transport(), None, &id("payment"), Duration::ZERO).await;
    let status = status_of(result);
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("plaintext") && status.message().contains("bootstrap token"), "{status:?}");
    // An unknown token, either listener.
    for transport in [plane.plain_transport(), plane.tls_transport(None)] {
        let (_, result) = ask(&transport, Some("not-a-token-we-know-of"), &id("payment"), Duration::ZERO).await;
        let status = status_of(result);
        assert_eq!(status.code(), Code::Unauthenticated);
        assert!(status.message().contains("not recognised"), "{status:?}");
    }
    // TLS without a client certificate or a token.
    let (_, result) = ask(&plane.tls_transport(None), None, &id("payment"), Duration::ZERO).await;
    let status = status_of(result);
    assert_eq!(status.code(), Code::Unauthenticated);
    assert!(status.message().contains("client certificate"), "{status:?}");
    assert_eq!(plane.counts.signed.load(Ordering::SeqCst), 0);
}

#[tokio::test]
async fn a_client_certificate_renews_its_own_identity_only() {
    let plane = Plane::start().await;
    let current = plane.ca.issue(&id("payment"), Duration::from_secs(600)).expect("issue");
    let transport = plane.tls_transport(Some(&current));
    let (key, result) = ask(&transport, None, &id("payment"), Duration::from_secs(120)).await;
    let renewed = identity(&key, &result.expect("renewal with the client certificate"));
    assert_eq!(renewed.spiffe_id(), &id("payment"));
    assert_ne!(renewed.serial(), current.serial, "a new certificate");
    assert!(renewed.not_after() <= SystemTime::now() + Duration::from_secs(121));

    let (_, result) = ask(&transport, None, &id("frontend"), Duration::ZERO).await;
    let status = status_of(result);
    assert_eq!(status.code(), Code::PermissionDenied);
    assert!(status.message().contains("may renew only its own identity"), "{status:?}");

    // A certificate from another CA does not get past the handshake.
    let stranger = Ca::generate("cluster.local").expect("other ca").issue(&id("payment"), Duration::from_secs(600));
    let transport = plane.tls_transport(Some(&stranger.expect("issue")));
    let mut client = CertificateClient::from_channel(match transport.connect().await {
        Ok(channel) => channel,
        Err(_) => return, // refused while connecting: what we want
    });
    let csr = generate_csr(&id("payment")).expect("csr");
    let result = client.create_certificate(&csr.csr_pem, Duration::ZERO, "stranger").await;
    assert!(
        matches!(&result, Err(ClientError::Rpc(s)) if s.code() == Code::Unavailable || s.code() == Code::Unknown),
        "a certificate of another CA must fail the handshake: {result:?}"
    );
}

#[tokio::test]
async fn bad_csrs_are_invalid_arguments_naming_the_problem() {
    let plane = Plane::start().await;
    let mut client =
        CertificateClient::connect(&plane.plain_transport()).await.expect("connect").with_token(Some(ANY_TOKEN.into()));
    let other_domain: SpiffeId = "spiffe://example.org/ns/default/sa/payment".parse().expect("id");
    let foreign = generate_csr(&other_domain).expect("csr").csr_pem;
    let cases = [
        ("hello".to_string(), "not PEM"),
        (plane.ca.roots_pem(), "expected \"CERTIFICATE REQUEST\""),
        (foreign, "outside this CA's trust domain cluster.local"),
    ];
    for (csr, expected) in cases {
        let status = match client.create_certificate(&csr, Duration::ZERO, "t").await {
            Err(ClientError::Rpc(status)) => status,
            other => panic!("expected an error for {expected:?}, got {other:?}"),
        };
        assert_eq!(status.code(), Code::InvalidArgument, "{status:?}");
        assert!(status.message().contains(expected), "{expected:?} in {status:?}");
    }
}

#[tokio::test]
async fn the_tls_listener_refuses_unauthenticated_calls_and_serves_authenticated_ones() {
    let plane = Plane::start().await;
    let request = pb::DiscoveryRequest {
        node: Some(common::node("sidecar-1")),
        type_url: ResourceType::Routes.type_url().to_string(),
        ..Default::default()
    };

    // No certificate, no token: the discovery stream is refused.
    let channel = plane.tls_transport(None).connect().await.expect("TLS connect without a client certificate");
    let mut discovery = pb::discovery_client::DiscoveryClient::new(channel.clone());
    let (tx, rx) = mpsc::channel(4);
    tx.send(request.clone()).await.expect("queue");
    let status = match discovery.stream(ReceiverStream::new(rx)).await {
        Err(status) => status,
        Ok(response) => response.into_inner().message().await.expect_err("refused"),
    };
    assert_eq!(status.code(), Code::Unauthenticated, "{status:?}");
    assert!(status.message().contains("client certificate or a bootstrap token"), "{status:?}");
    // Nor is management.
    let mut management = ManagementClient::from_channel(channel);
    match management.status().await {
        Err(ClientError::Rpc(status)) => assert_eq!(status.code(), Code::Unauthenticated),
        other => panic!("management without credentials must be refused: {other:?}"),
    }
    assert!(plane.counts.unauthenticated.load(Ordering::SeqCst) >= 2);

    // With a mesh client certificate: the stream gets config.
    let cert = plane.ca.issue(&id("frontend"), Duration::from_secs(600)).expect("issue");
    let channel = plane.tls_transport(Some(&cert)).connect().await.expect("TLS connect");
    let mut discovery = pb::discovery_client::DiscoveryClient::new(channel.clone());
    let (tx, rx) = mpsc::channel(4);
    tx.send(request).await.expect("queue");
    let mut inbound = discovery.stream(ReceiverStream::new(rx)).await.expect("stream").into_inner();
    let first = tokio::time::timeout(common::PATIENCE, inbound.message())
        .await
        .expect("a response in time")
        .expect("no error")
        .expect("a response");
    assert_eq!(first.type_url, ResourceType::Routes.type_url());
    assert!(!first.resources.is_empty());
    let mut management = ManagementClient::from_channel(channel);
    management.status().await.expect("management with a client certificate");

    // With a token and no certificate: management answers too.
    let channel = plane.tls_transport(None).connect().await.expect("connect");
    let mut request = tonic::Request::new(pb::GetStatusRequest {});
    request.metadata_mut().insert("authorization", format!("Bearer {ANY_TOKEN}").parse().expect("metadata"));
    pb::management_client::ManagementClient::new(channel)
        .get_status(request)
        .await
        .expect("management with a bootstrap token");
    // And ManagementClient reaches 15012 through a transport.
    let mut management = ManagementClient::connect_transport(&plane.tls_transport(Some(&cert))).await.expect("connect");
    management.status().await.expect("management over a TLS transport");
}

#[tokio::test]
async fn a_subscription_over_tls_with_a_client_certificate_gets_config() {
    let plane = Plane::start().await;
    let cert = plane.ca.issue(&id("frontend"), Duration::from_secs(600)).expect("issue");
    let received = Arc::new(AtomicUsize::new(0));
    let seen = Arc::clone(&received);
    let handler = move |_update: client::Update<'_>| {
        seen.fetch_add(1, Ordering::SeqCst);
        Ok(())
    };
    let subscription = client::subscribe_with_transport(
        plane.tls_transport(Some(&cert)),
        common::node("tls-sidecar"),
        client::SubscribeOptions::default(),
        handler,
    );
    common::eventually("the TLS subscription applies config", || {
        let n = received.load(Ordering::SeqCst);
        async move { (n >= 1).then_some(()) }
    })
    .await;
    assert!(subscription.status().borrow().connected);
    subscription.shutdown().await;
}

#[test]
fn plaintext_and_tls_addresses_need_matching_settings() {
    let ca = Ca::generate("cluster.local").expect("ca");
    let tls = ClientTls::new(ca.roots(), None).expect("tls");
    let err = Transport::new("https://127.0.0.1:15012", None).expect_err("https without roots").to_string();
    assert!(err.contains("root"), "{err}");
    let err = Transport::new("http://127.0.0.1:15010", Some(tls.clone())).expect_err("http with TLS").to_string();
    assert!(err.contains("https://"), "{err}");
    assert!(Transport::new("https://127.0.0.1:15012", Some(tls)).expect("https").is_tls());
    assert!(!Transport::new("127.0.0.1:15010", None).expect("bare").is_tls());
    assert!(ClientTls::new(&[], None).is_err());
}
