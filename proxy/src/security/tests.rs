//! Unit tests of the evaluation engine, with policies written as Istio YAML and
//! compiled by the config code.

use std::net::IpAddr;

use http::{HeaderMap, HeaderValue};

use super::*;
use crate::snapshot::EndpointRegistry;

fn policies(yaml: &str) -> SecurityPolicies {
    let set = crate::config::load_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("loads: {e}"));
    crate::config::compile(&set, &EndpointRegistry::default(), "test")
        .unwrap_or_else(|e| panic!("compiles: {e}"))
        .security
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

fn pa(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: {ns}}}\nspec: {spec}\n"
    )
}

fn ap(ns: &str, name: &str, spec: &str) -> String {
    format!(
        "---\napiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: {name}, namespace: {ns}}}\nspec:\n{spec}\n"
    )
}

/// A request to a `prod` workload; plaintext unless `principal` is set.
#[derive(Clone)]
struct Req {
    principal: Option<String>,
    ip: IpAddr,
    method: &'static str,
    path: &'static str,
    host: &'static str,
    port: u16,
    headers: HeaderMap,
}

impl Req {
    fn new() -> Req {
        Req {
            principal: Some("cluster.local/ns/prod/sa/frontend".into()),
            ip: "10.0.0.7".parse().expect("ip"),
            method: "GET",
            path: "/",
            host: "payment.prod.svc.cluster.local",
            port: 8080,
            headers: HeaderMap::new(),
        }
    }
    fn from(mut self, principal: Option<&str>) -> Req {
        self.principal = principal.map(str::to_string);
        self
    }
    fn ip(mut self, ip: &str) -> Req {
        self.ip = ip.parse().expect("ip");
        self
    }
    fn to(mut self, method: &'static str, path: &'static str) -> Req {
        self.method = method;
        self.path = path;
        self
    }
    fn host(mut self, host: &'static str) -> Req {
        self.host = host;
        self
    }
    fn port(mut self, port: u16) -> Req {
        self.port = port;
        self
    }
    fn header(mut self, name: &'static str, value: &'static str) -> Req {
        self.headers.append(name, HeaderValue::from_static(value));
        self
    }
    fn attrs(&self) -> RequestAttrs<'_> {
        let principal = self.principal.as_deref();
        RequestAttrs {
            source_principal: principal,
            source_namespace: principal.and_then(principal_namespace),
            source_ip: self.ip,
            method: self.method,
            path: self.path,
            host: self.host,
            port: self.port,
            headers: &self.headers,
        }
    }
}

/// Whether `req` to an `app: payment` workload in `prod` is allowed.
fn allowed(p: &SecurityPolicies, req: &Req) -> bool {
    p.authorize("prod", &labels(&[("app", "payment"), ("version", "v1")]), &req.attrs()).is_allowed()
}

// ---------- PeerAuthentication ----------

#[test]
fn no_policy_is_permissive() {
    let p = SecurityPolicies::default();
    assert_eq!(p.root_namespace, ROOT_NAMESPACE);
    assert!(p.is_empty());
    assert_eq!(p.peer_mode("prod", &labels(&[("app", "a")]), 8080), MtlsMode::Permissive);
}

