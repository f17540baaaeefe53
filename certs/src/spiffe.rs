//! SPIFFE identities in Istio's form: `spiffe://<trust-domain>/ns/<namespace>/sa/<service-account>`.

use std::fmt;
use std::str::FromStr;

/// The URI scheme of a SPIFFE ID, with its separator.
const SCHEME: &str = "spiffe://";

/// Longest trust domain the SPIFFE specification allows.
const MAX_TRUST_DOMAIN_LEN: usize = 255;

/// Longest whole SPIFFE ID the SPIFFE specification allows (URI length).
const MAX_ID_LEN: usize = 2048;

/// A workload identity as Istio writes it: `spiffe://<td>/ns/<ns>/sa/<sa>`.
///
/// Parsing is strict: the scheme must be `spiffe` (lower case), the trust domain may hold
/// only lower-case letters, digits, `.`, `-` and `_`, and the path must be exactly
/// `/ns/<namespace>/sa/<service-account>` with non-empty segments made of letters, digits,
/// `.`, `-` and `_` (not `.` or `..`). Anything else (a port, a query, a fragment, user
/// info, percent-encoding, extra segments) is rejected with a [`SpiffeIdError`] that says
/// what is wrong.
///
/// ```
/// use serin_certs::SpiffeId;
/// let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/payment".parse().unwrap();
/// assert_eq!(id.namespace(), "default");
/// assert_eq!(id.principal(), "cluster.local/ns/default/sa/payment");
/// assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/payment");
/// ```
#[derive(Debug, Clone, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub struct SpiffeId {
    trust_domain: String,
    namespace: String,
    service_account: String,
}

/// Why a string is not a valid Istio SPIFFE ID.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum SpiffeIdError {
    /// The string does not start with `spiffe://`.
    #[error("{input:?} is not a SPIFFE ID: it must start with \"spiffe://\"")]
    MissingScheme {
        /// The rejected input.
        input: String,
    },
    /// The string is longer than the SPIFFE limit.
    #[error("SPIFFE ID is {len} bytes long; the limit is {MAX_ID_LEN}")]
    TooLong {
        /// The input's length in bytes.
        len: usize,
    },
    /// The trust domain is empty.
    #[error("{input:?}: the trust domain is empty")]
    EmptyTrustDomain {
        /// The rejected input.
        input: String,
    },
    /// The trust domain holds a character SPIFFE does not allow.
    #[error(
        "{input:?}: trust domain {trust_domain:?} has invalid character {ch:?} \
         (allowed: lower-case letters, digits, '.', '-', '_'; no port or user info)"
    )]
    InvalidTrustDomain {
        /// The rejected input.
        input: String,
        /// The trust domain part.
        trust_domain: String,
        /// The first character that is not allowed.
        ch: char,
    },
    /// The trust domain is longer than 255 bytes.
    #[error("{input:?}: the trust domain is longer than {MAX_TRUST_DOMAIN_LEN} bytes")]
    TrustDomainTooLong {
        /// The rejected input.
        input: String,
    },
    /// The path is not `/ns/<namespace>/sa/<service-account>`.
    #[error("{input:?}: the path must be /ns/<namespace>/sa/<service-account>, found {path:?}")]
    NotIstioPath {
        /// The rejected input.
        input: String,
        /// The path part (empty when there is none).
        path: String,
    },
    /// A namespace or service-account segment is empty, `.`/`..` or has a bad character.
    #[error(
        "{input:?}: {what} {segment:?} is invalid (allowed: letters, digits, '.', '-', '_'; \
         not empty, '.' or '..')"
    )]
    InvalidSegment {
        /// The rejected input.
        input: String,
        /// `namespace` or `service account`.
        what: &'static str,
        /// The offending segment.
        segment: String,
    },
}

impl SpiffeId {
    /// Builds an identity from its parts, validating each as [`FromStr`] does.
    pub fn new(trust_domain: &str, namespace: &str, service_account: &str) -> Result<Self, SpiffeIdError> {
        format!("{SCHEME}{trust_domain}/ns/{namespace}/sa/{service_account}").parse()
    }

