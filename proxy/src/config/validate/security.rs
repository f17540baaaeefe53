//! `PeerAuthentication` and `AuthorizationPolicy` checks, compiling each policy
//! into its runtime form ([`crate::security`]). The rules follow Istio's own
//! validation (istio `pkg/config/validation/validation.go`,
//! `pkg/config/security/security.go`); what serin does not implement is an
//! error naming the field or the `when` key.

use std::collections::BTreeMap;

use super::fields;
use crate::config::error::Sink;
use crate::config::model::{self, AuthorizationAction, ObjectMeta, PeerMtlsMode};
use crate::security::{Action, Attr, AuthzPolicy, Check, IpBlock, MtlsMode, Pattern, PeerPolicy, Rule, Values};

/// The annotation that makes an AuthorizationPolicy dry-run (not enforced).
pub const DRY_RUN_ANNOTATION: &str = "istio.io/dry-run";

/// The `when` keys serin evaluates, for messages.
const SUPPORTED_KEYS: &str = "request.headers[<name>], source.principal, source.namespace, source.ip, destination.port";

/// Istio attributes serin does not evaluate (error: not supported, rather than unknown).
const UNSUPPORTED_KEYS: [&str; 8] = [
    "remote.ip",
    "source.serviceAccount",
    "request.auth.principal",
    "request.auth.audiences",
    "request.auth.presenter",
    "destination.ip",
    "connection.sni",
    "source.trustDomain",
];

/// Checks a PeerAuthentication in `namespace`.
pub fn peer_authentication(
    pa: &model::PeerAuthentication,
    meta: &ObjectMeta,
    namespace: &str,
    name: &str,
    sink: &mut Sink<'_>,
) -> PeerPolicy {
    let selector = selector(pa.selector.as_ref(), sink);
    let mode = pa.mtls.as_ref().and_then(|m| m.mode).and_then(mtls_mode);
    let mut port_modes: Vec<(u16, Option<MtlsMode>)> = Vec::new();
    if let Some(ports) = &pa.port_level_mtls {
        // Istio: "portLevelMtls requires a workload selector"; "mesh/namespace peer
        // authentication cannot have port level mTLS".
        if selector.is_empty() {
            sink.push(
                "spec.portLevelMtls",
                "portLevelMtls requires a workload selector (spec.selector.matchLabels): \
                 a mesh-wide or namespace-wide policy cannot set port-level mTLS",
            );
        }
        if ports.is_empty() {
            sink.push("spec.portLevelMtls", "portLevelMtls, when present, must list at least one port");
        }
        for (key, mtls) in ports {
            let field = format!("spec.portLevelMtls.{key}");
            let Some(port) = key.parse::<u16>().ok().filter(|p| *p != 0) else {
                sink.push(&field, format!("port {key:?} must be a number from 1 to 65535"));
                continue;
            };
            if port_modes.iter().any(|(p, _)| *p == port) {
                sink.push(&field, format!("port {port} is listed twice"));
                continue;
            }
            port_modes.push((port, mtls.mode.and_then(mtls_mode)));
        }
    }
    PeerPolicy {
        namespace: namespace.to_string(),
        name: name.to_string(),
        created: creation_timestamp(meta),
        selector,
        mode,
        port_modes,
    }
}

/// `UNSET` → `None` (inherit).
fn mtls_mode(mode: PeerMtlsMode) -> Option<MtlsMode> {
    match mode {
        PeerMtlsMode::UNSET => None,
        PeerMtlsMode::DISABLE => Some(MtlsMode::Disable),
        PeerMtlsMode::PERMISSIVE => Some(MtlsMode::Permissive),
        PeerMtlsMode::STRICT => Some(MtlsMode::Strict),
    }
}

/// `metadata.creationTimestamp` when it is a string.
fn creation_timestamp(meta: &ObjectMeta) -> Option<String> {
    meta.creation_timestamp.as_ref().and_then(|t| t.as_str()).map(str::to_string)
}

