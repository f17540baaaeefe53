//! AuthorizationPolicy: who may call a workload, evaluated per request (HTTP) or
//! per connection (TCP) with Istio's semantics.

use std::net::IpAddr;

use http::{HeaderMap, HeaderName};

use super::pattern::{IpBlock, Pattern};
use super::{SecurityPolicies, selector_matches};

/// `action` of an AuthorizationPolicy (AUDIT and CUSTOM are rejected when loading).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Action {
    /// Requests matching a rule are allowed; when ALLOW policies apply to a
    /// workload, everything else is denied.
    Allow,
    /// Requests matching a rule are denied, whatever ALLOW policies say.
    Deny,
}

/// One compiled AuthorizationPolicy.
#[derive(Debug, Clone)]
pub struct AuthzPolicy {
    /// `metadata.namespace`: the policy applies to workloads of this namespace,
    /// or of every namespace when it is the root namespace.
    pub namespace: String,
    /// `metadata.name`.
    pub name: String,
    /// `selector.matchLabels`; empty = every workload in scope.
    pub selector: Vec<(String, String)>,
    pub action: Action,
    /// `rules`; none = matches nothing (an ALLOW policy without rules allows
    /// nothing: Istio's `spec: {}` "allow-nothing").
    pub rules: Vec<Rule>,
    /// `istio.io/dry-run: "true"`: checked but not enforced (and, unlike Istio,
    /// the would-be result is not reported).
    pub dry_run: bool,
}

/// One `rules[]` entry: `from` AND `to` AND `when`.
#[derive(Debug, Clone)]
pub struct Rule {
    /// Envoy's id of the rule, `ns[<namespace>]-policy[<name>]-rule[<index>]`,
    /// reported in [`Decision::Deny`].
    pub id: String,
    /// `from[].source`: any of them (each: all of its checks); empty = any source.
    pub from: Vec<Vec<Check>>,
    /// `to[].operation`: any of them (each: all of its checks); empty = any operation.
    pub to: Vec<Vec<Check>>,
    /// `when[]`: all of them.
    pub when: Vec<Check>,
}

/// One attribute constraint: a field of a source or operation (`principals` with
/// `notPrincipals`) or a `when` condition (`values` with `notValues`).
#[derive(Debug, Clone)]
pub struct Check {
    pub attr: Attr,
    /// The attribute must match one of these (`principals`, `values`, …).
    pub any_of: Option<Values>,
    /// The attribute must match none of these (`notPrincipals`, `notValues`, …).
    pub none_of: Option<Values>,
}

/// The request attribute a [`Check`] reads.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Attr {
    /// `principals`, `source.principal`: the peer's identity (mTLS only).
    SourcePrincipal,
    /// `namespaces`, `source.namespace`: the namespace of the peer's identity.
    SourceNamespace,
    /// `ipBlocks`, `source.ip`: the peer's address.
    SourceIp,
    /// `ports`, `destination.port`.
    DestinationPort,
    /// `methods` (HTTP only).
    Method,
    /// `paths` (HTTP only): the path without the query.
    Path,
    /// `hosts` (HTTP only): the authority, case-insensitive.
    Host,
    /// `request.headers[<name>]` (HTTP only).
    Header(HeaderName),
}

impl Attr {
    /// Whether the attribute exists only for HTTP requests.
    pub fn http_only(&self) -> bool {
        matches!(self, Attr::Method | Attr::Path | Attr::Host | Attr::Header(_))
    }
}

/// The compiled values of a check (never empty).
#[derive(Debug, Clone)]
pub enum Values {
    Patterns(Vec<Pattern>),
    Ips(Vec<IpBlock>),
    Ports(Vec<u16>),
}

/// What the inbound side knows about one HTTP request, for [`SecurityPolicies::authorize`].
#[derive(Debug, Clone, Copy)]
pub struct RequestAttrs<'a> {
    /// The peer's identity from its mTLS certificate, without `spiffe://`
    /// (`cluster.local/ns/default/sa/frontend`); `None` for plaintext.
    pub source_principal: Option<&'a str>,
    /// The namespace in that identity (see [`principal_namespace`]).
    pub source_namespace: Option<&'a str>,
    /// The peer's address (the connection's remote IP).
    pub source_ip: IpAddr,
    /// The method, as sent (`GET`).
    pub method: &'a str,
    /// The path without the query string.
    pub path: &'a str,
    /// The authority (`Host`), as sent, port included if the client sent one.
    pub host: &'a str,
    /// The port the request was addressed to (the workload's port).
    pub port: u16,
    pub headers: &'a HeaderMap,
}