#[test]
fn mesh_namespace_workload_port_precedence() {
    let yaml = [
        pa("istio-system", "default", "{mtls: {mode: STRICT}}"),
        pa("legacy", "default", "{mtls: {mode: DISABLE}}"),
        pa("legacy", "payment", "{selector: {matchLabels: {app: payment}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {9090: {mode: STRICT}}}"),
        pa("prod", "metrics", "{selector: {matchLabels: {app: payment}}, portLevelMtls: {15090: {mode: DISABLE}}}"),
    ]
    .concat();
    let p = policies(&yaml);
    let payment = labels(&[("app", "payment"), ("version", "v2")]);
    let other = labels(&[("app", "other")]);
    // Mesh.
    assert_eq!(p.peer_mode("prod", &other, 8080), MtlsMode::Strict);
    assert_eq!(p.peer_mode("istio-system", &other, 8080), MtlsMode::Strict);
    // Namespace over mesh.
    assert_eq!(p.peer_mode("legacy", &other, 8080), MtlsMode::Disable);
    // Workload over namespace, port over workload.
    assert_eq!(p.peer_mode("legacy", &payment, 8080), MtlsMode::Permissive);
    assert_eq!(p.peer_mode("legacy", &payment, 9090), MtlsMode::Strict);
    // Workload policy with UNSET mode inherits the mesh; its port override still applies.
    assert_eq!(p.peer_mode("prod", &payment, 8080), MtlsMode::Strict);
    assert_eq!(p.peer_mode("prod", &payment, 15090), MtlsMode::Disable);
    // A selector must match all its labels.
    assert_eq!(p.peer_mode("legacy", &labels(&[("version", "v2")]), 9090), MtlsMode::Disable);
}

#[test]
fn unset_inherits_from_the_level_above() {
    let yaml = [
        pa("istio-system", "default", "{mtls: {mode: DISABLE}}"),
        pa("prod", "default", "{mtls: {mode: UNSET}}"),
        pa("prod", "payment", "{selector: {matchLabels: {app: payment}}, mtls: {}, portLevelMtls: {8080: {mode: UNSET}, 9090: {mode: STRICT}}}"),
        pa("staging", "default", "{mtls: {mode: STRICT}}"),
        pa("staging", "payment", "{selector: {matchLabels: {app: payment}}, mtls: {mode: PERMISSIVE}, portLevelMtls: {8080: {}}}"),
    ]
    .concat();
    let p = policies(&yaml);
    let payment = labels(&[("app", "payment")]);
    // Namespace UNSET → mesh; workload UNSET → namespace → mesh; port UNSET → workload result.
    assert_eq!(p.peer_mode("prod", &labels(&[("app", "x")]), 8080), MtlsMode::Disable);
    assert_eq!(p.peer_mode("prod", &payment, 7000), MtlsMode::Disable);
    assert_eq!(p.peer_mode("prod", &payment, 8080), MtlsMode::Disable);
    assert_eq!(p.peer_mode("prod", &payment, 9090), MtlsMode::Strict);
    // Port UNSET takes the workload's own mode, not the namespace's.
    assert_eq!(p.peer_mode("staging", &payment, 8080), MtlsMode::Permissive);
    // No mesh policy at all: UNSET everywhere is PERMISSIVE.
    let p = policies(&pa("prod", "default", "{mtls: {mode: UNSET}}"));
    assert_eq!(p.peer_mode("prod", &payment, 8080), MtlsMode::Permissive);
}

#[test]
fn scopes_that_do_not_apply() {
    let yaml = [
        // A selector policy in the root namespace is ignored (Istio), even for its own workloads.
        pa("istio-system", "sel", "{selector: {matchLabels: {app: payment}}, mtls: {mode: DISABLE}}"),
        // Another namespace's policies.
        pa("other", "default", "{mtls: {mode: STRICT}}"),
        pa("other", "payment", "{selector: {matchLabels: {app: payment}}, mtls: {mode: STRICT}}"),
    ]
    .concat();
    let p = policies(&yaml);
    let payment = labels(&[("app", "payment")]);
    assert_eq!(p.peer_mode("prod", &payment, 8080), MtlsMode::Permissive);
    assert_eq!(p.peer_mode("istio-system", &payment, 8080), MtlsMode::Permissive);
}

