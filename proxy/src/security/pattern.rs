//! Pre-compiled value matchers of authorization rules: Istio's string patterns,
//! IP blocks, and header matching over every value of a header. Matching never
//! allocates.

use std::net::IpAddr;

use http::HeaderValue;
use http::header::GetAll;

/// One Istio string pattern (every string field of an AuthorizationPolicy):
/// `abc` exact, `abc*` prefix, `*abc` suffix, `*` presence.
///
/// Parsed the way Istio generates Envoy matchers (istio
/// `pilot/pkg/security/authz/matcher/string.go`): `*` first, then a leading `*`
/// (suffix), then a trailing `*` (prefix); a `*` anywhere else is a literal
/// character. Namespaces are the exception: see [`Pattern::namespace`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Pattern {
    /// The whole value.
    Exact(Box<str>),
    /// `abc*`: the value starts with `abc` (or is `abc`).
    Prefix(Box<str>),
    /// `*abc`: the value ends with `abc` (or is `abc`).
    Suffix(Box<str>),
    /// `*`: any non-empty value. For headers, Envoy's `present_match`: the header
    /// is there, whatever its value.
    Present,
    /// Namespaces only: `*` inside the value stands for any run of characters
    /// (Istio turns a namespace pattern into the regex `.*/ns/<ns, * → .*>/.*`).
    /// Stored as the literal pieces between the stars (at least two).
    Glob(Box<[Box<str>]>),
}

impl Pattern {
    /// Parses an Istio string pattern.
    pub fn parse(value: &str) -> Pattern {
        if value == "*" {
            Pattern::Present
        } else if let Some(rest) = value.strip_prefix('*') {
            Pattern::Suffix(rest.into())
        } else if let Some(rest) = value.strip_suffix('*') {
            Pattern::Prefix(rest.into())
        } else {
            Pattern::Exact(value.into())
        }
    }

    /// Parses a pattern compared case-insensitively (`hosts`): stored lower-case,
    /// matched with [`Pattern::matches_ignore_case`].
    pub fn parse_lowercase(value: &str) -> Pattern {
        Pattern::parse(&value.to_ascii_lowercase())
    }

    /// Parses a namespace pattern (`namespaces`, `source.namespace`), where every
    /// `*` is a wildcard: Istio (`srcNamespaceGenerator`) replaces each `*` with
    /// `.*` inside the regex `.*/ns/<value>/.*`.
    pub fn namespace(value: &str) -> Pattern {
        if value == "*" {
            return Pattern::Present;
        }
        let pieces: Vec<&str> = value.split('*').collect();
        match pieces.as_slice() {
            [exact] => Pattern::Exact((*exact).into()),
            ["", rest] => Pattern::Suffix((*rest).into()),
            [rest, ""] => Pattern::Prefix((*rest).into()),
            _ => Pattern::Glob(pieces.iter().map(|p| Box::from(*p)).collect()),
        }
    }

    /// Whether `value` matches (case-sensitive).
    pub fn matches(&self, value: &str) -> bool {
        self.matches_bytes(value.as_bytes(), false)
    }

    /// Whether `value` matches, ASCII case ignored (the pattern was built with
    /// [`Pattern::parse_lowercase`]).
    pub fn matches_ignore_case(&self, value: &str) -> bool {
        self.matches_bytes(value.as_bytes(), true)
    }

    /// Byte-level matching; `fold` compares ASCII case-insensitively.
    pub(crate) fn matches_bytes(&self, value: &[u8], fold: bool) -> bool {
        let eq = |a: &[u8], b: &[u8]| if fold { a.eq_ignore_ascii_case(b) } else { a == b };
        match self {
            Pattern::Exact(p) => eq(value, p.as_bytes()),
            Pattern::Prefix(p) => value.len() >= p.len() && eq(&value[..p.len()], p.as_bytes()),
            Pattern::Suffix(p) => value.len() >= p.len() && eq(&value[value.len() - p.len()..], p.as_bytes()),
            Pattern::Present => !value.is_empty(),
            Pattern::Glob(pieces) => glob_matches(pieces, value, fold),
        }
    }