/// What the inbound side knows about a TCP connection it does not parse as
/// HTTP, for [`SecurityPolicies::authorize_tcp`].
#[derive(Debug, Clone, Copy)]
pub struct ConnAttrs<'a> {
    pub source_principal: Option<&'a str>,
    pub source_namespace: Option<&'a str>,
    pub source_ip: IpAddr,
    pub port: u16,
}

/// The outcome of authorization.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Decision {
    Allow,
    /// Denied: answer 403 `RBAC: access denied` (flag `RBAC`), or close a TCP
    /// connection. `policy` is the matching DENY rule's id
    /// (`ns[prod]-policy[deny-post]-rule[0]`), or `none` when ALLOW policies
    /// apply and none matched (Envoy's `rbac_access_denied_matched_policy[none]`).
    Deny {
        policy: String,
    },
}

impl Decision {
    /// Whether the request may proceed.
    pub fn is_allowed(&self) -> bool {
        matches!(self, Decision::Allow)
    }
}

/// The namespace in a principal `<trust-domain>/ns/<namespace>/sa/<account>`
/// (with or without `spiffe://`), for [`RequestAttrs::source_namespace`].
pub fn principal_namespace(principal: &str) -> Option<&str> {
    let mut parts = principal.strip_prefix("spiffe://").unwrap_or(principal).split('/');
    parts.next()?;
    while let Some(part) = parts.next() {
        if part == "ns" {
            return parts.next().filter(|ns| !ns.is_empty());
        }
    }
    None
}

/// The attributes of one evaluation; `http` is `None` for TCP.
struct Attrs<'a> {
    principal: Option<&'a str>,
    namespace: Option<&'a str>,
    ip: IpAddr,
    port: u16,
    http: Option<Http<'a>>,
}

struct Http<'a> {
    method: &'a str,
    path: &'a str,
    host: &'a str,
    headers: &'a HeaderMap,
}

impl SecurityPolicies {
    /// Authorizes one HTTP request to a workload in `workload_namespace` with
    /// `workload_labels`. Istio's order: a matching DENY policy denies; else, if
    /// no ALLOW policy applies to the workload, allow; else allow if an ALLOW
    /// policy matches, deny otherwise. Dry-run policies are skipped.
    ///
    /// Evaluation allocates nothing (only a denial copies the rule id).
    ///
    /// ```
    /// use http::HeaderMap;
    /// use serin::security::{Decision, RequestAttrs, SecurityPolicies, principal_namespace};
    ///
    /// let policies = SecurityPolicies::default(); // e.g. `&snapshot.security`
    /// let labels = vec![("app".to_string(), "payment".to_string())];
    /// let headers = HeaderMap::new();
    /// let principal = Some("cluster.local/ns/prod/sa/frontend"); // from the peer certificate
    /// let request = RequestAttrs {
    ///     source_principal: principal,
    ///     source_namespace: principal.and_then(principal_namespace),
    ///     source_ip: "10.0.0.7".parse().unwrap(),
    ///     method: "POST",
    ///     path: "/v1/pay",
    ///     host: "payment.prod.svc.cluster.local:8080",
    ///     port: 8080,
    ///     headers: &headers,
    /// };
    /// match policies.authorize("prod", &labels, &request) {
    ///     Decision::Allow => { /* forward to the app */ }
    ///     Decision::Deny { policy } => {
    ///         // 403 with body `RBAC: access denied`, response flag RBAC; log `policy`.
    ///         let _ = policy;
    ///     }
    /// }
    /// ```
    pub fn authorize(
        &self,
        workload_namespace: &str,
        workload_labels: &[(String, String)],
        request: &RequestAttrs<'_>,
    ) -> Decision {
        let attrs = Attrs {
            principal: request.source_principal,
            namespace: request.source_namespace,
            ip: request.source_ip,
            port: request.port,
            http: Some(Http {
                method: request.method,
                path: request.path,
                host: request.host,
                headers: request.headers,
            }),
        };
        self.decide(workload_namespace, workload_labels, &attrs)
    }

    /// Authorizes a TCP connection (same order as [`SecurityPolicies::authorize`]).
    /// HTTP-only fields (`methods`, `paths`, `hosts`, `request.headers`) cannot be
    /// evaluated: an ALLOW rule using one never matches, a DENY rule ignores them
    /// (so it denies more), as Istio does.
    pub fn authorize_tcp(
        &self,
        workload_namespace: &str,
        workload_labels: &[(String, String)],
        conn: &ConnAttrs<'_>,
    ) -> Decision {
        let attrs = Attrs {
            principal: conn.source_principal,
            namespace: conn.source_namespace,
            ip: conn.source_ip,
            port: conn.port,
            http: None,
        };
        self.decide(workload_namespace, workload_labels, &attrs)
    }

