//! Host names at the gateway: a server's `hosts` (`namespace/dnsName`), which
//! VirtualService hosts they admit, and picking a server or a route by SNI.
//!
//! Istio's rules: a server host is `ns/host`, `./host` (the Gateway's namespace),
//! `*/host` or a bare `host` (any namespace); `host` is an exact name, `*.suffix`
//! or `*`. A VirtualService host binds to a server host when one of the two
//! matches the other; the name served is the more specific of the two
//! (VirtualService `*.example.com` on server `pay.example.com` serves
//! `pay.example.com`).

use crate::snapshot::HostPattern;

/// One entry of a server's `hosts`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ServerHost {
    /// The namespace whose VirtualServices may bind, `None` for any.
    pub namespace: Option<String>,
    /// Lower-case host: exact, `*.suffix` or `*`.
    pub host: String,
}

impl ServerHost {
    /// Parses `ns/host`, `./host`, `*/host` or `host` of a Gateway in `gateway_namespace`.
    pub fn parse(text: &str, gateway_namespace: &str) -> ServerHost {
        let (namespace, host) = match text.split_once('/') {
            Some(("*", host)) => (None, host),
            Some((".", host)) => (Some(gateway_namespace.to_string()), host),
            Some((ns, host)) => (Some(ns.to_string()), host),
            None => (None, text),
        };
        ServerHost { namespace, host: host.trim().trim_end_matches('.').to_ascii_lowercase() }
    }

    /// Whether a VirtualService of `namespace` may bind to this host.
    pub fn admits_namespace(&self, namespace: &str) -> bool {
        self.namespace.as_deref().is_none_or(|ns| ns == namespace)
    }

    /// The SNI / Host pattern of this server host.
    pub fn pattern(&self) -> HostPattern {
        pattern(&self.host)
    }
}

/// The pattern of a lower-case host: exact, `*.suffix` or `*`.
pub fn pattern(host: &str) -> HostPattern {
    if host == "*" {
        HostPattern::Any
    } else if let Some(suffix) = host.strip_prefix('*') {
        HostPattern::Suffix(suffix.to_string())
    } else {
        HostPattern::Exact(host.to_string())
    }
}

/// Whether `host` (exact or wildcard) is covered by the wildcard or exact `by`.
fn covered(host: &str, by: &str) -> bool {
    if by == "*" || host == by {
        return true;
    }
    let Some(suffix) = by.strip_prefix('*') else { return false };
    // `host` may itself be a wildcard: `*.a.example.com` is inside `*.example.com`.
    let name = host.strip_prefix('*').unwrap_or(host);
    name.len() > suffix.len() && name.ends_with(suffix)
}

/// The names two hosts have in common, as the more specific of the two, or `None`
/// when they are disjoint. Both are lower-case; either may be a wildcard.
pub fn intersect(a: &str, b: &str) -> Option<String> {
    if covered(a, b) {
        Some(a.to_string())
    } else if covered(b, a) {
        Some(b.to_string())
    } else {
        None
    }
}

/// How well `pattern` matches the server name `name` (`None` = the client sent
/// none): exact beats a longer wildcard suffix beats a shorter one beats `*`;
/// `None` when it does not match. A client without SNI only matches `*`.
pub fn rank(pattern: &HostPattern, name: Option<&str>) -> Option<usize> {
    match (pattern, name) {
        (HostPattern::Any, _) => Some(0),
        (_, None) => None,
        (HostPattern::Exact(exact), Some(name)) => (exact == name).then_some(usize::MAX),
        (HostPattern::Suffix(suffix), Some(name)) => pattern.matches(name).then_some(suffix.len()),
    }
}

/// The best match for `name` among items with patterns; ties go to the first item.
pub fn best<'a, T: ?Sized>(
    items: impl IntoIterator<Item = (&'a [HostPattern], &'a T)>,
    name: Option<&str>,
) -> Option<&'a T> {
    let name = name.map(|n| n.trim_end_matches('.').to_ascii_lowercase());
    let mut found: Option<(&T, usize)> = None;
    for (patterns, item) in items {
        let Some(r) = patterns.iter().filter_map(|p| rank(p, name.as_deref())).max() else { continue };
        if found.is_none_or(|(_, best)| r > best) {
            found = Some((item, r));
        }
    }
    found.map(|(item, _)| item)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn server_hosts_parse_with_namespaces() {
        let h = ServerHost::parse("prod/Pay.Example.com", "edge");
        assert_eq!(h, ServerHost { namespace: Some("prod".into()), host: "pay.example.com".into() });
        assert!(h.admits_namespace("prod") && !h.admits_namespace("dev"));
        assert_eq!(ServerHost::parse("./a.com", "edge").namespace.as_deref(), Some("edge"));
        assert_eq!(ServerHost::parse("*/a.com", "edge").namespace, None);
        assert_eq!(ServerHost::parse("*", "edge"), ServerHost { namespace: None, host: "*".into() });
    }

    #[test]
    fn intersections_keep_the_more_specific_name() {
        assert_eq!(intersect("pay.example.com", "pay.example.com").as_deref(), Some("pay.example.com"));
        assert_eq!(intersect("pay.example.com", "*").as_deref(), Some("pay.example.com"));
        assert_eq!(intersect("*", "pay.example.com").as_deref(), Some("pay.example.com"));
        assert_eq!(intersect("*.example.com", "pay.example.com").as_deref(), Some("pay.example.com"));
        assert_eq!(intersect("pay.example.com", "*.example.com").as_deref(), Some("pay.example.com"));
        assert_eq!(intersect("*.a.example.com", "*.example.com").as_deref(), Some("*.a.example.com"));
        assert_eq!(intersect("*.example.com", "*.a.example.com").as_deref(), Some("*.a.example.com"));
        assert_eq!(intersect("example.com", "*.example.com"), None);
        assert_eq!(intersect("pay.example.com", "other.example.com"), None);
        assert_eq!(intersect("*.example.org", "*.example.com"), None);
    }

    #[test]
    fn best_prefers_exact_then_longest_suffix_then_any() {
        let any = [HostPattern::Any];
        let wide = [pattern("*.com")];
        let narrow = [pattern("*.example.com")];
        let exact = [pattern("pay.example.com")];
        let items: Vec<(&[HostPattern], &str)> =
            vec![(&any, "any"), (&wide, "wide"), (&narrow, "narrow"), (&exact, "exact")];
        assert_eq!(best(items.clone(), Some("pay.example.com")), Some("exact"));
        assert_eq!(best(items.clone(), Some("PAY.example.com.")), Some("exact"));
        assert_eq!(best(items.clone(), Some("other.example.com")), Some("narrow"));
        assert_eq!(best(items.clone(), Some("x.org.com")), Some("wide"));
        assert_eq!(best(items.clone(), Some("x.org")), Some("any"));
        assert_eq!(best(items.clone(), None), Some("any"));
        assert_eq!(best(items[1..].to_vec(), None), None);
    }
}
