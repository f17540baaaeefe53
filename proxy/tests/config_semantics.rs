//! Istio semantics of the config model: weights, errors with field paths, hosts,
//! subsets, DestinationRule merging, retries, registry links.

use std::time::Duration;

use serin::config::{self, ConfigErrors, ConfigSet};
use serin::snapshot::{EndpointRegistry, LoadBalancer, RouteAction, Snapshot};

const REGISTRY: &str = r#"
apiVersion: networking.istio.io/v1
kind: ServiceEntry
metadata: {name: payment, namespace: prod}
spec:
  hosts: [payment]
  location: MESH_INTERNAL
  resolution: STATIC
  ports: [{number: 8080, name: http, protocol: HTTP}]
  endpoints:
  - {address: 127.0.0.1, labels: {app: payment, version: v1}}
  - {address: 127.0.0.2, labels: {app: payment, version: v1, zone: a}}
  - {address: 127.0.0.3, labels: {app: payment, version: v2}}
---
apiVersion: networking.istio.io/v1beta1
kind: ServiceEntry
metadata: {name: multi, namespace: prod}
spec:
  hosts: [multi.prod.svc.cluster.local]
  resolution: STATIC
  ports: [{number: 80, name: http}, {number: 9090, name: admin, protocol: http}]
  endpoints: [{address: 127.0.0.9, ports: {admin: 19090}}]
---
apiVersion: networking.istio.io/v1alpha3
kind: DestinationRule
metadata: {name: payment, namespace: prod}
spec:
  host: payment
  trafficPolicy:
    loadBalancer: {simple: ROUND_ROBIN}
    connectionPool: {tcp: {maxConnections: 100, connectTimeout: 250ms}}
    outlierDetection: {consecutive5xxErrors: 3}
  subsets:
  - name: v1
    labels: {version: v1}
  - name: v2
    labels: {version: v2}
    trafficPolicy:
      loadBalancer: {consistentHash: {httpHeaderName: x-user}}
  - name: v1a
    labels: {version: v1, zone: a}
"#;

fn load(text: &str) -> Result<ConfigSet, ConfigErrors> {
    config::load_sources(&[("registry.yaml", REGISTRY), ("test.yaml", text)])
}

fn compile(text: &str) -> Result<Snapshot, ConfigErrors> {
    let set = load(text)?;
    config::compile(&set, &EndpointRegistry::default(), "test")
}

fn vs(http: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {{name: payment, namespace: prod}}\nspec:\n  hosts: [payment]\n  http:\n{http}"
    )
}

fn split(weights: &[(&str, i64)]) -> String {
    let mut out = String::from("  - route:\n");
    for (subset, w) in weights {
        out.push_str(&format!("    - destination: {{host: payment, subset: {subset}}}\n      weight: {w}\n"));
    }
    out
}

fn weights(snapshot: &Snapshot) -> Vec<(String, u32)> {
    let vh = snapshot.find_virtual_host("payment").expect("payment host");
    let RouteAction::Forward(w) = &vh.routes[0].action else { panic!("forward") };
    w.destinations.iter().map(|d| (d.cluster.subset.clone().unwrap_or_default(), d.weight)).collect()
}

fn errors_of(result: Result<impl std::fmt::Debug, ConfigErrors>) -> String {
    result.expect_err("must fail").to_string()
}

#[test]
fn weights_are_relative() {
    let s = compile(&vs(&split(&[("v1", 999), ("v2", 1)]))).expect("999/1 is valid");
    assert_eq!(weights(&s), vec![("v1".into(), 999), ("v2".into(), 1)]);
    let s = compile(&vs(&split(&[("v1", 1), ("v2", 1)]))).expect("1/1 is valid");
    assert_eq!(weights(&s).len(), 2);
    let s = compile(&vs(&split(&[("v1", 100), ("v2", 0)]))).expect("0 drops the destination");
    assert_eq!(weights(&s), vec![("v1".into(), 100)]);
    let s = compile(&vs(&split(&[("v2", 0)]))).expect("a single destination takes all");
    assert_eq!(weights(&s), vec![("v2".into(), 1)]);
    let s = compile(&vs(&split(&[("v1", 7)]))).expect("single with any weight");
    assert_eq!(weights(&s), vec![("v1".into(), 7)]);
}

