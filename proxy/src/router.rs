//! Route matching: the first `http[]` route of a virtual host whose matches accept
//! the request (Istio: matches are OR'ed, fields inside one match AND'ed).

use http::{HeaderMap, HeaderName, Method};

use crate::snapshot::{RequestMatch, Route, StringMatch, VirtualHost};

/// The parts of a request that routes match on.
#[derive(Debug, Clone, Copy)]
pub struct RequestView<'a> {
    pub method: &'a Method,
    /// Path without the query.
    pub path: &'a str,
    /// Query string without `?`, empty if none.
    pub query: &'a str,
    /// `http` or `https`.
    pub scheme: &'a str,
    /// Host / :authority as received (with port if it had one).
    pub authority: &'a str,
    pub headers: &'a HeaderMap,
    /// Port the request was addressed to.
    pub port: u16,
}

impl StringMatch {
    /// Whether `value` matches (case-sensitive).
    pub fn matches(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value == s,
            StringMatch::Prefix(p) => value.starts_with(p.as_str()),
            StringMatch::Regex(re) => re.is_match(value),
        }
    }

    /// Like [`matches`](Self::matches), but exact and prefix ignore ASCII case
    /// (the pattern is stored lower-case).
    fn matches_ignore_case(&self, value: &str) -> bool {
        match self {
            StringMatch::Exact(s) => value.eq_ignore_ascii_case(s),
            StringMatch::Prefix(p) => {
                value.len() >= p.len() && value.as_bytes()[..p.len()].eq_ignore_ascii_case(p.as_bytes())
            }
            StringMatch::Regex(re) => re.is_match(value),
        }
    }
}

/// The first route of `vh` that matches the request.
pub fn find_route<'s>(vh: &'s VirtualHost, req: &RequestView<'_>) -> Option<&'s Route> {
    vh.routes.iter().find(|r| r.matches.is_empty() || r.matches.iter().any(|m| matches(m, req)))
}

/// Whether one `HTTPMatchRequest` accepts the request.
pub fn matches(m: &RequestMatch, req: &RequestView<'_>) -> bool {
    if let Some(uri) = &m.uri {
        let ok = if m.ignore_uri_case { uri.matches_ignore_case(req.path) } else { uri.matches(req.path) };
        if !ok {
            return false;
        }
    }
    if m.method.as_ref().is_some_and(|s| !s.matches(req.method.as_str()))
        || m.scheme.as_ref().is_some_and(|s| !s.matches(req.scheme))
        || m.authority.as_ref().is_some_and(|s| !s.matches(req.authority))
        || m.port.is_some_and(|p| p != req.port)
    {
        return false;
    }
    if !m.headers.iter().all(|(name, value)| header_matches(req.headers, name, value.as_ref())) {
        return false;
    }
    if m.without_headers.iter().any(|(name, value)| header_matches(req.headers, name, value.as_ref())) {
        return false;
    }
    m.query_params.iter().all(|(name, value)| query_param(req.query, name).is_some_and(|v| value.matches(v)))
}

fn header_matches(headers: &HeaderMap, name: &HeaderName, value: Option<&StringMatch>) -> bool {
    let mut values = headers.get_all(name).iter();
    let Some(first) = values.next() else { return false };
    let Some(want) = value else { return true };
    match values.next() {
        None => first.to_str().is_ok_and(|v| want.matches(v)),
        Some(second) => {
            // Several values match as Envoy sees them: joined with commas.
            let mut joined = String::from(first.to_str().unwrap_or_default());
            for v in std::iter::once(second).chain(values) {
                joined.push(',');
                joined.push_str(v.to_str().unwrap_or_default());
            }
            want.matches(&joined)
        }
    }
}

/// The raw value of the first `name` parameter in a query string (`""` for `?name`).
pub fn query_param<'q>(query: &'q str, name: &str) -> Option<&'q str> {
    query.split('&').find_map(|pair| {
        let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
        (k == name).then_some(v)
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::snapshot::{HeaderOps, RetryPolicy, RouteAction};

    fn route(name: &str, matches: Vec<RequestMatch>) -> Route {
        Route {
            name: name.into(),
            matches,
            action: RouteAction::Direct { status: http::StatusCode::OK, body: bytes::Bytes::new() },
            timeout: None,
            retry: RetryPolicy::default(),
            fault: None,
            headers: HeaderOps::default(),
            rewrite: None,
            mirror: None,
        }
    }

    fn view<'a>(method: &'a Method, path: &'a str, query: &'a str, headers: &'a HeaderMap) -> RequestView<'a> {
        RequestView { method, path, query, scheme: "http", authority: "payment:8080", headers, port: 8080 }
    }

    #[test]
    fn first_match_wins_and_header_override() {
        let canary = RequestMatch {
            headers: vec![(HeaderName::from_static("x-canary"), Some(StringMatch::Exact("always".into())))],
            ..Default::default()
        };
        let vh = VirtualHost {
            name: "default/payment".into(),
            domains: vec![],
            routes: vec![route("canary", vec![canary]), route("split", vec![])],
        };
        let mut headers = HeaderMap::new();
        let get = Method::GET;
        assert_eq!(find_route(&vh, &view(&get, "/", "", &headers)).map(|r| r.name.as_str()), Some("split"));
        headers.insert("x-canary", "always".parse().expect("value"));
        assert_eq!(find_route(&vh, &view(&get, "/", "", &headers)).map(|r| r.name.as_str()), Some("canary"));
    }

    #[test]
    fn uri_method_query_and_without_headers() {
        let m = RequestMatch {
            uri: Some(StringMatch::Prefix("/api".into())),
            ignore_uri_case: true,
            method: Some(StringMatch::Exact("POST".into())),
            query_params: vec![("debug".into(), StringMatch::Exact("".into()))],
            without_headers: vec![(HeaderName::from_static("x-skip"), None)],
            ..Default::default()
        };
        let headers = HeaderMap::new();
        let post = Method::POST;
        assert!(matches(&m, &view(&post, "/API/pay", "a=1&debug", &headers)));
        assert!(!matches(&m, &view(&post, "/API/pay", "a=1", &headers)));
        assert!(!matches(&m, &view(&Method::GET, "/api", "debug", &headers)));
        let mut skip = HeaderMap::new();
        skip.insert("x-skip", "1".parse().expect("value"));
        assert!(!matches(&m, &view(&post, "/api", "debug", &skip)));
        let re = RequestMatch {
            uri: Some(StringMatch::Regex(regex::Regex::new("^(?:/v[0-9]+/pay)$").expect("regex"))),
            ..Default::default()
        };
        assert!(matches(&re, &view(&post, "/v2/pay", "", &headers)));
        assert!(!matches(&re, &view(&post, "/v2/pay/x", "", &headers)));
    }
}
