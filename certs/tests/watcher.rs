//! Rotation: the IdentityWatcher publishes re-issued certificates, keeps the old identity when
//! the new files are bad, and new handshakes use the new certificate while existing
//! connections go on.

mod common;

use std::sync::Arc;
use std::time::Duration;

use common::{GUARD, frontend, payment, tempdir};
use serin_certs::rustls::pki_types::ServerName;
use serin_certs::{
    BundleOptions, CERT_CHAIN_FILE, Ca, CertError, CertSource, DEFAULT_WORKLOAD_LIFETIME, IdentityBundle,
    IdentityWatcher, KEY_FILE, MESH_ALPN, StaticCertSource, WatcherOptions, client_config, write_atomic,
    write_workload,
};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_rustls::{TlsAcceptor, TlsConnector};

fn fast() -> WatcherOptions {
    WatcherOptions { poll_interval: Duration::from_millis(50), ..WatcherOptions::default() }
}

/// Polls `cond` until it holds (bounded by [`GUARD`]).
async fn wait_until(what: &str, mut cond: impl FnMut() -> bool) {
    let deadline = tokio::time::Instant::now() + GUARD;
    while !cond() {
        assert!(tokio::time::Instant::now() < deadline, "timed out waiting for {what}");
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
}

#[tokio::test]
async fn picks_up_a_reissued_certificate() {
    let ca = Ca::generate("cluster.local").unwrap();
    let dir = tempdir();
    let first = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    write_workload(dir.path(), &first).unwrap();
    let (watcher, _task) = IdentityWatcher::spawn_with(dir.path(), fast()).unwrap();
    let mut rx = watcher.subscribe();
    assert_eq!(watcher.current().identity().serial(), first.serial);

    let second = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    assert_ne!(second.serial, first.serial);
    write_workload(dir.path(), &second).unwrap();
    tokio::time::timeout(GUARD, rx.changed()).await.expect("a new bundle").unwrap();
    assert_eq!(rx.borrow_and_update().identity().serial(), second.serial);
    assert_eq!(watcher.current().identity().serial(), second.serial);
    let status = watcher.status();
    assert_eq!(status.reloads, 1);
    assert_eq!(status.last_error, None);

    // Unchanged files publish nothing more.
    tokio::time::sleep(Duration::from_millis(300)).await;
    assert!(!rx.has_changed().unwrap());
}

#[tokio::test]
async fn keeps_the_old_identity_when_new_files_are_garbage() {
    let ca = Ca::generate("cluster.local").unwrap();
    let dir = tempdir();
    let first = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    write_workload(dir.path(), &first).unwrap();
    let (watcher, _task) = IdentityWatcher::spawn_with(dir.path(), fast()).unwrap();
    let source: Arc<dyn CertSource> = Arc::new(watcher.clone());
    let mut rx = source.subscribe();

    write_atomic(&dir.path().join(CERT_CHAIN_FILE), b"garbage", 0o644).unwrap();
    wait_until("the reload error", || watcher.last_error().is_some()).await;
    let error = source.last_error().unwrap();
    assert!(error.contains("cert-chain.pem: not PEM"), "{error}");
    assert_eq!(source.current().identity().serial(), first.serial, "old identity kept");
    assert!(!rx.has_changed().unwrap(), "nothing published");

    // A missing file is reported the same way.
    std::fs::remove_file(dir.path().join(KEY_FILE)).unwrap();
    wait_until("the missing-file error", || {
        watcher.last_error().is_some_and(|e| e.contains("key.pem: file is missing"))
    })
    .await;
    assert_eq!(source.current().identity().serial(), first.serial);

    // Good files again: published, error cleared.
    let second = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    write_workload(dir.path(), &second).unwrap();
    tokio::time::timeout(GUARD, rx.changed()).await.expect("a new bundle").unwrap();
    assert_eq!(source.current().identity().serial(), second.serial);
    assert_eq!(watcher.last_error(), None);
}

#[tokio::test]
async fn a_half_written_set_is_retried_then_reported() {
    let ca = Ca::generate("cluster.local").unwrap();
    let dir = tempdir();
    let first = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    write_workload(dir.path(), &first).unwrap();
    let (watcher, _task) = IdentityWatcher::spawn_with(dir.path(), fast()).unwrap();

    // Only the key of the next certificate arrives: key and chain disagree.
    let second = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    write_atomic(&dir.path().join(KEY_FILE), second.key_pem.as_bytes(), 0o600).unwrap();
    wait_until("the mismatch to be reported", || watcher.last_error().is_some()).await;
    assert!(watcher.last_error().unwrap().contains("does not match"), "{:?}", watcher.last_error());
    assert_eq!(watcher.current().identity().serial(), first.serial);

    // The chain follows: the set is whole again.
    write_atomic(&dir.path().join(CERT_CHAIN_FILE), second.chain_pem().as_bytes(), 0o644).unwrap();
    wait_until("the reload", || watcher.current().identity().serial() == second.serial).await;
    assert_eq!(watcher.last_error(), None);

    // Back to the first set's files after a failure clears the error as well.
    write_atomic(&dir.path().join(CERT_CHAIN_FILE), b"garbage", 0o644).unwrap();
    wait_until("the error", || watcher.last_error().is_some()).await;
    write_atomic(&dir.path().join(CERT_CHAIN_FILE), second.chain_pem().as_bytes(), 0o644).unwrap();
    wait_until("the error to clear", || watcher.last_error().is_none()).await;
    assert_eq!(watcher.status().reloads, 1);
}

#[tokio::test]
async fn startup_errors_name_the_file() {
    let dir = tempdir();
    let err = IdentityWatcher::spawn(dir.path()).expect_err("empty dir");
    assert!(matches!(err, CertError::Missing { .. }), "{err}");
    assert!(err.to_string().contains("key.pem: file is missing"), "{err}");
}

#[tokio::test]
async fn task_ends_when_nobody_listens() {
    let ca = Ca::generate("cluster.local").unwrap();
    let dir = tempdir();
    write_workload(dir.path(), &ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap()).unwrap();
    let (watcher, task) = IdentityWatcher::spawn_with(dir.path(), fast()).unwrap();
    let rx = watcher.subscribe();
    drop(watcher);
    drop(rx);
    tokio::time::timeout(GUARD, task).await.expect("task ends").unwrap();
}

/// Serves mTLS with whatever server config the source holds at accept time; each connection
/// answers "pong" to every "ping" until EOF.
async fn rotating_server(source: Arc<dyn CertSource>) -> std::net::SocketAddr {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = TlsAcceptor::from(source.current().server_config().clone());
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else { return };
                let mut buf = [0u8; 4];
                while tls.read_exact(&mut buf).await.is_ok() {
                    if tls.write_all(b"pong").await.is_err() {
                        return;
                    }
                }
            });
        }
    });
    addr
}

