//! PeerAuthentication and AuthorizationPolicy as configuration: real Istio files
//! load and compile into `Snapshot::security` with Istio's meaning; what serin
//! does not support is an error naming the field.
//!
//! The examples are copied from Istio's documentation and repositories (source
//! above each); `every_security_file_of_the_corpus` also reads the shared Istio
//! corpus when it is there.

use std::net::IpAddr;
use std::path::PathBuf;

use http::{HeaderMap, HeaderValue};
use serin::config::{self, model::Resource};
use serin::security::{Decision, MtlsMode, ROOT_NAMESPACE, RequestAttrs, SecurityPolicies, principal_namespace};
use serin::snapshot::{EndpointRegistry, Snapshot};

fn compile(yaml: &str) -> Snapshot {
    let set = config::load_str(yaml, "test.yaml").unwrap_or_else(|e| panic!("loads:\n{e}"));
    config::compile(&set, &EndpointRegistry::default(), "test").unwrap_or_else(|e| panic!("compiles:\n{e}"))
}

fn errors(yaml: &str) -> String {
    match config::load_str(yaml, "test.yaml") {
        Ok(_) => panic!("expected errors for:\n{yaml}"),
        Err(e) => e.to_string(),
    }
}

fn labels(pairs: &[(&str, &str)]) -> Vec<(String, String)> {
    pairs.iter().map(|(k, v)| (k.to_string(), v.to_string())).collect()
}

/// Authorizes a request with `method` and `path`, from `principal` (None =
/// plaintext), with `headers`, to port 8080 of a workload.
fn authorize(
    p: &SecurityPolicies,
    ns: &str,
    workload: &[(String, String)],
    principal: Option<&str>,
    method: &str,
    path: &str,
    headers: &[(&'static str, &'static str)],
) -> Decision {
    let mut map = HeaderMap::new();
    for (k, v) in headers {
        map.append(*k, HeaderValue::from_static(v));
    }
    let ip: IpAddr = "10.1.2.3".parse().expect("ip");
    let request = RequestAttrs {
        source_principal: principal,
        source_namespace: principal.and_then(principal_namespace),
        source_ip: ip,
        method,
        path,
        host: "svc.example",
        port: 8080,
        headers: &map,
    };
    p.authorize(ns, workload, &request)
}

/// `shared/notes/istio-semantics.md` §3: namespace-wide STRICT and an ALLOW
/// policy for the payment service.
const NOTES_EXAMPLE: &str = r#"
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata: {name: default, namespace: prod}
spec: {mtls: {mode: STRICT}}
---
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata: {name: payment-allow, namespace: prod}
spec:
  selector: {matchLabels: {app: payment}}
  action: ALLOW
  rules:
  - from: [{source: {principals: ["cluster.local/ns/prod/sa/frontend", "cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account"]}}]
    to: [{operation: {methods: ["POST", "GET"], paths: ["/v1/pay*", "/healthz"]}}]
"#;

#[test]
fn notes_example() {
    let s = compile(NOTES_EXAMPLE);
    let payment = labels(&[("app", "payment"), ("version", "v2")]);
    assert_eq!(s.security.root_namespace, ROOT_NAMESPACE);
    assert_eq!(s.security.peer_mode("prod", &payment, 8080), MtlsMode::Strict);
    assert_eq!(s.security.peer_mode("dev", &payment, 8080), MtlsMode::Permissive);
    let frontend = Some("cluster.local/ns/prod/sa/frontend");
    let gateway = Some("cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account");
    let ok = |d: Decision| d.is_allowed();
    assert!(ok(authorize(&s.security, "prod", &payment, frontend, "POST", "/v1/pay/42", &[])));
    assert!(ok(authorize(&s.security, "prod", &payment, gateway, "GET", "/healthz", &[])));
    assert!(!ok(authorize(&s.security, "prod", &payment, frontend, "DELETE", "/v1/pay/42", &[])));
    assert!(!ok(authorize(&s.security, "prod", &payment, frontend, "GET", "/admin", &[])));
    assert!(!ok(authorize(
        &s.security,
        "prod",
        &payment,
        Some("cluster.local/ns/prod/sa/other"),
        "GET",
        "/healthz",
        &[]
    )));
    assert_eq!(
        authorize(&s.security, "prod", &payment, None, "GET", "/healthz", &[]),
        Decision::Deny { policy: "none".into() }
    );
    // Other workloads of the namespace have no ALLOW policy.
    assert!(ok(authorize(&s.security, "prod", &labels(&[("app", "cart")]), None, "GET", "/", &[])));
}

