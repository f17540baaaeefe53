//! Shared pieces of the `gateway_*` tests: a test PKI (rcgen), temp folders,
//! curl, a raw rustls client that reports the certificate a server presents, and
//! the configuration snippets that put a demo upstream behind a gateway.
//!
//! Every wait is bounded; nothing asserts timings.

#![allow(dead_code)] // each test file uses a different part

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::process::Output;
use std::sync::Arc;
use std::sync::atomic::{AtomicU32, Ordering};
use std::time::{Duration, Instant};

use rcgen::{
    BasicConstraints, CertificateParams, DnType, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair, KeyUsagePurpose,
    SerialNumber,
};
use serin::gateway::{self, GatewayArgs, Started};
use serin_certs::rustls;
use serin_certs::rustls::pki_types::pem::PemObject as _;
use serin_certs::rustls::pki_types::{CertificateDer, ServerName};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Bound for every wait.
pub const WAIT: Duration = Duration::from_secs(20);

/// A fresh folder under the system temp dir, removed on drop.
pub struct TempDir(PathBuf);

impl TempDir {
    pub fn new(tag: &str) -> TempDir {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let nanos = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let dir = std::env::temp_dir().join(format!("serin-gw-{tag}-{}-{nanos}-{n}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("create temp dir");
        TempDir(dir)
    }

    pub fn path(&self) -> &Path {
        &self.0
    }

    /// Writes `name` atomically (write to a temporary name, then rename).
    pub fn write(&self, name: &str, text: &str) -> PathBuf {
        write_atomic(&self.0.join(name), text)
    }
}

impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

/// Writes `path` atomically; creates its folder.
pub fn write_atomic(path: &Path, text: &str) -> PathBuf {
    let dir = path.parent().expect("parent");
    std::fs::create_dir_all(dir).expect("mkdir");
    let tmp = dir.join(format!(".{}.tmp", path.file_name().and_then(|n| n.to_str()).unwrap_or("f")));
    std::fs::write(&tmp, text).expect("write");
    std::fs::rename(&tmp, path).expect("rename");
    path.to_path_buf()
}

/// A test certificate authority.
pub struct Pki {
    issuer: Issuer<'static, KeyPair>,
    pub ca_pem: String,
    pub ca_der: CertificateDer<'static>,
}

/// A certificate and its key.
pub struct Issued {
    pub cert_pem: String,
    pub key_pem: String,
    pub der: CertificateDer<'static>,
}

impl Pki {
    pub fn new(name: &str) -> Pki {
        let key = KeyPair::generate().expect("ca key");
        let mut params = CertificateParams::new(Vec::<String>::new()).expect("params");
        params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
        params.distinguished_name.push(DnType::CommonName, name);
        params.key_usages =
            vec![KeyUsagePurpose::KeyCertSign, KeyUsagePurpose::CrlSign, KeyUsagePurpose::DigitalSignature];
        let cert = params.self_signed(&key).expect("ca cert");
        Pki { ca_pem: cert.pem(), ca_der: cert.der().clone(), issuer: Issuer::new(params, key) }
    }

    fn issue(&self, names: &[&str], serial: u64, usage: ExtendedKeyUsagePurpose) -> Issued {
        let key = KeyPair::generate().expect("key");
        let mut params =
            CertificateParams::new(names.iter().map(|n| n.to_string()).collect::<Vec<_>>()).expect("params");
        params.distinguished_name.push(DnType::CommonName, names.first().copied().unwrap_or("client"));
        params.serial_number = Some(SerialNumber::from(serial));
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &self.issuer).expect("sign");
        Issued { cert_pem: cert.pem(), key_pem: key.serialize_pem(), der: cert.der().clone() }
    }

    /// A server certificate for DNS `names` with this serial.
    pub fn server(&self, names: &[&str], serial: u64) -> Issued {
        self.issue(names, serial, ExtendedKeyUsagePurpose::ServerAuth)
    }

    /// A client certificate.
    pub fn client(&self, name: &str, serial: u64) -> Issued {
        self.issue(&[name], serial, ExtendedKeyUsagePurpose::ClientAuth)
    }
}

impl Issued {
    /// Writes `<stem>.crt` and `<stem>.key` in `dir`; returns their paths.
    pub fn write(&self, dir: &Path, stem: &str) -> (PathBuf, PathBuf) {
        let cert = write_atomic(&dir.join(format!("{stem}.crt")), &self.cert_pem);
        let key = write_atomic(&dir.join(format!("{stem}.key")), &self.key_pem);
        (cert, key)
    }
}

/// A ServiceEntry for a local upstream (`host` in `namespace`) at `addr`.
pub fn service_entry(name: &str, namespace: &str, host: &str, addr: SocketAddr, protocol: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {{name: {name}, namespace: {namespace}}}
spec:
  hosts: [{host}]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{{number: {port}, name: p, protocol: {protocol}}}]
  endpoints: [{{address: {ip}}}]
---
",
        port = addr.port(),
        ip = addr.ip(),
    )
}

/// Starts a gateway on `config` with Gateway `ports` on ephemeral loopback ports.
pub async fn start(config: &Path, ports: &[u16]) -> Started {
    start_with(GatewayArgs::local(config.to_path_buf(), ports)).await
}

/// Starts a gateway with `args`.
pub async fn start_with(args: GatewayArgs) -> Started {
    match gateway::start(&args).await {
        Ok(started) => started,
        Err(e) => panic!("gateway did not start: {e:#}"),
    }
}

/// Runs curl with `args` (plus `-s --max-time 10`).
pub async fn curl(args: Vec<String>) -> Output {
    tokio::task::spawn_blocking(move || {
        std::process::Command::new("curl").arg("-s").arg("--max-time").arg("10").args(&args).output().expect("run curl")
    })
    .await
    .expect("curl task")
}