#[test]
fn oldest_policy_of_a_scope_wins() {
    let with_time = |name: &str, time: &str, mode: &str| {
        format!(
            "---\napiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {{name: {name}, namespace: prod, creationTimestamp: '{time}'}}\nspec: {{mtls: {{mode: {mode}}}}}\n"
        )
    };
    let yaml =
        [with_time("a-new", "2024-05-01T00:00:00Z", "DISABLE"), with_time("z-old", "2023-01-01T00:00:00Z", "STRICT")]
            .concat();
    assert_eq!(policies(&yaml).peer_mode("prod", &[], 80), MtlsMode::Strict);
    // Without timestamps (all equally old), by name.
    let yaml = [pa("prod", "b", "{mtls: {mode: DISABLE}}"), pa("prod", "a", "{mtls: {mode: STRICT}}")].concat();
    assert_eq!(policies(&yaml).peer_mode("prod", &[], 80), MtlsMode::Strict);
    let sel = |name: &str, mode: &str| {
        pa("prod", name, &format!("{{selector: {{matchLabels: {{app: payment}}}}, mtls: {{mode: {mode}}}}}"))
    };
    let yaml = [sel("y", "DISABLE"), sel("x", "STRICT")].concat();
    assert_eq!(policies(&yaml).peer_mode("prod", &labels(&[("app", "payment")]), 80), MtlsMode::Strict);
}

// ---------- AuthorizationPolicy: scopes and order ----------

#[test]
fn no_policy_allows_everything() {
    let p = policies(&pa("prod", "default", "{mtls: {mode: STRICT}}"));
    assert!(allowed(&p, &Req::new().from(None)));
    assert!(!p.has_authorization("prod", &[]));
}

#[test]
fn empty_spec_allows_nothing_and_rules_with_an_empty_rule_allow_everything() {
    let p = policies(&ap("prod", "allow-nothing", "  {}"));
    assert!(p.has_authorization("prod", &[]));
    assert_eq!(
        p.authorize("prod", &[], &Req::new().attrs()),
        Decision::Deny { policy: "none".into() },
        "ALLOW policy without rules: nothing matches"
    );
    assert!(allowed(&policies(&ap("other", "allow-nothing", "  {}")), &Req::new()), "other namespace");
    let p = policies(&[ap("prod", "allow-nothing", "  {}"), ap("prod", "allow-all", "  rules: [{}]")].concat());
    assert!(allowed(&p, &Req::new().from(None).to("DELETE", "/x")));
}

#[test]
fn deny_wins_over_allow() {
    let p = policies(
        &[
            ap("prod", "allow-all", "  rules: [{}]"),
            ap("prod", "deny-delete", "  action: DENY\n  rules: [{to: [{operation: {methods: [DELETE]}}]}]"),
        ]
        .concat(),
    );
    assert!(allowed(&p, &Req::new().to("GET", "/")));
    assert_eq!(
        p.authorize("prod", &[], &Req::new().to("DELETE", "/").attrs()),
        Decision::Deny { policy: "ns[prod]-policy[deny-delete]-rule[0]".into() }
    );
    // DENY alone: what it does not match is allowed (no ALLOW policy applies).
    let p = policies(&ap("prod", "deny-delete", "  action: DENY\n  rules: [{to: [{operation: {methods: [DELETE]}}]}]"));
    assert!(allowed(&p, &Req::new()) && !allowed(&p, &Req::new().to("DELETE", "/")));
}

#[test]
fn root_namespace_and_selectors() {
    let p = policies(
        &[
            ap("istio-system", "mesh-deny", "  action: DENY\n  rules: [{to: [{operation: {paths: ['/admin*']}}]}]"),
            ap("istio-system", "v2-only", "  selector: {matchLabels: {version: v2}}\n  rules: [{}]"),
            ap(
                "prod",
                "payment",
                "  selector: {matchLabels: {app: payment}}\n  rules: [{to: [{operation: {methods: [GET]}}]}]",
            ),
        ]
        .concat(),
    );
    let v1 = labels(&[("app", "payment"), ("version", "v1")]);
    let v2 = labels(&[("app", "payment"), ("version", "v2")]);
    let other = labels(&[("app", "other")]);
    let post = Req::new().to("POST", "/pay");
    // Mesh-wide DENY applies in every namespace.
    assert!(!p.authorize("anywhere", &other, &Req::new().to("GET", "/admin/x").attrs()).is_allowed());
    // No ALLOW policy selects `other` in `anywhere`.
    assert!(p.authorize("anywhere", &other, &post.attrs()).is_allowed());
    // Root-namespace ALLOW with a selector applies to matching workloads of every namespace.
    assert!(p.authorize("anywhere", &v2, &post.attrs()).is_allowed());
    assert!(p.authorize("prod", &v2, &post.attrs()).is_allowed(), "allowed by v2-only");
    assert!(!p.authorize("prod", &v1, &post.attrs()).is_allowed(), "only GET for v1");
    assert!(p.authorize("prod", &v1, &Req::new().attrs()).is_allowed());
}