    /// The trust domain, e.g. `cluster.local`.
    pub fn trust_domain(&self) -> &str {
        &self.trust_domain
    }

    /// The Kubernetes namespace, e.g. `default`.
    pub fn namespace(&self) -> &str {
        &self.namespace
    }

    /// The service account, e.g. `payment`.
    pub fn service_account(&self) -> &str {
        &self.service_account
    }

    /// Istio's principal form, the ID without its scheme: `cluster.local/ns/default/sa/payment`.
    ///
    /// This is what `AuthorizationPolicy` `principals` and the `source_principal` metric label use.
    pub fn principal(&self) -> String {
        format!("{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl fmt::Display for SpiffeId {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{SCHEME}{}/ns/{}/sa/{}", self.trust_domain, self.namespace, self.service_account)
    }
}

impl FromStr for SpiffeId {
    type Err = SpiffeIdError;

    fn from_str(input: &str) -> Result<Self, Self::Err> {
        if input.len() > MAX_ID_LEN {
            return Err(SpiffeIdError::TooLong { len: input.len() });
        }
        let owned = || input.to_string();
        let rest = input.strip_prefix(SCHEME).ok_or_else(|| SpiffeIdError::MissingScheme { input: owned() })?;
        let (trust_domain, path) = match rest.find('/') {
            Some(i) => (&rest[..i], &rest[i..]),
            None => (rest, ""),
        };
        check_trust_domain_of(input, trust_domain)?;
        let not_istio = || SpiffeIdError::NotIstioPath { input: owned(), path: path.to_string() };
        let mut segments = path.split('/');
        // `path` starts with '/', so the first segment is the empty string before it.
        let (Some(""), Some("ns"), Some(namespace), Some("sa"), Some(service_account), None) =
            (segments.next(), segments.next(), segments.next(), segments.next(), segments.next(), segments.next())
        else {
            return Err(not_istio());
        };
        check_segment(input, "namespace", namespace)?;
        check_segment(input, "service account", service_account)?;
        Ok(SpiffeId {
            trust_domain: trust_domain.to_string(),
            namespace: namespace.to_string(),
            service_account: service_account.to_string(),
        })
    }
}

/// Checks a bare trust domain (`cluster.local`) against the SPIFFE rules used by [`SpiffeId`].
pub fn check_trust_domain(trust_domain: &str) -> Result<(), SpiffeIdError> {
    check_trust_domain_of(trust_domain, trust_domain)
}

fn check_trust_domain_of(input: &str, trust_domain: &str) -> Result<(), SpiffeIdError> {
    if trust_domain.is_empty() {
        return Err(SpiffeIdError::EmptyTrustDomain { input: input.to_string() });
    }
    if trust_domain.len() > MAX_TRUST_DOMAIN_LEN {
        return Err(SpiffeIdError::TrustDomainTooLong { input: input.to_string() });
    }
    if let Some(ch) =
        trust_domain.chars().find(|c| !(c.is_ascii_lowercase() || c.is_ascii_digit() || matches!(c, '.' | '-' | '_')))
    {
        return Err(SpiffeIdError::InvalidTrustDomain {
            input: input.to_string(),
            trust_domain: trust_domain.to_string(),
            ch,
        });
    }
    Ok(())
}