/// `--resolve host:port:127.0.0.1` for `addr`.
pub fn resolve(host: &str, addr: SocketAddr) -> String {
    format!("{host}:{}:{}", addr.port(), addr.ip())
}

/// Lines of `out.stdout` as text.
pub fn stdout(out: &Output) -> String {
    String::from_utf8_lossy(&out.stdout).into_owned()
}

/// A rustls client trusting `ca_der`, with an optional client certificate.
pub fn client_config(ca_der: &CertificateDer<'static>, client: Option<&Issued>) -> Arc<rustls::ClientConfig> {
    let mut roots = rustls::RootCertStore::empty();
    roots.add(ca_der.clone()).expect("root");
    let builder = rustls::ClientConfig::builder_with_provider(serin_certs::crypto_provider())
        .with_safe_default_protocol_versions()
        .expect("versions")
        .with_root_certificates(roots);
    let mut config = match client {
        Some(c) => {
            let key = rustls::pki_types::PrivateKeyDer::from_pem_slice(c.key_pem.as_bytes()).expect("client key");
            builder.with_client_auth_cert(vec![c.der.clone()], key).expect("client auth")
        }
        None => builder.with_no_client_auth(),
    };
    config.alpn_protocols = vec![b"http/1.1".to_vec()];
    Arc::new(config)
}

/// A TLS connection to `addr` with SNI `sni`.
pub async fn connect_tls(
    addr: SocketAddr,
    sni: &str,
    config: Arc<rustls::ClientConfig>,
) -> std::io::Result<tokio_rustls::client::TlsStream<TcpStream>> {
    let tcp = TcpStream::connect(addr).await?;
    let name = ServerName::try_from(sni.to_string()).map_err(std::io::Error::other)?;
    tokio::time::timeout(WAIT, tokio_rustls::TlsConnector::from(config).connect(name, tcp))
        .await
        .map_err(|_| std::io::Error::other("handshake timed out"))?
}

/// The leaf certificate a TLS server at `addr` presents for `sni`.
pub async fn presented_cert(addr: SocketAddr, sni: &str, ca: &CertificateDer<'static>) -> CertificateDer<'static> {
    let tls = connect_tls(addr, sni, client_config(ca, None)).await.expect("handshake");
    tls.get_ref().1.peer_certificates().and_then(|c| c.first()).cloned().expect("peer certificate")
}

/// Sends one HTTP/1.1 keep-alive GET on an open stream and returns the status
/// and body (the response must have a Content-Length).
pub async fn get_keep_alive<S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin>(
    stream: &mut S,
    host: &str,
    path: &str,
) -> (u16, String) {
    let req = format!("GET {path} HTTP/1.1\r\nHost: {host}\r\nUser-Agent: gateway-test\r\n\r\n");
    stream.write_all(req.as_bytes()).await.expect("send");
    let mut buf = Vec::new();
    let mut chunk = [0u8; 4096];
    let deadline = Instant::now() + WAIT;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).to_string();
            let len: usize = head
                .lines()
                .find_map(|l| l.to_ascii_lowercase().strip_prefix("content-length:").map(|v| v.trim().to_string()))
                .and_then(|v| v.parse().ok())
                .expect("content-length");
            if buf.len() >= end + 4 + len {
                let status = head.split_whitespace().nth(1).and_then(|s| s.parse().ok()).expect("status");
                return (status, String::from_utf8_lossy(&buf[end + 4..end + 4 + len]).into_owned());
            }
        }
        assert!(Instant::now() < deadline, "no complete response");
        let n = tokio::time::timeout(WAIT, stream.read(&mut chunk)).await.expect("read timeout").expect("read");
        assert!(n > 0, "connection closed before the response was complete: {:?}", String::from_utf8_lossy(&buf));
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// Waits until `check` returns true.
pub async fn wait_for<F, Fut>(what: &str, mut check: F)
where
    F: FnMut() -> Fut,
    Fut: std::future::Future<Output = bool>,
{
    let deadline = Instant::now() + WAIT;
    while !check().await {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(100)).await;
    }
}

/// GET `path` from an admin-style plain HTTP server.
pub async fn admin_get(addr: SocketAddr, path: &str) -> String {
    let mut s = TcpStream::connect(addr).await.expect("connect admin");
    let req = format!("GET {path} HTTP/1.1\r\nHost: admin\r\nConnection: close\r\n\r\n");
    s.write_all(req.as_bytes()).await.expect("send");
    let mut out = Vec::new();
    tokio::time::timeout(WAIT, s.read_to_end(&mut out)).await.expect("admin timeout").expect("read");
    let text = String::from_utf8_lossy(&out).into_owned();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_string()).unwrap_or(text)
}

/// An HTTP/1.1 hyper client over a new tokio-rustls connection to `addr` (SNI
/// `sni`, trusting `ca`, a fresh client config so no session is resumed), and the
/// leaf certificate the server presented in that handshake. The connection is
/// driven by a task of its own until the sender is dropped or the server closes it.
pub async fn https_client(
    addr: SocketAddr,
    sni: &str,
    ca: &CertificateDer<'static>,
) -> std::io::Result<(
    hyper::client::conn::http1::SendRequest<http_body_util::Empty<bytes::Bytes>>,
    CertificateDer<'static>,
)> {
    let tls = connect_tls(addr, sni, client_config(ca, None)).await?;
    let leaf = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or_else(|| std::io::Error::other("no peer certificate"))?;
    let (sender, conn) = hyper::client::conn::http1::handshake(hyper_util::rt::TokioIo::new(tls))
        .await
        .map_err(std::io::Error::other)?;
    tokio::spawn(async move {
        let _ = conn.await;
    });
    Ok((sender, leaf))
}
