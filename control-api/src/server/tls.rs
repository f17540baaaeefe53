//! The control plane's TLS listener (Istio's 15012).
//!
//! The control plane issues itself a serving certificate from its CA (SPIFFE ID
//! `spiffe://<td>/ns/serin-system/sa/serin-control-plane`, plus the DNS names and addresses
//! clients dial: [`SERVING_DNS_NAMES`], [`SERVING_IPS`]) and renews it half-way through its
//! lifetime. Client certificates are optional: when one is presented it must chain to the
//! mesh roots (rustls checks it during the handshake) and its SPIFFE ID is handed to the
//! services in [`MeshConnectInfo`]. Every call on this listener must then carry a
//! credential, a verified client certificate or a bootstrap token, else UNAUTHENTICATED.
//!
//! Handshakes run in their own tasks (bounded in number and time), so a slow or silent
//! client holds up nobody; finished connections are handed to tonic as a stream of
//! [`Connected`] I/O objects.

use std::future::Future;
use std::io;
use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use rustls::ServerConfig;
use serin_certs::{ALPN_H2, CertError, ClientAuth, peer_spiffe_id, server_config};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio::net::{TcpListener, TcpStream};
use tokio::sync::{Semaphore, mpsc, watch};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::server::Connected;

use super::ControlPlane;
use super::auth::{MeshConnectInfo, RequireCredentials};
use super::ca::CaSettings;

/// DNS names in the control plane's serving certificate.
pub const SERVING_DNS_NAMES: [&str; 3] = ["serin-control-plane", "serin-control-plane.serin-system.svc", "localhost"];
/// IP addresses in the control plane's serving certificate.
pub const SERVING_IPS: [IpAddr; 2] = [IpAddr::V4(Ipv4Addr::LOCALHOST), IpAddr::V6(Ipv6Addr::LOCALHOST)];

/// Longest time a TLS handshake may take.
const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);
/// Most handshakes in progress at once.
const MAX_HANDSHAKES: usize = 512;
/// Delay before retrying a failed renewal of the serving certificate.
const RENEW_RETRY: Duration = Duration::from_secs(30);

