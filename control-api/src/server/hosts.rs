//! Service names and hosts: `payment`, `payment.default`, `payment.default.svc` and
//! `payment.default.svc.cluster.local` all name the same service in namespace `default`.

/// The fully qualified form of a host as seen from `namespace` (Kubernetes short-name rules):
/// `payment` in `default` is `payment.default.svc.cluster.local`.
pub fn fqdn(host: &str, namespace: &str) -> String {
    let host = host.trim_end_matches('.').to_ascii_lowercase();
    match host.matches('.').count() {
        0 => format!("{host}.{namespace}.svc.cluster.local"),
        1 => format!("{host}.svc.cluster.local"),
        2 if host.ends_with(".svc") => format!("{host}.cluster.local"),
        _ => host,
    }
}

/// True when `host`, written in a resource of `namespace`, names `service` (short name
/// or FQDN, read in the same namespace).
pub(crate) fn same_service(host: &str, service: &str, namespace: &str) -> bool {
    !host.is_empty() && fqdn(host, namespace) == fqdn(service, namespace)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn short_names_and_fqdns_match() {
        assert!(same_service("payment", "payment", "default"));
        assert!(same_service("payment", "payment.default.svc.cluster.local", "default"));
        assert!(same_service("payment.default.svc.cluster.local", "payment", "default"));
        assert!(same_service("payment.default", "payment.default.svc", "default"));
        assert!(!same_service("payment", "payment.other.svc.cluster.local", "default"));
        assert!(!same_service("payments", "payment", "default"));
        assert!(!same_service("", "payment", "default"));
    }
}