/// kubeflow/manifests `applications/pipeline/upstream/base/installs/multi-user/
/// istio-authorization-config.yaml` (AuthorizationPolicies; v1beta1).
const KUBEFLOW: &str = r#"
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: ml-pipeline-ui
  namespace: kubeflow
spec:
  selector:
    matchLabels:
      app: ml-pipeline-ui
  rules:
  # Allow all requests from the ingress gateway
  - from:
    - source:
        principals:
        - cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account

  # Allow all requests with an `authorization` header but NOT a `kubeflow-userid` header.
  - when:
    - key: request.headers[authorization]
      values:
      - "*"
    - key: request.headers[kubeflow-userid]
      notValues:
      - "*"
---
apiVersion: security.istio.io/v1beta1
kind: AuthorizationPolicy
metadata:
  name: service-cache-server
  namespace: kubeflow
spec:
  selector:
    matchLabels:
      app: cache-server
  rules:
  - {}
"#;

#[test]
fn kubeflow_pipeline_policies() {
    let s = compile(KUBEFLOW);
    let ui = labels(&[("app", "ml-pipeline-ui")]);
    let p = &s.security;
    let gateway = Some("cluster.local/ns/istio-system/sa/istio-ingressgateway-service-account");
    assert!(authorize(p, "kubeflow", &ui, gateway, "GET", "/", &[]).is_allowed());
    assert!(authorize(p, "kubeflow", &ui, None, "GET", "/", &[("authorization", "Bearer x")]).is_allowed());
    assert!(
        !authorize(p, "kubeflow", &ui, None, "GET", "/", &[("authorization", "Bearer x"), ("kubeflow-userid", "u")])
            .is_allowed()
    );
    assert!(!authorize(p, "kubeflow", &ui, Some("cluster.local/ns/kubeflow/sa/x"), "GET", "/", &[]).is_allowed());
    // `rules: [{}]`: allow all.
    assert!(authorize(p, "kubeflow", &labels(&[("app", "cache-server")]), None, "PUT", "/x", &[]).is_allowed());
}

/// istio/istio.io `docs/tasks/security/authorization/authz-http` (allow-nothing)
/// and `docs/concepts/security` (port-level mTLS), istio/istio
/// `pilot/pkg/serviceregistry/ambient/testdata/peer-authn-strict-and-permissive-port-mtls-in.yaml`,
/// fluxcd/flagger `docs/gitbook/faq` (v1beta1).
const ISTIO_DOCS: &str = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: allow-nothing
  namespace: default
spec:
  {}
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: "example-workload-policy"
  namespace: "foo"
spec:
  selector:
     matchLabels:
       app: example-app
  portLevelMtls:
    80:
      mode: DISABLE
---
apiVersion: security.istio.io/v1
kind: PeerAuthentication
metadata:
  name: strict-and-permissive-mtls
spec:
  selector:
    matchLabels:
      app: a
  mtls:
    mode: STRICT
  portLevelMtls:
    9090:
      mode: PERMISSIVE
---
apiVersion: security.istio.io/v1beta1
kind: PeerAuthentication
metadata:
  name: flagger-loadtester
  namespace: test
spec:
  selector:
    matchLabels:
      app: flagger-loadtester
  mtls:
    mode: DISABLE
"#;

#[test]
fn istio_docs_examples() {
    let s = compile(ISTIO_DOCS);
    let p = &s.security;
    assert_eq!(p.authz.len(), 1);
    assert_eq!(p.peer.len(), 3);
    // allow-nothing: every workload of `default` is closed, others are not.
    assert!(!authorize(p, "default", &labels(&[("app", "x")]), None, "GET", "/", &[]).is_allowed());
    assert!(authorize(p, "foo", &labels(&[("app", "x")]), None, "GET", "/", &[]).is_allowed());
    let example = labels(&[("app", "example-app")]);
    assert_eq!(p.peer_mode("foo", &example, 80), MtlsMode::Disable);
    assert_eq!(p.peer_mode("foo", &example, 8080), MtlsMode::Permissive);
    let a = labels(&[("app", "a")]);
    assert_eq!(p.peer_mode("default", &a, 8080), MtlsMode::Strict);
    assert_eq!(p.peer_mode("default", &a, 9090), MtlsMode::Permissive);
    assert_eq!(p.peer_mode("test", &labels(&[("app", "flagger-loadtester")]), 8080), MtlsMode::Disable);
}