/// Why the TLS listener cannot serve.
#[derive(Debug, thiserror::Error)]
pub enum TlsServeError {
    /// The control plane was built without a CA ([`ControlPlane::with_ca`]).
    #[error("the TLS listener needs the mesh CA (--ca-dir)")]
    NoCa,
    /// The serving certificate cannot be made.
    #[error("the control plane's serving certificate: {0}")]
    Cert(#[from] CertError),
    /// The control plane's identity is not a valid SPIFFE ID.
    #[error("the control plane's identity: {0}")]
    Identity(#[from] serin_certs::SpiffeIdError),
    /// The gRPC server failed.
    #[error("gRPC server: {0}")]
    Transport(#[from] tonic::transport::Error),
}

/// A serving certificate and its rustls config.
struct Serving {
    config: Arc<ServerConfig>,
    issued_at: SystemTime,
    not_after: SystemTime,
    serial: String,
}

fn issue_serving(settings: &CaSettings) -> Result<Serving, TlsServeError> {
    let id = settings.control_plane_identity()?;
    let issued = settings.ca.issue_server(&id, &SERVING_DNS_NAMES, &SERVING_IPS, settings.default_ttl)?;
    let identity = issued.to_identity()?;
    let config = server_config(&identity, ClientAuth::Optional, &[ALPN_H2])?;
    Ok(Serving { config, issued_at: SystemTime::now(), not_after: issued.not_after, serial: issued.serial })
}

/// Half-way from issuance to expiry.
fn renew_at(issued_at: SystemTime, not_after: SystemTime) -> SystemTime {
    issued_at + not_after.duration_since(issued_at).unwrap_or(Duration::ZERO) / 2
}

/// Renews the serving certificate half-way through its lifetime, forever.
async fn renew_serving(settings: Arc<CaSettings>, configs: watch::Sender<Arc<ServerConfig>>, first: Serving) {
    let mut next = renew_at(first.issued_at, first.not_after);
    loop {
        let wait = next.duration_since(SystemTime::now()).unwrap_or(Duration::ZERO);
        tokio::time::sleep(wait).await;
        match issue_serving(&settings) {
            Ok(serving) => {
                tracing::info!(
                    serial = %serving.serial,
                    not_after = %humantime::format_rfc3339_seconds(serving.not_after),
                    "control plane serving certificate renewed"
                );
                configs.send_replace(serving.config);
                next = renew_at(serving.issued_at, serving.not_after);
            }
            Err(error) => {
                tracing::error!(%error, "renewing the control plane's serving certificate failed; retrying");
                next = SystemTime::now() + RENEW_RETRY;
            }
        }
    }
}

/// Accepts TCP connections and hands finished TLS handshakes to `connections`.
async fn accept_loop(
    listener: TcpListener,
    configs: watch::Receiver<Arc<ServerConfig>>,
    connections: mpsc::Sender<Result<TlsIo, io::Error>>,
) {
    let handshakes = Arc::new(Semaphore::new(MAX_HANDSHAKES));
    loop {
        let (tcp, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(pair) => pair,
                Err(error) => {
                    tracing::warn!(%error, "TLS listener: accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = connections.closed() => return,
        };
        let Ok(permit) = Arc::clone(&handshakes).acquire_owned().await else { return };
        let _ = tcp.set_nodelay(true);
        let acceptor = tokio_rustls::TlsAcceptor::from(configs.borrow().clone());
        let connections = connections.clone();
        tokio::spawn(async move {
            let _permit = permit;
            let tls = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => tls,
                Ok(Err(error)) => {
                    tracing::info!(%remote, %error, "TLS listener: handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::info!(%remote, "TLS listener: handshake timed out");
                    return;
                }
            };
            let peer = tls.get_ref().1.peer_certificates().and_then(peer_spiffe_id);
            let info = MeshConnectInfo { remote_addr: Some(remote), peer };
            let _ = connections.send(Ok(TlsIo { inner: tls, info })).await;
        });
    }
}

/// A TLS connection with what the services need to know about its client.
struct TlsIo {
    inner: tokio_rustls::server::TlsStream<TcpStream>,
    info: MeshConnectInfo,
}

impl Connected for TlsIo {
    type ConnectInfo = MeshConnectInfo;

    fn connect_info(&self) -> MeshConnectInfo {
        self.info.clone()
    }
}

impl AsyncRead for TlsIo {
    fn poll_read(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &mut ReadBuf<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_read(cx, buf)
    }
}

impl AsyncWrite for TlsIo {
    fn poll_write(self: Pin<&mut Self>, cx: &mut Context<'_>, buf: &[u8]) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[io::IoSlice<'_>],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.inner.is_write_vectored()
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_shutdown(cx)
    }
}

impl ControlPlane {
    /// Serves discovery, management and certificates over TLS on `listener` until
    /// `shutdown` completes, then ends the streams and returns. Needs the CA
    /// ([`ControlPlane::with_ca`]): the serving certificate comes from it and is renewed
    /// half-way through its lifetime. Every call must carry a verified mesh client
    /// certificate or a bootstrap token, else UNAUTHENTICATED.
    pub async fn serve_tls(
        self,
        listener: TcpListener,
        shutdown: impl Future<Output = ()> + Send,
    ) -> Result<(), TlsServeError> {
        let settings = self.ca.clone().ok_or(TlsServeError::NoCa)?;
        if let Err(e) = self.start_canaries() {
            tracing::error!(error = %e, "canary analyses not resumed");
        }
        let serving = issue_serving(&settings)?;
        tracing::info!(
            listen = ?listener.local_addr().ok(),
            identity = %settings.control_plane_identity()?,
            dns = %SERVING_DNS_NAMES.join(","),
            serial = %serving.serial,
            not_after = %humantime::format_rfc3339_seconds(serving.not_after),
            "TLS listener: serving certificate issued by the mesh CA"
        );
        let (config_tx, config_rx) = watch::channel(Arc::clone(&serving.config));
        let (conn_tx, conn_rx) = mpsc::channel(64);
        let renew = tokio::spawn(renew_serving(Arc::clone(&settings), config_tx, serving));
        let accept = tokio::spawn(accept_loop(listener, config_rx, conn_tx));
        let auth =
            RequireCredentials { tokens: Arc::clone(&settings.tokens), observer: Arc::clone(&self.options.observer) };
        let closing = self.clone();
        let result = tonic::transport::Server::builder()
            .http2_keepalive_interval(Some(self.options.keepalive_interval))
            .http2_keepalive_timeout(Some(Duration::from_secs(10)))
            .layer(tonic::service::InterceptorLayer::new(auth))
            .add_service(self.discovery_service())
            .add_service(self.management_service())
            .add_service(self.load_service())
            .add_service(self.certificates_service())
            .add_service(self.canaries_service())
            .serve_with_incoming_shutdown(ReceiverStream::new(conn_rx), async move {
                shutdown.await;
                closing.close_streams();
            })
            .await;
        renew.abort();
        accept.abort();
        result?;
        // The analyses stop with the streams; none is left writing the state folder.
        self.canaries.join().await;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn renewal_is_half_way_from_issuance() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000);
        assert_eq!(renew_at(now, now + Duration::from_secs(100)), now + Duration::from_secs(50));
        assert_eq!(renew_at(now, now - Duration::from_secs(1)), now);
    }
}
