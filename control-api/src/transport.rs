//! How a client reaches the control plane: plaintext (`http://host:15010`) or TLS
//! (`https://host:15012`).
//!
//! The TLS client verifies the control plane's certificate against the mesh roots it is
//! given and the host name or address it dials (the control plane's certificate carries
//! [`crate::server::SERVING_DNS_NAMES`] and [`crate::server::SERVING_IPS`]), and presents
//! a client certificate read at each handshake from a [`ClientCertFn`], so that a rotated
//! workload certificate is used by the next connection without rebuilding anything.
//!
//! The TLS is done by serin's own connector (tokio-rustls with the `ring` provider), not by
//! tonic's TLS features, so that the client certificate can change between connections.

use std::fmt;
use std::future::Future;
use std::io;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};

use hyper_util::rt::TokioIo;
use rustls::client::ResolvesClientCert;
use rustls::client::WebPkiServerVerifier;
use rustls::pki_types::{CertificateDer, ServerName};
use rustls::sign::CertifiedKey;
use rustls::version::{TLS12, TLS13};
use rustls::{ClientConfig, RootCertStore, SignatureScheme};
use serin_certs::{ALPN_H2, crypto_provider};
use tokio::net::TcpStream;
use tonic::codegen::http::Uri;
use tonic::transport::{Channel, Endpoint};

use crate::client::ClientError;

/// The port of an `https://` address that names none: the control plane's TLS port.
pub const DEFAULT_TLS_PORT: u16 = 15012;

/// Gives the client certificate to present, read at each TLS handshake; `None` presents
/// none (then the call needs a bootstrap token). Return `None` for an expired certificate:
/// the control plane refuses the whole handshake when a presented certificate is invalid.
pub type ClientCertFn = Arc<dyn Fn() -> Option<Arc<CertifiedKey>> + Send + Sync>;

/// The TLS settings of a client of the control plane's TLS listener.
#[derive(Clone)]
pub struct ClientTls {
    config: Arc<ClientConfig>,
    server_name: Option<ServerName<'static>>,
}

impl fmt::Debug for ClientTls {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ClientTls").field("server_name", &self.server_name).finish_non_exhaustive()
    }
}

/// A client certificate resolver over a [`ClientCertFn`].
struct CurrentCert(ClientCertFn);

impl fmt::Debug for CurrentCert {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str("CurrentCert")
    }
}

impl ResolvesClientCert for CurrentCert {
    fn resolve(&self, _root_hint_subjects: &[&[u8]], _sigschemes: &[SignatureScheme]) -> Option<Arc<CertifiedKey>> {
        (self.0)()
    }

    fn has_certs(&self) -> bool {
        true
    }
}