/// Istio's API reference (security/v1beta1/authorization.proto) writes deny-all
/// as `spec:` with nothing under it; no `spec` at all is the same.
#[test]
fn null_or_missing_spec_is_the_empty_spec() {
    let null = "apiVersion: security.istio.io/v1beta1\nkind: AuthorizationPolicy\nmetadata:\n name: deny-all\n namespace: foo\nspec:\n";
    let missing =
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {name: deny-all, namespace: foo}\n";
    for yaml in [null, missing] {
        let s = compile(yaml);
        assert_eq!(s.security.authz[0].rules.len(), 0);
        assert!(!authorize(&s.security, "foo", &[], None, "GET", "/", &[]).is_allowed());
    }
    let s = compile(
        "apiVersion: security.istio.io/v1\nkind: PeerAuthentication\nmetadata: {name: default, namespace: istio-system}\nspec:\n",
    );
    assert_eq!(s.security.peer_mode("prod", &[], 80), MtlsMode::Permissive);
}

/// istio/istio.io `docs/tasks/security/authorization/authz-dry-run`: loads with a
/// warning, and is not enforced.
#[test]
fn dry_run_policy_loads_with_a_warning() {
    let yaml = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: deny-path-headers
  annotations:
    "istio.io/dry-run": "true"
spec:
  selector:
    matchLabels:
      app: httpbin
  action: DENY
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"#;
    let set = config::load_str(yaml, "dry.yaml").expect("loads");
    assert!(
        set.warnings.iter().any(|w| w.contains("dry-run") && w.contains("deny-path-headers")),
        "{:?}",
        set.warnings
    );
    let s = compile(yaml);
    let httpbin = labels(&[("app", "httpbin")]);
    assert!(authorize(&s.security, "default", &httpbin, None, "GET", "/headers", &[]).is_allowed());
    let e = errors(&yaml.replace("\"true\"", "\"maybe\""));
    assert!(e.contains("metadata.annotations.istio.io/dry-run: invalid value \"maybe\""), "{e}");
}

#[test]
fn policies_compile_next_to_routes_and_kinds_are_no_longer_not_applied() {
    let yaml = format!(
        "{NOTES_EXAMPLE}---\napiVersion: networking.istio.io/v1\nkind: ServiceEntry\nmetadata: {{name: payment, namespace: prod}}\nspec:\n  hosts: [payment]\n  resolution: STATIC\n  ports: [{{number: 8080, name: http}}]\n  endpoints: [{{address: 127.0.0.1}}]\n"
    );
    let set = config::load_str(&yaml, "all.yaml").expect("loads");
    assert!(set.warnings.is_empty(), "{:?}", set.warnings);
    assert!(set.resources.iter().any(|r| matches!(r.resource, Resource::PeerAuthentication(_))));
    assert!(set.resources.iter().any(|r| matches!(r.resource, Resource::AuthorizationPolicy(_))));
    assert_eq!(set.summary(), "1 PeerAuthentication, 1 AuthorizationPolicy, 1 ServiceEntry");
    let s = config::compile(&set, &EndpointRegistry::default(), "test").expect("compiles");
    assert!(s.find_virtual_host("payment").is_some());
    assert_eq!((s.security.peer.len(), s.security.authz.len()), (1, 1));
    // The empty snapshot has no policy.
    let empty = Snapshot::empty("test");
    assert!(empty.security.is_empty());
    assert_eq!(empty.security.peer_mode("prod", &[], 80), MtlsMode::Permissive);
}

// ---------- errors ----------

fn ap(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1\nkind: AuthorizationPolicy\nmetadata: {{name: p, namespace: prod}}\nspec:\n{spec}\n"
    )
}