#[test]
fn dry_run_policies_are_not_enforced() {
    let spec = "  action: DENY\n  rules: [{}]";
    let yaml = format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata:\n  name: deny-all\n  namespace: prod\n  annotations: {{istio.io/dry-run: 'true'}}\nspec:\n{spec}\n"
    );
    let p = policies(&yaml);
    assert!(p.authz[0].dry_run);
    assert!(allowed(&p, &Req::new()));
    assert!(!p.has_authorization("prod", &[]));
}

// ---------- AuthorizationPolicy: matching ----------

#[test]
fn principals_and_their_patterns() {
    let p = policies(&ap(
        "prod",
        "p",
        "  rules: [{from: [{source: {principals: [cluster.local/ns/prod/sa/frontend, 'cluster.local/ns/ops/*', '*/sa/batch']}}]}]",
    ));
    assert!(allowed(&p, &Req::new()));
    assert!(allowed(&p, &Req::new().from(Some("cluster.local/ns/ops/sa/anything"))));
    assert!(allowed(&p, &Req::new().from(Some("other.domain/ns/x/sa/batch"))));
    assert!(!allowed(&p, &Req::new().from(Some("cluster.local/ns/prod/sa/frontend2"))));
    assert!(!allowed(&p, &Req::new().from(None)), "plaintext has no principal");
    // `*`: any authenticated peer.
    let p = policies(&ap("prod", "p", "  rules: [{from: [{source: {principals: ['*']}}]}]"));
    assert!(allowed(&p, &Req::new()) && !allowed(&p, &Req::new().from(None)));
}

#[test]
fn deny_plaintext_with_not_principals() {
    // Istio's documented way to refuse requests without mTLS identity.
    let p =
        policies(&ap("prod", "require-mtls", "  action: DENY\n  rules: [{from: [{source: {notPrincipals: ['*']}}]}]"));
    assert!(allowed(&p, &Req::new()));
    assert!(!allowed(&p, &Req::new().from(None)));
    // A DENY on given principals does not catch plaintext (no identity to match):
    // Istio recommends STRICT mTLS with such policies for that reason.
    let p = policies(&ap(
        "prod",
        "deny-batch",
        "  action: DENY\n  rules: [{from: [{source: {principals: [cluster.local/ns/prod/sa/batch]}}]}]",
    ));
    assert!(!allowed(&p, &Req::new().from(Some("cluster.local/ns/prod/sa/batch"))));
    assert!(allowed(&p, &Req::new().from(None)));
}

#[test]
fn namespaces_and_not_namespaces() {
    let p = policies(&ap(
        "prod",
        "p",
        "  rules: [{from: [{source: {namespaces: ['prod', 'team-*'], notNamespaces: ['team-x']}}]}]",
    ));
    assert!(allowed(&p, &Req::new()));
    assert!(allowed(&p, &Req::new().from(Some("cluster.local/ns/team-a/sa/s"))));
    assert!(!allowed(&p, &Req::new().from(Some("cluster.local/ns/team-x/sa/s"))));
    assert!(!allowed(&p, &Req::new().from(Some("cluster.local/ns/dev/sa/s"))));
    assert!(!allowed(&p, &Req::new().from(None)));
    // notNamespaces alone matches plaintext (no namespace is none of them).
    let p = policies(&ap("prod", "p", "  rules: [{from: [{source: {notNamespaces: [dev]}}]}]"));
    assert!(allowed(&p, &Req::new().from(None)));
    assert!(!allowed(&p, &Req::new().from(Some("cluster.local/ns/dev/sa/s"))));
}

