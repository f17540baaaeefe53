//! Helpers shared by the integration tests: identities and real TLS handshakes on loopback.
#![allow(dead_code)]

use std::sync::Arc;
use std::time::Duration;

use serin_certs::rustls::pki_types::{CertificateDer, ServerName};
use serin_certs::rustls::{ClientConfig, ServerConfig};
use serin_certs::{SpiffeId, peer_spiffe_id};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

/// Guard against a hung handshake; tests never assert on timings.
pub const GUARD: Duration = Duration::from_secs(20);

pub fn id(s: &str) -> SpiffeId {
    s.parse().expect("test SPIFFE ID")
}

pub fn payment() -> SpiffeId {
    id("spiffe://cluster.local/ns/default/sa/payment")
}

pub fn frontend() -> SpiffeId {
    id("spiffe://cluster.local/ns/default/sa/frontend")
}

/// What one side saw of a connection that completed a request/response exchange.
#[derive(Debug)]
pub struct Side {
    pub peer_certs: Vec<CertificateDer<'static>>,
    pub peer_id: Option<SpiffeId>,
    pub alpn: Option<Vec<u8>>,
    pub version: Option<serin_certs::rustls::ProtocolVersion>,
    pub suite: Option<serin_certs::rustls::CipherSuite>,
}

/// Outcome of [`exchange`]: each side's view, or its error text.
#[derive(Debug)]
pub struct Outcome {
    pub server: Result<Side, String>,
    pub client: Result<Side, String>,
}

impl Outcome {
    pub fn both_ok(&self) -> bool {
        self.server.is_ok() && self.client.is_ok()
    }
}

/// Starts a TLS server on 127.0.0.1:0 that serves `connections` connections, each: handshake,
/// read "ping", answer "pong". Returns its address and a handle yielding each connection's result.
pub async fn serve(
    config: Arc<ServerConfig>,
    connections: usize,
) -> (std::net::SocketAddr, tokio::task::JoinHandle<Vec<Result<Side, String>>>) {
    let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
    let addr = listener.local_addr().expect("addr");
    let acceptor = TlsAcceptor::from(config);
    let handle = tokio::spawn(async move {
        let mut results = Vec::new();
        for _ in 0..connections {
            let (tcp, _) = match listener.accept().await {
                Ok(x) => x,
                Err(e) => {
                    results.push(Err(format!("accept: {e}")));
                    continue;
                }
            };
            let result = async {
                let mut tls = acceptor.accept(tcp).await.map_err(|e| format!("server handshake: {e}"))?;
                let (_, conn) = tls.get_ref();
                let peer_certs: Vec<CertificateDer<'static>> = conn
                    .peer_certificates()
                    .map(|c| c.iter().map(|c| c.clone().into_owned()).collect())
                    .unwrap_or_default();
                let side = Side {
                    peer_id: peer_spiffe_id(&peer_certs),
                    peer_certs,
                    alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
                    version: conn.protocol_version(),
                    suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
                };
                let mut buf = [0u8; 4];
                tls.read_exact(&mut buf).await.map_err(|e| format!("server read: {e}"))?;
                if &buf != b"ping" {
                    return Err(format!("server got {buf:?}"));
                }
                tls.write_all(b"pong").await.map_err(|e| format!("server write: {e}"))?;
                tls.flush().await.map_err(|e| format!("server flush: {e}"))?;
                let _ = tls.shutdown().await;
                Ok(side)
            };
            results.push(tokio::time::timeout(GUARD, result).await.unwrap_or_else(|_| Err("server timed out".into())));
        }
        results
    });
    (addr, handle)
}

/// Connects with `config` (SNI / name `server_name`), sends "ping" and expects "pong".
pub async fn connect(
    addr: std::net::SocketAddr,
    config: Arc<ClientConfig>,
    server_name: &str,
) -> Result<(Side, tokio_rustls::client::TlsStream<TcpStream>), String> {
    let name = ServerName::try_from(server_name.to_string()).map_err(|e| format!("server name: {e}"))?;
    let attempt = async {
        let tcp = TcpStream::connect(addr).await.map_err(|e| format!("connect: {e}"))?;
        let mut tls =
            TlsConnector::from(config).connect(name, tcp).await.map_err(|e| format!("client handshake: {e}"))?;
        let (_, conn) = tls.get_ref();
        let peer_certs: Vec<CertificateDer<'static>> =
            conn.peer_certificates().map(|c| c.iter().map(|c| c.clone().into_owned()).collect()).unwrap_or_default();
        let side = Side {
            peer_id: peer_spiffe_id(&peer_certs),
            peer_certs,
            alpn: conn.alpn_protocol().map(<[u8]>::to_vec),
            version: conn.protocol_version(),
            suite: conn.negotiated_cipher_suite().map(|s| s.suite()),
        };
        tls.write_all(b"ping").await.map_err(|e| format!("client write: {e}"))?;
        tls.flush().await.map_err(|e| format!("client flush: {e}"))?;
        let mut buf = [0u8; 4];
        tls.read_exact(&mut buf).await.map_err(|e| format!("client read: {e}"))?;
        if &buf != b"pong" {
            return Err(format!("client got {buf:?}"));
        }
        Ok((side, tls))
    };
    tokio::time::timeout(GUARD, attempt).await.unwrap_or_else(|_| Err("client timed out".into()))
}

/// One connection: a server with `server_config`, a client with `client_config`.
pub async fn exchange(
    server_config: Arc<ServerConfig>,
    client_config: Arc<ClientConfig>,
    server_name: &str,
) -> Outcome {
    let (addr, server) = serve(server_config, 1).await;
    let client = connect(addr, client_config, server_name).await.map(|(side, _)| side);
    let server = match server.await {
        Ok(mut results) => results.pop().unwrap_or_else(|| Err("no connection".into())),
        Err(e) => Err(format!("server task: {e}")),
    };
    Outcome { server, client }
}

/// A fresh temporary directory.
pub fn tempdir() -> tempfile::TempDir {
    tempfile::tempdir().expect("tempdir")
}