    /// Whether any enforced AuthorizationPolicy applies to the workload (when
    /// none does, every request is allowed and evaluation can be skipped).
    pub fn has_authorization(&self, workload_namespace: &str, workload_labels: &[(String, String)]) -> bool {
        self.authz.iter().any(|p| !p.dry_run && self.applies(p, workload_namespace, workload_labels))
    }

    fn applies(&self, p: &AuthzPolicy, namespace: &str, labels: &[(String, String)]) -> bool {
        (p.namespace == namespace || p.namespace == self.root_namespace) && selector_matches(&p.selector, labels)
    }

    fn decide(&self, namespace: &str, labels: &[(String, String)], attrs: &Attrs<'_>) -> Decision {
        let mut allow_applies = false;
        let mut allowed = false;
        for p in &self.authz {
            if p.dry_run || !self.applies(p, namespace, labels) {
                continue;
            }
            match p.action {
                Action::Deny => {
                    if let Some(rule) = p.rules.iter().find(|r| r.matches(attrs, Action::Deny)) {
                        return Decision::Deny { policy: rule.id.clone() };
                    }
                }
                Action::Allow => {
                    allow_applies = true;
                    allowed = allowed || p.rules.iter().any(|r| r.matches(attrs, Action::Allow));
                }
            }
        }
        if !allow_applies || allowed { Decision::Allow } else { Decision::Deny { policy: "none".into() } }
    }
}

impl Rule {
    fn matches(&self, attrs: &Attrs<'_>, action: Action) -> bool {
        // Missing attributes (HTTP-only fields on a TCP connection): the notes'
        // "For DENY, missing attributes count as match" (shared/notes/istio-semantics.md
        // §3). Istio (pilot/pkg/security/authz/model/model.go, `checkError`) skips
        // the whole rule of an ALLOW policy (a smaller allow) and drops only the
        // unavailable fields of a DENY rule (a wider deny). An attribute that is
        // merely absent from a request (no peer identity on plaintext, a header not
        // sent) is not "missing" in this sense: Envoy's matchers see no value, so
        // `principals`/`values` do not match and `notPrincipals`/`notValues` do.
        if attrs.http.is_none() && action == Action::Allow && self.uses_http() {
            return false;
        }
        let all = |checks: &[Check]| checks.iter().all(|c| c.matches(attrs));
        (self.from.is_empty() || self.from.iter().any(|s| all(s)))
            && (self.to.is_empty() || self.to.iter().any(|o| all(o)))
            && all(&self.when)
    }

    fn uses_http(&self) -> bool {
        self.from.iter().chain(&self.to).flatten().chain(&self.when).any(|c| c.attr.http_only())
    }
}

impl Check {
    fn matches(&self, attrs: &Attrs<'_>) -> bool {
        if self.attr.http_only() && attrs.http.is_none() {
            // Only reached for DENY rules (see `Rule::matches`): the field is ignored.
            return true;
        }
        self.any_of.as_ref().is_none_or(|v| self.hits(v, attrs))
            && self.none_of.as_ref().is_none_or(|v| !self.hits(v, attrs))
    }

    /// Whether the attribute matches one of `values`.
    fn hits(&self, values: &Values, attrs: &Attrs<'_>) -> bool {
        let strings = |value: Option<&str>| match (values, value) {
            (Values::Patterns(ps), Some(v)) => ps.iter().any(|p| p.matches(v)),
            _ => false,
        };
        match (&self.attr, &attrs.http) {
            (Attr::SourcePrincipal, _) => strings(attrs.principal),
            (Attr::SourceNamespace, _) => strings(attrs.namespace),
            (Attr::SourceIp, _) => matches!(values, Values::Ips(b) if b.iter().any(|b| b.contains(attrs.ip))),
            (Attr::DestinationPort, _) => matches!(values, Values::Ports(p) if p.contains(&attrs.port)),
            (Attr::Method, Some(h)) => strings(Some(h.method)),
            (Attr::Path, Some(h)) => strings(Some(h.path)),
            (Attr::Host, Some(h)) => {
                matches!(values, Values::Patterns(ps) if ps.iter().any(|p| p.matches_ignore_case(h.host)))
            }
            (Attr::Header(name), Some(h)) => {
                matches!(values, Values::Patterns(ps) if ps.iter().any(|p| p.matches_header(h.headers.get_all(name))))
            }
            (Attr::Method | Attr::Path | Attr::Host | Attr::Header(_), None) => false,
        }
    }
}