#[test]
fn ip_blocks_and_not_ip_blocks() {
    let p = policies(&ap(
        "prod",
        "p",
        "  rules: [{from: [{source: {ipBlocks: [10.0.0.0/8, 192.168.1.1], notIpBlocks: [10.9.0.0/16]}}]}]",
    ));
    assert!(allowed(&p, &Req::new()));
    assert!(allowed(&p, &Req::new().ip("192.168.1.1")) && !allowed(&p, &Req::new().ip("192.168.1.2")));
    assert!(!allowed(&p, &Req::new().ip("10.9.1.1")));
    assert!(allowed(&p, &Req::new().ip("::ffff:10.1.1.1")));
}

#[test]
fn methods_paths_ports_hosts_and_not_forms() {
    let p = policies(&ap(
        "prod",
        "p",
        "  rules:\n  - to:\n    - operation:\n        methods: [GET, 'P*']\n        notMethods: [PATCH]\n        paths: ['/v1/pay*', '*/health', /exact]\n        notPaths: ['/v1/pay/internal*']\n        ports: ['8080', '9090']\n        notPorts: ['9090']\n        hosts: ['payment*', '*.example.com']\n        notHosts: [admin.example.com]",
    ));
    let ok = Req::new().to("GET", "/v1/pay/123");
    assert!(allowed(&p, &ok));
    assert!(allowed(&p, &ok.clone().to("POST", "/x/health")) && allowed(&p, &ok.clone().to("PUT", "/exact")));
    assert!(!allowed(&p, &ok.clone().to("PATCH", "/exact")), "notMethods");
    assert!(!allowed(&p, &ok.clone().to("DELETE", "/exact")), "methods");
    assert!(!allowed(&p, &ok.clone().to("GET", "/exact/")), "exact path");
    assert!(!allowed(&p, &ok.clone().to("GET", "/v1/pay/internal/x")), "notPaths");
    assert!(!allowed(&p, &ok.clone().port(9090)) && !allowed(&p, &ok.clone().port(80)), "ports");
    assert!(allowed(&p, &ok.clone().host("API.Example.com")), "hosts are case-insensitive");
    assert!(allowed(&p, &ok.clone().host("PAYMENT:8080")));
    assert!(!allowed(&p, &ok.clone().host("admin.example.com")) && !allowed(&p, &ok.clone().host("shop")));
}

#[test]
fn from_and_to_entries_are_alternatives_fields_are_all_required() {
    let p = policies(&ap(
        "prod",
        "p",
        "  rules:\n  - from: [{source: {principals: [cluster.local/ns/prod/sa/a]}}, {source: {namespaces: [ops], ipBlocks: [10.0.0.0/8]}}]\n    to: [{operation: {methods: [GET]}}, {operation: {paths: ['/public*']}}]",
    ));
    let a = Req::new().from(Some("cluster.local/ns/prod/sa/a"));
    let ops = Req::new().from(Some("cluster.local/ns/ops/sa/x"));
    assert!(allowed(&p, &a) && allowed(&p, &ops));
    assert!(!allowed(&p, &ops.clone().ip("172.16.0.1")), "namespaces AND ipBlocks");
    assert!(allowed(&p, &a.clone().to("POST", "/public/x")), "second operation");
    assert!(!allowed(&p, &a.clone().to("POST", "/private")), "no operation");
    assert!(!allowed(&p, &Req::new()), "no source");
}