    /// Whether the values of one header, joined with `,` as Envoy does for a
    /// header that appears several times, match; [`Pattern::Present`] only needs
    /// the header to be there. The join is never built: the pieces are compared
    /// in place.
    pub fn matches_header(&self, values: GetAll<'_, HeaderValue>) -> bool {
        let mut iter = values.iter();
        let Some(first) = iter.next() else { return false };
        if matches!(self, Pattern::Present) {
            return true;
        }
        let Some(second) = iter.next() else { return self.matches_bytes(first.as_bytes(), false) };
        let joined = || {
            let rest = std::iter::once(second).chain(values.iter().skip(2));
            first
                .as_bytes()
                .iter()
                .copied()
                .chain(rest.flat_map(|v| std::iter::once(b',').chain(v.as_bytes().iter().copied())))
        };
        match self {
            Pattern::Exact(p) => joined().eq(p.bytes()),
            Pattern::Prefix(p) => {
                let mut j = joined();
                p.bytes().all(|b| j.next() == Some(b))
            }
            Pattern::Suffix(p) => {
                let total = joined().count();
                total >= p.len() && joined().skip(total - p.len()).eq(p.bytes())
            }
            Pattern::Present => true,
            // Globs exist only for namespaces, never for headers.
            Pattern::Glob(_) => false,
        }
    }
}

/// `pieces` are the literal parts between stars: the first is a prefix, the last a
/// suffix, the middle ones appear in order between them.
fn glob_matches(pieces: &[Box<str>], value: &[u8], fold: bool) -> bool {
    let (Some(first), Some(last)) = (pieces.first(), pieces.last()) else { return false };
    let (first, last) = (first.as_bytes(), last.as_bytes());
    if pieces.len() < 2 || value.len() < first.len() + last.len() {
        return false;
    }
    let eq = |a: &[u8], b: &[u8]| if fold { a.eq_ignore_ascii_case(b) } else { a == b };
    if !eq(&value[..first.len()], first) || !eq(&value[value.len() - last.len()..], last) {
        return false;
    }
    let mut middle = &value[first.len()..value.len() - last.len()];
    for piece in &pieces[1..pieces.len() - 1] {
        let piece = piece.as_bytes();
        match (0..=middle.len().saturating_sub(piece.len()))
            .find(|&i| middle.len() >= piece.len() && eq(&middle[i..i + piece.len()], piece))
        {
            Some(i) => middle = &middle[i + piece.len()..],
            None => return false,
        }
    }
    true
}

/// An IP address or CIDR block (`ipBlocks`, `source.ip`): `10.1.2.3` is a /32
/// (/128 for IPv6); host bits of a block are ignored, as Envoy's `CidrRange` does.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct IpBlock {
    network: IpAddr,
    prefix_len: u8,
}

impl IpBlock {
    /// Parses `a.b.c.d`, `a.b.c.d/n`, an IPv6 address or an IPv6 block.
    pub fn parse(text: &str) -> Result<IpBlock, String> {
        let (addr, len) = match text.split_once('/') {
            Some((addr, len)) => (addr, Some(len)),
            None => (text, None),
        };
        let network: IpAddr = addr.parse().map_err(|_| {
            if len.is_some() { format!("bad CIDR block {text:?}") } else { format!("bad IP address {text:?}") }
        })?;
        let max = if network.is_ipv4() { 32 } else { 128 };
        let prefix_len = match len {
            None => max,
            Some(len) => len
                .parse::<u8>()
                .ok()
                .filter(|l| *l <= max && !len.starts_with('+'))
                .ok_or_else(|| format!("bad CIDR block {text:?}: prefix length must be 0 to {max}"))?,
        };
        Ok(IpBlock { network, prefix_len })
    }