fn pa(spec: &str) -> String {
    format!(
        "apiVersion: security.istio.io/v1beta1\nkind: PeerAuthentication\nmetadata: {{name: p, namespace: prod}}\nspec:\n{spec}\n"
    )
}

#[test]
fn unknown_fields_are_named_with_their_path() {
    let e = errors(&ap("  rules:\n  - from:\n    - source:\n        principal: [a]\n"));
    assert!(
        e.contains("AuthorizationPolicy prod/p: spec.rules[0].from[0].source.principal: unknown field `principal`"),
        "{e}"
    );
    let e = errors(&ap("  rules: [{to: [{operation: {method: [GET]}}]}]\n"));
    assert!(e.contains("spec.rules[0].to[0].operation.method: unknown field `method`"), "{e}");
    let e = errors(&ap("  rules: [{when: [{key: source.ip, value: [1.2.3.4]}]}]\n"));
    assert!(e.contains("spec.rules[0].when[0].value: unknown field `value`"), "{e}");
    let e = errors(&pa("  mtls: {mode: STRICT, strict: true}\n"));
    assert!(e.contains("PeerAuthentication prod/p: spec.mtls.strict: unknown field `strict`"), "{e}");
    let e = errors(&pa("  selector: {labels: {app: a}}\n"));
    assert!(e.contains("spec.selector.labels: unknown field `labels`"), "{e}");
    let e = errors(&pa("  mtls: {mode: STRICTER}\n"));
    assert!(e.contains("spec.mtls.mode") && e.contains("STRICTER"), "{e}");
}

#[test]
fn custom_and_audit_actions_are_rejected_naming_the_field() {
    // istio/istio.io `docs/tasks/security/authorization/authz-custom`.
    let custom = r#"
apiVersion: security.istio.io/v1
kind: AuthorizationPolicy
metadata:
  name: ext-authz
spec:
  selector:
    matchLabels:
      app: httpbin
  action: CUSTOM
  provider:
    # The provider name must match the extension provider defined in the mesh config.
    name: sample-ext-authz-grpc
  rules:
  - to:
    - operation:
        paths: ["/headers"]
"#;
    let e = errors(custom);
    assert!(
        e.contains("AuthorizationPolicy default/ext-authz: spec.action: action CUSTOM is not supported by serin"),
        "{e}"
    );
    assert_eq!(e.lines().count(), 1, "{e}");
    let e = errors(&ap("  action: AUDIT\n  rules: [{}]\n"));
    assert!(e.contains("spec.action: action AUDIT is not supported by serin"), "{e}");
    let e = errors(&ap("  action: LOG\n"));
    assert!(e.contains("spec.action") && e.contains("LOG"), "{e}");
}

#[test]
fn unsupported_fields_and_keys_are_named() {
    // istio/istio.io `docs/tasks/security/authorization/authz-jwt`.
    let e = errors(&ap(
        "  selector: {matchLabels: {app: httpbin}}\n  rules:\n  - from:\n    - source:\n       requestPrincipals: [\"testing@secure.istio.io/testing@secure.istio.io\"]\n    when:\n    - key: request.auth.claims[groups]\n      values: [\"group1\"]\n",
    ));
    assert!(e.contains("spec.rules[0].from[0].source.requestPrincipals: field is not supported by serin"), "{e}");
    assert!(
        e.contains("spec.rules[0].when[0].key: key \"request.auth.claims[groups]\" is not supported by serin"),
        "{e}"
    );
    let e = errors(&ap(
        "  targetRefs: [{kind: Gateway, group: gateway.networking.k8s.io, name: default}]\n  rules: [{}]\n",
    ));
    assert!(e.contains("spec.targetRefs: field is not supported by serin"), "{e}");
    let e = errors(&ap("  rules: [{from: [{source: {remoteIpBlocks: [1.2.3.4]}}]}]\n"));
    assert!(e.contains("spec.rules[0].from[0].source.remoteIpBlocks: field is not supported by serin"), "{e}");
    let e = errors(&ap("  rules: [{to: [{operation: {paths: ['/{*}/x']}}]}]\n"));
    assert!(e.contains("spec.rules[0].to[0].operation.paths") && e.contains("path templates"), "{e}");
}