#[test]
fn when_conditions() {
    let p = policies(&ap(
        "prod",
        "p",
        "  rules:\n  - when:\n    - {key: 'request.headers[X-Tenant]', values: ['acme', 'beta-*'], notValues: ['beta-blocked']}\n    - {key: 'request.headers[x-debug]', notValues: ['*']}\n    - {key: source.ip, values: [10.0.0.0/8]}\n    - {key: destination.port, notValues: ['9090']}\n    - {key: source.namespace, values: [prod]}\n    - {key: source.principal, values: ['*/sa/frontend']}",
    ));
    let ok = Req::new().header("x-tenant", "acme");
    assert!(allowed(&p, &ok));
    assert!(allowed(&p, &Req::new().header("x-tenant", "beta-1")));
    assert!(!allowed(&p, &Req::new().header("x-tenant", "beta-blocked")), "notValues");
    assert!(!allowed(&p, &Req::new()), "header missing: values do not match");
    assert!(!allowed(&p, &ok.clone().header("x-debug", "")), "notValues ['*']: header must be absent");
    assert!(!allowed(&p, &ok.clone().ip("11.0.0.1")));
    assert!(!allowed(&p, &ok.clone().port(9090)));
    assert!(!allowed(&p, &ok.clone().from(Some("cluster.local/ns/dev/sa/frontend"))));
    assert!(!allowed(&p, &ok.clone().from(Some("cluster.local/ns/prod/sa/backend"))));
    assert!(!allowed(&p, &ok.clone().from(None)));
    // Several values of one header are joined with `,` (Envoy).
    let p = policies(&ap("prod", "p", "  rules: [{when: [{key: 'request.headers[x-v]', values: ['a,b']}]}]"));
    assert!(allowed(&p, &Req::new().header("x-v", "a").header("x-v", "b")));
    assert!(!allowed(&p, &Req::new().header("x-v", "a")));
}

#[test]
fn tcp_connections_and_http_only_fields() {
    let conn = |port: u16, principal: Option<&'static str>| ConnAttrs {
        source_principal: principal,
        source_namespace: principal.and_then(principal_namespace),
        source_ip: "10.0.0.7".parse().expect("ip"),
        port,
    };
    let frontend = Some("cluster.local/ns/prod/sa/frontend");
    // ALLOW: a rule with an HTTP-only field never matches a TCP connection.
    let p = policies(&ap(
        "prod",
        "p",
        "  rules:\n  - {to: [{operation: {ports: ['5432'], methods: [GET]}}]}\n  - {from: [{source: {principals: ['*']}}], to: [{operation: {ports: ['6379']}}]}",
    ));
    assert!(!p.authorize_tcp("prod", &[], &conn(5432, frontend)).is_allowed());
    assert!(p.authorize_tcp("prod", &[], &conn(6379, frontend)).is_allowed());
    assert!(!p.authorize_tcp("prod", &[], &conn(6379, None)).is_allowed());
    // DENY: HTTP-only fields are dropped, so the rule denies more.
    let p = policies(&ap(
        "prod",
        "p",
        "  action: DENY\n  rules: [{to: [{operation: {ports: ['5432'], paths: ['/admin']}}], when: [{key: 'request.headers[x]', values: [y]}]}]",
    ));
    assert!(!p.authorize_tcp("prod", &[], &conn(5432, frontend)).is_allowed());
    assert!(p.authorize_tcp("prod", &[], &conn(6379, frontend)).is_allowed());
    // Over HTTP the same rule needs every field.
    assert!(allowed(&p, &Req::new().port(5432).to("GET", "/admin")));
    assert!(!allowed(&p, &Req::new().port(5432).to("GET", "/admin").header("x", "y")));
}

#[test]
fn principal_namespace_parsing() {
    assert_eq!(principal_namespace("cluster.local/ns/prod/sa/frontend"), Some("prod"));
    assert_eq!(principal_namespace("spiffe://cluster.local/ns/a/sa/b"), Some("a"));
    assert_eq!(principal_namespace("cluster.local/sa/b"), None);
    assert_eq!(principal_namespace("cluster.local/ns//sa/b"), None);
    assert_eq!(principal_namespace("ns"), None);
}
