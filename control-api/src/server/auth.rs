//! Who is calling: mesh client certificates (seen on the TLS listener) and bootstrap
//! tokens (gRPC metadata `authorization: Bearer TOKEN`).
//!
//! The bootstrap token file (`serin control-plane --bootstrap-tokens FILE`) has one token
//! per line: `TOKEN NAMESPACE/SERVICE_ACCOUNT` (the token buys that one identity) or
//! `TOKEN *` (any identity of the trust domain). `#` starts a comment; blank lines are
//! skipped. Tokens are compared in constant time and never logged.

use std::fmt;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serin_certs::SpiffeId;
use tonic::{Request, Status};

use super::status::Observer;

/// The gRPC metadata key carrying a bootstrap token (`Bearer TOKEN`).
pub const AUTHORIZATION_METADATA: &str = "authorization";

/// Shortest token the file may hold: a guard against guessable tokens.
pub const MIN_TOKEN_LEN: usize = 16;

/// What a bootstrap token entitles its holder to.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum TokenScope {
    /// One identity: `spiffe://<trust domain>/ns/<namespace>/sa/<service account>`.
    Identity {
        /// The namespace.
        namespace: String,
        /// The service account.
        service_account: String,
    },
    /// Any identity of the trust domain (`*`).
    Any,
}

impl TokenScope {
    /// Whether a caller holding this scope may have `id` (whose trust domain the caller
    /// checks separately).
    pub fn allows(&self, id: &SpiffeId) -> bool {
        match self {
            TokenScope::Any => true,
            TokenScope::Identity { namespace, service_account } => {
                id.namespace() == namespace && id.service_account() == service_account
            }
        }
    }
}

impl fmt::Display for TokenScope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            TokenScope::Any => f.write_str("any identity"),
            TokenScope::Identity { namespace, service_account } => write!(f, "ns/{namespace}/sa/{service_account}"),
        }
    }
}

/// Why the bootstrap token file cannot be used.
#[derive(Debug, thiserror::Error)]
pub enum TokenFileError {
    /// The file cannot be read.
    #[error("bootstrap tokens {}: cannot read: {source}", path.display())]
    Read {
        /// The file.
        path: PathBuf,
        /// The I/O error.
        #[source]
        source: std::io::Error,
    },
    /// A line is not `TOKEN NAMESPACE/SERVICE_ACCOUNT` or `TOKEN *`.
    #[error("bootstrap tokens {}:{line}: {reason}", path.display())]
    Line {
        /// The file.
        path: PathBuf,
        /// The line number (from 1).
        line: usize,
        /// What is wrong.
        reason: String,
    },
}

/// The bootstrap tokens the control plane accepts. `Debug` prints only how many there are.
#[derive(Clone, Default)]
pub struct BootstrapTokens {
    entries: Vec<(Vec<u8>, TokenScope)>,
}

impl fmt::Debug for BootstrapTokens {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("BootstrapTokens").field("count", &self.entries.len()).finish()
    }
}

impl BootstrapTokens {
    /// No tokens: only client certificates authenticate.
    pub fn empty() -> BootstrapTokens {
        BootstrapTokens::default()
    }

    /// Reads a token file (see the module documentation).
    pub fn load(path: &Path) -> Result<BootstrapTokens, TokenFileError> {
        let text = std::fs::read_to_string(path)
            .map_err(|source| TokenFileError::Read { path: path.to_path_buf(), source })?;
        BootstrapTokens::parse(&text, path)
    }