#[test]
fn istio_validation_rules() {
    let e = errors(&pa("  portLevelMtls: {8080: {mode: DISABLE}}\n"));
    assert!(e.contains("spec.portLevelMtls: portLevelMtls requires a workload selector"), "{e}");
    let e = errors(&ap("  action: DENY\n"));
    assert!(e.contains("spec.rules: a DENY policy without rules"), "{e}");
    let e = errors(&ap("  rules: [{from: []}]\n"));
    assert!(e.contains("spec.rules[0].from: `from` must not be empty"), "{e}");
    let e = errors(&ap("  rules: [{when: [{key: destination.port, values: [http]}]}]\n"));
    assert!(e.contains("spec.rules[0].when[0].values: bad port \"http\""), "{e}");
    let e = errors(&ap("  rules: [{from: [{source: {ipBlocks: [10.0.0.0/40]}}]}]\n"));
    assert!(e.contains("spec.rules[0].from[0].source.ipBlocks: bad CIDR block"), "{e}");
    let e = errors(&ap("  selector: {matchLabels: {app: '*'}}\n"));
    assert!(e.contains("spec.selector.matchLabels.app: wildcard is not supported"), "{e}");
    let e =
        errors("apiVersion: security.istio.io/v1alpha1\nkind: AuthorizationPolicy\nmetadata: {name: p}\nspec: {}\n");
    assert!(e.contains("apiVersion: unsupported apiVersion \"security.istio.io/v1alpha1\""), "{e}");
}

// ---------- the shared corpus ----------

fn corpus_dir() -> PathBuf {
    match std::env::var_os("SERIN_ISTIO_CORPUS") {
        Some(p) => PathBuf::from(p),
        None => PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../../shared/istio-corpus"),
    }
}

/// Fields and keys a corpus file may be refused for (what serin does not do).
const KNOWN_UNSUPPORTED: [&str; 13] = [
    "spec.action: action CUSTOM",
    "spec.targetRefs",
    "requestPrincipals",
    "notRequestPrincipals",
    "remoteIpBlocks",
    "serviceAccount",
    "trustDomain",
    "request.auth.",
    "path templates",
    "remote.ip",
    "destination.ip",
    "connection.sni",
    "experimental.envoy.filters.",
];

/// Every corpus file with a PeerAuthentication or an AuthorizationPolicy either
/// loads and compiles, or fails only for features serin does not support.
#[test]
fn every_security_file_of_the_corpus() {
    let Ok(entries) = std::fs::read_dir(corpus_dir()) else {
        println!("note: {} not found; skipped", corpus_dir().display());
        return;
    };
    let mut files: Vec<PathBuf> = entries.filter_map(Result::ok).map(|e| e.path()).collect();
    files.sort();
    let (mut loaded, mut refused) = (0, 0);
    for file in files.iter().filter(|f| f.extension().is_some_and(|x| x == "yaml" || x == "yml")) {
        let text = std::fs::read_to_string(file).expect("read");
        if !text.contains("kind: PeerAuthentication") && !text.contains("kind: AuthorizationPolicy") {
            continue;
        }
        match config::load_path(file) {
            Ok(set) => {
                loaded += 1;
                let policies = set
                    .resources
                    .iter()
                    .filter(|r| {
                        matches!(r.resource, Resource::PeerAuthentication(_) | Resource::AuthorizationPolicy(_))
                    })
                    .count();
                assert!(policies > 0, "{}", file.display());
                if !set.resources.iter().any(|r| matches!(r.resource, Resource::VirtualService(_))) {
                    let s = config::compile(&set, &EndpointRegistry::default(), "corpus")
                        .unwrap_or_else(|e| panic!("{}:\n{e}", file.display()));
                    assert_eq!(s.security.peer.len() + s.security.authz.len(), policies);
                }
            }
            Err(errors) => {
                refused += 1;
                for e in errors.iter() {
                    let line = e.to_string();
                    assert!(
                        KNOWN_UNSUPPORTED.iter().any(|k| line.to_lowercase().contains(&k.to_lowercase())),
                        "{}: unexpected error: {line}",
                        file.display()
                    );
                }
            }
        }
    }
    println!("corpus files with PeerAuthentication/AuthorizationPolicy: {loaded} load, {refused} refused");
    assert!(loaded >= 8, "{loaded}");
}
