//! Host matching through a real sidecar: every spelling of a service's name,
//! with and without port, any case; a wildcard VirtualService host; exact hosts
//! before wildcards; an unknown host is 404 `NR`.

use serin::demo_app::AppConfig;
use serin_tests::*;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_spelling_of_a_service_host_reaches_it() {
    let (_apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", AppConfig::new("payment", "v2"))])
            .await;
    // The VS names the FQDN; clients use any spelling.
    let vs = vs_yaml(
        "payment",
        "payment.default.svc.cluster.local",
        "  - route: [{destination: {host: payment, subset: v2}}]\n",
    );
    let sidecar = Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), vs]).await;
    for host in [
        "payment",
        "payment:8080",
        "payment.default",
        "payment.default:8080",
        "payment.default.svc",
        "payment.default.svc.cluster.local",
        "payment.default.svc.cluster.local:8080",
        "PAYMENT.Default.svc.cluster.local",
        "Payment:8080",
    ] {
        let (status, _, body) = get(sidecar.bound.outbound, host, "/", &[]).await.expect("request");
        assert_eq!(status, 200, "host {host}: {}", String::from_utf8_lossy(&body));
        assert_eq!(version_of(&body).as_deref(), Some("v2"), "host {host}");
    }
    for host in ["payment.other", "payment.default.svc.cluster", "pay", "payment.default.svc.cluster.local.evil"] {
        let (status, _, _) = get(sidecar.bound.outbound, host, "/", &[]).await.expect("request");
        assert_eq!(status, 404, "host {host}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_service_without_virtual_service_is_reachable_by_its_names() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let sidecar = Sidecar::start(&[registry_yaml("payment", "HTTP", &pods)]).await;
    for host in ["payment", "payment.default.svc.cluster.local:8080"] {
        let (status, _, body) = get(sidecar.bound.outbound, host, "/", &[]).await.expect("request");
        assert_eq!(status, 200, "host {host}");
        assert_eq!(version_of(&body).as_deref(), Some("v1"));
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn wildcard_hosts_match_subdomains_and_exact_hosts_win() {
    let (_apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", AppConfig::new("payment", "v2"))])
            .await;
    let wildcard = vs_yaml("shop", "\"*.example.com\"", "  - route: [{destination: {host: payment, subset: v1}}]\n");
    let exact =
        vs_yaml("checkout", "checkout.example.com", "  - route: [{destination: {host: payment, subset: v2}}]\n");
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), wildcard, exact])
            .await;
    for (host, want) in [
        ("shop.example.com", "v1"),
        ("a.b.example.com:8080", "v1"),
        ("WWW.EXAMPLE.COM", "v1"),
        ("checkout.example.com", "v2"),
        ("checkout.example.com:443", "v2"),
    ] {
        let (status, _, body) = get(sidecar.bound.outbound, host, "/", &[]).await.expect("request");
        assert_eq!(status, 200, "host {host}");
        assert_eq!(version_of(&body).as_deref(), Some(want), "host {host}");
    }
    // The wildcard needs a label before the suffix.
    for host in ["example.com", "badexample.com", "unknown.internal"] {
        let (status, _, body) = get(sidecar.bound.outbound, host, "/", &[]).await.expect("request");
        assert_eq!(status, 404, "host {host}: {}", String::from_utf8_lossy(&body));
    }
    sidecar.wait_metric("istio_requests_total", Some("NR"), &[("response_code", "404")], 3.0).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_unknown_host_is_404_nr() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let sidecar = Sidecar::start(&[registry_yaml("payment", "HTTP", &pods)]).await;
    let (status, _, body) = get(sidecar.bound.outbound, "orders", "/", &[]).await.expect("request");
    assert_eq!(status, 404);
    assert_eq!(&body[..], b"route not found");
    let metrics = sidecar
        .wait_metric("istio_requests_total", None, &[("response_code", "404"), ("response_flags", "NR")], 1.0)
        .await;
    assert_eq!(
        metric_sum(&metrics, "istio_requests_total", &[("response_flags", "NR"), ("destination_service", "unknown")]),
        1.0,
        "{metrics}"
    );
}
