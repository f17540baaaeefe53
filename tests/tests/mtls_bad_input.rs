//! Bad input around identities (issue 3, "Bad input"): unusable files in
//! `--cert-dir` stop the sidecar at startup with an error naming the file and the
//! problem; a bad reload keeps the old certificate serving and shows the error in
//! `/config_dump`; TLS clients speaking garbage are dropped without disturbing
//! the others.

mod mtls_common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::time::Duration;

use mtls_common::*;
use serin_certs::rustls::pki_types::ServerName;
use serin_certs::rustls::{self};
use serin_certs::{CERT_CHAIN_FILE, Ca, KEY_FILE, ROOT_CERT_FILE, write_atomic, write_workload, write_workload_pem};
use serin_tests::*;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// Starts a sidecar on `cert_dir`; returns its startup error text (`{:#}`).
async fn startup_error(cert_dir: &Path) -> String {
    let config = tempfile::tempdir().expect("tempdir");
    write_config(config.path(), &[]);
    let args = sidecar_args(config.path().to_path_buf(), Some(cert_dir.to_path_buf()));
    match serin::sidecar::start(&args).await {
        Ok(_) => panic!("the sidecar started with the identity in {}", cert_dir.display()),
        Err(e) => format!("{e:#}"),
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn unusable_identity_files_are_a_startup_error_naming_the_file() {
    let ca = Ca::generate("cluster.local").expect("ca");
    let other_ca = Ca::generate("cluster.local").expect("other ca");
    let good = issue(&ca, "payment");
    let another = issue(&ca, "payment");

    type Spoil = Box<dyn Fn(&Path)>;
    let write = |name: &'static str, text: &'static str| -> Spoil {
        Box::new(move |dir: &Path| std::fs::write(dir.join(name), text).expect("write"))
    };
    let another_key = another.key_pem.clone();
    let half_chain = good.chain_pem()[..good.chain_pem().len() / 2].to_string();
    let other_roots = other_ca.roots_pem();
    let expired = issue_between(&ca, "payment", -7200, -3600);
    let cases: Vec<(&str, Spoil, &str, &str)> = vec![
        (
            "key.pem is a directory",
            Box::new(|dir: &Path| {
                std::fs::remove_file(dir.join(KEY_FILE)).expect("rm");
                std::fs::create_dir(dir.join(KEY_FILE)).expect("mkdir");
            }),
            KEY_FILE,
            "cannot read",
        ),
        (
            "key.pem is missing",
            Box::new(|dir: &Path| std::fs::remove_file(dir.join(KEY_FILE)).expect("rm")),
            KEY_FILE,
            "missing",
        ),
        ("key.pem is not a key", write(KEY_FILE, "not a key\n"), KEY_FILE, "not PEM"),
        (
            "key.pem belongs to another certificate",
            Box::new(move |dir: &Path| std::fs::write(dir.join(KEY_FILE), &another_key).expect("write")),
            KEY_FILE,
            "does not match",
        ),
        ("cert-chain.pem is empty", write(CERT_CHAIN_FILE, ""), CERT_CHAIN_FILE, "no CERTIFICATE"),
        ("cert-chain.pem is garbage", write(CERT_CHAIN_FILE, "garbage\x00\x01\x02"), CERT_CHAIN_FILE, "not PEM"),
        (
            "cert-chain.pem is cut in half",
            Box::new(move |dir: &Path| std::fs::write(dir.join(CERT_CHAIN_FILE), &half_chain).expect("write")),
            CERT_CHAIN_FILE,
            "missing the \"-----END CERTIFICATE-----\" line",
        ),
        (
            "the certificate has expired",
            Box::new(move |dir: &Path| {
                write_workload(dir, &expired).expect("write");
            }),
            CERT_CHAIN_FILE,
            "expired",
        ),
        (
            "root-cert.pem is another CA",
            Box::new(move |dir: &Path| std::fs::write(dir.join(ROOT_CERT_FILE), &other_roots).expect("write")),
            ROOT_CERT_FILE,
            "does not chain",
        ),
        (
            "root-cert.pem is garbage",
            write(ROOT_CERT_FILE, "-----BEGIN CERTIFICATE-----\nAAAA\n-----END CERTIFICATE-----\n"),
            ROOT_CERT_FILE,
            "bad certificate",
        ),
    ];
    for (what, spoil, file, problem) in cases {
        let dir = cert_dir(&good);
        spoil(dir.path());
        let error = startup_error(dir.path()).await;
        let path = dir.path().join(file);
        assert!(
            error.contains(&path.display().to_string()),
            "{what}: the error does not name {}: {error}",
            path.display()
        );
        assert!(error.contains(problem), "{what}: the error does not say {problem:?}: {error}");
    }

    // A directory that does not exist.
    let gone = tempfile::tempdir().expect("tempdir").path().join("missing");
    let error = startup_error(&gone).await;
    assert!(error.contains(&gone.display().to_string()) && error.contains("missing"), "{error}");
}

/// Polls `/config_dump` until the identity's `last_error` contains `needle`
/// (bounded: 10 s); returns the identity section.
async fn wait_identity_error(sidecar: &Sidecar, needle: &str) -> serde_json::Value {
    let mut identity = serde_json::Value::Null;
    for _ in 0..200 {
        identity = identity_dump(sidecar).await;
        if identity["last_error"].as_str().is_some_and(|e| e.contains(needle)) {
            return identity;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    panic!("config_dump never showed an identity error with {needle:?}; identity: {identity}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_bad_reload_keeps_the_old_certificate_serving_and_shows_in_config_dump() {
    let m = mesh(&[STRICT.to_string()], &[]).await;
    let inbound = m.payment.sidecar.bound.inbound;
    let probe = mesh_client(&issue(&m.ca, "probe"));
    let old_leaf = m.payment_cert.leaf().expect("leaf").clone();
    let before = identity_dump(&m.payment.sidecar).await;
    assert_eq!(before["spiffe_id"], "spiffe://cluster.local/ns/default/sa/payment", "{before}");
    assert_eq!(before["last_error"], serde_json::Value::Null, "{before}");
    assert!(before["not_after"].as_str().is_some_and(|t| t.ends_with('Z')), "{before}");
    let mut client = Client::connect(m.frontend.bound.outbound, "payment").await;
    assert_eq!(client.get("/", &[]).await.0, 200);

    // Garbage over cert-chain.pem.
    let chain_path = m.payment_dir.path().join(CERT_CHAIN_FILE);
    write_atomic(&chain_path, b"\x16\x03\x01 this is not a certificate", 0o644).expect("write garbage");
    let identity = wait_identity_error(&m.payment.sidecar, &chain_path.display().to_string()).await;
    // Still the old certificate, in the dump and on the wire, for new handshakes too.
    for field in ["spiffe_id", "serial", "not_before", "not_after"] {
        assert_eq!(identity[field], before[field], "{field}: {identity}");
    }
    for _ in 0..3 {
        let exchange = tls_get(inbound, probe.clone()).await;
        assert!(exchange.ok(), "{:?}", exchange.response);
        assert_eq!(exchange.peer.first(), Some(&old_leaf));
    }
    for _ in 0..10 {
        assert_eq!(client.get("/", &[]).await.0, 200);
    }
    let (status, _, _) = get(m.frontend.bound.outbound, "payment", "/", &[]).await.expect("new client connection");
    assert_eq!(status, 200);

    // A key that does not belong to the (new) certificate.
    let newer = issue(&m.ca, "payment");
    write_workload_pem(
        m.payment_dir.path(),
        m.payment_cert.key_pem.as_bytes(),
        newer.chain_pem().as_bytes(),
        newer.roots_pem().as_bytes(),
    )
    .expect("write mismatched identity");
    let identity = wait_identity_error(&m.payment.sidecar, "does not match").await;
    assert_eq!(identity["serial"], before["serial"], "{identity}");
    let exchange = tls_get(inbound, probe.clone()).await;
    assert!(exchange.ok(), "{:?}", exchange.response);
    assert_eq!(exchange.peer.first(), Some(&old_leaf));

    // A good identity again: it is taken, and the error is gone.
    write_workload(m.payment_dir.path(), &newer).expect("write identity");
    let mut identity = serde_json::Value::Null;
    for _ in 0..200 {
        identity = identity_dump(&m.payment.sidecar).await;
        if identity["serial"] != before["serial"] {
            break;
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
    assert_eq!(identity["serial"], newer.to_identity().expect("identity").serial(), "{identity}");
    assert_eq!(identity["last_error"], serde_json::Value::Null, "{identity}");
    let exchange = tls_get(inbound, probe.clone()).await;
    assert!(exchange.ok(), "{:?}", exchange.response);
    assert_eq!(exchange.peer.first(), newer.leaf());
    assert_eq!(client.get("/", &[]).await.0, 200);
    // Nothing was refused along the way.
    let metrics = m.payment.sidecar.scrape().await;
    assert_eq!(metric_sum(&metrics, "serin_inbound_connections_refused_total", &[]), 0.0, "{metrics}");
}

/// A deterministic byte generator (xorshift64*) for "random" garbage.
fn garbage(seed: u64, len: usize) -> Vec<u8> {
    let mut x = seed | 1;
    (0..len)
        .map(|_| {
            x ^= x >> 12;
            x ^= x << 25;
            x ^= x >> 27;
            (x.wrapping_mul(0x2545_f491_4f6c_dd1d) >> 56) as u8
        })
        .collect()
}

/// The first flight of a real rustls client: a TLS record holding a ClientHello.
fn client_hello(config: Arc<rustls::ClientConfig>) -> Vec<u8> {
    let mut conn =
        rustls::ClientConnection::new(config, ServerName::try_from("payment").expect("name")).expect("client");
    let mut out = Vec::new();
    while conn.wants_write() {
        conn.write_tls(&mut out).expect("write ClientHello");
    }
    out
}

/// Sends `bytes`, half-closes, and reads until the server closes (bounded: 15 s).
/// Returns what came back (a TLS alert at most, never HTTP).
async fn send_garbage(addr: SocketAddr, bytes: &[u8]) -> Vec<u8> {
    let mut stream = TcpStream::connect(addr).await.expect("connect");
    // The server may close before it has read everything: write errors are fine.
    let _ = stream.write_all(bytes).await;
    let _ = stream.shutdown().await;
    let mut out = Vec::new();
    let mut buf = [0u8; 4096];
    let deadline = tokio::time::Instant::now() + Duration::from_secs(15);
    loop {
        match tokio::time::timeout_at(deadline, stream.read(&mut buf)).await {
            Ok(Ok(0)) | Ok(Err(_)) => return out,
            Ok(Ok(n)) => out.extend_from_slice(&buf[..n]),
            Err(_) => panic!("the server kept a garbage connection open"),
        }
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn tls_garbage_is_dropped_without_affecting_other_clients() {
    let m = mesh(&[STRICT.to_string()], &[]).await;
    let inbound = m.payment.sidecar.bound.inbound;
    let hello = client_hello(mesh_client(&issue(&m.ca, "probe")));
    assert_eq!(hello[0], 0x16, "a handshake record");

    // One client sends 0x16 and then nothing, holding its connection open.
    let mut silent = TcpStream::connect(inbound).await.expect("connect");
    silent.write_all(&[0x16]).await.expect("write");

    // Good clients, all along: keep-alive requests through the chain and fresh
    // mTLS handshakes straight to the inbound port.
    let stop = Arc::new(AtomicBool::new(false));
    let good_done = Arc::new(AtomicUsize::new(0));
    let chain = {
        let (stop, done, addr) = (stop.clone(), good_done.clone(), m.frontend.bound.outbound);
        tokio::spawn(async move {
            let mut client = Client::connect(addr, "payment").await;
            let mut statuses = Vec::new();
            for _ in 0..5_000 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                statuses.push(client.try_get("/", &[]).await.map(|r| r.0.as_u16()).map_err(|e| e.to_string()));
                done.fetch_add(1, Ordering::Relaxed);
            }
            statuses
        })
    };
    let direct = {
        let (stop, probe) = (stop.clone(), mesh_client(&issue(&m.ca, "probe")));
        tokio::spawn(async move {
            let mut results = Vec::new();
            for _ in 0..500 {
                if stop.load(Ordering::Relaxed) {
                    break;
                }
                let exchange = tls_get(inbound, probe.clone()).await;
                results.push(exchange.ok());
            }
            results
        })
    };

    // Garbage, several kinds, several times each.
    let mut kinds: Vec<(&str, Vec<u8>)> = Vec::new();
    for seed in 1..=5u64 {
        let mut random = vec![0x16];
        random.extend(garbage(seed, 3000));
        kinds.push(("0x16 then random bytes", random));
        kinds.push(("a truncated ClientHello", hello[..hello.len() / 2].to_vec()));
        kinds.push(("a bare record header", hello[..5].to_vec()));
        let mut after = hello.clone();
        after.extend(garbage(seed + 100, 500));
        kinds.push(("a ClientHello then random bytes", after));
        kinds.push(("an oversized record", vec![0x16, 0x03, 0x01, 0xff, 0xff, 0x01, 0x00]));
    }
    let expected = kinds.len();
    let tasks: Vec<_> = kinds
        .into_iter()
        .map(|(what, bytes)| tokio::spawn(async move { (what, send_garbage(inbound, &bytes).await) }))
        .collect();
    for task in tasks {
        let (what, answer) = task.await.expect("garbage client");
        assert!(
            !String::from_utf8_lossy(&answer).contains("HTTP/"),
            "{what}: got an HTTP answer: {}",
            String::from_utf8_lossy(&answer)
        );
        // At most a TLS alert or a handshake flight comes back.
        assert!(answer.is_empty() || matches!(answer[0], 0x15 | 0x16), "{what}: {answer:?}");
    }

    // The good clients kept going.
    let target = good_done.load(Ordering::Relaxed) + 20;
    for _ in 0..400 {
        if good_done.load(Ordering::Relaxed) >= target {
            break;
        }
        tokio::time::sleep(Duration::from_millis(25)).await;
    }
    stop.store(true, Ordering::Relaxed);
    let statuses = chain.await.expect("chain client");
    let direct = direct.await.expect("direct client");
    assert!(statuses.len() >= 20, "only {} requests through the chain", statuses.len());
    assert!(
        statuses.iter().all(|s| *s == Ok(200)),
        "{:?}",
        statuses.iter().filter(|s| **s != Ok(200)).collect::<Vec<_>>()
    );
    assert!(!direct.is_empty() && direct.iter().all(|ok| *ok), "direct mTLS clients: {direct:?}");

    // Every garbage connection was refused and counted; closing the silent one
    // ends its handshake too.
    drop(silent);
    let text = wait_metric(
        &m.payment.sidecar,
        "serin_inbound_connections_refused_total",
        &[("reason", "tls_handshake")],
        (expected + 1) as f64,
    )
    .await;
    assert_eq!(
        metric_sum(&text, "serin_inbound_connections_refused_total", &[("reason", "tls_handshake")]),
        (expected + 1) as f64,
        "{text}"
    );
    let (status, _, _) = get(m.frontend.bound.outbound, "payment", "/", &[]).await.expect("GET");
    assert_eq!(status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn config_dump_identity_is_null_without_a_cert_dir() {
    let sidecar = Sidecar::start(&[]).await;
    assert_eq!(identity_dump(&sidecar).await, serde_json::Value::Null);
}