fn check_segment(input: &str, what: &'static str, segment: &str) -> Result<(), SpiffeIdError> {
    let valid_chars = segment.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '-' | '_'));
    if segment.is_empty() || segment == "." || segment == ".." || !valid_chars {
        return Err(SpiffeIdError::InvalidSegment { input: input.to_string(), what, segment: segment.to_string() });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_istio_form() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/payment".parse().unwrap();
        assert_eq!(id.trust_domain(), "cluster.local");
        assert_eq!(id.namespace(), "default");
        assert_eq!(id.service_account(), "payment");
        assert_eq!(id.principal(), "cluster.local/ns/default/sa/payment");
        assert_eq!(id.to_string(), "spiffe://cluster.local/ns/default/sa/payment");
        assert_eq!(SpiffeId::new("cluster.local", "default", "payment").unwrap(), id);
    }

    #[test]
    fn accepts_allowed_characters() {
        for ok in [
            "spiffe://example.org/ns/istio-system/sa/istio_ingressgateway-service-account",
            "spiffe://td-1_x.y/ns/A.b-c_d/sa/Sa9",
            "spiffe://a/ns/n/sa/s",
        ] {
            let id: SpiffeId = ok.parse().unwrap_or_else(|e| panic!("{ok}: {e}"));
            assert_eq!(id.to_string(), ok, "round trip");
        }
    }

    #[test]
    fn rejects_everything_else() {
        let cases: &[(&str, &str)] = &[
            ("", "must start with"),
            ("cluster.local/ns/default/sa/payment", "must start with"),
            ("SPIFFE://cluster.local/ns/default/sa/payment", "must start with"),
            ("https://cluster.local/ns/default/sa/payment", "must start with"),
            ("spiffe:///ns/default/sa/payment", "trust domain is empty"),
            ("spiffe://", "trust domain is empty"),
            ("spiffe://Cluster.local/ns/default/sa/payment", "invalid character 'C'"),
            ("spiffe://cluster.local:8080/ns/default/sa/payment", "invalid character ':'"),
            ("spiffe://user@cluster.local/ns/default/sa/payment", "invalid character '@'"),
            ("spiffe://cluster.local", "path must be"),
            ("spiffe://cluster.local/", "path must be"),
            ("spiffe://cluster.local/ns/default", "path must be"),
            ("spiffe://cluster.local/ns/default/sa", "path must be"),
            ("spiffe://cluster.local/ns/default/sa/payment/", "path must be"),
            ("spiffe://cluster.local/ns/default/sa/payment/extra", "path must be"),
            ("spiffe://cluster.local/namespace/default/sa/payment", "path must be"),
            ("spiffe://cluster.local/ns/default/serviceaccount/payment", "path must be"),
            ("spiffe://cluster.local//ns/default/sa/payment", "path must be"),
            ("spiffe://cluster.local/ns//sa/payment", "namespace \"\" is invalid"),
            ("spiffe://cluster.local/ns/default/sa/", "service account \"\" is invalid"),
            ("spiffe://cluster.local/ns/../sa/payment", "namespace \"..\" is invalid"),
            ("spiffe://cluster.local/ns/./sa/payment", "namespace \".\" is invalid"),
            ("spiffe://cluster.local/ns/default/sa/pay%20ment", "service account \"pay%20ment\""),
            ("spiffe://cluster.local/ns/default/sa/payment?x=1", "service account \"payment?x=1\""),
            ("spiffe://cluster.local/ns/default/sa/payment#frag", "service account \"payment#frag\""),
            ("spiffe://cluster.local/ns/déf/sa/payment", "namespace \"déf\""),
        ];
        for (input, expected) in cases {
            let err = input.parse::<SpiffeId>().expect_err(input).to_string();
            assert!(err.contains(expected), "{input:?}: error {err:?} should contain {expected:?}");
        }
        let long = format!("spiffe://{}/ns/a/sa/b", "a".repeat(256));
        assert!(matches!(long.parse::<SpiffeId>(), Err(SpiffeIdError::TrustDomainTooLong { .. })));
        let huge = format!("spiffe://a/ns/a/sa/{}", "b".repeat(3000));
        assert!(matches!(huge.parse::<SpiffeId>(), Err(SpiffeIdError::TooLong { .. })));
        assert!(check_trust_domain("cluster.local").is_ok());
        assert!(check_trust_domain("Cluster.local").is_err());
        assert!(check_trust_domain("").is_err());
        assert!(check_trust_domain("a/b").is_err());
    }
}