/// `selector.matchLabels` (Istio: no empty key, no wildcard).
fn selector(selector: Option<&model::PolicySelector>, sink: &mut Sink<'_>) -> Vec<(String, String)> {
    let Some(selector) = selector else { return Vec::new() };
    for (k, v) in &selector.match_labels {
        let field = format!("spec.selector.matchLabels.{k}");
        if k.is_empty() {
            sink.push("spec.selector.matchLabels", "a label key must not be empty");
        } else if k.contains('*') || v.contains('*') {
            sink.push(&field, format!("wildcard is not supported in selector: \"{k}={v}\""));
        }
    }
    selector.match_labels.iter().map(|(k, v)| (k.clone(), v.clone())).collect()
}

/// Go's `strconv.ParseBool`, which Istio uses for the dry-run annotation.
fn parse_bool(value: &str) -> Option<bool> {
    match value {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Some(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Some(false),
        _ => None,
    }
}

/// Whether an AuthorizationPolicy's metadata marks it dry-run (a valid `true`).
pub fn is_dry_run(meta: &ObjectMeta) -> bool {
    meta.annotations.get(DRY_RUN_ANNOTATION).and_then(|v| parse_bool(v)) == Some(true)
}

/// The value of the dry-run annotation; an invalid value is an error.
fn dry_run(annotations: &BTreeMap<String, String>, sink: &mut Sink<'_>) -> bool {
    let Some(value) = annotations.get(DRY_RUN_ANNOTATION) else { return false };
    parse_bool(value).unwrap_or_else(|| {
        sink.push(
            &format!("metadata.annotations.{DRY_RUN_ANNOTATION}"),
            format!("invalid value {value:?} (expected \"true\" or \"false\")"),
        );
        false
    })
}

/// Checks an AuthorizationPolicy in `namespace`.
pub fn authorization_policy(
    ap: &model::AuthorizationPolicy,
    meta: &ObjectMeta,
    namespace: &str,
    name: &str,
    sink: &mut Sink<'_>,
) -> AuthzPolicy {
    let selector = selector(ap.selector.as_ref(), sink);
    let action = match ap.action.unwrap_or(AuthorizationAction::ALLOW) {
        AuthorizationAction::ALLOW => Action::Allow,
        AuthorizationAction::DENY => Action::Deny,
        AuthorizationAction::AUDIT => {
            sink.push("spec.action", "action AUDIT is not supported by serin (only ALLOW and DENY)");
            Action::Allow
        }
        AuthorizationAction::CUSTOM => {
            sink.push(
                "spec.action",
                "action CUSTOM is not supported by serin (external authorization through spec.provider; \
                 only ALLOW and DENY)",
            );
            Action::Allow
        }
    };
    if ap.provider.is_some() && ap.action != Some(AuthorizationAction::CUSTOM) {
        sink.push("spec.provider", "provider is only allowed with action CUSTOM");
    }
    let hint = "serin applies policies to workloads chosen by spec.selector";
    sink.unsupported(ap.target_ref.is_some(), "spec.targetRef", hint);
    sink.unsupported(ap.target_refs.is_some(), "spec.targetRefs", hint);
    let rules_in = ap.rules.as_deref().unwrap_or_default();
    if action == Action::Deny && rules_in.is_empty() {
        sink.push(
            "spec.rules",
            "a DENY policy without rules would never match (Istio rejects it); \
             add an empty rule `{}` to deny every request",
        );
    }
    let mut rules = Vec::with_capacity(rules_in.len());
    for (i, r) in rules_in.iter().enumerate() {
        let id = format!("ns[{namespace}]-policy[{name}]-rule[{i}]");
        rules.push(rule(r, id, &format!("spec.rules[{i}]"), sink));
    }
    AuthzPolicy {
        namespace: namespace.to_string(),
        name: name.to_string(),
        selector,
        action,
        rules,
        dry_run: dry_run(&meta.annotations, sink),
    }
}

fn rule(r: &model::AuthorizationRule, id: String, path: &str, sink: &mut Sink<'_>) -> Rule {
    let mut out = Rule { id, from: Vec::new(), to: Vec::new(), when: Vec::new() };
    if let Some(from) = &r.from {
        if from.is_empty() {
            sink.push(&format!("{path}.from"), "`from` must not be empty (leave it out to match any source)");
        }
        for (j, f) in from.iter().enumerate() {
            let fpath = format!("{path}.from[{j}].source");
            match &f.source {
                Some(s) => out.from.push(source(s, &fpath, sink)),
                None => sink.push(&fpath, "`source` is required"),
            }
        }
    }
    if let Some(to) = &r.to {
        if to.is_empty() {
            sink.push(&format!("{path}.to"), "`to` must not be empty (leave it out to match any operation)");
        }
        for (j, t) in to.iter().enumerate() {
            let tpath = format!("{path}.to[{j}].operation");
            match &t.operation {
                Some(o) => out.to.push(operation(o, &tpath, sink)),
                None => sink.push(&tpath, "`operation` is required"),
            }
        }
    }
    for (k, c) in r.when.iter().flatten().enumerate() {
        if let Some(check) = condition(c, &format!("{path}.when[{k}]"), sink) {
            out.when.push(check);
        }
    }
    out
}

/// How a field's values are compiled.
#[derive(Clone, Copy)]
enum Kind {
    /// Istio string patterns; `lowercase` for case-insensitive fields (hosts).
    Strings {
        lowercase: bool,
    },
    /// Principals: string patterns written without `spiffe://`.
    Principals,
    /// Namespaces: `*` anywhere is a wildcard.
    Namespaces,
    /// URL paths: string patterns; path templates are refused.
    Paths,
    Ips,
    Ports,
}

/// Compiles one field's values, recording problems under `path`.
fn values(kind: Kind, list: &[String], path: &str, sink: &mut Sink<'_>) -> Option<Values> {
    if list.is_empty() {
        return None;
    }
    if list.iter().any(String::is_empty) {
        sink.push(path, "empty value is not allowed");
    }
    let list = list.iter().filter(|v| !v.is_empty());
    Some(match kind {
        Kind::Strings { lowercase } => Values::Patterns(
            list.map(|v| if lowercase { Pattern::parse_lowercase(v) } else { Pattern::parse(v) }).collect(),
        ),
        Kind::Principals => Values::Patterns(
            list.map(|v| {
                if v.starts_with("spiffe://") {
                    sink.push(path, format!("principal {v:?} must be written without \"spiffe://\" (Istio adds it)"));
                }
                Pattern::parse(v)
            })
            .collect(),
        ),
        Kind::Namespaces => Values::Patterns(list.map(|v| Pattern::namespace(v)).collect()),
        Kind::Paths => Values::Patterns(
            list.map(|v| {
                if v.contains(['{', '}']) {
                    sink.push(path, format!("path {v:?}: path templates ({{*}}, {{**}}) are not supported by serin"));
                }
                Pattern::parse(v)
            })
            .collect(),
        ),
        Kind::Ips => Values::Ips(list.filter_map(|v| sink.check(path, IpBlock::parse(v))).collect()),
        Kind::Ports => Values::Ports(list.filter_map(|v| sink.check(path, port(v))).collect()),
    })
}

/// A port value (Istio: a decimal number up to 65535).
fn port(text: &str) -> Result<u16, String> {
    if !text.bytes().all(|b| b.is_ascii_digit()) {
        return Err(format!("bad port {text:?}"));
    }
    text.parse::<u16>().map_err(|_| format!("bad port {text:?} (must be 0 to 65535)"))
}

/// A check on `attr` from a field and its `not` form; `None` when both are empty.
#[allow(clippy::too_many_arguments)]
fn field_check(
    attr: Attr,
    kind: Kind,
    any_of: &[String],
    none_of: &[String],
    path: &str,
    field: &str,
    not_field: &str,
    sink: &mut Sink<'_>,
) -> Option<Check> {
    let any_of = values(kind, any_of, &format!("{path}.{field}"), sink);
    let none_of = values(kind, none_of, &format!("{path}.{not_field}"), sink);
    (any_of.is_some() || none_of.is_some()).then_some(Check { attr, any_of, none_of })
}

fn source(s: &model::Source, path: &str, sink: &mut Sink<'_>) -> Vec<Check> {
    let jwt = "needs request authentication (JWT, RequestAuthentication), which serin does not do";
    let remote = "the client address from X-Forwarded-For or PROXY protocol; ipBlocks matches the peer address";
    let unsupported = [
        (s.request_principals.is_some(), "requestPrincipals", jwt),
        (s.not_request_principals.is_some(), "notRequestPrincipals", jwt),
        (s.remote_ip_blocks.is_some(), "remoteIpBlocks", remote),
        (s.not_remote_ip_blocks.is_some(), "notRemoteIpBlocks", remote),
        (s.service_accounts.is_some(), "serviceAccounts", "use principals"),
        (s.not_service_accounts.is_some(), "notServiceAccounts", "use notPrincipals"),
        (s.trust_domains.is_some(), "trustDomains", "use principals"),
        (s.not_trust_domains.is_some(), "notTrustDomains", "use notPrincipals"),
    ];
    for (present, field, hint) in unsupported {
        sink.unsupported(present, &format!("{path}.{field}"), hint);
    }
    let checks: Vec<Check> = [
        field_check(
            Attr::SourcePrincipal,
            Kind::Principals,
            &s.principals,
            &s.not_principals,
            path,
            "principals",
            "notPrincipals",
            sink,
        ),
        field_check(
            Attr::SourceNamespace,
            Kind::Namespaces,
            &s.namespaces,
            &s.not_namespaces,
            path,
            "namespaces",
            "notNamespaces",
            sink,
        ),
        field_check(Attr::SourceIp, Kind::Ips, &s.ip_blocks, &s.not_ip_blocks, path, "ipBlocks", "notIpBlocks", sink),
    ]
    .into_iter()
    .flatten()
    .collect();
    if checks.is_empty() && !unsupported.iter().any(|(present, _, _)| *present) {
        sink.push(path, "`source` must not be empty (leave the `from` entry out to match any source)");
    }
    checks
}

fn operation(o: &model::Operation, path: &str, sink: &mut Sink<'_>) -> Vec<Check> {
    let checks: Vec<Check> = [
        field_check(
            Attr::Host,
            Kind::Strings { lowercase: true },
            &o.hosts,
            &o.not_hosts,
            path,
            "hosts",
            "notHosts",
            sink,
        ),
        field_check(Attr::DestinationPort, Kind::Ports, &o.ports, &o.not_ports, path, "ports", "notPorts", sink),
        field_check(
            Attr::Method,
            Kind::Strings { lowercase: false },
            &o.methods,
            &o.not_methods,
            path,
            "methods",
            "notMethods",
            sink,
        ),
        field_check(Attr::Path, Kind::Paths, &o.paths, &o.not_paths, path, "paths", "notPaths", sink),
    ]
    .into_iter()
    .flatten()
    .collect();
    if checks.is_empty() {
        sink.push(path, "`operation` must not be empty (leave the `to` entry out to match any operation)");
    }
    checks
}

/// One `when` condition; `None` after an error.
fn condition(c: &model::Condition, path: &str, sink: &mut Sink<'_>) -> Option<Check> {
    let key_path = format!("{path}.key");
    let key = c.key.as_str();
    if key.is_empty() {
        sink.push(&key_path, "key is required");
        return None;
    }
    let (attr, kind) = match key {
        "source.principal" => (Attr::SourcePrincipal, Kind::Principals),
        "source.namespace" => (Attr::SourceNamespace, Kind::Namespaces),
        "source.ip" => (Attr::SourceIp, Kind::Ips),
        "destination.port" => (Attr::DestinationPort, Kind::Ports),
        _ if key.starts_with("request.headers") => {
            let name = key
                .strip_prefix("request.headers[")
                .and_then(|rest| rest.strip_suffix(']'))
                .filter(|name| !name.is_empty() && !name.contains(['[', ']']));
            let Some(name) = name else {
                sink.push(&key_path, format!("bad key {key:?}: expected request.headers[<header name>]"));
                return None;
            };
            let name = sink.check(&key_path, fields::header_name(name))?;
            (Attr::Header(name), Kind::Strings { lowercase: false })
        }
        _ => {
            let known = UNSUPPORTED_KEYS.contains(&key)
                || ["request.auth.claims[", "experimental.envoy.filters.", "request.experimental.inline.headers["]
                    .iter()
                    .any(|prefix| key.starts_with(prefix));
            let what = if known { "is not supported by serin" } else { "is not an Istio attribute" };
            sink.push(&key_path, format!("key {key:?} {what} (serin supports {SUPPORTED_KEYS})"));
            return None;
        }
    };
    if c.values.is_empty() && c.not_values.is_empty() {
        sink.push(path, format!("at least one of values and notValues is required for key {key}"));
        return None;
    }
    field_check(attr, kind, &c.values, &c.not_values, path, "values", "notValues", sink)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::error::ConfigError;

    fn check_ap(yaml: &str) -> (AuthzPolicy, Vec<ConfigError>) {
        let ap: model::AuthorizationPolicy = serde_saphyr::from_str(yaml).expect("yaml");
        let mut errors = Vec::new();
        let mut sink = Sink { file: "f", resource: "AuthorizationPolicy prod/p".into(), errors: &mut errors };
        let p = authorization_policy(&ap, &ObjectMeta::default(), "prod", "p", &mut sink);
        (p, errors)
    }

    fn fields_of(errors: &[ConfigError]) -> Vec<&str> {
        errors.iter().map(|e| e.field.as_str()).collect()
    }

    #[test]
    fn compiles_rules_with_ids_and_checks() {
        let (p, e) = check_ap(
            "action: DENY\nrules:\n- from: [{source: {principals: [a], notNamespaces: [b]}}, {source: {ipBlocks: [10.0.0.0/8]}}]\n  to: [{operation: {methods: [GET], ports: ['80']}}]\n  when: [{key: 'request.headers[X-Id]', values: ['*']}]\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.action, Action::Deny);
        let r = &p.rules[0];
        assert_eq!(r.id, "ns[prod]-policy[p]-rule[0]");
        assert_eq!((r.from.len(), r.from[0].len(), r.to[0].len(), r.when.len()), (2, 2, 2, 1));
        assert_eq!(r.when[0].attr, Attr::Header(http::HeaderName::from_static("x-id")));
        assert!(r.from[0][1].any_of.is_none() && r.from[0][1].none_of.is_some());
    }

    #[test]
    fn rejects_what_istio_rejects_and_what_serin_lacks() {
        let (_, e) = check_ap("action: DENY\n");
        assert_eq!(fields_of(&e), ["spec.rules"]);
        let (_, e) = check_ap("action: CUSTOM\nprovider: {name: ext}\nrules: [{}]\n");
        assert_eq!(fields_of(&e), ["spec.action"]);
        assert!(e[0].message.contains("CUSTOM is not supported"), "{e:?}");
        let (_, e) = check_ap("action: AUDIT\nrules: [{}]\n");
        assert_eq!(fields_of(&e), ["spec.action"]);
        let (_, e) = check_ap("provider: {name: ext}\n");
        assert_eq!(fields_of(&e), ["spec.provider"]);
        let (_, e) = check_ap("rules:\n- from: []\n  to: [{}]\n");
        assert_eq!(fields_of(&e), ["spec.rules[0].from", "spec.rules[0].to[0].operation"]);
        let (_, e) = check_ap("rules: [{from: [{source: {}}], to: [{operation: {}}]}]\n");
        assert_eq!(fields_of(&e), ["spec.rules[0].from[0].source", "spec.rules[0].to[0].operation"]);
        let (_, e) = check_ap(
            "rules: [{from: [{source: {requestPrincipals: ['*'], ipBlocks: [1.2.3]}}], to: [{operation: {ports: ['70000', x], paths: ['/a/{*}']}}]}]\n",
        );
        assert_eq!(
            fields_of(&e),
            [
                "spec.rules[0].from[0].source.requestPrincipals",
                "spec.rules[0].from[0].source.ipBlocks",
                "spec.rules[0].to[0].operation.ports",
                "spec.rules[0].to[0].operation.ports",
                "spec.rules[0].to[0].operation.paths",
            ]
        );
        let (_, e) = check_ap("rules: [{from: [{source: {principals: ['spiffe://td/ns/a/sa/b', '']}}]}]\n");
        assert_eq!(e.len(), 2, "{e:?}");
    }

    #[test]
    fn when_keys() {
        let (_, e) = check_ap(
            "rules:\n- when:\n  - {key: 'request.auth.claims[iss]', values: [x]}\n  - {key: 'bogus.key', values: [x]}\n  - {key: 'request.headers[]', values: [x]}\n  - {key: 'source.ip', values: [nope]}\n  - {key: 'destination.port'}\n  - {key: '', values: [x]}\n",
        );
        assert_eq!(
            fields_of(&e),
            [
                "spec.rules[0].when[0].key",
                "spec.rules[0].when[1].key",
                "spec.rules[0].when[2].key",
                "spec.rules[0].when[3].values",
                "spec.rules[0].when[4]",
                "spec.rules[0].when[5].key",
            ]
        );
        assert!(e[0].message.contains("\"request.auth.claims[iss]\" is not supported by serin"), "{}", e[0].message);
        assert!(e[1].message.contains("is not an Istio attribute"), "{}", e[1].message);
        let (p, e) = check_ap(
            "rules:\n- when:\n  - {key: source.principal, notValues: ['*']}\n  - {key: source.namespace, values: [a*b]}\n  - {key: destination.port, values: ['8080']}\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.rules[0].when.len(), 3);
    }

    #[test]
    fn peer_authentication_rules() {
        let check = |yaml: &str| {
            let pa: model::PeerAuthentication = serde_saphyr::from_str(yaml).expect("yaml");
            let mut errors = Vec::new();
            let mut sink = Sink { file: "f", resource: "PeerAuthentication prod/p".into(), errors: &mut errors };
            let p = peer_authentication(&pa, &ObjectMeta::default(), "prod", "p", &mut sink);
            (p, errors)
        };
        let (p, e) = check(
            "selector: {matchLabels: {app: a}}\nmtls: {mode: STRICT}\nportLevelMtls:\n  8080: {mode: DISABLE}\n  9090: {}\n",
        );
        assert!(e.is_empty(), "{e:?}");
        assert_eq!(p.mode, Some(MtlsMode::Strict));
        assert_eq!(p.port_modes, vec![(8080, Some(MtlsMode::Disable)), (9090, None)]);
        assert_eq!(p.selector, vec![("app".to_string(), "a".to_string())]);
        let (p, e) = check("mtls: {mode: UNSET}\n");
        assert!(e.is_empty() && p.mode.is_none());
        let (_, e) = check("portLevelMtls: {80: {mode: STRICT}}\n");
        assert_eq!(fields_of(&e), ["spec.portLevelMtls"]);
        let (_, e) = check("selector: {matchLabels: {}}\nportLevelMtls: {80: {mode: STRICT}}\n");
        assert_eq!(fields_of(&e), ["spec.portLevelMtls"]);
        let (_, e) = check("selector: {matchLabels: {app: 'a*'}}\nportLevelMtls: {0: {mode: STRICT}, 'x': {}}\n");
        assert_eq!(fields_of(&e), ["spec.selector.matchLabels.app", "spec.portLevelMtls.0", "spec.portLevelMtls.x"]);
    }
}