async fn ping(tls: &mut tokio_rustls::client::TlsStream<TcpStream>) {
    tls.write_all(b"ping").await.unwrap();
    let mut buf = [0u8; 4];
    tokio::time::timeout(GUARD, tls.read_exact(&mut buf)).await.expect("answer").unwrap();
    assert_eq!(&buf, b"pong");
}

#[tokio::test]
async fn new_handshakes_use_the_new_certificate_and_old_connections_go_on() {
    let ca = Ca::generate("cluster.local").unwrap();
    let dir = tempdir();
    let first = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    write_workload(dir.path(), &first).unwrap();
    let (watcher, _task) = IdentityWatcher::spawn_with(dir.path(), fast()).unwrap();
    let addr = rotating_server(Arc::new(watcher.clone())).await;

    let client =
        client_config(&ca.issue(&frontend(), DEFAULT_WORKLOAD_LIFETIME).unwrap().to_identity().unwrap(), MESH_ALPN)
            .unwrap();
    let connector = TlsConnector::from(client);
    let dial = || async {
        let tcp = TcpStream::connect(addr).await.unwrap();
        connector.connect(ServerName::try_from("payment").unwrap(), tcp).await.expect("handshake")
    };
    let mut old_conn = dial().await;
    ping(&mut old_conn).await;
    assert_eq!(old_conn.get_ref().1.peer_certificates().unwrap()[0], first.chain[0]);

    let second = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap();
    write_workload(dir.path(), &second).unwrap();
    wait_until("the rotation", || watcher.current().identity().serial() == second.serial).await;

    let mut new_conn = dial().await;
    ping(&mut new_conn).await;
    assert_eq!(new_conn.get_ref().1.peer_certificates().unwrap()[0], second.chain[0], "new certificate presented");
    // The connection made before the rotation still works.
    ping(&mut old_conn).await;
}

#[tokio::test]
async fn static_source_and_bundle_options() {
    let ca = Ca::generate("cluster.local").unwrap();
    let identity = ca.issue(&payment(), DEFAULT_WORKLOAD_LIFETIME).unwrap().to_identity().unwrap();
    let options = BundleOptions { client_alpn: vec![b"http/1.1".to_vec()], ..BundleOptions::default() };
    let bundle = IdentityBundle::new(identity, &options).unwrap();
    assert_eq!(bundle.client_config().alpn_protocols, vec![b"http/1.1".to_vec()]);
    assert_eq!(bundle.server_config().alpn_protocols, vec![b"h2".to_vec(), b"http/1.1".to_vec()]);
    let source: Arc<dyn CertSource> = Arc::new(StaticCertSource::new(bundle));
    assert_eq!(source.current().identity().spiffe_id(), &payment());
    assert_eq!(source.subscribe().borrow().identity().spiffe_id(), &payment());
    assert_eq!(source.last_error(), None);
}