    /// Whether `ip` is in the block. An IPv4-mapped IPv6 address (`::ffff:a.b.c.d`,
    /// as a dual-stack listener reports IPv4 peers) counts as its IPv4 address.
    pub fn contains(&self, ip: IpAddr) -> bool {
        match (self.network, ip.to_canonical()) {
            (IpAddr::V4(net), IpAddr::V4(ip)) => {
                let mask = u32::MAX.checked_shl(32 - u32::from(self.prefix_len)).unwrap_or(0);
                u32::from(net) & mask == u32::from(ip) & mask
            }
            (IpAddr::V6(net), IpAddr::V6(ip)) => {
                let mask = u128::MAX.checked_shl(128 - u32::from(self.prefix_len)).unwrap_or(0);
                u128::from(net) & mask == u128::from(ip) & mask
            }
            _ => false,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use http::HeaderMap;

    #[test]
    fn istio_string_patterns() {
        let p = Pattern::parse;
        assert!(p("abc").matches("abc") && !p("abc").matches("abcd") && !p("abc").matches("ab"));
        assert!(p("abc*").matches("abc") && p("abc*").matches("abcd") && !p("abc*").matches("xabc"));
        assert!(p("*abc").matches("abc") && p("*abc").matches("xabc") && !p("*abc").matches("abcx"));
        assert!(p("*").matches("x") && !p("*").matches(""));
        // A star in the middle is literal, as in Istio.
        assert!(p("a*c").matches("a*c") && !p("a*c").matches("abc"));
        assert_eq!(p("**"), Pattern::Suffix("*".into()));
        let h = Pattern::parse_lowercase("*.Example.COM");
        assert!(h.matches_ignore_case("API.example.com") && !h.matches_ignore_case("example.org"));
        assert!(Pattern::parse_lowercase("Pay*").matches_ignore_case("PAYMENT"));
    }

    #[test]
    fn namespace_globs() {
        let n = Pattern::namespace;
        assert_eq!(n("prod"), Pattern::Exact("prod".into()));
        assert_eq!(n("prod-*"), Pattern::Prefix("prod-".into()));
        assert_eq!(n("*-prod"), Pattern::Suffix("-prod".into()));
        assert_eq!(n("*"), Pattern::Present);
        let g = n("team-*-prod");
        assert!(g.matches("team-a-prod") && g.matches("team--prod") && !g.matches("team-prod"));
        assert!(!g.matches("team-a-staging") && !g.matches("x-team-a-prod"));
        let g = n("a*b*c");
        assert!(g.matches("abc") && g.matches("axxbyyc") && !g.matches("acb"));
        let g = n("*mid*");
        assert!(g.matches("mid") && g.matches("a-mid-b") && !g.matches("mi-d"));
    }

    #[test]
    fn header_values_are_joined_with_commas() {
        let mut headers = HeaderMap::new();
        headers.append("x-v", HeaderValue::from_static("a"));
        headers.append("x-v", HeaderValue::from_static("bc"));
        headers.insert("x-one", HeaderValue::from_static("only"));
        headers.insert("x-empty", HeaderValue::from_static(""));
        let m = |p: &str, name: &str| Pattern::parse(p).matches_header(headers.get_all(name));
        assert!(m("a,bc", "x-v") && !m("a", "x-v") && !m("bc", "x-v"));
        assert!(m("a,*", "x-v") && m("a*", "x-v") && !m("b*", "x-v") && !m("a,bcd*", "x-v"));
        assert!(m("*,bc", "x-v") && m("*c", "x-v") && !m("*a", "x-v") && !m("*xa,bc", "x-v"));
        assert!(m("only", "x-one") && m("on*", "x-one") && m("*ly", "x-one"));
        // `*` is presence, even of an empty value (Envoy's present_match).
        assert!(m("*", "x-empty") && m("*", "x-v") && !m("*", "x-missing"));
        assert!(!m("", "x-missing") && !m("x*", "x-missing"));
    }

    #[test]
    fn ip_blocks() {
        let b = |s: &str| IpBlock::parse(s).expect(s);
        let ip = |s: &str| s.parse::<IpAddr>().expect(s);
        assert!(b("10.0.0.0/8").contains(ip("10.200.1.2")) && !b("10.0.0.0/8").contains(ip("11.0.0.1")));
        assert!(b("1.2.3.4").contains(ip("1.2.3.4")) && !b("1.2.3.4").contains(ip("1.2.3.5")));
        assert!(b("0.0.0.0/0").contains(ip("8.8.8.8")) && !b("0.0.0.0/0").contains(ip("::1")));
        assert!(b("10.1.2.3/16").contains(ip("10.1.9.9")), "host bits ignored");
        assert!(b("10.0.0.0/8").contains(ip("::ffff:10.0.0.1")), "v4-mapped v6 counts as v4");
        assert!(b("2001:db8::/32").contains(ip("2001:db8::1")) && !b("2001:db8::/32").contains(ip("2001:db9::1")));
        assert!(b("::/0").contains(ip("::1")));
        for bad in ["10.0.0.0/33", "10.0.0.0/", "10.0.0/8", "abc", "1.2.3.4/-1", "::1/129", "1.2.3.4/+8"] {
            assert!(IpBlock::parse(bad).is_err(), "{bad}");
        }
    }
}
