//! HTTP/1.1 and h2c through a real sidecar with a real client (curl): plain GETs,
//! keep-alive, chunked request bodies and `Expect: 100-continue`.

use std::process::Command;

use serin::demo_app::AppConfig;
use serin_tests::*;

fn url(world: &World, path: &str) -> String {
    format!("http://127.0.0.1:{}{path}", world.outbound().port())
}

/// Runs curl; returns (exit ok, stdout, stderr).
fn curl_full(args: &[&str]) -> (bool, String, String) {
    let out = Command::new("curl").args(["-sS", "--max-time", "20"]).args(args).output().expect("curl is installed");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn temp_file(dir: &tempfile::TempDir, name: &str, size: usize) -> (String, Vec<u8>) {
    // Printable, so the echo's `body` string can be compared byte for byte.
    let data: Vec<u8> = (0..size).map(|i| b'a' + (i % 26) as u8).collect();
    let path = dir.path().join(name);
    std::fs::write(&path, &data).expect("write body file");
    (path.to_string_lossy().into_owned(), data)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_http1_and_h2c_get_the_json_answer() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let u = url(&world, "/");
    for extra in [&[][..], &["--http2-prior-knowledge"][..]] {
        let mut args = vec!["-H", "Host: payment", "-w", "\n%{http_code} %{http_version}"];
        args.extend_from_slice(extra);
        args.push(&u);
        let (ok, out, err) = curl_full(&args);
        assert!(ok, "curl {extra:?} failed: {err}");
        let (body, tail) = out.rsplit_once('\n').expect("write-out line");
        let want_version = if extra.is_empty() { "1.1" } else { "2" };
        assert_eq!(tail, format!("200 {want_version}"), "curl {extra:?}: {out}");
        let json = echo_json(body.as_bytes());
        assert_eq!(json["service"], "payment");
        assert_eq!(json["version"], "v1");
    }
    let text = wait_metric(&world.sidecar, "istio_requests_total", &[("response_code", "200")], 2.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[("destination_version", "v1")]), 2.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_keep_alive_reuses_one_connection() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let (a, b, c) = (url(&world, "/a"), url(&world, "/b"), url(&world, "/echo"));
    // HTTP/1.1 only: curl 7.88 (Debian 12) cannot reuse an h2c prior-knowledge
    // connection at all (curl/curl#10634, fixed in 8.0); h2c reuse is covered by
    // `h2c_many_streams_on_one_connection` with hyper's client.
    let (ok, out, err) = curl_full(&[
        "-v",
        "-H",
        "Host: payment",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-o",
        "/dev/null",
        "-w",
        "%{http_code} %{num_connects}\n",
        &a,
        &b,
        &c,
    ]);
    assert!(ok, "curl failed: {err}");
    let lines: Vec<&str> = out.lines().collect();
    assert_eq!(lines, ["200 1", "200 0", "200 0"], "one connect, then reuse\n{err}");
    assert!(err.to_ascii_lowercase().contains("re-using existing connection"), "{err}");
    assert!(!err.contains("Connection: close") && !err.contains("connection: close"), "{err}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn h2c_many_streams_on_one_connection() {
    use http_body_util::BodyExt;
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let mut sender = h2c_connect(world.outbound()).await;
    // Sequential requests, then concurrent streams, all on the one connection.
    for i in 0..5 {
        let req = http::Request::get(format!("http://payment/seq/{i}")).body(empty_body()).expect("request");
        let resp = sender.send_request(req).await.expect("h2 response");
        assert_eq!(resp.status(), 200);
        let body = resp.into_body().collect().await.expect("body").to_bytes();
        assert_eq!(version_of(&body).as_deref(), Some("v1"));
    }
    let mut tasks = Vec::new();
    for i in 0..10 {
        let mut s = sender.clone();
        tasks.push(tokio::spawn(async move {
            let req = http::Request::get(format!("http://payment/delay/{}", 50 + i)).body(empty_body()).expect("req");
            let resp = s.send_request(req).await.expect("h2 response");
            let status = resp.status();
            let body = resp.into_body().collect().await.expect("body").to_bytes();
            (status, version_of(&body))
        }));
    }
    for t in tasks {
        let (status, version) = t.await.expect("task");
        assert_eq!(status, 200);
        assert_eq!(version.as_deref(), Some("v1"));
    }
    let text = wait_metric(&world.sidecar, "istio_requests_total", &[("response_code", "200")], 15.0).await;
    assert_eq!(metric_sum(&text, "istio_requests_total", &[]), 15.0, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_chunked_request_body_reaches_the_upstream_whole() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let dir = tempfile::tempdir().expect("tempdir");
    let (path, data) = temp_file(&dir, "body.txt", 300 * 1024);
    let at_path = format!("@{path}");
    let u = url(&world, "/echo");
    for extra in [&[][..], &["--http2-prior-knowledge"][..]] {
        let mut args = vec!["-H", "Host: payment", "-H", "Content-Type: text/plain"];
        if extra.is_empty() {
            args.extend_from_slice(&["-H", "Transfer-Encoding: chunked"]);
        }
        args.extend_from_slice(&["--data-binary", &at_path]);
        args.extend_from_slice(extra);
        args.push(&u);
        let (ok, out, err) = curl_full(&args);
        assert!(ok, "curl {extra:?} failed: {err}");
        let echo = echo_json(out.as_bytes());
        assert_eq!(echo["method"], "POST");
        assert_eq!(echo["body_bytes"], data.len(), "curl {extra:?}");
        assert!(echo["body"].as_str() == Some(std::str::from_utf8(&data).expect("ascii")), "body differs");
        if extra.is_empty() {
            // The upstream got a streamed (chunked) body, not a Content-Length one.
            assert_eq!(echo["headers"]["transfer-encoding"], "chunked", "{}", echo["headers"]);
            assert!(echo["headers"].get("content-length").is_none(), "{}", echo["headers"]);
        }
    }
    let text = wait_metric(&world.sidecar, "istio_request_bytes_count", &[("response_code", "200")], 2.0).await;
    let received = metric_sum(&text, "istio_request_bytes_sum", &[("response_code", "200")]);
    assert_eq!(received, (2 * data.len()) as f64, "{text}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn curl_expect_100_continue_large_post() {
    let world = World::payment_v1("HTTP", AppConfig::default(), "").await;
    let dir = tempfile::tempdir().expect("tempdir");

    // Above 1 MiB curl sends `Expect: 100-continue` by itself; the proxy must
    // answer the 100 (not make curl wait it out) and stream the body upstream.
    let (big, big_data) = temp_file(&dir, "big.txt", 3 * 1024 * 1024);
    let at_big = format!("@{big}");
    let u = url(&world, "/");
    let (ok, out, err) =
        curl_full(&["-v", "-H", "Host: payment", "--expect100-timeout", "15", "--data-binary", &at_big, &u]);
    assert!(ok, "curl failed: {err}");
    assert!(err.contains("Expect: 100-continue"), "curl did not send Expect:\n{err}");
    assert!(err.contains("HTTP/1.1 100 Continue"), "no 100 Continue from the proxy:\n{err}");
    assert!(err.contains("HTTP/1.1 200"), "{err}");
    assert_eq!(version_of(out.as_bytes()).as_deref(), Some("v1"), "{out}");

    // Forced on a smaller body: the upstream gets the whole body and no Expect.
    let (small, small_data) = temp_file(&dir, "small.txt", 256 * 1024);
    let at_small = format!("@{small}");
    let echo_url = url(&world, "/echo");
    let (ok, out, err) = curl_full(&[
        "-v",
        "-H",
        "Host: payment",
        "-H",
        "Expect: 100-continue",
        "--expect100-timeout",
        "15",
        "--data-binary",
        &at_small,
        &echo_url,
    ]);
    assert!(ok, "curl failed: {err}");
    assert!(err.contains("HTTP/1.1 100 Continue"), "{err}");
    let echo = echo_json(out.as_bytes());
    assert_eq!(echo["body_bytes"], small_data.len());
    assert!(echo["headers"].get("expect").is_none(), "Expect forwarded: {}", echo["headers"]);

    let text = wait_metric(&world.sidecar, "istio_request_bytes_count", &[("response_code", "200")], 2.0).await;
    let received = metric_sum(&text, "istio_request_bytes_sum", &[("response_code", "200")]);
    assert_eq!(received, (big_data.len() + small_data.len()) as f64, "{text}");

    // A local reply (no route) to an Expect request: the final status comes instead
    // of the 100 and curl does not send the body.
    let (ok, out, err) = curl_full(&[
        "-v",
        "-H",
        "Host: nosuch",
        "--expect100-timeout",
        "15",
        "-w",
        "\n%{http_code}",
        "--data-binary",
        &at_big,
        &u,
    ]);
    assert!(ok, "curl failed: {err}");
    assert!(out.ends_with("\n404"), "{out}");
    assert!(!err.contains("100 Continue"), "{err}");
    let text = wait_metric(&world.sidecar, "istio_requests_total", &[("response_flags", "NR")], 1.0).await;
    assert_eq!(metric_sum(&text, "istio_request_bytes_sum", &[("response_flags", "NR")]), 0.0, "{text}");
}
