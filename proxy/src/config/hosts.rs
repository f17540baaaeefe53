//! Host names: short-name resolution and the names a client may use for a host.
//!
//! Istio resolves a short name (no dot) in the namespace of the rule that uses it:
//! `payment` in namespace `prod` is `payment.prod.svc.cluster.local`. serin also
//! completes `name.ns.svc` to the cluster-local FQDN; other names are taken as
//! written (external hosts such as `api.example.com`).

use crate::snapshot::HostPattern;

/// The cluster-local DNS suffix.
pub const CLUSTER_SUFFIX: &str = ".svc.cluster.local";

/// Resolves a host of a rule in namespace `namespace` to its FQDN (lower-case).
/// Wildcards (`*`, `*.example.com`) are returned as written.
pub fn resolve_host(host: &str, namespace: &str) -> String {
    let host = host.trim().to_ascii_lowercase();
    if host.starts_with('*') || host.parse::<std::net::IpAddr>().is_ok() {
        host
    } else if !host.contains('.') {
        format!("{host}.{namespace}{CLUSTER_SUFFIX}")
    } else if host.ends_with(".svc") {
        format!("{host}.cluster.local")
    } else {
        host
    }
}

/// Other spellings of a resolved host to try when looking it up in the registry
/// (`name.ns` → `name.ns.svc.cluster.local`).
pub fn lookup_candidates(fqdn: &str) -> Vec<String> {
    let mut out = vec![fqdn.to_string()];
    if fqdn.matches('.').count() == 1 && !fqdn.starts_with('*') && fqdn.parse::<std::net::IpAddr>().is_err() {
        out.push(format!("{fqdn}{CLUSTER_SUFFIX}"));
    }
    out
}

/// `(name, namespace)` of a cluster-local FQDN `name.ns.svc.cluster.local`.
pub fn split_cluster_local(fqdn: &str) -> Option<(&str, &str)> {
    let stem = fqdn.strip_suffix(CLUSTER_SUFFIX)?;
    let (name, namespace) = stem.split_once('.')?;
    if name.is_empty() || namespace.is_empty() || namespace.contains('.') {
        return None;
    }
    Some((name, namespace))
}

/// Every name a client may use for a resolved host: for `name.ns.svc.cluster.local`
/// that is `name`, `name.ns`, `name.ns.svc` and the FQDN; `*` is any host and
/// `*.example.com` a suffix.
pub fn domains(fqdn: &str) -> Vec<HostPattern> {
    if fqdn == "*" {
        return vec![HostPattern::Any];
    }
    if let Some(suffix) = fqdn.strip_prefix('*') {
        return vec![HostPattern::Suffix(suffix.to_string())];
    }
    match split_cluster_local(fqdn) {
        Some((name, namespace)) => vec![
            HostPattern::Exact(name.to_string()),
            HostPattern::Exact(format!("{name}.{namespace}")),
            HostPattern::Exact(format!("{name}.{namespace}.svc")),
            HostPattern::Exact(fqdn.to_string()),
        ],
        None => vec![HostPattern::Exact(fqdn.to_string())],
    }
}

/// Checks the syntax of a host as written in a rule; `allow_wildcard` permits a
/// leading `*` label (or `*` alone).
pub fn check_host(host: &str, allow_wildcard: bool) -> Result<(), String> {
    if host.is_empty() {
        return Err("host must not be empty".into());
    }
    if host.parse::<std::net::IpAddr>().is_ok() {
        return Ok(());
    }
    let rest = if host == "*" {
        ""
    } else if let Some(rest) = host.strip_prefix("*.") {
        rest
    } else {
        host
    };
    if rest.len() != host.len() && !allow_wildcard {
        return Err(format!("wildcard host {host:?} is not allowed here"));
    }
    if rest.contains('*') {
        return Err(format!("invalid host {host:?}: `*` is only allowed as the first label"));
    }
    if host.contains("://") || host.contains('/') || host.contains(':') {
        return Err(format!("invalid host {host:?}: a host is a DNS name without scheme, path or port"));
    }
    for label in rest.split('.').filter(|_| !rest.is_empty()) {
        let ok = !label.is_empty()
            && label.len() <= 63
            && label.chars().all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
            && !label.starts_with('-')
            && !label.ends_with('-');
        if !ok {
            return Err(format!("invalid host {host:?}: bad DNS label {label:?}"));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn exact(s: &str) -> HostPattern {
        HostPattern::Exact(s.into())
    }

    #[test]
    fn short_names_resolve_in_the_rule_namespace() {
        assert_eq!(resolve_host("payment", "prod"), "payment.prod.svc.cluster.local");
        assert_eq!(resolve_host("Payment", "prod"), "payment.prod.svc.cluster.local");
        assert_eq!(resolve_host("payment.prod.svc", "x"), "payment.prod.svc.cluster.local");
        assert_eq!(resolve_host("payment.prod.svc.cluster.local", "x"), "payment.prod.svc.cluster.local");
        assert_eq!(resolve_host("api.example.com", "x"), "api.example.com");
        assert_eq!(resolve_host("*.example.com", "x"), "*.example.com");
        assert_eq!(resolve_host("*", "x"), "*");
        assert_eq!(lookup_candidates("payment.prod"), vec!["payment.prod", "payment.prod.svc.cluster.local"]);
    }

    #[test]
    fn domains_cover_every_client_spelling() {
        assert_eq!(
            domains("payment.prod.svc.cluster.local"),
            vec![
                exact("payment"),
                exact("payment.prod"),
                exact("payment.prod.svc"),
                exact("payment.prod.svc.cluster.local")
            ]
        );
        assert_eq!(domains("api.example.com"), vec![exact("api.example.com")]);
        assert_eq!(domains("*"), vec![HostPattern::Any]);
        assert_eq!(domains("*.example.com"), vec![HostPattern::Suffix(".example.com".into())]);
        assert!(HostPattern::Suffix(".example.com".into()).matches("a.example.com"));
        assert!(!HostPattern::Suffix(".example.com".into()).matches("example.com"));
    }

    #[test]
    fn host_syntax() {
        assert!(check_host("payment", false).is_ok());
        assert!(check_host("*.example.com", true).is_ok());
        assert!(check_host("*", true).is_ok());
        assert!(check_host("10.0.0.1", false).is_ok());
        assert!(check_host("*.example.com", false).is_err());
        assert!(check_host("a.*.com", true).is_err());
        assert!(check_host("http://x", true).is_err());
        assert!(check_host("x:80", true).is_err());
        assert!(check_host("", true).is_err());
        assert!(check_host("bad..name", true).is_err());
    }
}