    /// Parses the text of a token file; errors name `path` and the line.
    pub fn parse(text: &str, path: &Path) -> Result<BootstrapTokens, TokenFileError> {
        let mut entries: Vec<(Vec<u8>, TokenScope)> = Vec::new();
        for (index, raw) in text.lines().enumerate() {
            let line = index + 1;
            let bad = |reason: String| TokenFileError::Line { path: path.to_path_buf(), line, reason };
            let content = raw.split_once('#').map_or(raw, |(before, _)| before).trim();
            if content.is_empty() {
                continue;
            }
            let mut fields = content.split_whitespace();
            let (Some(token), Some(scope), None) = (fields.next(), fields.next(), fields.next()) else {
                return Err(bad("expected `TOKEN NAMESPACE/SERVICE_ACCOUNT` or `TOKEN *`".into()));
            };
            if token.len() < MIN_TOKEN_LEN {
                return Err(bad(format!(
                    "the token is {} characters long; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 16`)",
                    token.len()
                )));
            }
            let scope = if scope == "*" {
                TokenScope::Any
            } else {
                let Some((namespace, service_account)) = scope.split_once('/') else {
                    return Err(bad(format!("{scope:?} is not NAMESPACE/SERVICE_ACCOUNT or *")));
                };
                // The segments follow the SPIFFE ID rules; any trust domain will do to check them.
                SpiffeId::new("cluster.local", namespace, service_account)
                    .map_err(|e| bad(format!("{scope:?}: {e}")))?;
                TokenScope::Identity { namespace: namespace.to_string(), service_account: service_account.to_string() }
            };
            if entries.iter().any(|(t, _)| t.as_slice() == token.as_bytes()) {
                return Err(bad("this token is listed twice".into()));
            }
            entries.push((token.as_bytes().to_vec(), scope));
        }
        Ok(BootstrapTokens { entries })
    }

    /// A set holding the given tokens (tests, embedding).
    pub fn from_entries<I, S>(entries: I) -> BootstrapTokens
    where
        I: IntoIterator<Item = (S, TokenScope)>,
        S: Into<String>,
    {
        BootstrapTokens { entries: entries.into_iter().map(|(t, s)| (t.into().into_bytes(), s)).collect() }
    }

    /// How many tokens there are.
    pub fn len(&self) -> usize {
        self.entries.len()
    }

    /// Whether there is no token.
    pub fn is_empty(&self) -> bool {
        self.entries.is_empty()
    }