impl ClientTls {
    /// TLS that trusts `roots` (the mesh root, `--ca-root`), offers ALPN `h2` and presents
    /// the certificate `client_cert` gives at each handshake, if any.
    pub fn new(roots: &[CertificateDer<'static>], client_cert: Option<ClientCertFn>) -> Result<ClientTls, ClientError> {
        let tls_err = |message: String| ClientError::Tls { message };
        let mut store = RootCertStore::empty();
        for (i, root) in roots.iter().enumerate() {
            store.add(root.clone()).map_err(|e| tls_err(format!("root certificate #{}: {e}", i + 1)))?;
        }
        if store.is_empty() {
            return Err(tls_err("no root certificate to verify the control plane with".into()));
        }
        let verifier = WebPkiServerVerifier::builder_with_provider(Arc::new(store), crypto_provider())
            .build()
            .map_err(|e| tls_err(format!("server verifier: {e}")))?;
        let builder = ClientConfig::builder_with_provider(crypto_provider())
            .with_protocol_versions(&[&TLS13, &TLS12])
            .map_err(|e| tls_err(format!("protocol versions: {e}")))?
            .with_webpki_verifier(verifier);
        let mut config = match client_cert {
            Some(current) => builder.with_client_cert_resolver(Arc::new(CurrentCert(current))),
            None => builder.with_no_client_auth(),
        };
        config.alpn_protocols = vec![ALPN_H2.to_vec()];
        Ok(ClientTls { config: Arc::new(config), server_name: None })
    }

    /// Verifies the control plane's certificate for `name` instead of the host of the
    /// address (when dialling an address the certificate does not list).
    pub fn with_server_name(mut self, name: &str) -> Result<ClientTls, ClientError> {
        let name = ServerName::try_from(name.to_string())
            .map_err(|e| ClientError::Tls { message: format!("server name {name:?}: {e}") })?;
        self.server_name = Some(name);
        Ok(self)
    }
}

/// Where and how to reach the control plane.
#[derive(Debug, Clone)]
pub struct Transport {
    endpoint: Endpoint,
    tls: Option<ClientTls>,
}

impl Transport {
    /// `address` with `tls`: an `https://` address needs TLS settings; `http://host:port`
    /// or a bare `host:port` is plaintext and takes none.
    pub fn new(address: &str, tls: Option<ClientTls>) -> Result<Transport, ClientError> {
        let https = address.starts_with("https://");
        let endpoint = crate::client::endpoint(address)?;
        match (https, tls) {
            (true, Some(tls)) => Ok(Transport { endpoint, tls: Some(tls) }),
            (true, None) => Err(ClientError::Tls {
                message: format!("{address} is a TLS address: the root to verify the control plane with is needed"),
            }),
            (false, Some(_)) => Err(ClientError::Tls {
                message: format!("{address} is a plaintext address; use https://HOST:{DEFAULT_TLS_PORT} for TLS"),
            }),
            (false, None) => Ok(Transport { endpoint, tls: None }),
        }
    }

    /// A plaintext transport over `endpoint`.
    pub fn plaintext(endpoint: Endpoint) -> Transport {
        Transport { endpoint, tls: None }
    }

    /// The endpoint (address and HTTP/2 settings).
    pub fn endpoint(&self) -> &Endpoint {
        &self.endpoint
    }

    /// The same transport with the endpoint changed by `edit` (timeouts, keepalive).
    pub fn with_endpoint(mut self, edit: impl FnOnce(Endpoint) -> Endpoint) -> Transport {
        self.endpoint = edit(self.endpoint);
        self
    }

    /// Whether the connection is TLS.
    pub fn is_tls(&self) -> bool {
        self.tls.is_some()
    }

    /// Opens a channel (TCP, then TLS when configured, then HTTP/2).
    pub async fn connect(&self) -> Result<Channel, tonic::transport::Error> {
        match &self.tls {
            None => self.endpoint.connect().await,
            Some(tls) => self.endpoint.connect_with_connector(TlsConnector { tls: tls.clone() }).await,
        }
    }
}

/// Connects TCP then TLS to the URI's host and port.
#[derive(Clone)]
struct TlsConnector {
    tls: ClientTls,
}

type ConnectFuture =
    Pin<Box<dyn Future<Output = Result<TokioIo<tokio_rustls::client::TlsStream<TcpStream>>, io::Error>> + Send>>;

impl tonic::codegen::Service<Uri> for TlsConnector {
    type Response = TokioIo<tokio_rustls::client::TlsStream<TcpStream>>;
    type Error = io::Error;
    type Future = ConnectFuture;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), io::Error>> {
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, uri: Uri) -> ConnectFuture {
        let tls = self.tls.clone();
        Box::pin(async move {
            let invalid = |message: String| io::Error::new(io::ErrorKind::InvalidInput, message);
            let host = uri.host().ok_or_else(|| invalid(format!("{uri} names no host")))?;
            let host = host.trim_start_matches('[').trim_end_matches(']').to_string();
            let port = uri.port_u16().unwrap_or(DEFAULT_TLS_PORT);
            let server_name = match &tls.server_name {
                Some(name) => name.clone(),
                None => ServerName::try_from(host.clone())
                    .map_err(|e| invalid(format!("{host:?} is not a TLS server name: {e}")))?,
            };
            let tcp = TcpStream::connect((host.as_str(), port)).await?;
            tcp.set_nodelay(true)?;
            let stream = tokio_rustls::TlsConnector::from(Arc::clone(&tls.config)).connect(server_name, tcp).await?;
            Ok(TokioIo::new(stream))
        })
    }
}
