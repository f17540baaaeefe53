//! Request rewriting through a real sidecar: uri prefix / exact rewrites,
//! authority rewrite, request and response header edits (route and destination
//! level), and mirroring to a shadow service with `-shadow` hosts.

use serin::demo_app::AppConfig;
use serin_tests::*;

async fn echo_world(http: &str) -> (Vec<serin::demo_app::DemoApp>, Sidecar) {
    let (apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", AppConfig::new("payment", "v2"))])
            .await;
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        subsets_yaml("payment", None),
        vs_yaml("payment", "payment", http),
    ])
    .await;
    (apps, sidecar)
}

/// GET `path` through the sidecar; the demo upstream's `/echo` JSON.
async fn echo(sidecar: &Sidecar, path: &str, headers: &[(&str, &str)]) -> serde_json::Value {
    let (status, _, body) = get(sidecar.bound.outbound, "payment", path, headers).await.expect("request");
    assert_eq!(status, 200, "{path}: {}", String::from_utf8_lossy(&body));
    serde_json::from_slice(&body).expect("echo JSON")
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn uri_and_authority_rewrites_reach_the_upstream() {
    let http = r"  - name: api
    match: [{uri: {prefix: /api/}}]
    rewrite: {uri: /}
    route: [{destination: {host: payment, subset: v1}}]
  - name: legacy
    match: [{uri: {exact: /old-echo}}]
    rewrite: {uri: /echo, authority: payments.internal}
    route: [{destination: {host: payment, subset: v1}}]
  - name: nocase
    match: [{uri: {prefix: /SHOP/}, ignoreUriCase: true}]
    rewrite: {uri: /}
    route: [{destination: {host: payment, subset: v1}}]
  - name: rest
    route: [{destination: {host: payment, subset: v1}}]
";
    let (_apps, sidecar) = echo_world(http).await;
    let e = echo(&sidecar, "/api/echo?x=1&y=2", &[]).await;
    assert_eq!((e["path"].as_str(), e["query"].as_str()), (Some("/echo"), Some("x=1&y=2")));
    assert_eq!(e["authority"], "payment", "no authority rewrite on this route");

    let e = echo(&sidecar, "/old-echo?keep=1", &[]).await;
    assert_eq!((e["path"].as_str(), e["query"].as_str()), (Some("/echo"), Some("keep=1")));
    assert_eq!(e["authority"], "payments.internal");

    // A case-insensitive prefix match rewrites the prefix as the client wrote it.
    for path in ["/shop/echo", "/Shop/echo", "/SHOP/echo"] {
        let e = echo(&sidecar, path, &[]).await;
        assert_eq!(e["path"], "/echo", "{path}");
    }

    let e = echo(&sidecar, "/echo", &[]).await;
    assert_eq!(e["path"], "/echo");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_and_response_headers_are_edited() {
    let http = r"  - name: main
    headers:
      request:
        set: {x-env: prod, x-overwritten: by-route}
        add: {x-added: from-route}
        remove: [x-secret]
      response:
        set: {x-served-by: serin}
        add: {x-resp-added: one}
        remove: [x-pod]
    route:
    - destination: {host: payment, subset: v1}
      headers:
        request: {set: {x-dest: v1}}
        response: {set: {x-dest-resp: v1}}
";
    let (_apps, sidecar) = echo_world(http).await;
    let (status, headers, body) = get(
        sidecar.bound.outbound,
        "payment",
        "/echo",
        &[("x-secret", "hunter2"), ("x-overwritten", "by-client"), ("x-added", "from-client"), ("x-keep", "1")],
    )
    .await
    .expect("request");
    assert_eq!(status, 200);
    let e: serde_json::Value = serde_json::from_slice(&body).expect("echo JSON");
    let seen = &e["headers"];
    assert_eq!(seen["x-env"], "prod");
    assert_eq!(seen["x-overwritten"], "by-route");
    assert_eq!(seen["x-added"], "from-client, from-route", "add appends");
    assert!(seen.get("x-secret").is_none(), "removed: {seen}");
    assert_eq!(seen["x-keep"], "1");
    assert_eq!(seen["x-dest"], "v1");
    // Response side, as the client sees it.
    assert_eq!(headers.get("x-served-by").map(|v| v.as_bytes()), Some(&b"serin"[..]));
    assert_eq!(headers.get("x-resp-added").map(|v| v.as_bytes()), Some(&b"one"[..]));
    assert_eq!(headers.get("x-dest-resp").map(|v| v.as_bytes()), Some(&b"v1"[..]));
    assert!(headers.get("x-pod").is_none(), "x-pod removed");
    assert_eq!(headers.get("x-version").map(|v| v.as_bytes()), Some(&b"v1"[..]), "other headers kept");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirrored_requests_reach_the_shadow_with_a_shadow_host() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let shadow = RecordingUpstream::start("payment-shadow-pod").await;
    let mirror_pods = vec![pod_at("mirror-v1-0", "v1", shadow.addr())];
    let http = r"  - name: main
    route: [{destination: {host: payment, subset: v1}}]
    mirror: {host: mirror}
    mirrorPercentage: {value: 100}
";
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        registry_yaml("mirror", "HTTP", &mirror_pods),
        subsets_yaml("payment", None),
        vs_yaml("payment", "payment", http),
    ])
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for i in 0..20 {
        let (status, _, body) = client.try_get(&format!("/pay/{i}?n={i}"), &[("x-trace", "t")]).await.expect("request");
        assert_eq!(status, 200);
        assert_eq!(version_of(&body).as_deref(), Some("v1"), "the client gets the real answer");
    }
    let seen = shadow.wait_seen(20).await;
    assert_eq!(seen.len(), 20);
    for s in &seen {
        assert_eq!(s.host, "payment-shadow", "{s:?}");
        assert!(s.path.starts_with("/pay/"), "{s:?}");
        assert_eq!(s.headers.get("x-trace").map(|v| v.as_bytes()), Some(&b"t"[..]));
    }
    let mut paths: Vec<&str> = seen.iter().map(|s| s.path.as_str()).collect();
    paths.sort_unstable();
    paths.dedup();
    assert_eq!(paths.len(), 20, "each request mirrored once");

    // With a port in the Host, the suffix goes on the host name.
    let (status, _, _) = get(sidecar.bound.outbound, "payment:8080", "/with-port", &[]).await.expect("request");
    assert_eq!(status, 200);
    let seen = shadow.wait_seen(21).await;
    assert!(seen.iter().any(|s| s.path == "/with-port" && s.host == "payment-shadow:8080"), "{seen:?}");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn mirror_percentage_0_mirrors_nothing_and_a_dead_shadow_breaks_nothing() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let shadow = RecordingUpstream::start("shadow").await;
    let mirror_pods = vec![pod_at("mirror-v1-0", "v1", shadow.addr())];
    let dead_pods = vec![pod_at("dead-v1-0", "v1", closed_port())];
    let http = r"  - name: none
    match: [{uri: {prefix: /none}}]
    route: [{destination: {host: payment, subset: v1}}]
    mirror: {host: mirror}
    mirrorPercentage: {value: 0}
  - name: marker
    match: [{uri: {prefix: /marker}}]
    route: [{destination: {host: payment, subset: v1}}]
    mirror: {host: mirror}
  - name: dead
    route: [{destination: {host: payment, subset: v1}}]
    mirror: {host: dead}
";
    let sidecar = Sidecar::start(&[
        registry_yaml("payment", "HTTP", &pods),
        registry_yaml("mirror", "HTTP", &mirror_pods),
        registry_yaml("dead", "HTTP", &dead_pods),
        subsets_yaml("payment", None),
        vs_yaml("payment", "payment", http),
    ])
    .await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    for path in ["/none/1", "/none/2", "/x", "/y"] {
        let (status, _, _) = client.try_get(path, &[]).await.expect("request");
        assert_eq!(status, 200, "{path}");
    }
    // A marker request mirrored at 100% (absent mirrorPercentage): once it has
    // arrived, the shadow has seen nothing else.
    let (status, _, _) = client.try_get("/marker", &[]).await.expect("request");
    assert_eq!(status, 200);
    let seen = shadow.wait_seen(1).await;
    assert_eq!(seen.iter().map(|s| s.path.as_str()).collect::<Vec<_>>(), vec!["/marker"]);
}
