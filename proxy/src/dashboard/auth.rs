//! The admin token of the dashboard's write actions (set-weight, rollback).
//!
//! The token is read once at start from `--admin-token-file` (one word of printable
//! ASCII, at least [`MIN_TOKEN_LEN`] characters). A request carries it as
//! `Authorization: Bearer <token>`. The comparison hashes both sides with SHA-256 and
//! compares the digests without an early exit, so its time says nothing about how much
//! of a guess was right, nor about the token's length.

use std::path::Path;

use anyhow::Context as _;
use http::HeaderMap;
use http::header::AUTHORIZATION;
use ring::digest::{SHA256, digest};
use serin_control_api::server::MIN_TOKEN_LEN;

/// The configured admin token (only its SHA-256 digest is kept).
#[derive(Clone)]
pub struct AdminToken {
    digest: [u8; 32],
}

impl std::fmt::Debug for AdminToken {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("AdminToken(<redacted>)")
    }
}

/// Why a write action was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refusal {
    /// The control plane has no admin token: writes are off (403).
    NotConfigured,
    /// No `Authorization: Bearer …` header (401).
    Missing,
    /// A token that is not the configured one (401).
    Wrong,
}

impl Refusal {
    /// The HTTP status: 403 when writes are off, else 401.
    pub fn status(self) -> http::StatusCode {
        match self {
            Refusal::NotConfigured => http::StatusCode::FORBIDDEN,
            Refusal::Missing | Refusal::Wrong => http::StatusCode::UNAUTHORIZED,
        }
    }

    /// What to tell the caller.
    pub fn message(self) -> &'static str {
        match self {
            Refusal::NotConfigured => {
                "set-weight and rollback from the dashboard are off: start the control plane with \
                 --admin-token-file FILE to turn them on"
            }
            Refusal::Missing => "an admin token is needed: send it as `Authorization: Bearer TOKEN`",
            Refusal::Wrong => "the admin token is not the one the control plane was started with",
        }
    }
}

impl AdminToken {
    /// A token from its text (trimmed); refused when empty, shorter than
    /// [`MIN_TOKEN_LEN`], or not one word of printable ASCII.
    pub fn new(text: &str) -> anyhow::Result<AdminToken> {
        let token = text.trim();
        anyhow::ensure!(!token.is_empty(), "the file is empty");
        anyhow::ensure!(token.bytes().all(|b| b.is_ascii_graphic()), "the token must be one word of printable ASCII");
        anyhow::ensure!(
            token.len() >= MIN_TOKEN_LEN,
            "the token is {} characters long; use at least {MIN_TOKEN_LEN} (e.g. `openssl rand -hex 16`)",
            token.len()
        );
        Ok(AdminToken { digest: sha256(token.as_bytes()) })
    }

    /// Reads `--admin-token-file`.
    pub fn load(path: &Path) -> anyhow::Result<AdminToken> {
        let text = std::fs::read_to_string(path).with_context(|| format!("--admin-token-file {}", path.display()))?;
        AdminToken::new(&text).with_context(|| format!("--admin-token-file {}", path.display()))
    }

    /// True when `presented` is the token; constant time in the token's content.
    pub fn matches(&self, presented: &[u8]) -> bool {
        let other = sha256(presented);
        let mut diff = 0u8;
        for (a, b) in self.digest.iter().zip(other.iter()) {
            diff |= a ^ b;
        }
        std::hint::black_box(diff) == 0
    }
}

fn sha256(bytes: &[u8]) -> [u8; 32] {
    let mut out = [0u8; 32];
    out.copy_from_slice(digest(&SHA256, bytes).as_ref());
    out
}

/// Checks a write request's `Authorization` header against `token`.
pub fn check(token: Option<&AdminToken>, headers: &HeaderMap) -> Result<(), Refusal> {
    let Some(token) = token else {
        return Err(Refusal::NotConfigured);
    };
    let Some(value) = headers.get(AUTHORIZATION) else {
        return Err(Refusal::Missing);
    };
    let value = value.as_bytes();
    let presented = match value.get(..7) {
        Some(scheme) if scheme.eq_ignore_ascii_case(b"bearer ") => value.get(7..).unwrap_or_default().trim_ascii(),
        _ => return Err(Refusal::Missing),
    };
    if presented.is_empty() {
        return Err(Refusal::Missing);
    }
    if token.matches(presented) { Ok(()) } else { Err(Refusal::Wrong) }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderValue;

    const TOKEN: &str = "0123456789abcdef0123";

    fn headers(value: Option<&str>) -> HeaderMap {
        let mut h = HeaderMap::new();
        if let Some(v) = value {
            h.insert(AUTHORIZATION, HeaderValue::from_str(v).expect("header"));
        }
        h
    }

    #[test]
    fn the_right_token_passes_and_others_are_told_apart() {
        let token = AdminToken::new(&format!("  {TOKEN}\n")).expect("token");
        assert_eq!(check(Some(&token), &headers(Some(&format!("Bearer {TOKEN}")))), Ok(()));
        assert_eq!(check(Some(&token), &headers(Some(&format!("bearer  {TOKEN} ")))), Ok(()));
        assert_eq!(check(Some(&token), &headers(Some("Bearer nope-nope-nope-nope"))), Err(Refusal::Wrong));
        assert_eq!(check(Some(&token), &headers(Some(&format!("Bearer {TOKEN}x")))), Err(Refusal::Wrong));
        assert_eq!(check(Some(&token), &headers(Some(&format!("Basic {TOKEN}")))), Err(Refusal::Missing));
        assert_eq!(check(Some(&token), &headers(Some("Bearer "))), Err(Refusal::Missing));
        assert_eq!(check(Some(&token), &headers(None)), Err(Refusal::Missing));
        assert_eq!(check(None, &headers(Some(&format!("Bearer {TOKEN}")))), Err(Refusal::NotConfigured));
        assert_eq!(Refusal::NotConfigured.status(), http::StatusCode::FORBIDDEN);
        assert!(Refusal::NotConfigured.message().contains("--admin-token-file"));
        assert_eq!(Refusal::Wrong.status(), http::StatusCode::UNAUTHORIZED);
    }

    #[test]
    fn weak_or_empty_tokens_are_refused() {
        assert!(AdminToken::new("").is_err());
        assert!(AdminToken::new("short").unwrap_err().to_string().contains("at least 16"));
        assert!(AdminToken::new("two words two words two").is_err());
        assert!(!format!("{:?}", AdminToken::new(TOKEN).expect("token")).contains(TOKEN));
    }
}