#[test]
fn weight_errors() {
    let e = errors_of(load(&vs(&split(&[("v1", 0), ("v2", 0)]))));
    assert!(e.contains("spec.http[0].route: total destination weight is 0"), "{e}");
    let e = errors_of(load(&vs(&split(&[("v1", 100), ("v2", -5)]))));
    assert!(e.contains("spec.http[0].route[1].weight: weight -5 must not be negative"), "{e}");
    assert!(e.contains("test.yaml: VirtualService prod/payment"), "{e}");
}

#[test]
fn unknown_field_is_named_with_its_path_and_position() {
    let text = vs("  - route:\n    - destination: {host: payment}\n      wieght: 5\n");
    let errors = load(&text).expect_err("unknown field");
    let e = &errors.0[0];
    assert_eq!(e.file, "test.yaml");
    assert_eq!(e.resource, "VirtualService prod/payment");
    assert_eq!(e.field, "spec.http[0].route[0].wieght");
    assert!(e.message.contains("unknown field `wieght`"), "{e}");
    assert_eq!(e.location, Some((9, 7)));
}

#[test]
fn unsupported_istio_fields_are_errors_naming_the_field() {
    let text = vs(
        "  - corsPolicy: {allowOrigins: [{exact: x}]}\n    route: [{destination: {host: payment}}]\n  - route: [{destination: {host: payment}}]\n    rewrite: {uriRegexRewrite: {match: a, rewrite: b}}\n",
    );
    let e = errors_of(load(&text));
    assert!(e.contains("spec.http[0].corsPolicy: field is not supported by serin"), "{e}");
    assert!(e.contains("spec.http[1].rewrite.uriRegexRewrite: field is not supported by serin"), "{e}");
    assert_eq!(e.lines().count(), 2, "every error, not just the first: {e}");
}

