//! Route matching through a real sidecar: header exact / prefix / regex /
//! presence, uri exact / prefix / regex / ignoreUriCase, method, query
//! parameters, withoutHeaders, AND inside a match, OR across matches, and
//! first match wins.

use serin::demo_app::AppConfig;
use serin_tests::*;

/// A route answering directly with its own name, so a test sees which matched.
fn named(name: &str, matches: &str) -> String {
    format!("  - name: {name}\n    match: {matches}\n    directResponse: {{status: 200, body: {{string: {name}}}}}\n")
}

fn match_vs() -> String {
    let mut http = String::new();
    http.push_str("  - name: canary-override\n    match: [{headers: {x-canary: {exact: always}}}]\n    route: [{destination: {host: payment, subset: v2}}]\n");
    http.push_str(&named("hdr-prefix", "[{headers: {x-user: {prefix: beta-}}}]"));
    http.push_str(&named("hdr-regex", "[{headers: {X-Tenant: {regex: \"t[0-9]+\"}}}]"));
    http.push_str(&named("hdr-present", "[{headers: {x-debug: {}}}]"));
    http.push_str(&named("uri-exact", "[{uri: {exact: /exact}}]"));
    http.push_str(&named("uri-prefix", "[{uri: {prefix: /api/}}]"));
    http.push_str(&named("uri-regex", "[{uri: {regex: \"/v[0-9]+/pay\"}}]"));
    http.push_str(&named("uri-nocase", "[{uri: {prefix: /Shop}, ignoreUriCase: true}]"));
    http.push_str(&named("method", "[{method: {exact: DELETE}}]"));
    http.push_str(&named("query", "[{queryParams: {debug: {exact: \"1\"}}}]"));
    http.push_str(&named("query-regex", "[{queryParams: {ab: {regex: \"(a|b)\"}}}]"));
    http.push_str(&named("guarded", "[{uri: {prefix: /guarded}, withoutHeaders: {x-skip: {}}}]"));
    http.push_str(&named("and", "[{uri: {prefix: /and}, headers: {x-and: {exact: \"yes\"}}}]"));
    http.push_str(&named("or", "[{uri: {exact: /or1}}, {uri: {exact: /or2}}]"));
    http.push_str(&named("first-a", "[{uri: {prefix: /first}}]"));
    http.push_str(&named("first-b", "[{uri: {exact: /first}}]"));
    http.push_str("  - name: default\n    route: [{destination: {host: payment, subset: v1}}]\n");
    vs_yaml("payment", "payment", &http)
}

/// (method, path, request headers, expected route name or upstream version)
type Case<'a> = (&'a str, &'a str, &'a [(&'a str, &'a str)], &'a str);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn matches_pick_the_first_route_that_accepts_the_request() {
    let (_apps, pods) =
        start_pods("payment", vec![("v1", AppConfig::new("payment", "v1")), ("v2", AppConfig::new("payment", "v2"))])
            .await;
    let sidecar =
        Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), match_vs()]).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let cases: &[Case] = &[
        ("GET", "/", &[], "v1"),
        ("GET", "/", &[("x-canary", "always")], "v2"),
        ("GET", "/", &[("x-canary", "Always")], "v1"),
        ("GET", "/", &[("x-canary", "always-not")], "v1"),
        ("GET", "/", &[("x-user", "beta-alice")], "hdr-prefix"),
        ("GET", "/", &[("x-user", "alpha-beta-bob")], "v1"),
        ("GET", "/", &[("x-tenant", "t42")], "hdr-regex"),
        ("GET", "/", &[("x-tenant", "t42x")], "v1"),
        ("GET", "/", &[("x-tenant", "xt42")], "v1"),
        ("GET", "/", &[("x-debug", "")], "hdr-present"),
        ("GET", "/", &[("x-debug", "anything")], "hdr-present"),
        ("GET", "/exact", &[], "uri-exact"),
        ("GET", "/exact?q=1", &[], "uri-exact"),
        ("GET", "/exact/more", &[], "v1"),
        ("GET", "/api/pay", &[], "uri-prefix"),
        ("GET", "/api", &[], "v1"),
        ("GET", "/v2/pay", &[], "uri-regex"),
        ("GET", "/v10/pay", &[], "uri-regex"),
        ("GET", "/v2/pay/x", &[], "v1"),
        ("GET", "/vx/pay", &[], "v1"),
        ("GET", "/shop/cart", &[], "uri-nocase"),
        ("GET", "/SHOP", &[], "uri-nocase"),
        ("GET", "/shoe", &[], "v1"),
        ("DELETE", "/", &[], "method"),
        ("delete", "/", &[], "v1"),
        ("GET", "/?debug=1", &[], "query"),
        ("GET", "/?a=2&debug=1", &[], "query"),
        ("GET", "/?debug=10", &[], "v1"),
        ("GET", "/?debug", &[], "v1"),
        ("GET", "/?ab=b", &[], "query-regex"),
        ("GET", "/?ab=ab", &[], "v1"),
        ("GET", "/guarded", &[], "guarded"),
        ("GET", "/guarded", &[("x-skip", "1")], "v1"),
        ("GET", "/and", &[("x-and", "yes")], "and"),
        ("GET", "/and", &[], "v1"),
        ("GET", "/other", &[("x-and", "yes")], "v1"),
        ("GET", "/or1", &[], "or"),
        ("GET", "/or2", &[], "or"),
        ("GET", "/or3", &[], "v1"),
        ("GET", "/first", &[], "first-a"),
        ("GET", "/firstly", &[], "first-a"),
        // An earlier route wins over a later one that also matches.
        ("GET", "/exact", &[("x-canary", "always")], "v2"),
        ("DELETE", "/api/x", &[("x-user", "beta-1")], "hdr-prefix"),
    ];
    let mut failures = Vec::new();
    for (method, path, headers, want) in cases {
        let (status, _, body) = client.request(method, path, headers).await.expect("request");
        assert_eq!(status, 200, "{method} {path} {headers:?}: {}", String::from_utf8_lossy(&body));
        let got = version_of(&body).unwrap_or_else(|| String::from_utf8_lossy(&body).into_owned());
        if got != *want {
            failures.push(format!("{method} {path} {headers:?}: got {got}, want {want}"));
        }
    }
    assert!(failures.is_empty(), "wrong routes:\n{}", failures.join("\n"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn no_matching_route_is_404_nr() {
    let (_apps, pods) = start_pods("payment", vec![("v1", AppConfig::new("payment", "v1"))]).await;
    let vs = vs_yaml(
        "payment",
        "payment",
        "  - match: [{uri: {prefix: /pay}}]\n    route: [{destination: {host: payment, subset: v1}}]\n",
    );
    let sidecar = Sidecar::start(&[registry_yaml("payment", "HTTP", &pods), subsets_yaml("payment", None), vs]).await;
    let mut client = Client::connect(sidecar.bound.outbound, "payment").await;
    let (status, _, _) = client.try_get("/pay/1", &[]).await.expect("request");
    assert_eq!(status, 200);
    for _ in 0..3 {
        let (status, _, _) = client.try_get("/other", &[]).await.expect("request");
        assert_eq!(status, 404);
    }
    sidecar.wait_metric("istio_requests_total", Some("NR"), &[("response_code", "404")], 3.0).await;
}
