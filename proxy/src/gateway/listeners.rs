//! The gateway's server ports: what each serves now ([`PortState`], swapped on
//! reload) and the accept loop that dispatches every connection.
//!
//! A plain-HTTP port serves HTTP/1.1 and h2c with the port's route table. A TLS
//! port reads the ClientHello first (bounded by [`HANDSHAKE_TIMEOUT`]) and picks
//! the server by SNI (exact, then the longest `*.suffix`, then `*`; a client
//! without SNI only reaches a `*` server; no match closes the connection, as
//! Envoy does without a matching filter chain). A terminating server completes
//! the handshake with its own certificate and serves HTTP/1.1 or h2 (ALPN) with
//! its own route table; a passthrough server forwards the bytes by SNI.
//!
//! Every request goes through [`crate::forward::handle`] with
//! [`RouteSource::Own`] and reporter `source`, as Istio's gateways report. The
//! route tables are `ArcSwap`s that survive reloads, so keep-alive connections
//! follow the new routes.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Duration;

use arc_swap::ArcSwap;
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::TlsAcceptor;

use super::hello::{self, Replay};
use super::hosts;
use super::passthrough;
use super::tls::ServerTls;
use crate::config::gateway::SniRoute;
use crate::forward::{ConnInfo, RouteSource, listener};
use crate::graceful::GracefulShutdown;
use crate::request_info::Reporter;
use crate::snapshot::{HostPattern, Snapshot};
use crate::state::Shared;

/// Time allowed for a client to send its ClientHello and finish the handshake.
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(10);

/// A route table shared by the connections of a port or server.
pub type Routes = Arc<ArcSwap<Snapshot>>;

/// What a port serves now.
#[derive(Debug)]
pub enum PortState {
    /// Plain HTTP with one route table.
    Http(Routes),
    /// TLS servers chosen by SNI.
    Tls(Vec<TlsServerState>),
}

/// One TLS server of a port.
#[derive(Debug)]
pub struct TlsServerState {
    /// `https.443.<port name>.<gateway>.<namespace>`.
    pub name: String,
    /// Server names it answers.
    pub sni: Vec<HostPattern>,
    pub kind: TlsServerKind,
}

/// What a TLS server does.
#[derive(Debug)]
pub enum TlsServerKind {
    /// Terminates TLS and routes HTTP.
    Terminate { tls: Arc<ServerTls>, routes: Routes },
    /// Forwards TLS by SNI.
    Passthrough(Vec<SniRoute>),
}

impl PortState {
    /// The terminating servers' TLS state (for certificate rotation).
    pub fn server_tls(&self) -> impl Iterator<Item = &Arc<ServerTls>> {
        let servers = match self {
            PortState::Http(_) => &[][..],
            PortState::Tls(servers) => servers.as_slice(),
        };
        servers.iter().filter_map(|s| match &s.kind {
            TlsServerKind::Terminate { tls, .. } => Some(tls),
            TlsServerKind::Passthrough(_) => None,
        })
    }
}

/// Serves gateway port `port` on `listener` until the drain starts, then lets
/// plain-HTTP connections finish for up to `timeouts.drain` (TLS connections drain
/// in their own tasks).
pub async fn serve_port(
    listener: TcpListener,
    port: u16,
    state: Arc<ArcSwap<PortState>>,
    shared: Arc<Shared>,
    timeouts: listener::Timeouts,
) {
    let graceful = GracefulShutdown::new();
    let server = listener::HttpServer::new(timeouts.idle);
    listener::accept_loop(listener, &shared, |stream, remote| {
        // Routing sees the Gateway's port number, not the (possibly remapped) socket's.
        let local = SocketAddr::new(stream.local_addr().map_or(remote.ip(), |a| a.ip()), port);
        let current = state.load_full();
        match &*current {
            PortState::Http(routes) => {
                let mut info = ConnInfo::new(remote, local, Reporter::Source, RouteSource::Own(routes.clone()));
                info.edge = true;
                listener::serve_http(&server, &graceful, stream, shared.clone(), info);
            }
            PortState::Tls(_) => {
                let conn = TlsConn {
                    remote,
                    local,
                    shared: shared.clone(),
                    server: server.clone(),
                    drain_timeout: timeouts.drain,
                };
                tokio::spawn(conn.serve(stream, current));
            }
        }
    })
    .await;
    listener::drain_connections(graceful, timeouts.drain).await;
}

/// One accepted connection on a TLS port.
struct TlsConn {
    remote: SocketAddr,
    local: SocketAddr,
    shared: Arc<Shared>,
    server: Arc<listener::HttpServer>,
    drain_timeout: Duration,
}

impl TlsConn {
    async fn serve(self, mut stream: TcpStream, state: Arc<PortState>) {
        let hello = match tokio::time::timeout(HANDSHAKE_TIMEOUT, hello::read_client_hello(&mut stream)).await {
            Ok(Ok(hello)) => hello,
            Ok(Err(e)) => return tracing::debug!(remote = %self.remote, error = %e, "TLS port: connection dropped"),
            Err(_) => return tracing::debug!(remote = %self.remote, "TLS port: no ClientHello in time; dropped"),
        };
        let PortState::Tls(servers) = &*state else { return };
        let Some(server) = hosts::best(servers.iter().map(|s| (s.sni.as_slice(), s)), hello.sni.as_deref()) else {
            tracing::debug!(remote = %self.remote, sni = ?hello.sni, port = self.local.port(), "no gateway server for this server name; closing");
            return;
        };
        match &server.kind {
            TlsServerKind::Passthrough(routes) => {
                passthrough::serve(self.shared.clone(), stream, hello, routes, self.local.port()).await;
            }
            TlsServerKind::Terminate { tls, routes } => self.terminate(stream, hello, tls, routes.clone()).await,
        }
    }

    /// Completes the handshake and serves HTTP until the connection ends or the
    /// drain closes it.
    async fn terminate(self, stream: TcpStream, hello: hello::ClientHello, tls: &ServerTls, routes: Routes) {
        let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
        let io = Replay::new(hello.bytes, stream).with_guard(closed_tx);
        let acceptor = TlsAcceptor::from(tls.config());
        let tls_stream = match tokio::time::timeout(HANDSHAKE_TIMEOUT, acceptor.accept(io)).await {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => {
                return tracing::debug!(remote = %self.remote, sni = ?hello.sni, error = %e, "TLS handshake failed");
            }
            Err(_) => return tracing::debug!(remote = %self.remote, "TLS handshake timed out"),
        };
        let mut info = ConnInfo::new(self.remote, self.local, Reporter::Source, RouteSource::Own(routes));
        info.tls = true;
        info.edge = true;
        // One graceful handle per connection: the port's cannot be shared with this
        // task. The IO's guard tells when hyper is done with the connection.
        let graceful = GracefulShutdown::new();
        listener::serve_http(&self.server, &graceful, tls_stream, self.shared.clone(), info);
        tokio::select! {
            _ = closed_rx => {}
            () = self.shared.drain.signaled() => {
                if tokio::time::timeout(self.drain_timeout, graceful.shutdown()).await.is_err() {
                    tracing::debug!(remote = %self.remote, "drain deadline passed with a TLS connection open");
                }
            }
        }
    }
}