#[test]
fn yaml_syntax_error_gives_line_and_column() {
    let text = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata:\n  name: x\nspec:\n  hosts: [a\n  http: [\n";
    let errors = load(text).expect_err("syntax");
    let e = &errors.0[0];
    let (line, column) = e.location.expect("position");
    assert!(line >= 6 && column >= 1, "{e}");
    assert!(e.to_string().starts_with(&format!("test.yaml:{line}:{column}: invalid YAML")), "{e}");
}

#[test]
fn invalid_values_are_named() {
    let e = errors_of(load(&vs("  - route: [{destination: {host: payment}}]\n    timeout: 7x\n")));
    assert!(e.contains("spec.http[0].timeout: invalid duration \"7x\""), "{e}");
    let e = errors_of(load(&vs(
        "  - route: [{destination: {host: payment}}]\n    retries: {attempts: 3, retryOn: '5xx,bogus'}\n",
    )));
    assert!(e.contains("spec.http[0].retries.retryOn: unsupported retryOn value \"bogus\""), "{e}");
    let dr = "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: d}\nspec:\n  host: x\n  trafficPolicy: {loadBalancer: {simple: FASTEST}}\n";
    let e = errors_of(load(dr));
    assert!(e.contains("spec.trafficPolicy.loadBalancer.simple") && e.contains("FASTEST"), "{e}");
    let e = errors_of(load(&vs("  - route: [{destination: {host: payment}, weight: lots}]\n")));
    assert!(e.contains("spec.http[0].route[0].weight") && e.contains("lots"), "{e}");
}

/// A DestinationRule for `multi` whose `connectionPool` holds `section` (`http`
/// or `tcp`) with the fields `fields`.
fn pool_rule(section: &str, fields: &str) -> String {
    format!(
        "apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {{name: d, namespace: prod}}\nspec:\n  host: multi\n  trafficPolicy: {{connectionPool: {{{section}: {{{fields}}}}}}}\n"
    )
}

/// The connection pool `multi` gets from [`pool_rule`]`(section, fields)`.
fn compiled_pool(section: &str, fields: &str) -> serin::snapshot::ConnectionPool {
    let s = compile(&pool_rule(section, fields)).expect("compiles");
    s.clusters.get("outbound|80||multi.prod.svc.cluster.local").expect("cluster").policy.pool.clone()
}

#[test]
fn h2_upgrade_policy_and_client_protocol() {
    let dr = |http: &str| pool_rule("http", http);
    let pool = |http: &str| compiled_pool("http", http);
    let p = pool("h2UpgradePolicy: UPGRADE");
    assert!(p.h2_upgrade == Some(true) && !p.use_client_protocol);
    assert_eq!(pool("h2UpgradePolicy: DO_NOT_UPGRADE").h2_upgrade, Some(false));
    assert_eq!(pool("h2UpgradePolicy: DEFAULT").h2_upgrade, None);
    assert_eq!(pool("idleTimeout: 1h").h2_upgrade, None);
    assert!(pool("useClientProtocol: true").use_client_protocol);
    assert!(!pool("useClientProtocol: false").use_client_protocol);
    let e = errors_of(load(&dr("h2UpgradePolicy: SOMETIMES")));
    assert!(e.contains("spec.trafficPolicy.connectionPool.http.h2UpgradePolicy") && e.contains("SOMETIMES"), "{e}");
    let e = errors_of(load(&dr("useClientProtocol: maybe")));
    assert!(e.contains("spec.trafficPolicy.connectionPool.http.useClientProtocol"), "{e}");
}

/// `connectionPool.tcp.idleTimeout`: 1 h unless set, `0s` turns it off, a bad
/// value names the field.
#[test]
fn tcp_idle_timeout() {
    let idle = |tcp: &str| compiled_pool("tcp", tcp).tcp_idle_timeout;
    assert_eq!(idle("maxConnections: 10"), Duration::from_secs(3600));
    assert_eq!(idle("idleTimeout: 30s"), Duration::from_secs(30));
    assert_eq!(idle("idleTimeout: 0s"), Duration::ZERO);
    let e = errors_of(load(&pool_rule("tcp", "idleTimeout: soon")));
    assert!(e.contains("spec.trafficPolicy.connectionPool.tcp.idleTimeout") && e.contains("soon"), "{e}");
}

#[test]
fn kinds() {
    let e = errors_of(load("apiVersion: v1\nkind: Service\nmetadata: {name: x}\nspec: {}\n"));
    assert!(e.contains("unknown kind \"Service\""), "{e}");
    let e =
        errors_of(load("apiVersion: networking.istio.io/v2\nkind: VirtualService\nmetadata: {name: x}\nspec: {}\n"));
    assert!(e.contains("unsupported apiVersion \"networking.istio.io/v2\""), "{e}");
    // YAML 1.1 booleans (`y`, `no`) stay strings where Istio expects strings.
    let s = load("apiVersion: networking.istio.io/v1\nkind: DestinationRule\nmetadata: {name: y, namespace: no}\nspec: {host: x, subsets: [{name: on, labels: {version: yes}}]}\n").expect("strings");
    assert_eq!(s.resources.last().map(|r| r.resource.display_name()), Some("DestinationRule no/y".to_string()));
    let ra = "---\n# nothing\n---\napiVersion: security.istio.io/v1\nkind: RequestAuthentication\nmetadata: {name: default}\nspec: {jwtRules: [{issuer: x}]}\n---\n";
    let set = load(ra).expect("accepted, not applied");
    assert!(set.warnings.iter().any(|w| w.contains("RequestAuthentication")), "{:?}", set.warnings);
}

#[test]
fn hosts_answer_to_every_form() {
    let s = compile(&vs(&split(&[("v1", 1)]))).expect("compiles");
    for host in ["payment", "payment.prod", "payment.prod.svc", "payment.prod.svc.cluster.local"] {
        assert_eq!(s.find_virtual_host(host).map(|v| v.name.as_str()), Some("prod/payment"), "{host}");
    }
    // A service without a VirtualService gets an implicit one.
    let vh = s.find_virtual_host("multi.prod").expect("implicit");
    assert_eq!(vh.name, "service:multi.prod.svc.cluster.local");
    assert!(s.find_virtual_host("other").is_none());
    let wild = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: w, namespace: prod}\nspec:\n  hosts: ['*.example.com']\n  http: [{route: [{destination: {host: payment}}]}]\n";
    let s = compile(wild).expect("compiles");
    assert_eq!(s.find_virtual_host("api.example.com").map(|v| v.name.as_str()), Some("prod/w"));
}

#[test]
fn subsets_select_endpoints_by_labels_and_merge_policy() {
    let s = compile(&vs(&split(&[("v1", 90), ("v2", 5), ("v1a", 5)]))).expect("compiles");
    let c = |n: &str| s.clusters.get(n).unwrap_or_else(|| panic!("{n}"));
    let v1 = c("outbound|8080|v1|payment.prod.svc.cluster.local");
    assert_eq!(v1.endpoints.len(), 2);
    assert_eq!(c("outbound|8080|v1a|payment.prod.svc.cluster.local").endpoints.len(), 1);
    let v2 = c("outbound|8080|v2|payment.prod.svc.cluster.local");
    assert_eq!(v2.endpoints.len(), 1);
    assert_eq!(c("outbound|8080||payment.prod.svc.cluster.local").endpoints.len(), 3);
    // Rule policy, subset overriding field by field.
    assert_eq!(v1.policy.load_balancer, LoadBalancer::RoundRobin);
    assert!(matches!(v2.policy.load_balancer, LoadBalancer::ConsistentHash(_)));
    assert_eq!(v2.policy.pool.max_connections, 100);
    assert_eq!(v2.policy.pool.connect_timeout, Duration::from_millis(250));
    let outlier = v2.policy.outlier.as_ref().expect("outlier on");
    assert_eq!((outlier.consecutive_5xx, outlier.max_ejection_percent), (3, 10));
    // Endpoint runtime state is shared by address across clusters.
    assert!(std::sync::Arc::ptr_eq(
        &v2.endpoints[0].state,
        &c("outbound|8080||payment.prod.svc.cluster.local").endpoints[2].state
    ));
}

#[test]
fn registry_links_are_checked() {
    let e = errors_of(compile(&vs("  - route: [{destination: {host: nowhere}}]\n")));
    assert!(
        e.contains(
            "spec.http[0].route[0].destination.host: host nowhere.prod.svc.cluster.local is not in the service registry"
        ),
        "{e}"
    );
    let e = errors_of(compile(&vs(&split(&[("v9", 1)]))));
    assert!(e.contains("spec.http[0].route[0].destination.subset: unknown subset \"v9\""), "{e}");
    let multi = "apiVersion: networking.istio.io/v1\nkind: VirtualService\nmetadata: {name: m, namespace: prod}\nspec:\n  hosts: [multi]\n  http:\n  - route: [{destination: {host: multi}}]\n";
    let e = errors_of(compile(multi));
    assert!(e.contains("destination.port: port.number is required: service multi.prod.svc.cluster.local has several ports (80, 9090)"), "{e}");
    let by_match = multi.replace("  - route:", "  - match: [{port: 9090}]\n    route:");
    let s = compile(&by_match).expect("match port picks the destination port");
    let vh = s.find_virtual_host("multi").expect("vh");
    let RouteAction::Forward(w) = &vh.routes[0].action else { panic!("forward") };
    assert_eq!(w.destinations[0].cluster.name, "outbound|9090||multi.prod.svc.cluster.local");
    assert_eq!(w.destinations[0].cluster.endpoints[0].addr.port(), 19090);
}

#[test]
fn retries_timeouts_and_defaults() {
    let text = vs(
        "  - route: [{destination: {host: payment}}]\n    timeout: 0.5s\n    retries: {attempts: 3, perTryTimeout: 100ms, retryOn: 'gateway-error,503'}\n  - route: [{destination: {host: payment}}]\n    retries: {attempts: 0}\n  - route: [{destination: {host: payment}}]\n",
    );
    let s = compile(&text).expect("compiles");
    let r = &s.find_virtual_host("payment").expect("vh").routes;
    assert_eq!(r[0].timeout, Some(Duration::from_millis(500)));
    assert_eq!(r[0].retry.attempts, 3);
    assert_eq!(r[0].retry.per_try_timeout, Some(Duration::from_millis(100)));
    assert!(r[0].retry.retry_on.gateway_error && !r[0].retry.retry_on.connect_failure);
    assert_eq!(r[0].retry.retriable_status_codes, vec![503]);
    assert_eq!(r[1].retry.attempts, 0);
    assert_eq!(r[2].retry.attempts, 2);
    assert!(r[2].retry.retry_on.connect_failure && r[2].timeout.is_none());
    assert_eq!(r[2].name, "prod/payment/2");
}

#[test]
fn gateways_decide_what_reaches_the_sidecar() {
    let gw_only = vs(&split(&[("v1", 1)])).replace("  hosts: [payment]", "  hosts: [payment]\n  gateways: [ingress]");
    let s = compile(&gw_only).expect("compiles");
    assert_eq!(s.find_virtual_host("payment").map(|v| v.name.as_str()), Some("service:payment.prod.svc.cluster.local"));
    let both =
        vs(&split(&[("v1", 1)])).replace("  hosts: [payment]", "  hosts: [payment]\n  gateways: [ingress, mesh]");
    let s = compile(&both).expect("compiles");
    assert_eq!(s.find_virtual_host("payment").map(|v| v.name.as_str()), Some("prod/payment"));
}

#[test]
fn match_request_fields() {
    let text = vs(
        "  - match:\n    - uri: {prefix: /API}\n      ignoreUriCase: true\n      headers: {x-canary: {}, End-User: {exact: jason}}\n      withoutHeaders: {x-skip: {regex: 'a|b'}}\n      queryParams: {debug: {exact: '1'}}\n      method: {exact: GET}\n    route: [{destination: {host: payment}}]\n    headers: {request: {set: {x-a: b}, remove: [x-c]}}\n    fault: {abort: {httpStatus: 503, percentage: {value: 0.1}}}\n    mirror: {host: payment, subset: v2}\n    mirrorPercentage: {value: 5}\n  - redirect: {uri: /new, redirectCode: 302}\n  - directResponse: {status: 418, body: {string: teapot}}\n",
    );
    let s = compile(&text).expect("compiles");
    let r = &s.find_virtual_host("payment").expect("vh").routes;
    let m = &r[0].matches[0];
    assert!(matches!(&m.uri, Some(serin::snapshot::StringMatch::Prefix(p)) if p == "/api"));
    assert_eq!(m.headers.len(), 2);
    assert!(m.headers.iter().any(|(h, v)| h == "x-canary" && v.is_none()));
    assert!(m.headers.iter().any(|(h, v)| h == "end-user" && v.is_some()));
    assert_eq!(m.without_headers.len(), 1);
    assert_eq!(m.query_params.len(), 1);
    assert_eq!(r[0].headers.request.set.len(), 1);
    assert_eq!(r[0].fault.as_ref().and_then(|f| f.abort.as_ref()).map(|a| a.percentage), Some(0.1));
    let mirror = r[0].mirror.as_ref().expect("mirror");
    assert_eq!((mirror.cluster.subset.as_deref(), mirror.percentage), (Some("v2"), 5.0));
    assert!(matches!(&r[1].action, RouteAction::Redirect(red) if red.status.as_u16() == 302));
    assert!(
        matches!(&r[2].action, RouteAction::Direct { status, body } if status.as_u16() == 418 && &body[..] == b"teapot")
    );
}

#[test]
fn source_labels_and_duplicates_are_errors() {
    let e =
        errors_of(load(&vs("  - match: [{sourceLabels: {app: web}}]\n    route: [{destination: {host: payment}}]\n")));
    assert!(e.contains("spec.http[0].match[0].sourceLabels: field is not supported by serin"), "{e}");
    let twice = format!("{}---\n{}", vs(&split(&[("v1", 1)])), vs(&split(&[("v2", 1)])));
    let e = errors_of(load(&twice));
    assert!(e.contains("VirtualService prod/payment: metadata.name: defined twice"), "{e}");
}

#[test]
fn version_is_a_content_hash() {
    let a = compile(&vs(&split(&[("v1", 95), ("v2", 5)]))).expect("a");
    let b = compile(&vs(&split(&[("v1", 95), ("v2", 5)]))).expect("b");
    let c = compile(&vs(&split(&[("v1", 100), ("v2", 0)]))).expect("c");
    assert_eq!(a.version, b.version);
    assert_ne!(a.version, c.version);
    assert!(a.version.len() == 16 && a.version.chars().all(|c| c.is_ascii_hexdigit()));
    assert_eq!(a.source, "test");
}

#[test]
fn validate_command_exit_codes() {
    let dir = std::env::temp_dir().join(format!("serin-validate-{}", std::process::id()));
    std::fs::create_dir_all(&dir).expect("tmp");
    let good = dir.join("good.yaml");
    std::fs::write(&good, format!("{REGISTRY}---\n{}", vs(&split(&[("v1", 1), ("v2", 999)])))).expect("write");
    let bad = dir.join("bad.yaml");
    std::fs::write(&bad, vs("  - route: [{destination: {host: payment}, weight: -1}]\n    corsPolicy: {}\n"))
        .expect("write");
    assert_eq!(config::validate_command(std::slice::from_ref(&good)), std::process::ExitCode::SUCCESS);
    assert_eq!(config::validate_command(&[good, bad]), std::process::ExitCode::FAILURE);
    let _ = std::fs::remove_dir_all(&dir);
}