    /// The scope of `token`, if it is one of ours. Every entry is compared in constant
    /// time, so the answer's timing does not tell how much of a guess was right.
    pub fn lookup(&self, token: &str) -> Option<&TokenScope> {
        let mut found = None;
        for (candidate, scope) in &self.entries {
            if constant_time_eq(candidate, token.as_bytes()) {
                found = Some(scope);
            }
        }
        found
    }
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    if a.len() != b.len() {
        return false;
    }
    a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// What the control plane's TLS listener knows about a connection; tonic puts it in
/// every request's extensions.
#[derive(Debug, Clone)]
pub struct MeshConnectInfo {
    /// The client's address.
    pub remote_addr: Option<SocketAddr>,
    /// The client's SPIFFE ID, when it presented a certificate that chains to the mesh
    /// roots (rustls verified it during the handshake) and carries one.
    pub peer: Option<SpiffeId>,
}

/// The credentials of one call.
#[derive(Debug, Clone, Default)]
pub struct Caller {
    /// The verified client certificate's identity (TLS listener only).
    pub peer: Option<SpiffeId>,
    /// The scope of a valid bootstrap token.
    pub token: Option<TokenScope>,
    /// The call came over the TLS listener.
    pub tls: bool,
    /// The client's address, for logs.
    pub remote_addr: Option<SocketAddr>,
}

impl Caller {
    /// Whether the call carries any credential.
    pub fn is_authenticated(&self) -> bool {
        self.peer.is_some() || self.token.is_some()
    }
}

/// Reads the credentials of a request. A token that is present but malformed or unknown
/// is refused (UNAUTHENTICATED) rather than ignored, so a misconfigured client hears why.
pub fn caller<T>(request: &Request<T>, tokens: &BootstrapTokens) -> Result<Caller, Status> {
    let info = request.extensions().get::<MeshConnectInfo>();
    let remote_addr = info.and_then(|i| i.remote_addr).or_else(|| request.remote_addr());
    let token = match request.metadata().get(AUTHORIZATION_METADATA) {
        None => None,
        Some(value) => {
            let text = value.to_str().map_err(|_| {
                Status::unauthenticated("the authorization metadata is not text; send `authorization: Bearer TOKEN`")
            })?;
            let token = bearer(text)
                .ok_or_else(|| Status::unauthenticated("the authorization metadata is not `Bearer TOKEN`"))?;
            let scope = tokens.lookup(token).ok_or_else(|| {
                Status::unauthenticated("the bootstrap token is not recognised by this control plane")
            })?;
            Some(scope.clone())
        }
    };
    Ok(Caller { peer: info.and_then(|i| i.peer.clone()), token, tls: info.is_some(), remote_addr })
}

/// The token of `Bearer TOKEN` (scheme case-insensitive, as HTTP's).
fn bearer(value: &str) -> Option<&str> {
    let (scheme, token) = value.trim().split_once(' ')?;
    let token = token.trim();
    (scheme.eq_ignore_ascii_case("bearer") && !token.is_empty()).then_some(token)
}

/// The interceptor of the TLS listener: every call needs a verified mesh client
/// certificate or a valid bootstrap token, else UNAUTHENTICATED.
#[derive(Clone)]
pub(crate) struct RequireCredentials {
    pub tokens: Arc<BootstrapTokens>,
    pub observer: Arc<dyn Observer>,
}

impl tonic::service::Interceptor for RequireCredentials {
    fn call(&mut self, request: Request<()>) -> Result<Request<()>, Status> {
        let refuse = |status: Status, remote: Option<SocketAddr>| {
            tracing::warn!(?remote, reason = status.message(), "TLS listener: call refused");
            self.observer.unauthenticated();
            status
        };
        match caller(&request, &self.tokens) {
            Ok(who) if who.is_authenticated() => Ok(request),
            Ok(who) => Err(refuse(
                Status::unauthenticated(
                    "no credentials: the TLS listener needs a mesh client certificate or a bootstrap token \
                     (metadata `authorization: Bearer TOKEN`)",
                ),
                who.remote_addr,
            )),
            Err(status) => {
                let remote = request.extensions().get::<MeshConnectInfo>().and_then(|i| i.remote_addr);
                Err(refuse(status, remote))
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    const T1: &str = "0123456789abcdef0123";
    const T2: &str = "fedcba9876543210fedc";

    #[test]
    fn parses_tokens_comments_and_scopes() {
        let text = format!("# tokens\n\n{T1} default/payment  # payment only\n  {T2} *\n");
        let tokens = BootstrapTokens::parse(&text, Path::new("t")).expect("parses");
        assert_eq!(tokens.len(), 2);
        assert_eq!(
            tokens.lookup(T1),
            Some(&TokenScope::Identity { namespace: "default".into(), service_account: "payment".into() })
        );
        assert_eq!(tokens.lookup(T2), Some(&TokenScope::Any));
        assert_eq!(tokens.lookup("0123456789abcdef0124"), None);
        assert_eq!(tokens.lookup(""), None);
        assert!(!format!("{tokens:?}").contains(T1), "Debug hides tokens");
    }

    #[test]
    fn bad_lines_name_the_line() {
        let cases = [
            (format!("{T1}\n"), "expected `TOKEN"),
            ("# c\nshort default/payment\n".to_string(), ":2: the token is 5 characters"),
            (format!("{T1} payment\n"), "is not NAMESPACE/SERVICE_ACCOUNT"),
            (format!("{T1} default/pay%20ment\n"), "pay%20ment"),
            (format!("{T1} a/b c\n"), "expected `TOKEN"),
            (format!("{T1} a/b\n{T1} *\n"), ":2: this token is listed twice"),
        ];
        for (text, expected) in cases {
            let err = BootstrapTokens::parse(&text, Path::new("tokens.txt")).expect_err(&text).to_string();
            assert!(err.contains(expected) && err.contains("tokens.txt"), "{text:?}: {err}");
        }
    }

    #[test]
    fn bearer_values() {
        assert_eq!(bearer("Bearer abc"), Some("abc"));
        assert_eq!(bearer("bearer  abc "), Some("abc"));
        assert_eq!(bearer("Basic abc"), None);
        assert_eq!(bearer("Bearer"), None);
        assert_eq!(bearer("Bearer  "), None);
    }

    #[test]
    fn scopes_allow() {
        let id: SpiffeId = "spiffe://cluster.local/ns/default/sa/payment".parse().expect("id");
        assert!(TokenScope::Any.allows(&id));
        let scope = TokenScope::Identity { namespace: "default".into(), service_account: "payment".into() };
        assert!(scope.allows(&id));
        let other: SpiffeId = "spiffe://cluster.local/ns/default/sa/frontend".parse().expect("id");
        assert!(!scope.allows(&other));
    }
}
